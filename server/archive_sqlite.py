"""Channel history in the SQLite store's database (``streams``, ``stream_entries``, ``lvc``).

A :class:`SQLiteArchive` is made by the store (``SQLiteStore.archive``) and
queues on the store's writer and reader.  Appends are the writer's
exception to arrival order: they wait until no other request is queued and
commit in slices of their own without their own fsync, so a payment result
never waits behind a promotion flood (see ``Writer._run_prioritised``); a
forget or expire_kind first writes the appends queued before it.
"""

from __future__ import annotations

from .archive import StreamEntry, StreamState
from .store_sqlite_requests import Requests


class SQLiteArchive:
    """The :class:`~tillwire.server.archive.ChannelArchive` of one SQLite store."""

    def __init__(self, requests: Requests) -> None:
        self._requests = requests

    def configure(self, history_max: int, history_age: float) -> None:
        self._requests.writer.configure_streams(history_max, history_age)

    def append(self, name: str, lane: int, epoch: int, entry: StreamEntry) -> None:
        self._requests.send("stream_append", (name, lane, epoch, entry))

    async def load(self, history_max: int, history_age: float,
                   now: float) -> list[StreamState]:
        return await self._requests.read("load_streams", (history_max, history_age, now))

    async def forget(self, name: str) -> int:
        return await self._requests.write("forget_stream", (name,))

    async def expire_kind(self, kind: str, before: float) -> int:
        return await self._requests.write("stream_expire_kind", (kind, before))
