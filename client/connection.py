"""One asyncio connection of a terminal: a thin driver over ClientSession.

The sans-IO ``ClientSession`` (``tillwire.core.session``) does the protocol;
this module owns the socket, the heartbeat timer and the futures an
application awaits.  ``Connection`` lives for one TCP connection; the SDK's
``Client`` (reconnects, resume state on disk) is built on it.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import ssl as _ssl

import orjson

from ..core.codes import KIND_LANES, Code, Flag, FrameType, Lane
from ..core.errors import SessionClosed, TillwireError
from ..core.session import CLOSED, OPEN, ClientSession, Encoder


RETRY_CODES = frozenset({Code.RATE_LIMITED, Code.TOO_MANY_UNACKED})
"""ERROR codes whose text starts with a retry hint (PROTOCOL.md section 7, ERROR)."""


def retry_hint(code: int, text: str) -> float | None:
    """The seconds an ERROR of ``code`` with ``text`` asks to wait before a
    retry (``retry_ms=<n> ...``), or None when it carries no hint."""
    if code not in RETRY_CODES or not text.startswith("retry_ms="):
        return None
    digits = text[9:].split(" ", 1)[0]
    return int(digits) / 1000.0 if digits.isdigit() else None


class SendError(TillwireError):
    """The server refused a SEND (ERROR frame); ``code`` says why, and
    ``retry_after`` how many seconds to wait before trying again (for
    RATE_LIMITED and TOO_MANY_UNACKED; else None)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{Code(code).name}: {message}")
        self.code = Code(code)
        self.message = message
        self.retry_after = retry_hint(code, message)


class Message:
    """A message received by the terminal.

    ``id`` is the server's message id (inbox messages) or 0; ``seq`` the
    inbox sequence or channel offset; ``channel`` the channel name for P2/P3;
    ``duplicate`` is True when the server flagged a retransmission (the
    application may have seen it before a crash: check before acting).
    """

    __slots__ = ("id", "seq", "lane", "kind", "payload", "channel", "duplicate", "_conn",
                 "_body")

    def __init__(self, conn, frame, channel: str | None) -> None:
        self.id = frame.msg_id
        self.seq = frame.seq if channel is None else frame.offset
        self.lane = frame.flags & Flag.LANE_MASK
        self.kind = frame.kind
        self.payload = frame.payload
        self.channel = channel
        self.duplicate = bool(frame.flags & Flag.RETRANSMIT)
        self._conn = conn
        self._body = None

    @property
    def body(self) -> dict:
        if self._body is None:
            self._body = orjson.loads(self.payload)
        return self._body

    @property
    def needs_ack(self) -> bool:
        return self.channel is None

    async def ack(self) -> None:
        """Acknowledge this inbox message (after processing it). No-op for broadcasts."""
        if self.channel is None:
            self._conn.ack(self.lane, self.seq)

    def __repr__(self) -> str:
        where = self.channel or f"inbox P{self.lane}"
        return f"<Message {self.kind} {where} seq={self.seq} id={self.id}>"


class _Protocol(asyncio.Protocol):
    def __init__(self, conn: "Connection") -> None:
        self.conn = conn

    def connection_made(self, transport) -> None:
        self.conn._transport = transport

    def data_received(self, data: bytes) -> None:
        self.conn._on_data(data)

    def connection_lost(self, exc) -> None:
        self.conn._on_lost(exc)


