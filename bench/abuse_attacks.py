"""The attackers of ``python -m bench abuse``: one attack class per process.

``python -m bench.abuse_attacks <case> '<json params>'`` prepares (imports,
tokens, bodies), answers ``{"ready": true}`` on stdout, waits for a ``go``
line on stdin, attacks for ``seconds``, closes everything it opened, answers
one JSON line of what it did and what the server answered, and exits.  Each
attack offers a fixed rate (``RATES``: connections, frames or requests per
second) and stops at ``seconds`` or at ``rate x seconds`` items, whichever
comes first; what the server refuses to read (TCP backpressure) is counted
as ``blocked`` and never queued here, so nothing grows without bound.
Every connection comes from its own loopback source address (127.0.0.1 is
the good tills'), so per-source defenses act on the attacker alone.

The classes (``case``): garbage, frames (oversized and truncated), bombs
(compressed payloads), slowloris, bad_token, send_flood, ping_flood,
subscribe_flood, churn, bodies (pathological message bodies), admin (the
admin HTTP API).  ``bench/abuse.py`` says what each one sends.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import sys
import time

import lz4.block
import orjson
import uvloop

from tillwire.client.connection import connected_socket
from tillwire.core.codec import Decoder, Encoder, Frame
from tillwire.core.codes import Code, Flag, FrameType, Lane
from tillwire.server.auth import issue_token

from .common import percentile

SECRET = os.environ.get("TILLWIRE_SECRET", "")
HEARTBEAT_MS = 600_000
WELCOME = int(FrameType.WELCOME)
CLOSE = int(FrameType.CLOSE)
ERROR = int(FrameType.ERROR)
SENDACK = int(FrameType.SENDACK)
DELIVER = int(FrameType.DELIVER)
SUBSCRIBED = int(FrameType.SUBSCRIBED)
UNSUBSCRIBED = int(FrameType.UNSUBSCRIBED)
PONG = int(FrameType.PONG)
TICK = 0.005                  # seconds between two looks at the schedule
FRAME_LIMIT = 1 << 20         # the server's default frame limit
_ENC = Encoder()
_RAW = Encoder(compress_threshold=0)    # frames whose payload is sent as given


def _code(code: int) -> str:
    try:
        return Code(code).name
    except ValueError:
        return str(code)


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def hello(token: str) -> bytes:
    return _ENC.encode(Frame(FrameType.HELLO, version=1, heartbeat=HEARTBEAT_MS, token=token))


def handshake(token: str) -> bytes:
    return hello(token) + _ENC.encode(Frame(FrameType.RESUME))


def compressed(frame: Frame, original: bytes) -> bytes:
    """``frame`` with ``original`` as its payload, COMPRESSED (PROTOCOL.md
    section 13: original_size, then one LZ4 block without a frame header)."""
    body = bytearray(_unprefixed(_RAW.encode(frame)))    # type, flags, fields
    body[1] |= Flag.COMPRESSED
    payload = _uvarint(len(original)) + lz4.block.compress(original, store_size=False)
    return _uvarint(len(body) + len(payload)) + bytes(body) + payload


def _unprefixed(encoded: bytes) -> bytes:
    """An encoded frame without its length prefix (type, flags, fields, payload)."""
    i = 0
    while encoded[i] & 0x80:
        i += 1
    return encoded[i + 1:]


class Tally:
    """What one attack did and what the server answered (JSON-ready counters)."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.codes: collections.Counter = collections.Counter()     # "CLOSE X" / "ERROR Y" ...
        self.samples: dict[str, list[float]] = collections.defaultdict(list)

    def note(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def sample(self, key: str, value: float) -> None:
        values = self.samples[key]
        if len(values) < 100_000:
            values.append(value)

    def doc(self) -> dict:
        out = dict(sorted(self.counts.items()))
        out["answers"] = dict(sorted(self.codes.items()))
        for key, values in sorted(self.samples.items()):
            out[key] = {"n": len(values), "p50": round(percentile(values, 50), 2),
                        "p99": round(percentile(values, 99), 2), "max": round(max(values), 2)}
        return out


class Conn(asyncio.Protocol):
    """One attacker connection: decodes what the server says (until it cannot)
    and notes who closed it and when."""

    def __init__(self, attack: "Attack", on_frame=None) -> None:
        self.attack = attack
        self.on_frame = on_frame
        self.decoder = Decoder()
        self.transport = None
        self.opened = time.monotonic()
        self.welcomed = attack.loop.create_future()
        self.lost = attack.loop.create_future()
        self.answered = attack.loop.create_future()   # the first CLOSE or ERROR, or None
        self.shut_by_us = False
        self.paused = False         # the server is not taking our bytes (write buffer full)
        self.broken = False         # the server's bytes stopped decoding (counted once)

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=64 * 1024)
        self.attack.open_conns.add(self)

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            frames = self.decoder.feed(data)
        except Exception:  # noqa: BLE001 - the server sent what we cannot decode: count it
            self.broken = True
            self.attack.tally.note("undecodable_answers")
            return
        tally = self.attack.tally
        for f in frames:
            t = f.type
            if t == WELCOME:
                if not self.welcomed.done():
                    self.welcomed.set_result(True)
            elif t == CLOSE or t == ERROR:
                tally.codes[f"{FrameType(t).name} {_code(f.code)}"] += 1
                if not self.answered.done():
                    self.answered.set_result((t, f.code, time.monotonic()))
            if self.on_frame is not None:
                self.on_frame(self, f)

    def connection_lost(self, exc) -> None:
        self.attack.open_conns.discard(self)
        if not self.shut_by_us:
            tally = self.attack.tally
            tally.note("closed_by_server")
            tally.sample("lifetime_ms", (time.monotonic() - self.opened) * 1000)
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError("closed before WELCOME"))
            self.welcomed.exception()        # (retrieved: nobody may be waiting)
        if not self.answered.done():
            self.answered.set_result(None)
        if not self.lost.done():
            self.lost.set_result(True)
        self.transport = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def write(self, data: bytes) -> bool:
        """Write ``data`` unless the server is not taking our bytes (counted as
        blocked, never queued)."""
        if self.transport is None or self.paused:
            self.attack.tally.note("blocked")
            return False
        self.transport.write(data)
        return True

    def shut(self) -> None:
        if self.transport is not None:
            self.shut_by_us = True
            self.transport.abort()


