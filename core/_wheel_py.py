"""Hashed timing wheel, plain Python (twin of core/_wheel.pyx).

Written from the contract (notes/WHEEL_API.md), not from the native source:
the native wheel links timers into intrusive lists, this one keeps each
bucket as an insertion-ordered dict used as an ordered set (O(1) add and
remove, iteration in insertion order).  Behaviour is identical, which
tests/test_wheel.py checks against a brute-force model.

A timer for ``deadline`` belongs to tick
``t = max(ceil((deadline - start) / tick), current_tick + 1)`` and lives in
bucket ``t % size`` with its absolute tick: a bucket mixes every "round" and
only the timers whose tick is due are taken when it is visited.

Costs: schedule/cancel O(1); advance over d ticks visits min(d, size) buckets
(a jump of ``size`` ticks or more visits all and sorts the due timers);
next_deadline O(size + n).
"""

from __future__ import annotations

import itertools
import math
import operator
from typing import Any, Callable, final

# Tick indices at or beyond 2**62 are refused (OverflowError) so that this
# twin agrees with the native wheel, which stores them as 64-bit integers.
_MAX_TICK = (1 << 62) - 1
_MAX_SIZE = 1 << 30


def _real(value: Any) -> float:
    """``value`` as a float, accepting what a C ``double`` parameter accepts."""
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        raise TypeError(f"must be real number, not {type(value).__name__}")
    return float(value)


