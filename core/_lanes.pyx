# cython: language_level=3
"""Per-connection priority lane scheduler (native).  Layout: core/_lanes.pxd.

Sans-IO: a ``LaneScheduler`` holds already-encoded frames (``bytes``) of the
four lanes of PROTOCOL.md section 5 and hands them back, concatenated, in
schedule order; the server writes the result with one transport.write.

Lanes and their queues:

* P0 and P1: FIFO rings of frame pointers (8 bytes a frame).  Never dropped:
  a P0/P1 push over ``max_bytes`` stays queued and returns OVERFLOW.
* P2: a doubly-linked list of nodes (in one array, linked by index) plus an
  open-addressing table from conflation key to node.  A push whose key is
  queued reuses that node, moved to the tail (O(1)).  Each node keeps its
  key's hash, so removing an entry never calls back into Python, and
  ``push_many`` hashes the key once for all schedulers.  The table exists
  once more than ``_SMALL_P2`` keyed entries have been queued (built then
  from the list, kept until the lane's storage is given back); a lane that
  never held more finds a key by walking its list, which lies next to the
  header.  (Between drains a fan-out target usually holds a few frames, and
  for 10,000 connections the table is one more cache miss per push.)
* P3: a ring of (frame, deadline); expired entries are dropped at push time
  (against the ``now`` attribute) and when they reach the head during
  ``drain`` (against drain's ``now`` argument).  A ``now`` of 0.0 means the
  caller keeps no clock: nothing expires then (even a negative deadline).

Costs: push, conflation, shedding one entry and taking one frame are O(1)
amortized; a key lookup compares by identity first and calls ``__eq__``
only on a hash match with a different object.  ``drain`` copies the frames
once into the result (a single frame is returned as is, without a copy).

Re-entrancy: ``__eq__``/``__hash__`` of keys and channels and ``__del__`` of
anything released can run Python code in the middle of push, drain or
clear; a scheduler refuses to be re-entered then (RuntimeError) instead of
working on half-updated queues.

The plain-Python twin core/_lanes_py.py is written independently and must
behave identically (tests/test_lanes.py runs both on the same operations).
"""

cimport cython
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_Check, PyBytes_CheckExact,
                            PyBytes_FromStringAndSize)
from cpython.dict cimport PyDict_New, PyDict_SetItem
from cpython.exc cimport PyErr_NoMemory
from cpython.list cimport PyList_New
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.number cimport PyNumber_Index
from cpython.object cimport Py_EQ, PyObject, PyObject_Hash, PyObject_RichCompareBool
from libc.stdint cimport int32_t, uint16_t, uint64_t
from libc.string cimport memcpy

cdef extern from *:
    void _prefetch "__builtin_prefetch"(const void *addr) noexcept nogil

cdef extern from "Python.h":
    # Reference counting and sizes on raw pointers (the queues store PyObject*).
    void _incref "Py_INCREF"(PyObject *o)
    void _decref "Py_DECREF"(PyObject *o)
    void _xdecref "Py_XDECREF"(PyObject *o)
    Py_ssize_t _frame_size "PyBytes_GET_SIZE"(PyObject *o)
    char *_frame_data "PyBytes_AS_STRING"(PyObject *o)
    void _list_steal "PyList_SET_ITEM"(object lst, Py_ssize_t i, PyObject *item)
    const Py_ssize_t PY_SSIZE_T_MAX
    const Py_ssize_t PY_SSIZE_T_MIN

ACCEPTED = PUSH_ACCEPTED
CONFLATED = PUSH_CONFLATED
DROPPED = PUSH_DROPPED
OVERFLOW = PUSH_OVERFLOW

cdef enum:
    _FIRST_CAP = 4          # slots of a P0/P1/P3 ring's first allocation (doubled when full)
    _FIRST_P2_CAP = 2       # nodes of the P2 lane's first allocation (a fan-out target
                            # usually holds one or two P2 frames between drains)
    _KEEP_CAP = 64          # a lane that empties with more capacity than this gives it back
                            # (unless its last cycle used a quarter of it: _trim)
    _FIRST_TABLE = 4        # first size of the P2 key table (kept at most half full)
    _SMALL_P2 = 8           # keyed P2 entries found by walking the list, without a table
    _MAX_WEIGHT = 65535     # weights (and credits) are uint16
    _STACK_FRAMES = 32      # drain collects up to this many frames without a heap buffer


# ---------------------------------------------------------------- validation

cdef int _lane_of(object lane) except -1:
    """``lane`` as 0..3: TypeError if not an integer, ValueError if out of range."""
    cdef int overflow = 0
    cdef long long value = PyLong_AsLongLongAndOverflow(PyNumber_Index(lane), &overflow)
    if overflow or value < 0 or value > 3:
        raise ValueError(f"lane must be 0..3, got {lane!r}")
    return <int>value