class Attack:
    """One attack class: a schedule at a fixed rate, bounded in time and count."""

    rate = 0.0          # items (connections, frames, requests) per second, offered
    unit = ""
    source = "127.0.0.2"

    def __init__(self, params: dict) -> None:
        self.p = params
        self.loop = asyncio.get_running_loop()
        self.tenant = params["tenant"]
        self.port = params["port"]
        self.tally = Tally()
        self.rnd = random.Random(params.get("seed", 7))
        self.open_conns: set[Conn] = set()
        self.tasks: set[asyncio.Task] = set()
        self.rate = float(params.get("rate", self.rate))

    def token(self, store: str, terminal: str, roles=("pos",)) -> str:
        return issue_token(SECRET, tenant=self.tenant, store=store, terminal=terminal,
                           roles=list(roles), ttl=86400)

    async def open(self, on_frame=None, source: str | None = None, rcvbuf: int = 0) -> Conn:
        """A new connection from ``source`` (default: the class's)."""
        local = (source or self.source, 0)
        sock = None
        try:
            if rcvbuf:
                sock = await connected_socket("127.0.0.1", self.port, rcvbuf=rcvbuf,
                                              local_addr=local)
            _, conn = await self.loop.create_connection(
                lambda: Conn(self, on_frame), None if sock else "127.0.0.1",
                None if sock else self.port, sock=sock, local_addr=None if sock else local)
        except OSError:
            self.tally.note("connect_errors")
            raise
        self.tally.note("connections_opened")
        return conn

    def spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, (OSError, ConnectionError, asyncio.TimeoutError)):
                self.tally.note(f"attacker_exception {type(exc).__name__}: {exc}"[:120])

    async def schedule(self, seconds: float, step, rate: float | None = None,
                       limit: int | None = None, until=None) -> int:
        """Call ``step(i)`` for i = 0, 1, ... at ``rate`` per second until
        ``seconds`` have passed, ``limit`` (default rate x seconds) calls were
        made or ``until()`` is true; returns how many."""
        rate = self.rate if rate is None else rate
        limit = int(rate * seconds) if limit is None else limit
        t0 = time.monotonic()
        i = 0
        while i < limit:
            now = time.monotonic()
            if now - t0 >= seconds or (until is not None and until()):
                break
            due = min(limit, int((now - t0) * rate) + 1)
            while i < due:
                step(i)
                i += 1
            await asyncio.sleep(TICK)
        return i

    async def run(self, seconds: float) -> None:
        raise NotImplementedError

    async def finish(self) -> None:
        """Cancel what still runs and close every connection left open."""
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5)
        left = list(self.open_conns)
        self.tally.note("open_at_end", len(left))
        for conn in left:
            conn.shut()
        await asyncio.sleep(0.05)

    def describe(self) -> dict:
        return {"rate": self.rate, "unit": self.unit}


