"""The terminal registry, indexed in memory for group expansion.

Every terminal that ever authenticated (or was registered through the admin
API) has a ``TerminalRecord`` in the store; the node keeps them all here so
that a P0/P1 message to ``store:acme/s1`` or ``role:acme/*/service`` expands
to its members without a store query, connected or not.
"""

from __future__ import annotations

from .address import Address
from .store import TerminalRecord


class Registry:
    def __init__(self) -> None:
        self.records: dict[str, TerminalRecord] = {}
        self._by_tenant: dict[str, set[str]] = {}
        self._by_store: dict[tuple[str, str], set[str]] = {}
        self._by_region: dict[tuple[str, str], set[str]] = {}
        self._by_role: dict[tuple[str, str], set[str]] = {}
        self._by_member: dict[tuple[str, str], set[str]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def get(self, address: str) -> TerminalRecord | None:
        return self.records.get(address)

    def _keys(self, rec: TerminalRecord):
        yield self._by_tenant, rec.tenant
        yield self._by_store, (rec.tenant, rec.store)
        if rec.region:
            yield self._by_region, (rec.tenant, rec.region)
        for role in rec.roles:
            yield self._by_role, (rec.tenant, role)
        if rec.member:
            yield self._by_member, (rec.tenant, rec.member)

    def put(self, rec: TerminalRecord) -> None:
        """Insert or replace a record (indexes follow its store, region, roles)."""
        old = self.records.get(rec.address)
        if old is not None:
            for index, key in self._keys(old):
                members = index.get(key)
                if members is not None:
                    members.discard(old.address)
                    if not members:
                        del index[key]
        self.records[rec.address] = rec
        for index, key in self._keys(rec):
            index.setdefault(key, set()).add(rec.address)

    def members(self, address: Address) -> list[str]:
        """Terminal addresses of a (group) address, retired ones excluded.

        A ``terminal:`` address is its own single member even when the
        terminal is not registered yet (its message waits for its first login).
        """
        scope, t = address.scope, address.tenant
        if scope == "terminal":
            rec = self.records.get(str(address))
            return [] if rec is not None and rec.retired else [str(address)]
        if scope == "tenant":
            found = self._by_tenant.get(t, ())
        elif scope == "store":
            found = self._by_store.get((t, address.path[0]), ())
        elif scope == "region":
            found = self._by_region.get((t, address.path[0]), ())
        elif scope == "member":
            found = self._by_member.get((t, address.path[0]), ())
        elif scope == "role":
            store, role = address.path
            found = self._by_role.get((t, role), set())
            if store != "*":
                found = found & self._by_store.get((t, store), set())
        else:
            return []
        records = self.records
        return sorted(a for a in found if not records[a].retired)
