# cython: language_level=3
"""Declarations of the native session state machines (core/_session.pyx).

Behaviour is the plain-Python twin's (core/_session_py.py, PROTOCOL.md
sections 10-12); this file is about layout and contracts.

Memory: a ServerSession is one GC-tracked object with no vtable pointer (no
cdef methods: its C-level helpers are module functions taking the session),
160 bytes + the 16-byte GC header on CPython 3.11, to which a Python subclass
adds its __slots__.  It holds no decoder object: ``_Inbuf`` keeps only the
bytes of an incomplete frame (allocated while one is pending, freed when it
completes), and complete frames are parsed by one module-level Decoder's
``_decode_frame``.  The control queue and the lane scheduler are created on
first use; the control queue is dropped again whenever it is drained.

Error contracts: ``except -1`` functions return -1 with a Python exception
set.  Frame handlers return a combination of the R_* bits below.
"""

cimport cython
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t

from tillwire.core._codec cimport Encoder
from tillwire.core._lanes cimport LaneScheduler

# What a frame handler tells the receive loop about the frame it just saw
# (the decoder has appended it to the events list).
cdef enum:
    R_KEEP = 0          # the frame stays in the returned list; go on
    R_DROP = 1          # remove it from the list (answered here, or ignored)
    R_STOP = 2          # the session ended (CLOSE received or sent): stop reading
    R_HOLD = 4          # stop before this frame and keep it and the rest, raw, for later


# Receive-side framing state, embedded in each session.  Only the bytes of
# one incomplete frame are ever copied; complete frames are parsed straight
# out of the caller's buffer.
ctypedef struct _Inbuf:
    unsigned char *buf  # bytes of the incomplete frame so far (PyMem), NULL when none is pending
    int32_t cap         # bytes allocated at buf
    int32_t len         # bytes held at buf (0: no frame pending)
    int32_t need        # prefix + length of the pending frame; 0 while its prefix is incomplete
    int32_t max         # frame limit: the largest accepted length field (64 .. 2**28 - 1)
    uint8_t hdr         # size of the pending frame's length prefix (valid when need > 0)
    uint8_t busy        # 1 inside receive_data (a re-entrant call raises RuntimeError)
    uint8_t held        # 1: buf holds input (whole frames, maybe a tail) waiting for `pong` to clear
    uint8_t pong        # server: a PONG is queued and not yet drained (a further PING waits)
    int32_t full_max    # server: the frame limit once a HELLO is received (max is the handshake limit before)


# Not final: the server subclasses it from Python (TerminalConnection, with
# __slots__).  No cdef methods (see above).
cdef class ServerSession:
    cdef Encoder _encoder             # native encoder of every frame this session builds (never None after __init__)
    cdef object _control              # outbound control frames: None, one bytes object, or a list (never empty)
    cdef LaneScheduler _lanes         # lane scheduler, None until the first push (and after release_lanes)
    cdef public object max_queued_bytes   # the scheduler's max_bytes (validated when it is created)
    cdef public object lane_weights   # the scheduler's weights, a tuple (validated when it is created)
    cdef public double started        # clock at construction (the auth deadline counts from it)
    cdef public double last_seen      # clock of the last receive_data
    cdef uint64_t _sent[2]            # highest inbox seq handed to the lanes, per inbox lane (P0, P1)
    cdef uint64_t _acked[2]           # highest inbox seq acknowledged, per inbox lane
    cdef public uint64_t heartbeat_ms # agreed heartbeat (0 until accept())
    cdef public uint64_t close_code   # code of the CLOSE sent or received (0 while open)
    cdef _Inbuf _in                   # incomplete inbound frame
    cdef public unsigned char state   # AWAIT_HELLO, AWAIT_RESUME, OPEN or CLOSED
    cdef public unsigned char dirty   # set by fanout()/the node: queued in a flush list (0/1; a byte, so _control_bytes fits beside it)
    cdef uint32_t _control_bytes      # bytes in the control queue (fits the padding after dirty)


# One per terminal connection on the client side; nothing subclasses it.
@cython.final
cdef class ClientSession:
    cdef Encoder _encoder             # native encoder (never None after __init__)
    cdef list _out                    # encoded frames waiting for data_to_send, in order
    cdef dict _channel_names          # channel id -> (name, lane), from SUBSCRIBED
    cdef dict _channel_epochs         # channel id -> epoch of its stream
    cdef dict _resync_left            # channel id -> RETRANSMIT frames still expected after RESYNC
    cdef public object channel_positions  # (name, lane) -> (epoch, offset): what a terminal persists
    cdef public object outstanding    # refs of SENDs still awaiting SENDACK/ERROR (a set)
    cdef public object close_reason   # text of the CLOSE sent or received
    cdef public double last_received  # clock of the last receive_data
    cdef public double last_sent      # clock of the last non-empty data_to_send
    cdef public uint64_t version      # protocol version from WELCOME
    cdef public uint64_t heartbeat_ms # heartbeat from WELCOME
    cdef public uint64_t server_time  # server clock (ms) from WELCOME
    cdef public uint64_t peer_max_frame   # the server's frame limit from WELCOME
    cdef public uint64_t epoch        # inbox epoch the positions belong to
    cdef public uint64_t close_code   # code of the CLOSE sent or received
    cdef public uint64_t duplicates   # DELIVER/BROADCAST frames dropped as already seen
    cdef uint64_t _processed[2]       # highest inbox seq processed (acked by the application), P0/P1
    cdef uint64_t _received[2]        # highest inbox seq received, P0/P1
    cdef uint64_t _pending_ack[2]     # seq to ACK at the next data_to_send (0: none), P0/P1
    cdef _Inbuf _in                   # incomplete inbound frame
    cdef public unsigned char state   # AWAIT_HELLO, AWAIT_WELCOME, OPEN or CLOSED
