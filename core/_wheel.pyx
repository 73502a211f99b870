# cython: language_level=3
"""Hashed timing wheel (native).  See core/_wheel.pxd for the layout.

One power-of-two array of buckets; each Timer is its own node of its
bucket's doubly-linked list, so schedule, cancel and reschedule are O(1) and
allocate nothing.  A timer stores its absolute tick index; a bucket holds the
timers of every tick congruent to it modulo ``size``, and a visit of the
bucket for tick k fires only those whose tick is due, skipping later
"rounds" (HashedWheelTimer's scheme, without a thread: the wheel is sans-IO,
the caller passes ``now``).

Costs: schedule/cancel O(1); advance() over d ticks visits min(d, size)
buckets; a jump of ``size`` ticks or more visits every bucket once and sorts
what is due (O(size + n + due*log(due))).  A visit walks the whole bucket
list (later rounds included) only if the bucket's tick floor says something
may be due, so idle ticks cost O(1) per bucket however many timers wait in
later rounds.  next_deadline() is O(size + n).

The plain-Python twin core/_wheel_py.py is written independently and must
behave identically (tests/test_wheel.py runs both against one model).
"""

cimport cython
from cpython.exc cimport PyErr_NoMemory
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport PyObject
from libc.math cimport ceil, floor, isinf, isnan
from libc.stdint cimport INT64_MAX, int64_t
from libc.stdlib cimport qsort

import operator

# Tick indices are int64 here and unbounded ints in the twin; both refuse a
# tick index >= 2**62 (OverflowError) so they never disagree.  2**62 is exact
# as a double, and so is any integer-valued double below it.
cdef double _TICK_LIMIT = 4611686018427387904.0   # 2**62
_MAX_SIZE = 1 << 30                                # largest accepted size (after rounding up)


cdef struct _Due:
    int64_t tick        # the timer's tick index
    Py_ssize_t index    # its position in collection order (ties: keeps the bucket's sequence order)
    PyObject *timer     # borrowed from the collection list, which outlives the sort


cdef int _due_cmp(const void *a, const void *b) noexcept nogil:
    cdef const _Due *x = <const _Due *>a
    cdef const _Due *y = <const _Due *>b
    if x.tick != y.tick:
        return -1 if x.tick < y.tick else 1
    return -1 if x.index < y.index else (1 if x.index > y.index else 0)