# -- strangers: before HELLO ------------------------------------------------------------------


class Garbage(Attack):
    """New connections, each writing 1 KiB of random bytes, then waiting up to
    2 s for the server to close it."""

    rate = 100.0
    unit = "connections/s, 1 KiB of random bytes each, held up to 2 s"
    source = "127.0.0.3"
    size = 1024
    hold = 2.0

    async def one(self) -> None:
        conn = await self.open()
        conn.write(os.urandom(self.size))
        try:
            await asyncio.wait_for(asyncio.shield(conn.lost), self.hold)
        except asyncio.TimeoutError:
            self.tally.note("still_open_after_hold")
        conn.shut()

    async def run(self, seconds: float) -> None:
        n = await self.schedule(seconds, lambda i: self.spawn(self.one()))
        self.tally.note("offered", n)


class Frames(Attack):
    """Alternately: a length prefix announcing a frame just under 1 MiB before
    HELLO, followed by 64 KiB of it (the server must refuse it at the prefix:
    limits.handshake_frame), and a HELLO announcing 4,000 bytes of which 100
    come, then silence (held until the server closes it or the attack ends).
    Every 10th connection instead logs in and then sends 256 KiB of a SEND
    announcing 1 MiB, then silence (what a terminal with a valid token can
    make the server buffer)."""

    rate = 100.0
    unit = ("connections/s: oversized and truncated frames before HELLO, alternating; every "
            "10th a valid login then 256 KiB of a 1 MiB SEND, then silence")
    source = "127.0.0.4"

    async def oversized(self) -> None:
        conn = await self.open()
        self.tally.note("oversized_sent")
        t0 = time.monotonic()
        conn.write(_uvarint(FRAME_LIMIT - 16) + b"\x01\x00" + bytes(64 * 1024))
        try:
            await asyncio.wait_for(asyncio.shield(conn.lost), 2.0)
            self.tally.sample("oversized_closed_after_ms", (time.monotonic() - t0) * 1000)
        except asyncio.TimeoutError:
            self.tally.note("oversized_still_open_after_2s")
        conn.shut()

    async def truncated(self) -> None:
        conn = await self.open()
        self.tally.note("truncated_sent")
        body = b"\x01\x00" + bytes(3998)
        conn.write(_uvarint(len(body)) + body[:100])
        await asyncio.shield(conn.lost)
        self.tally.note("truncated_closed_by_server")

    async def partial_send(self, i: int) -> None:
        conn = await self.open()
        conn.write(handshake(self.token("x-frames", f"f{i}")))
        await asyncio.wait_for(asyncio.shield(conn.welcomed), 10)
        self.tally.note("partial_send_sent")
        rest = _unprefixed(_RAW.encode(Frame(FrameType.SEND, Lane.P1, b"", ref=0,
                                             to=f"store:{self.tenant}/x-frames", kind="x.note")))
        # Announce ~1 MiB; send 256 KiB of it.
        conn.write(_uvarint(FRAME_LIMIT - 64) + rest + b"1" * (256 * 1024 - len(rest)))
        await asyncio.shield(conn.lost)
        self.tally.note("partial_send_closed_by_server")

    async def run(self, seconds: float) -> None:
        def step(i: int) -> None:
            if i % 10 == 9:
                self.spawn(self.partial_send(i))
            elif i % 2:
                self.spawn(self.truncated())
            else:
                self.spawn(self.oversized())

        n = await self.schedule(seconds, step)
        self.tally.note("offered", n)


class Slowloris(Attack):
    """New connections, each trickling one byte of a 4,000-byte HELLO every
    second: it never completes, so only the auth timeout ends it (held until
    the server closes it or the attack ends)."""

    rate = 50.0
    unit = "connections/s, each writing 1 byte/s of a 4,000-byte HELLO"
    source = "127.0.0.6"

    async def one(self, i: int) -> None:
        conn = await self.open()
        frame = _uvarint(3998 + 2) + b"\x01\x00" + b"\x01" + bytes(3997)
        pos = 0
        while conn.transport is not None and pos < len(frame):
            conn.write(frame[pos:pos + 1])
            self.tally.note("bytes_trickled")
            pos += 1
            try:
                await asyncio.wait_for(asyncio.shield(conn.lost), 1.0)
            except asyncio.TimeoutError:
                continue

    async def run(self, seconds: float) -> None:
        n = await self.schedule(seconds, lambda i: self.spawn(self.one(i)))
        self.tally.note("offered", n)


