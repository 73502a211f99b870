"""Key-value records in the SQLite store's database (table ``kv``).

A :class:`SQLiteRecords` is made by the store (``SQLiteStore.records``) and
queues on the store's writer and reader: a put commits in the same group
commit as the messages queued with it, and no record has a connection of
its own.  The SQL is the writer's ``kv_*`` requests and the reader's
``kv_get``/``kv_scan`` (the scan walks the (ns, key) primary key).
"""

from __future__ import annotations

from .records import SCAN_PAGE
from .store_sqlite_requests import Requests


class SQLiteRecords:
    """The :class:`~tillwire.server.records.Records` of one SQLite store."""

    def __init__(self, requests: Requests) -> None:
        self._write = requests.write
        self._read = requests.read

    async def put(self, ns: str, key: str, value: bytes, now: float) -> None:
        return await self._write("kv_put", (ns, key, bytes(value), now))

    async def put_new(self, ns: str, key: str, value: bytes, now: float) -> bytes:
        return await self._write("kv_put_new", (ns, key, bytes(value), now))

    async def replace(self, ns: str, key: str, expected: bytes | None, value: bytes,
                      now: float) -> bytes | None:
        return await self._write("kv_replace", (ns, key, None if expected is None
                                                else bytes(expected), bytes(value), now))

    async def get(self, ns: str, key: str) -> bytes | None:
        return await self._read("kv_get", (ns, key))

    async def scan(self, ns: str, prefix: str = "", after: str = "",
                   limit: int = SCAN_PAGE, *, reverse: bool = False,
                   before: str = "") -> list[tuple[str, bytes]]:
        return await self._read("kv_scan", (ns, prefix, after, limit, reverse, before))

    async def delete(self, ns: str, key: str) -> bool:
        return await self._write("kv_delete", (ns, key))

    async def delete_prefix(self, ns: str, prefix: str) -> int:
        return await self._write("kv_delete_prefix", (ns, prefix))

    async def expire(self, ns: str, before: float) -> int:
        return await self._write("kv_expire", (ns, before))
