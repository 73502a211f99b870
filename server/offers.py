"""Member offers that don't spam: the policy of P3 ``promo.offer`` and ``member.notice``.

``Node.broadcast`` fans a message of these kinds out only to the sessions
that pass the policy (the same encoded frame to each):

* quiet hours: a customer's session (role ``customer``: a person's phone)
  whose store's local time (the directory's time zone of ``claims.store``)
  is inside [``offers.quiet_start``, ``offers.quiet_end``) is skipped; the
  window spans midnight when start > end; start == end means no quiet hours.
  Decided once per store per broadcast.  Tills, kiosks and staff devices get
  offers at any hour (they show them in the store, they wake nobody).
* frequency cap: a member (a session with ``claims.member``) gets at most
  ``offers.cap_count`` offers per sliding ``offers.cap_window``; every
  device of a member shares the count, and one broadcast counts once per
  member.  Sessions without a member are not capped.

Replays of these kinds (RESUME or SUBSCRIBE catching up on a P3 stream) go
through the same policy: skipped, never bypassed.  Cap counts are kept in
memory and written behind (namespace ``cap``, key ``<tenant>/<member>``, a
JSON list of unix times within the window), loaded at start.
"""

from __future__ import annotations

import datetime
import logging
import time

import orjson

from ..core.session import fanout
from .config import parse_clock
from .directory import zone

log = logging.getLogger("tillwire.offers")

NS = "cap"
POLICY_KINDS = frozenset({"promo.offer", "member.notice"})
FLUSH_DELAY = 1.0            # seconds cap counts wait before they are written
PASS, QUIET, CAPPED = 0, 1, 2


class Offers:
    """The offer policy of one node."""

    def __init__(self, node, directory) -> None:
        self.node = node
        self.directory = directory
        cfg = node.cfg.offers
        start, end = parse_clock(cfg.quiet_start), parse_clock(cfg.quiet_end)
        self.quiet = (start, end) if start != end else None     # minutes after midnight
        self.cap_count = cfg.cap_count
        self.cap_window = cfg.cap_window
        self.counts: dict[tuple[str, str], list[float]] = {}    # (tenant, member) -> times
        self._dirty: set[tuple[str, str]] = set()
        self._flush_handle = None

    async def load(self) -> None:
        now = time.time()
        horizon = now - self.cap_window
        after = ""
        while True:
            rows = await self.node.store.kv_scan(NS, "", after, 1000)
            for key, value in rows:
                tenant, _, member = key.partition("/")
                stamps = [t for t in orjson.loads(value) if t > horizon]
                if stamps:
                    self.counts[(tenant, member)] = stamps
            if len(rows) < 1000:
                return
            after = rows[-1][0]

    # -- the policy --------------------------------------------------------------------

    def in_quiet_hours(self, timezone: str, now: float) -> bool:
        if self.quiet is None:
            return False
        local = datetime.datetime.fromtimestamp(now, zone(timezone))
        minute = local.hour * 60 + local.minute
        start, end = self.quiet
        if start < end:
            return start <= minute < end
        return minute >= start or minute < end

    def _quiet(self, tenant: str, store: str, now: float, cache: dict) -> bool:
        """Is the store in its quiet hours now (decided once per store per call)?"""
        q = cache.get(store)
        if q is None:
            q = cache[store] = self.in_quiet_hours(self.directory.timezone(tenant, store), now)
        return q

    def _capped(self, tenant: str, member: str, now: float, members: dict) -> bool:
        """Count one offer for the member, or say they had their cap (once per
        member per message: every device of the member gets the same answer)."""
        key = (tenant, member)
        verdict = members.get(key)
        if verdict is not None:
            return verdict
        stamps = self.counts.get(key)
        if stamps is None:
            stamps = self.counts[key] = []
        horizon = now - self.cap_window
        while stamps and stamps[0] <= horizon:
            del stamps[0]
        verdict = len(stamps) >= self.cap_count
        if not verdict:
            stamps.append(now)
            self._mark(key)
        members[key] = verdict
        return verdict

    def _verdict(self, claims, now: float, quiet: dict, members: dict) -> int:
        if self.quiet is not None and "customer" in claims.roles and \
                self._quiet(claims.tenant, claims.store, now, quiet):
            return QUIET
        if claims.member and self.cap_count and \
                self._capped(claims.tenant, claims.member, now, members):
            return CAPPED
        return PASS

    def fanout(self, groups, lane: int, frame: bytes, deadline: float, stream, dirty: list,
               report: dict | None) -> tuple[int, list]:
        """Push ``frame`` to the sessions of ``groups`` that pass; returns (delivered,
        overflowed sessions) and fills ``report`` {delivered, quiet, capped}.

        Every session of one message is of the same tenant (addresses never
        cross tenants), so quiet hours are cached by store alone.  Per
        session: an attribute read and a dict probe (a tuple and a list
        operation more for members)."""
        now = time.time()
        quiet_on = self.quiet is not None
        capping = self.cap_count > 0
        quiet_cache: dict = {}
        members: dict = {}
        passing = []
        append = passing.append
        quiet = capped = 0
        for group in groups:
            for conn in group:
                claims = conn.claims
                if quiet_on and "customer" in claims.roles:
                    q = quiet_cache.get(claims.store)
                    if q is None:
                        q = self._quiet(claims.tenant, claims.store, now, quiet_cache)
                    if q:
                        quiet += 1
                        continue
                if capping and claims.member and \
                        self._capped(claims.tenant, claims.member, now, members):
                    capped += 1
                    continue
                append(conn)
        overflow = fanout(passing, lane, frame, None, deadline, stream, dirty)
        if report is not None:
            report.update(delivered=len(passing), quiet=quiet, capped=capped)
        return len(passing), overflow

    def filter_replay(self, conn, entries: list) -> list:
        """The entries of a P3 catch-up this session may get now."""
        now = time.time()
        quiet_cache: dict = {}
        out = []
        for e in entries:
            if e.kind not in POLICY_KINDS or \
                    self._verdict(conn.claims, now, quiet_cache, {}) == PASS:
                out.append(e)
        return out

    # -- cap persistence (write-behind) ------------------------------------------------------

    def _mark(self, key: tuple[str, str]) -> None:
        self._dirty.add(key)
        if self._flush_handle is None:
            self._flush_handle = self.node.loop.call_later(FLUSH_DELAY, self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_handle = None
        self.node._spawn(self.flush())

    async def flush(self) -> None:
        """Write the changed cap counts (also at stop)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        dirty, self._dirty = self._dirty, set()
        store = self.node.store
        now = time.time()
        for key in dirty:
            stamps = self.counts.get(key)
            name = f"{key[0]}/{key[1]}"
            if stamps:
                await store.kv_put(NS, name, orjson.dumps(stamps), now)
            else:
                await store.kv_delete(NS, name)

    async def forget_member(self, tenant: str, member: str) -> int:
        key = (tenant, member)
        self.counts.pop(key, None)
        self._dirty.discard(key)
        return int(await self.node.store.kv_delete(NS, f"{tenant}/{member}"))

    async def expire(self, now: float) -> int:
        """Drop members whose counts all left the window (memory), and the
        records last written before it (store); returns how many records went."""
        horizon = now - self.cap_window
        for key in [k for k, s in self.counts.items() if not s or s[-1] <= horizon]:
            del self.counts[key]
            self._dirty.discard(key)
        return await self.node.store.kv_expire(NS, horizon - 2 * FLUSH_DELAY)
