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
  member, also when it reaches another device later as a replay (the
  stream entries counted within the window are remembered in memory).
  Sessions without a member are not capped.

Replays of these kinds (RESUME or SUBSCRIBE catching up on a P3 stream) go
through the same policy: skipped, never bypassed.  Cap counts are kept in
memory and written behind (:mod:`.writebehind`; namespace ``cap``, key
``<tenant>/<member>``, a JSON list of unix times within the window), loaded
at start.

In a fleet the counts are shared (:mod:`.caps`, ``caps_redis.py``): a
broadcast reaches the sessions without a member at once, and its members'
sessions once one call to the shared caps decided for all of them (a few
milliseconds later), so a member's devices on different workers and nodes
share one count and one offer counts once.  A stream's offers reach the
members' sessions in offset order: each waits for the one before it to be
pushed, whichever decision comes back first; a P3 message of another
kind on a stream whose offers wait reaches members' sessions after them
too.  A catch-up on resume asks the shared caps as well (an offer counted
for the member passes again; one capped stays capped), in the same order.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time

import orjson

from ..core.session import OPEN, fanout
from .config import parse_clock
from .directory import zone
from .host import ServiceHost
from .records import scan_all
from .writebehind import WriteBehind

log = logging.getLogger("tillwire.offers")

NS = "cap"
POLICY_KINDS = frozenset({"promo.offer", "member.notice"})
FLUSH_DELAY = 1.0            # seconds cap counts wait before they are written
RETRY_MAX = 30.0             # the longest wait between retries of refused writes
PASS, QUIET, CAPPED = 0, 1, 2


def _offer(stream, offset: int) -> str:
    """What the shared caps know a stream's offer by (live or replayed)."""
    return f"{stream.name}:{stream.epoch}:{offset}"


