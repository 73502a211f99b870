"""The node: one server process's sessions, routing, delivery and timers.

``Node`` composes the parts (centrifuge's node.go): the hub (local routing
and channel streams), the store (P0/P1 inboxes), the registry (every known
terminal), one timing wheel (heartbeats, auth timeouts, retransmits) and the
listening sockets.  Connections hand it frames (``on_frame``); it validates,
authorizes, stores, routes and queues output, and one flush per loop
iteration writes each dirty connection once.

Delivery of P0/P1 (PROTOCOL.md 11): a message is stored first (group commit,
``Store.accept_many``), the sender gets SENDACK only after that, and each
recipient's inbox is drained in seq order into its lanes, at most
``inflight`` unacked messages per lane, with retransmits on the wheel.  The
store is the source of truth: live messages are handed over directly only
when they are next in line; otherwise a pump task reads the store.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import os
import random
import socket
import time

import orjson

from ..core import wheel as _wheel
from ..core.codes import (
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Code, Flag, FrameType, Lane, ReceiptStatus,
)
from ..core.errors import AuthError
from ..core.session import CLOSED, OPEN, OVERFLOW, Encoder, Frame, fanout
from . import kinds
from .address import AddressError, check_publish, check_subscribe, implied_channels, parse_address
from .auth import verify_token
from .connection import (HOLD_ANSWERS, HOLD_AUTH, HOLD_BUDGET, HOLD_PONG, RESUMING,
                         STALL_HOLDS, STOP_AFTER, InboxState, TerminalConnection)
from .hub import Hub, parse_positions
from .limits import Bucket, Policy, SendLimits, Sources, default_max_connections
from .chat import Chat
from .directory import Directory
from .offers import POLICY_KINDS, Offers
from .registry_memory import MemoryRegistry
from .store import NewMessage, StreamEntry, TerminalRecord
from .tickets import Tickets

log = logging.getLogger("tillwire.node")

# Plain ints for the hot paths: an int & IntFlag goes through the enum
# machinery (microseconds), an int & int does not.
_LANE_MASK = int(Flag.LANE_MASK)
_ACK_REQUESTED = int(Flag.ACK_REQUESTED)
_RETRANSMIT = int(Flag.RETRANSMIT)
_RECEIPT_REQUESTED = int(Flag.RECEIPT_REQUESTED)
# Plain ints for the per-message paths: an IntEnum member lookup costs about
# 0.2 us on Python 3.11, and a SEND's path took a dozen of them.
_P0, _P1, _P3 = int(Lane.P0), int(Lane.P1), int(Lane.P3)
_RECIPIENTS = tuple(orjson.dumps({"recipients": n}) for n in range(64))
WINDOW_RETRY_MS = 100        # the retry hint of TOO_MANY_UNACKED (a commit takes a few ms)
_HANDSHAKE = frozenset({int(FrameType.HELLO), int(FrameType.RESUME), int(FrameType.CLOSE)})


async def _none():
    return None


def _finish_now(coro):
    """Run a registry coroutine that does not suspend to its result (issue 17
    branch shim for the synchronous callers; see Node.members_now)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the registry suspended: its caller must await it")


def _offset_of(entry) -> int:
    return entry.offset


def retry_hint(seconds: float, text: str) -> str:
    """The text of an ERROR RATE_LIMITED or TOO_MANY_UNACKED: ``retry_ms=<n> ``
    then the reason (PROTOCOL.md section 7, ERROR)."""
    return f"retry_ms={max(1, math.ceil(seconds * 1000))} {text}"


def _recipients_payload(n: int) -> bytes:
    """The SENDACK payload of a message stored for ``n`` recipients."""
    return _RECIPIENTS[n] if n < 64 else orjson.dumps({"recipients": n})

PUMP_BATCH = 128             # store rows read per pump step
INBOX_POOL = 1024            # InboxStates kept for reuse (656 B each with its timer)
STOP_GRACE = 2.0             # seconds stop() waits for in-flight commits and service tasks
SNAPSHOT_SLICE = 256         # snapshot entries pushed per flush while resyncing
SEND_HEADER_ROOM = 1024      # bytes of a SEND's fields (ref, ttl, to, kind, key) over its body
STREAM_SWEEP = 60.0          # seconds between sweeps for idle streams
SWEEP_SLICE = 1000           # streams looked at per loop iteration of a sweep


