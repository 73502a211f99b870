"""The memory presence: session leases in this process's memory.

The backend of a single process; several workers simulated in one process
(the tests' two nodes) share one instance.  It owns:

* ``_leases``: terminal -> its lease (owner, expiry on ``clock``, info);
* ``_index``: (tenant, store or None, role or None) -> the terminals of the
  live-or-not-yet-swept leases of that selection, so :meth:`online` reads
  one set whatever it selects by;
* ``_slots`` and ``_due``: the expiry buckets, a set of terminals per whole
  second of expiry (``ceil(expires)``) and a heap of those seconds, so the
  leases that run out are forgotten within a second of it, each by one
  pop, whether anyone asks about them or not.  Answers never wait for the
  sweep: an expired lease counts as absent as soon as it expires.

Costs: :meth:`owner` O(1); :meth:`claim` and :meth:`release` O(1 + roles);
:meth:`refresh` O(terminals); :meth:`online` O(g log g) for the g sessions
selected; and the sweep, run first by every method, O(1) when nothing is
due, else O(1 + roles) per lease forgotten.  Memory: per session, its lease,
2 + 2 x roles index entries and one bucket entry.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from .presence import Presence, SessionInfo


@dataclass(slots=True)
class _Lease:
    owner: str
    expires: float
    info: SessionInfo


def _keys(info: SessionInfo):
    """The :meth:`MemoryPresence.online` selections a session belongs to."""
    t, store = info.tenant, info.store
    yield t, None, None
    yield t, store, None
    for role in dict.fromkeys(info.roles):
        yield t, None, role
        yield t, store, role


class MemoryPresence(Presence):
    """Leases on ``clock`` (seconds; ``time.monotonic`` unless a test gives its own)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._index: dict[tuple[str, str | None, str | None], set[str]] = {}
        self._slots: dict[int, set[str]] = {}
        self._due: list[int] = []          # heap of the keys of _slots

    # -- leases ------------------------------------------------------------------

    async def claim(self, terminal: str, owner: str, lease_s: float,
                    info: SessionInfo) -> str | None:
        now = self._sweep()
        old = self._leases.get(terminal)
        previous = old.owner if old is not None and old.expires > now else None
        if old is not None:
            self._forget(terminal, old)
        lease = self._leases[terminal] = _Lease(owner, now + lease_s, info)
        index = self._index
        for key in _keys(info):
            index.setdefault(key, set()).add(terminal)
        self._slot(lease.expires).add(terminal)
        return previous

    async def refresh(self, terminals: Iterable[str], owner: str, lease_s: float) -> list[str]:
        now = self._sweep()
        expires = now + lease_s
        leases, lost = self._leases, []
        for terminal in terminals:
            lease = leases.get(terminal)
            if lease is None or lease.owner != owner or lease.expires <= now:
                lost.append(terminal)
                continue
            if math.ceil(lease.expires) != math.ceil(expires):
                self._slots[math.ceil(lease.expires)].discard(terminal)
                self._slot(expires).add(terminal)
            lease.expires = expires
        return lost

    async def release(self, terminal: str, owner: str) -> bool:
        now = self._sweep()
        lease = self._leases.get(terminal)
        if lease is None or lease.owner != owner or lease.expires <= now:
            return False
        self._forget(terminal, lease)
        return True

    async def owner(self, terminal: str) -> str | None:
        now = self._sweep()
        lease = self._leases.get(terminal)
        return lease.owner if lease is not None and lease.expires > now else None

    async def owners(self, terminals: Iterable[str]) -> dict[str, str]:
        now = self._sweep()
        leases = self._leases
        found = {}
        for terminal in terminals:
            lease = leases.get(terminal)
            if lease is not None and lease.expires > now:
                found[terminal] = lease.owner
        return found

    async def online(self, tenant: str, store: str | None = None,
                     role: str | None = None) -> dict[str, str]:
        now = self._sweep()
        leases = self._leases
        found = {}
        for terminal in sorted(self._index.get((tenant, store, role), ())):
            lease = leases[terminal]
            if lease.expires > now:
                found[terminal] = lease.owner
        return found

    # -- bookkeeping ---------------------------------------------------------------

    def _slot(self, expires: float) -> set[str]:
        """The expiry bucket of ``expires`` (made, and its second queued, if new)."""
        second = math.ceil(expires)
        slot = self._slots.get(second)
        if slot is None:
            slot = self._slots[second] = set()
            heapq.heappush(self._due, second)
        return slot

    def _forget(self, terminal: str, lease: _Lease) -> None:
        """Drop ``terminal``'s lease, its index entries and its bucket entry."""
        del self._leases[terminal]
        index = self._index
        for key in _keys(lease.info):
            members = index[key]
            members.discard(terminal)
            if not members:
                del index[key]
        slot = self._slots.get(math.ceil(lease.expires))
        if slot is not None:
            slot.discard(terminal)

    def _sweep(self) -> float:
        """Forget the leases of every bucket wholly past; returns the time now.
        (A bucket's second is at or after each of its expiries.)"""
        now = self._clock()
        due, slots = self._due, self._slots
        while due and due[0] <= now:
            for terminal in slots.pop(heapq.heappop(due)):
                self._forget(terminal, self._leases[terminal])
        return now