cdef Py_ssize_t _positive_size(object value, str name) except -1:
    """``value`` as 1..PY_SSIZE_T_MAX (max_bytes)."""
    cdef int overflow = 0
    cdef long long n = PyLong_AsLongLongAndOverflow(PyNumber_Index(value), &overflow)
    if overflow or n <= 0 or n > PY_SSIZE_T_MAX:
        raise ValueError(f"{name} must be an integer in 1..{PY_SSIZE_T_MAX}, got {value!r}")
    return <Py_ssize_t>n


cdef Py_ssize_t _clamped_size(object value) except? -1:
    """Any integer, saturated to the Py_ssize_t range (drain's max_bytes)."""
    cdef int overflow = 0
    cdef long long n = PyLong_AsLongLongAndOverflow(PyNumber_Index(value), &overflow)
    if overflow > 0 or n > PY_SSIZE_T_MAX:
        return PY_SSIZE_T_MAX
    if overflow < 0 or n < PY_SSIZE_T_MIN:
        return PY_SSIZE_T_MIN
    return <Py_ssize_t>n


cdef inline int _check_frame(object frame) except -1:
    if not PyBytes_Check(frame):
        raise TypeError(f"frame must be bytes, not {type(frame).__name__}")
    return 0


cdef inline int _check_busy(LaneScheduler s) except -1:
    if s._busy:
        raise RuntimeError("LaneScheduler re-entered while a push, drain or clear is running")
    return 0


# ---------------------------------------------------------------- P0/P1 rings

cdef inline PyObject **_fifo_slots(_Fifo *f) noexcept nogil:
    return <PyObject **>(f + 1)


cdef _Fifo *_fifo_new() except NULL:
    cdef _Fifo *f = <_Fifo *>PyMem_Malloc(sizeof(_Fifo) + _FIRST_CAP * sizeof(PyObject *))
    if f == NULL:
        PyErr_NoMemory()
        return NULL
    f.head = 0
    f.count = 0
    f.mask = _FIRST_CAP - 1
    f.nbytes = 0
    f.peak = 0
    return f


cdef _Fifo *_fifo_grow(_Fifo *f) except NULL:
    """Double a full ring; the wrapped part (slots 0..head-1) moves after the old end."""
    cdef Py_ssize_t cap = f.mask + 1
    cdef _Fifo *g = <_Fifo *>PyMem_Realloc(f, sizeof(_Fifo) + 2 * cap * sizeof(PyObject *))
    if g == NULL:
        PyErr_NoMemory()
        return NULL
    cdef PyObject **slots = _fifo_slots(g)
    memcpy(slots + cap, slots, g.head * sizeof(PyObject *))
    g.mask = 2 * cap - 1
    return g


cdef inline int _fifo_push(_State *st, int lane, PyObject *frame, Py_ssize_t n) except -1:
    cdef _Fifo *f = st.fifo[lane]
    if f == NULL:
        f = st.fifo[lane] = _fifo_new()
    elif f.count > f.mask:
        f = st.fifo[lane] = _fifo_grow(f)
    _incref(frame)
    _fifo_slots(f)[(f.head + f.count) & f.mask] = frame
    f.count += 1
    if f.count > f.peak:
        f.peak = f.count
    f.nbytes += n
    st.queued_bytes += n
    return 0


cdef inline PyObject *_fifo_pop(_State *st, _Fifo *f) noexcept:
    """Remove the oldest frame (count > 0) and return the queue's reference to it."""
    cdef PyObject *frame = _fifo_slots(f)[f.head]
    cdef Py_ssize_t n = _frame_size(frame)
    f.count -= 1
    f.head = (f.head + 1) & f.mask if f.count else 0
    f.nbytes -= n
    st.queued_bytes -= n
    return frame


cdef void _fifo_free(_Fifo *f) noexcept:
    cdef PyObject **slots
    if f == NULL:
        return
    slots = _fifo_slots(f)
    while f.count:
        f.count -= 1
        _decref(slots[(f.head + f.count) & f.mask])
    PyMem_Free(f)


# ---------------------------------------------------------------- P3 ring

cdef inline _P3Slot *_p3_slots(_P3Ring *r) noexcept nogil:
    return <_P3Slot *>(r + 1)


cdef _P3Ring *_p3_new() except NULL:
    cdef _P3Ring *r = <_P3Ring *>PyMem_Malloc(sizeof(_P3Ring) + _FIRST_CAP * sizeof(_P3Slot))
    if r == NULL:
        PyErr_NoMemory()
        return NULL
    r.head = 0
    r.count = 0
    r.mask = _FIRST_CAP - 1
    r.nbytes = 0
    r.peak = 0
    return r


cdef _P3Ring *_p3_grow(_P3Ring *r) except NULL:
    cdef Py_ssize_t cap = r.mask + 1
    cdef _P3Ring *g = <_P3Ring *>PyMem_Realloc(r, sizeof(_P3Ring) + 2 * cap * sizeof(_P3Slot))
    if g == NULL:
        PyErr_NoMemory()
        return NULL
    cdef _P3Slot *slots = _p3_slots(g)
    memcpy(slots + cap, slots, g.head * sizeof(_P3Slot))
    g.mask = 2 * cap - 1
    return g


