"""The terminal SDK: a client that stays connected and processes each message once.

``Client`` drives one ``Connection`` at a time (``client/connection.py``,
itself a thin driver over the sans-IO ``ClientSession``) and adds what a
till needs in the field:

* reconnects with full-jitter exponential backoff, or after the delay a
  draining server asked for (GOAWAY);
* resumes without gaps: the inbox epoch, the processed position of each
  inbox (P0, P1) and the channel positions live in a small state file, so a
  till that crashes before processing a payment result gets it again, and one
  that processed it does not get it twice;
* explicit acks (``await msg.ack()`` once processed), or auto-ack: a message
  is acked when the application asks for the next one;
* idempotent sends: ``send`` keeps its ref across reconnects until the
  server answers, so a resend never creates a second message.

Example::

    client = await tillwire.client.connect("pos.example", 7070, token=TOKEN,
                                           state_path="/var/lib/till/tillwire.json")
    try:
        async for msg in client:
            if msg.kind == "payment.result":
                settle(msg.body)
            await msg.ack()
    except tillwire.client.Kicked:      # another session took over, or an operator kicked it
        ...
    except tillwire.client.Refused:     # the token is refused for good: get a new one
        ...

How a client ends, and what the application sees:

* ``await client.close()``: ``async for`` ends; ``receive()`` and ``send()``
  raise :class:`ClientClosed` (code ``NORMAL``).
* kicked: CLOSE ``TAKEOVER`` (the same terminal logged in elsewhere) or
  ``KICKED`` (an operator): ``async for``, ``receive()`` and ``send()``
  raise :class:`Kicked`.  Reconnecting would fight the other session, so
  the client does not.
* refused for good: ``AUTH_FAILED``, ``TOKEN_EXPIRED``, ``TOKEN_REVOKED``
  (revoked or retired), ``UNSUPPORTED_VERSION``: :class:`Refused`, from
  ``connect()`` if it happens at the first login, else from ``async for``,
  ``receive()`` and ``send()``.
* everything else (the network, a restart, ``DRAINING``,
  ``CONNECTION_LIMIT``, ``HEARTBEAT_TIMEOUT``, ``SLOW_CONSUMER``) is
  transient: the client reconnects and resumes by itself.  ``connect()``
  waits for the first session as long as it takes unless given
  ``first_timeout`` (seconds) or ``first_attempts``: then it raises
  :class:`ConnectFailed` with the last attempt's error.

``on_connected(info)`` and ``on_disconnected(code, reason)`` (optional
callables) let an application show each session's start and end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import ssl as _ssl
import tempfile

import orjson

from ..core.codes import KIND_LANES, Code, Lane
from ..core.errors import SessionClosed, TillwireError
from .connection import Connection, SendError

# Close codes after which reconnecting cannot help: the application must act.
FATAL_CODES = frozenset({
    Code.AUTH_FAILED, Code.TOKEN_EXPIRED, Code.TOKEN_REVOKED, Code.UNSUPPORTED_VERSION,
    Code.TAKEOVER, Code.KICKED,
})


KICK_CODES = frozenset({Code.TAKEOVER, Code.KICKED})
"""Close codes that raise :class:`Kicked`; the rest of FATAL_CODES raise :class:`Refused`."""


class ClientClosed(TillwireError):
    """The client stopped: closed by the application (code ``NORMAL``), or
    for good by the server (the subclasses :class:`Kicked` and
    :class:`Refused`).  ``code`` is the close code, ``reason`` its text."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"{Code(code).name}: {reason}" if reason else Code(code).name)
        self.code = Code(code)
        self.reason = reason


class Kicked(ClientClosed):
    """The server closed this terminal's session with ``TAKEOVER`` (the same
    terminal logged in again elsewhere) or ``KICKED`` (an operator); raised
    from ``async for``, ``receive()`` and ``send()``, never a silent end."""


class Refused(ClientClosed):
    """The server refused this terminal for good: ``AUTH_FAILED``,
    ``TOKEN_EXPIRED``, ``TOKEN_REVOKED`` or ``UNSUPPORTED_VERSION``.  A new
    token (or SDK) is needed; retrying the same one cannot help."""


