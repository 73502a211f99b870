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
``ticket.resolve`` from the store's staff update the ticket and are then
routed like any message (to the opener).  The first assignment wins: staff
assigning a ticket someone else has are refused (the assignee may hand it
over, a manager or backend may reassign it).  A resend (same sender and ref)
of an open or of an update already taken is answered like the first one,
never applied twice (an update also after a restart: a record keeps the
(sender, ref, kind) of its newest RECORD_REFS updates, loaded at start); an
open resent while the first is still being stored waits for its answer.  A
ticket still unassigned and unresolved at its due time is escalated:
``ticket.escalate {ticket, code, from, reason}`` goes to the store's managers
(the directory's, else ``role:<t>/<store>/manager``).

Every ticket is a key-value record (namespace ``ticket``, key
``<tenant>/<ticket>``, JSON); the unresolved ones are also kept in memory
(one dict entry each) with their escalation timer, and are loaded and
re-armed at start, so escalations survive a restart (a due time already past
fires right after start).  Records are written behind: one stays due until a
write of it, unchanged since, succeeded (a refused write is retried after
RETRY_DELAY, each maintenance round and at stop); a ticket whose message the
store took is kept even if its record write failed.  An escalation marks the
ticket escalated only once its message is stored (refused: the ticket stays
open and escalation is tried again RETRY_DELAY later); stopping cancels the
timers first, so a ticket due then escalates after the next start.

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
import logging
import os
import time

import orjson

from ..core.codes import Code, Flag, Lane
from .address import parse_address, terminal_address
from .kinds import MessageError
from .store import NewMessage, kv_records

log = logging.getLogger("tillwire.tickets")

NS = "ticket"
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


def new_ticket_id(now: float) -> str:
    """``T-<base36 unix ms>-<4 hex>``: sortable by creation, unique in practice."""
    return f"T-{_base36(int(now * 1000))}-{os.urandom(2).hex()}"


class Tickets:
    """The ticket service of one node."""

    def __init__(self, node, directory) -> None:
        self.node = node
        self.directory = directory
        cfg = node.cfg.tickets
        self.escalate_after = cfg.escalate_after
        self.retention = node.cfg.retention.tickets
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
        # Records waiting to be written: a key leaves only once a write of its
        # record, as it is now, succeeded (a failed or cancelled one keeps it due).
        self._unsaved: dict[str, dict] = {}
        self._writers: dict[str, asyncio.Task] = {}   # key -> its write in progress
        self._retry_handle = None
        self._closed = False          # stopping: no timer is armed any more

    # -- lifecycle ---------------------------------------------------------------------

    async def load(self) -> None:
        """Load the unresolved tickets and re-arm their escalation timers."""
        async for key, value in kv_records(self.node.store, NS):
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
        """Stopping: cancel the escalation and retry timers; none is armed again."""
        self._closed = True
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None

    async def get(self, tenant: str, ticket: str) -> dict | None:
        """A ticket's record (a copy without its resend memory), or None if unknown."""
        key = f"{tenant}/{ticket}"
        rec = self.open.get(key) or self._unsaved.get(key)    # (not yet written)
        if rec is None:
            raw = await self.node.store.kv_get(NS, key)
            if raw is None:
                return None
            rec = orjson.loads(raw)
        return {k: v for k, v in rec.items() if k != "refs"}

    # -- ticket.open -------------------------------------------------------------------

    def on_open(self, conn, frame, address, body: dict) -> bool:
        """Take a ticket.open (validated, allowed by the ACL); always consumes it."""
        node = self.node
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
                    node.service_ack(conn, ref, msg_id, doc, retransmit=True, asked=asked)
                else:                         # ... and still being stored
                    node.spawn(self._answer_resend(conn, ref, known, asked))
                return True
            answered = node.loop.create_future()
            _remember(self._recent, (opener, ref), answered)
        now = time.time()
        tid = new_ticket_id(now)
        key = f"{tenant}/{tid}"
        rec = {"ticket": tid, "tenant": tenant, "store": store, "code": body["code"],
               "text": body.get("text", ""), "from": opener, "ref": ref, "status": OPEN,
               "auto": False, "created": now, "due": 0.0, "assignee": "", "resolution": "",
               "escalated_at": 0.0, "resolved_at": 0.0, "resolved_by": "", "replies": 0,
               "msg_id": 0, "updated": now}
        ttl = frame.ttl / 1000.0 if frame.ttl else node.cfg.delivery.p1_ttl
        reply = self.rules.get((tenant, rec["code"]))
        if reply is None:
            reply = self.rules.get(("*", rec["code"]))
        fut = node.loop.create_future()
        if reply is not None:
            rec.update(status=RESOLVED, auto=True, resolution=reply, resolved_at=now,
                       resolved_by=SENDER)
            saved = self._save(key, rec)
            out = orjson.dumps({"ticket": tid, "resolution": reply, "auto": True})
            msg = NewMessage(tenant, SENDER, 0, Lane.P1, "ticket.resolve", opener, out, now,
                             now + ttl, False)
            node.submit(msg, parse_address(opener), fut)
            node.spawn(self._answer(conn, ref, key, rec, fut, saved, True, answered, asked))
            return True
        rec["due"] = now + self.escalate_after
        self.open[key] = rec
        self._arm(key, rec["due"])
        saved = self._save(key, rec)
        out = orjson.dumps({**body, "ticket": tid, "from": opener})
        msg = NewMessage(tenant, opener, ref, Lane.P1, "ticket.open", str(address), out, now,
                         now + ttl, bool(frame.flags & _RECEIPT_REQUESTED))
        node.submit(msg, address, fut, self.staff(tenant, store))
        node.spawn(self._answer(conn, ref, key, rec, fut, saved, False, answered, asked))
        return True

    async def _answer_resend(self, conn, ref: int, answered, asked: bool = True) -> None:
        """A resend of an open still being stored gets the first one's answer."""
        result = await answered
        if result is None:
            self.node.service_error(conn, ref, Code.STORE_UNAVAILABLE,
                                    "the ticket could not be stored; retry")
        else:
            self.node.service_ack(conn, ref, result[0], result[1], retransmit=True,
                                  asked=asked)

    async def _answer(self, conn, ref: int, key: str, rec: dict, fut, saved, auto: bool,
                      answered=None, asked: bool = True) -> None:
        """Once the message is stored: answer the opener (the record's write may
        still be retried: a ticket whose message the store took is kept)."""
        node = self.node
        try:
            accepted = await fut
        except Exception as exc:  # noqa: BLE001 - the store refused: nothing was promised
            log.error("ticket %s could not be stored: %s", key, exc)
            self._forget(key)
            self._unsaved.pop(key, None)      # (its write in progress stops after this try)
            try:
                await saved                   # ... so its delete comes after any put
            except Exception:  # noqa: BLE001 - (deleted below either way)
                pass
            node.spawn(node.store.kv_delete(NS, key))    # (if its record got in)
            if answered is not None:                      # a retry opens it afresh
                if self._recent.get((conn.address, ref)) is answered:
                    del self._recent[(conn.address, ref)]
                answered.set_result(None)
            node.service_error(conn, ref, Code.STORE_UNAVAILABLE,
                               "the ticket could not be stored; retry")
            return
        try:
            await saved
        except Exception as exc:  # noqa: BLE001 - kept, its write is retried
            log.error("ticket %s record could not be written (will retry): %s", key, exc)
        if accepted.duplicate:
            # The same (opener, ref) was stored before (a resend across a restart):
            # this ticket is a phantom; answer with the original one if known.
            self._forget(key)
            self._unsaved.pop(key, None)
            node.spawn(node.store.kv_delete(NS, key))    # (after its write: awaited above)
            original = next((r for r in self.open.values()
                             if r["msg_id"] == accepted.msg_id), None)
            doc = {"ticket": original["ticket"]} if original is not None else {}
            if answered is not None:
                answered.set_result((accepted.msg_id, doc))
            node.service_ack(conn, ref, accepted.msg_id, doc, retransmit=True, asked=asked)
            return
        doc = {"ticket": rec["ticket"], "auto_reply": True} if auto else \
            {"ticket": rec["ticket"], "recipients": len(accepted.seqs)}
        if not auto:
            rec["msg_id"] = accepted.msg_id
            self._save(key, rec)
        if answered is not None:
            answered.set_result((accepted.msg_id, doc))
        node.service_ack(conn, ref, accepted.msg_id, doc, asked=asked)

    def _forget(self, key: str) -> None:
        self.open.pop(key, None)
        handle = self._timers.pop(key, None)
        if handle is not None:
            handle.cancel()

    def staff(self, tenant: str, store: str) -> list[str]:
        """Who gets a store's tickets: the on-duty roster, else its staff role."""
        info = self.directory.get(tenant, store)
        if info.on_duty:
            return [terminal_address(tenant, t) for t in info.on_duty]
        return self.node.members_now(parse_address(f"role:{tenant}/{store}/staff"))

    def managers(self, tenant: str, store: str) -> list[str]:
        """Who gets a store's escalations: its listed managers, else its manager role."""
        info = self.directory.get(tenant, store)
        if info.managers:
            return [terminal_address(tenant, t) for t in info.managers]
        return self.node.members_now(parse_address(f"role:{tenant}/{store}/manager"))

    # -- assign, reply, resolve ------------------------------------------------------------

    def on_update(self, conn, frame, address, body: dict) -> bool:
        """Apply a ticket.assign / reply / resolve; returns False: the node then
        routes the message as usual (to the opener)."""
        kind = frame.kind
        claims = conn.claims
        tid = body["ticket"]
        key = f"{claims.tenant}/{tid}"
        ref = frame.ref
        if ref and self._updates.get((conn.address, ref)) == (kind, key):
            # A resend of an update already applied (its SENDACK was lost, or
            # the store refused it): route it as usual, apply nothing again.
            return False
        rec = self.open.get(key)
        roles = claims.roles
        backend = "backend" in roles
        if rec is None or (rec["store"] != claims.store and not backend):
            raise MessageError(Code.BAD_MESSAGE,
                               f"{kind}: body.ticket: no open ticket {tid!r} in store "
                               f"{claims.store}", "body.ticket")
        opener = conn.address == rec["from"]
        if not (STAFF_ROLES.intersection(roles) or (opener and kind == "ticket.reply")):
            raise MessageError(Code.FORBIDDEN,
                               f"{kind}: only the store's staff and managers handle tickets",
                               "body.ticket")
        now = time.time()
        if kind == "ticket.assign":
            assignee = body.get("assignee") or claims.terminal
            taken = rec["assignee"]
            if taken and taken != assignee and taken != claims.terminal and \
                    not ("manager" in roles or backend):
                # Two staff taking the same ticket: the first one has it (a
                # manager reassigns; the assignee may hand it over).
                raise MessageError(Code.BAD_MESSAGE,
                                   f"{kind}: body.ticket: ticket {tid!r} is already assigned "
                                   f"to {taken} (a manager may reassign it)", "body.ticket")
            rec["status"] = ASSIGNED
            rec["assignee"] = assignee
            handle = self._timers.pop(key, None)
            if handle is not None:
                handle.cancel()
        elif kind == "ticket.reply":
            rec["replies"] += 1
        else:
            rec.update(status=RESOLVED, resolution=body["resolution"], resolved_at=now,
                       resolved_by=conn.address)
            self._forget(key)
        rec["updated"] = now
        if ref:
            _remember(self._updates, (conn.address, ref), (kind, key))
            # Kept in the record too (the newest RECORD_REFS): a resend after a
            # restart is still known as one.
            refs = rec.get("refs") or []
            refs.append([conn.address, ref, kind])
            rec["refs"] = refs[-RECORD_REFS:]
        self._save(key, rec)
        return False

    # -- escalation -----------------------------------------------------------------------

    def _arm(self, key: str, due: float) -> None:
        if self._closed:              # (stopping: re-armed from its record at start)
            return
        loop = self.node.loop
        delay = max(0.0, due - time.time())
        self._timers[key] = loop.call_at(loop.time() + delay, self._escalate, key)

    def _escalate(self, key: str) -> None:
        """Send a due ticket's escalation; it is marked escalated once stored."""
        self._timers.pop(key, None)
        rec = self.open.get(key)
        if rec is None or rec["status"] != OPEN or self._closed:
            return
        node = self.node
        now = time.time()
        tenant, store = rec["tenant"], rec["store"]
        reason = f"not assigned within {self.escalate_after:g} s"
        out = orjson.dumps({"ticket": rec["ticket"], "code": rec["code"], "from": rec["from"],
                            "reason": reason})
        to = f"role:{tenant}/{store}/manager"
        msg = NewMessage(tenant, SENDER, 0, Lane.P1, "ticket.escalate", to, out, now,
                         now + node.cfg.delivery.p1_ttl, False)
        recipients = self.managers(tenant, store)
        fut = node.loop.create_future()
        node.submit(msg, parse_address(to), fut, recipients)
        node.spawn(self._escalated(key, rec, fut, len(recipients)))

    async def _escalated(self, key: str, rec: dict, fut, managers: int) -> None:
        """The escalation stored: mark the ticket; refused: it stays open and is
        tried again in RETRY_DELAY seconds (at the next start if stopping)."""
        try:
            await fut
        except Exception as exc:  # noqa: BLE001 - the store refused: nothing was sent
            log.error("ticket %s escalation could not be stored (will retry): %s", key, exc)
            if self.open.get(key) is rec and rec["status"] == OPEN and not self._closed \
                    and key not in self._timers:
                loop = self.node.loop
                self._timers[key] = loop.call_later(RETRY_DELAY, self._escalate, key)
            return
        if self.open.get(key) is not rec or rec["status"] != OPEN:
            return                    # assigned or resolved meanwhile: that stands
        now = time.time()
        rec.update(status=ESCALATED, escalated_at=now, updated=now)
        self._save(key, rec)
        log.info("ticket escalated ticket=%s store=%s/%s managers=%d", rec["ticket"],
                 rec["tenant"], rec["store"], managers)

    # -- records (written behind) ---------------------------------------------------------

    def _save(self, key: str, rec: dict) -> asyncio.Task:
        """Write ``rec`` behind; returns the task that writes it (one per key at a
        time: a change during a write is written by the same task next)."""
        self._unsaved[key] = rec
        task = self._writers.get(key)
        if task is None or task.done():
            task = self._writers[key] = self.node.spawn(self._write(key))
        return task

    async def _write(self, key: str) -> None:
        """Write the key's record until the store holds it as it is now.

        The key leaves ``_unsaved`` only after a successful write of that same
        record unchanged since; a failure (raised) or a cancellation keeps it
        due, and a retry is scheduled (also each maintenance round, and
        :meth:`flush` at stop)."""
        try:
            while True:
                rec = self._unsaved.get(key)
                if rec is None:
                    return
                data = orjson.dumps(rec)
                try:
                    # Stored as of its last change: the store's kv_expire is the
                    # retention of the records not in memory (resolved ones).
                    await self.node.store.kv_put(NS, key, data, last_change(rec))
                except Exception:
                    self._retry_soon()
                    raise
                if self._unsaved.get(key) is rec and orjson.dumps(rec) == data:
                    del self._unsaved[key]
                    return
        finally:
            if self._writers.get(key) is asyncio.current_task():
                del self._writers[key]

    def _retry_soon(self) -> None:
        if self._retry_handle is None and not self._closed and not self.node.stopping:
            self._retry_handle = self.node.loop.call_later(RETRY_DELAY, self._retry)

    def _retry(self) -> None:
        self._retry_handle = None
        if not self._closed and not self.node.stopping:
            self.node.spawn(self._write_due())

    async def _write_due(self) -> None:
        try:
            await self.flush()
        except Exception as exc:  # noqa: BLE001 - still refused: tried again later
            log.error("ticket records still not written (%d due): %s", len(self._unsaved), exc)

    async def flush(self) -> None:
        """Write the records still due (retries, each maintenance round, at stop);
        raises if the store refuses one (it stays due)."""
        for key in list(self._unsaved):
            rec = self._unsaved.get(key)
            if rec is not None:
                await self._save(key, rec)

    # -- retention ------------------------------------------------------------------------

    async def expire(self, now: float) -> int:
        """Delete the tickets last changed before ``now - retention.tickets``.

        Unresolved ones (in memory) lose their escalation timer and their
        record; resolved ones are deleted in the store by their stored time
        (the record's last change).  Returns how many were deleted.  Cost: one
        pass over the unresolved tickets, one ranged delete in the store.
        """
        if self._unsaved:
            await self._write_due()           # (the records a failed write left due)
        horizon = now - self.retention
        doomed = [k for k, rec in self.open.items() if last_change(rec) < horizon]
        doomed.extend(k for k, rec in self._unsaved.items()
                      if k not in self.open and last_change(rec) < horizon)
        store = self.node.store
        for key in doomed:
            self._forget(key)
            self._unsaved.pop(key, None)      # (a write behind must not bring it back)
        if doomed:
            gone = set(doomed)
            for ref in [r for r, (_, key) in self._updates.items() if key in gone]:
                del self._updates[ref]
            for key in doomed:
                await store.kv_delete(NS, key)
        return len(doomed) + await store.kv_expire(NS, horizon)