cdef inline int _p3_push(_State *st, PyObject *frame, Py_ssize_t n, double deadline) except -1:
    cdef _P3Ring *r = st.p3
    cdef _P3Slot *slot
    if r == NULL:
        r = st.p3 = _p3_new()
    elif r.count > r.mask:
        r = st.p3 = _p3_grow(r)
    _incref(frame)
    slot = &_p3_slots(r)[(r.head + r.count) & r.mask]
    slot.frame = frame
    slot.deadline = deadline
    r.count += 1
    if r.count > r.peak:
        r.peak = r.count
    r.nbytes += n
    st.queued_bytes += n
    return 0


cdef inline PyObject *_p3_pop(_State *st, _P3Ring *r) noexcept:
    """Remove the oldest entry (count > 0) and return the queue's reference to its frame."""
    cdef PyObject *frame = _p3_slots(r)[r.head].frame
    cdef Py_ssize_t n = _frame_size(frame)
    r.count -= 1
    r.head = (r.head + 1) & r.mask if r.count else 0
    r.nbytes -= n
    st.queued_bytes -= n
    return frame


cdef void _p3_purge(_State *st, _P3Ring *r, double now) noexcept:
    """Drop the expired entries at the head (deadline != 0.0 and deadline <= now)."""
    cdef double deadline
    while r.count:
        deadline = _p3_slots(r)[r.head].deadline
        if deadline == 0.0 or deadline > now:
            return
        st.p3_dropped += 1
        _decref(_p3_pop(st, r))


cdef void _p3_free(_P3Ring *r) noexcept:
    cdef _P3Slot *slots
    if r == NULL:
        return
    slots = _p3_slots(r)
    while r.count:
        r.count -= 1
        _decref(slots[(r.head + r.count) & r.mask].frame)
    PyMem_Free(r)


# ---------------------------------------------------------------- P2 list + key table

cdef inline _P2Node *_nodes(_P2Lane *p) noexcept nogil:
    return <_P2Node *>(p + 1)


cdef inline size_t _home(Py_hash_t h, int32_t tmask) noexcept nogil:
    """Home slot of a hash (folds high bits in: int keys are their own hash)."""
    cdef size_t x = <size_t>h
    return (x ^ (x >> 16) ^ (x >> 32)) & <size_t>tmask


cdef void _link_free(_P2Node *nodes, int32_t first, int32_t end) noexcept:
    """Chain nodes first..end-1 as a free list ending in -1."""
    cdef int32_t i
    for i in range(first, end):
        nodes[i].frame = NULL
        nodes[i].next = i + 1
    nodes[end - 1].next = -1


cdef _P2Lane *_p2_new() except NULL:
    cdef _P2Lane *p = <_P2Lane *>PyMem_Malloc(sizeof(_P2Lane) + _FIRST_P2_CAP * sizeof(_P2Node))
    if p == NULL:
        PyErr_NoMemory()
        return NULL
    p.nbytes = 0
    p.count = 0
    p.cap = _FIRST_P2_CAP
    p.head = p.tail = -1
    p.free = 0
    p.tmask = 0
    p.tused = 0
    p.peak = 0
    p.table = NULL
    _link_free(_nodes(p), 0, _FIRST_P2_CAP)
    return p


cdef _P2Lane *_p2_grow(_P2Lane *p) except NULL:
    """Double the node array (all nodes in use); indices stay valid."""
    cdef int32_t cap = p.cap
    if cap >= (1 << 30):
        raise MemoryError("P2 lane holds too many entries")
    cdef _P2Lane *g = <_P2Lane *>PyMem_Realloc(p, sizeof(_P2Lane) + 2 * <size_t>cap * sizeof(_P2Node))
    if g == NULL:
        PyErr_NoMemory()
        return NULL
    _link_free(_nodes(g), cap, 2 * cap)
    g.free = cap
    g.cap = 2 * cap
    return g


cdef int _table_reserve(_P2Lane *p, int32_t keys) except -1:
    """Make room in the key table for ``keys`` keys (allocating or growing it)."""
    cdef int32_t size, new_size, i, n
    cdef int32_t *table
    cdef size_t j
    cdef _P2Node *nodes = _nodes(p)
    if p.table != NULL and 2 * keys <= p.tmask + 1:
        return 0
    size = p.tmask + 1 if p.table != NULL else 0
    new_size = 2 * size if size else _FIRST_TABLE
    while new_size < 2 * keys:
        new_size *= 2
    table = <int32_t *>PyMem_Malloc(new_size * sizeof(int32_t))
    if table == NULL:
        PyErr_NoMemory()
        return -1
    for i in range(new_size):
        table[i] = -1
    for i in range(size):
        n = p.table[i]
        if n >= 0:
            j = _home(nodes[n].hash, new_size - 1)
            while table[j] >= 0:
                j = (j + 1) & <size_t>(new_size - 1)
            table[j] = n
    PyMem_Free(p.table)
    p.table = table
    p.tmask = new_size - 1
    return 0


