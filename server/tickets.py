"""Cashier exception tickets: a till's problem reaches the staff on duty.

A terminal SENDs ``ticket.open`` (P1) to an address of its own store; the
node hands it here instead of routing it (``Node._on_send``).  The ticket
gets an id and then either

* an auto-reply rule matches its code (``tickets.auto_replies``, the
  tenant's own rule before ``"*"``): it is resolved at once and the opener
  gets ``ticket.resolve {ticket, resolution, auto: true}``; staff never see
  it; or
* the body plus ``{ticket, from}`` goes, durably, to the store's on-duty
  terminals (the directory's roster, else ``role:<t>/<store>/staff``) and an
  escalation is due ``tickets.escalate_after`` seconds later.

Only the store's own devices (tills, kiosks, staff, managers; backends for
any store) open tickets.  ``ticket.assign`` / ``ticket.reply`` /
``ticket.resolve`` from the store's staff are stored and routed like any
message (to the opener) and update the ticket.  The first assignment wins:
staff assigning a ticket someone else has are refused (the assignee may
hand it over, a manager or backend may reassign it).  A resend (same sender and ref)
of an open or of an update already taken is answered like the first one,
never applied twice (an update also after a restart: a record keeps the
(sender, ref, kind) of its newest RECORD_REFS updates, loaded at start); an
open resent while the first is still being stored waits for its answer.  A
ticket still unassigned and unresolved at its due time is escalated:
``ticket.escalate {ticket, code, from, reason, store, level}`` climbs until
someone is there: the store's managers (the directory's, else
``role:<t>/<store>/manager``, level ``store``), else the managers of the
opener's region (level ``region``), else ``tickets.escalate_role`` across the
tenant (level ``tenant``).

A ticket never reaches no one silently.  Opened while the store has no one
on duty (no roster and no staff), it is stored for no one, the opener's
SENDACK says ``{"ticket", "recipients": 0, "waiting": true}``, and it waits:
the first terminal that logs in as staff or manager of that store, or the
terminals put on the store's on-duty list (``PUT /v1/stores``), get it
(:meth:`Tickets.on_login`, :meth:`Tickets.on_roster`), unless its
escalation reached someone first.  An escalation that
finds no one at any level leaves the ticket open and *unattended* (counted,
listed by ``GET /v1/tickets``) and tries again ``tickets.escalate_after``
later.

Nothing changes before its message is committed: a ticket exists (in
memory, armed, its record due) only once the store took its ticket.open (or
auto-reply), and an update or escalation changes the ticket only once the
store took it.  If the store refuses, nothing changed: the terminal gets
``STORE_UNAVAILABLE`` and may resend the same SEND (a new try, applied once).
The updates and escalations of one ticket take turns (:mod:`.turns`): each is
checked against what the ones before it committed, so of two staff assigning
a free ticket the first committed has it and the second is refused.

Every ticket is a key-value record (namespace ``ticket``, key
``<tenant>/<ticket>``, JSON); the unresolved ones are also kept in memory
(one dict entry each) with their escalation timer, and are loaded and
re-armed at start, so escalations survive a restart (a due time already past
fires right after start).  Records are written behind (:mod:`.writebehind`):
one stays due until a write of it, unchanged since, succeeded (a refused
write is retried from RETRY_DELAY on, backing off to RETRY_MAX, each
maintenance round and at stop); a ticket whose message the store took is
kept even if its record write failed.  An escalation marks the
ticket escalated only once its message is stored (refused: the ticket stays
open and escalation is tried again RETRY_DELAY later); stopping cancels the
timers first, so a ticket due then escalates after the next start.

In a fleet (workers sharing the records, ``host.shared_registry``) a
ticket opened on one worker is handled from any: an update on a worker
that does not hold the ticket reads its record first, and every update and
escalation reads it again at the start of its turn (an assignment or a
resolution made elsewhere counts).  The first assignment is claimed once
(``Records.put_new``, namespace ``ticketassign``): of two staff on two
workers assigning a free ticket, one has it; a manager's reassignment
replaces the claim.  Each escalation is claimed once (namespace
``ticketesc``, key ``<tenant>/<ticket>/<due>``), so the workers that hold
the ticket (every worker loads the unresolved ones at start) escalate it
once.  Every record written is announced to the other workers
(``ServiceHost.ticket_changed``), which read it again (:meth:`Tickets.refresh`):
a ticket waiting for staff goes to the first staff who logs in on any
worker (claimed once, namespace ``tickethand``: staff logging in on two
workers at once do not both get it), and every worker lists the open
tickets alike.  Two updates of one ticket on two workers at the same moment may
still write its record in either order (its reply count, say); its
assignment and escalation never.

Retention: every record carries ``updated``, the time of its last change
(opened, assigned, replied to, escalated, resolved), which is also the time
its key-value record is stored with.  :meth:`Tickets.expire` (each node
maintenance round) deletes the tickets, resolved or not, last changed more
than ``retention.tickets`` seconds ago, from memory and from the store; an
update naming one afterwards is refused like an unknown ticket.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import time

import orjson

from ..core.codes import Code, Flag, Lane
from ..core.errors import UnknownTerminal
from .address import parse_address, terminal_address
from .host import ServiceHost, commit
from .kinds import MessageError
from .records import scan_all
from .store import NewMessage
from .turns import Turns
from .writebehind import WriteBehind

log = logging.getLogger("tillwire.tickets")

NS = "ticket"
ASSIGN_NS = "ticketassign"       # the first assignment's claim (a fleet)
ESCALATE_NS = "ticketesc"        # each escalation's claim (a fleet)
HANDOVER_NS = "tickethand"       # a waiting ticket's hand-over claim (a fleet)
SENDER = "service:tickets"       # the sender of auto-replies and escalations
OPEN, ASSIGNED, ESCALATED, RESOLVED = "open", "assigned", "escalated", "resolved"
UPDATE_KINDS = frozenset({"ticket.assign", "ticket.reply", "ticket.resolve"})
STAFF_ROLES = frozenset({"staff", "manager", "backend"})
# Who opens tickets: the store's own devices (a customer's phone or a service
# agent reaching role:<t>/<store>/service must not page the store's staff).
OPENER_ROLES = frozenset({"pos", "kiosk", "staff", "manager", "backend"})
RECENT_REFS = 65536              # (sender, ref) remembered for resends, per table
RECORD_REFS = 32                 # (sender, ref, kind) of applied updates kept in a record
RETRY_DELAY = 1.0                # seconds before a refused record write or escalation is retried
RETRY_MAX = 30.0                 # the longest wait between retries of refused record writes

# What an unresolved record needs to be routed, updated and escalated.
_RECORD_KEYS = frozenset({"ticket", "tenant", "store", "code", "from", "status", "due",
                          "assignee", "replies", "msg_id"})

_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_RECEIPT_REQUESTED = int(Flag.RECEIPT_REQUESTED)
_ACK_REQUESTED = int(Flag.ACK_REQUESTED)


def _base36(n: int) -> str:
    out = []
    while True:
        n, r = divmod(n, 36)
        out.append(_B36[r])
        if not n:
            return "".join(reversed(out))


def _remember(table: collections.OrderedDict, key, value) -> None:
    """Put into a bounded table (the oldest entry goes past RECENT_REFS)."""
    table[key] = value
    if len(table) > RECENT_REFS:
        table.popitem(last=False)


def last_change(rec: dict) -> float:
    """When a record last changed: ``updated``, or for a record written before
    that field existed, its latest timestamp (created, escalated, resolved)."""
    updated = rec.get("updated")
    if updated is not None:
        return float(updated)
    return max(float(rec.get(name) or 0.0) for name in ("created", "escalated_at", "resolved_at"))


def auto_ref(opener: str, ref: int) -> int:
    """The ref of the auto-reply to the ticket.open ``ref`` of ``opener``
    (0 without one): a 63-bit hash of both, so the store's dedup window
    knows a resend of the open wherever it comes."""
    if not ref:
        return 0
    digest = hashlib.blake2b(f"{opener}\n{ref}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1 or 1


def new_ticket_id(now: float) -> str:
    """``T-<base36 unix ms>-<4 hex>``: sortable by creation, unique in practice."""
    return f"T-{_base36(int(now * 1000))}-{os.urandom(2).hex()}"


class Tickets:
    """The ticket service of one node."""

    def __init__(self, host: ServiceHost, directory) -> None:
        self.host = host
        self.directory = directory
        cfg = host.cfg.tickets
        self.escalate_after = cfg.escalate_after
        self.escalate_role = cfg.escalate_role
        self.retention = host.cfg.retention.tickets
        # (tenant or "*", code) -> reply
        self.rules = {(r.tenant, r.code): r.reply for r in cfg.auto_replies}
        self.open: dict[str, dict] = {}           # "<tenant>/<ticket>" -> unresolved record
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # (opener, ref) -> future of (msg_id, doc) answering a ticket.open (pending
        # while the first SEND is being stored: a resend waits for that answer).
        self._recent: collections.OrderedDict = collections.OrderedDict()
        # (sender, ref) -> (kind, key) of an update already applied: a resend is
        # routed as usual (the store's dedup answers it), never applied twice.
        self._updates: collections.OrderedDict = collections.OrderedDict()
        # The updates and escalations of one ticket run one at a time, in the
        # order they came: each is checked against what the ones before it
        # committed (two staff assigning: the first committed has it).
        self._turns = Turns(host.loop)
        # Records changed and not written yet ("<tenant>/<ticket>" -> record).
        self.unsaved = WriteBehind(host, self._write, retry=RETRY_DELAY, retry_max=RETRY_MAX,
                                   what="ticket records")
        self._closed = False          # stopping: no timer is armed any more
        # (tenant, store) -> keys of its open tickets that reached no terminal
        # yet (no one on duty when opened): the next staff login gets them.
        self.waiting: dict[tuple[str, str], set[str]] = {}
        # Keys of open tickets whose last escalation found no one at any level.
        self.unattended: set[str] = set()

    # -- lifecycle ---------------------------------------------------------------------

    async def load(self) -> None:
        """Load the unresolved tickets and re-arm their escalation timers."""
        async for key, value in scan_all(self.host.store.records, NS):
            try:
                rec = orjson.loads(value)
                if not isinstance(rec, dict) or (rec.get("status") != RESOLVED and
                                                 not _RECORD_KEYS.issubset(rec)):
                    raise ValueError("not a ticket record")
                float(rec.get("due", 0.0))
                last_change(rec)
            except (ValueError, TypeError) as exc:
                # (one damaged record must not keep the node from starting)
                log.warning("ticket record %r skipped: unreadable (%s)", key, exc)
                continue
            self._load_refs(key, rec)
            if rec.get("status") != RESOLVED:
                rec.setdefault("updated", last_change(rec))
                self.open[key] = rec
                if rec["status"] == OPEN:
                    self._arm(key, rec["due"])
                self._track(key, rec)
        if self.open:
            log.info("tickets loaded unresolved=%d", len(self.open))

    def _load_refs(self, key: str, rec: dict) -> None:
        """Remember the updates a stored record says were applied (a resend after
        a restart is then answered as a duplicate, never applied twice)."""
        refs = rec.get("refs")
        if not isinstance(refs, list):
            return
        for item in refs:
            if isinstance(item, list) and len(item) == 3:
                sender, ref, kind = item
                _remember(self._updates, (sender, ref), (kind, key))

    def close(self) -> None:
        """Stopping: cancel the escalation timers; none is armed again."""
        self._closed = True
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()

    async def flush(self) -> None:
        """Write the records still due (at stop); raises if the store refuses
        one (it stays due)."""
        await self.unsaved.flush()

    async def get(self, tenant: str, ticket: str) -> dict | None:
        """A ticket's record (a copy without its resend memory), or None if unknown."""
        key = f"{tenant}/{ticket}"
        rec = self.open.get(key) or self.unsaved.get(key)    # (not yet written)
        if rec is None:
            raw = await self.host.store.records.get(NS, key)
            if raw is None:
                return None
            rec = orjson.loads(raw)
        return {k: v for k, v in rec.items() if k != "refs"}

    # -- ticket.open -------------------------------------------------------------------

    def on_open(self, conn, frame, address, body: dict) -> bool:
        """Take a ticket.open (validated, allowed by the ACL); always consumes it."""
        host = self.host
        claims = conn.claims
        if not OPENER_ROLES.intersection(claims.roles):
            raise MessageError(Code.FORBIDDEN,
                               "ticket.open: tickets are opened by the store's tills, kiosks, "
                               "staff and managers", "kind")
        tenant, store = claims.tenant, claims.store
        if address.scope in ("store", "role") and address.path[0] != "*" and \
                "backend" in claims.roles:
            store = address.path[0]           # a backend opens tickets for any store
        if address.scope not in ("store", "role") or address.path[0] != store:
            raise MessageError(Code.BAD_MESSAGE,
                               f"ticket.open: to: {address} is not an address of the opener's "
                               f"store (e.g. role:{tenant}/{store}/staff)", "to")
        opener = conn.address
        ref = frame.ref
        asked = bool(frame.flags & _ACK_REQUESTED)
        answered = None
        if ref:
            known = self._recent.get((opener, ref))
            if known is not None:             # a resend of an open already taken
                if known.done():
                    msg_id, doc = known.result()
                    host.service_ack(conn, ref, msg_id, doc, retransmit=True, asked=asked)
                else:                         # ... and still being stored
                    host.spawn(self._answer_resend(conn, ref, known, asked))
                return True
            answered = host.loop.create_future()
            _remember(self._recent, (opener, ref), answered)
        now = time.time()
        tid = new_ticket_id(now)
        rec = {"ticket": tid, "tenant": tenant, "store": store, "code": body["code"],
               "text": body.get("text", ""), "from": opener, "ref": ref, "status": OPEN,
               "auto": False, "created": now, "due": 0.0, "assignee": "", "resolution": "",
               "escalated_at": 0.0, "resolved_at": 0.0, "resolved_by": "", "replies": 0,
               "msg_id": 0, "updated": now, "region": claims.region, "recipients": 0,
               "unattended": False, "level": ""}
        ttl = frame.ttl / 1000.0 if frame.ttl else host.cfg.delivery.p1_ttl
        reply = self.rules.get((tenant, rec["code"]))
        if reply is None:
            reply = self.rules.get(("*", rec["code"]))
        if reply is not None:
            rec.update(status=RESOLVED, auto=True, resolution=reply, resolved_at=now,
                       resolved_by=SENDER)
            out = orjson.dumps({"ticket": tid, "resolution": reply, "auto": True})
            # (Its ref comes from the open's: a resend of the open, on any
            # worker or after a restart, is a duplicate in the store's dedup.)
            msg = NewMessage(tenant, SENDER, auto_ref(opener, ref), Lane.P1, "ticket.resolve",
                             opener, out, now, now + ttl, False)
            to = parse_address(opener)
        else:
            rec["due"] = now + self.escalate_after
            out = orjson.dumps({**body, "ticket": tid, "from": opener})
            msg = NewMessage(tenant, opener, ref, Lane.P1, "ticket.open", str(address), out,
                             now, now + ttl, bool(frame.flags & _RECEIPT_REQUESTED))
            to = address
        host.spawn(self._open(conn, ref, rec, msg, to, answered, asked))
        return True

    async def _answer_resend(self, conn, ref: int, answered, asked: bool = True) -> None:
        """A resend of an open still being stored gets the first one's answer."""
        result = await answered
        if result is None:
            self.host.service_error(conn, ref, Code.STORE_UNAVAILABLE,
                                    "the ticket could not be stored; retry")
        else:
            self.host.service_ack(conn, ref, result[0], result[1], retransmit=True,
                                  asked=asked)

    async def _open(self, conn, ref: int, rec: dict, msg: NewMessage, to, answered,
                    asked: bool) -> None:
        """Store the ticket's message (to the staff, or the auto-reply to the
        opener), then answer the opener.

        The ticket comes into being only once the message is committed: then
        it is kept (open and armed, or resolved), its record is due, and the
        answer waits for the record's first write (a refused one is retried:
        a ticket whose message the store took is kept).  Refused: nothing
        changed, the opener is told to retry, and a retry opens it afresh."""
        host = self.host
        key = f"{rec['tenant']}/{rec['ticket']}"
        try:
            recipients = None if rec["auto"] else await self.staff(rec["tenant"], rec["store"])
            accepted = await commit(host, msg, to, recipients)
        except Exception as exc:  # noqa: BLE001 - not stored: nothing was promised
            log.error("ticket %s could not be stored: %s", key, exc)
            if answered is not None:
                if self._recent.get((conn.address, ref)) is answered:
                    del self._recent[(conn.address, ref)]
                answered.set_result(None)
            host.service_error(conn, ref, Code.STORE_UNAVAILABLE,
                               "the ticket could not be stored; retry")
            return
        if accepted.duplicate:
            # The same (opener, ref) was stored before (a resend across a
            # restart, or on another worker): no new ticket; answer with the
            # original one.
            try:
                doc = await self._original(rec["tenant"], accepted.msg_id)
            except Exception as exc:  # noqa: BLE001 - not read: the id is not known here
                log.error("ticket %s: the original of a resend could not be read: %s", key, exc)
                doc = {}
            if answered is not None:
                answered.set_result((accepted.msg_id, doc))
            host.service_ack(conn, ref, accepted.msg_id, doc, retransmit=True, asked=asked)
            return
        events = host.counters.tickets
        events["opened"] += 1
        rec["msg_id"] = accepted.msg_id
        if rec["auto"]:
            events["resolved"] += 1
            doc = {"ticket": rec["ticket"], "auto_reply": True}
        else:
            if not accepted.seqs:
                events["unattended"] += 1         # no staff to receive it
            rec["recipients"] = len(accepted.seqs)
            self.open[key] = rec
            self._arm(key, rec["due"])
            self._track(key, rec)
            doc = {"ticket": rec["ticket"], "recipients": rec["recipients"]}
            if not rec["recipients"]:
                doc["waiting"] = True         # (the first staff login gets it)
                log.warning("ticket %s waits: no one on duty in store %s/%s", rec["ticket"],
                            rec["tenant"], rec["store"])
        self.unsaved.put(key, rec)
        await self.unsaved.written(key)
        if answered is not None:
            answered.set_result((accepted.msg_id, doc))
        host.service_ack(conn, ref, accepted.msg_id, doc, asked=asked)

    async def _original(self, tenant: str, msg_id: int) -> dict:
        """The answer to a resend of the ticket.open whose message is
        ``msg_id``: the ticket's id (and ``auto_reply``), from memory, else
        from the records (the ticket opened on another worker, or before a
        restart; resolved since); {} when no record names it."""
        found = next((r for r in self.open.values() if r["msg_id"] == msg_id), None)
        if found is None:
            async for _, value in scan_all(self.host.store.records, NS, tenant + "/"):
                rec = orjson.loads(value)
                if isinstance(rec, dict) and rec.get("msg_id") == msg_id:
                    found = rec
                    break
        if found is None:
            return {}
        return {"ticket": found["ticket"], "auto_reply": True} if found.get("auto") else \
            {"ticket": found["ticket"]}

    def _forget(self, key: str) -> None:
        rec = self.open.pop(key, None)
        if rec is not None:
            self._untrack(key, rec)
        handle = self._timers.pop(key, None)
        if handle is not None:
            handle.cancel()

    # -- tickets that reached no one -------------------------------------------------------

    def _track(self, key: str, rec: dict) -> None:
        """Index an open ticket that reached no terminal yet (not assigned nor
        escalated either), or is unattended.  (A record from before these
        fields existed counts as delivered.)"""
        if not rec.get("recipients", 1) and rec["status"] == OPEN:
            self.waiting.setdefault((rec["tenant"], rec["store"]), set()).add(key)
        if rec.get("unattended"):
            self.unattended.add(key)

    def _untrack(self, key: str, rec: dict) -> None:
        group = (rec["tenant"], rec["store"])
        keys = self.waiting.get(group)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.waiting[group]
        self.unattended.discard(key)

    def on_login(self, address: str, claims) -> None:
        """A terminal logged in (at its RESUME): staff or a manager of a store with waiting
        tickets gets them.  O(1) unless it does."""
        if not self.waiting or self._closed:
            return
        keys = self.waiting.get((claims.tenant, claims.store))
        if keys and ("staff" in claims.roles or "manager" in claims.roles):
            for key in sorted(keys):
                self.host.spawn(self._hand_over(key, [address]))

    async def on_roster(self, tenant: str, store: str) -> None:
        """The store's on-duty list changed: its waiting tickets go to the terminals
        on it (if any)."""
        keys = self.waiting.get((tenant, store))
        if not keys or self._closed:
            return
        recipients = await self.staff(tenant, store)
        if recipients:
            for key in sorted(keys):
                await self._hand_over(key, recipients)

    async def _hand_over(self, key: str, recipients: list[str]) -> None:
        """In the ticket's turn: store a waiting ticket's ticket.open for
        ``recipients``.  Refused by the store: it stays waiting (the next login,
        roster change or escalation tries again)."""
        before, mine = self._turns.take(key)
        try:
            if before is not None:
                await before
            rec = self.open.get(key)
            if rec is None or rec.get("recipients", 1) or rec["status"] != OPEN or self._closed:
                return                # (no longer waiting: delivered, assigned, escalated)
            host = self.host
            now = time.time()
            if host.shared_registry and not await self._claim_hand_over(key):
                return                # (another worker hands it over)
            body = {"code": rec["code"], "ticket": rec["ticket"], "from": rec["from"]}
            if rec.get("text"):
                body["text"] = rec["text"]
            to = f"role:{rec['tenant']}/{rec['store']}/staff"
            msg = NewMessage(rec["tenant"], rec["from"], 0, Lane.P1, "ticket.open", to,
                             orjson.dumps(body), now, now + host.cfg.delivery.p1_ttl, False)
            try:
                accepted = await commit(host, msg, parse_address(to), recipients)
            except Exception as exc:  # noqa: BLE001 - not stored: it stays waiting
                log.error("waiting ticket %s could not be stored for %s: %s", key, recipients,
                          exc)
                if host.shared_registry:
                    await self._unclaim_hand_over(key)
                return
            if self.open.get(key) is not rec:
                return                # resolved or deleted meanwhile
            self._untrack(key, rec)
            rec.update(recipients=len(accepted.seqs), unattended=False, updated=time.time())
            self._track(key, rec)
            self.unsaved.put(key, rec)
            log.info("waiting ticket delivered ticket=%s store=%s/%s recipients=%d",
                     rec["ticket"], rec["tenant"], rec["store"], rec["recipients"])
        finally:
            self._turns.done(key, mine)

    async def _claim_hand_over(self, key: str) -> bool:
        """(A fleet) whether this worker hands waiting ticket ``key`` over:
        staff logging in on two workers at once must not both get it.  A
        loser reads the ticket again (the winner's record follows)."""
        records = self.host.store.records
        mine = self.host.worker_name.encode()
        try:
            won = await records.put_new(HANDOVER_NS, key, mine, time.time()) == mine
            if not won:
                await self._refresh(key)
        except Exception as exc:  # noqa: BLE001 - it stays waiting: the next login tries
            log.error("waiting ticket %s: its hand-over could not be claimed: %s", key, exc)
            return False
        return won

    async def _unclaim_hand_over(self, key: str) -> None:
        """(A fleet) a hand-over whose message was not stored gives its claim
        back: the next login, roster change or escalation tries again."""
        try:
            await self.host.store.records.delete(HANDOVER_NS, key)
        except Exception as exc:  # noqa: BLE001 - the store is down: retention ends it
            log.error("waiting ticket %s: the claim of a failed hand-over stays: %s", key, exc)

    def list_open(self, tenant: str, store: str | None = None,
                  unattended: bool = False) -> list[dict]:
        """The open tickets of ``tenant`` (of one store; only the unattended),
        sorted by id (= by creation), without their resend memory.  O(open
        tickets)."""
        keys = self.unattended if unattended else self.open
        found = []
        for key in keys:
            rec = self.open.get(key)
            if rec is None or rec["tenant"] != tenant or (store and rec["store"] != store):
                continue
            found.append({k: v for k, v in rec.items() if k not in ("refs", "ref")})
        found.sort(key=lambda r: r["ticket"])
        return found

    async def staff(self, tenant: str, store: str) -> list[str]:
        """Who gets a store's tickets: the on-duty roster, else its staff role."""
        info = self.directory.get(tenant, store)
        if info.on_duty:
            return [terminal_address(tenant, t) for t in info.on_duty]
        return await self.host.members(parse_address(f"role:{tenant}/{store}/staff"))

    async def managers(self, tenant: str, store: str) -> list[str]:
        """Who gets a store's escalations: its listed managers, else its manager role."""
        info = self.directory.get(tenant, store)
        if info.managers:
            return [terminal_address(tenant, t) for t in info.managers]
        return await self.host.members(parse_address(f"role:{tenant}/{store}/manager"))

    # -- assign, reply, resolve ------------------------------------------------------------

    def on_update(self, conn, frame, address, body: dict) -> bool:
        """Take a ticket.assign / reply / resolve: stored and routed like any
        message (to the address it names, usually the opener) and applied to
        the ticket once committed.  Returns False only for a resend of an
        update already applied: the node routes it as usual (the store's
        dedup answers it), nothing is applied again."""
        kind = frame.kind
        tid = body["ticket"]
        key = f"{conn.claims.tenant}/{tid}"
        ref = frame.ref
        if ref and self._updates.get((conn.address, ref)) == (kind, key):
            # (its SENDACK was lost, or the store refused the resend)
            return False
        shared = self.host.shared_registry
        rec = self._handled(kind, key, tid, conn) if not shared or key in self.open else None
        before, mine = self._turns.take(key)
        if before is None and rec is not None and not shared:
            # Nothing in progress on the ticket: checked now, refused by the node.
            try:
                self._check_assign(kind, rec, tid, conn, body)
            except BaseException:
                self._turns.done(key, mine)
                raise
        now = time.time()
        ttl = frame.ttl / 1000.0 if frame.ttl else self.host.cfg.delivery.p1_ttl
        msg = NewMessage(conn.claims.tenant, conn.address, ref, Lane.P1, kind, str(address),
                         frame.payload, now, now + ttl, bool(frame.flags & _RECEIPT_REQUESTED))
        self.host.spawn(self._update(conn, msg, address, body, key, before, mine,
                                     bool(frame.flags & _ACK_REQUESTED)))
        return True

    def _handled(self, kind: str, key: str, tid: str, conn) -> dict:
        """The open ticket ``conn`` may update (what is checked here never
        changes while the ticket is open); raises MessageError otherwise."""
        rec = self.open.get(key)
        claims = conn.claims
        roles = claims.roles
        if rec is None or (rec["store"] != claims.store and "backend" not in roles):
            raise MessageError(Code.BAD_MESSAGE,
                               f"{kind}: body.ticket: no open ticket {tid!r} in store "
                               f"{claims.store}", "body.ticket")
        opener = conn.address == rec["from"]
        if not (STAFF_ROLES.intersection(roles) or (opener and kind == "ticket.reply")):
            raise MessageError(Code.FORBIDDEN,
                               f"{kind}: only the store's staff and managers handle tickets",
                               "body.ticket")
        return rec

    @staticmethod
    def _check_assign(kind: str, rec: dict, tid: str, conn, body: dict) -> None:
        """Two staff taking the same ticket: the first one has it (a manager or
        backend reassigns; the assignee may hand it over)."""
        if kind != "ticket.assign":
            return
        claims = conn.claims
        assignee = body.get("assignee") or claims.terminal
        taken = rec["assignee"]
        if taken and taken != assignee and taken != claims.terminal and \
                not ("manager" in claims.roles or "backend" in claims.roles):
            raise MessageError(Code.BAD_MESSAGE,
                               f"{kind}: body.ticket: ticket {tid!r} is already assigned "
                               f"to {taken} (a manager may reassign it)", "body.ticket")

    async def _update(self, conn, msg: NewMessage, address, body: dict, key: str, before,
                      mine, asked: bool) -> None:
        """In the ticket's turn: (re)check the update against the state the ones
        before it committed, store it, and apply it once committed.  Refused
        by the store: nothing changed, the sender is told to retry (a resend
        of the same SEND is then a new try)."""
        host = self.host
        kind, ref = msg.kind, msg.ref
        known = False
        shared = host.shared_registry
        try:
            if before is not None:
                await before
            if shared:
                try:
                    await self._refresh(key)
                except Exception as exc:  # noqa: BLE001 - not read: nothing changed
                    log.error("ticket %s could not be read: %s", key, exc)
                    host.service_error(conn, ref, Code.STORE_UNAVAILABLE,
                                       "the ticket could not be read; retry")
                    return
            if before is not None or shared:
                # A resend of the update the turn before applied: not checked
                # again (it is no longer valid, e.g. a resolve), never applied twice.
                known = bool(ref) and self._updates.get((conn.address, ref)) == (kind, key)
                if not known:
                    try:
                        rec = self._handled(kind, key, body["ticket"], conn)
                        self._check_assign(kind, rec, body["ticket"], conn, body)
                        if shared and kind == "ticket.assign":
                            await self._claim_assignment(key, rec, conn, body)
                    except MessageError as exc:
                        host.service_error(conn, ref, exc.code, str(exc))
                        return
                    except Exception as exc:  # noqa: BLE001 - the claim failed: nothing changed
                        log.error("ticket %s assignment could not be claimed: %s", key, exc)
                        host.service_error(conn, ref, Code.STORE_UNAVAILABLE,
                                           "the ticket could not be assigned; retry")
                        return
            try:
                accepted = await commit(host, msg, address)
            except UnknownTerminal as exc:
                await self._unclaim(kind, key, conn, body, shared and not known)
                host.service_error(conn, ref, Code.UNKNOWN_TERMINAL, str(exc))
                return
            except Exception as exc:  # noqa: BLE001 - not stored: nothing changed
                log.error("ticket %s %s could not be stored: %s", key, kind, exc)
                await self._unclaim(kind, key, conn, body, shared and not known)
                host.service_error(conn, ref, Code.STORE_UNAVAILABLE,
                                   "the message could not be stored; retry")
                return
            if not (accepted.duplicate or known):
                self._apply(kind, key, conn, ref, body)
        finally:
            self._turns.done(key, mine)
        if accepted.duplicate:
            host.service_ack(conn, ref, accepted.msg_id, None, retransmit=True, asked=asked)
        else:
            host.service_ack(conn, ref, accepted.msg_id, {"recipients": len(accepted.seqs)},
                             asked=asked)

    async def refresh(self, key: str) -> None:
        """(A fleet) another worker wrote ticket ``key``'s record: take it
        into memory (a ticket waiting for staff is then handed to staff
        logging in here; GET /v1/tickets lists it), or forget it resolved."""
        if not self._closed:
            await self._refresh(key)

    async def resync(self) -> None:
        """(A fleet) this worker's pub/sub connection was down: the tickets
        announced meanwhile were not heard.  Read again every ticket that
        is open in the records or held here (resolved ones only drop out)."""
        if self._closed:
            return
        seen = set()
        async for key, value in scan_all(self.host.store.records, NS):
            seen.add(key)
            try:
                resolved = orjson.loads(value).get("status") == RESOLVED
            except (ValueError, AttributeError):
                continue
            if not resolved or key in self.open:
                await self._refresh(key)
        for key in [k for k in self.open if k not in seen and k not in self.unsaved]:
            self._forget(key)             # (deleted meanwhile: retention)

    async def _refresh(self, key: str) -> None:
        """(A fleet) take a ticket's record and assignment claim from the
        shared records into memory: unresolved, it is held here, and while
        open its escalation is armed here too (every worker holding it
        comes to it when due, and one claims it: the worker that opened the
        ticket may be gone by then, its node scaled in); resolved
        elsewhere, forgotten."""
        if key in self.unsaved:
            return                      # (this worker's change is newer than the record)
        records = self.host.store.records
        raw = await records.get(NS, key)
        if raw is None or key in self.unsaved:
            return                      # (not written yet: opened here, or unknown)
        rec = orjson.loads(raw)
        claim = await records.get(ASSIGN_NS, key)
        if claim is not None:
            rec["assignee"] = claim.decode()
            if rec.get("status") == OPEN:
                rec["status"] = ASSIGNED
        mine = self.open.get(key)
        # (The updates it says were applied: a resend of one that reached
        # another worker first is answered as a resend here, even of the
        # resolve that closed the ticket.)
        self._load_refs(key, rec)
        if rec.get("status") == RESOLVED:
            if mine is not None:
                self._forget(key)
            return
        if not _RECORD_KEYS.issubset(rec):
            return
        rec.setdefault("updated", last_change(rec))
        if mine is None:
            self.open[key] = rec
            self._track(key, rec)
            if rec["status"] == OPEN:
                self._arm(key, rec["due"])
            return
        self._untrack(key, mine)
        refs = mine.get("refs")
        mine.update(rec)                # (in place: a turn in progress holds it)
        if refs and not rec.get("refs"):
            mine["refs"] = refs
        if mine["status"] != OPEN:
            handle = self._timers.pop(key, None)
            if handle is not None:
                handle.cancel()
        elif key not in self._timers:
            self._arm(key, mine["due"])
        self._track(key, mine)

    async def _claim_assignment(self, key: str, rec: dict, conn, body: dict) -> None:
        """(A fleet) the first assignment of a ticket is claimed once; a
        manager's or backend's reassignment (or the assignee's hand-over)
        replaces the claim.  Raises MessageError when another staff has it."""
        claims = conn.claims
        assignee = body.get("assignee") or claims.terminal
        records = self.host.store.records
        now = time.time()
        held = (await records.put_new(ASSIGN_NS, key, assignee.encode(), now)).decode()
        if held == assignee:
            return
        rec["assignee"] = held
        self._check_assign("ticket.assign", rec, body["ticket"], conn, body)
        await records.put(ASSIGN_NS, key, assignee.encode(), now)    # (allowed to reassign)

    async def _unclaim(self, kind: str, key: str, conn, body: dict, claimed: bool) -> None:
        """(A fleet) an assignment whose message was not stored gives its claim
        back (unless another assignment replaced it meanwhile): nothing changed."""
        if not claimed or kind != "ticket.assign":
            return
        assignee = (body.get("assignee") or conn.claims.terminal).encode()
        records = self.host.store.records
        try:
            if await records.get(ASSIGN_NS, key) == assignee:
                await records.delete(ASSIGN_NS, key)
        except Exception as exc:  # noqa: BLE001 - the store is down: retention ends it
            log.error("ticket %s: the claim of a failed assignment stays: %s", key, exc)

    def _apply(self, kind: str, key: str, conn, ref: int, body: dict) -> None:
        """A committed update changes the ticket (unless retention deleted it
        meanwhile) and makes its record due."""
        rec = self.open.get(key)
        if rec is None:
            return
        now = time.time()
        if kind == "ticket.assign":
            rec["status"] = ASSIGNED
            rec["assignee"] = body.get("assignee") or conn.claims.terminal
            rec["unattended"] = False
            self._untrack(key, rec)           # (someone has it)
            handle = self._timers.pop(key, None)
            if handle is not None:
                handle.cancel()
        elif kind == "ticket.reply":
            rec["replies"] += 1
        else:
            rec.update(status=RESOLVED, resolution=body["resolution"], resolved_at=now,
                       resolved_by=conn.address)
            self._forget(key)
            self.host.counters.tickets["resolved"] += 1
        rec["updated"] = now
        if ref:
            _remember(self._updates, (conn.address, ref), (kind, key))
            # Kept in the record too (the newest RECORD_REFS): a resend after a
            # restart is still known as one.
            refs = rec.get("refs") or []
            refs.append([conn.address, ref, kind])
            rec["refs"] = refs[-RECORD_REFS:]
        self.unsaved.put(key, rec)

    # -- escalation -----------------------------------------------------------------------

    def _arm(self, key: str, due: float) -> None:
        if self._closed:              # (stopping: re-armed from its record at start)
            return
        loop = self.host.loop
        delay = max(0.0, due - time.time())
        self._timers[key] = loop.call_at(loop.time() + delay, self._on_due, key)

    def _on_due(self, key: str) -> None:
        self._timers.pop(key, None)
        if not self._closed:
            self.host.spawn(self._escalate(key))

    async def _escalate(self, key: str) -> None:
        """In the ticket's turn (an assignment being stored goes first): send a
        ticket still open its escalation, to the first level that has someone
        (:meth:`escalation`); it is marked escalated once the message is
        stored.  Refused: it stays open and is tried again RETRY_DELAY seconds
        later (at the next start if stopping).  No one at any level: it stays
        open, unattended, and is tried again ``tickets.escalate_after`` later."""
        before, mine = self._turns.take(key)
        try:
            if before is not None:
                await before
            host = self.host
            if host.shared_registry and key in self.open:
                try:
                    await self._refresh(key)    # (assigned or resolved elsewhere?)
                    rec = self.open.get(key)
                    if rec is not None and rec["status"] == OPEN:
                        # Every worker holding the ticket comes here: one escalates.
                        # (one claim per escalate_after window past the due
                        # time: a worker that claimed and died is replaced)
                        window = int(max(0.0, time.time() - rec["due"]) // self.escalate_after)
                        due = f"{key}/{rec['due']!r}/{window}"
                        won = await host.store.records.put_new(
                            ESCALATE_NS, due, host.worker_name.encode(), time.time())
                        if won != host.worker_name.encode():
                            # Another worker escalates it; this one looks again
                            # a window later (the winner may die before it).
                            self._arm(key, time.time() + self.escalate_after)
                            return
                except Exception as exc:  # noqa: BLE001 - tried again like a refused escalation
                    log.error("ticket %s escalation could not be claimed (will retry): %s",
                              key, exc)
                    if key in self.open and not self._closed and key not in self._timers:
                        self._timers[key] = host.loop.call_later(RETRY_DELAY, self._on_due, key)
                    return
            rec = self.open.get(key)
            if rec is None or rec["status"] != OPEN or self._closed:
                return
            now = time.time()
            tenant, store = rec["tenant"], rec["store"]
            reason = f"not assigned within {self.escalate_after:g} s"
            try:
                level, to, recipients = await self.escalation(rec)
                if recipients:
                    out = orjson.dumps({"ticket": rec["ticket"], "code": rec["code"],
                                        "from": rec["from"], "reason": reason, "store": store,
                                        "level": level})
                    msg = NewMessage(tenant, SENDER, 0, Lane.P1, "ticket.escalate", to, out,
                                     now, now + host.cfg.delivery.p1_ttl, False)
                    await commit(host, msg, parse_address(to), recipients)
            except Exception as exc:  # noqa: BLE001 - not stored: nothing was sent
                log.error("ticket %s escalation could not be stored (will retry): %s", key, exc)
                if self.open.get(key) is rec and not self._closed and key not in self._timers:
                    self._timers[key] = host.loop.call_later(RETRY_DELAY, self._on_due, key)
                return
            if self.open.get(key) is not rec:
                return                # deleted by retention meanwhile
            now = time.time()
            if not recipients:
                # No one at any level: open, unattended, and looked at again later.
                rec.update(unattended=True, due=now + self.escalate_after, updated=now)
                host.counters.tickets["unattended"] += 1     # (an escalation that reached no one)
                self._track(key, rec)
                self.unsaved.put(key, rec)
                self._arm(key, rec["due"])
                log.warning("ticket unattended ticket=%s store=%s/%s: no manager in the store "
                            "or its region and no %s across the tenant", rec["ticket"], tenant,
                            store, self.escalate_role or "escalation role")
                return
            self._untrack(key, rec)           # (someone has it: no longer waiting)
            rec.update(status=ESCALATED, escalated_at=now, updated=now, unattended=False,
                       level=level)
            self.unsaved.put(key, rec)
            host.counters.tickets["escalated"] += 1
            log.info("ticket escalated ticket=%s store=%s/%s level=%s managers=%d",
                     rec["ticket"], tenant, store, level, len(recipients))
        finally:
            self._turns.done(key, mine)

    async def escalation(self, rec: dict) -> tuple[str, str, list[str]]:
        """Where a ticket's escalation goes: (level, address, recipients) of the
        first level with someone there: the store's managers, the managers of
        the opener's region, ``tickets.escalate_role`` across the tenant; or
        ("", "", []) when no level has anyone."""
        tenant, store = rec["tenant"], rec["store"]
        found = await self.managers(tenant, store)
        if found:
            return "store", f"role:{tenant}/{store}/manager", found
        region = rec.get("region") or ""
        if region:
            # (no address names a role within a region: the region's members
            # that are managers anywhere in the tenant; escalations are rare)
            area = f"region:{tenant}/{region}"
            members = set(await self.host.members(parse_address(area)))
            managers = await self.host.members(parse_address(f"role:{tenant}/*/manager"))
            found = [a for a in managers if a in members]
            if found:
                return "region", area, found
        if self.escalate_role:
            to = f"role:{tenant}/*/{self.escalate_role}"
            found = await self.host.members(parse_address(to))
            if found:
                return "tenant", to, found
        return "", "", []

    # -- records (written behind) ---------------------------------------------------------

    async def _write(self, key: str, rec: dict) -> None:
        # Stored as of its last change: the store's kv_expire is the retention
        # of the records not in memory (resolved ones).
        await self.host.store.records.put(NS, key, orjson.dumps(rec), last_change(rec))
        if self.host.shared_registry:
            self.host.ticket_changed(key)

    # -- retention ------------------------------------------------------------------------

    async def _expire_claims(self, horizon: float) -> None:
        records = self.host.store.records
        await records.expire(ASSIGN_NS, horizon)
        await records.expire(ESCALATE_NS, horizon)
        await records.expire(HANDOVER_NS, horizon)

    async def expire(self, now: float) -> int:
        """Delete the tickets last changed before ``now - retention.tickets``.

        Unresolved ones (in memory) lose their escalation timer and their
        record; resolved ones are deleted in the store by their stored time
        (the record's last change).  Returns how many were deleted.  Cost: one
        pass over the unresolved tickets, one ranged delete in the store.
        """
        await self.unsaved.write_due()        # (the records a refused write left due)
        horizon = now - self.retention
        doomed = [k for k, rec in self.open.items() if last_change(rec) < horizon]
        doomed.extend(k for k, rec in self.unsaved.items()
                      if k not in self.open and last_change(rec) < horizon)
        store = self.host.store
        for key in doomed:
            self._forget(key)
            self.unsaved.discard(key)         # (a write behind must not bring it back)
        if doomed:
            gone = set(doomed)
            for ref in [r for r, (_, key) in self._updates.items() if key in gone]:
                del self._updates[ref]
            for key in doomed:
                await store.records.delete(NS, key)
        if self.host.shared_registry:
            await self._expire_claims(horizon)
        return len(doomed) + await store.records.expire(NS, horizon)

