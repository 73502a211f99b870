"""Per-connection priority lane scheduler, plain Python (twin of core/_lanes.pyx).

Written from the contract, not from the native source: it is the oracle of
the differential tests in tests/test_lanes.py, so it favours the obvious data
structures over speed.

* P0, P1: ``deque`` of frames.
* P2: ``OrderedDict`` from a push sequence number to ``(frame, key, channel)``
  (delivery order = insertion order; removing a conflated entry is O(1)),
  plus a ``dict`` from conflation key to that sequence number.
* P3: ``deque`` of ``(frame, deadline)``.

Each queue is created on first use.  Semantics (push steps, shedding order,
weighted round robin, P3 expiry) are documented on ``LaneScheduler.push`` and
``LaneScheduler.drain``.  A ``now`` of 0.0 (the attribute at push time, the
argument of drain) means the caller keeps no clock: nothing expires then.
"""

from __future__ import annotations

import itertools
import operator
import sys
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable

ACCEPTED = 0   # queued
CONFLATED = 1  # queued, replacing the queued P2 entry with an equal key
DROPPED = 2    # the pushed P3 frame was not queued (expired, or shed for room)
OVERFLOW = 3   # a P0/P1 frame is queued over max_bytes: close the connection

_MAX_WEIGHT = 65535


def _lane(lane: object) -> int:
    value = operator.index(lane)
    if not 0 <= value <= 3:
        raise ValueError(f"lane must be 0..3, got {lane!r}")
    return value


def _real(value: object, name: str) -> float:
    """A real number as float (ints and objects with __float__/__index__; not str)."""
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (str, bytes, bytearray)) or not (
        hasattr(type(value), "__float__") or hasattr(type(value), "__index__")
    ):
        raise TypeError(f"{name} must be a real number, not {type(value).__name__}")
    return float(value)


def _positive_size(value: object, name: str) -> int:
    n = operator.index(value)
    if not 1 <= n <= sys.maxsize:
        raise ValueError(f"{name} must be an integer in 1..{sys.maxsize}, got {value!r}")
    return n


def _check_frame(frame: object) -> None:
    if not isinstance(frame, bytes):
        raise TypeError(f"frame must be bytes, not {type(frame).__name__}")


def _check_p2_args(key: Hashable, channel: Hashable) -> None:
    # A P2 key is looked up and a channel may end up in the resync set:
    # refuse unhashable ones before anything changes.
    if key is not None:
        hash(key)
    if channel is not None:
        hash(channel)