cdef int32_t _table_find(_P2Lane *p, object key, Py_hash_t h) except -2:
    """Node holding a key equal to ``key`` (identity first, then ``==``), or -1.

    ``==`` may run Python code; the caller holds the busy flag, so that code
    cannot change this lane under us.
    """
    cdef _P2Node *nodes = _nodes(p)
    cdef size_t j
    cdef int32_t n
    if p.table == NULL:
        return -1
    j = _home(h, p.tmask)
    while True:
        n = p.table[j]
        if n < 0:
            return -1
        if nodes[n].hash == h and (
                nodes[n].key == <PyObject *>key
                or PyObject_RichCompareBool(<object>nodes[n].key, key, Py_EQ)):
            return n
        j = (j + 1) & <size_t>p.tmask


cdef int32_t _list_find(_P2Lane *p, object key, Py_hash_t h) except -2:
    """_table_find for a lane without a table: walk the list, newest first."""
    cdef _P2Node *nodes = _nodes(p)
    cdef int32_t n = p.tail
    while n >= 0:
        if nodes[n].key != NULL and nodes[n].hash == h and (
                nodes[n].key == <PyObject *>key
                or PyObject_RichCompareBool(<object>nodes[n].key, key, Py_EQ)):
            return n
        n = nodes[n].prev
    return -1


cdef int _table_build(_P2Lane *p) except -1:
    """Index every keyed entry (the lane outgrew _SMALL_P2), with room for one more."""
    cdef _P2Node *nodes = _nodes(p)
    cdef int32_t n = p.head
    _table_reserve(p, p.tused + 1)
    p.tused = 0                 # counted again by _table_add
    while n >= 0:
        if nodes[n].key != NULL:
            _table_add(p, n)
        n = nodes[n].next
    return 0


cdef inline void _table_add(_P2Lane *p, int32_t n) noexcept:
    """Insert node n (room reserved by _table_reserve)."""
    cdef size_t j = _home(_nodes(p)[n].hash, p.tmask)
    while p.table[j] >= 0:
        j = (j + 1) & <size_t>p.tmask
    p.table[j] = n
    p.tused += 1


cdef void _table_remove(_P2Lane *p, int32_t n) noexcept:
    """Remove node n by backward-shift deletion (no tombstones, no Python calls)."""
    cdef _P2Node *nodes = _nodes(p)
    cdef int32_t *table = p.table
    cdef size_t mask = <size_t>p.tmask
    cdef size_t hole = _home(nodes[n].hash, p.tmask)
    cdef size_t j, home
    cdef int32_t m
    while table[hole] != n:
        hole = (hole + 1) & mask
    j = hole
    while True:
        j = (j + 1) & mask
        m = table[j]
        if m < 0:
            break
        home = _home(nodes[m].hash, p.tmask)
        # m may fill the hole unless its home lies cyclically in (hole, j].
        if (hole < j and hole < home <= j) or (hole > j and (home > hole or home <= j)):
            continue
        table[hole] = m
        hole = j
    table[hole] = -1
    p.tused -= 1


cdef inline void _unlink(_P2Lane *p, int32_t i) noexcept:
    cdef _P2Node *nodes = _nodes(p)
    cdef int32_t prev = nodes[i].prev
    cdef int32_t nxt = nodes[i].next
    if prev >= 0:
        nodes[prev].next = nxt
    else:
        p.head = nxt
    if nxt >= 0:
        nodes[nxt].prev = prev
    else:
        p.tail = prev


cdef inline void _append(_P2Lane *p, int32_t i) noexcept:
    cdef _P2Node *nodes = _nodes(p)
    nodes[i].prev = p.tail
    nodes[i].next = -1
    if p.tail >= 0:
        nodes[p.tail].next = i
    else:
        p.head = i
    p.tail = i


cdef int _p2_push(_State *st, PyObject *frame, Py_ssize_t n, object key, Py_hash_t h,
                  object channel) except -1:
    """Queue a P2 frame at the tail; replaces (conflates) a queued entry with an equal key."""
    cdef _P2Lane *p = st.p2
    cdef _P2Node *node
    cdef PyObject *old_frame
    cdef PyObject *old_channel
    cdef PyObject *chan = NULL if channel is None else <PyObject *>channel
    cdef int32_t i
    if p == NULL:
        p = st.p2 = _p2_new()
    if key is not None:
        i = _table_find(p, key, h) if p.table != NULL else _list_find(p, key, h)
        if i >= 0:
            # Reuse the node: new frame and channel, moved to the tail.  The old
            # references are released last (their __del__ sees a consistent lane).
            node = &_nodes(p)[i]
            old_frame = node.frame
            old_channel = node.channel
            _incref(frame)
            node.frame = frame
            if chan != NULL:
                _incref(chan)
            node.channel = chan
            p.nbytes += n - _frame_size(old_frame)
            st.queued_bytes += n - _frame_size(old_frame)
            st.conflated += 1
            if p.tail != i:
                _unlink(p, i)
                _append(p, i)
            _decref(old_frame)
            _xdecref(old_channel)
            return PUSH_CONFLATED
        if p.table != NULL:
            _table_reserve(p, p.tused + 1)
        elif p.tused >= _SMALL_P2:
            _table_build(p)
    if p.free < 0:
        p = st.p2 = _p2_grow(p)
    # Nothing below can fail.
    i = p.free
    node = &_nodes(p)[i]
    p.free = node.next
    _incref(frame)
    node.frame = frame
    if key is not None:
        _incref(<PyObject *>key)
        node.key = <PyObject *>key
        node.hash = h
        if p.table != NULL:
            _table_add(p, i)
        else:
            p.tused += 1
    else:
        node.key = NULL
        node.hash = 0
    if chan != NULL:
        _incref(chan)
    node.channel = chan
    _append(p, i)
    p.count += 1
    if p.count > p.peak:
        p.peak = p.count
    p.nbytes += n
    st.queued_bytes += n
    return PUSH_ACCEPTED