async def connected_socket(host: str, port: int, *, rcvbuf: int,
                           local_addr=None) -> socket.socket:
    """A non-blocking TCP socket connected to (host, port) with SO_RCVBUF set
    to ``rcvbuf`` before connecting (the window it offers is set then); for
    ``loop.create_connection(sock=...)``.  Closed again if connecting fails."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if local_addr is not None:
            sock.bind(local_addr)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class Connection:
    """A terminal's live session with a server (one TCP connection)."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop | None = None,
                 max_frame_size: int = 1 << 20, compress_threshold: int = 512) -> None:
        self.loop = loop or asyncio.get_event_loop()
        self.session = ClientSession(Encoder(max_frame_size, compress_threshold),
                                     max_frame_size=max_frame_size, now=self.loop.time())
        self.welcome = None          # the WELCOME frame
        self.info: dict = {}         # WELCOME's JSON payload
        self.goaway = None           # the GOAWAY frame, if the server is draining
        self.closed = asyncio.Event()
        self.close_code = 0
        self.close_reason = ""
        self._transport = None
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._welcome: asyncio.Future = self.loop.create_future()
        self._sends: dict[int, asyncio.Future] = {}
        self._requests: dict[int, tuple[asyncio.Future, list]] = {}
        self._refs = itertools.count(random.randrange(1, 1 << 40))
        self._ping_handle = None
        self._flush_handle = None
        self.receipts: asyncio.Queue = asyncio.Queue()

    # -- opening ------------------------------------------------------------------

    @classmethod
    async def open(cls, host: str, port: int, token: str, *, heartbeat: float = 0.0,
                   epoch: int = 0, p0: int = 0, p1: int = 0, channels: dict | None = None,
                   ssl: _ssl.SSLContext | None = None, timeout: float = 10.0,
                   local_addr=None, client_info: dict | None = None,
                   rcvbuf: int | None = None) -> "Connection":
        """Connect, authenticate and resume; returns once WELCOME arrived.

        ``rcvbuf`` sets SO_RCVBUF before connecting (a terminal on a small
        device, or a test that wants the server's queues to fill quickly).
        """
        conn = cls()
        if rcvbuf is None:
            connect = conn.loop.create_connection(
                lambda: _Protocol(conn), host, port, ssl=ssl, local_addr=local_addr)
        else:
            sock = await connected_socket(host, port, rcvbuf=rcvbuf, local_addr=local_addr)
            connect = conn.loop.create_connection(
                lambda: _Protocol(conn), sock=sock, ssl=ssl,
                server_hostname=host if ssl is not None else None)
        await asyncio.wait_for(connect, timeout)
        session = conn.session
        if session.state == CLOSED:
            # Refused at once (CONNECTION_LIMIT, DRAINING): nothing to say to it.
            conn.abort()
            raise SessionClosed(session.close_code, session.close_reason)
        session.hello(token, int(heartbeat * 1000),
                      orjson.dumps(client_info) if client_info else b"")
        session.resume(epoch, p0, p1, channels)
        conn._write()
        try:
            await asyncio.wait_for(asyncio.shield(conn._welcome), timeout)
        except BaseException:
            conn.abort()
            # The abort fails the WELCOME future too; what is raised here says it.
            conn._welcome.add_done_callback(
                lambda fut: fut.cancelled() or fut.exception())
            raise
        return conn

    # -- input ----------------------------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        session = self.session
        for frame in session.receive_data(data, self.loop.time()):
            self._on_frame(frame)
        if session.state == CLOSED and self._transport is not None:
            self._write()
            self._transport.close()
        elif session.pending:
            self._schedule_write()

    def _on_frame(self, frame) -> None:
        t = frame.type
        if t == FrameType.DELIVER:
            self._inbox.put_nowait(Message(self, frame, None))
        elif t == FrameType.BROADCAST:
            name, _lane = self.session.channel_name(frame.channel)
            self._inbox.put_nowait(Message(self, frame, name))
        elif t == FrameType.SENDACK:
            fut = self._sends.pop(frame.ref, None)
            if fut is not None and not fut.done():
                fut.set_result(frame)
        elif t == FrameType.ERROR:
            fut = self._sends.pop(frame.ref, None)
            exc = SendError(frame.code, frame.payload.decode("utf-8", "replace"))
            if fut is not None and not fut.done():
                fut.set_exception(exc)
            req = self._requests.pop(frame.ref, None)
            if req is not None and not req[0].done():
                req[0].set_exception(exc)
        elif t == FrameType.WELCOME:
            self.welcome = frame
            self.info = orjson.loads(frame.payload) if frame.payload else {}
            self._arm_ping()
            if not self._welcome.done():
                self._welcome.set_result(frame)
        elif t in (FrameType.HISTORY_ITEM, FrameType.SUBSCRIBED, FrameType.UNSUBSCRIBED):
            req = self._requests.get(frame.ref) if t == FrameType.HISTORY_ITEM else None
            if req is not None:
                req[1].append(frame)
            elif t == FrameType.SUBSCRIBED:
                for ref, (fut, _) in list(self._requests.items()):
                    if getattr(fut, "tillwire_stream", None) == (frame.to, frame.flags & 3):
                        del self._requests[ref]
                        if not fut.done():
                            fut.set_result(frame)
            elif t == FrameType.UNSUBSCRIBED:
                for ref, (fut, _) in list(self._requests.items()):
                    if getattr(fut, "tillwire_unsub", None) == frame.channel:
                        del self._requests[ref]
                        if not fut.done():
                            fut.set_result(frame)
        elif t == FrameType.HISTORY_END:
            req = self._requests.pop(frame.ref, None)
            if req is not None and not req[0].done():
                req[0].set_result((req[1], frame))
        elif t == FrameType.RECEIPT:
            self.receipts.put_nowait(frame)
        elif t == FrameType.GOAWAY:
            self.goaway = frame
        elif t == FrameType.CLOSE:
            self.close_code = frame.code
            self.close_reason = frame.payload.decode("utf-8", "replace")

    def _on_lost(self, exc) -> None:
        self._transport = None
        if self._ping_handle is not None:
            self._ping_handle.cancel()
        if not self.close_code:
            session = self.session
            self.close_code = session.close_code or Code.INTERNAL_ERROR
            self.close_reason = session.close_reason or (
                str(exc) if exc else "connection lost" if self.welcome is not None
                else "the server closed the connection before WELCOME (a TLS port spoken "
                     "to in plaintext?)")
        err = SessionClosed(self.close_code, self.close_reason)
        for fut in list(self._sends.values()) + [f for f, _ in self._requests.values()]:
            if not fut.done():
                fut.set_exception(err)
        self._sends.clear()
        self._requests.clear()
        if not self._welcome.done():
            self._welcome.set_exception(err)
        self._inbox.put_nowait(None)
        self.closed.set()

    # -- output ---------------------------------------------------------------------

    def _schedule_write(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._write)

    def _write(self) -> None:
        self._flush_handle = None
        if self._transport is None:
            return
        data = self.session.data_to_send(self.loop.time())
        if data:
            self._transport.write(data)

    def _arm_ping(self, delay: float | None = None) -> None:
        hb = self.session.heartbeat_ms / 1000.0
        if hb > 0:
            self._ping_handle = self.loop.call_later(hb if delay is None else delay,
                                                     self._on_ping_timer)

    def _on_ping_timer(self) -> None:
        """PING when nothing was sent for a heartbeat interval (PROTOCOL.md 10.3)."""
        session = self.session
        now = self.loop.time()
        if session.state != OPEN or self._transport is None:
            return
        if session.dead(now):
            self._transport.abort()
            return
        if session.ping_due(now):
            session.ping()
            self._write()
        hb = session.heartbeat_ms / 1000.0
        # Next check: when a ping falls due, but at least every half interval
        # so a dead connection is noticed.
        self._arm_ping(max(0.005, min(session.last_sent + hb - now, hb / 2)))

    # -- API ------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._transport is not None and self.session.state == OPEN

    def next_ref(self) -> int:
        return next(self._refs)

    async def send(self, kind: str, body, to: str, *, lane: int | None = None,
                   ttl: float = 0.0, key: str = "", ref: int | None = None,
                   receipt: bool = False, timeout: float = 10.0):
        """Publish a message; resolves with the SENDACK frame once accepted.

        ``ref`` makes a resend idempotent (reuse it after a timeout); by
        default a fresh one is drawn.  Raises SendError if refused,
        asyncio.TimeoutError if no answer came in ``timeout`` seconds.
        """
        if lane is None:
            lane = KIND_LANES.get(kind, Lane.P1)
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        ref = self.next_ref() if ref is None else ref
        if not self.is_open:
            raise SessionClosed(self.close_code or Code.NORMAL, "connection is closed")
        limit = self.session.peer_max_frame
        if limit and len(payload) + len(to) + len(kind) + len(key) + 32 > limit:
            # The server would close the connection for it (FRAME_TOO_LARGE).
            raise SendError(Code.BAD_MESSAGE, f"body: {len(payload)} bytes, more than this "
                                              f"server takes in a frame ({limit}, WELCOME "
                                              "max_frame)")
        fut = self.loop.create_future()
        self._sends[ref] = fut
        self.session.send(lane, to, kind, payload, ref=ref, ttl_ms=int(ttl * 1000), key=key,
                          receipt=receipt)
        self._schedule_write()
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._sends.pop(ref, None)

    def ack(self, lane: int, seq: int) -> None:
        self.session.ack(lane, seq)
        self._schedule_write()

    def nack(self, lane: int, seq: int, code: int = 0, reason: str = "") -> None:
        self.session.nack(lane, seq, code, reason)
        self._schedule_write()

    def read(self, msg_id: int) -> None:
        self.session.read(msg_id)
        self._schedule_write()

    async def subscribe(self, name: str, lane: int = Lane.P2, epoch: int = 0, offset: int = 0,
                        timeout: float = 10.0):
        ref = self.next_ref()
        fut = self.loop.create_future()
        fut.tillwire_stream = (name, lane)
        self._requests[ref] = (fut, [])
        self.session.subscribe(ref, name, lane, epoch, offset)
        self._schedule_write()
        return await asyncio.wait_for(fut, timeout)

    async def history(self, name: str, lane: int = Lane.P2, epoch: int = 0, offset: int = 0,
                      count: int = 100, timeout: float = 10.0):
        """One page of history: (items, HISTORY_END frame).  The END's code is
        PARTIAL when the server's page limit cut the answer: ask again from
        its offset (``Client.history`` does)."""
        ref = self.next_ref()
        fut = self.loop.create_future()
        self._requests[ref] = (fut, [])
        self.session.history(ref, name, lane, epoch, offset, count)
        self._schedule_write()
        return await asyncio.wait_for(fut, timeout)

    async def receive(self, timeout: float | None = None) -> Message:
        """The next message; raises SessionClosed once the connection ended."""
        msg = await asyncio.wait_for(self._inbox.get(), timeout)
        if msg is None:
            self._inbox.put_nowait(None)
            raise SessionClosed(self.close_code, self.close_reason)
        return msg

    def __aiter__(self):
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.receive()
        except SessionClosed:
            raise StopAsyncIteration from None

    async def close(self, code: int = Code.NORMAL, reason: str = "") -> None:
        if self._transport is not None:
            self.session.close(code, reason)
            self._write()
            self._transport.close()
        await self.closed.wait()

    def pause_reading(self) -> None:
        """Stop reading from the socket (lets the server's queues fill: tests)."""
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