class LaneScheduler:
    """Outbound queues of one connection over the priority lanes P0..P3.

    ``LaneScheduler(max_bytes=1 << 20, weights=(8, 4, 1))``: ``max_bytes``
    (> 0) bounds the queued bytes (P3, then P2 entries are shed above it;
    P0/P1 frames never are); ``weights`` are the frames P1, P2 and P3 may
    send per round of the weighted round robin (each 1..65535).
    """

    __slots__ = (
        "_max_bytes",
        "_now",
        "_weights",
        "_credits",
        "_p0",
        "_p1",
        "_p2",
        "_p2_seq",
        "_p2_keys",
        "_p3",
        "_bytes",
        "_resync",
        "conflated",
        "p2_dropped",
        "p3_dropped",
    )

    def __init__(self, max_bytes: int = 1 << 20, weights: Iterable[int] = (8, 4, 1)) -> None:
        self._max_bytes = _positive_size(max_bytes, "max_bytes")
        values = tuple(weights)
        if len(values) != 3:
            raise ValueError(f"weights must be 3 integers (P1, P2, P3), got {weights!r}")
        values = tuple(operator.index(w) for w in values)
        if not all(1 <= w <= _MAX_WEIGHT for w in values):
            raise ValueError(f"weights must each be in 1..{_MAX_WEIGHT}, got {weights!r}")
        self._weights = values
        self._credits = list(values)
        self._now = 0.0
        self._p0 = self._p1 = self._p3 = None
        self._p2 = self._p2_keys = self._p2_seq = None
        self._bytes = [0, 0, 0, 0]  # queued bytes per lane
        self._resync = None         # dict channel -> None (insertion order = first marked)
        self.conflated = 0
        self.p2_dropped = 0
        self.p3_dropped = 0

    # ------------------------------------------------------------ attributes

    @property
    def now(self) -> float:
        """Caller's clock for the push-time P3 expiry check (0.0: no check)."""
        return self._now

    @now.setter
    def now(self, value: float) -> None:
        self._now = _real(value, "now")

    @property
    def max_bytes(self) -> int:
        """Byte bound on the queued frames (> 0).  Lowering it sheds at the next push."""
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        self._max_bytes = _positive_size(value, "max_bytes")

    @property
    def weights(self) -> tuple[int, int, int]:
        """Per-round frame credits of P1, P2, P3."""
        return self._weights

    @property
    def queued_bytes(self) -> int:
        """Sum of the lengths of all queued frames."""
        return sum(self._bytes)

    def lane_len(self, lane: int) -> int:
        """Number of frames queued in ``lane`` (expired P3 entries count until dropped)."""
        queue = (self._p0, self._p1, self._p2, self._p3)[_lane(lane)]
        return len(queue) if queue else 0

    def lane_bytes(self, lane: int) -> int:
        """Bytes queued in ``lane``."""
        return self._bytes[_lane(lane)]

    def __len__(self) -> int:
        return sum(len(q) for q in (self._p0, self._p1, self._p2, self._p3) if q)

    def __repr__(self) -> str:
        counts = " ".join(f"P{lane}={self.lane_len(lane)}" for lane in range(4))
        return f"<LaneScheduler {counts} bytes={self.queued_bytes}/{self._max_bytes}>"

    # ------------------------------------------------------------ push

    def push(
        self,
        lane: int,
        frame: bytes,
        key: Hashable = None,
        deadline: float = 0.0,
        channel: Hashable = None,
    ) -> int:
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
        deadline = _real(deadline, "deadline")
        lane = _lane(lane)
        _check_frame(frame)
        if lane == 2:
            _check_p2_args(key, channel)
        return self._push(lane, frame, key, deadline, channel)

    def _push(self, lane: int, frame: bytes, key, deadline: float, channel) -> int:
        result = ACCEPTED
        if lane == 0:
            if self._p0 is None:
                self._p0 = deque()
            self._p0.append(frame)
        elif lane == 1:
            if self._p1 is None:
                self._p1 = deque()
            self._p1.append(frame)
        elif lane == 2:
            if self._p2 is None:
                self._p2 = OrderedDict()
                self._p2_keys = {}
                self._p2_seq = itertools.count()
            if key is not None:
                old_seq = self._p2_keys.pop(key, None)
                if old_seq is not None:
                    old_frame, _, _ = self._p2.pop(old_seq)
                    self._bytes[2] -= len(old_frame)
                    self.conflated += 1
                    result = CONFLATED
            seq = next(self._p2_seq)
            self._p2[seq] = (frame, key, channel)
            if key is not None:
                self._p2_keys[key] = seq
        else:
            # now == 0.0 means the caller keeps no clock: no push-time expiry.
            if deadline != 0.0 and self._now != 0.0 and deadline <= self._now:
                self.p3_dropped += 1
                return DROPPED
            if self._p3 is None:
                self._p3 = deque()
            self._p3.append((frame, deadline))
        self._bytes[lane] += len(frame)

        while self.queued_bytes > self._max_bytes:
            if self._p3:
                dropped, _ = self._p3.popleft()
                self._bytes[3] -= len(dropped)
                self.p3_dropped += 1
                if lane == 3 and not self._p3:
                    # The pushed frame is the newest P3 entry, so it went last.
                    result = DROPPED
            elif self._p2:
                _, (dropped, old_key, old_channel) = self._p2.popitem(last=False)
                if old_key is not None:
                    del self._p2_keys[old_key]
                self._bytes[2] -= len(dropped)
                self.p2_dropped += 1
                if old_channel is not None:
                    if self._resync is None:
                        self._resync = {}
                    self._resync.setdefault(old_channel, None)
            else:
                if lane in (0, 1):
                    result = OVERFLOW
                break
        return result

    # ------------------------------------------------------------ drain

    def drain(self, max_bytes: int, now: float = 0.0) -> bytes:
        """Remove frames in schedule order and return them concatenated.

        Stops once the returned size reaches ``max_bytes``; returns at least one
        frame if any is deliverable, and b"" if none is.  P3 entries expired at
        ``now`` are dropped when they reach the head (none when ``now`` is 0.0).
        """
        now = _real(now, "now")
        max_bytes = operator.index(max_bytes)
        parts = []
        size = 0
        while True:
            frame = self._next_frame(now)
            if frame is None:
                break
            parts.append(frame)
            size += len(frame)
            if size >= max_bytes:
                break
        return b"".join(parts)

    def _next_frame(self, now: float) -> bytes | None:
        """The next frame in schedule order (removed), or None if nothing is deliverable."""
        if self._p0:
            frame = self._p0.popleft()
            self._bytes[0] -= len(frame)
            return frame
        while True:
            for index, lane in enumerate((1, 2, 3)):
                if self._credits[index] == 0:
                    continue
                if lane == 3 and now != 0.0:  # now == 0.0: the caller keeps no clock
                    self._drop_expired_p3(now)
                if self.lane_len(lane):
                    self._credits[index] -= 1
                    return self._pop(lane)
            if not (self._p1 or self._p2 or self._p3):
                return None
            # Frames are waiting, but none in a lane with credit: start a new round.
            self._credits = list(self._weights)

    def _drop_expired_p3(self, now: float) -> None:
        while self._p3:
            frame, deadline = self._p3[0]
            if deadline == 0.0 or deadline > now:
                return
            self._p3.popleft()
            self._bytes[3] -= len(frame)
            self.p3_dropped += 1

    def _pop(self, lane: int) -> bytes:
        if lane == 1:
            frame = self._p1.popleft()
        elif lane == 2:
            _, (frame, key, _) = self._p2.popitem(last=False)
            if key is not None:
                del self._p2_keys[key]
        else:
            frame, _ = self._p3.popleft()
        self._bytes[lane] -= len(frame)
        return frame

    # ------------------------------------------------------------ other

    def clear(self) -> list[bytes]:
        """Remove every queued frame; return the P0 then the P1 frames, in order.

        Counters, credits and the resync set are kept.
        """
        kept = list(self._p0 or ()) + list(self._p1 or ())
        self._p0 = self._p1 = self._p3 = None
        self._p2 = self._p2_keys = self._p2_seq = None
        self._bytes = [0, 0, 0, 0]
        return kept

    def take_resync(self) -> list:
        """Channels whose P2 frames were shed since the last call, in first-marked
        order, each once; clears the set."""
        channels = list(self._resync or ())
        self._resync = None
        return channels


def push_many(
    schedulers: Iterable[LaneScheduler],
    lane: int,
    frame: bytes,
    key: Hashable = None,
    deadline: float = 0.0,
    channel: Hashable = None,
) -> list[int]:
    """Push the same ``frame`` into each scheduler, in order (encode-once fan-out).

    Arguments as LaneScheduler.push.  Arguments and the schedulers' types are
    checked before anything is queued.  Returns the indexes (in iteration
    order) of the schedulers whose result was OVERFLOW.
    """
    deadline = _real(deadline, "deadline")
    lane = _lane(lane)
    _check_frame(frame)
    if lane == 2:
        _check_p2_args(key, channel)
    schedulers = list(schedulers)
    for scheduler in schedulers:
        if type(scheduler) is not LaneScheduler:
            raise TypeError(
                f"push_many() expects LaneScheduler objects, got {type(scheduler).__name__}"
            )
    return [
        index
        for index, scheduler in enumerate(schedulers)
        if scheduler._push(lane, frame, key, deadline, channel) == OVERFLOW
    ]
