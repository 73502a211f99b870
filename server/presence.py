"""The Presence interface: which worker holds each terminal's live session.

A session is owned by one worker process (an opaque *owner* string: node id
and worker) on a lease.  The worker that accepts a login claims the
terminal; the new owner always wins and learns the previous one, which it
tells to close its session (a takeover across workers).  Each worker renews
the leases of all its sessions in one :meth:`Presence.refresh` call, well
within the lease; a worker that dies stops renewing, and its terminals drop
out of presence when their leases run out.  An expired lease is absent from
every answer.

Presence also answers who is online by tenant, store and role, from the
:class:`SessionInfo` given at claim time.

Backends sit beside this file (``presence_memory.py``; a Redis one shares
presence between the workers and nodes of a cluster) and
``tests/test_presence_contract.py`` runs one suite against every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """Where a session's terminal sits: what :meth:`Presence.online` selects by."""

    tenant: str
    store: str
    roles: tuple[str, ...] = ()


@runtime_checkable
class Presence(Protocol):
    """The contract every presence backend fulfils.  Every method is a
    coroutine; ``lease_s`` is in seconds; terminals are terminal addresses."""

    async def claim(self, terminal: str, owner: str, lease_s: float,
                    info: SessionInfo) -> str | None:
        """Make ``owner`` the owner of ``terminal`` for ``lease_s`` seconds,
        whoever held it; returns the previous live owner (which may be
        ``owner`` itself) or None.  O(1 + roles)."""

    async def refresh(self, terminals: Iterable[str], owner: str, lease_s: float) -> list[str]:
        """Renew, for ``lease_s`` seconds from now, the lease of each of
        ``terminals`` that ``owner`` still holds; returns the others, in the
        order given: taken over by another owner, expired, or never claimed
        (the caller closes those sessions or claims them again).
        O(len(terminals)), one round trip."""

    async def release(self, terminal: str, owner: str) -> bool:
        """End ``terminal``'s lease if ``owner`` still holds it (a session
        closed); False, changing nothing, when another owner took it over or
        the lease is gone.  O(1 + roles)."""

    async def owner(self, terminal: str) -> str | None:
        """The owner of ``terminal``'s live lease; None when there is none.  O(1)."""

    async def owners(self, terminals: Iterable[str]) -> dict[str, str]:
        """terminal -> owner of each of ``terminals`` that has a live lease
        (the others are left out).  O(len(terminals)), one round trip per
        tenant among them."""

    async def online(self, tenant: str, store: str | None = None,
                     role: str | None = None) -> dict[str, str]:
        """The live sessions of ``tenant`` (of ``store`` and/or with ``role``,
        when given): terminal -> owner, ordered by terminal.
        O(g log g) for the g sessions selected."""