class ConnectFailed(TillwireError):
    """No session could be opened within ``first_timeout`` seconds or
    ``first_attempts`` attempts; ``reason`` is the last attempt's error
    (connection refused, a TLS certificate not trusted, no WELCOME in time)."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"cannot connect to {host}:{port}: {reason}")
        self.reason = reason


def closed_for(code: int, reason: str) -> ClientClosed:
    """The exception a client stopped by the server with ``code`` raises."""
    cls = Kicked if code in KICK_CODES else Refused if code in FATAL_CODES else ClientClosed
    return cls(code, reason)


def describe_error(exc: BaseException) -> str:
    """One line saying why a connection attempt failed, with the likely fix."""
    if isinstance(exc, _ssl.SSLCertVerificationError):
        return (f"TLS: the server's certificate is not trusted ({exc.verify_message}): check "
                "the CA given for it")
    if isinstance(exc, _ssl.SSLError):
        if exc.reason == "WRONG_VERSION_NUMBER":
            return "TLS: the server did not answer in TLS (is this port plaintext?)"
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listening there?)"
    if isinstance(exc, asyncio.TimeoutError):
        return ("no WELCOME in time after connecting (a TLS port spoken to in plaintext? "
                "a server too busy?)")
    if isinstance(exc, SessionClosed):
        # INTERNAL_ERROR here is no CLOSE from the server: its reason says what happened.
        return exc.reason if exc.code == Code.INTERNAL_ERROR and exc.reason else str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


class Message:
    """A message for the application.

    ``id`` is the server's message id (inbox messages; 0 for broadcasts),
    ``kind`` e.g. ``"payment.result"``, ``lane`` 0-3, ``body`` a dict,
    ``channel`` the channel name of a broadcast (None for inbox messages),
    ``seq`` the inbox sequence or channel offset, and ``duplicate`` is True
    when the server flagged a retransmission that this till may already have
    processed before a crash (check your own records before acting twice).
    """

    __slots__ = ("id", "kind", "lane", "seq", "channel", "duplicate", "payload", "_client",
                 "_body", "_acked")

    def __init__(self, client: "Client", raw) -> None:
        self.id = raw.id
        self.kind = raw.kind
        self.lane = raw.lane
        self.seq = raw.seq
        self.channel = raw.channel
        self.duplicate = raw.duplicate
        self.payload = raw.payload
        self._client = client
        self._body = None
        self._acked = raw.channel is not None

    @property
    def body(self) -> dict:
        if self._body is None:
            self._body = orjson.loads(self.payload)
        return self._body

    async def ack(self) -> None:
        """Acknowledge: the till has processed this message (no-op for broadcasts)."""
        if not self._acked:
            self._acked = True
            self._client._ack(self.lane, self.seq)

    def __repr__(self) -> str:
        where = self.channel or f"inbox P{self.lane}"
        return f"<Message {self.kind} {where} seq={self.seq} id={self.id}" \
               f"{' duplicate' if self.duplicate else ''}>"


class State:
    """What a terminal must remember to resume without gaps (the state file)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.epoch = 0
        self.processed = [0, 0]
        self.channels: dict[tuple[str, int], tuple[int, int]] = {}
        if path and os.path.exists(path):
            with open(path, "rb") as f:
                doc = orjson.loads(f.read() or b"{}")
            self.epoch = int(doc.get("epoch", 0))
            self.processed = [int(x) for x in doc.get("processed", [0, 0])]
            for name, lanes in doc.get("channels", {}).items():
                for lane, (e, o) in lanes.items():
                    self.channels[(name, int(lane[1]))] = (int(e), int(o))

    def save(self) -> None:
        """Write atomically (temp file, fsync, rename): a crash never leaves half a file."""
        if not self.path:
            return
        nested: dict[str, dict[str, list[int]]] = {}
        for (name, lane), (e, o) in self.channels.items():
            nested.setdefault(name, {})[f"P{lane}"] = [e, o]
        data = orjson.dumps({"epoch": self.epoch, "processed": self.processed,
                             "channels": nested})
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".tillwire-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


