# cython: language_level=3
"""Sans-IO session state machines (native).  Layout: core/_session.pxd.

Same API and behaviour as the plain-Python twin ``core/_session_py.py``
(PROTOCOL.md sections 10-12), on the native codec and lane scheduler:

* ``ServerSession``: one per terminal connection (the server subclasses it
  from Python).  Frame validity per state, PING answered with PONG, the ACK
  and NACK windows of the two inbox lanes, the control queue (always sent
  first) and the lane scheduler (created on the first push), CLOSE on any
  protocol error.
* ``ClientSession``: a terminal's side: handshake, inbox positions and
  duplicate suppression, channel ids and positions, batched ACKs.
* ``fanout``: one encoded frame pushed to many server sessions.

Receiving.  A session does its own framing (section 16 step 1: the length
prefix) over the caller's buffer and hands each complete frame to the native
decoder's ``_decode_frame`` of one module-level Decoder, so a session holds no
decoder object: only the bytes of an incomplete frame are ever copied, into a
buffer that exists only while such a frame is pending.  Each frame is handled
the moment it is decoded, which gives the twin's results: the twin decodes the
whole chunk first, but decoding has no effect on the session, and the twin
also stops at the first frame that ends the session.  Per frame: one Frame
(from the codec's freelist), its payload bytes (the shared b"" when empty),
one list append; frames answered here (PING) or ignored are taken off the
list again (without shrinking it).

Costs.  ``fanout`` is one type check, one C call into the scheduler and a
flag test per session (the memory of the sessions ahead prefetched);
``receive_data`` of an ACK is the decode plus a few C comparisons.  Error
texts built here are exactly the twin's; the texts of decoder errors are the
native codec's (they end up in the CLOSE payload).

Differences from the twin (observable only through misuse):

* the encoder must be a native ``tillwire.core._codec.Encoder`` (TypeError);
* integer attributes (``heartbeat_ms``, ``close_code``, inbox positions,
  ...) are C ``uint64`` and clocks C ``double``: assigning a value outside
  0..2**64-1 raises OverflowError/TypeError where the twin would store it and
  fail later in the encoder; reads return plain ``int``/``float`` (not
  ``Code`` members);
* a method that raises leaves the session as it was before the call where
  the twin may have updated an attribute first (``accept``, ``resume``,
  ``close`` with an invalid code);
* ``ClientSession.processed`` / ``received`` return a new list on every read
  (assign a 2-item sequence to change them);
* methods called internally (``close``, ``error``, ``push``) are not looked
  up on the instance: a Python subclass overriding them is not called by
  ``receive_data``/``deliver`` (``fanout`` does call an overridden ``push``);
* a second thread entering ``receive_data`` of the same session while lz4
  runs without the GIL gets RuntimeError instead of corrupting the buffer.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_CheckBuffer, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_Append, PyList_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_Check, PyLong_CheckExact
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.number cimport PyNumber_Index
from cpython.object cimport PyObject, PyObject_Hash
from cpython.unicode cimport PyUnicode_AsUTF8String
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

from tillwire.core._codec cimport Decoder, Encoder, Frame, frame_get_int, frame_set_int, new_frame
from tillwire.core._lanes cimport (LaneScheduler, PUSH_DROPPED, PUSH_OVERFLOW, lanes_drain,
                                   lanes_prefetch, lanes_push)

cdef extern from "Python.h":
    PyObject *PyList_GET_ITEM(object lst, Py_ssize_t i)
    PyObject *PyIter_Next(object it)                 # new reference, or NULL (end or error)
    PyObject *PyErr_Occurred()
    bint PyDict_Next(object d, Py_ssize_t *pos, PyObject **key, PyObject **value)
    Py_ssize_t PyDict_Size(object d)
    void Py_DECREF(PyObject *o)
    void Py_SET_SIZE(object o, Py_ssize_t n)
    const Py_ssize_t PY_SSIZE_T_MAX

cdef extern from *:
    void _prefetch "__builtin_prefetch"(const void *addr) noexcept nogil
    PyObject *_type_of "(PyObject *)Py_TYPE"(PyObject *o) noexcept nogil

cdef extern from *:
    """
    /* Re-raise the exception PyIter_Next left set (Cython sees a NULL return). */
    static PyObject *__pyx_session_raise_current(void) { return NULL; }
    """
    object raise_current "__pyx_session_raise_current" ()

from tillwire.core import codes as _codes
from tillwire.core.codes import Code, Flag, FrameType, Lane, ReceiptStatus
from tillwire.core.errors import ProtocolError
from orjson import dumps as _orjson_dumps

IMPLEMENTATION = "native"

# States of both machines (the twin's values).
AWAIT_HELLO = 0    # server: nothing received yet        | client: HELLO not sent yet
AWAIT_RESUME = 1   # server: HELLO received, no RESUME    | client: (unused)
AWAIT_WELCOME = 1  # client: HELLO sent, no WELCOME yet
OPEN = 2           # both: the session carries messages
CLOSED = 3         # both: CLOSE sent or received; input is ignored

INBOX_LANES = (Lane.P0, Lane.P1)

cdef enum:
    S_AWAIT_HELLO = 0
    S_AWAIT_RESUME = 1
    S_AWAIT_WELCOME = 1
    S_OPEN = 2
    S_CLOSED = 3
    PREFIX_INCOMPLETE = -1
    MIN_INBUF = 16          # first allocation for an incomplete frame (a prefix needs 4)

ctypedef unsigned char uchar

# ---------------------------------------------------------------------------
# Constants from core/codes.py, read once into C globals.

cdef int T_HELLO = FrameType.HELLO
cdef int T_WELCOME = FrameType.WELCOME
cdef int T_PING = FrameType.PING
cdef int T_PONG = FrameType.PONG
cdef int T_RESUME = FrameType.RESUME
cdef int T_GOAWAY = FrameType.GOAWAY
cdef int T_CLOSE = FrameType.CLOSE
cdef int T_ERROR = FrameType.ERROR
cdef int T_SEND = FrameType.SEND
cdef int T_SENDACK = FrameType.SENDACK
cdef int T_DELIVER = FrameType.DELIVER
cdef int T_BROADCAST = FrameType.BROADCAST
cdef int T_ACK = FrameType.ACK
cdef int T_NACK = FrameType.NACK
cdef int T_RECEIPT = FrameType.RECEIPT
cdef int T_SUBSCRIBE = FrameType.SUBSCRIBE
cdef int T_UNSUBSCRIBE = FrameType.UNSUBSCRIBE
cdef int T_SUBSCRIBED = FrameType.SUBSCRIBED
cdef int T_UNSUBSCRIBED = FrameType.UNSUBSCRIBED
cdef int T_RESYNC = FrameType.RESYNC
cdef int T_HISTORY = FrameType.HISTORY

cdef int F_LANE = Flag.LANE_MASK
cdef int F_ACK_REQUESTED = Flag.ACK_REQUESTED
cdef int F_RETRANSMIT = Flag.RETRANSMIT
cdef int F_RECEIPT_REQUESTED = Flag.RECEIPT_REQUESTED
cdef int LANE_P1 = Lane.P1

cdef int C_MALFORMED = Code.MALFORMED
cdef int C_FRAME_TOO_LARGE = Code.FRAME_TOO_LARGE
cdef int C_BAD_VARINT = Code.BAD_VARINT
cdef int C_UNEXPECTED = Code.UNEXPECTED_FRAME
cdef int C_BAD_REQUEST = Code.BAD_REQUEST
cdef int C_UNSUPPORTED_VERSION = Code.UNSUPPORTED_VERSION
cdef uint64_t RECEIPT_READ = ReceiptStatus.READ
cdef uint64_t MIN_VERSION = _codes.MIN_PROTOCOL_VERSION
cdef uint64_t MAX_VERSION = _codes.PROTOCOL_VERSION

cdef int32_t MIN_LIMIT = _codes.MIN_FRAME_SIZE_LIMIT
cdef int32_t MAX_LIMIT = _codes.MAX_FRAME_SIZE_LIMIT
cdef int EXT_FIRST = min(_codes.EXTENSION_TYPES)
cdef int EXT_LAST = max(_codes.EXTENSION_TYPES)
_DEFAULT_MAX_FRAME = _codes.DEFAULT_MAX_FRAME_SIZE
_PROTOCOL_VERSION = _codes.PROTOCOL_VERSION
_NORMAL = Code.NORMAL

# Int field slots of the codec's Frame (indexes in codes.INT_FIELDS).
cdef int I_VERSION = _codes.INT_FIELDS.index("version")
cdef int I_HEARTBEAT = _codes.INT_FIELDS.index("heartbeat")
cdef int I_TIME = _codes.INT_FIELDS.index("time")
cdef int I_MAX_FRAME = _codes.INT_FIELDS.index("max_frame")
cdef int I_EPOCH = _codes.INT_FIELDS.index("epoch")
cdef int I_P0 = _codes.INT_FIELDS.index("p0")
cdef int I_P1 = _codes.INT_FIELDS.index("p1")
cdef int I_SEQ = _codes.INT_FIELDS.index("seq")
cdef int I_CODE = _codes.INT_FIELDS.index("code")
cdef int I_DELAY = _codes.INT_FIELDS.index("delay")
cdef int I_REF = _codes.INT_FIELDS.index("ref")
cdef int I_MSG_ID = _codes.INT_FIELDS.index("msg_id")
cdef int I_CHANNEL = _codes.INT_FIELDS.index("channel")
cdef int I_OFFSET = _codes.INT_FIELDS.index("offset")
cdef int I_COUNT = _codes.INT_FIELDS.index("count")

# Frame types a peer may send once the session is open (and, for a
# terminal, while it waits for WELCOME), as 256-entry C tables.
_SERVER_OPEN_TYPES = (
    FrameType.PING, FrameType.PONG, FrameType.CLOSE, FrameType.SEND, FrameType.ACK,
    FrameType.NACK, FrameType.RECEIPT, FrameType.SUBSCRIBE, FrameType.UNSUBSCRIBE,
    FrameType.HISTORY,
)
_CLIENT_OPEN_TYPES = (
    FrameType.PING, FrameType.PONG, FrameType.GOAWAY, FrameType.CLOSE, FrameType.ERROR,
    FrameType.SENDACK, FrameType.DELIVER, FrameType.BROADCAST, FrameType.RECEIPT,
    FrameType.SUBSCRIBED, FrameType.UNSUBSCRIBED, FrameType.RESYNC,
    FrameType.HISTORY_ITEM, FrameType.HISTORY_END,
)
_CLIENT_WELCOME_TYPES = (
    FrameType.WELCOME, FrameType.PONG, FrameType.GOAWAY, FrameType.CLOSE, FrameType.ERROR,
)
cdef uchar _SERVER_OPEN[256]
cdef uchar _CLIENT_OPEN[256]
cdef uchar _CLIENT_WELCOME[256]
# Name of every type byte for error texts: the FrameType name, else "0x.." .
cdef list _TYPE_NAMES = [FrameType(t).name if t in FrameType._value2member_map_ else f"0x{t:02x}"
                         for t in range(256)]


cdef int _init_tables() except -1:
    cdef int t
    for t in range(256):
        _SERVER_OPEN[t] = t in _SERVER_OPEN_TYPES
        _CLIENT_OPEN[t] = t in _CLIENT_OPEN_TYPES
        _CLIENT_WELCOME[t] = t in _CLIENT_WELCOME_TYPES
    return 0


_init_tables()


# ---------------------------------------------------------------------------
# Small helpers

cdef inline uint64_t _fint(Frame f, int slot) except? 0xffffffffffffffff:
    """Int field of a frame as a C value (decoded frames hold ints in C;
    anything else goes through the codec's accessor)."""
    cdef int i
    if f._odd_vals is None:
        for i in range(f._nints):
            if f._islot[i] == slot:
                return f._ival[i]
        return 0
    return frame_get_int(f, slot)


cdef inline Frame _frame(int t, object payload):
    """A fresh frame of type t (flags 0, int fields 0) with this payload."""
    cdef Frame f = new_frame()
    f._type = <uchar>t
    f._payload = payload
    return f


cdef inline bytes _encode(Encoder enc, Frame f):
    """enc._encode_one(f), refusing a session whose __init__ never ran."""
    if enc is None:
        raise RuntimeError("session not initialised: its __init__() was not called")
    return enc._encode_one(f)


cdef inline object _utf8(object text):
    """``text.encode()`` (the twin's call), without the method lookup for str."""
    if type(text) is str:
        return PyUnicode_AsUTF8String(text)
    return text.encode()


cdef inline Py_ssize_t _inbox_index(object lane) except -1:
    """Index of an inbox lane into a 2-item array, with list indexing rules
    (the twin indexes lists: -1 is P1, -2 is P0, anything else IndexError)."""
    cdef Py_ssize_t i = PyNumber_Index(lane)
    if i < 0:
        i += 2
    if i < 0 or i > 1:
        raise IndexError("list index out of range")
    return i


cdef int _lane_arg(object lane) except -1:
    """A push lane as 0..3, with the errors of the native LaneScheduler.push."""
    cdef int overflow = 0
    cdef long long value = PyLong_AsLongLongAndOverflow(PyNumber_Index(lane), &overflow)
    if overflow or value < 0 or value > 3:
        raise ValueError(f"lane must be 0..3, got {lane!r}")
    return <int>value


cdef inline int _frame_arg(object frame) except -1:
    if not isinstance(frame, bytes):
        raise TypeError(f"frame must be bytes, not {type(frame).__name__}")
    return 0


cdef int32_t _frame_limit(object max_frame_size) except -1:
    """The decoder's rules for max_frame_size."""
    if not isinstance(max_frame_size, int):
        raise TypeError("max_frame_size must be an int")
    if not MIN_LIMIT <= max_frame_size <= MAX_LIMIT:
        raise ValueError(f"max_frame_size must be in [{MIN_LIMIT}, {MAX_LIMIT}], got {max_frame_size}")
    return <int32_t>max_frame_size


# ---------------------------------------------------------------------------
# Framing (PROTOCOL.md section 16 step 1) and decoding

cdef inline int _parse_prefix(const uchar *p, Py_ssize_t avail, Py_ssize_t limit,
                              Py_ssize_t *length, int *plen) noexcept nogil:
    """The length prefix at p (avail bytes there): 0 (sets *length, *plen),
    PREFIX_INCOMPLETE, or the error code, in the spec's order."""
    cdef Py_ssize_t v = 0
    cdef int i
    cdef uchar b
    for i in range(4):
        if i >= avail:
            return PREFIX_INCOMPLETE
        b = p[i]
        v |= (<Py_ssize_t>(b & 0x7f)) << (7 * i)
        if b < 0x80:
            if b == 0 and i > 0:
                return C_BAD_VARINT
            if v > limit:
                return C_FRAME_TOO_LARGE
            if v < 2:
                return C_MALFORMED
            length[0] = v
            plen[0] = i + 1
            return 0
    return C_FRAME_TOO_LARGE


cdef tuple _prefix_error(int rc, int32_t limit, const uchar *p, Py_ssize_t n):
    """(code, message) of a bad length prefix: the native decoder's own, by
    feeding it the same prefix bytes (a cold path)."""
    cdef Decoder d = Decoder(limit)
    try:
        d.feed(PyBytes_FromStringAndSize(<const char *>p, n))
    except ProtocolError as exc:
        return (exc.code, exc.message)
    return (rc, "bad frame length prefix")


cdef int _inbuf_reserve(_Inbuf *ib, Py_ssize_t want) except -1:
    """ib.buf holds at least `want` bytes (doubling, never past the pending
    frame's size, so a peer announcing a big frame pays as it sends)."""
    cdef Py_ssize_t cap = ib.cap
    cdef uchar *nb
    if want <= cap:
        return 0
    cap = 2 * cap
    if ib.need and cap > ib.need:
        cap = ib.need
    if cap < want:
        cap = want
    if cap < MIN_INBUF:
        cap = MIN_INBUF
    nb = <uchar *>PyMem_Realloc(ib.buf, <size_t>cap)
    if nb == NULL:
        raise MemoryError()
    ib.buf = nb
    ib.cap = <int32_t>cap
    return 0


cdef inline void _inbuf_free(_Inbuf *ib) noexcept:
    PyMem_Free(ib.buf)
    ib.buf = NULL
    ib.cap = ib.len = ib.need = 0
    ib.hdr = 0
    ib.held = 0


cdef int _inbuf_hold(_Inbuf *ib, const uchar *head, Py_ssize_t head_len, const uchar *rest,
                     Py_ssize_t rest_len) except -1:
    """Keep ``head`` + ``rest`` (raw input not handled yet) in ib.buf, held
    until the queued PONG is drained; ``head`` may point into ib.buf itself
    (the pending frame that was just completed)."""
    cdef Py_ssize_t total = head_len + rest_len
    cdef uchar *nb
    if total > 0x7FFFFFFF:
        raise MemoryError("held input too large")
    nb = <uchar *>PyMem_Realloc(NULL, <size_t>(total if total else 1))
    if nb == NULL:
        raise MemoryError()
    if head_len:
        memcpy(nb, head, <size_t>head_len)
    if rest_len:
        memcpy(nb + head_len, rest, <size_t>rest_len)
    PyMem_Free(ib.buf)
    ib.buf = nb
    ib.cap = ib.len = <int32_t>total
    ib.need = 0
    ib.hdr = 0
    ib.held = 1
    return 0


# The shared parser: its _decode_frame turns one complete frame into a Frame.
# Only its _max matters (the compressed payload limit), set before each use.
# It is marked busy while in use: lz4 releases the GIL, and another thread
# decoding meanwhile gets a Decoder of its own.
cdef Decoder _PARSER = Decoder(MAX_LIMIT)


cdef object _decode(const uchar *p, Py_ssize_t length, int32_t limit, list out):
    """Decode one frame (p: its type byte; length: its length field) and
    append it to `out`.  Returns None, or (code, message) of a protocol error."""
    cdef Decoder parser = _PARSER
    cdef bint shared = not parser._busy
    cdef int rc
    if shared:
        parser._busy = True
        parser._max = limit
    else:
        parser = Decoder(limit)
    try:
        rc = parser._decode_frame(p, length, out)
    finally:
        if shared:
            parser._busy = False
    if rc:
        return (parser._err_code, parser._err_msg)
    return None


cdef int _receive(_Inbuf *ib, object session, bint server, object data, list events) except -1:
    """Feed `data` (bytes-like) to a session: every complete frame is decoded
    into `events` and handled at once; the tail is kept in ib.  Input held
    for a PONG (ib.held) goes first, once the PONG is drained; until then new
    data is added to it."""
    cdef Py_buffer view
    cdef bint have_view = False
    cdef const uchar *p
    cdef Py_ssize_t n
    if ib.busy:
        raise RuntimeError("receive_data() is not re-entrant")
    if not PyBytes_CheckExact(data):
        if PyObject_CheckBuffer(data):
            try:
                PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
                have_view = True
            except BufferError:         # e.g. a non-contiguous memoryview: copy it
                data = memoryview(data).tobytes()
        else:
            raise TypeError(f"receive_data() needs a bytes-like object, not {type(data).__name__}")
    if have_view:
        p = <const uchar *>view.buf
        n = view.len
    else:
        p = <const uchar *>PyBytes_AS_STRING(data)
        n = PyBytes_GET_SIZE(data)
    ib.busy = 1
    try:
        if ib.held:
            if n:
                _inbuf_hold(ib, ib.buf, ib.len, p, n)
            if ib.pong:
                return 0
            # The PONG went out: handle what was held (and was just added).
            held = PyBytes_FromStringAndSize(<char *>ib.buf, ib.len)
            _inbuf_free(ib)
            if have_view:
                PyBuffer_Release(&view)
                have_view = False
            p = <const uchar *>PyBytes_AS_STRING(held)
            n = PyBytes_GET_SIZE(held)
        _frames(ib, session, server, p, n, events)
    finally:
        ib.busy = 0
        if have_view:
            PyBuffer_Release(&view)
        if ib.buf != NULL and not ib.held and (ib.len == 0 or _closed(session, server)):
            _inbuf_free(ib)
        elif ib.held and _closed(session, server):
            _inbuf_free(ib)
    return 0


cdef inline bint _closed(object session, bint server) noexcept:
    if server:
        return (<ServerSession>session).state == S_CLOSED
    return (<ClientSession>session).state == S_CLOSED


cdef int _frames(_Inbuf *ib, object session, bint server, const uchar *data, Py_ssize_t n,
                 list events) except -1:
    """The framing loop of _receive; returns when the data is used up, the
    session ended or a frame must wait (R_HOLD: the rest is kept in ib)."""
    cdef Py_ssize_t pos = 0, take, length = 0
    cdef int rc, r, plen = 0
    cdef object err
    if ib.len:
        # Finish the pending frame, taking from `data` only what it lacks.
        if ib.need == 0:
            # Its prefix is incomplete (ib.len < 4 bytes): one byte at a
            # time, so the prefix is judged the moment it is complete.
            while pos < n:
                ib.buf[ib.len] = data[pos]
                ib.len += 1
                pos += 1
                rc = _parse_prefix(ib.buf, ib.len, ib.max, &length, &plen)
                if rc == PREFIX_INCOMPLETE:
                    continue
                if rc:
                    err = _prefix_error(rc, ib.max, ib.buf, ib.len)
                    _inbuf_free(ib)
                    return _protocol_error(session, server, err)
                ib.hdr = <uint8_t>plen
                ib.need = <int32_t>(plen + length)
                break
            if ib.need == 0:
                return 0
        take = ib.need - ib.len
        if take > n - pos:
            take = n - pos
        _inbuf_reserve(ib, ib.len + take)
        memcpy(ib.buf + ib.len, data + pos, <size_t>take)
        ib.len += <int32_t>take
        pos += take
        if ib.len < ib.need:
            return 0
        err = _decode(ib.buf + ib.hdr, ib.need - ib.hdr, ib.max, events)
        if err is not None:
            _inbuf_free(ib)
            return _protocol_error(session, server, err)
        r = _handle(session, server, events)
        if r == 2:
            _inbuf_hold(ib, ib.buf, ib.need, data + pos, n - pos)
            return 0
        _inbuf_free(ib)
        if r:
            return 0
    while pos < n:
        rc = _parse_prefix(data + pos, n - pos, ib.max, &length, &plen)
        if rc == 0 and length <= n - pos - plen:
            err = _decode(data + pos + plen, length, ib.max, events)
            if err is not None:
                return _protocol_error(session, server, err)
            r = _handle(session, server, events)
            if r == 2:
                _inbuf_hold(ib, NULL, 0, data + pos, n - pos)
                return 0
            pos += plen + length
            if r:
                return 0
            continue
        if rc > 0:
            take = n - pos if n - pos < 4 else 4
            return _protocol_error(session, server, _prefix_error(rc, ib.max, data + pos, take))
        # Incomplete: keep the tail (at most one frame).
        if rc == 0:
            ib.hdr = <uint8_t>plen
            ib.need = <int32_t>(plen + length)
        else:
            ib.need = 0
        _inbuf_reserve(ib, n - pos)
        memcpy(ib.buf, data + pos, <size_t>(n - pos))
        ib.len = <int32_t>(n - pos)
        return 0
    return 0


cdef int _protocol_error(object session, bint server, tuple err) except -1:
    """The decoder met bad bytes: CLOSE with its code (the twin's close(code, message))."""
    if server:
        _srv_close(<ServerSession>session, err[0], err[1])
    else:
        _cli_close(<ClientSession>session, err[0], err[1])
    return 0


cdef int _handle(object session, bint server, list events) except -1:
    """Handle the frame the decoder just appended to `events`; 1 = stop
    reading, 2 = hold this frame and the rest (it was taken off `events`)."""
    cdef Py_ssize_t last = PyList_GET_SIZE(events) - 1
    cdef Frame f = <Frame>PyList_GET_ITEM(events, last)
    cdef int r
    if server:
        r = _srv_frame(<ServerSession>session, f)
    else:
        r = _cli_frame(<ClientSession>session, f)
    if r & R_DROP:
        # Remove it without list.pop(): that would shrink (realloc) the list
        # when a dropped frame was its only item, as it is for every PING.
        Py_SET_SIZE(events, last)
        Py_DECREF(<PyObject *>f)      # the list's reference; `f` still holds one
    if r & R_HOLD:
        return 2
    return (r & R_STOP) != 0


# ---------------------------------------------------------------------------
# ServerSession internals (module functions: the class has no vtable)

cdef int _ctl_add(ServerSession s, object frame) except -1:
    """Queue a control frame (bytes).  One exact bytes object is kept as is;
    a second frame makes the queue a list."""
    cdef object c = s._control
    cdef Py_ssize_t size = PyBytes_GET_SIZE(frame) if PyBytes_CheckExact(frame) else len(frame)
    if <Py_ssize_t>s._control_bytes + size > 0xFFFFFFFF:
        raise OverflowError("control queue above 4 GiB")
    s._control_bytes += <uint32_t>size
    if c is None:
        s._control = frame if type(frame) is bytes else [frame]
    elif type(c) is list:
        (<list>c).append(frame)
    else:
        s._control = [c, frame]
    return 0


cdef int _srv_drop_lanes(ServerSession s) except -1:
    if s._lanes is not None:
        s._lanes.clear()
    return 0


cdef int _srv_close(ServerSession s, object code, object reason) except -1:
    """Queue CLOSE as the last frame and end the session (see close())."""
    cdef Frame f
    if s.state == S_CLOSED:
        return 0
    s.state = S_CLOSED
    _srv_drop_lanes(s)
    f = _frame(T_CLOSE, _utf8(reason))
    frame_set_int(f, I_CODE, code)
    frame = _encode(s._encoder, f)
    s.close_code = code
    _ctl_add(s, frame)
    return 0


cdef int _srv_error(ServerSession s, object code, object ref, object message) except -1:
    cdef Frame f = _frame(T_ERROR, _utf8(message))
    frame_set_int(f, I_CODE, code)
    frame_set_int(f, I_REF, ref)
    _ctl_add(s, _encode(s._encoder, f))
    return 0


cdef int _srv_unexpected(ServerSession s, int t, str why) except -1:
    _srv_close(s, C_UNEXPECTED, <str>_TYPE_NAMES[t] + ": " + why)
    return R_DROP | R_STOP


cdef int _srv_frame(ServerSession s, Frame f) except -1:
    """Validate one received frame against the state (the twin's _accept)."""
    cdef int t = f._type
    cdef int state = s.state
    cdef int lane
    cdef uint64_t seq
    if state == S_AWAIT_HELLO:
        if t == T_HELLO:
            s.state = S_AWAIT_RESUME
            s._in.max = s._in.full_max      # the handshake limit ends with HELLO
            return R_KEEP
        return _srv_unexpected(s, t, "the first frame must be HELLO")
    if EXT_FIRST <= t <= EXT_LAST:
        return R_DROP
    if t == T_PING:
        if s._in.pong:
            return R_DROP | R_HOLD      # one PONG pending at a time: this PING waits
        _ctl_add(s, _encode(s._encoder, _frame(T_PONG, f._payload)))
        s._in.pong = 1
        return R_DROP
    if t == T_CLOSE:
        s.state = S_CLOSED
        s.close_code = _fint(f, I_CODE)
        _srv_drop_lanes(s)
        return R_KEEP | R_STOP
    if state == S_AWAIT_RESUME:
        if t == T_RESUME:
            s.state = S_OPEN
            return R_KEEP
        return _srv_unexpected(s, t, "only RESUME, PING or CLOSE may follow HELLO")
    if not _SERVER_OPEN[t]:
        return _srv_unexpected(s, t, "not allowed in an open session")
    if t == T_PONG:
        return R_DROP
    if t == T_ACK:
        lane = f._flags & F_LANE
        seq = _fint(f, I_SEQ)
        if lane > LANE_P1:
            _srv_error(s, C_BAD_REQUEST, 0, "ACK: lane must be P0 or P1")
        elif seq > s._sent[lane]:
            _srv_error(s, C_BAD_REQUEST, 0, f"ACK: P{lane} seq {seq} was never delivered")
        elif seq > s._acked[lane]:
            s._acked[lane] = seq
            return R_KEEP
        return R_DROP
    if t == T_NACK:
        lane = f._flags & F_LANE
        seq = _fint(f, I_SEQ)
        if lane > LANE_P1:
            _srv_error(s, C_BAD_REQUEST, 0, "NACK: lane must be P0 or P1")
        elif not s._acked[lane] < seq <= s._sent[lane]:
            _srv_error(s, C_BAD_REQUEST, 0, f"NACK: P{lane} seq {seq} is not awaiting an ack")
        else:
            return R_KEEP
        return R_DROP
    if t == T_RECEIPT and _fint(f, I_CODE) != RECEIPT_READ:
        _srv_error(s, C_BAD_REQUEST, 0, "RECEIPT: a terminal may only send READ")
        return R_DROP
    return R_KEEP


cdef LaneScheduler _srv_lanes(ServerSession s):
    """The session's scheduler, created on first use."""
    cdef LaneScheduler lanes = s._lanes
    if lanes is None:
        lanes = LaneScheduler(s.max_queued_bytes, s.lane_weights)
        s._lanes = lanes
    return lanes


cdef class ServerSession:
    """The server's side of one terminal connection (PROTOCOL.md 10-12).

    ``ServerSession(encoder, *, max_frame_size=1 << 20, max_queued_bytes=1 << 20,
    lane_weights=(8, 4, 1), now=0.0)``; ``encoder`` is a native
    ``tillwire.core._codec.Encoder``.  Subclassable from Python (with
    ``__slots__``).

    Outbound bytes come from two places, drained in this order by
    ``data_to_send``: the control queue (WELCOME, PONG, SENDACK, ERROR,
    SUBSCRIBED, GOAWAY, CLOSE: small and always sent first) and the lane
    scheduler (DELIVER, BROADCAST, RESYNC), created on the first push so an
    idle connection does not pay for it.
    """

    def __cinit__(self):
        # C fields start zeroed, object fields None.
        self._in.max = _DEFAULT_MAX_FRAME
        self._in.full_max = _DEFAULT_MAX_FRAME
        self.state = S_AWAIT_HELLO

    def __init__(self, encoder, *, max_frame_size=_DEFAULT_MAX_FRAME,
                 max_queued_bytes=1 << 20, lane_weights=(8, 4, 1), double now=0.0,
                 handshake_frame_size=None):
        if not isinstance(encoder, Encoder):
            raise TypeError("ServerSession needs a native tillwire.core._codec.Encoder, "
                            f"not {type(encoder).__name__}")
        weights = tuple(lane_weights)
        limit = _frame_limit(max_frame_size)
        hello_limit = limit if handshake_frame_size is None else \
            min(limit, _frame_limit(handshake_frame_size))
        if self._in.busy:
            raise RuntimeError("ServerSession.__init__() called inside receive_data()")
        self._encoder = <Encoder>encoder
        self.state = S_AWAIT_HELLO
        self.started = now
        self.last_seen = now
        self.heartbeat_ms = 0
        self.close_code = 0
        self.dirty = False
        self.max_queued_bytes = max_queued_bytes
        self.lane_weights = weights
        _inbuf_free(&self._in)
        self._in.max = hello_limit
        self._in.full_max = limit
        self._in.pong = 0
        self._control = None
        self._control_bytes = 0
        self._lanes = None
        self._sent[0] = self._sent[1] = 0
        self._acked[0] = self._acked[1] = 0

    def __dealloc__(self):
        PyMem_Free(self._in.buf)
        self._in.buf = NULL

    @property
    def encoder(self):
        """The native Encoder every frame of this session is built with."""
        return self._encoder

    @encoder.setter
    def encoder(self, value):
        if not isinstance(value, Encoder):
            raise TypeError(f"encoder must be a native tillwire.core._codec.Encoder, not {type(value).__name__}")
        self._encoder = <Encoder>value

    # -- input ------------------------------------------------------------

    def receive_data(self, data, double now):
        """Decode ``data``; return the frames the application must act on.

        Returned: HELLO, RESUME, SEND, ACK (only ones that advance the
        window), NACK, RECEIPT, SUBSCRIBE, UNSUBSCRIBE, HISTORY and a peer's
        CLOSE.  PING is answered here; PONG and extension frames are dropped.
        A protocol error queues CLOSE with its code (the frames before the
        bad one are still returned).
        """
        cdef list events = []
        if self.state == S_CLOSED:
            return events
        self.last_seen = now
        _receive(&self._in, self, True, data, events)
        return events

    # -- output -------------------------------------------------------------

    def accept(self, version, heartbeat_ms, time_ms, max_frame, epoch, payload=b""):
        """Queue WELCOME for the HELLO the application has verified (ignored
        after CLOSE: CLOSE is always the last frame)."""
        cdef Frame f = _frame(T_WELCOME, payload)
        frame_set_int(f, I_VERSION, version)
        frame_set_int(f, I_HEARTBEAT, heartbeat_ms)
        frame_set_int(f, I_TIME, time_ms)
        frame_set_int(f, I_MAX_FRAME, max_frame)
        frame_set_int(f, I_EPOCH, epoch)
        frame = _encode(self._encoder, f)
        if self.state == S_CLOSED:
            return
        self.heartbeat_ms = heartbeat_ms
        _ctl_add(self, frame)

    def set_inbox(self, lane, acked):
        """Set the inbox window after RESUME: ``acked`` is the position both
        sides agree on; delivery continues after it."""
        cdef Py_ssize_t i = _inbox_index(lane)
        cdef uint64_t v = acked
        self._acked[i] = v
        self._sent[i] = v

    def inbox_window(self, lane):
        """(acked, sent) of an inbox lane."""
        cdef Py_ssize_t i = _inbox_index(lane)
        return (self._acked[i], self._sent[i])

    def deliver(self, lane, seq, msg_id, kind, payload, retransmit=False):
        """Queue an inbox message; returns the lane scheduler's push result."""
        cdef Frame f
        cdef int flags
        cdef Py_ssize_t i
        cdef uint64_t s
        if lane > LANE_P1:
            raise ValueError("deliver: inbox lanes are P0 and P1")
        if self.state == S_CLOSED:
            return PUSH_DROPPED         # after CLOSE nothing more is queued
        flags = F_ACK_REQUESTED | (F_RETRANSMIT if retransmit else 0)
        if PyLong_Check(lane) and (lane == 0 or lane == 1):
            # encode_deliver() without the Python call.
            i = lane
            f = _frame(T_DELIVER, payload)
            f._flags = <uchar>(flags | i)
            frame_set_int(f, I_SEQ, seq)
            frame_set_int(f, I_MSG_ID, msg_id)
            f._kind = kind
            frame = _encode(self._encoder, f)
        else:
            frame = self._encoder.encode_deliver(lane, flags, seq, msg_id, kind, payload)
            i = _inbox_index(lane)
        s = seq                         # the encoder accepted it: an int in 0..2**64-1
        if s > self._sent[i]:
            self._sent[i] = s
        return lanes_push(_srv_lanes(self), <int>i, frame, None, 0, 0.0, None)

    def push(self, lane, frame, key=None, deadline=0.0, channel=None):
        """Queue an encoded frame (a BROADCAST shared by many sessions).

        After CLOSE nothing is queued and DROPPED is returned."""
        cdef LaneScheduler lanes
        cdef double dl = deadline
        cdef int ln = _lane_arg(lane)
        cdef Py_hash_t h = 0
        _frame_arg(frame)
        if self.state == S_CLOSED:
            return PUSH_DROPPED         # after CLOSE nothing more is queued
        lanes = _srv_lanes(self)
        if ln == 2:
            if key is not None:
                h = PyObject_Hash(key)
            if channel is not None:
                PyObject_Hash(channel)
        return lanes_push(lanes, ln, frame, key, h, dl, channel)

    def control(self, frame):
        """Queue an encoded control frame; control frames go before any lane.
        Ignored after CLOSE (CLOSE is always the last frame)."""
        _frame_arg(frame)
        if self.state != S_CLOSED:
            _ctl_add(self, frame)

    def error(self, code, ref, message):
        """Queue ERROR (the session goes on); ignored after CLOSE."""
        if self.state != S_CLOSED:
            _srv_error(self, code, ref, message)

    def goaway(self, code, delay_ms, reason=""):
        """Queue GOAWAY: the terminal should reconnect after ``delay_ms``."""
        cdef Frame f = _frame(T_GOAWAY, _utf8(reason))
        frame_set_int(f, I_CODE, code)
        frame_set_int(f, I_DELAY, delay_ms)
        if self.state != S_CLOSED:
            _ctl_add(self, _encode(self._encoder, f))

    def close(self, code, reason=""):
        """Queue CLOSE as the last frame and end the session.

        Queued lane frames are discarded (P0/P1 stay in the store); control
        frames queued before the CLOSE are still sent.
        """
        _srv_close(self, code, reason)
        if not self._in.busy:
            _inbuf_free(&self._in)

    def data_to_send(self, max_bytes, double now):
        """The control queue, then the lanes: up to ``max_bytes`` in all, but
        at least one whole frame (control frames are never split; the
        control frames left wait for the next call, ahead of any lane)."""
        cdef object c = self._control
        cdef LaneScheduler lanes = self._lanes
        cdef Py_ssize_t used, limit, k, size, total
        cdef long long m
        cdef int overflow = 0
        cdef list frames
        if PyLong_CheckExact(max_bytes):
            m = PyLong_AsLongLongAndOverflow(max_bytes, &overflow)
            if overflow > 0 or m > PY_SSIZE_T_MAX:
                limit = PY_SSIZE_T_MAX
            elif overflow < 0 or m < 0:
                limit = 0
            else:
                limit = <Py_ssize_t>m
        else:
            limit = -1                  # (any other number: compared as an object below)
        if c is None:
            out = b""
        elif type(c) is bytes:
            out = c
            self._control = None
            self._control_bytes = 0
        else:
            frames = <list>c
            if limit < 0 or <Py_ssize_t>self._control_bytes <= limit:
                out = b"".join(frames)      # a failure keeps the queue (as the twin)
                self._control = None
                self._control_bytes = 0
            else:
                total = 0
                k = 0
                while k < PyList_GET_SIZE(frames):
                    size = PyBytes_GET_SIZE(<bytes>PyList_GET_ITEM(frames, k))
                    if k and total + size > limit:
                        break
                    total += size
                    k += 1
                out = b"".join(frames[:k])
                del frames[:k]
                self._control_bytes -= <uint32_t>total
                if PyList_GET_SIZE(frames) == 0:
                    self._control = None    # (a list is never empty)
                    self._in.pong = 0       # every PONG queued went with it
                return out              # the control frames left go first next time
        if self._control is None:
            self._in.pong = 0           # every PONG queued went with it
        if lanes is None:
            return out
        used = PyBytes_GET_SIZE(out)
        if limit >= 0:
            if limit <= used:
                return out
            more = lanes_drain(lanes, limit - used, now)
        elif used < max_bytes:
            more = lanes.drain(max_bytes - used, now)
        else:
            return out
        if used == 0:
            return more
        if PyBytes_GET_SIZE(more) == 0:
            return out
        return out + more

    @property
    def control_bytes(self):
        """Bytes waiting in the control queue (answers to the terminal's own
        requests, receipts, announcements): what the connection's budget
        counts besides the lanes."""
        return self._control_bytes

    @property
    def input_held(self):
        """True while received input waits for the queued PONG to go out (a
        PING arrived with one pending); the driver stops reading meanwhile
        and calls ``receive_data(b"", now)`` once data_to_send drained it."""
        return self._in.held != 0

    @property
    def pending(self):
        """True while anything is queued (control frames or lane frames)."""
        return self._control is not None or (self._lanes is not None and len(self._lanes) > 0)

    @property
    def queued_bytes(self):
        """Bytes queued in the lanes and the control queue."""
        lanes = 0 if self._lanes is None else self._lanes.queued_bytes
        return lanes + self._control_bytes

    @property
    def inbox_bytes(self):
        """Bytes of P0 and P1 frames queued in the lanes: what an inbox budget
        counts (P2/P3 frames give way to them, see LaneScheduler.push)."""
        cdef LaneScheduler lanes = self._lanes
        if lanes is None:
            return 0
        return lanes.lane_bytes(0) + lanes.lane_bytes(1)

    def take_resync(self):
        """Channels whose P2 frames were shed since the last call (see LaneScheduler)."""
        return [] if self._lanes is None else self._lanes.take_resync()

    def lane_counters(self):
        """(conflated, p2_dropped, p3_dropped) of this connection so far."""
        lanes = self._lanes
        if lanes is None:
            return (0, 0, 0)
        return (lanes.conflated, lanes.p2_dropped, lanes.p3_dropped)

    def release_lanes(self):
        """Free an empty scheduler (idle connections keep no queue memory).

        Returns its (conflated, p2_dropped, p3_dropped) counters, for the
        caller to keep, or None when there was nothing to release (no
        scheduler, or frames still queued).
        """
        lanes = self._lanes
        if lanes is None or len(lanes) != 0:
            return None
        self._lanes = None
        return (lanes.conflated, lanes.p2_dropped, lanes.p3_dropped)

    def deadline(self, double auth_timeout):
        """When the connection must have shown life again (or be closed)."""
        if self.heartbeat_ms == 0:
            return self.started + auth_timeout
        return self.last_seen + 1.5 * <double>self.heartbeat_ms / 1000.0


_PUSH = ServerSession.push      # fanout's test that a subclass did not override push()

# Fan-out prefetch pipeline: how many sessions ahead of the one being pushed
# each hop of the way to its queue is prefetched.  A push follows four
# pointers (session, scheduler, state block, lane queue) that for 10,000
# connections are cache misses, each waiting for the one before; fetched a
# few sessions ahead they arrive while the pushes in between run.
cdef enum:
    _AHEAD_SESSION = 8      # the session object
    _AHEAD_LANES = 6        # its scheduler
    _AHEAD_STATE = 4        # the scheduler's state block
    _AHEAD_QUEUE = 2        # the lane's queue header
    _AHEAD_SLOT = 1         # where the push will write
    _CURSORS = 5            # the five hops above (a dict: one PyDict_Next cursor each)


cdef inline void _prefetch_ahead(PyObject *o, PyObject *fast, int hop, int ln,
                                 Py_hash_t h) noexcept:
    """One hop of the pipeline for session ``o`` (borrowed from the container
    this very moment, so alive; nothing here runs Python code or fails)."""
    cdef PyObject *lanes
    if o == NULL:
        return
    if hop == _AHEAD_SESSION:
        # (Address arithmetic only: nothing of ``o`` is read yet.)
        _prefetch(o)                                # its type and scheduler pointer
        _prefetch(&(<ServerSession>o).state)        # state and dirty, 150 bytes further
        return
    if _type_of(o) != fast:
        return                      # not (yet) known to be a plain session
    lanes = <PyObject *>(<ServerSession>o)._lanes
    if lanes == <PyObject *>None:
        return
    if hop == _AHEAD_LANES:
        _prefetch(lanes)
        _prefetch(&(<LaneScheduler>lanes)._busy)    # (the object may straddle two lines)
    elif hop == _AHEAD_STATE:
        lanes_prefetch(<LaneScheduler>lanes, 1, ln, h)
    elif hop == _AHEAD_QUEUE:
        lanes_prefetch(<LaneScheduler>lanes, 2, ln, h)
    else:
        lanes_prefetch(<LaneScheduler>lanes, 3, ln, h)


def fanout(sessions, lane, frame, key=None, deadline=0.0, channel=None, dirty=None):
    """Push one encoded frame to many sessions (encode once, write many).

    ``sessions``: a dict (its keys), a list or any iterable.  Sessions that
    were not ``dirty`` are marked and appended to ``dirty``; returns the
    sessions whose push OVERFLOWed (slow consumers).  The arguments are
    checked (and ``key`` hashed) once, when the first session is reached, as
    its push() would.  Objects other than ServerSession instances (or of a
    subclass that overrides push) get their own push() called.
    """
    cdef list overflow = []
    cdef object fast = None         # a type whose push() is ServerSession.push
    cdef bint checked = False
    cdef double dl = 0.0
    cdef int ln = 0
    cdef Py_hash_t h = 0
    cdef ServerSession s
    cdef LaneScheduler lanes
    cdef bint dirty_list = type(dirty) is list
    cdef int mode
    cdef Py_ssize_t pos = 0, size = 0
    cdef PyObject *k
    cdef PyObject *ahead
    cdef object it = None
    # Prefetch cursors of a dict, cursor i running hops[i] entries ahead of pos
    # (each moves one entry per session, like pos).  Only ever read from:
    # if the dict changes, the size check below stops the loop anyway.
    cdef Py_ssize_t cursor[_CURSORS]
    cdef int hops[_CURSORS]
    cdef int i, j
    hops[0] = _AHEAD_SESSION
    hops[1] = _AHEAD_LANES
    hops[2] = _AHEAD_STATE
    hops[3] = _AHEAD_QUEUE
    hops[4] = _AHEAD_SLOT
    # One loop over three sources: a dict's keys (PyDict_Next, as its own
    # iterator would, including the size check), a list by index, else iter().
    if type(sessions) is dict:
        mode = 0
        size = PyDict_Size(sessions)
        for i in range(_CURSORS):
            cursor[i] = 0
            for j in range(hops[i]):
                if not PyDict_Next(sessions, &cursor[i], &k, NULL):
                    break
    elif type(sessions) is list:
        mode = 1
    else:
        mode = 2
        it = iter(sessions)
    while True:
        if mode == 0:
            if PyDict_Size(sessions) != size:
                raise RuntimeError("dictionary changed size during iteration")
            if not PyDict_Next(sessions, &pos, &k, NULL):
                break
            item = <object>k
            for i in range(_CURSORS):
                if PyDict_Next(sessions, &cursor[i], &ahead, NULL) and checked:
                    _prefetch_ahead(ahead, <PyObject *>fast, hops[i], ln, h)
        elif mode == 1:
            if pos >= PyList_GET_SIZE(sessions):
                break
            item = <object>PyList_GET_ITEM(sessions, pos)
            pos += 1
            if checked:
                for i in range(_CURSORS):
                    j = pos - 1 + hops[i]
                    if j < PyList_GET_SIZE(sessions):
                        _prefetch_ahead(PyList_GET_ITEM(sessions, j), <PyObject *>fast,
                                        hops[i], ln, h)
        else:
            k = PyIter_Next(it)
            if k == NULL:
                if PyErr_Occurred():
                    raise_current()
                break
            item = <object>k
            Py_DECREF(k)
        if type(item) is not fast:
            if isinstance(item, ServerSession) and getattr(type(item), "push", None) is _PUSH:
                fast = type(item)
            else:
                if item.push(lane, frame, key, deadline, channel) == PUSH_OVERFLOW:
                    overflow.append(item)
                if dirty is not None and not item.dirty:
                    item.dirty = True
                    dirty.append(item)
                continue
        s = <ServerSession>item
        if s.state == S_CLOSED:
            continue                    # closed: nothing more is queued
        lanes = s._lanes
        if lanes is None:
            lanes = _srv_lanes(s)
        if not checked:
            # The checks of LaneScheduler.push, in its order.
            dl = deadline
            ln = _lane_arg(lane)
            _frame_arg(frame)
            if ln == 2:
                if key is not None:
                    h = PyObject_Hash(key)
                if channel is not None:
                    PyObject_Hash(channel)
            checked = True
        if lanes_push(lanes, ln, frame, key, h, dl, channel) == PUSH_OVERFLOW:
            overflow.append(s)
        if dirty is not None and not s.dirty:
            s.dirty = True
            if dirty_list:
                PyList_Append(dirty, s)
            else:
                dirty.append(s)
    return overflow


# ---------------------------------------------------------------------------
# ClientSession

cdef int _cli_close(ClientSession c, object code, object reason) except -1:
    cdef Frame f
    if c.state == S_CLOSED:
        return 0
    c.state = S_CLOSED
    f = _frame(T_CLOSE, _utf8(reason))
    frame_set_int(f, I_CODE, code)
    frame = _encode(c._encoder, f)
    c.close_code = code
    c.close_reason = reason
    c._out.append(frame)
    return 0


cdef int _cli_queue(ClientSession c, Frame f) except -1:
    c._out.append(_encode(c._encoder, f))
    return 0


cdef int _cli_unexpected(ClientSession c, str message) except -1:
    _cli_close(c, C_UNEXPECTED, message)
    return R_DROP | R_STOP


cdef int _cli_frame(ClientSession c, Frame f) except -1:
    """Validate and account one frame from the server (the twin's _accept)."""
    cdef int t = f._type
    cdef int lane
    cdef uint64_t seq, v
    cdef bint allowed
    if EXT_FIRST <= t <= EXT_LAST:
        return R_DROP
    allowed = _CLIENT_WELCOME[t] if c.state == S_AWAIT_WELCOME else _CLIENT_OPEN[t]
    if (c.state == S_AWAIT_HELLO and t != T_CLOSE) or not allowed:
        # (A CLOSE may come first: a server refusing a connection at once.)
        return _cli_unexpected(c, <str>_TYPE_NAMES[t] + ": unexpected from the server now")
    if t == T_DELIVER:
        lane = f._flags & F_LANE
        if lane > LANE_P1:
            return _cli_unexpected(c, "DELIVER: lane must be P0 or P1")
        seq = _fint(f, I_SEQ)
        if seq <= c._received[lane]:
            c.duplicates += 1
            if c._processed[lane]:
                # Tell the server again: our earlier ACK may have been lost.
                c._pending_ack[lane] = c._processed[lane]
            return R_DROP
        c._received[lane] = seq
        return R_KEEP
    if t == T_BROADCAST:
        channel = frame_get_int(f, I_CHANNEL)
        stream = c._channel_names.get(channel)
        if stream is None or stream[1] != f._flags & F_LANE:
            return _cli_unexpected(c, f"BROADCAST: channel id {channel} unknown in this lane")
        epoch = c._channel_epochs[channel]
        left = c._resync_left.get(channel, 0)
        if left and f._flags & F_RETRANSMIT:
            if left == 1:
                del c._resync_left[channel]
            else:
                c._resync_left[channel] = left - 1
            return R_KEEP
        offset = frame_get_int(f, I_OFFSET)
        position = c.channel_positions.get(stream)
        if position is not None and position[0] == epoch and offset <= position[1]:
            c.duplicates += 1
            return R_DROP
        c.channel_positions[stream] = (epoch, offset)
        return R_KEEP
    if t == T_PING:
        c._out.append(_encode(c._encoder, _frame(T_PONG, f._payload)))
        return R_DROP
    if t == T_PONG:
        return R_DROP
    if t == T_WELCOME:
        v = _fint(f, I_VERSION)
        if not MIN_VERSION <= v <= MAX_VERSION:
            _cli_close(c, C_UNSUPPORTED_VERSION,
                       f"server chose version {v}; this terminal speaks "
                       f"{MIN_VERSION}-{MAX_VERSION}")
            return R_DROP | R_STOP
        c.state = S_OPEN
        c.version = v
        c.heartbeat_ms = _fint(f, I_HEARTBEAT)
        c.server_time = _fint(f, I_TIME)
        c.peer_max_frame = _fint(f, I_MAX_FRAME)
        v = _fint(f, I_EPOCH)
        if v != c.epoch:
            # The server's inbox history was reset: our positions mean nothing.
            c.epoch = v
            c._processed[0] = c._processed[1] = 0
            c._received[0] = c._received[1] = 0
            c._pending_ack[0] = c._pending_ack[1] = 0
        return R_KEEP
    if t == T_SUBSCRIBED:
        stream = (f._to, f._flags & F_LANE)
        channel = frame_get_int(f, I_CHANNEL)
        epoch = frame_get_int(f, I_EPOCH)
        c._channel_names[channel] = stream
        c._channel_epochs[channel] = epoch
        position = c.channel_positions.get(stream)
        if position is not None and position[0] != epoch:
            c.channel_positions[stream] = (epoch, 0)
        return R_KEEP
    if t == T_UNSUBSCRIBED:
        channel = frame_get_int(f, I_CHANNEL)
        c._channel_names.pop(channel, None)
        c._channel_epochs.pop(channel, None)
        c._resync_left.pop(channel, None)
        return R_KEEP
    if t == T_RESYNC:
        channel = frame_get_int(f, I_CHANNEL)
        stream = c._channel_names.get(channel)
        if stream is None:
            return _cli_unexpected(c, f"RESYNC: unknown channel id {channel}")
        epoch = frame_get_int(f, I_EPOCH)
        c._channel_epochs[channel] = epoch
        c.channel_positions[stream] = (epoch, frame_get_int(f, I_OFFSET))
        count = frame_get_int(f, I_COUNT)
        if count:
            c._resync_left[channel] = count
        else:
            c._resync_left.pop(channel, None)
        return R_KEEP
    if t == T_SENDACK or t == T_ERROR:
        c.outstanding.discard(frame_get_int(f, I_REF))
    elif t == T_CLOSE:
        c.state = S_CLOSED
        c.close_code = _fint(f, I_CODE)
        c.close_reason = f._payload.decode("utf-8", "replace")
        return R_KEEP | R_STOP
    return R_KEEP


@cython.final
cdef class ClientSession:
    """The terminal's side of a connection.

    ``ClientSession(encoder, *, max_frame_size=1 << 20, now=0.0)``;
    ``encoder`` is a native ``tillwire.core._codec.Encoder``.

    Positions (what a terminal must persist to process each message exactly
    once, PROTOCOL.md 11.4 and 12): ``epoch``, ``processed`` (P0, P1; a new
    list on every read) and ``channel_positions`` ((name, lane) -> (epoch,
    offset)) of the P2 and P3 streams.
    """

    def __cinit__(self):
        self._in.max = _DEFAULT_MAX_FRAME
        self._out = []
        self._channel_names = {}
        self._channel_epochs = {}
        self._resync_left = {}
        self.channel_positions = {}
        self.outstanding = set()
        self.close_reason = ""

    def __init__(self, encoder, *, max_frame_size=_DEFAULT_MAX_FRAME, double now=0.0):
        if not isinstance(encoder, Encoder):
            raise TypeError("ClientSession needs a native tillwire.core._codec.Encoder, "
                            f"not {type(encoder).__name__}")
        limit = _frame_limit(max_frame_size)
        if self._in.busy:
            raise RuntimeError("ClientSession.__init__() called inside receive_data()")
        self._encoder = <Encoder>encoder
        self.state = S_AWAIT_HELLO
        self.version = 0
        self.heartbeat_ms = 0
        self.server_time = 0
        self.peer_max_frame = 0
        self.epoch = 0
        self.close_code = 0
        self.close_reason = ""
        self.last_received = now
        self.last_sent = now
        self.duplicates = 0
        self._processed[0] = self._processed[1] = 0
        self._received[0] = self._received[1] = 0
        self._pending_ack[0] = self._pending_ack[1] = 0
        self.channel_positions = {}
        _inbuf_free(&self._in)
        self._in.max = limit
        self._out = []
        self._channel_names = {}
        self._channel_epochs = {}
        self._resync_left = {}
        self.outstanding = set()

    def __dealloc__(self):
        PyMem_Free(self._in.buf)
        self._in.buf = NULL

    @property
    def encoder(self):
        """The native Encoder every frame of this session is built with."""
        return self._encoder

    @encoder.setter
    def encoder(self, value):
        if not isinstance(value, Encoder):
            raise TypeError(f"encoder must be a native tillwire.core._codec.Encoder, not {type(value).__name__}")
        self._encoder = <Encoder>value

    @property
    def processed(self):
        """[P0, P1]: highest inbox seq the application processed (a new list)."""
        return [self._processed[0], self._processed[1]]

    @processed.setter
    def processed(self, value):
        cdef uint64_t a, b
        a, b = value
        self._processed[0] = a
        self._processed[1] = b

    @property
    def received(self):
        """[P0, P1]: highest inbox seq received (a new list)."""
        return [self._received[0], self._received[1]]

    @received.setter
    def received(self, value):
        cdef uint64_t a, b
        a, b = value
        self._received[0] = a
        self._received[1] = b

    # -- output -------------------------------------------------------------

    def hello(self, token, heartbeat_ms=0, client_info=b"", version=_PROTOCOL_VERSION):
        """Queue HELLO (the first frame of a connection)."""
        if self.state != S_AWAIT_HELLO:
            raise RuntimeError("hello: already sent")
        self.state = S_AWAIT_WELCOME          # AWAIT_WELCOME
        _cli_queue(self, Frame(T_HELLO, version=version, heartbeat=heartbeat_ms, token=token,
                          payload=client_info))

    def resume(self, epoch=0, p0=0, p1=0, channels=None):
        """Queue RESUME with the positions the terminal kept (may follow HELLO at once).

        ``channels`` maps (name, lane) to (epoch, offset).
        """
        cdef uint64_t e0, a, b
        positions = {(name, int(lane)): (int(e), int(o))
                     for (name, lane), (e, o) in (channels or {}).items()}
        nested = {}
        for (name, lane), (e, o) in positions.items():
            nested.setdefault(name, {})[f"P{lane}"] = [e, o]
        payload = _orjson_dumps({"channels": nested}) if nested else b""
        frame = _encode(self._encoder, Frame(T_RESUME, epoch=epoch, p0=p0, p1=p1,
                                                payload=payload))
        # The encoder accepted epoch, p0 and p1: ints in 0..2**64-1.
        e0 = epoch
        a = p0
        b = p1
        self.epoch = e0
        self._processed[0] = self._received[0] = a
        self._processed[1] = self._received[1] = b
        self.channel_positions = positions
        self._out.append(frame)

    def send(self, lane, to, kind, payload, *, ref, ttl_ms=0, key="", ack=True,
             receipt=False):
        """Queue SEND; with ``ack`` (a non-zero ``ref``) it is outstanding until SENDACK/ERROR."""
        if ack and ref == 0:
            raise ValueError("send: a SEND that wants a SENDACK needs a non-zero ref")
        flags = lane | (F_ACK_REQUESTED if ack else 0) | (F_RECEIPT_REQUESTED if receipt else 0)
        _cli_queue(self, Frame(T_SEND, flags, payload, ref=ref, ttl=ttl_ms, to=to, kind=kind,
                          key=key))
        if ack:
            self.outstanding.add(ref)

    def ack(self, lane, seq):
        """The application processed inbox message ``seq``; ACK it (batched)."""
        cdef Py_ssize_t i
        if lane > LANE_P1:
            raise ValueError("ack: inbox lanes are P0 and P1")
        i = _inbox_index(lane)
        if seq > self._received[i]:
            raise ValueError(f"ack: P{lane} seq {seq} was not received")
        if seq > self._processed[i]:
            self._processed[i] = seq
            self._pending_ack[i] = seq

    def nack(self, lane, seq, code=0, reason=""):
        """Queue NACK: the application could not process inbox message ``seq``."""
        _cli_queue(self, Frame(T_NACK, lane, reason.encode(), seq=seq, code=code))

    def subscribe(self, ref, name, lane, epoch=0, offset=0):
        """Subscribe to the ``lane`` stream of channel ``name`` from a position."""
        _cli_queue(self, Frame(T_SUBSCRIBE, lane, ref=ref, epoch=epoch, offset=offset, to=name))

    def unsubscribe(self, ref, name, lane):
        """Queue UNSUBSCRIBE of the ``lane`` stream of channel ``name``."""
        _cli_queue(self, Frame(T_UNSUBSCRIBE, lane, ref=ref, to=name))

    def history(self, ref, name, lane, epoch=0, offset=0, count=100):
        """Ask for up to ``count`` history items of a stream after a position."""
        _cli_queue(self, Frame(T_HISTORY, lane, ref=ref, epoch=epoch, offset=offset, count=count,
                          to=name))

    def read(self, msg_id):
        """Queue a read receipt for a received message."""
        _cli_queue(self, Frame(T_RECEIPT, msg_id=msg_id, code=RECEIPT_READ))

    def ping(self, payload=b""):
        """Queue PING (the server answers PONG with the same payload)."""
        _cli_queue(self, Frame(T_PING, payload=payload))

    def close(self, code=_NORMAL, reason=""):
        """Queue CLOSE and end the session."""
        _cli_close(self, code, reason)
        if not self._in.busy:
            _inbuf_free(&self._in)

    def data_to_send(self, double now):
        """Pending ACKs (one per inbox lane) then every queued frame."""
        cdef list parts = []
        cdef Frame f
        cdef int lane
        for lane in range(2):
            if self._pending_ack[lane]:
                f = _frame(T_ACK, b"")
                f._flags = <uchar>lane
                frame_set_int(f, I_SEQ, self._pending_ack[lane])
                parts.append(_encode(self._encoder, f))
                self._pending_ack[lane] = 0
        if self._out:
            parts.extend(self._out)
            self._out = []
        out = b"".join(parts)
        if out:
            self.last_sent = now
        return out

    @property
    def pending(self):
        """True while anything waits for data_to_send."""
        return bool(self._out) or self._pending_ack[0] != 0 or self._pending_ack[1] != 0

    def ping_due(self, double now):
        """True when nothing was sent for a heartbeat interval."""
        return self.state == S_OPEN and self.heartbeat_ms > 0 and \
            now - self.last_sent >= <double>self.heartbeat_ms / 1000.0

    def dead(self, double now):
        """True when nothing was received for two heartbeat intervals."""
        return self.heartbeat_ms > 0 and \
            now - self.last_received > 2.0 * <double>self.heartbeat_ms / 1000.0

    def channel_name(self, channel_id):
        """(name, lane) of a channel id announced by SUBSCRIBED."""
        return self._channel_names[channel_id]

    # -- input --------------------------------------------------------------

    def receive_data(self, data, double now):
        """Decode ``data``; return the frames the application must see.

        Dropped here: duplicates (a DELIVER at or below the received inbox
        position, a BROADCAST at or below the channel position), PING
        (answered), PONG and extension frames.
        """
        cdef list events = []
        if self.state == S_CLOSED:
            return events
        self.last_received = now
        _receive(&self._in, self, False, data, events)
        return events