class BadToken(Attack):
    """HELLOs with invalid tokens from 16 source addresses in turn (random
    junk, a well-formed token signed with another secret, an expired token),
    each connection waiting up to 6 s for the server's answer."""

    rate = 200.0
    unit = "connections/s from 16 source addresses, one HELLO with an invalid token each"
    sources = [f"127.0.1.{i}" for i in range(1, 17)]

    def __init__(self, params: dict) -> None:
        super().__init__(params)
        self.tokens = [
            "tw1." + os.urandom(48).hex(),
            issue_token("not-the-secret", tenant=self.tenant, store="x-bad", terminal="b1",
                        roles=["pos"], ttl=86400),
            issue_token(SECRET, tenant=self.tenant, store="x-bad", terminal="b2", roles=["pos"],
                        ttl=60, now=time.time() - 3 * 86400),
            "",
        ]

    async def one(self, i: int) -> None:
        conn = await self.open(source=self.sources[i % len(self.sources)])
        t0 = time.monotonic()
        conn.write(handshake(self.tokens[i % len(self.tokens)]))
        try:
            answer = await asyncio.wait_for(asyncio.shield(conn.answered), 6.0)
        except asyncio.TimeoutError:
            self.tally.note("no_answer_in_6s")
        else:
            if answer is None:
                self.tally.note("closed_without_answer")
            else:
                self.tally.sample("answer_ms", (answer[2] - t0) * 1000)
        conn.shut()

    async def run(self, seconds: float) -> None:
        n = await self.schedule(seconds, lambda i: self.spawn(self.one(i)))
        self.tally.note("offered", n)


class Churn(Attack):
    """Connect, HELLO with a valid token (100 terminal ids in turn), RESUME,
    close: every other connection waits for WELCOME and sends CLOSE NORMAL,
    the others abort right after writing."""

    rate = 100.0
    unit = "connections/s: HELLO + RESUME with a valid token, then close"
    source = "127.0.0.10"

    def __init__(self, params: dict) -> None:
        super().__init__(params)
        self.tokens = [self.token("x-churn", f"c{i}") for i in range(100)]

    async def one(self, i: int) -> None:
        conn = await self.open()
        t0 = time.monotonic()
        conn.write(handshake(self.tokens[i % len(self.tokens)]))
        if i % 2:
            await asyncio.sleep(0)
            conn.shut()
            return
        try:
            await asyncio.wait_for(asyncio.shield(conn.welcomed), 5.0)
            self.tally.sample("welcome_ms", (time.monotonic() - t0) * 1000)
            conn.write(_ENC.encode(Frame(FrameType.CLOSE, code=Code.NORMAL, payload=b"bye")))
        except asyncio.TimeoutError:
            self.tally.note("no_welcome_in_5s")
        except ConnectionError:
            self.tally.note("closed_before_welcome")
        await asyncio.sleep(0.01)
        conn.shut()

    async def run(self, seconds: float) -> None:
        n = await self.schedule(seconds, lambda i: self.spawn(self.one(i)))
        self.tally.note("offered", n)


# -- terminals with valid tokens ------------------------------------------------------------


