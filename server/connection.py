"""One terminal connection: the asyncio protocol over the sans-IO session.

``TerminalConnection`` *is* a ``ServerSession`` (asyncpg's layering: the
protocol class extends the core state machine), so a connection costs one
object plus what the session keeps.  It feeds received bytes to the session,
hands the frames it returns to the node, and writes what the node's flush
drains.  It never writes by itself: all output goes through
``Node.mark_dirty`` so a connection gets at most one ``transport.write`` per
loop iteration however many frames are pending.

All methods run on the event loop.
"""

from __future__ import annotations

import socket
import time

from ..core.session import CLOSED, ServerSession

_SMALL_READ = 16      # frames handled without looking at the clock


RESUMING = object()
"""``TerminalConnection.inbox`` while the resume task reads the store."""


class InboxState:
    """Delivery bookkeeping of one connection's P0/P1 inboxes (created on demand).

    ``cursor[lane]`` is the next seq to hand to the lanes; ``last[lane]`` the
    highest seq known to exist in the store.  Messages ``acked+1 ..
    cursor-1`` are in flight.  ``pumping`` tells that a task is reading the
    store for this lane; live messages then leave delivery to it.  ``early``
    holds, per lane, live messages that came before the one at the cursor
    (seq -> (msg_id, kind, body, created)): stored on other workers, their
    notices can overtake each other, so they wait a moment (``early_timer``)
    for the gap to fill instead of a pump reading them back from the store.
    """

    __slots__ = ("cursor", "last", "pumping", "rto", "progress", "timer", "delivered", "blocked",
                 "blocked_since", "sample_seq", "sample_at", "accepted_at", "early",
                 "early_timer")

    def __init__(self, acked0: int = 0, acked1: int = 0) -> None:
        self.cursor = [0, 0]
        self.last = [0, 0]
        self.pumping = [False, False]
        self.timer = None          # retransmit timer (a wheel Timer)
        self.delivered = [0, 0]
        self.sample_seq = [0, 0]
        self.sample_at = [0.0, 0.0]
        self.accepted_at = ({}, {})    # per lane: seq -> accept time of what is in flight
        self.early = ({}, {})
        self.early_timer = [None, None]
        self.reset(acked0, acked1)

    def reset(self, acked0: int, acked1: int) -> None:
        """Start over at these acked positions (also a pooled state taken
        again: the node keeps the states of fully acked inboxes for reuse,
        their lists and timer included, instead of eight new objects per
        payment result)."""
        cursor, last, delivered = self.cursor, self.last, self.delivered
        cursor[0] = acked0 + 1
        cursor[1] = acked1 + 1
        last[0] = acked0
        last[1] = acked1
        delivered[0] = acked0      # highest seq already reported as delivered
        delivered[1] = acked1
        self.pumping[0] = self.pumping[1] = False
        self.rto = 0.0             # current retransmit timeout (0 = initial)
        self.progress = 0.0        # loop time of the last ack progress
        self.blocked = False       # a pump stopped because the lane queue was full
        self.blocked_since = 0.0   # loop time it stopped
        # The in-flight seq timed for the ack latency metric (0 = none), and
        # time.perf_counter() when it was handed to the lanes.
        self.sample_seq[0] = self.sample_seq[1] = 0
        self.sample_at[0] = self.sample_at[1] = 0.0
        # Accept times (unix s) of the messages in flight, by seq in seq order,
        # until acked (the accepted -> acked histogram; see Delivery.on_ack).
        self.accepted_at[0].clear()
        self.accepted_at[1].clear()
        self.drop_early(0)
        self.drop_early(1)

    def drop_early(self, lane: int) -> None:
        """Forget the early messages of ``lane`` (a pump reads them instead)."""
        self.early[lane].clear()
        timer = self.early_timer[lane]
        if timer is not None:
            timer.cancel()
            self.early_timer[lane] = None


