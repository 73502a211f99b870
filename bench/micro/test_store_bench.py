"""accept_many throughput of the Store backends.

Under pytest-benchmark (``make bench``): one round = one ``accept_many`` of
500 single-recipient P0 messages (fresh refs, 1000 recipients, ~80-byte
bodies) awaited alone, for the memory backend and SQLite with
synchronous=FULL and NORMAL (group_commit_ms=2, the default).

Run as a script for the full report the store's design targets::

    .venv/bin/python bench/micro/test_store_bench.py [--seconds 4] [--quick]

It measures msgs/s for synchronous FULL/NORMAL x batches of 500/100, with 1
batch in flight (each awaited before the next) and with 4 in flight (what
the node does under load: every loop iteration submits a batch while
earlier commits are in progress), plus the event loop's worst stall while
writing (a 1 ms ticker on the same uvloop loop), commits per second, the
machine's load average and a CPU calibration (a fixed pure-Python loop), so
numbers from a shared, noisy machine can be judged.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import sys
import tempfile
import time

import pytest

from tillwire.server.store import NewMessage
from tillwire.server.store_memory import MemoryStore
from tillwire.server.store_sqlite import DB_FILENAME, SQLiteStore

try:
    import uvloop
except ImportError:          # pragma: no cover - uvloop is a dependency
    uvloop = None

RECIPIENTS = [f"terminal:acme/till{i}" for i in range(1000)]
BODY = b'{"status":"approved","amount":1234,"currency":"EUR","txn":"7f3a9c01d2e4b5a6"}'


class Batches:
    """Fresh single-recipient P0 messages (each with its own ref)."""

    def __init__(self) -> None:
        self.ref = 0

    def make(self, size: int) -> list:
        now = time.time()
        out = []
        for _ in range(size):
            self.ref += 1
            to = RECIPIENTS[self.ref % len(RECIPIENTS)]
            out.append((NewMessage("acme", "terminal:acme/pay1", self.ref, 0, "payment.result",
                                   to, BODY, now, now + 604800.0), [to]))
        return out


def _new_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


# --------------------------------------------------------------------------
# pytest-benchmark


@pytest.fixture(params=["memory", "sqlite-FULL", "sqlite-NORMAL"])
def opened_store(request, tmp_path):
    loop = _new_loop()
    if request.param == "memory":
        store = MemoryStore()
    else:
        store = SQLiteStore(str(tmp_path / DB_FILENAME), synchronous=request.param.split("-")[1])
    loop.run_until_complete(store.open())
    yield loop, store
    loop.run_until_complete(store.close())
    loop.close()


def test_accept_many_500(benchmark, opened_store):
    loop, store = opened_store
    batches = Batches()

    def setup():
        return (batches.make(500),), {}

    def accept(batch):
        return loop.run_until_complete(store.accept_many(batch))

    result = benchmark.pedantic(accept, setup=setup, rounds=30, warmup_rounds=2)
    assert len(result) == 500 and not result[0].duplicate
    benchmark.extra_info["msgs_per_s"] = round(500 / benchmark.stats.stats.mean)


# --------------------------------------------------------------------------
# The report


def calibrate() -> float:
    """Seconds for a fixed pure-Python loop (~0.5 s on an idle modern core)."""
    started = time.perf_counter()
    total = 0
    for i in range(5_000_000):
        total += i
    return (time.perf_counter() - started) * 2


async def measure(store, batch: int, inflight: int, seconds: float,
                  freeze: bool = False) -> dict:
    """Accept for ``seconds``; returns msgs/s, the loop's worst stall and commits/s.

    ``freeze``: move every object alive before the run (the prebuilt
    batches) out of the garbage collector's reach, as a server may do after
    startup, so the stalls left are the ones the run itself causes.
    """
    source = Batches()
    ready = [source.make(batch) for _ in range(int(60_000 / batch) + inflight)]
    if freeze:
        gc.collect()
        gc.freeze()
    loop = asyncio.get_running_loop()
    lateness: list[float] = []
    stop = asyncio.Event()

    async def ticker():
        while not stop.is_set():
            before = loop.time()
            await asyncio.sleep(0.001)
            lateness.append(loop.time() - before - 0.001)

    async def pipeline():
        count = 0
        while not stop.is_set():
            items = ready.pop() if ready else source.make(batch)
            await store.accept_many(items)
            count += len(items)
            await asyncio.sleep(0)      # the memory backend never suspends by itself
        return count

    stats0 = await store.stats()
    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.05)
    lateness.clear()
    started = time.perf_counter()
    tasks = [asyncio.ensure_future(pipeline()) for _ in range(inflight)]
    await asyncio.sleep(seconds)
    stop.set()
    total = sum(await asyncio.gather(*tasks))
    elapsed = time.perf_counter() - started
    await tick
    stats1 = await store.stats()
    commits = stats1.get("commits", 0) - stats0.get("commits", 0)
    if freeze:
        gc.unfreeze()
    lateness.sort()
    p99 = lateness[int(len(lateness) * 0.99)] if lateness else 0.0
    return {"msgs_per_s": total / elapsed, "stall_ms": lateness[-1] * 1000 if lateness else 0.0,
            "p99_ms": p99 * 1000, "commits_per_s": commits / elapsed, "messages": total}


def report(seconds: float, quick: bool, freeze: bool = False) -> None:
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, gc.freeze: {freeze}, loop: "
          f"{'uvloop' if uvloop else 'asyncio'}; calibration loop: {calibrate():.2f} s "
          f"(~0.5 s on an idle modern core); load average before: {os.getloadavg()}")
    combos = [(sync, batch, inflight) for sync in ("FULL", "NORMAL") for batch in (500, 100)
              for inflight in (1, 4)]
    if quick:
        combos = [("FULL", 500, 4)]
    print(f"{'backend':16} {'batch':>5} {'inflight':>8} {'msgs/s':>9} {'max stall':>9} "
          f"{'p99 stall':>9} {'commits/s':>9}   (stalls: lateness of a 1 ms timer, ms)")
    rows = [("memory", None, 500, 4)] + [(f"sqlite {s}", s, b, i) for s, b, i in combos]
    for name, sync, batch, inflight in rows:
        workdir = tempfile.mkdtemp(prefix="tillwire-bench-")
        try:
            loop = _new_loop()
            store = MemoryStore() if sync is None else SQLiteStore(
                os.path.join(workdir, DB_FILENAME), synchronous=sync, group_commit_ms=2.0)
            loop.run_until_complete(store.open())
            try:
                res = loop.run_until_complete(measure(store, batch, inflight, seconds, freeze))
            finally:
                loop.run_until_complete(store.close())
                loop.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        print(f"{name:16} {batch:>5} {inflight:>8} {res['msgs_per_s']:>9.0f} "
              f"{res['stall_ms']:>9.1f} {res['p99_ms']:>9.1f} {res['commits_per_s']:>9.1f}",
              flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each measurement")
    parser.add_argument("--quick", action="store_true", help="only sqlite FULL, 500, 4 in flight")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() the prebuilt batches before each run")
    opts = parser.parse_args()
    report(opts.seconds, opts.quick, opts.gc_freeze)
