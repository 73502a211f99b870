"""The Registry interface: every terminal the system knows, and its groups.

Every terminal that ever authenticated (or was registered through the admin
API) has a ``TerminalRecord`` in the store; the registry holds them so that
a P0/P1 message to ``store:acme/s1`` or ``role:acme/*/service`` expands to
its members without a store query, connected or not.

A record belongs to the groups its token implies (``implied_channels``):
its tenant, its store, each of its roles within that store and across the
tenant (``role:<t>/*/<role>``), its region and its member, when it has them.
A backend indexes each group by its address, so expanding a group costs the
size of that group, never the size of its tenant.  Retired terminals are in
no group.

Backends sit beside this file (``registry_memory.py``; a Redis one shares
the state between the workers and nodes of a cluster) and
``tests/test_registry_contract.py`` runs one suite against every backend.

Records are values: change a terminal by putting a new record (e.g.
``dataclasses.replace(rec, retired=True)``), never by mutating the one the
registry handed out, or its group indexes no longer match it.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Protocol, runtime_checkable

from .address import Address, implied_channels
from .terminals import TerminalRecord


def record_groups(rec: TerminalRecord) -> list[str]:
    """The group addresses ``rec`` is a member of, each once: none when it is
    retired, else those its token implies, less its own terminal address."""
    if rec.retired:
        return []
    return [name for name in dict.fromkeys(implied_channels(rec)) if name != rec.address]


def indexed_groups(rec: TerminalRecord) -> list[str]:
    """The groups of ``rec`` every backend keeps an index of: its store, its
    region and member.  A tenant is the union of its stores and a role
    within a store filters the store (both at the group's cost); a role
    across the tenant is indexed once someone reads it (see the backends)."""
    return [name for name in record_groups(rec)
            if not name.startswith(("tenant:", "role:"))]


def kept_flags(rec: TerminalRecord, old: TerminalRecord | None) -> TerminalRecord:
    """``rec`` with ``old``'s retired flag and its revocation if later (see
    :meth:`Registry.put_login`)."""
    if old is None or (rec.retired >= old.retired
                       and rec.revoked_before >= old.revoked_before):
        return rec
    return dataclasses.replace(rec, retired=rec.retired or old.retired,
                               revoked_before=max(rec.revoked_before, old.revoked_before))


@runtime_checkable
class Registry(Protocol):
    """The contract every registry backend fulfils.

    Methods that may cross a network are coroutines.  :meth:`cached` and
    ``len()`` read what this process holds, for the node's hot paths (a
    HELLO's retired/revoked check, a SEND's recipient store).  Backends
    subclass this class, inheriting :meth:`terminal_members`.
    """

    @staticmethod
    def terminal_members(address: str, rec: TerminalRecord | None) -> list[str]:
        """The members of terminal ``address`` whose record is ``rec``: itself,
        registered or not, unless retired.  (A message to a terminal that
        never logged in waits in its inbox for its first login.)  O(1)."""
        return [] if rec is not None and rec.retired else [address]

    def __len__(self) -> int:
        """How many records this process holds: all of them for the memory
        backend, its cache for a distributed one (a gauge, not a count:
        see :meth:`count`)."""

    def cached(self, address: str) -> TerminalRecord | None:
        """Terminal ``address``'s record from this process's memory, without
        waiting: authoritative for the memory backend; for a distributed one,
        a bounded cache of the records this process read or wrote, which may
        miss (None) or lag another worker's put.  O(1)."""

    async def get(self, address: str) -> TerminalRecord | None:
        """Terminal ``address``'s record, authoritative; None if it was never
        registered.  O(1)."""

    async def put(self, rec: TerminalRecord) -> None:
        """Insert or replace the record of ``rec.address``; its groups follow
        its store, roles, region, member and retired flag (a record that moves
        leaves its old groups).  :meth:`cached` returns ``rec`` afterwards.
        O(number of groups of the old and new record)."""

    async def put_login(self, rec: TerminalRecord) -> None:
        """:meth:`put` of a record a login built from what this process had
        cached, keeping the stored record's ``retired`` and the later of the
        two ``revoked_before``: an operator's retire or revoke on another
        worker, not heard of here yet, is never undone by a login.  This
        default reads, then puts (enough in one process); a shared backend
        does both in one step."""
        old = await self.get(rec.address)
        await self.put(kept_flags(rec, old))

    async def load(self, records: Iterable[TerminalRecord]) -> None:
        """:meth:`put` every record of ``records`` (start-up, from the store).
        O(total groups of the records)."""

    async def count(self) -> int:
        """How many terminals are registered, retired ones included.  O(1)."""

    async def members(self, address: Address) -> list[str]:
        """Terminal addresses of ``address``, sorted, retired ones excluded.

        A ``terminal:`` address is its own single member even when the
        terminal is not registered (see :meth:`terminal_members`); a group
        address has the registered terminals of that group; any other scope
        (``topic:``, ``chat:`` ...) has none.  O(size of the group).
        """