# Why a connection's reading is paused (``extra["holds"]``, a bitmask): it
# reads again once every reason is gone.
HOLD_BACKLOG = 1     # frames of an earlier read wait their turn (read budget, SEND rate)
HOLD_PONG = 2        # the session holds input until its queued PONG went out
HOLD_BUDGET = 4      # its control frames are over their budget (see Node.check_budget)
HOLD_AUTH = 8        # a refused login's answer is being held back (auth throttling)
HOLD_ANSWERS = 16    # HISTORY answers wait to be queued (the terminal reads them slowly)
HOLD_LOOKUP = 32     # a login waits for its terminal's record from a shared registry
# Holds that also stop the handling of frames already read (the rest of a
# read waits in the backlog until they are lifted).
_STOP_HANDLING = HOLD_BUDGET | HOLD_ANSWERS | HOLD_AUTH | HOLD_LOOKUP
# Holds that only the terminal's reading lifts: held so too long is a slow consumer.
STALL_HOLDS = HOLD_PONG | HOLD_BUDGET | HOLD_ANSWERS
STOP_AFTER = -1.0
AGAIN_AFTER_HOLDS = -2.0     # on_frame: handle this frame again once the stopping holds lift
"""What ``Node.on_frame`` returns for a frame it handled that set a hold stopping
the handling of the frames after it (a HISTORY answer still going out, a
refused login being held back)."""


