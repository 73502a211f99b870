"""Channel history held in this process's memory (``MemoryStore.archive``).

It keeps what the SQLite archive keeps and answers :meth:`load` alike, so
one contract suite runs on both; nothing survives the process (a node
started on a new memory store loads nothing).  Bounds are applied as
entries come in: at most ``history_max`` per stream, and none older than
``history_age`` before the newest entry (older ones could only be loaded
with a ``now`` before that entry was made).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

from .archive import StreamEntry, StreamState, newer

_P2 = 2


class _Stream:
    __slots__ = ("epoch", "offset", "history", "lvc")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.offset = 0                              # highest offset appended
        # offset -> entry, in append order (an OrderedDict: its front is O(1) to find)
        self.history: OrderedDict[int, StreamEntry] = OrderedDict()
        self.lvc: dict[str, StreamEntry] = {}        # P2 key -> newest entry


class MemoryArchive:
    """The :class:`~tillwire.server.archive.ChannelArchive` of a memory store."""

    def __init__(self) -> None:
        self.history_max = 1000
        self.history_age = 3600.0
        # (name, lane) -> stream, in the order streams were first appended to.
        self._streams: dict[tuple[str, int], _Stream] = {}

    def configure(self, history_max: int, history_age: float) -> None:
        self.history_max = max(0, int(history_max))
        self.history_age = float(history_age)

    def append(self, name: str, lane: int, epoch: int, entry: StreamEntry) -> None:
        st = self._streams.get((name, lane))
        if st is None:
            st = self._streams[(name, lane)] = _Stream(epoch)
        elif st.epoch != epoch:
            # A new epoch: the old history and last values mean nothing any more.
            st.epoch = epoch
            st.offset = 0
            st.history.clear()
            st.lvc.clear()
        entry = replace(entry, payload=bytes(entry.payload))   # ours, whatever the caller does
        if entry.offset > st.offset:
            st.offset = entry.offset
        if lane == _P2 and entry.key:
            kept = st.lvc.get(entry.key)
            if kept is None or newer(entry, kept):
                st.lvc[entry.key] = entry
        if self.history_max <= 0:
            return
        history = st.history
        history[entry.offset] = entry
        # Offsets grow with appends, so the entries to drop are at the front.
        lowest = st.offset - self.history_max
        horizon = entry.created - self.history_age
        while history:
            offset, old = next(iter(history.items()))
            if offset > lowest and old.created >= horizon:
                break
            history.popitem(last=False)

    async def load(self, history_max: int, history_age: float,
                   now: float) -> list[StreamState]:
        horizon = now - history_age
        out = []
        for (name, lane), st in self._streams.items():
            history = []
            if history_max > 0:
                lowest = st.offset - history_max
                history = [replace(e) for e in sorted(st.history.values(), key=_offset)
                           if e.offset > lowest and e.created >= horizon
                           and (not e.expires or e.expires > now)]
            lvc = []
            if lane == _P2:
                lvc = [replace(e) for e in sorted(st.lvc.values(), key=_offset)
                       if not e.expires or e.expires > now]
            out.append(StreamState(name, lane, st.epoch, st.offset, history, lvc))
        return out

    async def forget(self, name: str) -> int:
        gone = 0
        for lane in (2, 3):
            st = self._streams.pop((name, lane), None)
            if st is not None:
                gone += len(st.history) + len(st.lvc)
        return gone

    async def expire_kind(self, kind: str, before: float) -> int:
        gone = 0
        for st in self._streams.values():
            doomed = [offset for offset, e in st.history.items()
                      if e.kind == kind and e.created < before]
            for offset in doomed:
                del st.history[offset]
            gone += len(doomed)
        return gone


def _offset(entry: StreamEntry) -> int:
    return entry.offset