cdef PyObject *_p2_pop(_State *st, _P2Lane *p, PyObject **channel) noexcept:
    """Remove the oldest entry (count > 0); return the queue's reference to its
    frame and hand over the one to its channel (NULL if none) in *channel."""
    cdef int32_t i = p.head
    cdef _P2Node *node = &_nodes(p)[i]
    cdef PyObject *frame = node.frame
    cdef PyObject *key = node.key
    cdef Py_ssize_t n = _frame_size(frame)
    if key != NULL:
        if p.table != NULL:
            _table_remove(p, i)
        else:
            p.tused -= 1
    _unlink(p, i)
    channel[0] = node.channel
    node.frame = NULL
    node.key = NULL
    node.channel = NULL
    node.next = p.free
    p.free = i
    p.count -= 1
    p.nbytes -= n
    st.queued_bytes -= n
    _xdecref(key)
    return frame


cdef void _p2_free(_P2Lane *p) noexcept:
    cdef _P2Node *nodes
    cdef int32_t i, nxt
    if p == NULL:
        return
    nodes = _nodes(p)
    i = p.head
    p.head = p.tail = -1
    p.count = 0
    while i >= 0:
        nxt = nodes[i].next
        _decref(nodes[i].frame)
        _xdecref(nodes[i].key)
        _xdecref(nodes[i].channel)
        i = nxt
    PyMem_Free(p.table)
    PyMem_Free(p)


# ---------------------------------------------------------------- scheduling

cdef int _mark_resync(_State *st, PyObject *channel) except -1:
    cdef object d
    if st.resync == NULL:
        d = PyDict_New()
        _incref(<PyObject *>d)
        st.resync = <PyObject *>d
    PyDict_SetItem(<object>st.resync, <object>channel, None)
    return 0


cdef int _shed(LaneScheduler s, _State *st, int lane, int result) except -1:
    """Shed while over max_bytes: oldest P3, then oldest P2; P0/P1 are never shed.

    ``lane``/``result`` are those of the push that went over; returns its final result.
    """
    cdef _P3Ring *r
    cdef _P2Lane *p
    cdef PyObject *frame
    cdef PyObject *channel
    while st.queued_bytes > s._max_bytes:
        r = st.p3
        if r != NULL and r.count:
            st.p3_dropped += 1
            _decref(_p3_pop(st, r))
            if lane == 3 and r.count == 0:
                result = PUSH_DROPPED      # the pushed frame was the newest P3: it went last
            continue
        p = st.p2
        if p != NULL and p.count:
            channel = _nodes(p)[p.head].channel
            if channel != NULL:
                _mark_resync(st, channel)  # before unlinking: an error leaves the entry queued
            st.p2_dropped += 1
            frame = _p2_pop(st, p, &channel)
            _decref(frame)
            _xdecref(channel)
            continue
        if lane <= 1:
            result = PUSH_OVERFLOW
        break
    return result


cdef PyObject *_take(LaneScheduler s, _State *st, double now) noexcept:
    """Remove the next frame in schedule order; NULL when nothing is deliverable.

    P0 strictly first; then weighted round robin over P1, P2, P3 with credits
    that persist across calls.  Expired P3 heads are dropped when P3 is the
    lane about to be served and do not consume credit.
    """
    cdef _Fifo *f = st.fifo[0]
    cdef _P2Lane *p
    cdef _P3Ring *r
    cdef PyObject *channel
    cdef PyObject *frame
    if f != NULL and f.count:
        return _fifo_pop(st, f)
    while True:
        f = st.fifo[1]
        if st.credit[0] and f != NULL and f.count:
            st.credit[0] -= 1
            return _fifo_pop(st, f)
        p = st.p2
        if st.credit[1] and p != NULL and p.count:
            st.credit[1] -= 1
            frame = _p2_pop(st, p, &channel)
            _xdecref(channel)
            return frame
        r = st.p3
        if st.credit[2] and r != NULL and r.count:
            if now != 0.0:
                _p3_purge(st, r, now)
            if r.count:
                st.credit[2] -= 1
                return _p3_pop(st, r)
        if not ((f != NULL and f.count) or (p != NULL and p.count) or (r != NULL and r.count)):
            return NULL
        # Some lane has frames but no lane with frames has credit: new round.
        st.credit[0] = s._weights[0]
        st.credit[1] = s._weights[1]
        st.credit[2] = s._weights[2]


