"""The ChannelArchive interface: what is kept of the P2/P3 channel streams.

The hub (``hub.py``) holds each channel stream's history and, for P2, its
last-value cache in memory; the archive keeps a copy so a restarted node
can load them back.  Backends sit beside this file (``archive_memory.py``,
``archive_sqlite.py``); each store backend exposes its own as
``store.archive`` (the SQLite one writes through the store's writer, after
the P0/P1 requests of its batch).  ``tests/test_archive_contract.py`` runs
one suite against every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(slots=True)
class StreamEntry:
    """One persisted message of a P2/P3 channel stream (history or last value)."""

    offset: int
    kind: str
    key: str             # P2 conflation key ("" = none)
    version: int         # source version for P2 ("newest wins"); 0 = none
    payload: bytes
    created: float       # unix seconds
    expires: float       # unix seconds; 0.0 = never


@dataclass(slots=True)
class StreamState:
    """What an archive kept of one stream, as :meth:`ChannelArchive.load` returns it."""

    name: str
    lane: int
    epoch: int
    offset: int                      # highest offset kept; the next one is offset + 1
    history: list[StreamEntry]       # oldest first, within history_max and history_age
    lvc: list[StreamEntry]           # P2 only: the newest entry of every key (by offset)


def newer(entry: StreamEntry, kept: StreamEntry) -> bool:
    """Whether ``entry`` replaces ``kept`` as the last value of their key: a
    higher version; without versions on both sides, the higher offset."""
    if entry.version and kept.version:
        return entry.version > kept.version or (
            entry.version == kept.version and entry.offset > kept.offset)
    return entry.offset > kept.offset


@runtime_checkable
class ChannelArchive(Protocol):
    """The contract every channel archive fulfils.

    Every method is a coroutine except :meth:`configure` and :meth:`append`,
    which are plain calls made on the event loop.
    """

    def configure(self, history_max: int, history_age: float) -> None:
        """Bounds of the kept history (``[history]``): at most ``history_max``
        entries per stream (0: keep no history, last values only), none older
        than ``history_age`` seconds."""

    def append(self, name: str, lane: int, epoch: int, entry: StreamEntry) -> None:
        """Keep one appended stream entry (NOT a coroutine: fire and forget).

        Called on the event loop for every P2/P3 broadcast; it never blocks
        and never raises for a store that is open.  A durable backend may
        write it later (SQLite: with a later group commit, so a crash may
        lose the last few milliseconds of channel history; channels are not
        P0/P1: terminals resync).  The stream keeps at most ``history_max``
        entries; for P2, the last-value cache keeps one entry per key, the
        newest (see :func:`newer`).  An ``epoch`` different from the
        stream's kept one resets its history and last values.
        """

    async def load(self, history_max: int, history_age: float,
                   now: float) -> list[StreamState]:
        """Every kept stream, in the order they were first appended to: its
        epoch and highest offset, the history entries within ``history_max``
        and ``history_age`` of ``now`` that have not expired, and (P2) the
        unexpired last values.  Offsets of a loaded stream continue after
        ``offset``."""

    async def forget(self, name: str) -> int:
        """Delete everything kept of channel ``name`` (both lanes: history, last
        values, position), e.g. a member's personal channel on a deletion
        request; returns how many entries went.  A later append starts the
        stream afresh."""

    async def expire_kind(self, kind: str, before: float) -> int:
        """Delete kept history entries of ``kind`` created before ``before``
        (unix s) in every stream: a kind's own retention, shorter than the
        history's age (``retention.member_notice``).  Returns how many went."""