class Terminals(Attack):
    """Attacks from logged-in terminals: ``conns`` connections, each sending
    ``frame(conn, i)`` at ``rate`` per second (per connection)."""

    conns = 1
    store = "x"
    MAX_LOGINS = 20      # per connection and attack
    read = True          # read (and ack the inbox); False: stop reading after WELCOME
    rcvbuf = 0

    def __init__(self, params: dict) -> None:
        super().__init__(params)
        self.conns = int(params.get("conns", self.conns))
        self.refs = 0

    def on_frame(self, conn: Conn, f) -> None:
        t = f.type
        if t == SENDACK:
            self.tally.codes["SENDACK"] += 1
        elif t == DELIVER:
            # Ack our own inbox at once, so what is delivered does not pile up.
            conn.transport.write(_ENC.encode(Frame(FrameType.ACK, f.flags & 3, seq=f.seq)))

    async def login(self, k: int, read: bool, store: str | None = None) -> Conn:
        conn = await self.open(on_frame=self.on_frame, rcvbuf=self.rcvbuf)
        conn.write(handshake(self.token(store or self.store, f"{self.store}-{k}")))
        await asyncio.wait_for(asyncio.shield(conn.welcomed), 10)
        if not read:
            conn.transport.pause_reading()
        return conn

    def frame(self, conn: Conn, k: int, i: int) -> bytes:
        raise NotImplementedError

    async def one(self, k: int, seconds: float, read: bool) -> None:
        """Connection ``k``: log in, send on the schedule; when the server
        closes it, log in again (at most MAX_LOGINS times) and go on with
        what is left of the count and the time."""
        t_end = time.monotonic() + seconds
        limit = int(self.rate * seconds)
        done = logins = 0
        conn = None
        while done < limit and time.monotonic() < t_end and logins < self.MAX_LOGINS:
            logins += 1
            if logins > 1:
                self.tally.note("logins_again")
            try:
                conn = await self.login(k, read)
            except (OSError, ConnectionError, asyncio.TimeoutError):
                self.tally.note("login_failures")
                await asyncio.sleep(0.2)
                continue
            c = conn

            def step(i: int, c=c) -> None:
                if c.write(self.frame(c, k, i)):
                    self.tally.note("sent")

            n = await self.schedule(t_end - time.monotonic(), step, limit=limit - done,
                                    until=lambda c=c: c.transport is None)
            done += n
            self.tally.note("offered", n)
        if conn is not None and not read and conn.transport is not None:
            # What did the server say to the terminal that never read?  Read
            # for a moment (bounded) to find its CLOSE, if any.
            conn.transport.resume_reading()
            try:
                await asyncio.wait_for(asyncio.shield(conn.lost), 1.0)
            except asyncio.TimeoutError:
                pass

    async def run(self, seconds: float) -> None:
        await asyncio.gather(*(self.one(k, seconds, self.reads(k)) for k in range(self.conns)),
                             return_exceptions=True)

    def reads(self, k: int) -> bool:
        return self.read

    def describe(self) -> dict:
        return {"rate": self.rate * self.conns, "rate_per_connection": self.rate,
                "unit": self.unit.format(conns=self.conns), "connections": self.conns}