cdef enum:      # what _trim does with a lane's storage (_verdict)
    _LEAVE          # in use, or small enough to keep for ever
    _NEW_CYCLE      # empty after a busy cycle: kept, and a new cycle starts
    _GIVE_BACK      # empty after a light cycle: freed


cdef inline int _verdict(Py_ssize_t count, Py_ssize_t capacity, Py_ssize_t peak) noexcept:
    if count != 0 or capacity <= _KEEP_CAP:
        return _LEAVE
    return _GIVE_BACK if 4 * peak <= capacity else _NEW_CYCLE


cdef void _trim(_State *st) noexcept:
    """Give back the storage of lanes that are empty after having grown large,
    unless the cycle that just ended (since the lane last emptied) filled a
    quarter of it or more: a lane under steady load keeps its storage instead
    of growing it again, node by node and table by table, every cycle.  (The
    server releases an idle connection's whole scheduler, ``release_lanes``.)"""
    cdef int i, v
    cdef _Fifo *f
    for i in range(2):
        f = st.fifo[i]
        if f != NULL:
            v = _verdict(f.count, f.mask + 1, f.peak)
            if v == _GIVE_BACK:
                _fifo_free(f)
                st.fifo[i] = NULL
            elif v == _NEW_CYCLE:
                f.peak = 0
    if st.p2 != NULL:
        v = _verdict(st.p2.count, st.p2.cap, st.p2.peak)
        if v == _GIVE_BACK:
            _p2_free(st.p2)
            st.p2 = NULL
        elif v == _NEW_CYCLE:
            st.p2.peak = 0
    if st.p3 != NULL:
        v = _verdict(st.p3.count, st.p3.mask + 1, st.p3.peak)
        if v == _GIVE_BACK:
            _p3_free(st.p3)
            st.p3 = NULL
        elif v == _NEW_CYCLE:
            st.p3.peak = 0


cdef inline Py_ssize_t _lane_count(_State *st, int lane) noexcept:
    if st == NULL:
        return 0
    if lane <= 1:
        return st.fifo[lane].count if st.fifo[lane] != NULL else 0
    if lane == 2:
        return st.p2.count if st.p2 != NULL else 0
    return st.p3.count if st.p3 != NULL else 0


cdef inline Py_ssize_t _lane_nbytes(_State *st, int lane) noexcept:
    if st == NULL:
        return 0
    if lane <= 1:
        return st.fifo[lane].nbytes if st.fifo[lane] != NULL else 0
    if lane == 2:
        return st.p2.nbytes if st.p2 != NULL else 0
    return st.p3.nbytes if st.p3 != NULL else 0


cdef _State *_state(LaneScheduler s) except NULL:
    """The scheduler's state block, allocated on first use."""
    cdef _State *st = s._st
    if st != NULL:
        return st
    st = <_State *>PyMem_Malloc(sizeof(_State))
    if st == NULL:
        PyErr_NoMemory()
        return NULL
    st.queued_bytes = 0
    st.conflated = st.p2_dropped = st.p3_dropped = 0
    st.fifo[0] = st.fifo[1] = NULL
    st.p2 = NULL
    st.p3 = NULL
    st.resync = NULL
    st.credit[0] = s._weights[0]
    st.credit[1] = s._weights[1]
    st.credit[2] = s._weights[2]
    s._st = st
    return st


cdef void lanes_prefetch(LaneScheduler s, int stage, int lane, Py_hash_t key_hash) noexcept:
    cdef _State *st = s._st
    cdef _P2Lane *p
    cdef _P3Ring *r
    cdef _Fifo *f
    if st == NULL:
        return
    if stage == 1:
        _prefetch(st)
        _prefetch(&st.resync)           # the block spans two cache lines
        return
    if lane == 2:
        p = st.p2
        if p == NULL:
            return
        if stage == 2:
            _prefetch(p)
            _prefetch(<char *>p + 64)       # the first nodes follow the header
        elif p.table != NULL:
            _prefetch(&p.table[_home(key_hash, p.tmask)])
            if p.free >= 0:
                _prefetch(&_nodes(p)[p.free])
    elif lane == 3:
        r = st.p3
        if r != NULL:
            if stage == 2:
                _prefetch(r)
            else:
                _prefetch(&_p3_slots(r)[(r.head + r.count) & r.mask])
    elif 0 <= lane <= 1:
        f = st.fifo[lane]
        if f != NULL:
            if stage == 2:
                _prefetch(f)
            else:
                _prefetch(&_fifo_slots(f)[(f.head + f.count) & f.mask])


