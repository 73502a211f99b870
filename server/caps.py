"""The Caps interface: offer frequency caps shared by the workers of a fleet.

A member (a loyalty id, on every device it uses) gets at most ``count``
offers per sliding ``window`` seconds, and one offer counts once per member
however many of its devices it reaches, on whichever workers (``offers.py``
is the policy).  :meth:`Caps.take` decides a batch of members for one offer
in one call: the offer counts for the members under their cap and is
refused (capped) for the rest; a member it already counted for passes
without counting again.

Backends sit beside this file: :class:`MemoryCaps` (one process; the
embedded node's own policy keeps its counts itself, this one is the
contract's reference) and ``caps_redis.py`` (one Lua call per tenant and
offer: the check and the count are one atomic step, so two workers placing
offers for one member at once never both take its last place).
``tests/test_caps_contract.py`` runs one suite on both.
"""

from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable


@runtime_checkable
class Caps(Protocol):
    async def take(self, tenant: str, members: Iterable[str], offer: str, now: float,
                   count: int, window: float) -> dict[str, bool]:
        """For each of ``members``: True when capped (the offer is not for
        them), False when it passes (counted now, or counted before for the
        same ``offer`` within the window).  O(len(members))."""

    async def forget(self, tenant: str, member: str) -> None:
        """Drop a member's counts (their personal data is deleted)."""


class MemoryCaps:
    """Caps in this process's memory."""

    def __init__(self) -> None:
        # (tenant, member) -> [times counted], {offer: time counted}
        self._members: dict[tuple[str, str], tuple[list[float], dict[str, float]]] = {}

    async def take(self, tenant: str, members: Iterable[str], offer: str, now: float,
                   count: int, window: float) -> dict[str, bool]:
        horizon = now - window
        verdicts = {}
        for member in members:
            times, offers = self._members.setdefault((tenant, member), ([], {}))
            while times and times[0] <= horizon:
                del times[0]
            for old in [o for o, t in offers.items() if t <= horizon]:
                del offers[old]
            if offer in offers:
                verdicts[member] = False
            elif len(times) >= count:
                verdicts[member] = True
            else:
                times.append(now)
                offers[offer] = now
                verdicts[member] = False
        return verdicts

    async def forget(self, tenant: str, member: str) -> None:
        self._members.pop((tenant, member), None)