cdef inline int _check_finite(double value, str name) except -1:
    if isnan(value) or isinf(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return 0


# A linked timer is always in a reference cycle (its neighbours, or itself,
# point back to it, and it points to its wheel), so it is only ever freed by
# the GC's clear pass, one node at a time: a long bucket chain never turns
# into a deep dealloc recursion (tests free a 200k-node bucket).
@cython.final
@cython.auto_pickle(False)
cdef class Timer:
    """A reusable timer: ``callback(arg)`` is called when it fires.

    Keep one per connection and re-schedule it: ``wheel.schedule(timer,
    deadline)`` only re-links the object (no allocation).  ``scheduled`` is
    True while it is linked in a wheel; ``deadline`` is the deadline given to
    the last ``schedule()`` (0.0 if never scheduled).
    """

    def __init__(self, callback, arg=None):
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        self.callback = callback
        self.arg = arg

    @property
    def scheduled(self):
        """True while the timer is linked in a wheel (not after it fired or was cancelled)."""
        return self._state == TIMER_LINKED

    def cancel(self):
        """Stop the timer in O(1).

        Returns True if this call prevented a firing: the timer was linked in
        a wheel, or was already collected by a running ``advance()`` and was
        waiting for its turn (it then does not fire).  False otherwise.
        """
        return timer_cancel(self) == 1

    def __repr__(self):
        state = ("idle", "scheduled", "pending")[<int>self._state]
        return f"<Timer {state} deadline={self.deadline!r} callback={self.callback!r}>"


cdef int timer_cancel(Timer timer) except -1:
    cdef TimingWheel wheel
    if timer._state == TIMER_LINKED:
        # Own a reference for the call: _unlink() drops timer._wheel, which can
        # be the last reference to the wheel (a wheel only its timers hold).
        wheel = timer._wheel
        wheel._unlink(timer)
        return 1
    if timer._state == TIMER_PENDING:
        timer._state = TIMER_IDLE
        return 1
    return 0


@cython.final
@cython.auto_pickle(False)
cdef class TimingWheel:
    """A hashed timing wheel driven by the caller's clock (sans-IO).

    ``TimingWheel(tick=1.0, size=512, now=0.0)``: ``tick`` seconds per tick
    (finite, > 0), ``size`` buckets (>= 1, rounded up to a power of two, at
    most 2**30), ``now`` the start time: tick k is the interval
    ``[start + k*tick, start + (k+1)*tick)``.

    A timer scheduled for ``deadline`` belongs to tick
    ``t = max(ceil((deadline - start) / tick), current_tick + 1)`` and fires
    in the first ``advance(now)`` with ``floor((now - start) / tick) >= t``.

    Guarantees:

    * never early: ``advance(now)`` with ``now < deadline`` does not fire the
      timer, except when the two times are equal after float rounding
      (``(now - start) / tick == (deadline - start) / tick`` in double
      arithmetic, possible only far below the float resolution of
      ``now - start``);
    * at most one tick late: the boundary ``start + t*tick`` is less than one
      tick after the deadline (unless the deadline was already in the past),
      and the timer fires in the first ``advance()`` at or after that
      boundary.  A driver that calls ``advance()`` at every tick boundary
      therefore fires each timer less than one tick after its deadline; one
      that calls it at least once per tick interval, less than two.

    Time values (``now``, ``deadline``) are any monotonic float seconds such
    as ``loop.time()``; NaN raises ValueError, an infinite value or a tick
    index of 2**62 or more raises OverflowError.
    """

    def __cinit__(self, double tick=1.0, object size=512, double now=0.0):
        cdef object n = operator.index(size)
        _check_finite(tick, "tick")
        if not tick > 0.0:
            raise ValueError(f"tick must be > 0, got {tick!r}")
        _check_finite(now, "now")
        if n < 1:
            raise ValueError(f"size must be >= 1, got {n!r}")
        if n > _MAX_SIZE:
            raise ValueError(f"size must be <= 2**30, got {n!r}")
        cdef Py_ssize_t want = n
        cdef Py_ssize_t buckets = 1
        while buckets < want:
            buckets <<= 1
        self.tick = tick
        self.start = now
        self.size = buckets
        self._mask = buckets - 1
        self.current_tick = 0
        self._heads = [None] * buckets
        self._floor = <int64_t *>PyMem_Malloc(buckets * sizeof(int64_t))
        if self._floor == NULL:
            raise MemoryError()
        cdef Py_ssize_t i
        for i in range(buckets):
            self._floor[i] = INT64_MAX
        self._count = 0

    def __dealloc__(self):
        PyMem_Free(self._floor)

    def __len__(self):
        return self._count

    def __repr__(self):
        return (f"<TimingWheel tick={self.tick!r} size={self.size} start={self.start!r} "
                f"current_tick={self.current_tick} timers={self._count}>")

    # -- linking ----------------------------------------------------------

    cdef int64_t _tick_for(self, double deadline) except -1:
        """The tick index of ``deadline`` (always >= current_tick + 1 >= 1)."""
        cdef double t = ceil((deadline - self.start) / self.tick)
        cdef int64_t tick
        if isnan(t):
            raise ValueError("cannot schedule a timer at a NaN deadline")
        if isinf(t) or t >= _TICK_LIMIT:
            raise OverflowError(f"deadline {deadline!r} is out of range for this wheel")
        if t < -_TICK_LIMIT:               # far past (current_tick >= 0): due next tick
            return self.current_tick + 1
        tick = <int64_t>t                  # exact: t is an integer-valued double below 2**62
        if tick <= self.current_tick:
            return self.current_tick + 1
        return tick

    cdef int _link(self, Timer timer, int64_t tick) except -1:
        """Append an unlinked timer at the end of the bucket of ``tick``."""
        cdef Py_ssize_t i = <Py_ssize_t>(tick & self._mask)
        cdef object first = self._heads[i]
        cdef Timer head
        if first is None:
            self._heads[i] = timer
            timer._prev = timer            # a lone node is its own tail
        else:
            head = <Timer>first
            head._prev._next = timer
            timer._prev = head._prev
            head._prev = timer
        timer._next = None
        timer._tick = tick
        if tick < self._floor[i]:
            self._floor[i] = tick
        timer._wheel = self
        timer._state = TIMER_LINKED        # also ends a PENDING state: it will not fire in that advance()
        self._count += 1
        return 0

    cdef int _unlink(self, Timer timer) except -1:
        """Remove a timer linked in this wheel from its bucket; it becomes idle.

        The caller must own a reference to self: clearing timer._wheel may
        drop the last one held by the timers.
        """
        cdef Py_ssize_t i = <Py_ssize_t>(timer._tick & self._mask)
        cdef Timer prev = timer._prev
        cdef Timer nxt = timer._next
        cdef object first = self._heads[i]
        if first is timer:
            self._heads[i] = nxt           # None if it was alone
            if nxt is not None:
                nxt._prev = prev           # prev is the tail
        else:
            prev._next = nxt
            if nxt is None:
                (<Timer>first)._prev = prev    # it was the tail
            else:
                nxt._prev = prev
        timer._prev = None
        timer._next = None
        timer._wheel = None
        timer._state = TIMER_IDLE
        self._count -= 1
        return 0

    cpdef object schedule(self, Timer timer, double deadline):
        """(Re)schedule ``timer`` to fire at ``deadline`` (O(1), no allocation).

        A timer linked in this wheel is moved; one linked in another wheel
        raises ValueError; a timer waiting for its turn in a running
        ``advance()`` no longer fires there.  On error the timer is unchanged.
        """
        if timer is None:
            raise TypeError("schedule() needs a Timer, got None")
        if timer._wheel is not None and timer._wheel is not self:
            raise ValueError("the timer is scheduled in another wheel; cancel it first")
        cdef int64_t tick = self._tick_for(deadline)
        if timer._state == TIMER_LINKED:
            self._unlink(timer)
        timer.deadline = deadline
        self._link(timer, tick)
        return None

    cpdef Timer call_at(self, double deadline, object callback, object arg=None):
        """A new Timer for ``callback(arg)``, scheduled at ``deadline``."""
        cdef Timer timer = Timer(callback, arg)
        self.schedule(timer, deadline)
        return timer

    def cancel(self, Timer timer not None):
        """Same as ``timer.cancel()``."""
        return timer_cancel(timer) == 1

    # -- firing -----------------------------------------------------------

    cdef int _collect(self, Py_ssize_t i, int64_t target, list due) except -1:
        """Unlink the timers of bucket ``i`` whose tick is <= target.

        They are appended to ``due`` in list (= sequence) order and marked
        PENDING; timers of later rounds stay.  Skips the walk when the
        bucket's floor is above target; otherwise the walk makes the floor
        exact again (the least remaining tick).
        """
        if self._floor[i] > target:
            return 0
        cdef Timer node = <Timer>self._heads[i]
        cdef Timer nxt
        cdef int64_t floor_left = INT64_MAX
        while node is not None:
            nxt = node._next
            if node._tick <= target:
                self._unlink(node)
                node._state = TIMER_PENDING
                due.append(node)
            elif node._tick < floor_left:
                floor_left = node._tick
            node = nxt
        self._floor[i] = floor_left
        return 0

    cpdef Py_ssize_t advance(self, double now) except -1:
        """Fire every timer whose tick is due at ``now``; return how many fired.

        ``target = floor((now - start) / tick)``; nothing happens unless
        target > current_tick.  Due timers are unlinked first and
        current_tick becomes target, then their callbacks run in order of
        (tick, schedule order).  A due timer cancelled or rescheduled by an
        earlier callback of the same advance() does not fire; timers
        scheduled by callbacks fire in a later advance().  If callbacks raise,
        the others still run and the first exception is re-raised at the end.
        """
        cdef double x = floor((now - self.start) / self.tick)
        cdef int64_t target, k, cur = self.current_tick
        cdef Py_ssize_t i, n, fired = 0
        cdef list due = []
        cdef object first, exc_first = None
        cdef Timer node
        cdef _Due *keys
        if isnan(x):
            raise ValueError("cannot advance to a NaN time")
        if isinf(x):
            raise OverflowError(f"cannot advance to {now!r}")
        if x < -_TICK_LIMIT:
            return 0
        if x >= _TICK_LIMIT:
            raise OverflowError(f"time {now!r} is out of range for this wheel")
        target = <int64_t>x
        if target <= cur:
            return 0

        if target - cur < self.size:
            # Ticks cur+1 .. target live in distinct buckets; visiting them in
            # tick order yields (tick, sequence) order directly.
            k = cur + 1
            while k <= target:
                self._collect(<Py_ssize_t>(k & self._mask), target, due)
                k += 1
        else:
            # A jump over the whole wheel: every bucket once, then sort.  Equal
            # ticks share a bucket, so a stable sort by tick keeps sequence order.
            for i in range(self.size):
                self._collect(i, target, due)
            n = len(due)
            if n > 1:
                keys = <_Due *>PyMem_Malloc(n * sizeof(_Due))
                if keys == NULL:
                    # The collected timers are PENDING: put them back, then fail.
                    for first in due:
                        node = <Timer>first
                        if node._state == TIMER_PENDING:
                            self._link(node, node._tick)
                    PyErr_NoMemory()
                    return -1
                try:
                    for i in range(n):
                        node = <Timer>due[i]
                        keys[i].tick = node._tick
                        keys[i].index = i
                        keys[i].timer = <PyObject *>node
                    qsort(keys, n, sizeof(_Due), _due_cmp)
                    due = [<object>keys[i].timer for i in range(n)]
                finally:
                    PyMem_Free(keys)

        self.current_tick = target
        for first in due:
            node = <Timer>first
            if node._state != TIMER_PENDING:
                continue                   # cancelled or rescheduled by an earlier callback
            node._state = TIMER_IDLE
            fired += 1
            try:
                node.callback(node.arg)
            except BaseException as exc:
                if exc_first is None:
                    exc_first = exc
        if exc_first is not None:
            raise exc_first
        return fired

    def next_deadline(self):
        """The earliest tick boundary ``start + t*tick`` among scheduled timers, or None.

        O(size + n).  The boundary is where the first timer becomes due;
        ``advance()`` at exactly that time fires it unless float rounding puts
        ``(boundary - start) / tick`` just below t (then it fires on the next
        call).
        """
        if self._count == 0:
            return None
        cdef int64_t k, best = -1
        cdef int64_t cur = self.current_tick
        cdef object first
        cdef Timer node
        # Visit one rotation in tick order: the first timer found on its own
        # tick is the earliest.  Later-round timers met on the way give the
        # minimum if no timer is due within one rotation.
        k = cur + 1
        while k <= cur + self.size:
            first = self._heads[<Py_ssize_t>(k & self._mask)]
            node = <Timer>first
            while node is not None:
                if node._tick == k:
                    best = k
                    break
                if best < 0 or node._tick < best:
                    best = node._tick
                node = node._next
            if best == k:
                break
            k += 1
        # Python float arithmetic (not C): the same rounding as the twin on
        # every platform (no fused multiply-add).
        return (<object>self.start) + (<object>(<double>best)) * (<object>self.tick)
