"""Load-generating worker processes of the benchmarks.

``python -m bench.worker <role> '<json params>'``; commands arrive as JSON
lines on stdin and answers leave as JSON lines on stdout.  Roles:

* ``subscribers``: hold many terminal connections (lightweight raw
  protocols over the native decoder), count BROADCAST frames and note when
  each latency probe arrived.
* ``publisher``: one backend connection that sends price updates at a
  steady rate, then latency probes spaced apart.

Every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import orjson
import uvloop

from tillwire.client.connection import connected_socket
from tillwire.core.codec import Decoder, Encoder, Frame
from tillwire.core.codes import Flag, FrameType, Lane
from tillwire.server.auth import issue_token

SECRET = os.environ.get("TILLWIRE_SECRET", "")
# Frame types as plain ints for the per-frame loops: an IntEnum member lookup
# costs about 0.2 us on Python 3.11, and a flooded terminal reads 200 k
# frames a second.
BROADCAST = int(FrameType.BROADCAST)
DELIVER = int(FrameType.DELIVER)
SENDACK = int(FrameType.SENDACK)
WELCOME = int(FrameType.WELCOME)
CLOSE = int(FrameType.CLOSE)
RETRANSMIT = int(Flag.RETRANSMIT)
_ENC = Encoder()


def handshake(tok: str) -> bytes:
    return _ENC.encode(Frame(FrameType.HELLO, version=1, heartbeat=600_000, token=tok)) + \
        _ENC.encode(Frame(FrameType.RESUME))


class Subscriber(asyncio.Protocol):
    """One terminal that only counts what it receives."""

    __slots__ = ("owner", "decoder", "transport", "welcomed", "_hello")

    def __init__(self, owner, tok: str) -> None:
        self.owner = owner
        self.decoder = Decoder()
        self.transport = None
        self.welcomed = owner.loop.create_future()
        self._hello = handshake(tok)

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self._hello)
        self._hello = None

    def data_received(self, data: bytes) -> None:
        frames = self.decoder.feed(data)
        owner = self.owner
        n = 0
        for f in frames:
            t = f.type
            if t == BROADCAST:
                n += 1
                if f.kind == "bench.probe":
                    owner.on_probe(f.payload)
            elif t == WELCOME:
                if not self.welcomed.done():
                    self.welcomed.set_result(True)
            elif t == CLOSE:
                owner.closed += 1
        if n:
            owner.count += n
            owner.last = time.monotonic()

    def connection_lost(self, exc) -> None:
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError(str(exc)))


class Subscribers:
    def __init__(self, params: dict) -> None:
        self.p = params
        self.loop = asyncio.get_running_loop()
        self.count = 0
        self.last = 0.0
        self.closed = 0
        self.probes: dict[int, float] = {}
        self.conns: list[Subscriber] = []

    def on_probe(self, payload: bytes) -> None:
        i = orjson.loads(payload)["i"]
        self.probes[i] = time.monotonic()     # the last arrival wins: all terminals of this worker

    async def connect(self) -> dict:
        p = self.p
        sem = asyncio.Semaphore(p.get("parallel", 200))
        stores = p.get("stores", 100)

        async def one(i: int) -> None:
            async with sem:
                tok = issue_token(SECRET, tenant=p["tenant"], store=f"s{i % stores}",
                                  terminal=f"t{i}", roles=["pos"], ttl=86400)
                local = (p["src_ip"], 0) if p.get("src_ip") else None
                _, proto = await self.loop.create_connection(
                    lambda: Subscriber(self, tok), "127.0.0.1", p["port"], local_addr=local)
                await asyncio.wait_for(proto.welcomed, 30)
                self.conns.append(proto)

        t0 = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(p["start"], p["start"] + p["count"])))
        return {"connected": len(self.conns), "seconds": time.monotonic() - t0}

    def stats(self) -> dict:
        return {"count": self.count, "last": self.last, "closed": self.closed,
                "probes": {str(i): t for i, t in self.probes.items()}}


class Publisher:
    def __init__(self, params: dict) -> None:
        self.p = params
        self.loop = asyncio.get_running_loop()
        self.transport = None

    async def connect(self) -> dict:
        p = self.p
        tok = issue_token(SECRET, tenant=p["tenant"], store="hq", terminal="publisher",
                          roles=["backend"], ttl=86400)
        welcomed = self.loop.create_future()

        class Proto(asyncio.Protocol):
            def __init__(self):
                self.decoder = Decoder()

            def connection_made(self, transport):
                transport.write(handshake(tok))

            def data_received(self, data):
                for f in self.decoder.feed(data):
                    if f.type == WELCOME and not welcomed.done():
                        welcomed.set_result(True)

        self.transport, _ = await self.loop.create_connection(Proto, "127.0.0.1", p["port"])
        await asyncio.wait_for(welcomed, 30)
        return {"connected": 1}

    def _send(self, kind: str, to: str, body: bytes, lane: int = Lane.P2) -> None:
        self.transport.write(_ENC.encode(Frame(FrameType.SEND, lane, body, ref=0, ttl=0, to=to,
                                               kind=kind)))

    async def flood(self, rate: float, seconds: float, to: str, start_sku: int) -> dict:
        """Send ``rate`` distinct-SKU price updates per second for ``seconds``."""
        t0 = time.monotonic()
        sent = 0
        tick = 0.005
        end = t0 + seconds
        while True:
            now = time.monotonic()
            if now >= end:
                break
            due = int((now - t0) * rate)
            while sent < due:
                sku = start_sku + sent
                self._send("price.update", to,
                           b'{"sku":"S%d","price":"1.00","currency":"CNY","version":1}' % sku)
                sent += 1
            await asyncio.sleep(tick)
        return {"sent": sent, "t_start": t0, "t_end": time.monotonic()}

    async def probes(self, n: int, gap: float, to: str, first: int = 0) -> dict:
        """Probes ``first`` .. ``first + n - 1``, ``gap`` seconds apart."""
        sends = []
        for i in range(first, first + n):
            sends.append(time.monotonic())
            self._send("bench.probe", to, b'{"i":%d}' % i)
            if gap:
                await asyncio.sleep(gap)
        return {"sends": sends}


class Terminal(asyncio.Protocol):
    """A till that acks its inbox and notes when each P0 arrived."""

    def __init__(self, owner, tok: str) -> None:
        self.owner = owner
        self.decoder = Decoder()
        self.transport = None
        self.welcomed = owner.loop.create_future()
        self.hello = handshake(tok)
        self.p0_seen = 0
        self.credit = 0.0
        self.credit_at = time.monotonic()

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.hello)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner.link:
            # A weak store link of `link` bytes/s: what was read arrives when
            # the link has carried it, and nothing more is read until then
            # (the bytes behind it wait in the kernel, as in the link's queue).
            now = time.monotonic()
            credit = min(owner.link_burst, self.credit + (now - self.credit_at) * owner.link)
            self.credit = credit - len(data)
            self.credit_at = now
            if self.credit < 0:
                self.transport.pause_reading()
                owner.loop.call_later(-self.credit / owner.link, self._carried, data)
                return
        self._arrived(data)

    def _carried(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()
        self._arrived(data)

    def _arrived(self, data: bytes) -> None:
        owner = self.owner
        now = time.monotonic()
        acks = [0, 0]
        p3 = 0
        for f in self.decoder.feed(data):
            t = f.type
            if t == BROADCAST:          # (the flood: first)
                p3 += 1
            elif t == DELIVER:
                lane = f.flags & 3
                if f.seq > acks[lane]:
                    acks[lane] = f.seq
                if lane == 0 and f.seq > self.p0_seen:
                    self.p0_seen = f.seq
                    body = orjson.loads(f.payload)
                    owner.p0[body["n"]] = (now - body["t"]) * 1000
            elif t == WELCOME:
                if not self.welcomed.done():
                    self.welcomed.set_result(True)
            elif t == CLOSE:
                owner.closed += 1
        owner.p3 += p3
        out = b"".join(_ENC.encode(Frame(FrameType.ACK, lane, seq=seq))
                       for lane, seq in enumerate(acks) if seq)
        if out:
            self.transport.write(out)

    def connection_lost(self, exc) -> None:
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError(str(exc)))


class Terminals(Subscribers):
    def __init__(self, params: dict) -> None:
        super().__init__(params)
        self.p0: dict[int, float] = {}     # message number -> latency ms
        self.p3 = 0
        self.link = float(params.get("link", 0))   # bytes/s of each till's link (0: loopback)
        self.link_burst = 4096.0                   # bytes a till takes at once after a pause

    async def connect(self) -> dict:
        p = self.p
        t0 = time.monotonic()
        for i in range(p["start"], p["start"] + p["count"]):
            tok = issue_token(SECRET, tenant=p["tenant"], store=f"s{i % 10}",
                              terminal=f"t{i}", roles=["pos"], ttl=86400)
            sock = None
            if p.get("link_buffer"):
                # The receive buffer stands for the link's queue: the bytes in
                # flight between the server's socket and the till.
                sock = await connected_socket("127.0.0.1", p["port"], rcvbuf=p["link_buffer"])
            _, proto = await self.loop.create_connection(
                lambda: Terminal(self, tok), None if sock else "127.0.0.1",
                None if sock else p["port"], sock=sock)
            await asyncio.wait_for(proto.welcomed, 30)
            self.conns.append(proto)
        return {"connected": len(self.conns), "seconds": time.monotonic() - t0}

    def stats(self) -> dict:
        return {"p0": {str(k): v for k, v in self.p0.items()}, "p3": self.p3,
                "closed": self.closed}


class Sender(Publisher):
    """A backend sending P0 payment results (acked) or flooding P3 offers."""

    def __init__(self, params: dict) -> None:
        super().__init__(params)
        self.acked: set[int] = set()

    async def connect(self) -> dict:
        p = self.p
        tok = issue_token(SECRET, tenant=p["tenant"], store="hq",
                          terminal=p.get("name", "sender"), roles=["backend"], ttl=86400)
        welcomed = self.loop.create_future()
        acked = self.acked

        class Proto(asyncio.Protocol):
            def __init__(self):
                self.decoder = Decoder()

            def connection_made(self, transport):
                transport.write(handshake(tok))

            def data_received(self, data):
                for f in self.decoder.feed(data):
                    if f.type == SENDACK:
                        acked.add(f.ref)
                    elif f.type == WELCOME and not welcomed.done():
                        welcomed.set_result(True)

        self.transport, _ = await self.loop.create_connection(Proto, "127.0.0.1", p["port"])
        await asyncio.wait_for(welcomed, 30)
        return {"connected": 1}

    async def payments(self, rate: float, seconds: float, terminals: int, first: int) -> dict:
        """P0 payment results to random terminals, each acked by the server."""
        import random

        rnd = random.Random(first)
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < seconds:
            due = int((time.monotonic() - t0) * rate)
            while n < due:
                i = first + n
                body = b'{"n":%d,"t":%r,"order":"o%d","status":"paid"}' % (
                    i, time.monotonic(), i)
                self.transport.write(_ENC.encode(Frame(
                    FrameType.SEND, Lane.P0 | Flag.ACK_REQUESTED, body, ref=i + 1,
                    to=f"terminal:{self.p['tenant']}/t{rnd.randrange(terminals)}",
                    kind="payment.result")))
                n += 1
            await asyncio.sleep(0.002)
        return {"sent": n}

    async def promos(self, rate: float, seconds: float, size: int) -> dict:
        """P3 offers to the whole tenant at ``rate`` per second (a flood)."""
        t0 = time.monotonic()
        n = 0
        # Incompressible filler without digits (digit runs could look like cards).
        letters = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
        pad = bytes(letters[b % 52] for b in os.urandom(size))
        while time.monotonic() - t0 < seconds:
            due = int((time.monotonic() - t0) * rate)
            while n < due:
                body = b'{"offer":"o%d","title":"Holiday deal","pad":"%s"}' % (n, pad)
                self.transport.write(_ENC.encode(Frame(
                    FrameType.SEND, Lane.P3, body, ref=0, to=f"tenant:{self.p['tenant']}",
                    kind="promo.offer")))
                n += 1
            await asyncio.sleep(0.002)
        return {"sent": n}

    def stats(self) -> dict:
        return {"acked": sorted(r - 1 for r in self.acked)}


ROLES = {"subscribers": Subscribers, "publisher": Publisher, "terminals": Terminals,
         "sender": Sender}


async def serve(role: str, params: dict) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker = ROLES[role](params)

    def answer(doc) -> None:
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
        sys.stdout.flush()

    worker.emit = answer
    answer(await worker.connect())
    while True:
        line = await reader.readline()
        if not line:
            return
        cmd = orjson.loads(line)
        op = cmd.pop("cmd")
        if op == "quit":
            answer({"bye": True})
            return
        if op == "stats":
            answer(worker.stats())
        elif op == "flood":
            answer(await worker.flood(**cmd))
        elif op == "probes":
            answer(await worker.probes(**cmd))
        elif op == "payments":
            answer(await worker.payments(**cmd))
        elif op == "promos":
            answer(await worker.promos(**cmd))
        elif op == "pay":
            answer(await worker.pay(**cmd))
        elif op == "set":
            worker.p.update(cmd)
            answer({"ok": True})
        elif op == "reset":
            worker.count = 0
            worker.probes = {}
            answer({"ok": True})



# -- reliability: tills that crash and resume, a payer that retries ----------------------


class Till(asyncio.Protocol):
    """A till over the terminal-side session, processing each payment once.

    Its positions (epoch, processed P0/P1) live in the worker's memory the
    way the SDK keeps them in a state file: they survive the till's
    connection, the server's crash and every reconnect.
    """

    def __init__(self, owner, index: int, tok: str) -> None:
        from tillwire.core.session import ClientSession, Encoder as SEncoder

        self.owner = owner
        self.index = index
        self.tok = tok
        self.session = None
        self._make = lambda: ClientSession(SEncoder(), now=time.monotonic())
        self.transport = None
        self.epoch = 0
        self.processed = [0, 0]
        self.last_seq = 0           # highest seq this till processed (for reordering checks)
        self.connected = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.session = s = self._make()
        s.hello(self.tok, 600_000)
        s.resume(self.epoch, self.processed[0], self.processed[1])
        transport.write(s.data_to_send(time.monotonic()))
        self.connected = True

    def data_received(self, data: bytes) -> None:
        s = self.session
        owner = self.owner
        for f in s.receive_data(data, time.monotonic()):
            t = f.type
            if t == DELIVER:
                lane = f.flags & 3
                if f.seq <= self.last_seq and not f.flags & RETRANSMIT:
                    owner.reordered += 1
                if f.seq <= self.last_seq:
                    owner.reordered_processed += 1
                self.last_seq = f.seq
                n = orjson.loads(f.payload)["n"]
                if n in owner.seen:
                    owner.dup_processed += 1
                owner.seen.add(n)
                self.processed[lane] = f.seq
                s.ack(lane, f.seq)
            elif t == WELCOME:
                if f.epoch != self.epoch:
                    self.epoch = f.epoch
                    self.processed = [0, 0]
        out = s.data_to_send(time.monotonic())
        if out and self.transport is not None:
            self.transport.write(out)

    def connection_lost(self, exc) -> None:
        self.connected = False
        self.transport = None
        if self.session is not None:
            self.owner.suppressed_base += self.session.duplicates
            self.session = None


class Tills(Subscribers):
    def __init__(self, params: dict) -> None:
        super().__init__(params)
        import random

        self.rnd = random.Random(params["start"])
        self.tills: list[Till] = []
        self.seen: set[int] = set()
        self.reordered = 0
        self.reordered_processed = 0
        self.dup_processed = 0
        self.suppressed_base = 0
        self.crashes = 0
        self.running = True

    async def _connect(self, till: Till) -> None:
        attempt = 0
        while self.running:
            try:
                await self.loop.create_connection(lambda: till, "127.0.0.1", self.p["port"])
                return
            except OSError:
                attempt += 1
                await asyncio.sleep(self.rnd.uniform(0, min(2.0, 0.05 * 2 ** attempt)))

    async def connect(self) -> dict:
        p = self.p
        for i in range(p["start"], p["start"] + p["count"]):
            tok = issue_token(SECRET, tenant=p["tenant"], store=f"s{i % 50}",
                              terminal=f"t{i}", roles=["pos"], ttl=86400)
            self.tills.append(Till(self, i, tok))
        await asyncio.gather(*(self._connect(t) for t in self.tills))
        self.loop.create_task(self._chaos())
        self.loop.create_task(self._reconnector())
        return {"connected": len(self.tills)}

    async def _chaos(self) -> None:
        """Tills crash at random (abort: unsent ACKs are lost) while disconnects are on."""
        while self.running:
            await asyncio.sleep(0.05)
            if not self.p.get("chaos", True):
                continue
            for till in self.rnd.sample(self.tills, max(1, len(self.tills) // 200)):
                if till.transport is not None:
                    till.transport.abort()
                    self.crashes += 1

    async def _reconnector(self) -> None:
        while self.running:
            await asyncio.sleep(0.1)
            for till in self.tills:
                if not till.connected and not getattr(till, "pending", False):
                    till.pending = True

                    async def again(t=till):
                        await asyncio.sleep(self.rnd.uniform(0, 0.3))
                        await self._connect(t)
                        t.pending = False
                    self.loop.create_task(again())

    def stats(self) -> dict:
        suppressed = self.suppressed_base + sum(
            t.session.duplicates for t in self.tills if t.session is not None)
        return {"seen": sorted(self.seen), "reordered": self.reordered,
                "reordered_processed": self.reordered_processed,
                "dup_processed": self.dup_processed, "suppressed": suppressed,
                "crashes": self.crashes,
                "connected": sum(1 for t in self.tills if t.connected)}


class Payer:
    """A payment backend: K results, each retried with the same ref until acked."""

    def __init__(self, params: dict) -> None:
        self.p = params
        self.loop = asyncio.get_running_loop()
        self.acked: dict[int, int] = {}       # n -> msg_id
        self.unacked: dict[int, float] = {}   # n -> when last sent, oldest first
        self.dup_acks = 0
        self.transport = None
        self.connected = asyncio.Event()
        self.lost = 0                         # connections lost (diagnostics of a stall)
        self.last_close = None                # the last CLOSE the server sent: [code, text]
        self.paying = False                   # in pay(): progress reports are awaited

    def _proto(self):
        payer = self
        tok = issue_token(SECRET, tenant=self.p["tenant"], store="hq", terminal="payer",
                          roles=["backend"], ttl=86400)

        class Proto(asyncio.Protocol):
            def __init__(self):
                self.decoder = Decoder()
                self.transport = None

            def data_received(self, data):
                for f in self.decoder.feed(data):
                    if f.type == SENDACK:
                        n = f.ref - 1
                        if f.flags & RETRANSMIT:
                            payer.dup_acks += 1
                        payer.acked[n] = f.msg_id
                        payer.unacked.pop(n, None)
                    elif f.type == WELCOME:
                        payer.transport = self.transport
                        payer.connected.set()
                    elif f.type == CLOSE:
                        payer.last_close = [f.code, bytes(f.payload).decode("utf-8", "replace")]

            def connection_made(self, transport):
                self.transport = transport
                transport.write(handshake(tok))

            def connection_lost(self, exc):
                payer.lost += 1
                # Only the loss of the connection in use ends it.  After a
                # takeover the new connection's WELCOME reaches us before
                # the old one's end: clearing the transport then would send
                # _ensure to connect again, taking over the new one, and so
                # on without end (the stalled runs).
                if payer.transport is self.transport:
                    payer.transport = None
                    payer.connected.clear()

        return Proto

    async def _ensure(self) -> None:
        attempts = 0
        while self.transport is None:
            attempts += 1
            if self.paying:                 # (what a stalled run reports)
                self.emit({"progress": len(self.acked), "reconnecting": attempts,
                           "lost": self.lost, "last_close": self.last_close})
            attempt = None
            try:
                attempt, _ = await self.loop.create_connection(self._proto(), "127.0.0.1",
                                                               self.p["port"])
                await asyncio.wait_for(self.connected.wait(), 5)
            except (OSError, asyncio.TimeoutError):
                # An attempt without WELCOME in time is given up, never left
                # to log in later beside the next one.
                if attempt is not None and self.transport is not attempt:
                    attempt.abort()
                await asyncio.sleep(0.2)

    async def connect(self) -> dict:
        await self._ensure()
        return {"connected": 1}

    def _frame(self, n: int) -> bytes:
        body = b'{"n":%d,"order":"o%d","status":"paid","amount":"12.50","currency":"CNY"}' % (n, n)
        return _ENC.encode(Frame(
            FrameType.SEND, Lane.P0 | Flag.ACK_REQUESTED, body, ref=n + 1,
            to=f"terminal:{self.p['tenant']}/t{n % self.p['terminals']}",
            kind="payment.result"))

    async def pay(self, first: int, count: int, window: int, timeout: float) -> dict:
        """Send results first..first+count-1, at most ``window`` unacked, retrying
        every result unacked for 3 s (same ref), whether the connection stalled
        or was lost.  A load generator must not be the bottleneck: the SENDs of
        one pass leave in one write, acks are settled as they arrive, and the
        retry scan (oldest first, stopping at the first recent one) runs twice
        a second."""
        t0 = time.monotonic()
        end = first + count
        next_n = first
        unacked = self.unacked        # n -> when last sent, oldest first
        unacked.clear()
        sends = 0
        last_report = last_scan = t0
        self.paying = True
        while time.monotonic() - t0 < timeout:
            await self._ensure()
            if next_n >= end and not unacked:
                break
            now = time.monotonic()
            out = []
            if now - last_scan > 0.5:
                last_scan = now
                stale = []
                for n, at in unacked.items():
                    if now - at <= 3.0:
                        break
                    stale.append(n)
                for n in stale:
                    del unacked[n]
                    unacked[n] = now
                    out.append(self._frame(n))
            while next_n < end and len(unacked) < window:
                out.append(self._frame(next_n))
                unacked[next_n] = now
                next_n += 1
            if out and self.transport is not None:
                self.transport.write(b"".join(out))
                sends += len(out)
            await asyncio.sleep(0.002)
            if now - last_report > 0.05:
                last_report = now
                self.emit({"progress": len(self.acked)})
        self.paying = False
        elapsed = time.monotonic() - t0
        done = sum(1 for n in range(first, end) if n in self.acked)
        return {"acked": done, "sends": sends, "seconds": elapsed}

    def stats(self) -> dict:
        return {"acked": sorted(self.acked), "dup_acks": self.dup_acks}


ROLES.update({"tills": Tills, "payer": Payer})


def main() -> None:
    role, params = sys.argv[1], orjson.loads(sys.argv[2])
    uvloop.run(serve(role, params))


if __name__ == "__main__":
    main()
