"""The History interface: P2/P3 channel streams, their offsets and last values.

A channel carries two streams (P2 and P3, PROTOCOL.md section 12).  A
stream's history is numbered by ``offset`` from 1 within an ``epoch``; a
stream that was freed and comes back (or lost its history) has a new epoch,
so no terminal mistakes new offsets for old ones.  P2 keeps a last-value
cache: per conflation key the newest message, in offset order, and a
message whose source ``version`` is not newer than the cached one's is
*stale* (refused: the newest version wins, even across writers).

Backends sit beside this file: ``history_memory.py`` (the streams of this
process's hub) now, a Redis one with scale-out (the offset assigned with the
version check in one atomic step, so two workers publishing the same SKU
never both win).  ``tests/test_history_contract.py`` runs one suite on
every backend.  Every method is a coroutine: a stream may live across a
network.

Persistence of an in-process history across restarts is the store's
``ChannelArchive`` (write-behind); a shared backend needs none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Placed:
    """Where an appended message went."""

    epoch: int
    offset: int


@dataclass(frozen=True, slots=True)
class HistoryItem:
    """One message of a stream (a backend may return its own objects with
    these fields)."""

    offset: int
    kind: str
    key: str             # P2 conflation key ("" = none)
    version: int         # source version ("newest wins"); 0 = none
    payload: bytes


@dataclass(frozen=True, slots=True)
class Page:
    """A read: ``items`` in offset order; ``more`` when the read stopped at its
    limit; ``epoch``/``offset`` are the stream's current ones (0, 0: no stream)."""

    epoch: int
    offset: int
    items: list[HistoryItem]
    more: bool = False


@runtime_checkable
class History(Protocol):
    async def append(self, channel: str, lane: int, kind: str, key: str, version: int,
                     payload: bytes, ttl: float = 0.0) -> Placed | None:
        """Add a message (made the stream if it had none); None when stale.
        ``ttl`` (seconds, P3): it is not read after that."""

    async def since(self, channel: str, lane: int, epoch: int, offset: int,
                    limit: int = 0) -> Page:
        """The retained messages after ``offset`` (P3: the unexpired), at most
        ``limit`` (0: all).  ``epoch`` 0 means the current one; another epoch
        than the stream's gives no items (the reader resyncs)."""

    async def snapshot(self, channel: str, lane: int, epoch: int = 0, after: int = 0,
                       limit: int = 0) -> Page:
        """P2: the last value of every key with an offset after ``after``, in
        offset order, at most ``limit`` (0: all).  P3: as :meth:`since`."""

    async def tail(self, channel: str, lane: int, count: int = 0) -> Page:
        """The last ``count`` (0: all) of what :meth:`snapshot` reads, oldest first."""

    async def trim(self, channel: str, lane: int) -> int:
        """Apply the count and age bounds now; returns how many entries went."""

    async def forget(self, channel: str) -> int:
        """Drop both streams' history and last values (personal data deletion;
        offsets go on).  Returns how many entries went."""
