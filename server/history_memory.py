"""The in-process History backend: the streams of this process's hub.

With one process (the embedded default) the hub's streams *are* the
channel history: the node appends to them on its publish path (encoding
the live frame once for the fan-out) and reads them for catch-up, and this
class answers the History interface over the same streams, so HISTORY
requests, the admin API and the contract suite see exactly what terminals
are sent.  Costs: an append is the hub's (O(1) plus trimming); ``since``
bisects the history (O(log n + items)); ``snapshot`` walks the last-value
cache (O(keys), kept in offset order).  Times are the loop's clock.
"""

from __future__ import annotations

import bisect

from ..core.codes import Lane
from .history import Page, Placed


def _offset_of(entry) -> int:
    return entry.offset


class MemoryHistory:
    def __init__(self, hub, clock) -> None:
        self.hub = hub
        self.clock = clock          # the loop's time(): what the hub's entries are stamped with

    async def append(self, channel: str, lane: int, kind: str, key: str, version: int,
                     payload: bytes, ttl: float = 0.0) -> Placed | None:
        now = self.clock()
        stream = self.hub.stream(channel, lane)
        entry = self.hub.append(stream, kind, key, version, payload, now,
                                now + ttl if ttl else 0.0)
        return Placed(stream.epoch, entry.offset) if entry is not None else None

    def _read(self, channel: str, lane: int, epoch: int, after: int, limit: int,
              last_values: bool) -> Page:
        stream = self.hub.stream(channel, lane, create=False)
        if stream is None:
            return Page(0, 0, [])
        if epoch not in (0, stream.epoch):
            return Page(stream.epoch, stream.offset, [])
        now = self.clock()
        if last_values or lane != Lane.P2:
            source = self.hub.history(stream, now)         # P2: last values; P3: unexpired
        else:
            self.hub.trim(stream, now)
            source = list(stream.history)                  # P2 read since: every version
        start = bisect.bisect_right(source, after, key=_offset_of) if after else 0
        end = start + limit if limit else len(source)
        return Page(stream.epoch, stream.offset, source[start:end], end < len(source))

    async def since(self, channel: str, lane: int, epoch: int, offset: int,
                    limit: int = 0) -> Page:
        return self._read(channel, lane, epoch, offset, limit, False)

    async def snapshot(self, channel: str, lane: int, epoch: int = 0, after: int = 0,
                       limit: int = 0) -> Page:
        return self._read(channel, lane, epoch, after, limit, lane == Lane.P2)

    async def tail(self, channel: str, lane: int, count: int = 0) -> Page:
        page = self._read(channel, lane, 0, 0, 0, True)
        if count and len(page.items) > count:
            return Page(page.epoch, page.offset, page.items[-count:])
        return page

    async def trim(self, channel: str, lane: int) -> int:
        stream = self.hub.stream(channel, lane, create=False)
        if stream is None:
            return 0
        before = len(stream.history)
        self.hub.trim(stream, self.clock())
        return before - len(stream.history)

    async def forget(self, channel: str) -> int:
        gone = 0
        for lane in (Lane.P2, Lane.P3):
            stream = self.hub.stream(channel, lane, create=False)
            if stream is not None:
                gone += self.hub.forget(stream)
        return gone
