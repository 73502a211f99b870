"""The node: one server process, composed (centrifuge's node.go).

``Node`` wires the parts together and owns the lifecycle: start, stop,
graceful drain, maintenance and the operator's actions.  It does not handle
frames or deliver messages itself:

* ``hub.py`` — local sessions by address and group, and the channel streams;
* ``commands.py`` — each connection's arrival, handshake, deadlines, frames
  and limits (what centrifuge keeps in client.go);
* ``channels.py`` — P2/P3 streams: SUBSCRIBE, HISTORY, resync, fan-out;
* ``delivery.py`` — P0/P1: group commit, inboxes, pump, retransmit, acks;
* ``output.py`` — one write per dirty connection per loop iteration;
* the store (``store.py`` and its backends), the registry, the retail
  services (tickets, chat, offers, directory), one timing wheel.

Services and the admin API see the node through its public methods (the
host interface of ``server/host.py``: spawn, stopping, members, submit,
service_ack...), never its parts' internals.  ``docs/architecture.md``
draws the layers and says which state each part owns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time

from ..core import wheel as _wheel
from ..core.codes import Code, Lane, ReceiptStatus
from ..core.session import CLOSED, Encoder, Frame
from .channels import Channels
from .chat import Chat
from .commands import Commands
from .connection import TerminalConnection, listen_socket
from .delivery import Delivery
from .directory import Directory
from .history_memory import MemoryHistory
from .hub import Hub
from .interest import Interest
from .limits import Policy, Sources, default_max_connections
from .metrics import Counters
from .offers import Offers
from .output import Output
from .ownership import Ownership
from .registry_memory import MemoryRegistry
from .tickets import Tickets

log = logging.getLogger("tillwire.node")

STOP_GRACE = 2.0             # seconds stop() waits for in-flight commits and service tasks
SEND_HEADER_ROOM = 1024      # bytes of a SEND's fields (ref, ttl, to, kind, key) over its body
STREAM_SWEEP = 60.0          # seconds between sweeps for idle streams
SWEEP_SLICE = 1000           # streams looked at per loop iteration of a sweep


class Node:
    """One Tillwire server process."""

    def __init__(self, cfg, store, *, loop: asyncio.AbstractEventLoop | None = None,
                 node_id: str = "", worker: int = 0, presence=None, broker=None,
                 registry=None, history=None, caps=None) -> None:
        """``presence`` and ``broker``: backends shared with other nodes or
        workers (both or neither); without them the hub's session table is
        the only presence, and a takeover is one node's business.
        ``registry``: a registry shared with them (default: this process's,
        loaded from the store at start).  ``history``: channel history shared
        with them (with presence and broker; default: this process's hub,
        kept by the store's archive); with it, channel messages go through
        the shared history and the broker (``interest.py``).  ``caps``: offer
        frequency caps shared with them (default: this process's counts).  ``worker``: this process's index
        among its node's workers (0 for a single process)."""
        if (presence is None) != (broker is None):
            raise ValueError("Node: give presence and broker together, or neither")
        self.cfg = cfg
        self.loop = loop or asyncio.get_event_loop()
        self.store = store
        self.node_id = node_id or f"{socket.gethostname()}-{os.getpid()}"
        self.worker = worker
        srv = cfg.server
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
        # Control frames (answers to a terminal's own requests, receipts,
        # announcements) may take the half of the connection's budget that
        # the inbox does not: past it the node stops reading the connection.
        self.control_budget = self.max_queued_bytes // 2
        self.inflight = cfg.delivery.inflight
        self.lane_weights = tuple(cfg.lanes.weights)
        self.write_high_water = srv.write_high_water
        self.handshake_frame = cfg.limits.handshake_frame
        self.limits = Policy(cfg)
        self.sources = Sources(cfg.limits.max_connections_per_source,
                               cfg.limits.auth_fail_delay_max)
        self.max_connections = srv.max_connections or default_max_connections()
        self.encoder = Encoder(srv.max_frame_size, srv.compress_threshold)
        self.hub = Hub(self.encoder, Frame, history_max=cfg.history.max_messages,
                       history_age=cfg.history.max_age)
        self.hub.set_kind_ages({"member.notice": cfg.retention.member_notice})
        if history is not None and broker is None:
            raise ValueError("Node: a shared history needs presence and a broker")
        self.shared_history = history is not None
        self.history = history if history is not None else MemoryHistory(self.hub, self.loop.time)
        self.shared_registry = registry is not None
        self.registry = registry if registry is not None else MemoryRegistry()
        self.wheel = _wheel.TimingWheel(cfg.heartbeat.tick, cfg.heartbeat.wheel_size,
                                        self.loop.time())
        self.counters = Counters()
        self.draining = False
        self.started = time.time()
        self.audit = None          # an audit.AuditLog (main.py sets it); None = no audit log
        self.exit_code = 0         # what `tillwire serve` exits with (1: the store failed)
        self._servers: list[asyncio.AbstractServer] = []
        self._tick_handle = None
        self._tasks: set[asyncio.Task] = set()
        self._released_lane_totals = [0, 0, 0]   # of closed or released schedulers
        self._maintenance_task = None
        self._drain_task = None
        self._force_stop = False
        self._stopped = False
        self._stopped_event = asyncio.Event()
        # The parts, in dependency order (each takes what it uses from the
        # node when made; the connection entry points are bound here once).
        self.output = Output(self)
        self.mark_dirty = self.output.mark_dirty
        self.delivery = Delivery(self)
        # Retail services: the store directory, tickets, chat and the offer policy.
        self.directory = Directory(cfg, store)
        self.tickets = Tickets(self, self.directory)
        self.chat = Chat(self)
        self.offers = Offers(self, self.directory)
        self.offers.caps = caps
        self.channels = Channels(self)
        self.commands = Commands(self)
        self.output.wire(self.channels, self.delivery, self.commands)
        self.ownership = Ownership(self, presence, broker) if presence is not None else None
        self.broker = broker
        if self.shared_history:
            self.channels.interest = Interest(self, broker, self.history)
        self.service_kinds = self.commands.service_kinds
        # The host interface's calls and the connections' entry points,
        # served by the parts (server/host.py, server/connection.py).
        self.submit = self.delivery.submit
        self.commit_now = self.delivery.commit_now
        self.service_ack = self.delivery.service_ack
        self.service_error = self.delivery.service_error
        self.request_error = self.delivery.request_error
        self.answer = self.channels.answer
        self.on_connection_made = self.commands.on_connection_made
        self.on_connection_lost = self.commands.on_connection_lost
        self.on_frame = self.commands.on_frame
        self.check_budget = self.commands.check_budget
        self.watch_stall = self.commands.watch_stall
        # Connections know their node through a class made for it: two nodes
        # in one process never share one, and a connection carries no field
        # for it.
        self.connection_class = type("TerminalConnection", (TerminalConnection,),
                                     {"__slots__": (), "node": self})

    @property
    def worker_name(self) -> str:
        """This worker's name in the fleet (its presence owner and control
        channel); the node id for a process on its own."""
        return self.ownership.owner if self.ownership is not None else self.node_id

    @property
    def connection_count(self) -> int:
        """Accepted terminal sockets not yet closed."""
        return self.commands.connection_count

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, sock: socket.socket | None = None, ssl=None,
                    reuse_port: bool = False) -> None:
        if hasattr(self.store, "on_write_failure"):
            self.store.on_write_failure = self._on_store_failure
        if hasattr(self.store, "on_new_epoch"):
            self.store.on_new_epoch = self._on_new_epoch
        await self.store.open()
        if self.ownership is not None:
            await self.ownership.start()
        if not self.shared_registry:       # (a shared one is kept where it lives)
            await self.registry.load(await self.store.terminals.all())
        if not self.shared_history:      # (a shared one keeps itself)
            history = self.cfg.history
            self.store.archive.configure(history.max_messages, history.max_age)
            unix_now, loop_now = time.time(), self.loop.time()
            # Member notices past their retention are not loaded back.
            await self.store.archive.expire_kind("member.notice",
                                                 unix_now - self.cfg.retention.member_notice)
            for state in await self.store.archive.load(history.max_messages, history.max_age,
                                                        unix_now):
                self.hub.restore(state, loop_now, unix_now)
        await self.directory.load()
        await self.tickets.load()         # re-arms the escalation timers
        await self.chat.load()
        await self.offers.load()
        srv = self.cfg.server
        if sock is None:
            sock = listen_socket(srv.host, srv.port, srv.send_buffer, srv.notsent_lowat,
                                 reuse_port)
        # A TLS handshake gets the auth timeout, not asyncio's 60 s: a
        # plaintext client whose bytes look like an old SSL header would hold
        # its descriptor that long.
        extra = {"ssl_handshake_timeout": srv.auth_timeout} if ssl is not None else {}
        server = await self.loop.create_server(self.connection_class, sock=sock,
                                               backlog=srv.backlog, ssl=ssl, **extra)
        self._servers.append(server)
        self._schedule_tick()
        self._maintenance_task = self.spawn(self._maintenance())

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
        self.output.flush_slice = float("inf")     # every CLOSE goes out now, not in slices
        self.output.flush()
        await self.delivery.flush_batches()
        # Let in-flight commits and the services' follow-ups (history records,
        # ticket answers) finish: what was accepted keeps its side records.
        grace_end = self.loop.time() + STOP_GRACE
        while self.delivery.busy and self.loop.time() < grace_end:
            await asyncio.sleep(0.005)
        busy = self._tasks - {self._maintenance_task, asyncio.current_task()}
        if busy:
            await asyncio.wait(busy, timeout=max(0.0, grace_end - self.loop.time()))
        # Acks and deliveries noted during the grace wait: written now, not
        # by a batch timer that would fire after the store closed.
        self.delivery.cancel_batches()
        if not await self.delivery.flush_batches():
            # The store failed: the messages are redelivered and deduplicated.
            log.warning("stop: pending acks not written")
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
        if self.ownership is not None:
            await self.ownership.stop()
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
        return list(self.commands.unauthenticated)

    async def publish(self, address, lane: int, kind: str, key: str, version: int,
                      payload: bytes, ttl: float = 0.0, report: dict | None = None
                      ) -> int | None:
        """Publish a P2/P3 message (the admin API's path); returns its offset,
        0 when a newer version of ``key`` made it stale, None when a shared
        history or the broker failed."""
        placed = self.loop.create_future()
        self.channels.broadcast(address, lane, kind, key, version, payload, ttl, report,
                                placed.set_result)
        return await placed

    def terminal_changed(self, address: str) -> None:
        """An operator changed a terminal's record (registered, retired,
        revoked): the other workers of a fleet read it again."""
        if self.ownership is not None:
            self.ownership.announce("registry", address)

    def ticket_changed(self, key: str) -> None:
        if self.ownership is not None:
            self.ownership.announce("ticket", f"{self.worker_name}\t{key}")

    def member_forgotten(self, tenant: str, member: str) -> None:
        """A member's personal data was deleted from the store: this worker
        and (a fleet) every other drop what they hold of it in memory (the
        member channel's copies, conversations, offer counts)."""
        self.forget_member_here(tenant, member)
        if self.ownership is not None:
            self.ownership.announce("member", f"{tenant}/{member}")

    def forget_member_here(self, tenant: str, member: str) -> None:
        channel = f"member:{tenant}/{member}"
        for lane in (Lane.P2, Lane.P3):
            stream = self.hub.stream(channel, lane, create=False)
            if stream is not None:
                self.hub.forget(stream)
        self.chat.forget_member_here(tenant, member)
        self.offers.forget_member_here(tenant, member)

    def directory_changed(self, tenant: str, store: str) -> None:
        """An operator changed a store's directory entry: the other workers
        of a fleet read it again."""
        if self.ownership is not None:
            self.ownership.announce("directory", f"{tenant}/{store}")

    async def kick_anywhere(self, address: str, reason: str) -> bool:
        """Close ``address``'s session (CLOSE KICKED) on whichever worker of
        the fleet holds it; False when none does."""
        if self.kick(address, reason):
            return True
        return self.ownership is not None and await self.ownership.kick(address, reason)

    async def members(self, address) -> list[str]:
        """The terminal addresses a message to ``address`` is stored for."""
        return await self.registry.members(address)

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

    def _on_new_epoch(self, old: int, new: int) -> None:
        """The store lost its inbox history (a shared store that came back
        empty) and numbers inboxes afresh under epoch ``new``: every session
        here holds positions of the old history, so each is closed and the
        terminals come back to a WELCOME with the new epoch (PROTOCOL.md
        section 11.4), rather than taking fresh payment results for
        duplicates."""
        conns = list(self.hub.sessions.values())
        log.error("store: inbox history lost (epoch %d -> %d); closing %d sessions so their "
                  "terminals reconnect to the new epoch", old, new, len(conns))
        for conn in conns:
            self.close(conn, Code.SHUTDOWN, "the server's inbox history was reset; reconnect")

    def force_stop(self) -> None:
        """End a running drain now (a second SIGTERM)."""
        self._force_stop = True

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
                 self.node_id, len(conns), self.delivery.in_flight(), delay_ms,
                 delay_ms + spread_ms)
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
            if not self.delivery.busy and self.delivery.in_flight() == 0:
                break
            await asyncio.sleep(0.02)
        left = self.delivery.in_flight()
        await self._settle()
        log.info("drain %s node=%s in_flight=%d seconds=%.3f",
                 "complete" if left == 0 else "timed out" if not self._force_stop else "forced",
                 self.node_id, left, self.loop.time() - started)

    async def _settle(self) -> None:
        """Let running commits, resumes and batch writes finish (bounded)."""
        others = [t for t in self._tasks if t is not self._maintenance_task]
        if others:
            await asyncio.wait(others, timeout=2.0)
        self.delivery.cancel_batches()
        await self.delivery.flush_batches()

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

    async def redrive(self, terminal: str, msg_id: int | None = None,
                      limit: int = 1000) -> list:
        """Put ``terminal``'s dead letters back in its inbox (the one of message
        ``msg_id``, or its oldest ``limit``) with their lane's TTL from now,
        and hand them to its connection; returns the ``store.Redriven``
        entries.  The store failing raises: then nothing changed."""
        delivery = self.cfg.delivery
        redriven = await self.store.redrive(terminal, msg_id, time.time(),
                                            (delivery.p0_ttl, delivery.p1_ttl), limit)
        self.counters.redriven += len(redriven)
        self.delivery.redriven(redriven)
        return redriven

    def all_connections(self) -> list[TerminalConnection]:
        """Every open connection, authenticated or not (a snapshot)."""
        return [*self.hub.sessions.values(), *self.commands.unauthenticated]

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

    # -- closing connections ------------------------------------------------------

    def slow_consumer(self, conn: TerminalConnection) -> None:
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

    async def _expire_services(self, now: float) -> None:
        """Retention of the services' personal data (each maintenance round)."""
        convs, messages = await self.chat.expire(now)
        caps = await self.offers.expire(now)
        tickets = await self.tickets.expire(now)
        notices = await self.store.archive.expire_kind(
            "member.notice", now - self.cfg.retention.member_notice)
        if convs or messages or caps or tickets or notices:
            log.info("retention deleted conversations=%d chat_messages=%d caps=%d tickets=%d "
                     "member_notices=%d", convs, messages, caps, tickets, notices)

    async def _close_services(self) -> None:
        """Stopping: cancel escalation timers, write what is written behind."""
        self.tickets.close()
        for service in (self.tickets, self.offers, self.chat):
            try:                    # (one failing leaves the others' writes to go)
                await service.flush()
            except Exception as exc:
                log.error("services: writing %s's records at stop failed: %s",
                          type(service).__name__, exc)

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
                await self.expire(now)
                await self.store.trim(now, self.cfg.delivery.dedup_window)
                await self._expire_services(now)
                if self.loop.time() >= sweep_at:
                    sweep_at = self.loop.time() + STREAM_SWEEP
                    await self.sweep_streams()
            except Exception:
                log.exception("maintenance failed")

    async def expire(self, now: float) -> list:
        """Dead-letter the P0/P1 entries whose message expired by ``now`` (each
        maintenance round): counted, and each sender that asked for receipts
        gets RECEIPT(EXPIRED).  Returns the ``store.DeadLetter`` entries; the
        store failing raises (nothing expired: the next round tries again)."""
        expired = await self.store.expire(now)
        self.counters.dead(expired)
        for dead in expired:
            if dead.receipt:
                self.delivery.send_receipt(dead.sender, dead.ref, dead.msg_id,
                                           ReceiptStatus.EXPIRED, dead.terminal)
        return expired

    async def sweep_streams(self) -> int:
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

    def add_lane_totals(self, counters) -> None:
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
