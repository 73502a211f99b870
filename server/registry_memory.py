"""The memory registry: every terminal record in this process's memory.

The backend of a single process (and the tests' model of the others).  It
owns these maps:

* ``_records``: terminal address -> its record, retired ones included;
* ``_groups``: an indexed group address (a store, a region, a member, and a
  role across the tenant ``role:acme/*/service`` once it was read: only the
  roles someone messages across stores cost memory) -> the set of its
  members, and ``_stores``: tenant -> its store groups.  The other groups
  are derived when read: a tenant is the union of its stores, a role within
  a store filters the store's set;
* ``_sorted``: group address -> its members as a sorted list, made by the
  first :meth:`members` call after the group (or the store it is derived
  from) changed and dropped by the next change, so a group messaged again
  and again is sorted once.

Costs: :meth:`cached`, :meth:`get`, :meth:`count` O(1); :meth:`put`
O(indexed groups of the old and the new record), a few, and a put that
leaves them as they were (a login that only moves ``last_seen``) touches
none; :meth:`members` O(size of the group) (a role within a store: of the
store; the first read of a role across the tenant: the tenant), a copy of
its sorted list, or a sort after a change.  Memory: one set entry per
indexed group of a terminal (a till: one, its store), plus the sorted lists
of the groups read.
"""

from __future__ import annotations

from typing import Iterable

from .address import Address
from .registry import Registry, indexed_groups
from .terminals import TerminalRecord


class MemoryRegistry(Registry):
    """Every record in memory: :meth:`cached` is authoritative."""

    def __init__(self) -> None:
        self._records: dict[str, TerminalRecord] = {}
        self._groups: dict[str, set[str]] = {}
        self._stores: dict[str, set[str]] = {}        # tenant -> its store group names
        self._sorted: dict[str, list[str]] = {}
        self._derived: dict[str, set[str]] = {}       # store group -> role groups read from it
        self._watched: dict[str, set[str]] = {}       # tenant -> roles indexed across it

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
        before = self._indexed(old) if old is not None else []
        after = self._indexed(rec)
        if before == after:
            return
        groups, sorted_ = self._groups, self._sorted
        for name in before:
            if name not in after:
                members = groups[name]
                members.discard(address)
                if not members:
                    del groups[name]
                    if name.startswith("store:"):
                        self._stores[rec.tenant].discard(name)
                sorted_.pop(name, None)
        for name in after:
            if name not in before:
                members = groups.get(name)
                if members is None:
                    members = groups[name] = set()
                    if name.startswith("store:"):
                        self._stores.setdefault(rec.tenant, set()).add(name)
                members.add(address)
                sorted_.pop(name, None)
        # What is derived from the stores it left or joined changed too.
        sorted_.pop(f"tenant:{rec.tenant}", None)
        for name in {*before[:1], *after[:1]}:        # (its store group comes first)
            for derived in self._derived.pop(name, ()):
                sorted_.pop(derived, None)

    def _indexed(self, rec: TerminalRecord) -> list[str]:
        groups = indexed_groups(rec)          # (its store first)
        watched = self._watched.get(rec.tenant)
        if watched and not rec.retired:
            groups += [f"role:{rec.tenant}/*/{role}" for role in dict.fromkeys(rec.roles)
                       if role in watched]
        return groups

    def _watch(self, tenant: str, role: str) -> None:
        """Index ``role`` across ``tenant`` from now on (built from its stores once)."""
        self._watched.setdefault(tenant, set()).add(role)
        records = self._records
        members = {a for store in self._stores.get(tenant, ()) for a in self._groups[store]
                   if role in records[a].roles}
        if members:
            self._groups[f"role:{tenant}/*/{role}"] = members

    async def load(self, records: Iterable[TerminalRecord]) -> None:
        for rec in records:
            await self.put(rec)

    async def members(self, address: Address) -> list[str]:
        name = str(address)
        scope = address.scope
        if scope == "terminal":
            return self.terminal_members(name, self._records.get(name))
        found = self._sorted.get(name)
        if found is not None:
            return found.copy()
        groups = self._groups
        if scope == "tenant":
            stores = self._stores.get(address.tenant)
            if not stores:
                return []
            found = sorted(a for store in stores for a in groups[store])
        elif scope == "role" and address.path[0] == "*":
            role = address.path[1]
            if role not in self._watched.get(address.tenant, ()):
                self._watch(address.tenant, role)
            members = groups.get(name)
            if members is None:
                return []
            found = sorted(members)
        elif scope == "role":
            store = f"store:{address.tenant}/{address.path[0]}"
            members = groups.get(store)
            if members is None:
                return []
            role, records = address.path[1], self._records
            found = sorted(a for a in members if role in records[a].roles)
            self._derived.setdefault(store, set()).add(name)
        else:
            members = groups.get(name)
            if members is None:
                return []
            found = sorted(members)
        self._sorted[name] = found
        return found.copy()
