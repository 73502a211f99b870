# cython: language_level=3
"""Declarations of the native hashed timing wheel (core/_wheel.pyx).

Other native modules cimport these (``from tillwire.core._wheel cimport
Timer, TimingWheel, timer_cancel``) to keep one Timer per connection and
call ``schedule``/``advance``/``timer_cancel`` as direct C calls (both
classes are final, so cpdef methods are not looked up through the instance
dict).

Error contracts: ``except -1`` functions return -1 with a Python exception
set.  ``schedule`` returns a Python object (None) because it is also the
Python-level method; NULL means an exception.  ``timer_cancel`` is the
C-level ``Timer.cancel()``.  Call wheel methods through a reference you own,
never through ``timer._wheel`` itself: unlinking a timer drops that field,
which may be the wheel's last reference.

Memory: a Timer is one fixed-size, GC-tracked object (5 object slots, 3 C
fields, no vtable pointer: 80 bytes + the 16-byte GC header on CPython 3.11)
that is re-linked on every schedule(); nothing is allocated per schedule,
cancel or reschedule.
"""

cimport cython
from libc.stdint cimport int64_t

cdef enum TimerState:
    TIMER_IDLE = 0       # in no wheel: never scheduled, fired, or cancelled
    TIMER_LINKED = 1     # in a bucket list of _wheel (the `scheduled` property)
    TIMER_PENDING = 2    # collected by a running advance(), waiting for its turn to fire


# One timer; the node of its bucket's doubly-linked list (O(1) unlink).
# A bucket list is: head = TimingWheel._heads[tick & mask]; head._prev is the
# tail (so append is O(1) without a per-bucket tail slot); tail._next is None.
@cython.final
cdef class Timer:
    cdef public object callback      # called as callback(arg) when the timer fires
    cdef public object arg           # the argument passed to callback
    cdef readonly double deadline    # deadline of the last schedule(); 0.0 if never scheduled
    cdef Timer _prev                 # previous node, or the tail if this is the head; None unless linked
    cdef Timer _next                 # next node; None at the tail and unless linked
    cdef TimingWheel _wheel          # the wheel whose bucket holds this timer; None unless linked
    cdef int64_t _tick               # absolute tick index of the last schedule() (>= 1)
    cdef TimerState _state           # see TimerState; _wheel is not None <=> TIMER_LINKED
    # No cdef methods on purpose: they would add a vtable pointer to every
    # instance.  Native callers use timer_cancel() below.


@cython.final
cdef class TimingWheel:
    cdef readonly double tick        # seconds per tick (finite, > 0)
    cdef readonly double start       # time of tick 0's start: tick k is [start + k*tick, start + (k+1)*tick)
    cdef readonly Py_ssize_t size    # number of buckets, a power of two
    cdef readonly int64_t current_tick  # last processed tick; every linked timer has _tick > current_tick
    cdef int64_t _mask               # size - 1
    cdef list _heads                 # size entries: first Timer of each bucket, or None
    cdef int64_t *_floor             # size entries: a lower bound of the ticks in each bucket
                                     # (INT64_MAX if empty); exact after a walk, kept low on cancel
    cdef Py_ssize_t _count           # number of linked timers (len())

    cdef int64_t _tick_for(self, double deadline) except -1
    cdef int _link(self, Timer timer, int64_t tick) except -1
    cdef int _unlink(self, Timer timer) except -1
    cdef int _collect(self, Py_ssize_t i, int64_t target, list due) except -1

    cpdef object schedule(self, Timer timer, double deadline)
    cpdef Timer call_at(self, double deadline, object callback, object arg=*)
    cpdef Py_ssize_t advance(self, double now) except -1


# Timer.cancel() for native callers: 1 if it prevented a firing (the timer was
# linked, or collected and waiting in a running advance()), else 0.
cdef int timer_cancel(Timer timer) except -1
