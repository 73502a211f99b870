"""Graceful drain of real ``tillwire serve`` subprocesses (SQLite store):
SIGTERM or ``POST /v1/drain`` -> GOAWAY to every terminal, in-flight
payments acknowledged, acks written, exit 0; after a restart the terminals
reconnect and nothing a backend got a SENDACK for is lost.  Also checks the
structured (JSON) process log at debug level."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import orjson
import pytest

from support import ServerProcess, aiotest, connect, eventually, free_port
from tillwire.core.codes import Code
from tillwire.core.errors import SessionClosed


class Till:
    """A till that keeps its positions across connections, processes each
    payment once (by inbox seq) and reconnects after the GOAWAY delay."""

    def __init__(self, addr, name: str, work: float = 0.0) -> None:
        self.addr = addr
        self.name = name
        self.work = work              # seconds to process one payment
        self.epoch = 0
        self.processed = [0, 0]
        self.seen: list[int] = []
        self.goaways: list[tuple[int, int]] = []
        self.closes: list[int] = []
        self.connects = 0
        self.conn = None
        self.stopping = False

    async def run(self) -> None:
        while not self.stopping:
            try:
                conn = await connect(self.addr, self.name, epoch=self.epoch,
                                     p0=self.processed[0], p1=self.processed[1], timeout=3)
            except (OSError, SessionClosed, asyncio.TimeoutError):
                await asyncio.sleep(0.1)
                continue
            self.conn = conn
            self.connects += 1
            if conn.welcome.epoch != self.epoch:
                self.epoch = conn.welcome.epoch
                self.processed = [0, 0]
            try:
                while True:
                    msg = await conn.receive()
                    if msg.channel is not None:
                        continue
                    if msg.seq > self.processed[msg.lane]:      # not seen before
                        if self.work:
                            await asyncio.sleep(self.work)
                        self.seen.append(msg.body["n"])
                        self.processed[msg.lane] = msg.seq
                    await msg.ack()
            except SessionClosed:
                pass
            self.closes.append(conn.close_code)
            if conn.goaway is not None:
                self.goaways.append((conn.goaway.code, conn.goaway.delay))
                await asyncio.sleep(conn.goaway.delay / 1000.0)

    async def stop(self) -> None:
        self.stopping = True
        if self.conn is not None and self.conn.is_open:
            await self.conn.close()


class Payer:
    """A backend that retries every unacked payment with the same ref."""

    def __init__(self, addr) -> None:
        self.addr = addr
        self.conn = None
        self.acked: dict[int, int] = {}
        self.acked_at: dict[int, float] = {}
        self._lock = asyncio.Lock()

    async def ensure(self):
        async with self._lock:
            while self.conn is None or not self.conn.is_open:
                try:
                    self.conn = await connect(self.addr, "payer", store="hq",
                                              roles=("backend",), timeout=3)
                except (OSError, SessionClosed, asyncio.TimeoutError):
                    await asyncio.sleep(0.1)
            return self.conn

    async def pay(self, n: int, terminal: str) -> None:
        while n not in self.acked:
            conn = await self.ensure()
            try:
                ack = await conn.send("payment.result", {"order": f"o{n}", "n": n,
                                                         "status": "paid"},
                                      f"terminal:acme/{terminal}", ref=n + 1, timeout=3)
            except (SessionClosed, asyncio.TimeoutError, ConnectionError):
                await asyncio.sleep(0.05)
                continue
            self.acked[n] = ack.msg_id
            self.acked_at[n] = time.monotonic()


async def wait_exit(server: ServerProcess, timeout: float) -> int:
    """Wait for the subprocess without blocking the loop (the tills must keep acking)."""
    deadline = time.monotonic() + timeout
    while server.proc.poll() is None:
        assert time.monotonic() < deadline, "the server did not exit"
        await asyncio.sleep(0.02)
    return server.proc.returncode


def log_lines(server: ServerProcess) -> list[dict]:
    return [orjson.loads(line) for line in server.log().splitlines() if line.strip()]


@pytest.mark.slow
@aiotest(timeout=120)
async def test_sigterm_drains_and_after_restart_no_acked_payment_is_lost(tmp_path):
    server = ServerProcess(str(tmp_path), env={"TILLWIRE_STORE_SYNCHRONOUS": "FULL",
                                               "TILLWIRE_LOG_FORMAT": "json",
                                               "TILLWIRE_DELIVERY_RETRANSMIT_INITIAL": "1"})
    server.start()
    # Tills take 20 ms per payment and the backend sends faster than that, so
    # payments are in flight (delivered, not yet acked) when SIGTERM comes.
    tills = [Till(server.addr, f"t{i}", work=0.02) for i in range(6)]
    runners = [asyncio.ensure_future(t.run()) for t in tills]
    payer = Payer(server.addr)
    total = 900
    queue = list(range(total))

    async def worker():
        while queue:
            n = queue.pop(0)
            await payer.pay(n, f"t{n % 6}")
            await asyncio.sleep(0.01)            # a steady stream, not one burst

    workers = [asyncio.ensure_future(worker()) for _ in range(6)]
    try:
        await eventually(lambda: all(t.connects for t in tills), timeout=15)
        await eventually(lambda: len(payer.acked) >= 200, timeout=30)
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        acked_at_signal = len(payer.acked)
        assert await wait_exit(server, 15) == 0
        drain_seconds = time.monotonic() - signalled
        lines = log_lines(server)
        started = [r["msg"] for r in lines if r["msg"].startswith("draining node=")]
        assert started and "in_flight=0 " not in started[0], started
        done = [r for r in lines if r["msg"].startswith("drain ")]
        assert done and done[-1]["msg"].startswith("drain complete"), done
        assert "in_flight=0" in done[-1]["msg"]
        assert drain_seconds < 8                 # finished on acks, not on the 10 s timeout
        assert acked_at_signal < total
        # Every till was told to go away, with a jittered 1-5 s hint.
        for t in tills:
            assert t.goaways and t.goaways[0][0] == Code.DRAINING
            assert 1000 <= t.goaways[0][1] <= 5000
        assert len({t.goaways[0][1] for t in tills}) > 1
        assert Code.SHUTDOWN in {c for t in tills for c in t.closes}

        server.start()                           # same port, same store
        await asyncio.wait_for(asyncio.gather(*workers), 60)
        await eventually(lambda: sum(len(t.seen) for t in tills) >= total, timeout=30)
        await asyncio.sleep(0.3)
        delivered = [n for t in tills for n in t.seen]
        assert sorted(delivered) == list(range(total))      # every payment, each once
        assert len(payer.acked) == total
        for t in tills:
            assert t.connects >= 2 and all(n % 6 == int(t.name[1:]) for n in t.seen)
        audit = [orjson.loads(x) for x in (tmp_path / "audit.log").read_bytes().splitlines()]
        drains = [e for e in audit if e["event"] == "drain"]
        assert drains and drains[0]["who"] == "signal:SIGTERM"
    finally:
        for t in tills:
            await t.stop()
        for task in runners + workers:
            task.cancel()
        server.stop()


@aiotest(timeout=60)
async def test_admin_drain_exits_zero_and_logs_are_json_at_debug_level(tmp_path):
    admin_port = free_port()
    admin_token = "drain-test-admin-token-123"
    server = ServerProcess(str(tmp_path), admin_port=admin_port,
                           env={"TILLWIRE_LOG_FORMAT": "json",
                                "TILLWIRE_ADMIN_TOKEN": admin_token},
                           args=["--log-level", "debug"])
    server.start()
    try:
        till = await connect(server.addr, "t1")
        base = f"http://127.0.0.1:{admin_port}"
        headers = {"Authorization": f"Bearer {admin_token}"}
        async with aiohttp.ClientSession(base) as http:
            async with http.get("/readyz") as resp:
                assert resp.status == 200
            async with http.get("/metrics") as resp:     # serve froze its startup objects
                text = await resp.text()
                frozen = [line for line in text.splitlines()
                          if line.startswith("tillwire_gc_frozen_objects{")]
                assert len(frozen) == 1 and float(frozen[0].rsplit(" ", 1)[1]) > 10_000
                full_every = [line for line in text.splitlines()
                              if line.startswith("tillwire_gc_threshold{")
                              and 'generation="2"' in line]
                assert len(full_every) == 1 and float(full_every[0].rsplit(" ", 1)[1]) == 100
            async with http.get("/v1/presence?tenant=acme", headers=headers) as resp:
                assert (await resp.json())["count"] == 1
            async with http.post("/v1/drain", headers=headers,
                                 json={"delay_ms": 150, "spread_ms": 0}) as resp:
                assert resp.status == 202
        await asyncio.wait_for(till.closed.wait(), 10)
        assert till.goaway is not None and till.goaway.delay == 150
        assert till.goaway.code == Code.DRAINING and till.close_code == Code.SHUTDOWN
        assert await wait_exit(server, 15) == 0
    finally:
        server.stop()
    records = log_lines(server)           # every line is a JSON object
    assert records
    for r in records:
        assert {"ts", "level", "logger", "msg"} <= set(r)
        assert r["level"] in ("debug", "info", "warning", "error")
    loggers = {r["logger"] for r in records}
    assert {"tillwire.server", "tillwire.admin", "tillwire.node"} <= loggers
    debug = [r for r in records if r["level"] == "debug"]
    assert any(r["logger"] == "tillwire.admin" and "path=/v1/presence" in r["msg"] for r in debug)
    assert any("drain complete" in r["msg"] for r in records)
    assert admin_token not in server.log()
    audit = [orjson.loads(x) for x in (tmp_path / "audit.log").read_bytes().splitlines()]
    assert [e["who"] for e in audit if e["event"] == "drain"] == ["admin:env"]


@aiotest(timeout=60)
async def test_second_sigterm_ends_a_drain_waiting_for_an_unacked_payment(tmp_path):
    server = ServerProcess(str(tmp_path), env={"TILLWIRE_LOG_FORMAT": "json"})
    server.start()
    try:
        till = await connect(server.addr, "t1")
        be = await connect(server.addr, "hq", store="hq", roles=("backend",))
        ack = await be.send("payment.result", {"order": "o1", "status": "paid"},
                            "terminal:acme/t1")
        msg = await till.receive(timeout=5)        # never acked
        server.proc.send_signal(signal.SIGTERM)
        await eventually(lambda: till.goaway is not None, timeout=5)
        await asyncio.sleep(0.5)
        assert server.proc.poll() is None           # waiting for the ack
        server.proc.send_signal(signal.SIGTERM)
        assert await wait_exit(server, 5) == 0
        drains = [r["msg"] for r in log_lines(server) if r["msg"].startswith("drain ")]
        assert drains[-1].startswith("drain forced") and "in_flight=1" in drains[-1]
        # The unacked payment is still there for the till's next connection.
        server.start()
        again = await connect(server.addr, "t1")
        redelivered = await again.receive(timeout=5)
        assert redelivered.id == ack.msg_id == msg.id
        assert redelivered.duplicate                 # flagged: it was delivered before
        await again.close()
    finally:
        server.stop()