class TerminalConnection(ServerSession):
    """The server side of one terminal's TCP (or TLS) connection."""

    __slots__ = ("transport", "claims", "address", "paused", "timer", "inbox", "extra")
    node = None         # the Node: each node makes a subclass that sets it (Node.connection_class)

    def __init__(self) -> None:
        node = self.node
        super().__init__(node.encoder, max_frame_size=node.max_frame_size,
                         max_queued_bytes=node.max_queued_bytes,
                         lane_weights=node.lane_weights, now=node.loop.time(),
                         handshake_frame_size=node.handshake_frame)
        self.transport = None
        self.claims = None
        self.address = ""
        self.paused = False
        self.timer = None
        self.inbox = None       # InboxState while the terminal has P0/P1 in flight or waiting
        self.extra = None       # rarely used state (explicit subscriptions, jobs, holds), a dict

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=self.node.write_high_water)
        self.node.on_connection_made(self)

    def data_received(self, data: bytes) -> None:
        node = self.node
        frames = self.receive_data(data, node.loop.time())
        counters = node.counters
        counters.frames_in += len(frames)
        counters.bytes_in += len(data)
        self._take(frames)

    def _take(self, frames: list) -> None:
        """Handle frames just received (or released from a hold)."""
        node = self.node
        if self.has_backlog:
            # Reading is paused, but a transport may still hand over what it
            # had (TLS: records already decrypted): it goes after the backlog.
            rest, start = self.extra["backlog"]
            self.extra["backlog"] = (rest[start:] + frames, 0)
        else:
            self._handle(frames, 0)
            node.commit_now()
        if self.input_held:
            node.counters.ping_holds += 1
            self.hold(HOLD_PONG)
            node.watch_stall(self)
        node.check_budget(self)
        if self.pending:
            node.mark_dirty(self)

    @property
    def has_backlog(self) -> bool:
        """Frames received earlier wait for their turn (see _handle); reading is paused."""
        extra = self.extra
        return extra is not None and "backlog" in extra

    def _handle(self, frames: list, start: int) -> None:
        """Handle ``frames[start:]`` for at most ``node.output.read_budget`` seconds.

        A terminal that sends a burst (a payment backend's window of
        thousands of SENDs arrives as megabytes, and libuv reads up to 32
        buffers of it in one go) would otherwise keep the loop for the whole
        burst: its group commit and its SENDACKs would wait for the last
        frame, and every other connection with it.  Past the budget the rest
        waits in ``extra["backlog"]`` with reading paused (so frames stay in
        order and the kernel applies backpressure), and goes on at the next
        iteration, after the commit of what was handled.  A frame the node
        cannot take yet (a SEND over its connection's rate: ``on_frame``
        returns the seconds to wait) waits there the same way, with the
        frames behind it, for that long."""
        node = self.node
        on_frame = node.on_frame
        budget = node.control_budget
        n = len(frames)
        i = start
        small = n - start <= _SMALL_READ
        deadline = 0.0 if small else time.perf_counter() + node.output.read_budget
        while i < n:
            wait = on_frame(self, frames[i])
            if wait is not None:
                if wait == STOP_AFTER:
                    if i + 1 < n:
                        self._defer(frames, i + 1, STOP_AFTER)
                else:
                    self._defer(frames, i, wait)
                return
            i += 1
            if i < n:
                if self.control_bytes > budget:
                    node.check_budget(self)         # answers pile up: stop here
                    if self.holds & _STOP_HANDLING:
                        self._defer(frames, i, STOP_AFTER)
                        return
                if not small and time.perf_counter() > deadline:
                    node.counters.read_yields += 1
                    self._defer(frames, i, 0.0)
                    return

    def _defer(self, frames: list, start: int, delay: float) -> None:
        """Keep ``frames[start:]`` for later (``delay`` s; 0: the next
        iteration; < 0: when the holds that stop handling are lifted)."""
        if self.transport is None:
            return            # the connection is gone: so is what it sent
        extra = self.extras()
        extra["backlog"] = (frames, start)
        loop = self.node.loop
        extra.setdefault("since", loop.time())      # when these frames were read
        self.hold(HOLD_BACKLOG)
        if delay > 0.0:
            loop.call_later(delay, self._on_backlog)
        elif delay == 0.0:
            loop.call_soon(self._on_backlog)

    def _on_backlog(self) -> None:
        extra = self.extra
        if extra is None or "backlog" not in extra or extra.get("holds", 0) & _STOP_HANDLING:
            return            # (nothing waits; or a hold's release calls again)
        backlog = extra.pop("backlog")
        frames, start = backlog
        transport = self.transport
        if transport is None or transport.is_closing():
            return            # the connection is gone: so is what it sent
        self._handle(frames, start)
        self.node.commit_now()
        if not self.has_backlog:
            self.extra.pop("since", None)
            self.release(HOLD_BACKLOG)
        self.node.check_budget(self)
        if self.pending or self.state == CLOSED:
            self.node.mark_dirty(self)      # (a CLOSED one: the flush closes it now)

    def resume_input(self) -> None:
        """The PONG that held input went out: go on with what waited."""
        node = self.node
        frames = self.receive_data(b"", node.loop.time())
        if not self.input_held:
            self.release(HOLD_PONG)
        node.counters.frames_in += len(frames)
        self._take(frames)

    def extras(self) -> dict:
        """``extra``, the connection's rarely used state, made on first use."""
        extra = self.extra
        if extra is None:
            extra = self.extra = {}
        return extra

    # -- reading holds -------------------------------------------------------------

    def hold(self, reason: int) -> None:
        """Stop reading for ``reason`` (one of HOLD_*) until :meth:`release`."""
        extra = self.extras()
        holds = extra.get("holds", 0)
        if not holds:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.pause_reading()
        extra["holds"] = holds | reason

    def release(self, reason: int) -> None:
        """``reason`` no longer holds reading; read again if nothing else does
        (and go on with frames already read that waited for it)."""
        extra = self.extra
        if extra is None or not extra.get("holds", 0) & reason:
            return
        holds = extra["holds"] & ~reason
        if reason & _STOP_HANDLING and not holds & _STOP_HANDLING and "backlog" in extra:
            self.node.loop.call_soon(self._on_backlog)
        if holds:
            extra["holds"] = holds
            return
        del extra["holds"]
        if not extra:
            self.extra = None
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    @property
    def holds(self) -> int:
        """The HOLD_* reasons reading is paused for (0: reading)."""
        extra = self.extra
        return 0 if extra is None else extra.get("holds", 0)

    def eof_received(self):
        return False     # close the transport

    def connection_lost(self, exc) -> None:
        self.node.on_connection_lost(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.pending:
            self.node.mark_dirty(self)

    def __repr__(self) -> str:
        return f"<TerminalConnection {self.address or 'unauthenticated'}>"


def listen_socket(host: str, port: int, send_buffer: int, notsent_lowat: int,
                  reuse_port: bool = False) -> socket.socket:
    """The terminal listener.  Accepted sockets inherit its SO_SNDBUF and
    TCP_NOTSENT_LOWAT, so the small kernel buffers (a P0 never waits
    behind megabytes already handed to the kernel) cost nothing per
    connection.

    The low-water mark is what keeps a slow terminal's P0 near the head:
    without it the kernel takes P3 up to the whole send buffer, and the
    transport's buffer queues more behind that, all of it ahead of any
    later payment result (on a 2 Mbit/s link, most of a second).  With
    it the kernel holds about ``notsent_lowat`` unsent bytes and the rest
    stays in the lanes, where P0 goes first and P3 can be shed.

    ``reuse_port``: the workers of a node each bind the same port
    (SO_REUSEPORT) and the kernel spreads new connections over them."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    lowat = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if notsent_lowat and lowat is not None and family in (socket.AF_INET,
                                                                socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, lowat, notsent_lowat)
    sock.bind(addr)
    sock.setblocking(False)
    return sock