class Offers:
    """The offer policy of one node."""

    def __init__(self, host: ServiceHost, directory) -> None:
        self.host = host
        self.directory = directory
        cfg = host.cfg.offers
        start, end = parse_clock(cfg.quiet_start), parse_clock(cfg.quiet_end)
        self.quiet = (start, end) if start != end else None     # minutes after midnight
        self.cap_count = cfg.cap_count
        self.cap_window = cfg.cap_window
        self.counts: dict[tuple[str, str], list[float]] = {}    # (tenant, member) -> times
        # (tenant, member) -> {id(entry): (time counted, entry)}: the stream entries
        # (offers) counted within the window, so the same offer reaching another
        # device of the member later (a replay on resume) does not count again.
        # The entry is held so its id is not reused; at most cap_count each.
        self.counted: dict[tuple[str, str], dict[int, tuple[float, object]]] = {}
        # Members whose counts changed and are not written yet (FLUSH_DELAY
        # gathers the changes of a broadcast and the ones right after it).
        self.unsaved = WriteBehind(host, self._write, delay=FLUSH_DELAY, retry=FLUSH_DELAY,
                                   retry_max=RETRY_MAX, what="cap counts")
        self.caps = None          # a caps.Caps shared by a fleet (node.py sets it)
        # (A fleet) stream -> the task pushing its latest offer once the
        # shared caps decided: each waits for the one before it to push, so
        # a member's sessions get a stream's offers in offset order however
        # the caps' answers come back.
        self._pushing: dict[int, asyncio.Task] = {}

    async def load(self) -> None:
        """Load the cap counts still within the window (node start)."""
        now = time.time()
        horizon = now - self.cap_window
        async for key, value in scan_all(self.host.store.records, NS):
            tenant, _, member = key.partition("/")
            try:
                stamps = orjson.loads(value)
                if not isinstance(stamps, list) or \
                        not all(isinstance(t, (int, float)) for t in stamps):
                    raise ValueError("not a list of unix times")
            except ValueError as exc:
                # (one damaged record must not keep the node from starting)
                log.warning("cap record %r skipped: unreadable (%s)", key, exc)
                continue
            stamps = sorted(t for t in stamps if t > horizon)
            if stamps:
                self.counts[(tenant, member)] = stamps

    # -- the policy --------------------------------------------------------------------

    def in_quiet_hours(self, timezone: str, now: float) -> bool:
        """Is unix time ``now`` inside the quiet hours in the IANA zone ``timezone``?"""
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

    def _capped(self, tenant: str, member: str, now: float, members: dict,
                entry=None) -> bool:
        """Count one offer for the member, or say they had their cap (once per
        member per message: every device of the member gets the same answer;
        an ``entry`` already counted for the member within the window passes
        without counting again)."""
        key = (tenant, member)
        verdict = members.get(key)
        if verdict is not None:
            return verdict
        horizon = now - self.cap_window
        counted = self.counted.get(key)
        if counted:
            for ident in [i for i, (t, _) in counted.items() if t <= horizon]:
                del counted[ident]
            if entry is not None and id(entry) in counted:
                members[key] = False
                return False
        stamps = self.counts.get(key)
        if stamps is None:
            stamps = self.counts[key] = []
        while stamps and stamps[0] <= horizon:
            del stamps[0]
        verdict = len(stamps) >= self.cap_count
        if verdict:
            self.host.counters.offers_capped += 1     # (once per member per offer)
        else:
            stamps.append(now)
            self.unsaved.put(key)
            if entry is not None:
                if counted is None:
                    counted = self.counted[key] = {}
                counted[id(entry)] = (now, entry)
        members[key] = verdict
        return verdict

    def _verdict(self, claims, now: float, quiet: dict, members: dict, entry=None) -> int:
        if self.quiet is not None and "customer" in claims.roles and \
                self._quiet(claims.tenant, claims.store, now, quiet):
            return QUIET
        if claims.member and self.cap_count and \
                self._capped(claims.tenant, claims.member, now, members, entry):
            return CAPPED
        return PASS

    def fanout(self, tenant: str, groups, lane: int, frame: bytes, deadline: float, stream,
               dirty: list, report: dict | None) -> tuple[int, list]:
        """Push ``frame`` to the sessions of ``groups`` (all of ``tenant``: addresses
        never cross tenants) that pass; returns (delivered, overflowed sessions)
        and fills ``report`` {delivered, quiet, capped}.

        Quiet hours are cached by store.  Per session: an attribute read and
        a dict probe (a tuple and a list operation more for members); none
        while the tenant has no customer or member session open (tills only)."""
        quiet_on = self.quiet is not None
        capping = self.cap_count > 0
        if not ((quiet_on or capping) and self.host.hub.has_policy_sessions(tenant)):
            reached = 0
            overflow = []
            for group in groups:
                reached += len(group)
                overflow += fanout(group, lane, frame, None, deadline, stream, dirty)
            if report is not None:
                report.update(delivered=reached, quiet=0, capped=0)
            return reached, overflow
        now = time.time()
        quiet_cache: dict = {}
        members: dict = {}
        # The stream entry of this message (just appended; None if history keeps none).
        history = stream.history if stream is not None else None
        entry = history[-1] if history and history[-1].frame is frame else None
        shared = self.caps is not None and capping
        waiting: dict[str, list] = {}      # (shared caps) member -> its sessions here
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
                if capping and claims.member:
                    if shared:
                        waiting.setdefault(claims.member, []).append(conn)
                        continue
                    if self._capped(claims.tenant, claims.member, now, members, entry):
                        capped += 1
                        continue
                append(conn)
        overflow = fanout(passing, lane, frame, None, deadline, stream, dirty)
        if waiting:
            offer = _offer(stream, entry.offset) if entry is not None else f"frame:{hash(frame)}"
            self._in_turn(stream, lambda before: self._shared_fanout(
                tenant, waiting, offer, lane, frame, deadline, stream, before))
        if report is not None:
            report.update(delivered=len(passing), quiet=quiet, capped=capped)
        return len(passing), overflow

    def waiting(self, stream) -> bool:
        """Do offers of ``stream`` wait for the shared caps (or for the one
        before them) to reach members' sessions?"""
        return id(stream) in self._pushing

    def fanout_behind(self, groups, lane: int, frame: bytes, ckey, deadline: float, stream,
                      dirty: list) -> tuple[int, list]:
        """A P3 message of another kind on a stream whose offers wait for the
        shared caps: members' sessions get it after those offers (the SDK
        drops an entry older than one it has), the others now; returns
        (delivered, overflowed sessions) as :meth:`fanout`."""
        now, later = [], []
        for group in groups:
            for conn in group:
                (later if conn.claims.member else now).append(conn)
        overflow = fanout(now, lane, frame, ckey, deadline, stream, dirty)
        if later:
            self._in_turn(stream, lambda before: self._push_behind(
                later, lane, frame, ckey, deadline, stream, before))
        return len(now) + len(later), overflow

    def _in_turn(self, stream, work) -> None:
        """Run ``work(before)`` as the stream's latest push to members'
        sessions, ``before`` the push it must wait for (None: none)."""
        key = id(stream)
        task = self.host.spawn(work(self._pushing.get(key)))
        self._pushing[key] = task
        task.add_done_callback(lambda done: self._pushed(key, done))

    async def _push_behind(self, conns: list, lane: int, frame: bytes, ckey, deadline: float,
                           stream, before: asyncio.Task) -> None:
        await asyncio.wait([before])        # (its outcome is its own: spawn logs it)
        for conn in conns:
            if conn.state == OPEN:
                conn.push(lane, frame, ckey, deadline, stream)
                self.host.mark_dirty(conn)

    def _pushed(self, key: int, task: asyncio.Task) -> None:
        if self._pushing.get(key) is task:
            del self._pushing[key]

    async def _shared_fanout(self, tenant: str, waiting: dict, offer: str, lane: int,
                             frame: bytes, deadline: float, stream,
                             before: asyncio.Task | None) -> None:
        """Push an offer to the members' sessions the shared caps let it reach,
        after the stream's offer before it (``before``) was pushed."""
        try:
            capped = await self.caps.take(tenant, waiting, offer, time.time(), self.cap_count,
                                          self.cap_window)
        except Exception as exc:  # noqa: BLE001 - offers must not spam: none this time
            log.warning("caps: deciding offer %s for %d members failed (%s); not sent to them",
                        offer, len(waiting), exc)
            return
        finally:
            if before is not None:
                await asyncio.wait([before])     # (its outcome is its own: spawn logs it)
        for member, conns in waiting.items():
            if capped.get(member, True):
                self.host.counters.offers_capped += 1     # (once per member per offer)
                continue
            for conn in conns:
                if conn.state == OPEN:
                    conn.push(lane, frame, None, deadline, stream)
                    self.host.mark_dirty(conn)

    def filter_replay(self, conn, stream, entries: list, replay) -> list:
        """The entries of a P3 catch-up this session may get now.

        In a fleet a member's offers are the shared caps' to decide, as live
        ones are: from the catch-up's first offer on, its entries go out one
        by one through ``replay(entry)`` (False: the session's queue is
        full) once each offer is decided, in offset order (the SDK drops an
        entry older than one it has), after the stream's live offers being
        decided, and before the ones that come next.  An offer the member
        was counted for already (on any device, on any worker) passes
        without counting again."""
        now = time.time()
        quiet_cache: dict = {}
        claims = conn.claims
        shared = self.caps is not None and self.cap_count and claims.member
        out = []
        for k, e in enumerate(entries):
            if e.kind not in POLICY_KINDS:
                out.append(e)
            elif shared:
                rest = entries[k:]
                self._in_turn(stream, lambda before: self._replay_shared(
                    conn, stream, rest, replay, before))
                break
            elif self._verdict(claims, now, quiet_cache, {}, e) == PASS:
                out.append(e)
        return out

    async def _replay_shared(self, conn, stream, entries: list, replay,
                             before: asyncio.Task | None) -> None:
        if before is not None:
            await asyncio.wait([before])     # (its outcome is its own: spawn logs it)
        claims = conn.claims
        quiet_cache: dict = {}
        refused = False
        for e in entries:
            if conn.state != OPEN:
                return
            if e.kind in POLICY_KINDS:
                now = time.time()
                if refused or (self.quiet is not None and "customer" in claims.roles
                               and self._quiet(claims.tenant, claims.store, now, quiet_cache)):
                    continue
                offer = _offer(stream, e.offset)
                try:
                    capped = await self.caps.take(claims.tenant, (claims.member,), offer, now,
                                                  self.cap_count, self.cap_window)
                except Exception as exc:  # noqa: BLE001 - offers must not spam: none this time
                    log.warning("caps: deciding the replayed offer %s for %s failed (%s); its "
                                "offers are not sent", offer, conn.address, exc)
                    refused = True
                    continue
                if conn.state != OPEN:
                    return
                if capped.get(claims.member, True):
                    self.host.counters.offers_capped += 1
                    continue
            if not replay(e):
                return

    # -- cap persistence (write-behind) ------------------------------------------------------

    async def _write(self, key: tuple[str, str], _value) -> None:
        """Write a member's current counts (none left: delete the record)."""
        stamps = self.counts.get(key)
        name = f"{key[0]}/{key[1]}"
        if stamps:
            await self.host.store.records.put(NS, name, orjson.dumps(stamps), time.time())
        else:
            await self.host.store.records.delete(NS, name)

    async def flush(self) -> None:
        """Write the changed cap counts now (also at stop); raises if the store
        refuses one (it stays due: the next flush writes it)."""
        await self.unsaved.flush()

    def forget_member_here(self, tenant: str, member: str) -> None:
        """Drop what this worker holds in memory of a member's offer cap."""
        key = (tenant, member)
        self.counts.pop(key, None)
        self.counted.pop(key, None)
        self.unsaved.discard(key)

    async def forget_member(self, tenant: str, member: str) -> int:
        if self.caps is not None:
            await self.caps.forget(tenant, member)
        self.forget_member_here(tenant, member)
        return int(await self.host.store.records.delete(NS, f"{tenant}/{member}"))

    async def expire(self, now: float) -> int:
        """Drop members whose counts all left the window (memory), and the
        records last written before it (store); returns how many records went."""
        horizon = now - self.cap_window
        for key in [k for k, s in self.counts.items() if not s or s[-1] <= horizon]:
            del self.counts[key]
            self.counted.pop(key, None)
            self.unsaved.discard(key)
        return await self.host.store.records.expire(NS, horizon - 2 * FLUSH_DELAY)