class Histogram:
    """A fixed-bucket histogram of seconds: one bisect and three int/float
    additions per observation (``server/metrics.py`` turns it into the
    Prometheus form at scrape time)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds) -> None:
        self.bounds = tuple(bounds)              # upper bounds, ascending; +Inf implied
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


STORE_WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                       2.5, 5.0)
ACK_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                       10.0, 30.0)


class Counters:
    """Plain counters the metrics module reads (one object, no per-event cost).

    The ``lane_*`` lists are indexed by lane (P0..P3): SEND frames and their
    payload bytes received, and messages (and payload bytes) handed to
    terminals' lanes: P0/P1 deliveries (retransmits included) and P2/P3
    fan-out (one per subscriber the broadcast was queued for).
    """

    __slots__ = ("connections", "auth_failures", "heartbeat_timeouts", "slow_consumer_closes",
                 "takeovers", "acl_denials", "frames_in", "deliveries", "broadcasts",
                 "accepted", "duplicates", "conflated", "p2_dropped", "p3_dropped",
                 "retransmits", "writes", "bytes_out", "protocol_errors", "bytes_in",
                 "auth_ok", "kicks", "lane_frames_in", "lane_bytes_in", "lane_frames_out",
                 "lane_bytes_out", "store_write", "ack_latency", "read_yields",
                 "flush_yields", "rate_waits", "rate_refusals", "window_refusals",
                 "connections_refused", "auth_delays", "budget_holds", "ping_holds",
                 "subscription_refusals")

    _LISTS = ("lane_frames_in", "lane_bytes_in", "lane_frames_out", "lane_bytes_out")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)
        for name in self._LISTS:
            setattr(self, name, [0, 0, 0, 0])
        self.store_write = Histogram(STORE_WRITE_BUCKETS)    # seconds per accept_many batch
        self.ack_latency = Histogram(ACK_LATENCY_BUCKETS)    # P0/P1 delivery -> ack (sampled)

    def as_dict(self) -> dict:
        out = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, list):
                value = list(value)
            elif isinstance(value, Histogram):
                value = {"count": value.count, "sum": value.sum}
            out[name] = value
        return out


def _deadline_due(conn: TerminalConnection) -> None:
    # A plain function, not a bound method: every connection's timer shares it.
    conn.node._on_deadline(conn)


class Node:
    """One Tillwire server process."""

    def __init__(self, cfg, store, *, loop: asyncio.AbstractEventLoop | None = None,
                 node_id: str = "") -> None:
        self.cfg = cfg
        self.loop = loop or asyncio.get_event_loop()
        self.store = store
        self.node_id = node_id or f"{socket.gethostname()}-{os.getpid()}"
        srv = cfg.server
        self.secret = cfg.auth.secret
        # What a terminal may send: a SEND body of limits.max_send_body and its
        # header (announced in WELCOME; frames the server sends may be longer,
        # up to server.max_frame_size).  A compressed payload decompresses to
        # no more either: a small compression bomb costs nothing.
        self.max_frame_size = min(srv.max_frame_size,
                                  cfg.limits.max_send_body + SEND_HEADER_ROOM)
        self.max_queued_bytes = cfg.lanes.max_queued_bytes
        # Inbox delivery stops once a connection's queued P0/P1 frames take
        # half its budget, so they never overflow it merely because a backlog
        # is replayed.  Queued P2/P3 frames do not count: a P0/P1 push sheds
        # them, so a payment result never waits behind a promotion flood.
        self.inbox_budget = self.max_queued_bytes // 2
        self.inflight = cfg.delivery.inflight
        self.lane_weights = tuple(cfg.lanes.weights)
        self.send_buffer = srv.send_buffer
        self.notsent_lowat = srv.notsent_lowat
        self.write_high_water = srv.write_high_water
        self.write_chunk = srv.write_chunk
        # Seconds of frames one connection may have handled per turn (see
        # TerminalConnection.data_received); never below the last flush's
        # duration, so a fan-out still coalesces many frames per write.
        self._read_budget = srv.read_budget_ms / 1000.0
        self.read_budget = self._read_budget or float("inf")
        # Seconds of writes one flush does before the loop polls again; the
        # connections left keep their place at the head of the next flush.
        self.flush_slice = srv.flush_slice_ms / 1000.0 or float("inf")
        self.auth_timeout = srv.auth_timeout
        limits = cfg.limits
        self.limits = Policy(cfg)
        self.sources = Sources(limits.max_connections_per_source, limits.auth_fail_delay_max)
        self.max_connections = srv.max_connections or default_max_connections()
        self.handshake_frame = limits.handshake_frame
        self.max_send_body = limits.max_send_body
        self.max_body_depth = limits.max_body_depth
        # Control frames (answers to a terminal's own requests, receipts,
        # announcements) may take the half of the connection's budget that
        # the inbox does not: past it the node stops reading the connection.
        self.control_budget = self.max_queued_bytes // 2
        self._tenant_sessions: dict[str, int] = {}   # (only with max_connections_per_tenant)
        self.encoder = Encoder(srv.max_frame_size, srv.compress_threshold)
        self.hub = Hub(self.encoder, Frame, history_max=cfg.history.max_messages,
                       history_age=cfg.history.max_age)
        self.registry = MemoryRegistry()
        self.wheel = _wheel.TimingWheel(cfg.heartbeat.tick, cfg.heartbeat.wheel_size,
                                        self.loop.time())
        self.counters = Counters()
        # Connections that have not authenticated yet; authenticated ones live
        # in hub.sessions (so an idle terminal costs no entry here).
        self._unauthenticated: set[TerminalConnection] = set()
        self.connection_count = 0
        self._dirty: list[TerminalConnection] = []
        self._held = []          # [(dirty list, position)]: what a flush left (flush slices)
        self._flush_handle = None
        self._servers: list[asyncio.AbstractServer] = []
        self._tick_handle = None
        self._tasks: set[asyncio.Task] = set()
        self._pending_accepts: list = []
        self._committing = 0           # accept_many batches the store has not answered yet
        self._pending_registers: list[TerminalRecord] = []
        self._resuming: dict = {}      # connection -> highest seqs stored while it resumed
        # InboxStates of fully acked inboxes, with their retransmit timers,
        # kept for the next message to any terminal (see _inbox_state).
        self._inbox_pool: list[InboxState] = []
        self._pending_acks: dict[tuple[str, int], int] = {}
        self._pending_delivered: dict[tuple[str, int], list[int]] = {}
        self._batch_handle = None
        self._released_lane_totals = [0, 0, 0]   # of closed or released schedulers
        self.draining = False
        self.started = time.time()
        self.audit = None          # an audit.AuditLog (main.py sets it); None = no audit log
        self._maintenance_task = None
        self._drain_task = None
        self.exit_code = 0         # what `tillwire serve` exits with (1: the store failed for good)
        self._force_stop = False
        self._stopped = False
        self._stopped_event = asyncio.Event()
        self._handlers = {      # frame type -> handler of a frame the session passed on
            int(FrameType.SEND): self._on_send, int(FrameType.ACK): self._on_ack,
            int(FrameType.HELLO): self._on_hello, int(FrameType.RESUME): self._on_resume,
            int(FrameType.NACK): self._on_nack_frame,
            int(FrameType.SUBSCRIBE): self._on_subscribe,
            int(FrameType.UNSUBSCRIBE): self._on_unsubscribe,
            int(FrameType.HISTORY): self._on_history,
            int(FrameType.RECEIPT): self._on_receipt_frame,
            int(FrameType.CLOSE): self._on_close_frame,
        }
        # Retail services: the store directory, tickets, chat and the offer
        # policy.  _services maps the P1 kinds a service takes over to its
        # handler (one dict probe per SEND; other kinds route as usual).
        self.directory = Directory(cfg, store)
        self.tickets = Tickets(self, self.directory)
        self.chat = Chat(self)
        self.offers = Offers(self, self.directory)
        self._services = {
            "ticket.open": self.tickets.on_open, "ticket.assign": self.tickets.on_update,
            "ticket.reply": self.tickets.on_update, "ticket.resolve": self.tickets.on_update,
            "chat.message": self.chat.on_message,
        }
        self.service_kinds = frozenset(self._services)
        self.hub.set_kind_ages({"member.notice": cfg.retention.member_notice})

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, sock: socket.socket | None = None, ssl=None) -> None:
        if hasattr(self.store, "on_write_failure"):
            self.store.on_write_failure = self._on_store_failure
        await self.store.open()
        await self.registry.load(await self.store.terminals())
        history = self.cfg.history
        self.store.configure_streams(history.max_messages, history.max_age)
        unix_now, loop_now = time.time(), self.loop.time()
        # Member notices past their retention are not loaded back.
        await self.store.stream_expire_kind("member.notice",
                                            unix_now - self.cfg.retention.member_notice)
        for state in await self.store.load_streams(history.max_messages, history.max_age,
                                                   unix_now):
            self.hub.restore(state, loop_now, unix_now)
        await self.directory.load()
        await self.tickets.load()         # re-arms the escalation timers
        await self.chat.load()
        await self.offers.load()
        srv = self.cfg.server
        if sock is None:
            sock = self._listen_socket(srv.host, srv.port)
        server = await self.loop.create_server(lambda: TerminalConnection(self), sock=sock,
                                               backlog=srv.backlog, ssl=ssl)
        self._servers.append(server)
        self._schedule_tick()
        self._maintenance_task = self.spawn(self._maintenance())

    def _listen_socket(self, host: str, port: int) -> socket.socket:
        """The terminal listener.  Accepted sockets inherit its SO_SNDBUF and
        TCP_NOTSENT_LOWAT, so the small kernel buffers (a P0 never waits
        behind megabytes already handed to the kernel) cost nothing per
        connection.

        The low-water mark is what keeps a slow terminal's P0 near the head:
        without it the kernel takes P3 up to the whole send buffer, and the
        transport's buffer queues more behind that, all of it ahead of any
        later payment result (on a 2 Mbit/s link, most of a second).  With
        it the kernel holds about ``notsent_lowat`` unsent bytes and the rest
        stays in the lanes, where P0 goes first and P3 can be shed."""
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)
        lowat = getattr(socket, "TCP_NOTSENT_LOWAT", None)
        if self.notsent_lowat and lowat is not None and family in (socket.AF_INET,
                                                                    socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, lowat, self.notsent_lowat)
        sock.bind(addr)
        sock.setblocking(False)
        return sock

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for server in self._servers for s in server.sockets]

    async def stop(self, code: int = Code.SHUTDOWN, reason: str = "server stopping") -> None:
        if self._stopped:
            return
        self._stopped = True
        # Escalation timers go first: one firing during the grace wait below would
        # send after the commits were waited for (and be lost); a ticket due now
        # stays open in the store and escalates right after the next start.
        self.tickets.close()
        for server in self._servers:
            server.close()
        for conn in self.all_connections():
            conn.close(code, reason)
            self.mark_dirty(conn)
        self.flush_slice = float("inf")     # every CLOSE goes out now, not in slices
        self._flush()
        await self._flush_batches()
        # Let in-flight commits and the services' follow-ups (history records,
        # ticket answers) finish: what was accepted keeps its side records.
        grace_end = self.loop.time() + STOP_GRACE
        while (self._pending_accepts or self._committing) and self.loop.time() < grace_end:
            await asyncio.sleep(0.005)
        busy = self._tasks - {self._maintenance_task, asyncio.current_task()}
        if busy:
            await asyncio.wait(busy, timeout=max(0.0, grace_end - self.loop.time()))
        # Acks and deliveries noted during the grace wait: written now, not
        # by a batch timer that would fire after the store closed.
        if self._batch_handle is not None:
            self._batch_handle.cancel()
            self._batch_handle = None
        try:
            await self._flush_batches()
        except Exception as exc:        # the store failed: they are redelivered, deduplicated
            log.warning("stop: pending acks not written: %s", exc)
        for task in list(self._tasks):
            task.cancel()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        for conn in self.all_connections():
            transport = conn.transport
            if transport is not None:
                if transport.get_write_buffer_size():
                    # A terminal that stopped reading would hold a closing
                    # transport open for ever (close() waits for the buffer).
                    transport.abort()
                else:
                    transport.close()
        await asyncio.sleep(0)
        await self._close_services()
        await self.store.close()
        self._stopped_event.set()

    async def wait_stopped(self) -> None:
        """Return once :meth:`stop` finished (after a drain, too)."""
        await self._stopped_event.wait()

    @property
    def stopped(self) -> bool:
        return self._stopped_event.is_set()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` began: services start no new background work."""
        return self._stopped

    def handshaking(self) -> list[TerminalConnection]:
        """The connections still in their handshake (a snapshot)."""
        return list(self._unauthenticated)

    async def members(self, address) -> list[str]:
        """The terminal addresses a message to ``address`` is stored for."""
        return await self.registry.members(address)

    def members_now(self, address) -> list[str]:
        """:meth:`members` without awaiting, for the callers that are not
        coroutines yet (submit, tickets, chat).  Issue 17 branch shim: the
        memory registry never suspends; they await members() at merge."""
        return _finish_now(self.registry.members(address))

    @property
    def listening(self) -> bool:
        """True while the terminal listener accepts connections."""
        return any(s.is_serving() for s in self._servers)

    # -- graceful drain --------------------------------------------------------------

    def drain(self, delay_ms: int | None = None, spread_ms: int | None = None,
              timeout: float = 10.0) -> asyncio.Task:
        """Start a graceful drain (idempotent); returns its task.

        Stops accepting connections, sends every connection GOAWAY(DRAINING)
        with a reconnect hint uniform in [delay_ms, delay_ms + spread_ms]
        (default 1-5 s), stops handing further inbox messages to terminals,
        waits until every P0/P1 message in flight is acknowledged (or
        ``timeout`` s pass, or :meth:`force_stop`), writes the pending
        acks to the store and stops the node.  Messages not yet delivered
        stay in the store for the terminal's next connection.
        """
        if self._drain_task is None:
            self._drain_task = self.loop.create_task(
                self._drain(1000 if delay_ms is None else delay_ms,
                            (4000 if delay_ms is None else 0) if spread_ms is None else spread_ms,
                            timeout))
        return self._drain_task

    def _on_store_failure(self, reason: str) -> None:
        """The store can no longer write (its writer process died): nothing
        more can be acked, so drain and stop; the process exits with 1 and a
        supervisor restarts it with a working store.  Terminals get GOAWAY
        and come back to the restarted node; nothing acked is lost."""
        if self.stopped:
            return
        self.exit_code = 1          # also when a drain was already under way
        if self.draining:
            return
        log.error("store: %s; draining and stopping (exit status 1) so the node restarts "
                  "with a working store", reason)
        self.drain(timeout=2.0)

    def force_stop(self) -> None:
        """End a running drain now (a second SIGTERM)."""
        self._force_stop = True

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

    async def _drain(self, delay_ms: int, spread_ms: int, timeout: float) -> None:
        try:
            await self._drain_steps(delay_ms, spread_ms, timeout)
        except Exception:
            log.exception("drain failed node=%s; stopping", self.node_id)
        finally:
            await self.stop(Code.SHUTDOWN, "server drained; reconnect")

    async def _drain_steps(self, delay_ms: int, spread_ms: int, timeout: float) -> None:
        started = self.loop.time()
        self.draining = True
        for server in self._servers:
            server.close()
        conns = self.all_connections()
        log.info("draining node=%s connections=%d in_flight=%d delay_ms=%d-%d",
                 self.node_id, len(conns), self.in_flight(), delay_ms, delay_ms + spread_ms)
        for conn in conns:
            if conn.state == CLOSED:
                continue
            if conn.claims is not None:     # authenticated: reconnect after the hint
                conn.goaway(Code.DRAINING, delay_ms + random.randint(0, max(0, spread_ms)),
                            "server is draining")
            else:                           # still in its handshake: refuse it now
                conn.close(Code.DRAINING, "server is draining")
            self.mark_dirty(conn)
        deadline = started + timeout
        while not self._force_stop and self.loop.time() < deadline:
            if not self._pending_accepts and not self._committing and self.in_flight() == 0:
                break
            await asyncio.sleep(0.02)
        left = self.in_flight()
        await self._settle()
        log.info("drain %s node=%s in_flight=%d seconds=%.3f",
                 "complete" if left == 0 else "timed out" if not self._force_stop else "forced",
                 self.node_id, left, self.loop.time() - started)

    async def _settle(self) -> None:
        """Let running commits, resumes and batch writes finish (bounded)."""
        others = [t for t in self._tasks if t is not self._maintenance_task]
        if others:
            await asyncio.wait(others, timeout=2.0)
        if self._batch_handle is not None:
            self._batch_handle.cancel()
            self._batch_handle = None
        await self._flush_batches()

    # -- operator actions ------------------------------------------------------------

    def kick(self, address: str, reason: str = "disconnected by an operator",
             code: int = Code.KICKED) -> bool:
        """Close a terminal's live session here; False if it has none."""
        conn = self.hub.sessions.get(address)
        if conn is None or conn.state == CLOSED:
            return False
        self.counters.kicks += 1
        self.close(conn, code, reason)
        return True

    def _audit_conn(self, event: str, conn, claims=None, **detail) -> None:
        """Write one audit line about a terminal connection (audit is set)."""
        claims = claims or conn.claims
        transport = conn.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if transport is not None:
            cert = transport.get_extra_info("peercert")
            if cert:
                subject = dict(x[0] for x in cert.get("subject", ()) if x)
                detail["cert"] = subject.get("commonName", "")
        self.audit.write(event, conn.address or "",
                         tenant=claims.tenant if claims is not None else "",
                         terminal=claims.terminal if claims is not None else "",
                         peer=peer[0] if peer else "", detail=detail or None)

    def all_connections(self) -> list[TerminalConnection]:
        """Every open connection, authenticated or not (a snapshot)."""
        return [*self.hub.sessions.values(), *self._unauthenticated]

    def spawn(self, coro) -> asyncio.Task:
        """Run ``coro`` as a task the node waits for at stop (a failure is logged)."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    # -- output ---------------------------------------------------------------------

    def mark_dirty(self, conn: TerminalConnection) -> None:
        if not conn.dirty:
            conn.dirty = True
            self._dirty.append(conn)
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write every dirty connection once (the write coalescing point).

        A flush writes for at most ``flush_slice`` seconds; the connections
        left are held, still marked dirty and in order, for the next
        iteration, after the loop has read what arrived meanwhile (a payment
        result's SEND, a commit's results).  The next flush takes them first,
        then those marked before it began; those marked while it runs wait
        for the one after.  Each gets one write per cycle with everything it
        has by then.  (Held by position, as segments of the dirty lists:
        re-slicing a 10,000-connection list at every slice cost 3-4% of the
        server's time under fan-out probes.)"""
        self._flush_handle = None
        segments = self._held
        self._held = []
        left = None
        if self._dirty:
            segments.append((self._dirty, 0))
            self._dirty = []
        now = self.loop.time()
        chunk = self.write_chunk
        counters = self.counters
        started = time.perf_counter()
        deadline = started + self.flush_slice
        for n, (dirty, start) in enumerate(segments):
            for i in range(start, len(dirty)):
                conn = dirty[i]
                if not i & 15 and i != start and time.perf_counter() > deadline:
                    left = [(dirty, i), *segments[n + 1:]]
                    if self._flush_handle is None:
                        self._flush_handle = self.loop.call_soon(self._flush)
                    counters.flush_yields += 1
                    break
                conn.dirty = False
                transport = conn.transport
                if transport is None or transport.is_closing():
                    continue
                extra = conn.extra
                if extra is not None and conn.state == OPEN:
                    self._jobs(conn, now)
                if not conn.paused:
                    data = conn.data_to_send(chunk, now)
                    if data:
                        transport.write(data)
                        counters.writes += 1
                        counters.bytes_out += len(data)
                    if extra is not None and "holds" in extra:
                        self._after_write(conn)
                if conn.state == CLOSED:
                    if not conn.pending:
                        # (Not while frames it received before closing wait their
                        # turn: the backlog's end marks it dirty again.)
                        if not conn.has_backlog:
                            transport.close()
                    elif not conn.paused:
                        self.mark_dirty(conn)
                    continue
                resync = conn.take_resync()
                if resync:
                    self._queue_resync(conn, resync)
                inbox = conn.inbox
                if inbox.__class__ is InboxState and inbox.blocked and \
                        conn.inbox_bytes < self.inbox_budget // 2:
                    inbox.blocked = False
                    inbox.progress = now
                    for lane in (_P0, _P1):
                        if inbox.cursor[lane] <= inbox.last[lane]:
                            self._pump(conn, lane)
                if conn.pending and not conn.paused:
                    self.mark_dirty(conn)
            if left is not None:
                self._held = left
                break
        if self._read_budget:
            self.read_budget = max(self._read_budget, time.perf_counter() - started)

    # -- timers ---------------------------------------------------------------------

    def _schedule_tick(self) -> None:
        # Wake at the next tick boundary, so a timer fires less than one tick late.
        wheel = self.wheel
        boundary = wheel.start + (wheel.current_tick + 1) * wheel.tick
        self._tick_handle = self.loop.call_at(max(boundary, self.loop.time()) + 1e-6,
                                              self._on_tick)

    def _on_tick(self) -> None:
        try:
            self.wheel.advance(self.loop.time())
        finally:
            self._schedule_tick()

    def _on_deadline(self, conn: TerminalConnection) -> None:
        """The connection's auth or heartbeat deadline came: close it or re-arm."""
        if conn.transport is None or conn.transport.is_closing():
            return
        now = self.loop.time()
        deadline = conn.deadline(self.auth_timeout)
        if now < deadline:
            self.wheel.schedule(conn.timer, deadline)
            # An idle connection gives its lane queues back until its next message.
            self._add_lane_totals(conn.release_lanes())
            return
        if conn.heartbeat_ms == 0:
            self.close(conn, Code.AUTH_TIMEOUT, f"no HELLO within {self.auth_timeout:g} s")
        else:
            self.counters.heartbeat_timeouts += 1
            self.close(conn, Code.HEARTBEAT_TIMEOUT,
                       f"nothing received for {1.5 * conn.heartbeat_ms / 1000:g} s")

    # -- connection events ----------------------------------------------------------------

    def on_connection_made(self, conn: TerminalConnection) -> None:
        self._unauthenticated.add(conn)
        self.connection_count += 1
        self.counters.connections += 1
        if self.draining:
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
        self._unauthenticated.discard(conn)
        self.connection_count -= 1
        # Cancel the timers and drop them: each holds the connection, and a
        # connection left in a cycle waits for a full collection (rare; see
        # gcpolicy) instead of being freed now.
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        inbox = conn.inbox
        if inbox.__class__ is InboxState and inbox.timer is not None:
            inbox.timer.cancel()
            inbox.timer = None
        self._add_lane_totals(conn.lane_counters())
        if conn.state != CLOSED:
            conn.close(Code.NORMAL, "connection lost")
        claims = conn.claims
        extra = conn.extra
        if claims is not None:
            self.hub.detach(conn, claims)
            if extra:
                for stream in extra.get("explicit", ()):
                    self.hub.unsubscribe(stream, conn, self.loop.time())
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

    def on_frame(self, conn: TerminalConnection, frame):
        """Handle one frame; None, or the seconds the frame (and the ones
        after it) must wait before it can be taken (a rate)."""
        handler = self._handlers.get(frame.type)
        if handler is None:
            return None
        if conn.claims is None and frame.type not in _HANDSHAKE:
            return None     # its HELLO was refused (or is held): what follows is not read
        return handler(conn, frame)

    # -- budgets and rates ------------------------------------------------------------

    def check_budget(self, conn: TerminalConnection) -> None:
        """Stop reading a connection whose control frames are over their
        budget (answers it asked for and does not read); read again once
        they drained to half of it.  One whose control frames pass the
        connection's whole budget is closed with SLOW_CONSUMER at once (its
        P0/P1 messages stay in the store); see also :meth:`watch_stall`."""
        queued = conn.control_bytes
        if queued > self.control_budget:
            if queued > self.max_queued_bytes:
                self._slow_consumer(conn)
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
            self._slow_consumer(conn)
        else:                       # (held again lately: wait out its own time)
            extra["stall_timer"] = self.loop.call_later(since + timeout - now, self._on_stall,
                                                        conn)

    def _after_write(self, conn: TerminalConnection) -> None:
        """A flush wrote to a connection that has reading holds: lift what
        the write resolved (its PONG went out, its control frames drained)."""
        holds = conn.holds
        if holds & HOLD_PONG and not conn.control_bytes and conn.state != CLOSED:
            self.loop.call_soon(conn.resume_input)
        if holds & HOLD_BUDGET:
            self.check_budget(conn)
        if not conn.holds & STALL_HOLDS and conn.extra is not None:
            conn.extra.pop("stall_since", None)     # it reads again: a new stall starts afresh

    def _send_limits(self, conn: TerminalConnection) -> SendLimits:
        """The connection's SEND limits (made on its first SEND)."""
        extra = conn.extras()
        limits = extra.get("limits")
        if limits is None:
            limits = extra["limits"] = SendLimits(self.limits.for_roles(conn.claims.roles))
        return limits

    def _request_wait(self, conn: TerminalConnection) -> float:
        """0.0 when a SUBSCRIBE/UNSUBSCRIBE/HISTORY may go now, else seconds to wait."""
        rate = self.cfg.limits.request_rate
        if not rate:
            return 0.0
        extra = conn.extras()
        bucket = extra.get("requests")
        now = self.loop.time()
        if bucket is None:
            bucket = extra["requests"] = Bucket(rate, self.cfg.limits.request_burst, now)
        wait = bucket.take(now)
        if wait:
            self.counters.rate_waits += 1
        return wait

    def _unacked_done(self, conn: TerminalConnection) -> None:
        """A P0/P1 SEND of ``conn`` was answered (stored or refused)."""
        extra = conn.extra
        limits = extra.get("limits") if extra is not None else None
        if limits is not None and limits.unacked > 0:
            limits.unacked -= 1

    def _tenant_left(self, tenant: str) -> None:
        n = self._tenant_sessions.get(tenant, 0) - 1
        if n > 0:
            self._tenant_sessions[tenant] = n
        else:
            self._tenant_sessions.pop(tenant, None)

    def _on_close_frame(self, conn: TerminalConnection, frame) -> None:
        self.mark_dirty(conn)

    def _on_nack_frame(self, conn: TerminalConnection, frame) -> None:
        self.spawn(self._on_nack(conn, frame))

    def _on_receipt_frame(self, conn: TerminalConnection, frame) -> None:
        self.spawn(self._on_read_receipt(conn, frame))

    # -- handshake ----------------------------------------------------------------------

    def _on_hello(self, conn: TerminalConnection, frame):
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
            if self.audit is not None:
                self._audit_conn("takeover", old, None, by=self._peer(conn))
            self.close(old, Code.TAKEOVER, "the terminal logged in on another connection")
            self.hub.detach(old, old.claims)
        conn.claims = claims
        conn.address = address
        self.hub.sessions[address] = conn
        self._unauthenticated.discard(conn)
        hb = self.cfg.heartbeat
        wanted = frame.heartbeat / 1000.0 if frame.heartbeat else hb.interval
        heartbeat = min(max(wanted, hb.min), hb.max)
        info = orjson.dumps({
            "terminal": address, "tenant": claims.tenant, "store": claims.store,
            "region": claims.region, "roles": list(claims.roles), "member": claims.member,
            "node": self.node_id,
        })
        conn.accept(min(frame.version, PROTOCOL_VERSION), int(heartbeat * 1000),
                    int(now * 1000), self.max_frame_size, self.store.epoch, info)
        self.counters.auth_ok += 1
        if self.audit is not None:
            self._audit_conn("auth.ok", conn, claims, roles=list(claims.roles),
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
        if self.audit is not None:
            name = Code(code).name
            self.audit.write_repeated(
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
        _finish_now(self.registry.put(new))      # (issue 17 branch shim, as members_now)
        self._pending_registers.append(new)     # written with the next batch
        self._schedule_batches()
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
        now = self.loop.time()
        names = implied_channels(claims)
        for stream in self.hub.streams_of(names):
            self._join(conn, stream, positions.get((stream.name, stream.lane)), now)
        same_epoch = frame.epoch == self.store.epoch
        conn.inbox = RESUMING
        self.spawn(self._resume_inbox(conn, frame.p0 if same_epoch else 0,
                                       frame.p1 if same_epoch else 0))
        self.mark_dirty(conn)

    # -- channels -------------------------------------------------------------------------

    def _join(self, conn: TerminalConnection, stream, position, now: float) -> None:
        """Announce a stream to a connection and catch it up from ``position``."""
        conn.control(self.hub.announce_frame(stream))
        if position is None:
            return
        how, entries = self.hub.catch_up(stream, position, now)
        if how == "live":
            return
        if how == "resync":
            conn.push(stream.lane, self.hub.resync_frame(stream, len(entries)))
        elif stream.lane == Lane.P3 and entries:
            entries = self.offers.filter_replay(conn, entries)   # skipped, never bypassed
        for entry in entries:
            if conn.push(stream.lane, self.hub.replay_frame(stream, entry), None,
                         entry.deadline, stream) == OVERFLOW:
                break

    def _stream(self, name: str, lane: int, address):
        """The stream of a channel, created (and announced to the implied
        subscribers of its name) on first use."""
        hub = self.hub
        stream = hub.stream(name, lane, create=False)
        if stream is None:
            stream = hub.stream(name, lane)
            frame = hub.announce_frame(stream)
            for group in hub.groups(address):
                for conn in group:
                    if conn.state == OPEN:
                        conn.control(frame)
                        self.mark_dirty(conn)
        return stream

    def _on_subscribe(self, conn: TerminalConnection, frame):
        wait = self._request_wait(conn)
        if wait:
            return wait
        lane = frame.flags & _LANE_MASK
        limits = self.cfg.limits
        try:
            if lane < Lane.P2:
                raise AddressError(Code.BAD_REQUEST, "SUBSCRIBE: lane must be P2 or P3")
            address = parse_address(frame.to)
            check_subscribe(conn.claims, address)
            allowed = {"topic": limits.topic_roles, "segment": limits.segment_roles}.get(
                address.scope)
            if allowed is not None and not set(allowed).intersection(conn.claims.roles):
                raise AddressError(Code.FORBIDDEN,
                                   f"subscribe {address}: {address.scope} channels are for "
                                   f"roles {', '.join(allowed)} (limits.{address.scope}_roles)")
        except AddressError as exc:
            if exc.code == Code.FORBIDDEN:
                self.counters.acl_denials += 1
                if self.audit is not None:
                    self._audit_conn("acl.deny", conn, None, op="subscribe", to=frame.to,
                                     lane=f"P{lane}", reason=str(exc))
            conn.error(exc.code, frame.ref, str(exc))
            self.mark_dirty(conn)
            return None
        name = str(address)
        hub = self.hub
        now = self.loop.time()
        position = (frame.epoch, frame.offset) if frame.epoch or frame.offset else None
        if name in implied_channels(conn.claims):
            # The token subscribes it already: catch up, or (no message yet)
            # confirm with channel 0 until its first message announces its id.
            stream = hub.stream(name, lane, create=False)
            if stream is not None:
                self._join(conn, stream, position, now)
            else:
                conn.control(self.encoder.encode(Frame(FrameType.SUBSCRIBED, lane, channel=0,
                                                       to=name)))
            self.mark_dirty(conn)
            return None
        extra = conn.extras()
        subs = extra.setdefault("explicit", set())
        stream = self._subscribed(conn, name, lane)
        if stream is None:
            if len(subs) >= limits.max_subscriptions:
                self.counters.subscription_refusals += 1
                conn.error(Code.TOO_MANY_SUBSCRIPTIONS, frame.ref,
                           f"SUBSCRIBE {name}: this connection holds {len(subs)} subscriptions, "
                           f"the most it may (limits.max_subscriptions)")
                self.mark_dirty(conn)
                return None
            stream = hub.subscribe(name, lane, conn)       # (never makes a stream)
            subs.add(stream)
        self._join(conn, stream, position, now)
        self.mark_dirty(conn)
        return None

    @staticmethod
    def _subscribed(conn: TerminalConnection, name: str, lane: int):
        """The stream (or pending stream) ``conn`` explicitly subscribed to, or None."""
        subs = conn.extra.get("explicit") if conn.extra else None
        for stream in subs or ():
            if stream.lane == lane and stream.name == name:
                return stream
        return None

    def _on_unsubscribe(self, conn: TerminalConnection, frame):
        wait = self._request_wait(conn)
        if wait:
            return wait
        lane = frame.flags & _LANE_MASK
        stream = self._subscribed(conn, frame.to, lane)
        if stream is None:
            conn.error(Code.UNKNOWN_CHANNEL, frame.ref,
                       f"UNSUBSCRIBE: not subscribed to P{lane} of {frame.to!r} "
                       "(channels implied by the token cannot be left)")
        else:
            conn.extra["explicit"].discard(stream)
            self.hub.unsubscribe(stream, conn, self.loop.time())
            conn.control(self.encoder.encode(Frame(
                FrameType.UNSUBSCRIBED, channel=stream.id, code=Code.OK)))
        self.mark_dirty(conn)
        return None

    def _on_history(self, conn: TerminalConnection, frame):
        wait = self._request_wait(conn)
        if wait:
            return wait
        lane = frame.flags & _LANE_MASK
        ref = frame.ref
        try:
            address = parse_address(frame.to)
            if address.scope == "chat":
                self.chat.on_history(conn, frame, address)     # answers asynchronously
                return None
            if lane < Lane.P2:
                raise AddressError(Code.BAD_REQUEST,
                                   "HISTORY: lane must be P2 or P3 (P1: conversations, chat:)")
            check_subscribe(conn.claims, address)
        except AddressError as exc:
            conn.error(exc.code, ref, str(exc))
            self.mark_dirty(conn)
            return None
        stream = self.hub.stream(str(address), lane, create=False)
        page = self.cfg.limits.history_page
        items: list = []
        more = False
        next_offset = 0
        if stream is not None:
            now = self.loop.time()
            source = self.hub.history(stream, now)      # P2: the last values; in offset order
            want = frame.count
            if frame.offset == 0:
                window = source[-want:] if want else source
            elif frame.epoch in (stream.epoch, 0):      # (0: the current epoch)
                start = bisect.bisect_right(source, frame.offset, key=_offset_of)
                window = source[start:start + want] if want else source[start:]
            else:
                window = []
            items = window[:page]
            more = len(window) > page
            next_offset = items[-1].offset if items else stream.offset
        encode = self.encoder.encode

        def item(e) -> bytes:
            return encode(Frame(FrameType.HISTORY_ITEM, lane, e.payload, ref=ref,
                                offset=e.offset, kind=e.kind))

        self.answer(conn, ref, items, item, next_offset, Code.PARTIAL if more else Code.OK)
        return STOP_AFTER if conn.holds & HOLD_ANSWERS else None

    def answer(self, conn: TerminalConnection, ref: int, items: list, encode, next_offset: int,
               code: int) -> None:
        """Answer a HISTORY request: HISTORY_ITEM ``encode(item)`` for each of
        ``items``, then HISTORY_END.  Paced like a resync: items are queued
        only while the connection's control frames take less than half their
        budget, the rest at the next flushes as the terminal reads; until
        the answer is all queued the connection is not read (a terminal
        that asks and does not read holds one answer, not a pile of them)."""
        if conn.state == CLOSED:
            return
        extra = conn.extras()
        extra.setdefault("answers", []).append([ref, items, 0, encode, next_offset, code])
        self._answer_jobs(conn)
        if "answers" in extra:
            conn.hold(HOLD_ANSWERS)     # no further request is read until this one is out
            self.watch_stall(conn)
        self.mark_dirty(conn)

    def _answer_jobs(self, conn: TerminalConnection) -> None:
        jobs = conn.extra.get("answers")
        room = self.control_budget // 2
        while jobs and conn.control_bytes < room:
            job = jobs[0]
            ref, items, i, encode, next_offset, code = job
            while i < len(items) and conn.control_bytes < room:
                conn.control(encode(items[i]))
                i += 1
            job[2] = i
            if i < len(items):
                break
            conn.control(self.encoder.encode(Frame(
                FrameType.HISTORY_END, ref=ref, offset=next_offset, count=len(items), code=code)))
            jobs.pop(0)
        if not jobs:
            conn.extra.pop("answers", None)
            conn.release(HOLD_ANSWERS)

    def _queue_resync(self, conn: TerminalConnection, streams) -> None:
        extra = conn.extras()
        pending = extra.setdefault("resync", {})
        for stream in streams:
            pending[stream] = None

    def _jobs(self, conn: TerminalConnection, now: float) -> None:
        """Paced work of a connection (resync snapshots, HISTORY answers)."""
        extra = conn.extra
        if "resync" in extra or "jobs" in extra:
            self._resync_jobs(conn, now)
        if "answers" in extra:
            self._answer_jobs(conn)

    def _resync_jobs(self, conn: TerminalConnection, now: float) -> None:
        """Send pending RESYNC snapshots, paced so they fit the connection's queue."""
        extra = conn.extra
        pending = extra.get("resync")
        jobs = extra.get("jobs")
        room = conn.max_queued_bytes // 2
        if pending and conn.queued_bytes < room // 2:
            jobs = extra.setdefault("jobs", [])
            for stream in list(pending):
                entries = list(stream.lvc.values()) if stream.lane == Lane.P2 else []
                conn.push(stream.lane, self.hub.resync_frame(stream, len(entries)))
                jobs.append([stream, entries, 0])
            pending.clear()
        while jobs and conn.queued_bytes < room:
            job = jobs[0]
            stream, entries, i = job
            for entry in entries[i:i + SNAPSHOT_SLICE]:
                # A newer value for the key may have replaced this one: send the newest.
                current = stream.lvc.get(entry.key, entry)
                conn.push(stream.lane, self.hub.replay_frame(stream, current), None, 0.0, stream)
            job[2] = i + SNAPSHOT_SLICE
            if job[2] >= len(entries):
                jobs.pop(0)
        if not jobs and not pending:
            extra.pop("jobs", None)
            extra.pop("resync", None)

    # -- publishing -----------------------------------------------------------------------

    def _on_send(self, conn: TerminalConnection, frame):
        lane = frame.flags & _LANE_MASK
        ref = frame.ref
        counters = self.counters
        extra = conn.extra
        limits = extra.get("limits") if extra is not None else None
        if limits is None:
            limits = self._send_limits(conn)
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
                recipient_store = rec.store if rec is not None else None
                recipients = self.registry.terminal_members(to, rec)   # (one lookup, not two)
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
                if self.audit is not None:
                    self._audit_conn("acl.deny", conn, None, op="send", to=frame.to,
                                     kind=frame.kind, lane=f"P{lane}", reason=str(exc))
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
            self.submit(msg, address, (conn, ref, want_ack, limits), recipients)
            return None
        report = {} if lane == _P3 and frame.kind in POLICY_KINDS else None
        offset = self.broadcast(address, lane, frame.kind, checked.key, checked.version,
                                frame.payload, frame.ttl / 1000.0 if frame.ttl else 0.0, report)
        if want_ack:
            conn.control(self.encoder.encode_sendack(
                0, ref, 0,
                orjson.dumps({"channel": str(address), "offset": offset, **(report or {})})
                if offset else b'{"stale":true}'))
            self.mark_dirty(conn)
        return None

    def _window_full(self, conn: TerminalConnection, limits: SendLimits, ref: int) -> None:
        """Refuse a P0/P1 SEND beyond the connection's window (TOO_MANY_UNACKED)."""
        self.counters.window_refusals += 1
        conn.error(Code.TOO_MANY_UNACKED, ref, retry_hint(
            WINDOW_RETRY_MS / 1000.0, f"{limits.unacked} SENDs of this connection await their "
                                      f"SENDACK, the most it may have (limits.unacked_sends)"))
        self.mark_dirty(conn)

    def broadcast(self, address, lane: int, kind: str, key: str, version: int,
                  payload: bytes, ttl: float = 0.0, report: dict | None = None) -> int:
        """Publish a P2/P3 message to the stream of ``address``; returns its
        offset (0 when a newer version of ``key`` made it stale).

        P3 offers (``offers.POLICY_KINDS``) go only to the sessions that pass
        the offer policy; ``report`` (a dict) then gets {delivered, quiet, capped}."""
        now = self.loop.time()
        name = str(address)
        stream = self._stream(name, lane, address)
        if lane == _P3:
            ttl = ttl or self.cfg.lanes.p3_ttl
        deadline = now + ttl if lane == _P3 else 0.0
        entry = self.hub.append(stream, kind, key, version, payload, now, deadline)
        if entry is None:
            return 0
        unix = time.time()
        self.store.stream_append(name, lane, stream.epoch, StreamEntry(
            entry.offset, kind, key, version, payload, unix,
            unix + (deadline - now) if deadline else 0.0))
        ckey = (stream.id, key) if key else None
        dirty = self._dirty
        overflow = []
        reached = 0
        if lane == _P3 and kind in POLICY_KINDS:
            groups = self.hub.groups(address)
            if stream.explicit:
                groups = [*groups, stream.explicit_list()]
            reached, overflow = self.offers.fanout(address.tenant, groups, lane, entry.frame,
                                                   deadline, stream, dirty, report)
        else:
            for group in self.hub.groups(address):
                reached += len(group)
                overflow += fanout(group, lane, entry.frame, ckey, deadline, stream, dirty)
            if stream.explicit:
                explicit = stream.explicit_list()
                reached += len(explicit)
                overflow += fanout(explicit, lane, entry.frame, ckey, deadline, stream, dirty)
        if dirty and self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)
        counters = self.counters
        counters.broadcasts += 1
        counters.lane_frames_out[lane] += reached
        counters.lane_bytes_out[lane] += reached * len(payload)
        for conn in overflow:       # only P0/P1 overflow; kept for symmetry
            self._slow_consumer(conn)
        return entry.offset

    def _slow_consumer(self, conn: TerminalConnection) -> None:
        if conn.state != CLOSED:
            self.counters.slow_consumer_closes += 1
            self.close(conn, Code.SLOW_CONSUMER, "not reading fast enough for P0/P1 traffic")

    def close(self, conn: TerminalConnection, code: int, reason: str,
              grace: float = 1.0) -> None:
        """Close with CLOSE; a peer that does not read it within ``grace`` s is cut."""
        conn.close(code, reason)
        self.mark_dirty(conn)
        transport = conn.transport
        if transport is not None:
            self.loop.call_later(grace, transport.abort)

    def submit(self, msg: NewMessage, address, reply, recipients=None) -> None:
        """Queue a P0/P1 message for the next group commit.

        ``reply`` is (connection, ref, asked, its SendLimits): a terminal's
        SEND, answered with SENDACK once stored when ``asked`` (and counted in
        its window until then); a future to resolve with the Accepted result
        (admin API, services); or None.
        ``recipients`` (terminal addresses) replaces the members of ``address``
        (services route by their own rules: rosters, conversations).
        """
        if recipients is None:
            recipients = self.members_now(address)
        self._pending_accepts.append((msg, recipients, reply))
        if len(self._pending_accepts) == 1:
            self.loop.call_soon(self._commit)

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
        less between a payment result's SEND and its delivery."""
        batch = self._pending_accepts
        if not batch:
            return          # a connection's read already handed them over
        self._pending_accepts = []
        started = time.perf_counter()
        self._committing += 1
        try:
            self.store.accept_many_then(
                [(m, r) for m, r, _ in batch],
                lambda results, exc: self._committed(batch, started, results, exc))
        except Exception as exc:       # the store is closed
            self._committed(batch, started, None, exc)

    def _committed(self, batch: list, started: float, results, exc) -> None:
        self._committing -= 1
        if exc is not None:            # the store is down: nothing was accepted
            log.error("store accept failed: %s", exc)
            for msg, _, reply in batch:
                self._reply_failed(reply, exc)
            return
        counters = self.counters
        counters.store_write.observe(time.perf_counter() - started)
        encode_sendack = self.encoder.encode_sendack
        live = self._live
        touched = {}        # the connections this batch queued frames for, senders first
        for (msg, recipients, reply), accepted in zip(batch, results):
            if reply.__class__ is tuple:
                touched[reply[0]] = None
            if accepted.duplicate:
                counters.duplicates += 1
            else:
                counters.accepted += 1
                for terminal, seq in accepted.seqs.items():
                    conn = live(terminal, msg.lane, seq, accepted.msg_id, msg.kind, msg.body)
                    if conn is not None:
                        touched[conn] = None
            if reply is None:
                continue
            if isinstance(reply, asyncio.Future):
                if not reply.done():
                    reply.set_result(accepted)
                continue
            conn, ref, asked, limits = reply
            limits.unacked -= 1
            if asked and conn.state == OPEN:
                if accepted.duplicate:
                    conn.control(encode_sendack(_RETRANSMIT, ref, accepted.msg_id, b""))
                else:
                    conn.control(encode_sendack(0, ref, accepted.msg_id,
                                                _recipients_payload(len(accepted.seqs))))
                self.mark_dirty(conn)
        # Write the deliveries and SENDACKs now, not at the next iteration's
        # flush: under a broadcast flood an iteration is long, and payment
        # results should not wait one more of them.  Only the connections
        # this batch touched (the flush still comes for the rest).
        self._write_now(touched)

    def _write_now(self, conns) -> None:
        """Write at once what ``conns`` (a committed batch's senders and online
        recipients) have queued: SENDACKs and DELIVERs.

        (The write below repeats _flush's on purpose: _flush runs it for every
        dirty connection of a fan-out, and a method call there measured about
        7% of fan-out throughput.)"""
        now = self.loop.time()
        chunk = self.write_chunk
        counters = self.counters
        for conn in conns:
            transport = conn.transport
            if transport is None or conn.paused or not conn.dirty or transport.is_closing():
                continue
            data = conn.data_to_send(chunk, now)
            if data:
                transport.write(data)
                counters.writes += 1
                counters.bytes_out += len(data)

    def _reply_failed(self, reply, exc: Exception) -> None:
        if reply is None:
            return
        if isinstance(reply, asyncio.Future):
            if not reply.done():
                reply.set_exception(exc)
            return
        conn, ref, _, limits = reply
        limits.unacked -= 1
        if conn.state == OPEN:
            conn.error(Code.STORE_UNAVAILABLE, ref, "the message could not be stored; retry")
            self.mark_dirty(conn)

    # -- inbox delivery -------------------------------------------------------------------

    def _live(self, terminal: str, lane: int, seq: int, msg_id: int, kind: str,
              body: bytes):
        """A message was stored for ``terminal``: hand it over if it is next in
        line.  Returns the terminal's open connection (None when it has none)."""
        conn = self.hub.sessions.get(terminal)
        if conn is None or conn.state != OPEN or self.draining:
            return None     # (draining: it waits in the store for the next connection)
        inbox = conn.inbox
        if inbox is RESUMING:
            # The resume task is reading the store's positions; make sure it
            # learns of this message even if its read came first.
            seen = self._resuming.setdefault(conn, [0, 0])
            seen[lane] = max(seen[lane], seq)
            return conn
        if inbox is None:
            inbox = conn.inbox = self._inbox_state(conn, conn.inbox_window(0)[0],
                                                   conn.inbox_window(1)[0])
            inbox.progress = self.loop.time()
        if seq > inbox.last[lane]:
            inbox.last[lane] = seq
        if inbox.pumping[lane]:
            return conn
        acked = conn.inbox_window(lane)[0]
        if (inbox.cursor[lane] == seq and seq - acked <= self.inflight
                and conn.inbox_bytes < self.inbox_budget):
            inbox.cursor[lane] = seq + 1
            self._deliver(conn, lane, seq, msg_id, kind, body, False)
        else:
            self._pump(conn, lane)
        return conn

    def _deliver(self, conn, lane, seq, msg_id, kind, body, retransmit) -> None:
        if conn.deliver(lane, seq, msg_id, kind, body, retransmit) == OVERFLOW:
            self._slow_consumer(conn)
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

    def _pump(self, conn: TerminalConnection, lane: int) -> None:
        inbox = conn.inbox
        if not inbox.pumping[lane]:
            inbox.pumping[lane] = True
            self.spawn(self._pump_task(conn, lane))

    async def _pump_task(self, conn: TerminalConnection, lane: int) -> None:
        inbox = conn.inbox
        try:
            while conn.state == OPEN and not self.draining:
                acked, sent = conn.inbox_window(lane)
                cursor = max(inbox.cursor[lane], acked + 1)
                room = self.inflight - (cursor - 1 - acked)
                if cursor > inbox.last[lane] or room <= 0:
                    break
                if conn.inbox_bytes >= self.inbox_budget:
                    self._block(conn)         # the flush resumes us once the queue drains
                    break
                entries = await self.store.inbox(conn.address, lane, cursor - 1,
                                                 min(room, PUMP_BATCH))
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
                                  e.delivered or e.seq <= sent)
                    if conn.state != OPEN:
                        return
        finally:
            inbox.pumping[lane] = False

    async def _resume_inbox(self, conn: TerminalConnection, p0: int, p1: int) -> None:
        """Set up the inbox windows after RESUME and replay what is unacked."""
        address = conn.address
        try:
            acked0, last0, acked1, last1 = await self.store.positions(address)
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
                self._pump(conn, lane)

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
        if conn.state != OPEN or inbox.__class__ is not InboxState or self.draining:
            return      # (draining: what is in flight stays counted until acked or stopped)
        now = self.loop.time()
        if inbox.blocked or conn.paused:
            # Nothing was lost in flight: the terminal is not reading.  Resending
            # would only queue duplicates; give up on it after the timeout.
            since = inbox.blocked_since if inbox.blocked else inbox.progress
            if now - since >= self.cfg.delivery.slow_consumer_timeout:
                self._slow_consumer(conn)
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
                    self._pump(conn, lane)
        if outstanding:
            inbox.rto = min(inbox.rto * 2, self.cfg.delivery.retransmit_max)
            self.wheel.schedule(inbox.timer, self.loop.time() + inbox.rto)

    def _on_ack(self, conn: TerminalConnection, frame) -> None:
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
        if inbox.cursor[lane] <= inbox.last[lane] and not inbox.pumping[lane]:
            self._pump(conn, lane)

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

    def _schedule_batches(self) -> None:
        if self._batch_handle is None and not self._stopped:
            delay = self.cfg.delivery.ack_batch_ms / 1000.0
            self._batch_handle = self.loop.call_later(delay, self._run_batches)

    def _run_batches(self) -> None:
        self._batch_handle = None
        self.spawn(self._flush_batches())

    async def _flush_batches(self) -> None:
        acks = self._pending_acks
        delivered = self._pending_delivered
        registers = self._pending_registers
        self._pending_acks = {}
        self._pending_delivered = {}
        self._pending_registers = []
        now = time.time()
        for rec in registers:
            await self.store.register(rec)
        # Both requests are queued at once, delivered first: the writer runs
        # them in that order, usually in one commit (awaiting the first before
        # sending the second cost a commit round trip per batch).
        delivered_receipts, acked_receipts = await asyncio.gather(
            self.store.delivered_many(
                [(t, lane, rng[0], rng[1]) for (t, lane), rng in delivered.items()], now)
            if delivered else _none(),
            self.store.ack_many([(t, lane, seq) for (t, lane), seq in acks.items()], now)
            if acks else _none())
        for r in delivered_receipts or ():
            self._send_receipt(r.sender, r.ref, r.msg_id, ReceiptStatus.DELIVERED, r.terminal)
        for r in acked_receipts or ():
            self._send_receipt(r.sender, r.ref, r.msg_id, ReceiptStatus.ACKED, r.terminal)

    def _send_receipt(self, sender: str, ref: int, msg_id: int, status: int, terminal: str) -> None:
        conn = self.hub.sessions.get(sender)
        if conn is None or conn.state != OPEN:
            return
        conn.control(self.encoder.encode(Frame(
            FrameType.RECEIPT, msg_id=msg_id, code=status, ref=ref, to=terminal)))
        self.mark_dirty(conn)

    async def _on_nack(self, conn: TerminalConnection, frame) -> None:
        lane = frame.flags & _LANE_MASK
        inbox = conn.inbox
        if frame.code == 0:
            # Redeliver later: rewind to the nacked seq when the retransmit timer fires.
            if inbox.__class__ is InboxState:
                inbox.rto = max(inbox.rto, self.cfg.delivery.retransmit_initial)
                self._arm_retransmit(conn)
            return
        reason = frame.payload.decode("utf-8", "replace") or f"rejected with code {frame.code}"
        dead = await self.store.reject(conn.address, lane, frame.seq, reason, time.time())
        if dead is not None and dead.receipt:
            self._send_receipt(dead.sender, dead.ref, dead.msg_id, ReceiptStatus.REJECTED,
                               dead.terminal)

    async def _on_read_receipt(self, conn: TerminalConnection, frame) -> None:
        trace = await self.store.trace(frame.msg_id)
        if trace is None or not trace.receipt:
            return
        if not any(r.terminal == conn.address for r in trace.recipients):
            return
        self._send_receipt(trace.sender, trace.ref, trace.msg_id, ReceiptStatus.READ,
                           conn.address)

    # -- retail services (server/tickets.py, chat.py, offers.py) -------------------------

    def service_ack(self, conn: TerminalConnection, ref: int, msg_id: int, doc,
                    retransmit: bool = False, asked: bool = True) -> None:
        """SENDACK a message a service took, with its JSON ``doc`` (None: empty).

        ``asked``: the SEND set ACK_REQUESTED; if not, nothing is sent (PROTOCOL.md
        section 7: a SENDACK only when asked; errors are always sent).  Either
        way the SEND leaves the connection's window."""
        self._unacked_done(conn)
        if asked and conn.state == OPEN:
            conn.control(self.encoder.encode(Frame(
                FrameType.SENDACK, _RETRANSMIT if retransmit else 0, ref=ref, msg_id=msg_id,
                payload=orjson.dumps(doc) if doc is not None else b"")))
            self.mark_dirty(conn)

    def service_error(self, conn: TerminalConnection, ref: int, code: int, message: str) -> None:
        """Answer a message a service took with an ERROR frame (asked for an ack or not)."""
        self._unacked_done(conn)
        self.request_error(conn, ref, code, message)

    def request_error(self, conn: TerminalConnection, ref: int, code: int, message: str) -> None:
        """Answer a request (HISTORY, SUBSCRIBE...) with an ERROR frame."""
        if conn.state == OPEN:
            conn.error(code, ref, message)
            self.mark_dirty(conn)

    async def _expire_services(self, now: float) -> None:
        """Retention of the services' personal data (each maintenance round)."""
        convs, messages = await self.chat.expire(now)
        caps = await self.offers.expire(now)
        tickets = await self.tickets.expire(now)
        notices = await self.store.stream_expire_kind(
            "member.notice", now - self.cfg.retention.member_notice)
        if convs or messages or caps or tickets or notices:
            log.info("retention deleted conversations=%d chat_messages=%d caps=%d tickets=%d "
                     "member_notices=%d", convs, messages, caps, tickets, notices)

    async def _close_services(self) -> None:
        """Stopping: cancel escalation timers, write what is written behind."""
        self.tickets.close()
        try:
            await self.tickets.flush()
            await self.offers.flush()
            await self.chat.flush()
        except Exception:
            log.exception("services: writing their state at stop failed")

    # -- maintenance ----------------------------------------------------------------------

    async def _maintenance(self) -> None:
        """Expire undelivered P0/P1 into dead letters, trim old acked entries,
        free idle streams, write the audit log's summaries."""
        sweep_at = 0.0
        while True:
            await asyncio.sleep(5.0 + random.random())
            try:
                if self.audit is not None:
                    self.audit.flush_aggregates()
                self.sources.sweep(self.loop.time())
                now = time.time()
                for dead in await self.store.expire(now):
                    if dead.receipt:
                        self._send_receipt(dead.sender, dead.ref, dead.msg_id,
                                           ReceiptStatus.EXPIRED, dead.terminal)
                await self.store.trim(now, self.cfg.delivery.dedup_window)
                await self._expire_services(now)
                if self.loop.time() >= sweep_at:
                    sweep_at = self.loop.time() + STREAM_SWEEP
                    await self._sweep_streams()
            except Exception:
                log.exception("maintenance failed")

    async def _sweep_streams(self) -> int:
        """Free the streams nobody subscribes to that retain nothing any more
        (their history aged out), a slice per loop iteration."""
        keys = self.hub.stream_keys()
        freed = 0
        for i in range(0, len(keys), SWEEP_SLICE):
            freed += self.hub.sweep(keys[i:i + SWEEP_SLICE], self.loop.time())
            await asyncio.sleep(0)
        if freed:
            log.info("streams freed=%d (nobody subscribed, nothing retained) left=%d", freed,
                     self.hub.stream_count())
        return freed

    def _add_lane_totals(self, counters) -> None:
        if counters:
            totals = self._released_lane_totals
            for i in range(3):
                totals[i] += counters[i]

    def lane_totals(self) -> tuple[int, int, int]:
        """(conflated, p2_dropped, p3_dropped) over every connection so far."""
        totals = list(self._released_lane_totals)
        for conn in self.hub.sessions.values():
            c = conn.lane_counters()
            for i in range(3):
                totals[i] += c[i]
        return tuple(totals)