class Bombs(Terminals):
    """Logged-in terminals sending SENDs (x.note, P1) whose compressed payload
    (about 4 KiB) expands to 1 MiB of ``1,1,1,...``: at the frame limit, 16x
    the SEND body limit."""

    rate = 100.0
    conns = 4
    store = "x-bomb"
    unit = "compressed SENDs/s per connection (4 KiB expanding to 1 MiB each), {conns} connections"
    source = "127.0.0.5"

    def __init__(self, params: dict) -> None:
        super().__init__(params)
        original = (b"1," * (FRAME_LIMIT // 2))[:FRAME_LIMIT]
        self.bombs = [compressed(Frame(FrameType.SEND, Lane.P1 | Flag.ACK_REQUESTED, b"",
                                       ref=ref, to=f"store:{self.tenant}/{self.store}",
                                       kind="x.note"), original)
                      for ref in range(1, 2)]
        self.tally.note("bomb_bytes_on_wire", len(self.bombs[0]))
        self.tally.note("bomb_bytes_expanded", len(original))

    def frame(self, conn: Conn, k: int, i: int) -> bytes:
        return self.bombs[0]


class SendFlood(Terminals):
    """Logged-in pos terminals sending P1 SENDs as fast as the schedule says:
    ``ticket.open`` to their store's staff and ``x.note`` to their store, in
    turn, each asking for a SENDACK; one connection reads (and acks) what it
    gets, the other never reads."""

    rate = 2000.0
    conns = 2
    store = "x-send"
    unit = ("P1 SENDs/s per connection (ticket.open and x.note in turn), {conns} connections: "
            "the first reads, the others never read")
    source = "127.0.0.7"

    def reads(self, k: int) -> bool:
        return k == 0

    def frame(self, conn: Conn, k: int, i: int) -> bytes:
        self.refs += 1
        if i % 2:
            return _ENC.encode(Frame(FrameType.SEND, Lane.P1 | Flag.ACK_REQUESTED,
                                     b'{"code":"E%d","text":"printer jam"}' % (i % 97),
                                     ref=self.refs, to=f"role:{self.tenant}/{self.store}/staff",
                                     kind="ticket.open"))
        return _ENC.encode(Frame(FrameType.SEND, Lane.P1 | Flag.ACK_REQUESTED,
                                 b'{"note":"n%d","by":"till"}' % i, ref=self.refs,
                                 to=f"store:{self.tenant}/{self.store}", kind="x.note"))


class PingFlood(Terminals):
    """Logged-in terminals that stop reading after WELCOME (4 KiB receive
    buffer) and send PINGs carrying 1 KiB each (the PONG echoes it)."""

    rate = 5000.0
    conns = 4
    read = False
    rcvbuf = 4096
    store = "x-ping"
    unit = "PINGs/s per connection (1 KiB payload), {conns} connections that never read"
    source = "127.0.0.8"

    def __init__(self, params: dict) -> None:
        super().__init__(params)
        self.ping = _RAW.encode(Frame(FrameType.PING, payload=os.urandom(1024)))

    def frame(self, conn: Conn, k: int, i: int) -> bytes:
        return self.ping

    def on_frame(self, conn: Conn, f) -> None:
        if f.type == PONG:
            self.tally.note("pongs_read_at_end")
        else:
            super().on_frame(conn, f)


class SubscribeFlood(Terminals):
    """Logged-in pos terminals SUBSCRIBing to random ``topic:<tenant>/r<n>``
    channels (P2 and P3 in turn); after every 80 SUBSCRIBEs a connection
    UNSUBSCRIBEs those 80 (new streams keep being made and left)."""

    rate = 100.0
    conns = 10
    store = "x-sub"
    unit = "SUBSCRIBE/UNSUBSCRIBE requests/s per connection (random topics), {conns} connections"
    source = "127.0.0.9"

    def __init__(self, params: dict) -> None:
        super().__init__(params)
        self.held: dict[int, list] = collections.defaultdict(list)

    def on_frame(self, conn: Conn, f) -> None:
        if f.type == SUBSCRIBED:
            self.tally.codes["SUBSCRIBED"] += 1
        elif f.type == UNSUBSCRIBED:
            self.tally.codes[f"UNSUBSCRIBED {_code(f.code)}"] += 1
        else:
            super().on_frame(conn, f)

    def frame(self, conn: Conn, k: int, i: int) -> bytes:
        held = self.held[k]
        self.refs += 1
        if len(held) >= 80:
            out = b"".join(_ENC.encode(Frame(FrameType.UNSUBSCRIBE, lane, ref=self.refs, to=name))
                           for name, lane in held)
            held.clear()
            return out
        name = f"topic:{self.tenant}/r{self.rnd.getrandbits(40):x}"
        lane = Lane.P2 if i % 2 else Lane.P3
        held.append((name, lane))
        return _ENC.encode(Frame(FrameType.SUBSCRIBE, lane, ref=self.refs, to=name))


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _digit_run(rnd: random.Random, luhn: bool) -> str:
    """13-19 random digits that pass (or fail) the Luhn check."""
    while True:
        run = str(rnd.choice("3456")) + "".join(rnd.choice("0123456789")
                                                for _ in range(rnd.randint(12, 18)))
        if _luhn_ok(run) == luhn:
            return run


def pathological_bodies(rnd: random.Random, limit: int = 65536) -> list[tuple[str, bytes]]:
    """(name, body) pairs, each a message body a hostile terminal might send."""
    out = []
    # Just under the SEND body limit: ones, one non-ASCII character.
    head, tail = b'{"v":[', b'],"s":"\xc3\xa9"}'
    n = (limit - len(head) - len(tail) - 1) // 2
    big = head + b",".join([b"1"] * n) + tail
    assert len(big) <= limit
    out.append(("64k_ones_non_ascii", big))
    # The same, one byte over the limit.
    over = head + b",".join([b"1"] * (n + 1)) + tail
    over += b" " * max(0, limit + 1 - len(over))
    out.append(("over_body_limit", over))
    # Nesting: far past limits.max_body_depth, and just inside it.
    out.append(("nested_10000", b'{"a":' + b"[" * 10000 + b"]" * 10000 + b"}"))
    out.append(("nested_31", b'{"a":' + b"[" * 30 + b"1" + b"]" * 30 + b"}"))
    out.append(("nested_objects_5000", b'{"a":' * 5000 + b"1" + b"}" * 5000))
    # Many 13-19 digit runs that fail the Luhn check (no card, all scanned),
    # apart (", ": a comma ends a run; one space alone would join them).
    runs = []
    size = 20
    while size < limit - 200:
        run = _digit_run(rnd, luhn=False)
        runs.append(run)
        size += len(run) + 2
    out.append(("digit_runs_not_cards", orjson.dumps({"ids": ", ".join(runs)})))
    # Card-like numbers: Luhn-valid, plain, grouped, dashed, full-width, a number literal.
    card = "4111111111111111"
    out.append(("card_plain", orjson.dumps({"memo": f"card {card} thanks"})))
    out.append(("card_spaced", orjson.dumps({"memo": " ".join(card[i:i + 4]
                                                               for i in range(0, 16, 4))})))
    out.append(("card_dashed", orjson.dumps({"memo": "-".join(card[i:i + 4]
                                                              for i in range(0, 16, 4))})))
    out.append(("card_fullwidth", orjson.dumps(
        {"memo": "".join(chr(0xFF10 + int(c)) for c in card)})))
    out.append(("card_number_literal", b'{"pan":%s}' % card.encode()))
    out.append(("card_in_key", b'{"%s":1}' % card.encode()))
    out.append(("card_after_2000_runs", orjson.dumps(
        {"ids": ", ".join(runs[:2000] + [_digit_run(rnd, luhn=True)])})))
    # Non-ASCII in bulk, and an escaped lone surrogate.
    out.append(("non_ascii_20k", orjson.dumps({"t": "é中😀" * 5000})))
    out.append(("lone_surrogate", b'{"t":"\\ud800 x"}'))
    return out


class Bodies(Terminals):
    """Logged-in pos terminals sending pathological bodies (``pathological_bodies``:
    64 KiB of ones with one non-ASCII character, one byte over the limit,
    nesting 10,000 deep, thousands of 13-19 digit runs, card numbers in
    several disguises, 20 k non-ASCII characters, a lone surrogate) in turn,
    as SENDs of kind x.note on P1 to their own store."""

    rate = 100.0
    conns = 4
    store = "x-body"
    unit = "SENDs/s per connection (pathological bodies in turn), {conns} connections"
    source = "127.0.0.11"

    def __init__(self, params: dict) -> None:
        super().__init__(params)
        self.bodies = pathological_bodies(self.rnd)
        self.by_ref: dict[int, str] = {}
        self.outcome: dict[str, collections.Counter] = collections.defaultdict(
            collections.Counter)

    async def login(self, k: int, read: bool, store: str | None = None) -> Conn:
        # Each connection its own store: what is accepted reaches only itself.
        return await super().login(k, read, store=f"{self.store}{k}")

    def on_frame(self, conn: Conn, f) -> None:
        if f.type == SENDACK:
            self.outcome[self.by_ref.pop(f.ref, "?")]["SENDACK"] += 1
        elif f.type == ERROR:
            self.outcome[self.by_ref.pop(f.ref, "?")][_code(f.code)] += 1
        super().on_frame(conn, f)

    def frame(self, conn: Conn, k: int, i: int) -> bytes:
        self.refs += 1
        name, body = self.bodies[i % len(self.bodies)]
        self.by_ref[self.refs] = name
        return _ENC.encode(Frame(FrameType.SEND, Lane.P1 | Flag.ACK_REQUESTED, body,
                                 ref=self.refs, to=f"store:{self.tenant}/{self.store}{k}",
                                 kind="x.note"))

    async def run(self, seconds: float) -> None:
        await super().run(seconds)
        self.tally.note("unanswered", len(self.by_ref))

    def result(self) -> dict:
        return {"by_body": {name: dict(c) for name, c in sorted(self.outcome.items())},
                "body_sizes": {name: len(body) for name, body in self.bodies}}


# -- the admin HTTP API ---------------------------------------------------------------------


class Admin(Attack):
    """The admin API: bad bearer tokens, publishes nested 5,000 deep, ~900 KiB
    publishes (parsed, then refused for an unknown field), publishes announcing
    2 MiB (over server.max_frame_size), GET /v1/channels pages and GET
    /v1/messages/<id> probes with random ids, each at its own rate."""

    source = "127.0.0.12"
    mix = {"bad_token": 50.0, "nested_publish": 10.0, "large_publish": 5.0,
           "oversize_publish": 2.0, "channels_page": 10.0, "message_probe": 50.0}
    unit = ("requests/s: bad bearer token 50, publish nested 5,000 deep 10, ~900 KiB publish 5, "
            "publish over the body limit 2, /v1/channels page 10, /v1/messages/<id> probe 50")

    def __init__(self, params: dict) -> None:
        super().__init__(params)
        self.rate = sum(self.mix.values())
        self.base = f"http://127.0.0.1:{params['admin_port']}"
        self.auth = {"Authorization": f"Bearer {params['admin_token']}"}
        t = self.tenant
        self.nested = (b'{"to":"topic:%s/adm","kind":"promo.offer","body":{"offer":"o","title":"t",'
                       b'"x":' % t.encode() + b"[" * 5000 + b"]" * 5000 + b"}}")
        self.large = orjson.dumps({"to": f"topic:{t}/adm", "kind": "promo.offer",
                                   "body": {"offer": "o", "title": "t"},
                                   "pad": ["x" * 1000] * 900})
        self.oversize = b'{"pad":"' + b"x" * (2 * FRAME_LIMIT) + b'"}'

    async def request(self, session, name: str, i: int) -> None:
        t0 = time.monotonic()
        if name == "bad_token":
            kw = dict(method="GET", url=f"{self.base}/v1/presence?tenant={self.tenant}",
                      headers={"Authorization": f"Bearer {os.urandom(16).hex()}"})
        elif name == "nested_publish":
            kw = dict(method="POST", url=f"{self.base}/v1/publish", data=self.nested,
                      headers={**self.auth, "Content-Type": "application/json"})
        elif name == "large_publish":
            kw = dict(method="POST", url=f"{self.base}/v1/publish", data=self.large,
                      headers={**self.auth, "Content-Type": "application/json"})
        elif name == "oversize_publish":
            kw = dict(method="POST", url=f"{self.base}/v1/publish", data=self.oversize,
                      headers={**self.auth, "Content-Type": "application/json"})
        elif name == "channels_page":
            query = {"tenant": self.tenant, "limit": "1000"}
            if self.after:
                query["after"] = self.after
            kw = dict(method="GET", headers=self.auth, url=f"{self.base}/v1/channels",
                      params=query)
        else:
            kw = dict(method="GET", headers=self.auth,
                      url=f"{self.base}/v1/messages/{self.rnd.randrange(1, 1_000_000)}")
        try:
            async with session.request(**kw) as resp:
                body = await resp.read()
                self.tally.codes[f"{name} {resp.status}"] += 1
                if name == "channels_page" and resp.status == 200:
                    self.after = orjson.loads(body).get("next")
                    self.tally.note("channels_listed", len(orjson.loads(body)["channels"]))
        except Exception as exc:  # noqa: BLE001 - a refused or reset request is an answer too
            self.tally.codes[f"{name} {type(exc).__name__}"] += 1
        self.tally.sample(f"{name}_ms", (time.monotonic() - t0) * 1000)

    async def run(self, seconds: float) -> None:
        import aiohttp

        self.after = None
        connector = aiohttp.TCPConnector(limit=64, local_addr=(self.source, 0))
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            async def kind(name: str, rate: float) -> None:
                n = await self.schedule(
                    seconds, lambda i: self.spawn(self.request(session, name, i)), rate=rate)
                self.tally.note(f"{name}_offered", n)

            await asyncio.gather(*(kind(name, rate) for name, rate in self.mix.items()))
            if self.tasks:
                await asyncio.wait(list(self.tasks), timeout=10)

    def describe(self) -> dict:
        return {"rate": self.rate, "unit": self.unit, "mix": self.mix}


ATTACKS = {
    "garbage": Garbage, "frames": Frames, "bombs": Bombs, "slowloris": Slowloris,
    "bad_token": BadToken, "send_flood": SendFlood, "ping_flood": PingFlood,
    "subscribe_flood": SubscribeFlood, "churn": Churn, "bodies": Bodies, "admin": Admin,
}


async def serve(case: str, params: dict) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    attack = ATTACKS[case](params)

    def answer(doc) -> None:
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
        sys.stdout.flush()

    answer({"ready": True, **attack.describe()})
    line = await reader.readline()
    if not line:
        return
    cmd = orjson.loads(line)
    seconds = float(cmd["seconds"])
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(attack.run(seconds), seconds + 15)
    except asyncio.TimeoutError:
        attack.tally.note("run_overran")
    t_attack = time.monotonic()
    await attack.finish()
    doc = {"t0": t0, "t_attack_end": t_attack, "t_end": time.monotonic(),
           **attack.describe(), **attack.tally.doc()}
    if hasattr(attack, "result"):
        doc.update(attack.result())
    answer(doc)


def main() -> None:
    uvloop.run(serve(sys.argv[1], orjson.loads(sys.argv[2])))


if __name__ == "__main__":
    main()
