"""Which worker holds each terminal's session: claims, releases, takeovers.

A node's sessions are claimed in :class:`~tillwire.server.presence.Presence`
under the node's worker id, on a lease this module renews in one call per
interval.  When a terminal logs in here while another worker holds its
session, the claim returns that worker and it is told on its control inbox
(:class:`~tillwire.server.broker.Broker`) to close the old session with
TAKEOVER, as a takeover inside one node does.  A lost control message is
repaired by the renewal: a worker whose lease on a terminal went to another
owner closes its session then (so an old session outlives a takeover by at
most one renewal interval); one whose lease merely ran out (presence was
unreachable) claims it again.

With the embedded default both backends are in memory and only this node
uses them; nodes in one process (tests) or the workers of a cluster share
them.  Nothing here runs per message: a login and a logout each append to a
queue that one task writes in order (``retry.InOrder``: kept and retried
while the backend fails), and the renewal walks the sessions in slices.

P0/P1 messages for terminals held elsewhere: the worker that stored them
looks their owners up (one call per tenant) and sends each owner one
``deliver`` control message carrying them; the owner hands each over as if
it had stored it (reading the store only for what is not next in line).
It tells again once ``RENOTIFY`` seconds later (``inbox``: positions only), which covers a
terminal that was moving between workers while it looked (its claim not
yet written).  What can still be lost (a control message published while
the owner's pub/sub connection was down, Redis failing between the commit
and the telling) is repaired by the reconciliation: every
``RECONCILE_EVERY`` seconds each worker compares the positions of its
sessions' inboxes in the store with what it knows, so a stored message
reaches a connected terminal at most about ``RECONCILE_EVERY`` seconds
late (plus one sweep: ``RECONCILE_SLICE`` reads at a time, and
``RECONCILE_GRACE``: what the sweep finds missing is read only if it is
still missing then, as its notice may be on its way).  A worker
whose pub/sub connection was opened again reconciles at once.

Control messages are ``<verb> NUL <terminal> NUL <argument>`` in UTF-8:
``takeover`` (argument: the new owner and its session's login time, Unix
seconds; the newer login keeps the terminal), ``kick`` (argument: the reason),
``deliver`` (terminal empty; argument, binary: the stored messages, see
``pack_delivery``), ``inbox`` (terminal empty; argument: one ``<terminal>
<lane> <seq>`` line per inbox that holds messages up to ``seq``), ``chan`` (a P2/P3
message of the terminal's own channel; argument, binary: the lane byte and
the placed message of ``channels.pack_placed``) and ``receipt`` (terminal
empty; argument, binary: RECEIPT frames for senders held there, see
``pack_receipt``).

RECEIPT frames follow their sender: the worker that learns what became of
a message (the recipient's, from its acks and deliveries; whichever ran
the expiry) sends them to the worker holding the sender's session, one
control message per worker and round, written in order and kept and
retried while presence or the broker fails.  A sender with no session
anywhere gets none, as on one node.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time

from ..core.codes import Code
from ..core.session import CLOSED
from .presence import SessionInfo
from .retry import AT_ONCE, InOrder

log = logging.getLogger("tillwire.ownership")

# One stored message in a ``deliver`` notice: the lengths of the terminal,
# kind and body, lane, seq, msg_id and when it was accepted (unix s); then
# terminal, kind and body.
_DELIVERY = struct.Struct(">HHIBQQd")
# One RECEIPT in a ``receipt`` message: the lengths of the sender and the
# recipient, msg_id, ref and status; then sender and recipient.
_RECEIPT = struct.Struct(">HHQQB")


NOTICE_MAX = 256 * 1024      # bytes of bodies one deliver notice carries at most
NOTICE_TOTAL = 4 * 1024 * 1024    # bytes of bodies one owner is sent per batch (the rest: positions)


def _carried(items: list) -> tuple[list[list], list]:
    """The deliver notices for ``items`` (in order, each up to NOTICE_MAX
    bytes of bodies, or one message whose body alone is larger, and
    NOTICE_TOTAL in all: a group message to thousands must not make huge
    PUBLISHes) and the items told as positions only (the owner reads them
    from the store)."""
    notices: list[list] = []
    size = total = 0
    for i, item in enumerate(items):
        n = len(item[5])
        total += n
        if total > NOTICE_TOTAL:
            return notices, items[i:]
        if not notices or (size + n > NOTICE_MAX and notices[-1]):
            notices.append([])
            size = 0
        notices[-1].append(item)
        size += n
    return notices, []


def _last_seqs(items) -> list[tuple[str, int, int]]:
    """(terminal, lane, seq) of each inbox's highest seq among ``items``
    (stored messages, or such triples): an ``inbox`` notice names an inbox
    once, its owner reads from its cursor up to that seq."""
    last: dict[tuple[str, int], int] = {}
    for terminal, lane, seq, *_ in items:
        if seq > last.get((terminal, lane), 0):
            last[(terminal, lane)] = seq
    return [(terminal, lane, seq) for (terminal, lane), seq in last.items()]


def pack_delivery(item) -> bytes:
    terminal, lane, seq, msg_id, kind, body, created = item
    t, k = terminal.encode(), kind.encode()
    return _DELIVERY.pack(len(t), len(k), len(body), lane, seq, msg_id, created) + t + k + body


def unpack_deliveries(data: bytes) -> list:
    """The (terminal, lane, seq, msg_id, kind, body, created) of a ``deliver`` notice."""
    out = []
    at, end, size = 0, len(data), _DELIVERY.size
    while at < end:
        nt, nk, nb, lane, seq, msg_id, created = _DELIVERY.unpack_from(data, at)
        at += size
        terminal = data[at:at + nt].decode()
        kind = data[at + nt:at + nt + nk].decode()
        body = bytes(data[at + nt + nk:at + nt + nk + nb])
        at += nt + nk + nb
        out.append((terminal, lane, seq, msg_id, kind, body, created))
    return out


def pack_receipt(receipt) -> bytes:
    sender, ref, msg_id, status, terminal = receipt
    s, t = sender.encode(), terminal.encode()
    return _RECEIPT.pack(len(s), len(t), msg_id, ref, status) + s + t


def unpack_receipts(data: bytes) -> list:
    """The (sender, ref, msg_id, status, recipient) of a ``receipt`` message."""
    out = []
    at, end, size = 0, len(data), _RECEIPT.size
    while at < end:
        ns, nt, msg_id, ref, status = _RECEIPT.unpack_from(data, at)
        at += size
        if at + ns + nt > end:
            raise ValueError("a receipt cut short")
        sender, terminal = data[at:at + ns].decode(), data[at + ns:at + ns + nt].decode()
        at += ns + nt
        out.append((sender, ref, msg_id, status, terminal))
    return out


LEASE = 90.0                 # seconds a claim lasts without renewal
RENEW_EVERY = 30.0           # seconds between renewals (a third of the lease)
RENEW_SLICE = 5000           # sessions renewed per call (the loop polls in between)
RENOTIFY = 1.0               # seconds after an inbox notification before the second one
RECONCILE_EVERY = 5.0        # seconds between reconciliations of the sessions' inboxes
RECONCILE_SLICE = 500        # inbox positions read in one request while reconciling
RECONCILE_GRACE = 0.5        # seconds a reconciliation leaves notices in flight to arrive
FLEET = "@fleet"             # the broker channel every worker hears (no address starts with @)


class Ownership:
    """This node's claims in presence, and its control inbox (one per node)."""

    def __init__(self, node, presence, broker) -> None:
        self.node = node
        self.presence = presence
        self.broker = broker
        self.owner = broker.worker_id
        self.lease = LEASE
        self.renew_every = RENEW_EVERY
        # ("claim", address, info) | ("release", address, None), written in order
        self._queue = InOrder(node.spawn, self._write,
                              lambda item: f"presence: {item[0]} of {item[1]}",
                              lambda: node.stopping, key=lambda item: item[1],
                              parallel=AT_ONCE)
        self._since: dict[str, float] = {}     # terminal -> when its session here logged in
        self._issued: dict[str, int] = {}      # terminal -> when that session's token was issued
        self._unwritten: dict[str, int] = {}   # terminal -> its claims queued, not written yet
        self._renewal = None
        self._reconciler = None
        self.reconcile_every = RECONCILE_EVERY
        self.reconcile_grace = RECONCILE_GRACE
        self.renotify = RENOTIFY
        self._notices: list[list] = []     # what notify() was given, for the notifier task
        self._notifying = False
        # RECEIPT frames for senders held elsewhere: gathered over a loop
        # iteration, then one batch of the queue (written in order, retried).
        self._receipts: list[tuple] = []
        self._receipt_batches = InOrder(node.spawn, self._forward,
                                        lambda batch: f"broker: forwarding {len(batch)} receipts",
                                        lambda: node.stopping)
        # Announcements to every worker, published in order and retried: a
        # revocation lost on the way would leave another worker logging the
        # old token in on its cached record.
        self._announcements = InOrder(node.spawn, self._announce,
                                      lambda message: f"broker: announcing {message[:80]!r}",
                                      lambda: node.stopping)

    async def start(self) -> None:
        # (control messages sent while the pub/sub connection was down are lost)
        self.broker.on_resubscribed = self._on_resubscribed
        await self.broker.start(self._on_message, self._on_control)
        await self.broker.subscribe([FLEET])
        # (Not spawn()ed tasks: stop() waits for those; these are cancelled.)
        self._renewal = self.node.loop.create_task(self._renew())
        self._reconciler = self.node.loop.create_task(self._reconcile_loop())

    async def stop(self) -> None:
        """Write the releases still queued (best effort), then leave the broker."""
        for task in (self._renewal, self._reconciler):
            if task is not None:
                task.cancel()
        if self._queue:
            await self._queue.drain()
        self._gather_receipts()
        for queue in (self._receipt_batches, self._announcements):
            if queue:
                await queue.drain()
        await self.broker.stop()

    # -- logins and logouts ---------------------------------------------------------

    def claimed(self, address: str, claims) -> None:
        """A session of ``address`` was accepted here (HELLO)."""
        self._since[address] = time.time()
        self._issued[address] = claims.issued_at
        self._claim_again(address, claims)

    def _claim_again(self, address: str, claims) -> None:
        """Queue a claim of ``address``'s session here (its login time kept)."""
        self._unwritten[address] = self._unwritten.get(address, 0) + 1
        self._queue.add(("claim", address, SessionInfo(claims.tenant, claims.store,
                                                     tuple(claims.roles))))

    def released(self, address: str) -> None:
        """A session of ``address`` here ended (unless a newer one here replaced it)."""
        self._queue.add(("release", address, None))

    async def _write(self, item) -> None:
        verb, address, info = item
        if verb == "claim":
            # (Not when the session closed before its claim was written:
            # claiming now could take over a newer session of the terminal
            # on another worker, a quick reconnect that landed there.)
            if address in self.node.hub.sessions:
                await self._claim(address, info)
            left = self._unwritten.pop(address, 1) - 1
            if left:
                self._unwritten[address] = left
        elif address not in self.node.hub.sessions:     # (not a newer session here)
            self._since.pop(address, None)
            self._issued.pop(address, None)
            await self.presence.release(address, self.owner)

    async def _claim(self, address: str, info: SessionInfo) -> None:
        previous = await self.presence.claim(address, self.owner, self.lease, info)
        # Messages of the terminal's own channel placed before the claim
        # named this worker went to no worker, or to the previous one: read
        # RENOTIFY later (by then also one placed by a publisher that looked
        # for the owner just before the claim).  One read per lane and claim
        # (a login, or a claim written again after Redis lost it).
        self.node.loop.call_later(self.renotify, self._top_up_again, address)
        if previous is not None and previous != self.owner:
            # (A lost message is repaired by the previous owner's renewal.)
            since = self._since.get(address, 0.0)
            await self.broker.send_control(previous, b"\0".join((
                b"takeover", address.encode(), f"{self.owner} {since!r}".encode())))

    def _top_up_again(self, address: str) -> None:
        if not self.node.stopping and address in self.node.hub.sessions:
            self.node.channels.top_up(address)

    # -- P0/P1 messages for sessions held elsewhere ------------------------------------

    def notify(self, stored: list) -> None:
        """(terminal, lane, seq, msg_id, kind, body, created) were stored for terminals
        with no session here: hand them to the workers that hold them (a
        ``deliver`` notice carries the messages, so the owner need not read
        them back), and tell those workers once more later (``inbox``).

        One task tells them, in the order the messages were stored (what
        is stored meanwhile goes in its next round): a notice never
        overtakes an earlier one.  (Told by a task each, a notice whose
        owners lookup waited behind Redis's long scripts came up to
        hundreds of ms after a later one: the owner held the later message
        for its gap, ``EARLY_WAIT``, then read the store.)"""
        self._notices.append(stored)
        if not self._notifying:
            self._notifying = True
            self.node.spawn(self._notify_in_order())

    async def _notify_in_order(self) -> None:
        try:
            while self._notices:
                # A round takes what was queued, up to NOTICE_TOTAL bytes of
                # bodies (at least one batch): the rest of a long queue goes
                # in the next round rather than as positions to read back.
                queued, size, k = self._notices, 0, 0
                while k < len(queued):
                    more = sum(len(item[5]) for item in queued[k])
                    if k and size + more > NOTICE_TOTAL:
                        break
                    size += more
                    k += 1
                self._notices = queued[k:]
                await self._notify([item for stored in queued[:k] for item in stored],
                                   again=True)
        finally:
            self._notifying = False

    async def _notify(self, stored: list, again: bool) -> None:
        try:
            owners = await self.presence.owners(dict.fromkeys(item[0] for item in stored))
            notices: dict[str, list] = {}
            for item in stored:
                owner = owners.get(item[0])
                if owner is not None and owner != self.owner:
                    notices.setdefault(owner, []).append(item)
            for owner, items in notices.items():
                carried, told = (_carried(items) if again else ([], items))
                for some in carried:
                    await self.broker.send_control(
                        owner, b"deliver\0\0" + b"".join(map(pack_delivery, some)))
                if told:
                    await self.broker.send_control(owner, b"inbox\0\0" + "\n".join(
                        f"{t} {lane} {seq}" for t, lane, seq in _last_seqs(told)).encode())
        except Exception as exc:        # the owner's reconciliation finds them
            log.warning("presence/broker: telling the owners of %d stored messages failed: %s",
                        len(stored), exc)
        if again and not self.node.stopping:
            self.node.loop.call_later(self.renotify, self._notify_again, _last_seqs(stored))

    def _notify_again(self, last_seqs) -> None:
        if not self.node.stopping:
            self.node.spawn(self._notify(last_seqs, again=False))

    def _on_resubscribed(self) -> None:
        # (what was announced meanwhile is lost: cached records are read
        # again when next needed, the directory at once)
        drop = getattr(self.node.registry, "drop_cache", None)
        if drop is not None:
            drop()
        self.node.spawn(self._refresh(self.node.directory.load(), "directory", "every store"))
        if self.node.shared_registry:
            self.node.spawn(self._refresh(self.node.tickets.resync(), "ticket", "every ticket"))
        self.node.spawn(self._reconcile_now())

    async def _reconcile_now(self) -> None:
        try:
            await self.reconcile()
        except Exception as exc:            # the periodic round tries again
            log.warning("store: reconciling this worker's inboxes failed: %s", exc)

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reconcile_every)
            await self._reconcile_now()

    async def reconcile(self) -> None:
        """Compare every session's inbox positions in the store with what
        this worker knows, and read what it missed."""
        addresses = list(self.node.hub.sessions)
        store, delivery = self.node.store, self.node.delivery
        behind = []
        for i in range(0, len(addresses), RECONCILE_SLICE):
            some = addresses[i:i + RECONCILE_SLICE]
            found = await store.positions_many(some)
            behind += [(address, lane, last)
                       for address, (_, last0, _, last1) in zip(some, found)
                       for lane, last in ((0, last0), (1, last1)) if last]
        # What was stored a moment ago has its notice on the way: after
        # RECONCILE_GRACE only what is still missing is read from the store.
        await asyncio.sleep(self.reconcile_grace)
        if self.node.stopping:
            return
        for address, lane, last in behind:
            delivery.notified(address, lane, last)

    async def owner_of(self, terminal: str) -> str | None:
        """The worker holding ``terminal``'s session (this one's name when
        it is here, even before its claim is written); None when offline."""
        owner = (await self.presence.owners([terminal])).get(terminal)
        if owner is None and terminal in self.node.hub.sessions:
            return self.owner
        return owner

    @staticmethod
    def channel_header(name: str, lane: int) -> bytes:
        """What a ``chan`` control message starts with, before the placed message."""
        return b"chan\0" + name.encode() + b"\0" + bytes((lane,))

    async def send_channel(self, owner: str | None, name: str, lane: int, data: bytes) -> None:
        """A P2/P3 message placed in a terminal's own channel: to ``owner``,
        the worker holding the terminal (:meth:`owner_of`; nothing when it is
        offline: the history keeps it for its catch-up)."""
        if owner == self.owner:
            self.node.channels.receive(name, lane, data)
        elif owner is not None:
            await self.broker.send_control(owner, self.channel_header(name, lane) + data)

    # -- receipts for senders held elsewhere ------------------------------------------

    def forward_receipts(self, receipts: list) -> None:
        """RECEIPT frames, (sender, ref, msg_id, status, recipient) each, for
        senders with no session here: to the workers that hold them (see the
        module's docstring)."""
        if not self._receipts:
            self.node.loop.call_soon(self._gather_receipts)
        self._receipts.extend(receipts)

    def _gather_receipts(self) -> None:
        batch, self._receipts = self._receipts, []
        if batch:
            self._receipt_batches.add(batch)

    async def _forward(self, batch: list) -> None:
        """Send ``batch``'s receipts to their senders' workers: one owners
        lookup, one control message per worker.  What was sent leaves the
        batch, so a retry after a failure sends only the rest."""
        owners = await self.presence.owners(dict.fromkeys(r[0] for r in batch))
        by_owner: dict[str, list] = {}
        for receipt in batch:
            owner = owners.get(receipt[0])
            if owner is None:
                continue                # (no session anywhere: none, as on one node)
            if owner == self.owner:     # (it came here meanwhile)
                self.node.delivery.receipt_here(*receipt)
            else:
                by_owner.setdefault(owner, []).append(receipt)
        # (the batch is left holding what is to send, owner by owner, in
        # the order sent: each send takes its owner's off the front)
        batch[:] = [r for some in by_owner.values() for r in some]
        for owner, some in by_owner.items():
            await self.broker.send_control(owner, b"receipt\0\0" + b"".join(map(pack_receipt,
                                                                               some)))
            del batch[:len(some)]

    # -- the control inbox ------------------------------------------------------------

    # -- what every worker hears ------------------------------------------------------

    def announce(self, verb: str, argument: str) -> None:
        """Tell every worker of the fleet (this one too) that something
        shared changed: ``registry`` (argument: a terminal address; workers
        that cache its record or hold its session read it again, and close
        a session it retired or revoked), ``directory`` (argument:
        ``<tenant>/<store>``; every worker reads the entry again),
        ``member`` (argument: ``<tenant>/<member>``: the member's personal
        data was deleted; every worker drops what it holds of it in memory)
        or ``ticket`` (argument: ``<worker>\t<tenant>/<ticket>``; the other
        workers read its record again: a ticket waiting for staff goes to the
        first who logs in on any worker, and every worker lists it)."""
        self._announcements.add(f"{verb}\0{argument}".encode())

    async def _announce(self, message: bytes) -> None:
        # (Failing, it is kept and published again with backoff, in order:
        # retry.InOrder.  A worker whose own pub/sub connection was down
        # meanwhile drops its caches when it subscribes again.)
        await self.broker.publish(FLEET, 0, message)

    def _on_announcement(self, message: bytes) -> None:
        try:
            verb, argument = (part.decode() for part in message.split(b"\0", 1))
        except ValueError:
            log.warning("announcement: malformed %r", message[:80])
            return
        node = self.node
        if verb == "registry":
            registry = node.registry
            held = registry.cached(argument) is not None or argument in node.hub.sessions
            # Forgotten first: a login while it is read again reads it from
            # Redis too, never the record before the change (a revoked token
            # would pass for that round trip).  Forgotten even when not
            # cached: a read in flight may bring the record before the change.
            forget = getattr(registry, "forget_cached", None)
            if forget is not None:
                forget(argument)
            if held:
                node.spawn(self._refresh(self._record_changed(argument), verb, argument))
        elif verb == "directory":
            tenant, _, store = argument.partition("/")
            node.spawn(self._refresh(node.directory.reload(tenant, store), verb, argument))
        elif verb == "member":
            tenant, _, member = argument.partition("/")
            node.forget_member_here(tenant, member)
        elif verb == "ticket":
            origin, _, key = argument.partition("\t")
            if origin != node.worker_name:
                node.spawn(self._refresh(node.tickets.refresh(key), verb, key))
        else:
            log.warning("announcement: unknown verb %r", verb)

    async def _record_changed(self, address: str) -> None:
        """Read ``address``'s record again (another worker changed it) and
        close its session here if the change retired the terminal or
        revoked the session's token.  The operator's kick finds the session
        through presence, where a login's claim is written only after
        WELCOME: a session that logged in a moment before the change (or
        whose HELLO read the record before it) is closed here instead of
        staying open on a revoked token."""
        rec = await self.node.registry.get(address)
        if rec is None or address not in self.node.hub.sessions:
            return
        if rec.retired:
            self.node.kick(address, "this terminal is retired")
        elif self._issued.get(address, 0) < rec.revoked_before:
            self.node.kick(address, "this terminal's tokens were revoked")

    @staticmethod
    async def _refresh(read, verb: str, argument: str) -> None:
        try:
            await read
        except Exception as exc:
            log.warning("%s: reading %s again failed: %s", verb, argument, exc)

    async def kick(self, address: str, reason: str) -> bool:
        """Ask the worker that holds ``address`` to close it (CLOSE KICKED);
        False when no other worker holds it."""
        owner = await self.presence.owner(address)
        if owner is None or owner == self.owner:
            return False
        return await self.broker.send_control(
            owner, b"\0".join((b"kick", address.encode(), reason.encode())))

    def _on_message(self, channel: str, lane: int, payload: bytes) -> None:
        """A channel message from the fleet (with a shared history; without
        one the in-process hub fans out itself and subscribes nothing)."""
        if channel == FLEET:
            self._on_announcement(payload)
            return
        if self.node.channels.interest is not None:
            self.node.channels.receive(channel, lane, payload)

    def _on_control(self, message: bytes) -> None:
        try:
            verb, address, raw = message.split(b"\0", 2)
            verb, address = verb.decode(), address.decode()
            if verb == "chan":          # (the argument is a lane byte and a placed message)
                channels = self.node.channels
                if channels.interest is not None:
                    channels.receive(address, raw[0], raw[1:])
                return
            if verb == "deliver":       # (binary: the stored messages, pack_delivery)
                self.node.delivery.deliver_notified(unpack_deliveries(raw))
                return
            if verb == "receipt":       # (binary: pack_receipt)
                receipt_here = self.node.delivery.receipt_here
                for receipt in unpack_receipts(raw):
                    receipt_here(*receipt)
                return
            argument = raw.decode()
        except (ValueError, IndexError, struct.error):
            log.warning("control: malformed message %r", message[:80])
            return
        if verb == "takeover":
            owner, _, since = argument.partition(" ")
            if owner != self.owner:
                try:
                    since = float(since or 0.0)
                except ValueError:
                    since = 0.0
                self.node.spawn(self._taken_over(address, since))
        elif verb == "inbox":
            notified = self.node.delivery.notified
            for line in argument.split("\n"):
                try:
                    terminal, lane, seq = line.rsplit(" ", 2)
                    lane, seq = int(lane), int(seq)
                except ValueError:
                    log.warning("control: malformed inbox line %r", line[:80])
                    continue
                if lane in (0, 1):
                    notified(terminal, lane, seq)
        elif verb == "kick":
            self.node.kick(address, argument or "disconnected by an operator")
        else:
            log.warning("control: unknown verb %r", verb)

    async def _taken_over(self, address: str, since: float) -> None:
        """Another worker claimed ``address`` for a login at ``since``: close
        the session here, unless it is the newer login (claims are written
        in no particular order across workers: the newest login wins, so a
        terminal that reconnected at once keeps its new session), then
        claim it back."""
        conn = self.node.hub.sessions.get(address)
        if conn is None:
            return
        if self._since.get(address, 0.0) > since:
            if conn.claims is not None:
                self._claim_again(address, conn.claims)
            return
        owner = await self.presence.owner(address)
        if owner != self.owner:
            self._close(address, owner)

    def _close(self, address: str, owner: str | None) -> None:
        """Close the session here that worker ``owner`` took over (audited
        like a takeover on one worker, naming the worker instead of the
        new connection's peer)."""
        conn = self.node.hub.sessions.get(address)
        if conn is not None and conn.state != CLOSED:
            self.node.counters.takeovers += 1
            if self.node.audit is not None:
                self.node.commands.audit_conn("takeover", conn, None, worker=owner or "")
            self.node.close(conn, Code.TAKEOVER,
                            "the terminal logged in on another connection")

    # -- renewal ----------------------------------------------------------------------

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.renew_every)
            try:
                await self.renew()
            except Exception as exc:        # the next round tries again, within the lease
                log.warning("presence: renewing this node's leases failed: %s", exc)

    async def renew(self) -> None:
        """Renew every session's lease; close the sessions another worker took
        over, claim again those whose lease ran out."""
        addresses = list(self.node.hub.sessions)
        for i in range(0, len(addresses), RENEW_SLICE):
            lost = await self.presence.refresh(addresses[i:i + RENEW_SLICE], self.owner,
                                               self.lease)
            for address in lost:
                conn = self.node.hub.sessions.get(address)
                if conn is None or conn.claims is None or address in self._unwritten:
                    # (a login here whose claim is not written yet: the lease
                    # is still the previous session's, elsewhere; the claim
                    # settles who keeps the terminal, the newer login)
                    continue
                owner = await self.presence.owner(address)
                if owner is None:
                    self._claim_again(address, conn.claims)
                else:
                    self._close(address, owner)
            await asyncio.sleep(0)
