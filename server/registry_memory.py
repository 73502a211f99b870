"""The memory registry: every terminal record in this process's memory.

The backend of a single process (and the tests' model of the others).  It
owns three maps:

* ``_records``: terminal address -> its record, retired ones included;
* ``_groups``: group address (``store:acme/s1``, ``role:acme/*/service`` ...)
  -> the set of its members' terminal addresses (see ``record_groups``);
* ``_sorted``: group address -> its members as a sorted list, made by the
  first :meth:`members` call after the group changed and dropped by the
  next change, so a group that is messaged again and again is sorted once.

Costs: :meth:`cached`, :meth:`get`, :meth:`count` O(1); :meth:`put`
O(groups of the old and the new record), about ten, and a put that leaves
the groups as they were (a login that only moves ``last_seen``) touches
none; :meth:`members` O(size of the group): a copy of its sorted list, or
O(g log g) to sort it after a change.  Memory: about one set entry per
group a terminal is in, plus the sorted lists of the groups read.
"""

from __future__ import annotations

from typing import Iterable

from .address import Address
from .registry import Registry, record_groups
from .terminals import TerminalRecord


class MemoryRegistry(Registry):
    """Every record in memory: :meth:`cached` is authoritative."""

    def __init__(self) -> None:
        self._records: dict[str, TerminalRecord] = {}
        self._groups: dict[str, set[str]] = {}
        self._sorted: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self._records)

    def cached(self, address: str) -> TerminalRecord | None:
        return self._records.get(address)

    async def get(self, address: str) -> TerminalRecord | None:
        return self._records.get(address)

    async def count(self) -> int:
        return len(self._records)

    async def put(self, rec: TerminalRecord) -> None:
        address = rec.address
        old = self._records.get(address)
        self._records[address] = rec
        before = record_groups(old) if old is not None else []
        after = record_groups(rec)
        if before == after:
            return
        groups, sorted_ = self._groups, self._sorted
        for name in before:
            if name not in after:
                members = groups[name]
                members.discard(address)
                if not members:
                    del groups[name]
                sorted_.pop(name, None)
        for name in after:
            if name not in before:
                groups.setdefault(name, set()).add(address)
                sorted_.pop(name, None)

    async def load(self, records: Iterable[TerminalRecord]) -> None:
        for rec in records:
            await self.put(rec)

    async def members(self, address: Address) -> list[str]:
        name = str(address)
        if address.scope == "terminal":
            return self.terminal_members(name, self._records.get(name))
        found = self._sorted.get(name)
        if found is None:
            group = self._groups.get(name)
            if group is None:
                return []
            found = self._sorted[name] = sorted(group)
        return found.copy()
