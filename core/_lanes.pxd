# cython: language_level=3
"""Declarations of the native lane scheduler (core/_lanes.pyx).

One ``LaneScheduler`` per connection: the outbound queues of the four
priority lanes of PROTOCOL.md section 5, holding already-encoded frames.
Other native modules cimport it (``from tillwire.core._lanes cimport
LaneScheduler, lanes_push, lanes_drain``) and call those as direct C calls.

Memory layout (the point of this file): the object itself is 48 bytes and is
not tracked by the cycle collector (no Python object fields).  Everything a
connection only needs once it has traffic lives in a ``_State`` block that
the first push allocates; each lane's storage is allocated the first time
that lane is used and released again when it empties after growing large.
All C memory comes from PyMem_* (pymalloc), so tracemalloc sees it.

Ownership: every PyObject* stored in a slot or node is an owned (strong)
reference.  These references are invisible to the cycle collector, so a key
or channel that refers back to its scheduler keeps it alive; keys and
channels are meant to be plain values (str, int, tuples of them).

Error contracts: ``except -1`` functions return -1 with a Python exception
set; ``except NULL`` likewise return NULL.  Functions marked ``noexcept``
cannot fail.
"""

cimport cython
from cpython.object cimport PyObject
from libc.stdint cimport int32_t, uint16_t, uint64_t

# Results of push (the module exports them as ACCEPTED, CONFLATED, DROPPED, OVERFLOW).
cdef enum PushResult:
    PUSH_ACCEPTED = 0      # queued
    PUSH_CONFLATED = 1     # queued; replaced the queued P2 entry with an equal key
    PUSH_DROPPED = 2       # the pushed P3 frame was not queued (expired, or shed for room)
    PUSH_OVERFLOW = 3      # a P0/P1 frame is queued over max_bytes: close the connection

# FIFO of frames of lane P0 or P1: a power-of-two ring of owned PyObject*
# slots stored right after this header, in the same allocation.
ctypedef struct _Fifo:
    Py_ssize_t head        # slot index of the oldest frame
    Py_ssize_t count       # number of queued frames
    Py_ssize_t mask        # capacity - 1 (capacity is a power of two)
    Py_ssize_t nbytes      # sum of len(frame) over queued frames
    Py_ssize_t peak        # high-water mark of queued frames, reset by _trim

# One P3 slot: a frame and its expiry time.
ctypedef struct _P3Slot:
    PyObject *frame        # owned
    double deadline        # caller's clock; 0.0 = never expires

# Ring of P3 slots; _P3Slot[capacity] follows the header in the same allocation.
ctypedef struct _P3Ring:
    Py_ssize_t head        # slot index of the oldest entry
    Py_ssize_t count       # number of queued entries (expired ones included until purged)
    Py_ssize_t mask        # capacity - 1 (capacity is a power of two)
    Py_ssize_t nbytes      # sum of len(frame) over queued entries
    Py_ssize_t peak        # high-water mark of queued entries, reset by _trim

# One P2 entry.  Nodes live in an array after the _P2Lane header and are
# linked by index in delivery order, so an entry conflated away is unlinked
# in O(1) and indices survive the array growing (realloc).
ctypedef struct _P2Node:
    PyObject *frame        # owned; NULL while the node is on the free list
    PyObject *key          # owned conflation key, or NULL (pushed with key=None)
    PyObject *channel      # owned channel reported on overflow, or NULL (None)
    Py_hash_t hash         # hash(key) when key != NULL (the key table never rehashes through Python)
    int32_t prev           # older neighbour, -1 at the head
    int32_t next           # newer neighbour, -1 at the tail; next free node while free

# P2 lane: doubly-linked list of nodes + open-addressing key table.
ctypedef struct _P2Lane:
    Py_ssize_t nbytes      # sum of len(frame) over queued entries
    int32_t count          # number of queued entries
    int32_t cap            # number of nodes allocated after the header
    int32_t head           # oldest node (next delivered / next shed), -1 when empty
    int32_t tail           # newest node, -1 when empty
    int32_t free           # first node of the free list, -1 when none
    int32_t tmask          # key table size - 1 (0 while the table is NULL)
    int32_t tused          # keyed entries (each in the table exactly once while there is one)
    int32_t peak           # high-water mark of queued entries, reset by _trim
    int32_t *table         # NULL until more than _SMALL_P2 keyed entries were queued;
                           # linear probing, no tombstones (backward-shift delete): node index or -1

# Everything but the constructor arguments; allocated by the first push.
ctypedef struct _State:
    Py_ssize_t queued_bytes   # sum of the four lanes' nbytes
    uint64_t conflated        # P2 entries replaced by a newer one with an equal key
    uint64_t p2_dropped       # P2 entries shed under overflow
    uint64_t p3_dropped       # P3 entries expired (at push or at drain) or shed
    _Fifo *fifo[2]            # P0, P1; NULL until used
    _P2Lane *p2               # NULL until used
    _P3Ring *p3               # NULL until used
    PyObject *resync          # owned dict {channel: None} in first-marked order, or NULL
    uint16_t credit[3]        # credits left in the current round of P1, P2, P3


# The class has no cdef methods on purpose: a vtable pointer would add 8
# bytes to every connection.  Its C-level API is the module functions below.
@cython.final
cdef class LaneScheduler:
    cdef Py_ssize_t _max_bytes    # byte bound on queued frames (> 0); shedding starts above it
    cdef public double now        # caller's clock for the push-time P3 expiry check (0.0: no check)
    cdef _State *_st              # NULL until the first push, then owned until dealloc
    cdef uint16_t _weights[3]     # per-round frame credits of P1, P2, P3, each 1..65535
    cdef unsigned char _busy      # 1 inside push/drain/clear: re-entry (from a key's __eq__ or
                                  # __del__, ...) raises RuntimeError instead of corrupting state


# Push an already validated frame: lane 0..3, frame a bytes object (or subclass),
# key_hash == hash(key) when lane == 2 and key is not None (else ignored), channel
# hashable when lane == 2.  Returns a PushResult.  O(1) amortized; allocates only
# when a lane's storage grows.
cdef int lanes_push(LaneScheduler s, int lane, object frame, object key, Py_hash_t key_hash,
                    double deadline, object channel) except -1

# Hints for the cache before a push to this scheduler (fan-out pipelines them
# over the sessions ahead).  Stage 1 prefetches the state block, stage 2 the
# lane's queue header, stage 3 where the push will write (the P2 key's table
# slot and free node, or a ring's tail slot).  Reads only memory the scheduler
# owns at the time of the call; changes nothing, never fails.
cdef void lanes_prefetch(LaneScheduler s, int stage, int lane, Py_hash_t key_hash) noexcept

# Remove frames in schedule order until their total size reaches limit (at least
# one frame if any is deliverable) and return them as one bytes object (the frame
# itself when there is exactly one; b"" when nothing is deliverable).
cdef bytes lanes_drain(LaneScheduler s, Py_ssize_t limit, double now)
