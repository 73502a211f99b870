"""Per-connection command handling: the life of a terminal's session.

What centrifuge keeps in client.go: a connection's arrival (caps), its
handshake (HELLO: token, revocation, takeover, WELCOME; RESUME), its
deadlines (auth and heartbeat, on the node's timing wheel), each frame it
sends (``on_frame`` dispatches; channel requests go to ``channels.py``,
P0/P1 to ``delivery.py``, retail kinds to the services) and the limits
that keep one connection from costing the others (send windows and rates,
the control budget, stalls).  No frame handler awaits: what needs the store
is handed to delivery (group commit) or to a task.

State owned here: the connections still in their handshake, the open
connection count and the per-tenant session counts.
"""

from __future__ import annotations

import logging
import math
import time

import orjson

from ..core import wheel as _wheel
from ..core.codes import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Code,
    Flag,
    FrameType,
    Lane,
)
from ..core.errors import AuthError
from ..core.session import CLOSED, OPEN
from . import kinds
from .address import AddressError, check_publish, implied_channels, parse_address
from .auth import verify_token
from .connection import (
    AGAIN_AFTER_HOLDS,
    HOLD_AUTH,
    HOLD_BUDGET,
    HOLD_LOOKUP,
    RESUMING,
    STALL_HOLDS,
    STOP_AFTER,
    InboxState,
    TerminalConnection,
)
from .delivery import SATURATED_WAIT
from .hub import parse_positions
from .limits import SendLimits
from .offers import POLICY_KINDS
from .retry import AT_ONCE, InOrder
from .store import NewMessage
from .terminals import TerminalRecord

log = logging.getLogger("tillwire.commands")

# Roles whose P1 to a terminal does not depend on the terminal's store (PROTOCOL.md 9.1).
_ANY_STORE = frozenset({"backend", "service"})

_LANE_MASK = int(Flag.LANE_MASK)
_ACK_REQUESTED = int(Flag.ACK_REQUESTED)
_RECEIPT_REQUESTED = int(Flag.RECEIPT_REQUESTED)
# Plain ints for the per-message paths: an IntEnum member lookup costs about
# 0.2 us on Python 3.11, and a SEND's path took a dozen of them.
_P0, _P1, _P3 = int(Lane.P0), int(Lane.P1), int(Lane.P3)
WINDOW_RETRY_MS = 100        # the retry hint of TOO_MANY_UNACKED (a commit takes a few ms)
_HANDSHAKE = frozenset({int(FrameType.HELLO), int(FrameType.RESUME), int(FrameType.CLOSE)})


def retry_hint(seconds: float, text: str) -> str:
    """The text of an ERROR RATE_LIMITED or TOO_MANY_UNACKED: ``retry_ms=<n> ``
    then the reason (PROTOCOL.md section 7, ERROR)."""
    return f"retry_ms={max(1, math.ceil(seconds * 1000))} {text}"


def _ignore(offset: int) -> None:
    """A P2/P3 SEND without ACK_REQUESTED: nothing to answer."""


def _deadline_due(conn: TerminalConnection) -> None:
    # A plain function, not a bound method: every connection's timer shares it.
    conn.node.commands.on_deadline(conn)


