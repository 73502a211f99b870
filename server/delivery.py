"""P0/P1 delivery: group commit, inboxes, live hand-over, pump, retransmit, acks.

A message is stored first (``Store.accept_many_then``, one batch per read
or loop iteration), its sender gets SENDACK only after that, and each
recipient's inbox is drained in seq order into its lanes, at most
``delivery.inflight`` unacked messages per lane, with retransmits on the
node's timing wheel (PROTOCOL.md section 11).  The store is the source of
truth: a live message is handed over directly only when it is next in line;
otherwise a pump task reads the store.

State owned here: the submits not yet committed, the acks, delivered marks
and registrations waiting for the next batch write, the inbox states (one
per terminal with something in flight, pooled), and which resuming
connections saw a message stored meanwhile.

Unknown terminals: a P0/P1 message to a terminal the registry does not
know (it never logged in and was not provisioned) is refused with
UNKNOWN_TERMINAL and not stored, unless its tenant's
``delivery.unknown_terminals`` is ``accept`` (then it waits for the first
login).  A terminal once known stays known (a record is never removed;
retiring it is a flag), so a record in the registry's cache or a live
session here settles it at once; only a miss asks the authoritative
registry (``Registry.get``), in the batch's recipient lookup.

Failure paths (every await on the store): a commit that fails answers its
senders STORE_UNAVAILABLE and keeps nothing; a registry lookup that fails
does the same for its batch; a failed batch write keeps its
items and retries them; a failed pump read or resume read retries with
backoff while the connection is open; and past ``delivery.max_uncommitted``
messages waiting for the store the node stops reading P0/P1 senders
(``saturated``) instead of growing.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson

from ..core import wheel as _wheel
from ..core.codes import Code, Flag, FrameType, Lane, ReceiptStatus
from ..core.errors import UnknownTerminal
from ..core.session import OPEN, OVERFLOW, Frame
from .config import tenant_value
from .connection import RESUMING, InboxState, TerminalConnection
from .retry import RETRY_FIRST, backoff
from .store import NewMessage
from .terminals import TerminalRecord

log = logging.getLogger("tillwire.delivery")

_LANE_MASK = int(Flag.LANE_MASK)
_RETRANSMIT = int(Flag.RETRANSMIT)
_P0, _P1 = int(Lane.P0), int(Lane.P1)
_RECIPIENTS = tuple(orjson.dumps({"recipients": n}) for n in range(64))

PUMP_BATCH = 128             # store rows read per pump step
EARLY_MAX = 64              # live messages one inbox lane keeps while a gap before them fills
EARLY_WAIT = 0.25           # seconds they wait for it before a pump reads them
INBOX_POOL = 1024            # InboxStates kept for reuse (656 B each with its timer)
SATURATED_WAIT = 0.01        # seconds a sender's read waits before it looks again


async def _none():
    return None


def _recipients_payload(n: int) -> bytes:
    """The SENDACK payload of a message stored for ``n`` recipients."""
    return _RECIPIENTS[n] if n < 64 else orjson.dumps({"recipients": n})


def _unacked_done(conn: TerminalConnection) -> None:
    """A P0/P1 SEND of ``conn`` was answered (stored or refused)."""
    extra = conn.extra
    limits = extra.get("limits") if extra is not None else None
    if limits is not None and limits.unacked > 0:
        limits.unacked -= 1


def reject_reason(code: int, text: bytes) -> str:
    """The dead-letter reason of a NACK rejecting a message with ``code``
    (non-zero) and payload ``text``: ``NACK <code> <NAME>: <text>``, the
    name when the code is in the code table, the text when there is one
    (PROTOCOL.md section 7, NACK).  The code is always recorded."""
    try:
        head = f"NACK {code} {Code(code).name}"
    except ValueError:
        head = f"NACK {code}"
    detail = text.decode("utf-8", "replace").strip()
    return f"{head}: {detail}" if detail else head


class Delivery:
    """The node's P0/P1 delivery (one per node)."""

    def __init__(self, node) -> None:
        self.node = node
        self.cfg = node.cfg
        self.loop = node.loop
        self.store = node.store
        self.hub = node.hub
        self.registry = node.registry
        self.wheel = node.wheel
        self.counters = node.counters
        self.inflight = node.inflight
        self.inbox_budget = node.inbox_budget
        self.mark_dirty = node.mark_dirty
        self.write_now = node.output.write_now
        self.spawn = node.spawn
        self.slow_consumer = node.slow_consumer
        self.encoder = node.encoder
        self._encode_sendack = node.encoder.encode_sendack
        self._pending_accepts: list = []
        self._ordered: list = []       # batches waiting behind one whose recipients resolve
        self._resolving = False        # a batch's group recipients are being looked up
        self._committing = 0           # accept_many batches the store has not answered yet
        self.uncommitted = 0           # messages submitted and not answered by the store
        # Past this many, the node stops reading terminals' P0/P1 SENDs until
        # the store catches up: a slow store costs senders latency, not memory.
        self.max_uncommitted = node.cfg.delivery.max_uncommitted
        self._pending_registers: list[TerminalRecord] = []
        self._resuming: dict = {}      # connection -> highest seqs stored while it resumed
        # InboxStates of fully acked inboxes, with their retransmit timers,
        # kept for the next message to any terminal (see _inbox_state).
        self._inbox_pool: list[InboxState] = []
        self._pending_acks: dict[tuple[str, int], int] = {}
        self._pending_delivered: dict[tuple[str, int], list[int]] = {}
        self._batch_handle = None
        self._batch_retry = 0.0        # seconds before the next retry of a failed batch write
        self._unknown_terminals = node.cfg.delivery.unknown_terminals

    @property
    def busy(self) -> bool:
        """Submits or commits not answered by the store yet."""
        return bool(self._pending_accepts or self._ordered or self._resolving
                    or self._committing)

    @property
    def saturated(self) -> bool:
        """Too much waits for the store: stop reading P0/P1 senders."""
        return self.uncommitted >= self.max_uncommitted

    def in_flight(self) -> int:
        """P0/P1 messages handed to terminals and not acknowledged yet."""
        total = 0
        for conn in self.hub.sessions.values():
            inbox = conn.inbox
            if inbox.__class__ is InboxState and conn.state == OPEN:
                for lane in (Lane.P0, Lane.P1):
                    acked = conn.inbox_window(lane)[0]
                    if inbox.cursor[lane] - 1 > acked:
                        total += inbox.cursor[lane] - 1 - acked
        return total

    def sendack(self, conn: TerminalConnection, ref: int, msg_id: int, payload: bytes = b"",
                retransmit: bool = False) -> None:
        """Queue a SENDACK (the one place that makes one, PROTOCOL.md section 7)."""
        conn.control(self._encode_sendack(_RETRANSMIT if retransmit else 0, ref, msg_id,
                                          payload))
        self.mark_dirty(conn)

    def register_later(self, rec: TerminalRecord) -> None:
        """Write a terminal record with the next batch."""
        self._pending_registers.append(rec)
        self._schedule_batches()

    def cancel_batches(self) -> None:
        """Stop the batch timer (stopping: the caller writes the batches itself)."""
        if self._batch_handle is not None:
            self._batch_handle.cancel()
            self._batch_handle = None

    # -- group commit ------------------------------------------------------------------

    def submit(self, msg: NewMessage, address, reply, recipients=None) -> None:
        """Queue a P0/P1 message for the next group commit.

        ``reply`` is (connection, ref, asked, its SendLimits): a terminal's
        SEND, answered with SENDACK once stored when ``asked`` (and counted in
        its window until then); a future to resolve with the Accepted result
        (admin API, services); or None.
        ``recipients`` (terminal addresses) replaces the members of ``address``
        (services route by their own rules: rosters, conversations).  A
        terminal address is its own member once known (see the module's
        "Unknown terminals"); a group's members, and a terminal the cache
        does not know, are looked up when its batch is committed.
        """
        if recipients is None and address.scope == "terminal":
            to = str(address)
            rec = self.registry.cached(to)
            if rec is not None or to in self.hub.sessions or self.accepts_unknown(address.tenant):
                recipients = self.registry.terminal_members(to, rec)
            # (else None: the batch asks the registry whether it is known, see _members)
        self._pending_accepts.append((msg, recipients, reply, address))
        self.uncommitted += 1
        if len(self._pending_accepts) == 1:
            self.loop.call_soon(self._commit)

    def accepts_unknown(self, tenant: str) -> bool:
        """Does ``tenant`` take P0/P1 messages for terminals nobody knows yet
        (``delivery.unknown_terminals`` = accept)?"""
        return tenant_value(self._unknown_terminals, tenant) == "accept"

    def commit_now(self) -> None:
        """Hand the submits so far to the store at once: a connection's read
        ended, and its SENDs need not wait for the next loop iteration (under
        a broadcast flood an iteration is long).  The SENDs of one read still
        go in one batch, and the store's group commit gathers the batches."""
        if self._pending_accepts:
            self._commit()

    def _commit(self) -> None:
        """Hand the pending submits to the store as one batch.

        Runs at the end of the read that submitted them (commit_now) or,
        for submits made elsewhere (services, the admin API), at the next
        iteration (call_soon).  The store calls :meth:`_committed` straight
        from its completion on the loop: no task to wake up, one iteration
        less between a payment result's SEND and its delivery.  A batch with
        group messages first looks their members up (asynchronously); the
        batches after it wait in order, so one sender's messages are stored
        in the order it sent them."""
        batch = self._pending_accepts
        if not batch:
            return          # a connection's read already handed them over
        self._pending_accepts = []
        if self._resolving:
            self._ordered.append(batch)
        elif any(item[1] is None for item in batch):
            self._resolving = True
            self.spawn(self._resolve(batch))
        else:
            self._accept(batch)

    async def _resolve(self, batch: list) -> None:
        """Look up the group members of ``batch`` and of the batches queued
        behind it, and hand each to the store in order."""
        try:
            while True:
                try:
                    # Each address once, all at the same time (a batch to a
                    # thousand terminals this worker has not seen is one
                    # round trip's wait, not a thousand in a row).
                    wanted = {str(a): a for _, r, _, a in batch if r is None}
                    found = dict(zip(wanted, await asyncio.gather(
                        *(self._members(a) for a in wanted.values()))))
                    resolved = [(m, r if r is not None else found[str(a)], reply, a)
                                for m, r, reply, a in batch]
                except Exception as exc:      # the registry failed: nothing was stored
                    log.error("registry lookup failed: %s", exc)
                    self._refused(batch, exc)
                else:
                    unknown = [item for item in resolved if item[1] is None]
                    if unknown:
                        resolved = [item for item in resolved if item[1] is not None]
                        self._unknown(unknown)
                    if resolved:
                        self._accept(resolved)
                if not self._ordered:
                    return
                batch = self._ordered.pop(0)
        finally:
            self._resolving = False

    async def _members(self, address) -> list[str] | None:
        """The members of ``address``; None for a terminal the registry does
        not know.  A terminal the cache knows is taken from it, as submit
        does (the batches queued behind a lookup were submitted before it
        filled the cache); one it lacks is asked of the registry itself (a
        cache may lag another worker's put)."""
        if address.scope != "terminal":
            return await self.node.members(address)
        to = str(address)
        rec = self.registry.cached(to)
        if rec is None:
            rec = await self.node.registry.get(to)
            if rec is None and to not in self.hub.sessions:
                return None
        return self.registry.terminal_members(to, rec)

    def _unknown(self, items: list) -> None:
        """Refuse the submits of ``items``: their terminal is not known (nothing stored)."""
        self.uncommitted -= len(items)
        for _, _, reply, address in items:
            if reply is not None:
                if reply.__class__ is tuple:
                    self.counters.refuse("terminal", "UNKNOWN_TERMINAL")
                self._answer(reply, None, UnknownTerminal(str(address)))

    def _accept(self, batch: list) -> None:
        started = time.perf_counter()
        self._committing += 1
        try:
            self.store.accept_many_then(
                [(m, r) for m, r, _, _ in batch],
                lambda results, exc: self._committed(batch, started, results, exc))
        except Exception as exc:       # the store is closed
            self._committed(batch, started, None, exc)

    def _committed(self, batch: list, started: float, results, exc) -> None:
        self._committing -= 1
        if exc is not None:            # the store is down: nothing was accepted
            log.error("store accept failed: %s", exc)
            self._refused(batch, exc)
            return
        self.uncommitted -= len(batch)
        counters = self.counters
        counters.store_write.observe(time.perf_counter() - started)
        live = self._live
        touched = {}        # the connections this batch queued frames for, senders first
        away = [] if self.node.ownership is not None else None   # (terminal, lane, seq)
        for (msg, recipients, reply, _), accepted in zip(batch, results):
            if reply.__class__ is tuple:
                touched[reply[0]] = None
            if accepted.duplicate:
                counters.duplicates += 1
            else:
                counters.accepted += 1
                for terminal, seq in accepted.seqs.items():
                    conn = live(terminal, msg.lane, seq, accepted.msg_id, msg.kind, msg.body,
                                msg.created)
                    if conn is not None:
                        touched[conn] = None
                    elif away is not None and terminal not in self.hub.sessions:
                        away.append((terminal, msg.lane, seq, accepted.msg_id, msg.kind,
                                     msg.body, msg.created))
            if reply is not None:
                self._answer(reply, accepted, None)
        if away:
            # Sessions held by other workers: tell them (after the answers:
            # the store has the messages whatever becomes of the telling).
            self.node.ownership.notify(away)
        # Write the deliveries and SENDACKs now, not at the next iteration's
        # flush: under a broadcast flood an iteration is long, and payment
        # results should not wait one more of them.  Only the connections
        # this batch touched (the flush still comes for the rest).
        self.write_now(touched)

    def _refused(self, batch: list, exc: Exception) -> None:
        """Nothing of ``batch`` was stored: tell each sender (STORE_UNAVAILABLE)."""
        self.uncommitted -= len(batch)
        for _, _, reply, _ in batch:
            if reply is not None:
                if reply.__class__ is tuple:
                    self.counters.refuse("terminal", "STORE_UNAVAILABLE")
                self._answer(reply, None, exc)

    def _answer(self, reply, accepted, exc) -> None:
        """Answer one submit: its future gets the store's ``accepted`` (or
        ``exc``); a terminal's SEND leaves its window and gets SENDACK when
        it asked (or ERROR: UNKNOWN_TERMINAL, STORE_UNAVAILABLE)."""
        if isinstance(reply, asyncio.Future):
            if not reply.done():
                if exc is None:
                    reply.set_result(accepted)
                else:
                    reply.set_exception(exc)
            return
        conn, ref, asked, limits = reply
        limits.unacked -= 1
        if conn.state != OPEN:
            return
        if exc.__class__ is UnknownTerminal:
            conn.error(Code.UNKNOWN_TERMINAL, ref, str(exc))
            self.mark_dirty(conn)
        elif exc is not None:
            conn.error(Code.STORE_UNAVAILABLE, ref, "the message could not be stored; retry")
            self.mark_dirty(conn)
        elif asked:
            if accepted.duplicate:
                self.sendack(conn, ref, accepted.msg_id, b"", True)
            else:
                self.sendack(conn, ref, accepted.msg_id, _recipients_payload(len(accepted.seqs)))

    # -- inbox delivery -------------------------------------------------------------------

    def _live(self, terminal: str, lane: int, seq: int, msg_id: int, kind: str,
              body: bytes, created: float):
        """A message was stored for ``terminal``: hand it over if it is next in
        line.  Returns the terminal's open connection (None when it has none).
        ``created``: when the message was accepted (unix s; for the latency
        histograms)."""
        conn = self.hub.sessions.get(terminal)
        inbox = self._learn(conn, lane, seq)
        if inbox is None:
            return None
        if inbox is RESUMING or inbox.pumping[lane]:
            return conn
        cursor = inbox.cursor[lane]
        if seq != cursor:
            if seq < cursor:
                if cursor > inbox.last[lane]:
                    return conn       # (handed over already, by a pump; nothing waits)
            else:
                early = inbox.early[lane]
                # (Not while the message at the cursor waits for the window
                # or the queue: then it is in the store, not missing, and an
                # ack or the flush pumps; an early entry would stop that.)
                if (seq - cursor <= EARLY_MAX and len(early) < EARLY_MAX
                        and cursor - conn.inbox_window(lane)[0] <= self.inflight
                        and not inbox.blocked):
                    # Before its turn (another worker's notice overtook
                    # the one before it): it waits a moment for the gap.
                    early[seq] = (msg_id, kind, body, created)
                    if inbox.early_timer[lane] is None:
                        inbox.early_timer[lane] = self.loop.call_later(
                            EARLY_WAIT, self._early_waited, conn, inbox, lane)
                    return conn
            self.pump(conn, lane)
            return conn
        # It goes, then the early ones right behind it, while the window
        # and the queue let them.
        acked = conn.inbox_window(lane)[0]
        early = inbox.early[lane]
        while seq - acked <= self.inflight and conn.inbox_bytes < self.inbox_budget:
            inbox.cursor[lane] = seq + 1
            self._deliver(conn, lane, seq, msg_id, kind, body, False, created)
            if not early or conn.state != OPEN:
                inbox.drop_early(lane)
                return conn
            seq += 1
            waiting = early.pop(seq, None)
            if waiting is None:
                return conn           # (the next gap: its timer still runs)
            msg_id, kind, body, created = waiting
        self.pump(conn, lane)
        return conn

    def _early_waited(self, conn, inbox, lane: int) -> None:
        """Early messages waited long enough for the gap before them: the
        pump reads the rest from the store (a lost notice; the
        reconciliation would find it later)."""
        inbox.early_timer[lane] = None
        if conn.inbox is inbox and inbox.early[lane] and conn.state == OPEN:
            self.pump(conn, lane)

    def redriven(self, entries) -> None:
        """Dead letters went back into their inboxes (``store.Redriven``): each
        is handed to its terminal's connection when next in line, else its
        pump reads it from the store (as a message just stored); a terminal
        whose session another worker holds is told through it."""
        self._hand_over([(r.terminal, r.lane, r.seq, r.msg_id, r.kind, r.body, r.created)
                         for r in entries], tell_others=True)

    def deliver_notified(self, messages) -> None:
        """Messages another worker stored for sessions here, carried in its
        notice ((terminal, lane, seq, msg_id, kind, body, created)): handed
        over as if stored here (no read back from the store when each is next
        in line)."""
        self._hand_over(messages, tell_others=False)

    def _hand_over(self, messages, tell_others: bool) -> None:
        """Stored messages (terminal, lane, seq, msg_id, kind, body, created)
        go to their sessions here when next in line (else their pumps read
        them); with ``tell_others``, the workers holding the other terminals'
        sessions are told (Ownership.notify)."""
        touched = {}
        away = [] if tell_others and self.node.ownership is not None else None
        live, sessions = self._live, self.hub.sessions
        for item in messages:
            conn = live(*item)
            if conn is not None:
                touched[conn] = None
            elif away is not None and item[0] not in sessions:
                away.append(item)
        if away:
            self.node.ownership.notify(away)
        if touched:
            self.write_now(touched)

    def notified(self, terminal: str, lane: int, seq: int) -> None:
        """Inbox ``lane`` of ``terminal`` holds messages up to ``seq`` (another
        worker stored them, or the reconciliation found them): if its session
        is here, read what it has not had from the store."""
        conn = self.hub.sessions.get(terminal)
        if conn is None or (conn.inbox is None and seq <= conn.inbox_window(lane)[0]):
            return          # (not here, or nothing it has not acked)
        inbox = self._learn(conn, lane, seq)
        if (inbox is not None and inbox is not RESUMING and not inbox.pumping[lane]
                and inbox.cursor[lane] <= seq):
            self.pump(conn, lane)

    def _learn(self, conn, lane: int, seq: int):
        """Note that ``conn``'s inbox holds ``seq``; returns its InboxState
        (made when it had none), RESUMING while its resume reads the store
        (the resume then learns of ``seq``), or None when there is nothing
        to hand over: no open connection, or draining."""
        if conn is None or conn.state != OPEN or self.node.draining:
            return None     # (draining: it waits in the store for the next connection)
        inbox = conn.inbox
        if inbox is RESUMING:
            # The resume task is reading the store's positions; make sure it
            # learns of this message even if its read came first.
            seen = self._resuming.setdefault(conn, [0, 0])
            seen[lane] = max(seen[lane], seq)
            return inbox
        if inbox is None:
            inbox = conn.inbox = self._inbox_state(conn, conn.inbox_window(0)[0],
                                                   conn.inbox_window(1)[0])
            inbox.progress = self.loop.time()
        if seq > inbox.last[lane]:
            inbox.last[lane] = seq
        return inbox

    def _deliver(self, conn, lane, seq, msg_id, kind, body, retransmit, created) -> None:
        if conn.deliver(lane, seq, msg_id, kind, body, retransmit) == OVERFLOW:
            self.slow_consumer(conn)
            return
        counters = self.counters
        counters.deliveries += 1
        counters.lane_frames_out[lane] += 1
        counters.lane_bytes_out[lane] += len(body)
        if retransmit:
            counters.retransmits += 1
        inbox = conn.inbox
        if not inbox.sample_seq[lane]:
            # Ack latency is sampled: one message in flight per inbox lane at a time.
            inbox.sample_seq[lane] = seq
            inbox.sample_at[lane] = time.perf_counter()   # (the loop clock has ms steps)
        if seq > inbox.delivered[lane]:
            inbox.delivered[lane] = seq
            self._note_delivered(conn.address, lane, seq)
            if created and not retransmit:     # (0: a backend that does not say)
                counters.written[lane].observe(time.time() - created)
        if created:
            # Accepted -> acked is timed for every message acked on this
            # connection: its accept time waits here (at most `inflight`
            # entries per lane, in seq order) for the ack (see on_ack).
            inbox.accepted_at[lane].setdefault(seq, created)
        if inbox.timer is None or not inbox.timer.scheduled:
            self._arm_retransmit(conn)
        self.mark_dirty(conn)

    def _block(self, conn: TerminalConnection) -> None:
        """The inbox backlog no longer fits the connection's queue."""
        inbox = conn.inbox
        if not inbox.blocked:
            inbox.blocked = True
            inbox.blocked_since = self.loop.time()
        self._arm_retransmit(conn)    # its timer also watches for slow consumers

    def pump(self, conn: TerminalConnection, lane: int, delay: float = RETRY_FIRST) -> None:
        inbox = conn.inbox
        inbox.drop_early(lane)        # (the pump reads them from the store)
        if not inbox.pumping[lane]:
            inbox.pumping[lane] = True
            self.spawn(self._pump_task(conn, lane, delay))

    async def _pump_task(self, conn: TerminalConnection, lane: int,
                         delay: float = RETRY_FIRST) -> None:
        inbox = conn.inbox
        failed = None
        try:
            while conn.state == OPEN and not self.node.draining:
                acked, sent = conn.inbox_window(lane)
                cursor = max(inbox.cursor[lane], acked + 1)
                room = self.inflight - (cursor - 1 - acked)
                if cursor > inbox.last[lane] or room <= 0:
                    break
                if conn.inbox_bytes >= self.inbox_budget:
                    self._block(conn)         # the flush resumes us once the queue drains
                    break
                try:
                    entries = await self.store.inbox(conn.address, lane, cursor - 1,
                                                     min(room, PUMP_BATCH))
                except Exception as exc:     # retried below, whatever else is in flight
                    failed = exc
                    return
                if conn.state != OPEN or conn.inbox is not inbox:
                    return
                if not entries:
                    inbox.cursor[lane] = inbox.last[lane] + 1   # the rest expired or was acked
                    break
                for e in entries:
                    if e.seq < inbox.cursor[lane]:
                        continue
                    if conn.inbox_bytes >= self.inbox_budget:
                        self._block(conn)
                        break
                    inbox.cursor[lane] = e.seq + 1
                    self._deliver(conn, lane, e.seq, e.msg_id, e.kind, e.body,
                                  e.delivered or e.seq <= sent, e.created)
                    if conn.state != OPEN:
                        return
        finally:
            inbox.pumping[lane] = False
            if failed is not None:
                log.warning("store: reading the P%d inbox of %s failed (%s); retrying in %g s",
                            lane, conn.address, failed, delay)
                self.loop.call_later(delay, self._pump_again, conn, lane, inbox, backoff(delay))

    def _pump_again(self, conn: TerminalConnection, lane: int, inbox: InboxState,
                    delay: float) -> None:
        """Retry a pump whose store read failed (unless the inbox moved on)."""
        if conn.state == OPEN and conn.inbox is inbox and not inbox.pumping[lane]:
            self.pump(conn, lane, delay)

    async def resume(self, conn: TerminalConnection, p0: int, p1: int) -> None:
        """Set up the inbox windows after RESUME and replay what is unacked.

        ``conn.inbox`` is RESUMING until the store answered: a failed read is
        retried with backoff for as long as the connection is open (messages
        stored meanwhile are noted in ``_resuming`` and not lost)."""
        address = conn.address
        delay = RETRY_FIRST
        try:
            while True:
                try:
                    acked0, last0, acked1, last1 = await self.store.positions(address)
                    break
                except Exception as exc:
                    if conn.state != OPEN:
                        return
                    log.warning("store: reading the positions of %s failed (%s); retrying in "
                                "%g s", address, exc, delay)
                    await asyncio.sleep(delay)
                    delay = backoff(delay)
                    if conn.state != OPEN:
                        return
        finally:
            seen = self._resuming.pop(conn, (0, 0))
        if conn.state != OPEN:
            return
        positions = ((acked0, max(last0, seen[0]), p0), (acked1, max(last1, seen[1]), p1))
        acked_now = [0, 0]
        lasts = [0, 0]
        for lane, (acked, last, resumed) in enumerate(positions):
            # The terminal processed up to ``resumed``: that is an ack.
            if resumed > acked:
                acked = min(resumed, last)
                self._queue_ack(address, lane, acked)
            conn.set_inbox(lane, acked)
            acked_now[lane] = acked
            lasts[lane] = last
        if lasts[0] <= acked_now[0] and lasts[1] <= acked_now[1]:
            conn.inbox = None        # nothing waiting: no inbox state until a message comes
            return
        inbox = conn.inbox = self._inbox_state(conn, acked_now[0], acked_now[1])
        inbox.last[:] = lasts
        inbox.progress = self.loop.time()
        for lane in (_P0, _P1):
            if inbox.cursor[lane] <= inbox.last[lane]:
                self.pump(conn, lane)

    def _inbox_state(self, conn: TerminalConnection, acked0: int, acked1: int) -> InboxState:
        """A fresh InboxState for ``conn``: a pooled one if there is one.

        A till's inbox state lives from a payment result to its ack, so
        without the pool every result made one with seven lists and a timer
        for the cyclic collector to scan (a tenth of the server's time under
        the steady durable load went to that collector)."""
        pool = self._inbox_pool
        if not pool:
            return InboxState(acked0, acked1)
        inbox = pool.pop()
        inbox.reset(acked0, acked1)
        if inbox.timer is not None:
            inbox.timer.arg = conn
        return inbox

    def _release_inbox(self, inbox: InboxState) -> None:
        """Pool the state of an inbox with nothing in flight or waiting (no pump
        task holds it: the caller checked), its timer stopped and holding no
        connection."""
        timer = inbox.timer
        if timer is not None:
            timer.cancel()
            timer.arg = None
        if len(self._inbox_pool) < INBOX_POOL:
            self._inbox_pool.append(inbox)

    def _arm_retransmit(self, conn: TerminalConnection) -> None:
        inbox = conn.inbox
        delivery = self.cfg.delivery
        if inbox.rto == 0.0:
            inbox.rto = delivery.retransmit_initial
        if inbox.timer is None:
            inbox.timer = _wheel.Timer(self._on_retransmit, conn)
        self.wheel.schedule(inbox.timer, self.loop.time() + inbox.rto)

    def _on_retransmit(self, conn: TerminalConnection) -> None:
        inbox = conn.inbox
        if conn.state != OPEN or inbox.__class__ is not InboxState or self.node.draining:
            return      # (draining: what is in flight stays counted until acked or stopped)
        now = self.loop.time()
        if inbox.blocked or conn.paused:
            # Nothing was lost in flight: the terminal is not reading.  Resending
            # would only queue duplicates; give up on it after the timeout.
            since = inbox.blocked_since if inbox.blocked else inbox.progress
            if now - since >= self.cfg.delivery.slow_consumer_timeout:
                self.slow_consumer(conn)
            else:
                self.wheel.schedule(inbox.timer, now + min(
                    inbox.rto, self.cfg.delivery.slow_consumer_timeout / 4))
            return
        outstanding = False
        for lane in (Lane.P0, Lane.P1):
            acked, sent = conn.inbox_window(lane)
            if acked < inbox.cursor[lane] - 1:
                outstanding = True
                if not inbox.pumping[lane]:
                    inbox.cursor[lane] = acked + 1     # resend from the first unacked
                    self.pump(conn, lane)
        if outstanding:
            inbox.rto = min(inbox.rto * 2, self.cfg.delivery.retransmit_max)
            self.wheel.schedule(inbox.timer, self.loop.time() + inbox.rto)

    def on_ack(self, conn: TerminalConnection, frame) -> None:
        lane = frame.flags & _LANE_MASK
        self._queue_ack(conn.address, lane, frame.seq)
        inbox = conn.inbox
        if inbox is None or inbox is RESUMING:
            return
        inbox.rto = self.cfg.delivery.retransmit_initial
        inbox.progress = self.loop.time()
        sampled = inbox.sample_seq[lane]
        if sampled and frame.seq >= sampled:
            self.counters.ack_latency.observe(time.perf_counter() - inbox.sample_at[lane])
            inbox.sample_seq[lane] = 0
        waiting = inbox.accepted_at[lane]
        if waiting:
            # Keys are in seq order: the acked ones are at the front.
            now = time.time()
            acked = self.counters.acked[lane]
            while waiting:
                first = next(iter(waiting))
                if first > frame.seq:
                    break
                acked.observe(now - waiting.pop(first))
        acked0 = conn.inbox_window(0)[0]
        acked1 = conn.inbox_window(1)[0]
        if acked0 >= inbox.last[0] and acked1 >= inbox.last[1] and \
                not (inbox.pumping[0] or inbox.pumping[1] or inbox.blocked):
            # Everything known is acked: no state until the next message.
            conn.inbox = None
            self._release_inbox(inbox)
            return
        if inbox.timer is not None:
            if acked0 >= inbox.cursor[0] - 1 and acked1 >= inbox.cursor[1] - 1:
                inbox.timer.cancel()
            else:
                self.wheel.schedule(inbox.timer, self.loop.time() + inbox.rto)
        if (inbox.cursor[lane] <= inbox.last[lane] and not inbox.pumping[lane]
                and not inbox.early[lane]):      # (early: waiting for its gap)
            self.pump(conn, lane)

    def _queue_ack(self, terminal: str, lane: int, seq: int) -> None:
        key = (terminal, lane)
        if seq > self._pending_acks.get(key, 0):
            self._pending_acks[key] = seq
        self._schedule_batches()

    def _note_delivered(self, terminal: str, lane: int, seq: int) -> None:
        key = (terminal, lane)
        rng = self._pending_delivered.get(key)
        if rng is None:
            self._pending_delivered[key] = [seq, seq]
            self._schedule_batches()
        else:
            if seq < rng[0]:
                rng[0] = seq
            if seq > rng[1]:
                rng[1] = seq

    def _schedule_batches(self, delay: float | None = None) -> None:
        if self._batch_handle is None and not self.node.stopping:
            if delay is None:
                delay = self.cfg.delivery.ack_batch_ms / 1000.0
            self._batch_handle = self.loop.call_later(delay, self._run_batches)

    def _run_batches(self) -> None:
        self._batch_handle = None
        self.spawn(self.flush_batches())

    async def flush_batches(self) -> bool:
        """Write the pending registrations, delivered marks and acks; True
        if all went in.  What the store refused stays pending (merged with
        what came meanwhile) and is retried with backoff: an ack is never
        dropped, so no ACKED receipt is lost and no false EXPIRED follows."""
        acks = self._pending_acks
        delivered = self._pending_delivered
        registers = self._pending_registers
        self._pending_acks = {}
        self._pending_delivered = {}
        self._pending_registers = []
        now = time.time()
        failed = None
        for written, rec in enumerate(registers):
            try:
                await self.store.terminals.register(rec)
            except Exception as exc:
                failed = exc
                registers = registers[written:]     # (the rest stays pending)
                break
        else:
            registers = []
        # Both requests are queued at once, delivered first: the writer runs
        # them in that order, usually in one commit (awaiting the first before
        # sending the second cost a commit round trip per batch).
        delivered_receipts, acked_receipts = await asyncio.gather(
            self.store.delivered_many(
                [(t, lane, rng[0], rng[1]) for (t, lane), rng in delivered.items()], now)
            if delivered else _none(),
            self.store.ack_many([(t, lane, seq) for (t, lane), seq in acks.items()], now)
            if acks else _none(), return_exceptions=True)
        if isinstance(delivered_receipts, Exception):
            failed = delivered_receipts
        else:
            delivered = None
            for r in delivered_receipts or ():
                self.send_receipt(r.sender, r.ref, r.msg_id, ReceiptStatus.DELIVERED,
                                  r.terminal)
        if isinstance(acked_receipts, Exception):
            failed = acked_receipts
        else:
            acks = None
            for r in acked_receipts or ():
                self.send_receipt(r.sender, r.ref, r.msg_id, ReceiptStatus.ACKED, r.terminal)
        if failed is None:
            self._batch_retry = 0.0
            return True
        self._keep(registers, delivered, acks)
        self._batch_retry = backoff(self._batch_retry)
        log.warning("store: writing acks/deliveries/registrations failed (%s); kept, retrying "
                    "in %g s", failed, self._batch_retry)
        self._schedule_batches(self._batch_retry)
        return False

    def _keep(self, registers: list, delivered: dict | None, acks: dict | None) -> None:
        """Put a failed batch's items back in front of what was noted since."""
        if registers:
            newer = {rec.address for rec in self._pending_registers}
            self._pending_registers[:0] = [r for r in registers if r.address not in newer]
        for key, (lo, hi) in (delivered or {}).items():
            rng = self._pending_delivered.get(key)
            if rng is None:
                self._pending_delivered[key] = [lo, hi]
            else:
                rng[0], rng[1] = min(rng[0], lo), max(rng[1], hi)
        for key, seq in (acks or {}).items():
            if seq > self._pending_acks.get(key, 0):
                self._pending_acks[key] = seq

    def send_receipt(self, sender: str, ref: int, msg_id: int, status: int, terminal: str) -> None:
        """RECEIPT to ``sender``: to its session here, or (a fleet) through
        the worker that holds it (``Ownership.forward_receipts``).  A sender
        with no session anywhere gets none, as on one node."""
        if sender in self.hub.sessions:
            self.receipt_here(sender, ref, msg_id, status, terminal)
        elif self.node.ownership is not None:
            self.node.ownership.forward_receipts([(sender, ref, msg_id, status, terminal)])

    def receipt_here(self, sender: str, ref: int, msg_id: int, status: int,
                     terminal: str) -> None:
        """RECEIPT to ``sender``'s session on this worker, if it is open."""
        conn = self.hub.sessions.get(sender)
        if conn is None or conn.state != OPEN:
            return
        conn.control(self.encoder.encode(Frame(
            FrameType.RECEIPT, msg_id=msg_id, code=status, ref=ref, to=terminal)))
        self.mark_dirty(conn)

    async def on_nack(self, conn: TerminalConnection, frame) -> None:
        lane = frame.flags & _LANE_MASK
        inbox = conn.inbox
        if frame.code == 0:
            # Redeliver later: rewind to the nacked seq when the retransmit timer fires.
            if inbox.__class__ is InboxState:
                inbox.rto = max(inbox.rto, self.cfg.delivery.retransmit_initial)
                self._arm_retransmit(conn)
            return
        if inbox.__class__ is InboxState:
            inbox.accepted_at[lane].pop(frame.seq, None)      # (never acked: not timed)
        dead = await self.store.reject(conn.address, lane, frame.seq,
                                       reject_reason(frame.code, frame.payload), time.time())
        if dead is not None:
            self.counters.dead((dead,))
        if dead is not None and dead.receipt:
            self.send_receipt(dead.sender, dead.ref, dead.msg_id, ReceiptStatus.REJECTED,
                               dead.terminal)

    async def on_read_receipt(self, conn: TerminalConnection, frame) -> None:
        trace = await self.store.trace(frame.msg_id)
        if trace is None or not trace.receipt:
            return
        if not any(r.terminal == conn.address for r in trace.recipients):
            return
        self.send_receipt(trace.sender, trace.ref, trace.msg_id, ReceiptStatus.READ,
                           conn.address)


    # -- retail services (server/tickets.py, chat.py, offers.py) -------------------------

    def service_ack(self, conn: TerminalConnection, ref: int, msg_id: int, doc,
                    retransmit: bool = False, asked: bool = True) -> None:
        """SENDACK a message a service took, with its JSON ``doc`` (None: empty).

        ``asked``: the SEND set ACK_REQUESTED; if not, nothing is sent (PROTOCOL.md
        section 7: a SENDACK only when asked; errors are always sent).  Either
        way the SEND leaves the connection's window."""
        _unacked_done(conn)
        if asked and conn.state == OPEN:
            self.sendack(conn, ref, msg_id, orjson.dumps(doc) if doc is not None else b"",
                         retransmit)

    def service_error(self, conn: TerminalConnection, ref: int, code: int, message: str) -> None:
        """Answer a message a service took with an ERROR frame (asked for an ack or not)."""
        _unacked_done(conn)
        self.counters.refuse("terminal", Code(code).name)
        self.request_error(conn, ref, code, message)

    def request_error(self, conn: TerminalConnection, ref: int, code: int, message: str) -> None:
        """Answer a request (HISTORY, SUBSCRIBE...) with an ERROR frame."""
        if conn.state == OPEN:
            conn.error(code, ref, message)
            self.mark_dirty(conn)