cdef int lanes_push(LaneScheduler s, int lane, object frame, object key, Py_hash_t key_hash,
                    double deadline, object channel) except -1:
    cdef _State *st
    cdef int result
    cdef Py_ssize_t n = _frame_size(<PyObject *>frame)
    _check_busy(s)
    st = _state(s)
    s._busy = 1
    try:
        if lane == 2:
            result = _p2_push(st, <PyObject *>frame, n, key, key_hash, channel)
        elif lane == 3:
            if deadline != 0.0 and s.now != 0.0 and deadline <= s.now:
                st.p3_dropped += 1
                return PUSH_DROPPED
            _p3_push(st, <PyObject *>frame, n, deadline)
            result = PUSH_ACCEPTED
        else:
            _fifo_push(st, lane, <PyObject *>frame, n)
            result = PUSH_ACCEPTED
        if st.queued_bytes > s._max_bytes:
            result = _shed(s, st, lane, result)
        return result
    finally:
        s._busy = 0


cdef bytes lanes_drain(LaneScheduler s, Py_ssize_t limit, double now):
    cdef _State *st = s._st
    cdef PyObject *stack_frames[_STACK_FRAMES]
    cdef PyObject **taken = stack_frames
    cdef PyObject **grown
    cdef PyObject *frame
    cdef Py_ssize_t ntaken = 0, cap = _STACK_FRAMES, total = 0, i
    cdef bytes out = b""
    cdef char *dst
    if st == NULL:
        return out
    _check_busy(s)
    s._busy = 1
    try:
        while True:
            if ntaken == cap:
                # Grow the collection buffer before taking the next frame, so a
                # failed allocation just ends this drain early (nothing is lost).
                grown = <PyObject **>PyMem_Malloc(2 * cap * sizeof(PyObject *))
                if grown == NULL:
                    break
                memcpy(grown, taken, ntaken * sizeof(PyObject *))
                if taken != stack_frames:
                    PyMem_Free(taken)
                taken = grown
                cap *= 2
            frame = _take(s, st, now)
            if frame == NULL:
                break
            taken[ntaken] = frame
            ntaken += 1
            total += _frame_size(frame)
            if total >= limit:
                break
        if ntaken == 1 and PyBytes_CheckExact(<object>taken[0]):
            out = <bytes>taken[0]             # no copy: the caller gets the queued object
        elif ntaken:
            # On MemoryError here the taken frames are lost (P0/P1 stay in the store).
            out = PyBytes_FromStringAndSize(NULL, total)
            dst = PyBytes_AS_STRING(out)
            for i in range(ntaken):
                memcpy(dst, _frame_data(taken[i]), _frame_size(taken[i]))
                dst += _frame_size(taken[i])
        return out
    finally:
        for i in range(ntaken):
            _decref(taken[i])
        if taken != stack_frames:
            PyMem_Free(taken)
        _trim(st)
        s._busy = 0


# ---------------------------------------------------------------- Python API