class Commands:
    """The node's command handling (one per node)."""

    def __init__(self, node) -> None:
        self.node = node
        cfg = self.cfg = node.cfg
        self.loop = node.loop
        self.hub = node.hub
        self.store = node.store
        self.registry = node.registry
        self.wheel = node.wheel
        self.encoder = node.encoder
        self.counters = node.counters
        self.limits = node.limits
        self.sources = node.sources
        self.secret = cfg.auth.secret
        self.auth_timeout = cfg.server.auth_timeout
        self.max_connections = node.max_connections
        self.max_frame_size = node.max_frame_size
        self.max_queued_bytes = node.max_queued_bytes
        self.control_budget = node.control_budget
        self.max_send_body = cfg.limits.max_send_body
        self.max_body_depth = cfg.limits.max_body_depth
        self.node_id = node.node_id
        self.mark_dirty = node.mark_dirty
        self.close = node.close
        self.slow_consumer = node.slow_consumer
        self.spawn = node.spawn
        self.channels = node.channels
        self.delivery = node.delivery
        # Connections that have not authenticated yet; authenticated ones live
        # in hub.sessions (so an idle terminal costs no entry here).
        self.unauthenticated: set[TerminalConnection] = set()
        self.connection_count = 0
        self._tenant_sessions: dict[str, int] = {}   # (only with max_connections_per_tenant)
        # Registry puts, in order (the registry may be across a network; the
        # connection's claims already are the new record meanwhile).
        self._puts = InOrder(self.spawn, self.registry.put_login,
                             lambda rec: f"registry: putting {rec.address}",
                             lambda: node.stopping, key=lambda rec: rec.address,
                             parallel=AT_ONCE)
        channels, delivery = self.channels, self.delivery
        self._handlers = {      # frame type -> handler of a frame the session passed on
            int(FrameType.SEND): self._on_send, int(FrameType.ACK): delivery.on_ack,
            int(FrameType.HELLO): self._on_hello, int(FrameType.RESUME): self._on_resume,
            int(FrameType.NACK): self._on_nack_frame,
            int(FrameType.SUBSCRIBE): channels.on_subscribe,
            int(FrameType.UNSUBSCRIBE): channels.on_unsubscribe,
            int(FrameType.HISTORY): channels.on_history,
            int(FrameType.RECEIPT): self._on_receipt_frame,
            int(FrameType.CLOSE): self._on_close_frame,
        }
        # The P1 kinds a retail service takes over, to its handler (one dict
        # probe per SEND; other kinds route as usual).
        self._services = {
            "ticket.open": node.tickets.on_open, "ticket.assign": node.tickets.on_update,
            "ticket.reply": node.tickets.on_update, "ticket.resolve": node.tickets.on_update,
            "chat.message": node.chat.on_message,
        }
        self.service_kinds = frozenset(self._services)
        self._ticket_login = node.tickets.on_login     # (waiting tickets: staff resumed)

    def on_deadline(self, conn: TerminalConnection) -> None:
        """The connection's auth or heartbeat deadline came: close it or re-arm."""
        if conn.transport is None or conn.transport.is_closing():
            return
        now = self.loop.time()
        deadline = conn.deadline(self.auth_timeout)
        if now < deadline:
            self.wheel.schedule(conn.timer, deadline)
            # An idle connection gives its lane queues back until its next message.
            self.node.add_lane_totals(conn.release_lanes())
            return
        if conn.heartbeat_ms == 0:
            self.close(conn, Code.AUTH_TIMEOUT, f"no HELLO within {self.auth_timeout:g} s")
        else:
            self.counters.heartbeat_timeouts += 1
            self.close(conn, Code.HEARTBEAT_TIMEOUT,
                       f"nothing received for {1.5 * conn.heartbeat_ms / 1000:g} s")

    def on_connection_made(self, conn: TerminalConnection) -> None:
        self.unauthenticated.add(conn)
        self.connection_count += 1
        self.counters.connections += 1
        if self.node.draining:
            conn.close(Code.DRAINING, "server is draining")
            self.mark_dirty(conn)
            return
        refused = ""
        if self.connection_count > self.max_connections:
            refused = f"this server holds its most connections ({self.max_connections})"
        elif self.sources.per_source:
            source = self._peer(conn)
            if self.sources.connect(source):
                conn.extra = {"source": source}     # counted: uncounted when it goes
            else:
                refused = (f"too many connections from {source} "
                           f"(limits.max_connections_per_source {self.sources.per_source})")
        if refused:
            # Refused before any byte is read: CLOSE and go (no read, no timer).
            self.counters.connections_refused += 1
            conn.close(Code.CONNECTION_LIMIT, refused + "; reconnect later")
            self.mark_dirty(conn)
            return
        conn.timer = _wheel.Timer(_deadline_due, conn)
        self.wheel.schedule(conn.timer, conn.started + self.auth_timeout)

    def on_connection_lost(self, conn: TerminalConnection) -> None:
        self.unauthenticated.discard(conn)
        self.connection_count -= 1
        # Cancel the timers and drop them: each holds the connection, and a
        # connection left in a cycle waits for a full collection (rare; see
        # gcpolicy) instead of being freed now.
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        inbox = conn.inbox
        if inbox.__class__ is InboxState:
            if inbox.timer is not None:
                inbox.timer.cancel()
                inbox.timer = None
            inbox.drop_early(0)
            inbox.drop_early(1)
        self.node.add_lane_totals(conn.lane_counters())
        if conn.state != CLOSED:
            conn.close(Code.NORMAL, "connection lost")
        claims = conn.claims
        extra = conn.extra
        if claims is not None:
            self.hub.detach(conn, claims)
            if self.node.ownership is not None:
                self.node.ownership.released(conn.address)
            if extra:
                for stream in extra.get("explicit", ()):
                    self.hub.unsubscribe(stream, conn, self.loop.time())
                interest = self.channels.interest
                if interest is not None:
                    interest.remove(extra.pop("interest", ()))
                    interest.remove([s.name for s in extra.get("explicit", ())])
            if self._tenant_sessions and extra and extra.get("tenant_counted"):
                self._tenant_left(claims.tenant)
        if extra:
            source = extra.get("source")
            if source is not None:
                self.sources.disconnect(source)
            for handle in (extra.get("stall_timer"), extra.get("auth_timer")):
                if handle is not None:
                    handle.cancel()
        conn.transport = None

    def audit_conn(self, event: str, conn, claims=None, **detail) -> None:
        """Write one audit line about a terminal connection (audit is set)."""
        claims = claims or conn.claims
        transport = conn.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if transport is not None:
            cert = transport.get_extra_info("peercert")
            if cert:
                subject = dict(x[0] for x in cert.get("subject", ()) if x)
                detail["cert"] = subject.get("commonName", "")
        self.node.audit.write(event, conn.address or "",
                         tenant=claims.tenant if claims is not None else "",
                         terminal=claims.terminal if claims is not None else "",
                         peer=peer[0] if peer else "", detail=detail or None)

    def on_frame(self, conn: TerminalConnection, frame):
        """Handle one frame; None, or the seconds the frame (and the ones
        after it) must wait before it can be taken (a rate)."""
        handler = self._handlers.get(frame.type)
        if handler is None:
            return None
        if conn.claims is None and frame.type not in _HANDSHAKE:
            return None     # its HELLO was refused (or is held): what follows is not read
        return handler(conn, frame)

    def check_budget(self, conn: TerminalConnection) -> None:
        """Stop reading a connection whose control frames are over their
        budget (answers it asked for and does not read); read again once
        they drained to half of it.  One whose control frames pass the
        connection's whole budget is closed with SLOW_CONSUMER at once (its
        P0/P1 messages stay in the store); see also :meth:`watch_stall`."""
        queued = conn.control_bytes
        if queued > self.control_budget:
            if queued > self.max_queued_bytes:
                self.slow_consumer(conn)
                return
            if not conn.holds & HOLD_BUDGET:
                self.counters.budget_holds += 1
                conn.hold(HOLD_BUDGET)
                self.watch_stall(conn)
        elif queued <= self.control_budget // 2 and conn.holds & HOLD_BUDGET:
            conn.release(HOLD_BUDGET)

    def watch_stall(self, conn: TerminalConnection) -> None:
        """A connection stopped being read because it does not read what it
        asked for (a PONG, answers over the budget, a HISTORY answer): if it
        stays so for ``delivery.slow_consumer_timeout``, close it with
        SLOW_CONSUMER."""
        extra = conn.extra
        extra.setdefault("stall_since", self.loop.time())
        if extra.get("stall_timer") is None:
            extra["stall_timer"] = self.loop.call_later(self.cfg.delivery.slow_consumer_timeout,
                                                        self._on_stall, conn)

    def _on_stall(self, conn: TerminalConnection) -> None:
        extra = conn.extra
        if extra is None:
            return
        extra.pop("stall_timer", None)
        if not conn.holds & STALL_HOLDS or conn.state == CLOSED:
            extra.pop("stall_since", None)
            return
        now = self.loop.time()
        timeout = self.cfg.delivery.slow_consumer_timeout
        since = extra.get("stall_since", now)
        if now - since >= timeout:
            self.slow_consumer(conn)
        else:                       # (held again lately: wait out its own time)
            extra["stall_timer"] = self.loop.call_later(since + timeout - now, self._on_stall,
                                                        conn)

    def _send_limits(self, conn: TerminalConnection) -> SendLimits:
        """The connection's SEND limits (made on its first SEND)."""
        extra = conn.extras()
        limits = extra.get("limits")
        if limits is None:
            limits = extra["limits"] = SendLimits(self.limits.for_roles(conn.claims.roles))
        return limits

    def _tenant_left(self, tenant: str) -> None:
        n = self._tenant_sessions.get(tenant, 0) - 1
        if n > 0:
            self._tenant_sessions[tenant] = n
        else:
            self._tenant_sessions.pop(tenant, None)


    def _on_close_frame(self, conn: TerminalConnection, frame) -> None:
        self.mark_dirty(conn)

    def _on_nack_frame(self, conn: TerminalConnection, frame) -> None:
        self.spawn(self.delivery.on_nack(conn, frame))

    def _on_receipt_frame(self, conn: TerminalConnection, frame) -> None:
        self.spawn(self.delivery.on_read_receipt(conn, frame))


    def _on_hello(self, conn: TerminalConnection, frame, looked_up: bool = False):
        # (Handled even when bytes after it in the same read closed the session:
        # frames before a bad one are valid, PROTOCOL.md 16; its WELCOME then
        # is not sent, as nothing follows a CLOSE.)
        if frame.version < MIN_PROTOCOL_VERSION:
            return self._refuse(conn, Code.UNSUPPORTED_VERSION,
                                f"this server speaks protocol versions {MIN_PROTOCOL_VERSION}-"
                                f"{PROTOCOL_VERSION}")
        now = time.time()
        try:
            claims = verify_token(self.secret, frame.token, now=now,
                                  leeway=self.cfg.auth.clock_skew)
        except AuthError as exc:
            return self._refuse(conn, exc.code, str(exc))
        address = claims.address           # built once; every index shares it
        record = self.registry.cached(address)
        if record is None and self.node.shared_registry and not looked_up:
            # A registry shared by a fleet: this worker may not have the record
            # (retired or revoked through another worker): read it first, the
            # frames behind the HELLO waiting.
            conn.hold(HOLD_LOOKUP)
            self.spawn(self._look_up(conn, frame, claims))
            return STOP_AFTER
        if record is not None and (record.retired or claims.issued_at < record.revoked_before):
            return self._refuse(conn, Code.TOKEN_REVOKED,
                                "this terminal is retired" if record.retired
                                else "this terminal's tokens were revoked", claims)
        cap = self.cfg.limits.max_connections_per_tenant
        if cap:
            old = self.hub.sessions.get(address)
            if old is not None and old.extra and old.extra.pop("tenant_counted", None):
                pass                    # a takeover: the session's count moves to this one
            elif self._tenant_sessions.get(claims.tenant, 0) >= cap:
                self.counters.connections_refused += 1
                conn.close(Code.CONNECTION_LIMIT,
                           f"tenant {claims.tenant} holds its most sessions ({cap}, "
                           "limits.max_connections_per_tenant); reconnect later")
                self.mark_dirty(conn)
                return
            else:
                self._tenant_sessions[claims.tenant] = \
                    self._tenant_sessions.get(claims.tenant, 0) + 1
            conn.extras()["tenant_counted"] = True
        old = self.hub.sessions.get(address)
        if old is not None and old is not conn:
            self.counters.takeovers += 1
            if self.node.audit is not None:
                self.audit_conn("takeover", old, None, by=self._peer(conn))
            self.close(old, Code.TAKEOVER, "the terminal logged in on another connection")
            self.hub.detach(old, old.claims)
        conn.claims = claims
        conn.address = address
        self.hub.sessions[address] = conn
        if self.node.ownership is not None:
            self.node.ownership.claimed(address, claims)
        self.unauthenticated.discard(conn)
        hb = self.cfg.heartbeat
        wanted = frame.heartbeat / 1000.0 if frame.heartbeat else hb.interval
        heartbeat = min(max(wanted, hb.min), hb.max)
        info = orjson.dumps({
            "terminal": address, "tenant": claims.tenant, "store": claims.store,
            "region": claims.region, "roles": list(claims.roles), "member": claims.member,
            "node": self.node_id, "worker": self.node.worker,
        })
        conn.accept(min(frame.version, PROTOCOL_VERSION), int(heartbeat * 1000),
                    int(now * 1000), self.max_frame_size, self.store.epoch, info)
        self.counters.auth_ok += 1
        if self.node.audit is not None:
            self.audit_conn("auth.ok", conn, claims, roles=list(claims.roles),
                             store=claims.store)
        # From now on the deadline is the heartbeat's, not the auth timeout's.
        self.wheel.schedule(conn.timer, conn.deadline(self.auth_timeout))
        # From here on the connection's identity is its registry record: the
        # same tenant, store, region, roles and member as the token, shared
        # with the registry instead of a second object per connection.
        conn.claims = self._register(conn, claims, now)

    def _refuse(self, conn: TerminalConnection, code: int, reason: str, claims=None):
        """Refuse a login.  A source address that keeps failing gets its
        answer later and later (``limits.auth_fail_delay_max``): the
        connection is held, unread, meanwhile (returns STOP_AFTER then)."""
        self.counters.auth_failures += 1
        peer = self._peer(conn)
        if self.node.audit is not None:
            name = Code(code).name
            self.node.audit.write_repeated(
                "auth.fail", peer, name, conn.address or "",
                tenant=claims.tenant if claims is not None else "",
                terminal=claims.terminal if claims is not None else "",
                detail={"code": name, "reason": reason})
        delay = 0.0
        if code != Code.UNSUPPORTED_VERSION:
            delay = self.sources.auth_failed(peer, self.loop.time())
        if delay:
            self.counters.auth_delays += 1
            conn.hold(HOLD_AUTH)
            conn.extra["auth_timer"] = self.loop.call_later(delay, self._refuse_late, conn,
                                                            code, reason)
            return STOP_AFTER
        conn.close(code, reason)
        self.mark_dirty(conn)
        return None

    def _refuse_late(self, conn: TerminalConnection, code: int, reason: str) -> None:
        conn.extra.pop("auth_timer", None)
        conn.extra.pop("backlog", None)     # (what it sent after HELLO goes unread)
        if conn.transport is not None:
            conn.close(code, reason)
            self.mark_dirty(conn)

    @staticmethod
    def _peer(conn) -> str:
        transport = conn.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return peer[0] if peer else ""

    def _register(self, conn, claims, now: float) -> TerminalRecord:
        """Record the terminal in the registry; returns its (shared) record."""
        rec = self.registry.cached(conn.address)
        if (rec is not None and rec.store == claims.store and rec.region == claims.region
                and rec.roles == claims.roles and rec.member == claims.member
                and now - rec.last_seen < 3600):
            return rec
        new = TerminalRecord(conn.address, claims.tenant, claims.terminal, claims.store,
                             claims.region, tuple(claims.roles), claims.member,
                             rec.first_seen if rec else now, now,
                             rec.retired if rec else False, rec.revoked_before if rec else 0.0)
        self._puts.add(new)
        self.delivery.register_later(new)
        return new

    def _on_resume(self, conn: TerminalConnection, frame) -> None:
        claims = conn.claims
        if claims is None:          # HELLO was refused (or its answer is held); closing
            return
        try:
            positions = parse_positions(frame.payload)
        except (ValueError, AddressError) as exc:
            conn.error(Code.BAD_REQUEST, 0, str(exc))
            positions = {}
        self.hub.attach(conn, claims)
        names = implied_channels(claims)
        interest = self.channels.interest
        if interest is not None:
            interest.add(names)
            conn.extras()["interest"] = names
            waiting = [n for n in names if n in interest.priming]
            if waiting:
                # (channels this worker has are joined now: their broadcasts
                # may come at once; the others once primed, each announced as
                # the priming makes its stream)
                self.spawn(self._join_primed(conn, waiting, positions))
                names = [n for n in names if n not in interest.priming]
        now = self.loop.time()
        for stream in self.hub.streams_of(names):
            self.channels.join(conn, stream, positions.get((stream.name, stream.lane)), now)
        same_epoch = frame.epoch == self.store.epoch
        conn.inbox = RESUMING
        self.spawn(self.delivery.resume(conn, frame.p0 if same_epoch else 0,
                                       frame.p1 if same_epoch else 0))
        # (After RESUME, when its inbox delivers: a ticket handed over meanwhile
        # is noted by the resume, see Delivery.resume.)
        self._ticket_login(conn.address, claims)
        self.mark_dirty(conn)

    async def _join_primed(self, conn: TerminalConnection, names, positions) -> None:
        """Catch a resumed session up on its channels once this worker's
        mirrors of them are primed from the fleet's history."""
        await self.channels.interest.wait(names)
        if conn.state != OPEN:
            return
        now = self.loop.time()
        for stream in self.hub.streams_of(names):
            self.channels.join(conn, stream, positions.get((stream.name, stream.lane)), now)
        self.mark_dirty(conn)

    async def _look_up(self, conn: TerminalConnection, frame, claims) -> None:
        address = claims.address
        try:
            rec = await self.registry.get(address)      # (keeps what it read in the cache)
            if rec is None:
                # Its first login anywhere: registered before WELCOME, so a
                # payment result sent from any worker right after finds it
                # known (delivery.unknown_terminals).
                now = time.time()
                rec = TerminalRecord(address, claims.tenant, claims.terminal, claims.store,
                                     claims.region, tuple(claims.roles), claims.member, now,
                                     now, False, 0.0)
                await self.registry.put(rec)
                self.delivery.register_later(rec)
        except Exception as exc:
            log.warning("registry: reading %s at its login failed: %s", address, exc)
            if conn.state != CLOSED:
                conn.close(Code.SHUTDOWN, "the terminal registry could not be read; reconnect")
                self.mark_dirty(conn)
            return
        if conn.state == CLOSED:
            return
        try:
            self._on_hello(conn, frame, looked_up=True)
        finally:
            self.mark_dirty(conn)
            conn.release(HOLD_LOOKUP)

    async def _look_up_recipient(self, conn: TerminalConnection, to: str) -> None:
        try:
            await self.registry.get(to)     # (kept in the cache; None: refused as unknown)
        except Exception as exc:           # (the SEND is then checked without it)
            log.warning("registry: reading %s for a SEND failed: %s", to, exc)
        conn.extras()["looked_up"] = to
        conn.release(HOLD_LOOKUP)

    def _on_send(self, conn: TerminalConnection, frame):
        lane = frame.flags & _LANE_MASK
        ref = frame.ref
        counters = self.counters
        extra = conn.extra
        limits = extra.get("limits") if extra is not None else None
        if limits is None:
            limits = self._send_limits(conn)
        if lane <= _P1 and self.delivery.saturated:
            # The store is behind: stop reading this sender until it caught up
            # (the frame is handled then), rather than queue without bound.
            counters.store_waits += 1
            return SATURATED_WAIT
        if (lane == _P1 and self.node.shared_registry and frame.to.startswith("terminal:")
                and self.registry.cached(frame.to) is None
                and not _ANY_STORE.intersection(conn.claims.roles)
                and (extra is None or extra.get("looked_up") != frame.to)):
            # A fleet: the recipient's store (what the store's devices may
            # reach) is in the shared registry; read it first, this frame and
            # those behind it waiting.
            conn.hold(HOLD_LOOKUP)
            self.spawn(self._look_up_recipient(conn, frame.to))
            return AGAIN_AFTER_HOLDS
        if limits.role.rate:
            now = self.loop.time()
            wait = limits.take(lane, now)
            if wait:
                # (The frames of this read have waited since it was deferred.)
                waited = now - conn.extra.get("since", now)
                if waited + wait <= self.cfg.limits.send_wait_max:
                    counters.rate_waits += 1
                    return wait         # stop reading this connection until its next token
                counters.rate_refusals += 1
                counters.refuse("terminal", "RATE_LIMITED")
                conn.error(Code.RATE_LIMITED, ref, retry_hint(
                    wait, f"over this connection's P{lane} send rate "
                          f"({limits.role.rate}/s, limits.send_rate) for more than "
                          f"{self.cfg.limits.send_wait_max:g} s"))
                self.mark_dirty(conn)
                return None
        counters.lane_frames_in[lane] += 1
        counters.lane_bytes_in[lane] += len(frame.payload)
        try:
            if len(frame.payload) > self.max_send_body:
                raise kinds.MessageError(
                    Code.BAD_MESSAGE, f"{frame.kind}: body: {len(frame.payload)} bytes, more "
                    f"than the {self.max_send_body} a terminal may send (limits.max_send_body)",
                    "body")
            address = parse_address(frame.to)
            to = str(address)
            recipient_store = None
            recipients = None            # (None: Registry.members works them out)
            if address.scope == "terminal":
                rec = self.registry.cached(to)
                if rec is not None:         # (one lookup, not two; a miss: delivery asks
                    recipient_store = rec.store     # the registry whether it is known)
                    recipients = self.registry.terminal_members(to, rec)
            check_publish(conn.claims, address, lane, frame.kind, recipient_store)
            checked = kinds.check(frame.kind, lane, frame.payload, frame.key,
                                  max_depth=self.max_body_depth)
            service = self._services.get(frame.kind)
            if service is not None and lane != _P1:
                raise kinds.MessageError(Code.BAD_MESSAGE, f"{frame.kind}: lane: must be P1",
                                         "lane")
            if lane <= _P1:
                window = limits.role.window
                if window and limits.unacked >= window:
                    return self._window_full(conn, limits, ref)
                limits.unacked += 1         # until answered (a service's or the commit's)
            if service is not None:
                try:
                    taken = service(conn, frame, address, checked.body)
                except BaseException:
                    limits.unacked -= 1     # refused: answered below, not counted
                    raise
                if taken:
                    return None     # the service stores, routes and answers it
                # (not taken: routed as any P1 below, still counted)
        except (AddressError, kinds.MessageError) as exc:
            if exc.code == Code.FORBIDDEN:
                counters.acl_denials += 1
                if self.node.audit is not None:
                    self.audit_conn("acl.deny", conn, None, op="send", to=frame.to,
                                     kind=frame.kind, lane=f"P{lane}", reason=str(exc))
            counters.refuse("terminal", Code(exc.code).name)
            conn.error(exc.code, ref, str(exc))
            self.mark_dirty(conn)
            return None
        want_ack = frame.flags & _ACK_REQUESTED
        if lane <= _P1:
            ttl = frame.ttl / 1000.0 if frame.ttl else (
                self.cfg.delivery.p0_ttl if lane == _P0 else self.cfg.delivery.p1_ttl)
            now = time.time()
            msg = NewMessage(conn.claims.tenant, conn.address, ref, lane, frame.kind,
                             to, frame.payload, now, now + ttl,
                             bool(frame.flags & _RECEIPT_REQUESTED))
            self.delivery.submit(msg, address, (conn, ref, want_ack, limits), recipients)
            return None
        report = {} if lane == _P3 and frame.kind in POLICY_KINDS else None
        self.channels.broadcast(
            address, lane, frame.kind, checked.key, checked.version, frame.payload,
            frame.ttl / 1000.0 if frame.ttl else 0.0, report,
            (lambda offset: self._published(conn, ref, address, report, offset)) if want_ack
            else _ignore)
        return None

    def _published(self, conn: TerminalConnection, ref: int, address, report,
                   offset: int | None) -> None:
        """SENDACK a P2/P3 SEND once its stream placed it (offset 0: stale;
        None: a shared history or the broker failed)."""
        if offset is None:
            self.node.request_error(conn, ref, Code.STORE_UNAVAILABLE,
                                    f"{address}: the channel message could not be placed; retry")
        elif conn.state == OPEN:
            self.delivery.sendack(conn, ref, 0, orjson.dumps(
                {"channel": str(address), "offset": offset, **(report or {})})
                if offset else b'{"stale":true}')

    def _window_full(self, conn: TerminalConnection, limits: SendLimits, ref: int) -> None:
        """Refuse a P0/P1 SEND beyond the connection's window (TOO_MANY_UNACKED)."""
        self.counters.window_refusals += 1
        self.counters.refuse("terminal", "TOO_MANY_UNACKED")
        conn.error(Code.TOO_MANY_UNACKED, ref, retry_hint(
            WINDOW_RETRY_MS / 1000.0, f"{limits.unacked} SENDs of this connection await their "
                                      f"SENDACK, the most it may have (limits.unacked_sends)"))
        self.mark_dirty(conn)
