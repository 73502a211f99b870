"""The good load of ``python -m bench abuse``: tills and their payment backend.

``python -m bench.abuse_load '<json params>'`` holds ``tills`` till
connections (role pos, ``terminal:<tenant>/g<i>``, ten to a store) and one
payer (role backend) in one process, and speaks JSON lines on stdin/stdout
like ``bench.worker``.  Once told ``start``, the payer sends every till one
P0 ``payment.result`` every ``period`` seconds, spread evenly over the
period (50 tills, 100 ms: one result every 2 ms), each asking for a
SENDACK; a till acks what it received at once (one cumulative ACK per
read) and notes when each result arrived.  Latency is from the payer's
write to the till's read (both in this process, one clock).

Both sides reconnect after losing their connection (a server crash is
part of what the benchmark counts): a till resumes with its inbox epoch and
the last sequence it processed, so the server replays what it had not
acked; the payer skips the results due while it is disconnected (counted,
never sent).  Commands:

* ``start`` / ``stop``: the payer's schedule;
* ``window`` with ``windows: [[name, t0, t1], ...]`` (``time.monotonic``,
  the same clock in every process of the machine): per window, the results
  sent in it: sent, acked (SENDACK), delivered, latency p50/p99/max, what
  the tills and the payer saw go wrong in it (ERROR, CLOSE, lost
  connections), and, with ``final``, lost (acked, never delivered).  A
  result not delivered yet counts in the percentiles with its age so far (a
  lower bound) and is reported as ``pending``;
* ``totals``: sent, acked, delivered, lost so far, connections up.

Everything is bounded: the payer sends only on its schedule, a result's
record is three floats.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import random
import sys
import time

import orjson
import uvloop

from tillwire.core.codec import Decoder, Encoder, Frame
from tillwire.core.codes import Flag, FrameType, Lane
from tillwire.server.auth import issue_token

from .common import percentile

SECRET = os.environ.get("TILLWIRE_SECRET", "")
DELIVER = int(FrameType.DELIVER)
SENDACK = int(FrameType.SENDACK)
WELCOME = int(FrameType.WELCOME)
CLOSE = int(FrameType.CLOSE)
ERROR = int(FrameType.ERROR)
HEARTBEAT_MS = 600_000        # the server's longest: the bench's connections never PING
_ENC = Encoder()


def _handshake(token: str, epoch: int = 0, p0: int = 0, p1: int = 0) -> bytes:
    return _ENC.encode(Frame(FrameType.HELLO, version=1, heartbeat=HEARTBEAT_MS, token=token)) + \
        _ENC.encode(Frame(FrameType.RESUME, epoch=epoch, p0=p0, p1=p1))


class Till(asyncio.Protocol):
    """One good till: acks every inbox message at once, notes each result's arrival."""

    def __init__(self, load: "Load", index: int) -> None:
        self.load = load
        self.index = index
        self.token = issue_token(SECRET, tenant=load.tenant, store=f"g{index // 10}",
                                 terminal=f"g{index}", roles=["pos"], ttl=86400)
        self.decoder = None
        self.transport = None
        self.connected = False
        self.epoch = 0
        self.processed = [0, 0]       # highest P0/P1 seq processed (kept across connections)

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.decoder = Decoder()
        transport.write(_handshake(self.token, self.epoch, *self.processed))

    def data_received(self, data: bytes) -> None:
        load = self.load
        now = time.monotonic()
        acks = [0, 0]
        try:
            frames = self.decoder.feed(data)
        except Exception as exc:  # noqa: BLE001 - a decoding error is an error the till saw
            load.event(now, "decode", repr(exc))
            self.transport.abort()
            return
        for f in frames:
            t = f.type
            if t == DELIVER:
                lane = f.flags & 3
                if lane > 1:
                    continue
                acks[lane] = max(acks[lane], f.seq)
                if f.seq <= self.processed[lane]:
                    continue          # a replay of what this till already processed
                self.processed[lane] = f.seq
                if lane == 0:
                    n = orjson.loads(f.payload)["n"]
                    if n not in load.received:
                        load.received[n] = now
            elif t == WELCOME:
                self.connected = True
                if f.epoch != self.epoch:
                    self.epoch = f.epoch
                    self.processed = [0, 0]
            elif t == ERROR or t == CLOSE:
                load.event(now, "till", f"{FrameType(t).name} {f.code}")
        out = b"".join(_ENC.encode(Frame(FrameType.ACK, lane, seq=seq))
                       for lane, seq in enumerate(acks) if seq)
        if out:
            self.transport.write(out)

    def connection_lost(self, exc) -> None:
        self.transport = None
        self.connected = False
        load = self.load
        if load.running:
            load.event(time.monotonic(), "till", "connection lost")
            load.loop.create_task(load.reconnect(self))


class Payer(asyncio.Protocol):
    """The payment backend's connection (SENDs go through ``Load``)."""

    def __init__(self, load: "Load") -> None:
        self.load = load
        self.decoder = None
        self.transport = None
        self.connected = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.decoder = Decoder()
        token = issue_token(SECRET, tenant=self.load.tenant, store="hq", terminal="payer",
                            roles=["backend"], ttl=86400)
        transport.write(_handshake(token))

    def data_received(self, data: bytes) -> None:
        load = self.load
        now = time.monotonic()
        for f in self.decoder.feed(data):
            t = f.type
            if t == SENDACK:
                load.acked.setdefault(f.ref - 1, now)
            elif t == WELCOME:
                self.connected = True
            elif t == ERROR or t == CLOSE:
                load.event(now, "payer", f"{FrameType(t).name} {f.code} "
                           f"{bytes(f.payload[:80]).decode('utf-8', 'replace')}")

    def connection_lost(self, exc) -> None:
        self.transport = None
        self.connected = False
        load = self.load
        if load.running:
            load.event(time.monotonic(), "payer", "connection lost")
            load.loop.create_task(load.reconnect(self))


