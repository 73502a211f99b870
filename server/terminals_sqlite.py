"""Terminal records in the SQLite store's database (table ``terminals``).

A :class:`SQLiteTerminals` is made by the store (``SQLiteStore.terminals``)
and queues on the store's writer and reader.  The table also maps inbox
addresses to the tids of inbox keys (the writer adds a placeholder row for a
recipient never seen), so registering and accepting share the writer's
cache of tids; only rows with ``registered = 1`` are terminal records.
"""

from __future__ import annotations

from .store_sqlite_requests import Requests
from .terminals import TerminalRecord


class SQLiteTerminals:
    """The :class:`~tillwire.server.terminals.Terminals` of one SQLite store."""

    def __init__(self, requests: Requests) -> None:
        self._write = requests.write
        self._read = requests.read

    async def register(self, record: TerminalRecord) -> None:
        return await self._write("register", (record,))

    async def get(self, address: str) -> TerminalRecord | None:
        return await self._read("terminal", (address,))

    async def all(self, tenant: str | None = None) -> list[TerminalRecord]:
        return await self._read("terminals", (tenant,))

    async def retire(self, address: str, retired: bool) -> bool:
        return await self._write("retire", (address, retired))

    async def revoke(self, address: str, before: float) -> bool:
        return await self._write("revoke", (address, before))
