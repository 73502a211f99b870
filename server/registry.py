"""The terminal registry, indexed in memory for group expansion.

Every terminal that ever authenticated (or was registered through the admin
API) has a ``TerminalRecord`` in the store; the node keeps them all here so
that a P0/P1 message to ``store:acme/s1`` or ``role:acme/*/service`` expands
to its members without a store query, connected or not.

Records are indexed by store (and by region and member when they have
them); a tenant is the union of its stores and a role group filters a store
(or all of the tenant's stores for ``role:<t>/*/<role>``), so a record costs
one or two index entries.
"""

from __future__ import annotations

from .address import Address
from .terminals import TerminalRecord


class Registry:
    def __init__(self) -> None:
        self.records: dict[str, TerminalRecord] = {}
        self._by_store: dict[tuple[str, str], set[str]] = {}
        self._by_region: dict[tuple[str, str], set[str]] = {}
        self._by_member: dict[tuple[str, str], set[str]] = {}
        self._stores_of: dict[str, set[tuple[str, str]]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def get(self, address: str) -> TerminalRecord | None:
        return self.records.get(address)

    def _keys(self, rec: TerminalRecord):
        yield self._by_store, (rec.tenant, rec.store)
        if rec.region:
            yield self._by_region, (rec.tenant, rec.region)
        if rec.member:
            yield self._by_member, (rec.tenant, rec.member)

    def put(self, rec: TerminalRecord) -> None:
        """Insert or replace a record (indexes follow its store, region, member)."""
        old = self.records.get(rec.address)
        if old is not None:
            for index, key in self._keys(old):
                members = index.get(key)
                if members is not None:
                    members.discard(old.address)
                    if not members:
                        del index[key]
                        if index is self._by_store:
                            self._stores_of[key[0]].discard(key)
        self.records[rec.address] = rec
        for index, key in self._keys(rec):
            members = index.get(key)
            if members is None:
                members = index[key] = set()
                if index is self._by_store:
                    self._stores_of.setdefault(key[0], set()).add(key)
            members.add(rec.address)

    def _stores(self, tenant: str) -> list[set[str]]:
        by_store = self._by_store
        return [by_store[key] for key in self._stores_of.get(tenant, ())]

    @staticmethod
    def terminal_members(address: str, rec: TerminalRecord | None) -> list[str]:
        """The members of terminal ``address`` whose record is ``rec``: itself,
        registered or not, unless retired."""
        return [] if rec is not None and rec.retired else [address]

    def members(self, address: Address) -> list[str]:
        """Terminal addresses of a (group) address, retired ones excluded.

        A ``terminal:`` address is its own single member even when the
        terminal is not registered yet (its message waits for its first login).
        """
        scope, t = address.scope, address.tenant
        records = self.records
        if scope == "terminal":
            to = str(address)
            return self.terminal_members(to, records.get(to))
        if scope == "tenant":
            found = [a for group in self._stores(t) for a in group]
        elif scope == "store":
            found = self._by_store.get((t, address.path[0]), ())
        elif scope == "region":
            found = self._by_region.get((t, address.path[0]), ())
        elif scope == "member":
            found = self._by_member.get((t, address.path[0]), ())
        elif scope == "role":
            store, role = address.path
            groups = self._stores(t) if store == "*" else \
                [self._by_store.get((t, store), ())]
            found = [a for group in groups for a in group if role in records[a].roles]
        else:
            return []
        return sorted(a for a in found if not records[a].retired)