@cython.final
@cython.auto_pickle(False)
cdef class LaneScheduler:
    """Outbound queues of one connection over the priority lanes P0..P3.

    ``LaneScheduler(max_bytes=1 << 20, weights=(8, 4, 1))``: ``max_bytes``
    (> 0) bounds the queued bytes (P3, then P2 entries are shed above it;
    P0/P1 frames never are); ``weights`` are the frames P1, P2 and P3 may
    send per round of the weighted round robin (each 1..65535).
    """

    def __cinit__(self, max_bytes=1 << 20, weights=(8, 4, 1)):
        cdef int i
        self._max_bytes = _positive_size(max_bytes, "max_bytes")
        values = tuple(weights)
        if len(values) != 3:
            raise ValueError(f"weights must be 3 integers (P1, P2, P3), got {weights!r}")
        for i in range(3):
            w = PyNumber_Index(values[i])
            if not 1 <= w <= _MAX_WEIGHT:
                raise ValueError(f"weights must each be in 1..{_MAX_WEIGHT}, got {weights!r}")
            self._weights[i] = <uint16_t>w

    def __dealloc__(self):
        cdef _State *st = self._st
        if st == NULL:
            return
        self._st = NULL
        _fifo_free(st.fifo[0])
        _fifo_free(st.fifo[1])
        _p2_free(st.p2)
        _p3_free(st.p3)
        _xdecref(st.resync)
        PyMem_Free(st)

    def push(self, lane, frame, key=None, double deadline=0.0, channel=None):
        """Queue ``frame`` (bytes) in ``lane`` (0..3); returns ACCEPTED, CONFLATED,
        DROPPED or OVERFLOW.

        ``key`` (P2 only): a queued P2 entry with an equal key is replaced and
        the new frame goes to the tail.  ``deadline`` (P3 only): expiry time in
        the caller's clock, 0.0 = never; already expired against the ``now``
        attribute (unless that is 0.0, "no clock"), the frame is not queued.  ``channel`` (P2 only): reported by take_resync()
        if the frame is shed.  Over ``max_bytes`` the oldest P3 then the oldest
        P2 entries are shed; a P0/P1 frame that still does not fit stays queued
        and the result is OVERFLOW (close the connection as a slow consumer).
        """
        cdef int ln = _lane_of(lane)
        cdef Py_hash_t h = 0
        _check_frame(frame)
        if ln == 2:
            if key is not None:
                h = PyObject_Hash(key)
            if channel is not None:
                PyObject_Hash(channel)
        return lanes_push(self, ln, frame, key, h, deadline, channel)

    def drain(self, max_bytes, double now=0.0):
        """Remove frames in schedule order and return them concatenated.

        Stops once the returned size reaches ``max_bytes``; returns at least one
        frame if any is deliverable, and b"" if none is.  P3 entries expired at
        ``now`` are dropped when they reach the head (none when ``now`` is 0.0).
        """
        return lanes_drain(self, _clamped_size(max_bytes), now)

    def clear(self):
        """Remove every queued frame; return the P0 then the P1 frames, in order.

        Counters, credits and the resync set are kept.
        """
        cdef _State *st = self._st
        cdef Py_ssize_t n0, n1, k = 0
        cdef int lane
        cdef _Fifo *f
        cdef _P2Lane *p2
        cdef _P3Ring *p3
        cdef list out
        _check_busy(self)
        n0 = _lane_count(st, 0)
        n1 = _lane_count(st, 1)
        out = PyList_New(n0 + n1)
        if st == NULL:
            return out
        self._busy = 1
        try:
            for lane in range(2):
                f = st.fifo[lane]
                while f != NULL and f.count:
                    _list_steal(out, k, _fifo_pop(st, f))   # the list takes over the queue's reference
                    k += 1
                _fifo_free(f)
                st.fifo[lane] = NULL
            p2 = st.p2
            st.p2 = NULL
            _p2_free(p2)
            p3 = st.p3
            st.p3 = NULL
            _p3_free(p3)
            st.queued_bytes = 0
        finally:
            self._busy = 0
        return out

    def take_resync(self):
        """Channels whose P2 frames were shed since the last call, in first-marked
        order, each once; clears the set."""
        cdef _State *st = self._st
        cdef object d
        if st == NULL or st.resync == NULL:
            return []
        d = <object>st.resync
        st.resync = NULL
        _decref(<PyObject *>d)    # `d` now holds the only reference
        return list(d)

    def lane_len(self, lane):
        """Number of frames queued in ``lane`` (expired P3 entries count until dropped)."""
        return _lane_count(self._st, _lane_of(lane))

    def lane_bytes(self, lane):
        """Bytes queued in ``lane``."""
        return _lane_nbytes(self._st, _lane_of(lane))

    def __len__(self):
        cdef _State *st = self._st
        return (_lane_count(st, 0) + _lane_count(st, 1) + _lane_count(st, 2)
                + _lane_count(st, 3))

    def __repr__(self):
        cdef _State *st = self._st
        return (f"<LaneScheduler P0={_lane_count(st, 0)} P1={_lane_count(st, 1)} "
                f"P2={_lane_count(st, 2)} P3={_lane_count(st, 3)} "
                f"bytes={self.queued_bytes}/{self._max_bytes}>")

    @property
    def max_bytes(self):
        """Byte bound on the queued frames (> 0).  Lowering it sheds at the next push."""
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value):
        self._max_bytes = _positive_size(value, "max_bytes")

    @property
    def weights(self):
        """Per-round frame credits of P1, P2, P3."""
        return (self._weights[0], self._weights[1], self._weights[2])

    @property
    def queued_bytes(self):
        """Sum of the lengths of all queued frames."""
        return self._st.queued_bytes if self._st != NULL else 0

    @property
    def conflated(self):
        """P2 entries replaced by a newer push with an equal key (cumulative)."""
        return self._st.conflated if self._st != NULL else 0

    @property
    def p2_dropped(self):
        """P2 entries shed under overflow (cumulative)."""
        return self._st.p2_dropped if self._st != NULL else 0

    @property
    def p3_dropped(self):
        """P3 entries expired or shed (cumulative)."""
        return self._st.p3_dropped if self._st != NULL else 0


def push_many(schedulers, lane, frame, key=None, double deadline=0.0, channel=None):
    """Push the same ``frame`` into each scheduler, in order (encode-once fan-out).

    Arguments as LaneScheduler.push.  Arguments and the schedulers' types are
    checked before anything is queued; ``key`` is hashed once.  Returns the
    indexes (in iteration order) of the schedulers whose result was OVERFLOW.
    """
    cdef int ln = _lane_of(lane)
    cdef Py_hash_t h = 0
    cdef Py_ssize_t i = 0
    cdef list seq
    cdef list overflow = []
    _check_frame(frame)
    if ln == 2:
        if key is not None:
            h = PyObject_Hash(key)
        if channel is not None:
            PyObject_Hash(channel)
    seq = schedulers if type(schedulers) is list else list(schedulers)
    for item in seq:
        if type(item) is not LaneScheduler:
            raise TypeError(f"push_many() expects LaneScheduler objects, got {type(item).__name__}")
    for item in seq:
        if lanes_push(<LaneScheduler?>item, ln, frame, key, h, deadline, channel) == PUSH_OVERFLOW:
            overflow.append(i)
        i += 1
    return overflow