class Load:
    def __init__(self, params: dict) -> None:
        self.p = params
        self.tenant = params["tenant"]
        self.loop = asyncio.get_running_loop()
        self.rnd = random.Random(1)
        self.tills = [Till(self, i) for i in range(params["tills"])]
        self.payer = Payer(self)
        self.running = True
        self.paying = None            # the payer's task while started
        self.sent: list[float] = []   # result n -> when written (its index is n)
        self.scheduled = 0            # results due so far (sent or skipped)
        self.acked: dict[int, float] = {}
        self.received: dict[int, float] = {}
        self.skipped = 0              # results due while the payer was disconnected
        self.events: list[tuple[float, str, str]] = []

    def event(self, now: float, who: str, what: str) -> None:
        if len(self.events) < 100_000:
            self.events.append((now, who, what))

    async def _open(self, proto) -> None:
        await self.loop.create_connection(lambda: proto, "127.0.0.1", self.p["port"])

    async def reconnect(self, proto) -> None:
        """Connect ``proto`` again, with jittered backoff, until it is welcomed."""
        attempt = 0
        while self.running and proto.transport is None:
            await asyncio.sleep(self.rnd.uniform(0.05, min(2.0, 0.2 * 2 ** attempt)))
            attempt += 1
            try:
                await self._open(proto)
            except OSError:
                continue

    async def connect(self) -> dict:
        t0 = time.monotonic()
        for proto in [*self.tills, self.payer]:
            await self._open(proto)
        while not all(p.connected for p in [*self.tills, self.payer]):
            if time.monotonic() - t0 > 60:
                raise RuntimeError("the good tills were not welcomed in 60 s")
            await asyncio.sleep(0.01)
        return {"connected": len(self.tills) + 1, "seconds": time.monotonic() - t0}

    async def _pay(self) -> None:
        """One result per till per period, evenly spread; the backlog of a late
        tick goes out in one write."""
        n_tills = len(self.tills)
        gap = self.p["period"] / n_tills
        t0 = time.monotonic()
        base = self.scheduled
        tenant = self.tenant
        payer = self.payer
        while True:
            now = time.monotonic()
            due = base + int((now - t0) / gap)
            out = []
            while self.scheduled < due:
                till = self.scheduled % n_tills
                self.scheduled += 1
                if payer.transport is None or not payer.connected:
                    self.skipped += 1
                    continue
                n = len(self.sent)
                # n and t only: a long digit run could look like a card number.
                body = b'{"n":%d,"t":%.6f,"order":"o%d","status":"paid"}' % (n, now, n)
                out.append(_ENC.encode(Frame(
                    FrameType.SEND, Lane.P0 | Flag.ACK_REQUESTED, body, ref=n + 1,
                    to=f"terminal:{tenant}/g{till}", kind="payment.result")))
                self.sent.append(now)
            if out:
                payer.transport.write(b"".join(out))
            await asyncio.sleep(0.001)

    def start(self) -> dict:
        if self.paying is None:
            self.paying = self.loop.create_task(self._pay())
        return {"ok": True}

    def stop(self) -> dict:
        if self.paying is not None:
            self.paying.cancel()
            self.paying = None
        return {"ok": True, "sent": len(self.sent)}

    def _results(self, t0: float, t1: float) -> range:
        """The numbers of the results sent in [t0, t1) (``sent`` grows in time order)."""
        return range(bisect.bisect_left(self.sent, t0), bisect.bisect_left(self.sent, t1))

    def window(self, windows: list, final: bool = False) -> dict:
        now = time.monotonic()
        out = {}
        for name, t0, t1 in windows:
            numbers = self._results(t0, t1)
            lat = []
            acked = delivered = pending = lost = 0
            for n in numbers:
                sent = self.sent[n]
                got = self.received.get(n)
                if n in self.acked:
                    acked += 1
                if got is not None:
                    delivered += 1
                    lat.append((got - sent) * 1000)
                elif n in self.acked:
                    if final:
                        lost += 1
                    else:
                        pending += 1
                        lat.append((now - sent) * 1000)
            events = [(who, what) for at, who, what in self.events if t0 <= at < t1]
            counts: dict[str, int] = {}
            for who, what in events:
                key = f"{who}: {what}"
                counts[key] = counts.get(key, 0) + 1
            out[name] = {
                "sent": len(numbers), "acked": acked, "delivered": delivered,
                "pending": pending, "lost": lost, "unacked": len(numbers) - acked,
                "p50_ms": round(percentile(lat, 50), 2) if lat else None,
                "p99_ms": round(percentile(lat, 99), 2) if lat else None,
                "max_ms": round(max(lat), 2) if lat else None,
                "errors": counts,
            }
        return out

    def totals(self) -> dict:
        lost = sum(1 for n in self.acked if n not in self.received)
        return {"sent": len(self.sent), "acked": len(self.acked),
                "delivered": len(self.received), "lost": lost, "skipped": self.skipped,
                "tills_connected": sum(1 for t in self.tills if t.connected),
                "payer_connected": self.payer.connected}


async def serve(params: dict) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    load = Load(params)

    def answer(doc) -> None:
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
        sys.stdout.flush()

    answer(await load.connect())
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = orjson.loads(line)
        op = cmd.pop("cmd")
        if op == "quit":
            answer({"bye": True})
            break
        answer(getattr(load, op)(**cmd))
    load.running = False


def main() -> None:
    uvloop.run(serve(orjson.loads(sys.argv[1])))


if __name__ == "__main__":
    main()