def _finite(value: Any, name: str) -> float:
    value = _real(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


@final
class Timer:
    """A reusable timer: ``callback(arg)`` is called when it fires.

    ``scheduled`` is True while it is in a wheel; ``deadline`` is the deadline
    given to the last ``schedule()`` (0.0 if never scheduled).
    """

    __slots__ = ("callback", "arg", "_deadline", "_wheel", "_tick", "_seq", "_pending")

    def __init__(self, callback: Callable[[Any], Any], arg: Any = None) -> None:
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        self.callback = callback
        self.arg = arg
        self._deadline = 0.0
        self._wheel: TimingWheel | None = None  # the wheel whose bucket holds us
        self._tick = 0  # tick index of the last schedule()
        self._seq = 0  # wheel sequence number of the last schedule()
        self._pending = False  # collected by a running advance(), not fired yet

    @property
    def deadline(self) -> float:
        """The deadline of the last ``schedule()`` (0.0 if never scheduled)."""
        return self._deadline

    @property
    def scheduled(self) -> bool:
        """True while the timer is in a wheel (not after it fired or was cancelled)."""
        return self._wheel is not None

    def cancel(self) -> bool:
        """Stop the timer.

        True if this prevented a firing: the timer was in a wheel, or a
        running ``advance()`` had collected it and not yet reached it.
        """
        if self._wheel is not None:
            self._wheel._remove(self)
            return True
        if self._pending:
            self._pending = False
            return True
        return False

    def __repr__(self) -> str:
        state = "scheduled" if self._wheel is not None else "pending" if self._pending else "idle"
        return f"<Timer {state} deadline={self._deadline!r} callback={self.callback!r}>"


@final
class TimingWheel:
    """A hashed timing wheel; the caller passes the time (sans-IO).

    ``TimingWheel(tick=1.0, size=512, now=0.0)``: ``tick`` seconds per tick
    (finite, > 0), ``size`` buckets (1 .. 2**30, rounded up to a power of
    two), ``now`` the start time.  Tick k covers
    ``[start + k*tick, start + (k+1)*tick)``.  A NaN time raises ValueError;
    an infinite one, or a tick index of 2**62 or more, OverflowError.

    A timer never fires early: it fires in the first ``advance(now)`` with
    ``floor((now - start) / tick) >= t`` where ``t >= (deadline - start) /
    tick``, so ``now >= deadline`` (up to float rounding of those quotients).
    It fires at most one tick late: its tick boundary ``start + t*tick`` is
    less than one tick after the deadline, and a driver calling ``advance()``
    at every boundary reaches it there (a driver calling it at least once per
    tick interval reaches it less than one more tick later).
    """

    def __init__(self, tick: float = 1.0, size: int = 512, now: float = 0.0) -> None:
        tick = _real(tick)
        size = operator.index(size)
        now = _real(now)
        if not math.isfinite(tick):
            raise ValueError(f"tick must be a finite number, got {tick!r}")
        if not tick > 0:
            raise ValueError(f"tick must be > 0, got {tick!r}")
        _finite(now, "now")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size!r}")
        if size > _MAX_SIZE:
            raise ValueError(f"size must be <= 2**30, got {size!r}")
        buckets = 1 << (size - 1).bit_length()
        self._interval = tick  # seconds per tick
        self._start = now
        self._size = buckets
        self._current = 0
        self._buckets: list[dict[Timer, None]] = [{} for _ in range(buckets)]
        self._count = 0
        self._seq = itertools.count()

    @property
    def tick(self) -> float:
        """Seconds per tick."""
        return self._interval

    @property
    def size(self) -> int:
        """Number of buckets (a power of two)."""
        return self._size

    @property
    def start(self) -> float:
        """The time at which tick 0 starts."""
        return self._start

    @property
    def current_tick(self) -> int:
        """The last processed tick: every scheduled timer's tick is later."""
        return self._current

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (
            f"<TimingWheel tick={self._interval!r} size={self._size} start={self._start!r} "
            f"current_tick={self._current} timers={self._count}>"
        )

    def _bucket(self, tick: int) -> dict[Timer, None]:
        return self._buckets[tick % self._size]

    def _remove(self, timer: Timer) -> None:
        del self._bucket(timer._tick)[timer]
        timer._wheel = None
        self._count -= 1

    def schedule(self, timer: Timer, deadline: float) -> None:
        """(Re)schedule ``timer`` at ``deadline``.

        A timer in this wheel is moved; one in another wheel raises
        ValueError.  On error the timer is left as it was.
        """
        deadline = _real(deadline)
        if not isinstance(timer, Timer):
            raise TypeError(f"schedule() needs a Timer, got {type(timer).__name__}")
        if timer._wheel is not None and timer._wheel is not self:
            raise ValueError("the timer is scheduled in another wheel; cancel it first")
        tick = math.ceil((deadline - self._start) / self._interval)
        if tick > _MAX_TICK:
            raise OverflowError(f"deadline {deadline!r} is out of range for this wheel")
        tick = max(tick, self._current + 1)
        if timer._wheel is self:
            self._remove(timer)
        timer._deadline = deadline
        timer._tick = tick
        timer._seq = next(self._seq)
        timer._pending = False
        timer._wheel = self
        self._bucket(tick)[timer] = None
        self._count += 1

    def call_at(self, deadline: float, callback: Callable[[Any], Any], arg: Any = None) -> Timer:
        """A new Timer for ``callback(arg)``, scheduled at ``deadline``."""
        timer = Timer(callback, arg)
        self.schedule(timer, deadline)
        return timer

    def cancel(self, timer: Timer) -> bool:
        """Same as ``timer.cancel()``."""
        if not isinstance(timer, Timer):
            raise TypeError(f"cancel() needs a Timer, got {type(timer).__name__}")
        return timer.cancel()

    def _take_due(self, bucket: dict[Timer, None], target: int) -> list[Timer]:
        due = [timer for timer in bucket if timer._tick <= target]
        for timer in due:
            self._remove(timer)
            timer._pending = True
        return due

    def advance(self, now: float) -> int:
        """Fire the timers due at ``now``; return the number of callbacks called.

        Due timers are taken out first and ``current_tick`` set, then they
        fire in (tick, schedule order).  One cancelled or rescheduled by an
        earlier callback does not fire; a raising callback does not stop the
        others, and the first exception is re-raised afterwards.
        """
        now = _real(now)
        target = math.floor((now - self._start) / self._interval)
        if target <= self._current:
            return 0
        if target > _MAX_TICK:
            raise OverflowError(f"time {now!r} is out of range for this wheel")
        due: list[Timer] = []
        if target - self._current < self._size:
            for tick in range(self._current + 1, target + 1):
                due.extend(self._take_due(self._bucket(tick), target))
        else:
            for bucket in self._buckets:
                due.extend(self._take_due(bucket, target))
            due.sort(key=lambda timer: (timer._tick, timer._seq))
        self._current = target

        fired = 0
        error: BaseException | None = None
        for timer in due:
            if not timer._pending:
                continue
            timer._pending = False
            fired += 1
            try:
                timer.callback(timer.arg)
            except BaseException as exc:  # noqa: BLE001 - re-raised after the others fire
                if error is None:
                    error = exc
        if error is not None:
            raise error
        return fired

    def next_deadline(self) -> float | None:
        """The earliest tick boundary ``start + t*tick`` of a scheduled timer, or None."""
        ticks = [timer._tick for bucket in self._buckets for timer in bucket]
        if not ticks:
            return None
        return self._start + min(ticks) * self._interval