class Client:
    """A terminal's session with Tillwire that survives disconnects (see module doc)."""

    def __init__(self, host: str, port: int, token: str, *, state_path: str | None = None,
                 auto_ack: bool = False, heartbeat: float = 0.0,
                 ssl: _ssl.SSLContext | None = None, backoff_base: float = 0.5,
                 backoff_max: float = 30.0, connect_timeout: float = 10.0,
                 client_info: dict | None = None, on_connected=None,
                 on_disconnected=None) -> None:
        self.host, self.port, self.token = host, port, token
        self.auto_ack = auto_ack
        self.heartbeat = heartbeat
        self.ssl = ssl
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.client_info = client_info
        self.on_connected = on_connected          # (info: dict) -> None, each new session
        self.on_disconnected = on_disconnected    # (code: Code, reason: str) -> None, each end
        self.state = State(state_path)
        self.conn: Connection | None = None
        self.info: dict = {}
        self.connects = 0
        self.failed_attempts = 0                  # since the last session opened
        self.last_error = ""                      # why the last attempt failed (describe_error)
        self.closed: ClientClosed | ConnectFailed | None = None
        self.loop = asyncio.get_event_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._connected = asyncio.Event()
        self._last_message: Message | None = None
        self._save_handle = None
        self._task: asyncio.Task | None = None
        self._first_attempts: int | None = None
        self._first: asyncio.Future = self.loop.create_future()
        self.receipts: asyncio.Queue = asyncio.Queue()

    # -- lifecycle ------------------------------------------------------------------

    async def start(self, first_timeout: float | None = None,
                    first_attempts: int | None = None) -> "Client":
        """Connect (retrying) and return once the first session is open.

        Raises :class:`Refused` when the server refuses the token for good,
        and :class:`ConnectFailed` when ``first_timeout`` seconds or
        ``first_attempts`` attempts passed without a session (by default it
        waits as long as it takes: a till may boot before its server)."""
        self._first_attempts = first_attempts
        self._task = self.loop.create_task(self._run())
        try:
            await asyncio.wait_for(asyncio.shield(self._first), first_timeout)
        except asyncio.TimeoutError:
            self._stop(ConnectFailed(self.host, self.port, self.last_error or
                                     f"no session within {first_timeout:g} s"))
            await self._cancel_task()
            raise self.closed from None
        except ClientClosed:
            await self._cancel_task()
            raise
        except ConnectFailed:
            await self._cancel_task()
            raise
        return self

    async def _cancel_task(self) -> None:
        if self._first.done() and not self._first.cancelled():
            self._first.exception()              # retrieved: raised by start() itself
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _open(self) -> Connection:
        st = self.state
        return await Connection.open(self.host, self.port, self.token,
                                     heartbeat=self.heartbeat, epoch=st.epoch,
                                     p0=st.processed[0], p1=st.processed[1],
                                     channels=st.channels, ssl=self.ssl,
                                     timeout=self.connect_timeout,
                                     client_info=self.client_info)

    async def _run(self) -> None:
        attempt = 0
        while self.closed is None:
            try:
                conn = await self._open()
            except (OSError, asyncio.TimeoutError, SessionClosed) as exc:
                code = getattr(exc, "code", None)
                if code in FATAL_CODES:
                    self._stop(closed_for(code, getattr(exc, "reason", str(exc))))
                    return
                attempt += 1
                self.failed_attempts = attempt
                self.last_error = describe_error(exc)
                if (not self._first.done() and self._first_attempts is not None
                        and attempt >= self._first_attempts):
                    self._stop(ConnectFailed(self.host, self.port, self.last_error))
                    return
                await asyncio.sleep(self._backoff(attempt))
                continue
            attempt = 0
            self.failed_attempts = 0
            self.connects += 1
            self._attach(conn)
            if self.on_connected is not None:
                self.on_connected(conn.info)
            await self._pump(conn)
            self._connected.clear()
            if self.closed is not None:
                return
            if self.on_disconnected is not None:
                self.on_disconnected(Code(conn.close_code), conn.close_reason)
            if conn.close_code in FATAL_CODES:
                self._stop(closed_for(conn.close_code, conn.close_reason))
                return
            if conn.goaway is not None:
                await asyncio.sleep(conn.goaway.delay / 1000.0)   # the server's jittered hint
            else:
                attempt += 1
                await asyncio.sleep(self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)]."""
        return random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** attempt))

    def _attach(self, conn: Connection) -> None:
        self.conn = conn
        self.info = conn.info
        welcome = conn.welcome
        st = self.state
        if welcome.epoch != st.epoch:          # the server's inbox history was reset
            st.epoch = welcome.epoch
            st.processed = [0, 0]
            self._schedule_save()
        self._connected.set()
        if not self._first.done():
            self._first.set_result(None)

    async def _pump(self, conn: Connection) -> None:
        """Move messages from one connection to the application, dropping what
        this till already processed (a replay after an ack that was lost)."""
        st = self.state
        receipts = conn.receipts
        while True:
            try:
                raw = await conn.receive()
            except SessionClosed:
                while not receipts.empty():
                    self.receipts.put_nowait(receipts.get_nowait())
                return
            while not receipts.empty():
                self.receipts.put_nowait(receipts.get_nowait())
            if raw.channel is None:
                if raw.seq <= st.processed[raw.lane]:
                    conn.ack(raw.lane, raw.seq)     # processed before: tell the server again
                    continue
            else:
                st.channels[(raw.channel, raw.lane)] = \
                    conn.session.channel_positions.get((raw.channel, raw.lane), (0, 0))
                self._schedule_save()
            self._queue.put_nowait(Message(self, raw))

    def _stop(self, why: ClientClosed | ConnectFailed) -> None:
        if self.closed is None:
            self.closed = why
        self._queue.put_nowait(None)
        if not self._first.done():
            self._first.set_exception(why)

    async def close(self) -> None:
        """Ack what auto-ack owes, save the state, close the connection."""
        if self.auto_ack and self._last_message is not None:
            await self._last_message.ack()
        self._stop(ClientClosed(Code.NORMAL, "closed by the application"))
        conn = self.conn
        if conn is not None and conn.is_open:
            conn._write()
            await conn.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._save_handle is not None:
            self._save_handle.cancel()
        self.state.save()

    # -- state ----------------------------------------------------------------------

    def _ack(self, lane: int, seq: int) -> None:
        st = self.state
        if seq > st.processed[lane]:
            st.processed[lane] = seq
            self._schedule_save()
        conn = self.conn
        if conn is not None and conn.is_open and seq <= conn.session.received[lane]:
            conn.ack(lane, seq)

    def _schedule_save(self) -> None:
        if self.state.path and self._save_handle is None:
            self._save_handle = self.loop.call_later(0.02, self._save)

    def _save(self) -> None:
        self._save_handle = None
        self.state.save()

    # -- API ------------------------------------------------------------------------

    async def receive(self, timeout: float | None = None) -> Message:
        """The next message (across reconnects).  Raises :class:`Kicked` or
        :class:`Refused` when the server ended this terminal's session for
        good, :class:`ClientClosed` after ``close()``."""
        if self.auto_ack and self._last_message is not None:
            await self._last_message.ack()
            self._last_message = None
        msg = await asyncio.wait_for(self._queue.get(), timeout)
        if msg is None:
            self._queue.put_nowait(None)
            raise self.closed
        if self.auto_ack:
            self._last_message = msg
        return msg

    def __aiter__(self):
        return self

    async def __anext__(self) -> Message:
        """``async for`` ends quietly only after ``close()``; a kick or a refusal
        raises :class:`Kicked` / :class:`Refused` (an application must not
        take a lost session for a finished one)."""
        try:
            return await self.receive()
        except ClientClosed as exc:
            if type(exc) is ClientClosed:           # closed by the application
                raise StopAsyncIteration from None
            raise

    async def send(self, kind: str, body, to: str, *, lane: int | None = None,
                   ttl: float = 0.0, key: str = "", ref: int | None = None,
                   receipt: bool = False, timeout: float = 10.0):
        """Publish; resolves with the SENDACK once the server accepted it (P0/P1:
        stored durably).  Retries across reconnects with the same ref, so the
        message is created once; a refusal that asks to retry (STORE_UNAVAILABLE,
        and RATE_LIMITED or TOO_MANY_UNACKED after their retry hint) is
        retried the same way.  Raises SendError when refused,
        asyncio.TimeoutError when not accepted within ``timeout`` seconds."""
        if lane is None:
            lane = KIND_LANES.get(kind, Lane.P1)
        ref = ref if ref is not None else random.randrange(1, 1 << 62)
        deadline = self.loop.time() + timeout
        while True:
            if self.closed is not None:
                raise self.closed
            left = deadline - self.loop.time()
            if left <= 0:
                raise asyncio.TimeoutError(f"send {kind}: not accepted within {timeout} s")
            if not self._connected.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._connected.wait(), left)
                continue
            try:
                return await self.conn.send(kind, body, to, lane=lane, ttl=ttl, key=key, ref=ref,
                                            receipt=receipt, timeout=left)
            except SessionClosed:
                self._connected.clear()
                await asyncio.sleep(0)
            except SendError as exc:
                if exc.code == Code.STORE_UNAVAILABLE:
                    pause = 0.5
                elif exc.retry_after is not None:
                    # The server's hint, spread a little so a store's tills do
                    # not all come back in the same millisecond.
                    pause = exc.retry_after * (1.0 + random.random() / 2)
                else:
                    raise
                await asyncio.sleep(min(pause, max(0.0, deadline - self.loop.time())))

    async def subscribe(self, name: str, lane: int = Lane.P2):
        """Subscribe to a channel stream (topics, segments), from the kept position."""
        await self._connected.wait()
        epoch, offset = self.state.channels.get((name, lane), (0, 0))
        return await self.conn.subscribe(name, lane, epoch, offset)

    async def history(self, name: str, lane: int = Lane.P2, count: int = 100,
                      offset: int = 0, epoch: int = 0, timeout: float = 10.0):
        """History of a channel stream or a conversation: (items, the last END
        frame).  ``offset`` 0: the newest ``count`` items (0: all the server
        keeps); else the ``count`` after ``offset``; oldest first.  The
        server answers in pages (``limits.history_page``); this asks for page
        after page until ``count`` items came or there are no more.  A page
        the server could not read (STORE_UNAVAILABLE) is asked for again
        until ``timeout`` seconds passed."""
        items: list = []
        deadline = self.loop.time() + timeout
        while True:
            await self._connected.wait()
            want = count - len(items) if count else 0
            try:
                page, end = await self.conn.history(name, lane, epoch, offset, want)
            except SendError as exc:
                if exc.code != Code.STORE_UNAVAILABLE or self.loop.time() >= deadline:
                    raise
                await asyncio.sleep(min(0.5, max(0.0, deadline - self.loop.time())))
                continue
            items += page
            if end.code != Code.PARTIAL or not page or (count and len(items) >= count):
                return items, end
            offset = end.offset         # (epoch 0 after the first page: the current one)

    async def read(self, msg: Message) -> None:
        """Send a read receipt for a received message (chat)."""
        await self._connected.wait()
        self.conn.read(msg.id)


async def connect(host: str, port: int, *, token: str, first_timeout: float | None = None,
                  first_attempts: int | None = None, **kwargs) -> Client:
    """Connect a terminal; see ``Client`` for the options and ``Client.start``
    for ``first_timeout`` / ``first_attempts``.  Raises :class:`Refused` if
    the token is refused for good, :class:`ConnectFailed` if given a limit
    that passed without a session."""
    return await Client(host, port, token, **kwargs).start(first_timeout, first_attempts)
