"""Terminal records held in this process's memory (``MemoryStore.terminals``)."""

from __future__ import annotations

from dataclasses import replace

from .terminals import TerminalRecord


class MemoryTerminals:
    """The :class:`~tillwire.server.terminals.Terminals` of a memory store.

    Records are copied in and out: a caller mutating a record it passed or
    got back must not change what is kept (nor retire() the caller's object).
    """

    def __init__(self) -> None:
        self._records: dict[str, TerminalRecord] = {}

    def __len__(self) -> int:
        """How many terminals are registered (the store's stats)."""
        return len(self._records)

    async def register(self, record: TerminalRecord) -> None:
        old = self._records.get(record.address)
        if old is not None:
            record = replace(record, first_seen=old.first_seen or record.first_seen,
                             retired=old.retired, revoked_before=old.revoked_before)
        else:
            record = replace(record)
        self._records[record.address] = record

    async def get(self, address: str) -> TerminalRecord | None:
        rec = self._records.get(address)
        return replace(rec) if rec is not None else None

    async def all(self, tenant: str | None = None) -> list[TerminalRecord]:
        return [replace(r) for r in self._records.values() if tenant is None or r.tenant == tenant]

    async def retire(self, address: str, retired: bool) -> bool:
        rec = self._records.get(address)
        if rec is None:
            return False
        rec.retired = retired
        return True

    async def revoke(self, address: str, before: float) -> bool:
        rec = self._records.get(address)
        if rec is None:
            return False
        rec.revoked_before = before
        return True
