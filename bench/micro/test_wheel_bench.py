"""Micro-benchmarks of the timing wheel, native vs Python twin (pytest-benchmark).

    .venv/bin/python -m pytest bench/micro/test_wheel_bench.py -q --benchmark-only \
        --benchmark-columns=min,mean,median,rounds

Every case works on N = 100_000 timers, the order of one server's connection
deadlines.  Each benchmark records ``ns_per_timer`` (mean time / N) in
``extra_info``.  Callbacks are the builtin ``id`` so the numbers are the
wheel's own cost.  A missing native module fails the native cases unless
``TILLWIRE_NO_EXTENSIONS=1``.
"""

from __future__ import annotations

import importlib
import os

import pytest

from tillwire.core._impl import both

N = 100_000
TICK = 0.01  # 10 ms ticks
SIZE = 512  # 5.12 s per rotation: the spread below (60 s) needs ~12 rounds


def _require(impl: str):
    found = both("wheel")
    if impl in found:
        return found[impl]
    if os.environ.get("TILLWIRE_NO_EXTENSIONS") == "1":
        pytest.skip("TILLWIRE_NO_EXTENSIONS=1: native wheel deliberately not benchmarked")
    try:
        importlib.import_module("tillwire.core._wheel")
        reason = "not returned by both()"
    except ImportError as exc:
        reason = str(exc)
    pytest.fail(f"native tillwire.core._wheel is not importable ({reason}); run `make compile`", pytrace=False)


@pytest.fixture(scope="module", params=["native", "python"])
def wm(request):
    return _require(request.param)


def _deadlines(offset: float = 1.0) -> list[float]:
    # 100k deadlines spread over 60 s (6000 ticks, ~12 rounds of a 512-bucket wheel)
    return [offset + (i * 7919 % 6000) * TICK + 0.003 for i in range(N)]


def _per_timer(benchmark) -> None:
    if benchmark.stats is not None:
        benchmark.extra_info["ns_per_timer"] = round(benchmark.stats.stats.mean / N * 1e9, 1)


def test_schedule_then_cancel_100k(benchmark, wm):
    """N schedule() of idle timers then N cancel(): ns_per_timer is one schedule + one cancel."""
    wheel = wm.TimingWheel(TICK, SIZE, 0.0)
    timers = [wm.Timer(id, i) for i in range(N)]
    deadlines = _deadlines()

    def run():
        schedule = wheel.schedule
        for timer, deadline in zip(timers, deadlines):
            schedule(timer, deadline)
        for timer in timers:
            timer.cancel()

    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    assert len(wheel) == 0
    _per_timer(benchmark)


def test_reschedule_100k(benchmark, wm):
    """N schedule() of already linked timers (heartbeat deadlines pushed back)."""
    wheel = wm.TimingWheel(TICK, SIZE, 0.0)
    timers = [wm.Timer(id, i) for i in range(N)]
    first, second = _deadlines(1.0), _deadlines(2.5)
    for timer, deadline in zip(timers, first):
        wheel.schedule(timer, deadline)
    flip = [False]

    def run():
        schedule = wheel.schedule
        flip[0] = not flip[0]
        for timer, deadline in zip(timers, second if flip[0] else first):
            schedule(timer, deadline)

    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    assert len(wheel) == N
    _per_timer(benchmark)


def _loaded_wheel(wm, size=SIZE):
    wheel = wm.TimingWheel(TICK, size, 0.0)
    for i, deadline in enumerate(_deadlines()):
        wheel.call_at(deadline, id, i)
    return (wheel,), {}


@pytest.mark.parametrize("size", [SIZE, 8192], ids=["12-rounds", "1-rotation"])
def test_advance_tick_by_tick_fires_100k(benchmark, wm, size):
    """6100 advance() calls, one per tick, firing all N timers (~16 per tick).

    With 512 buckets every visit also walks the ~12 later rounds waiting in
    the bucket (the hashed wheel's trade-off); with 8192 buckets the 60 s
    spread fits in one rotation and a visit walks only what is due."""
    nows = [k * TICK + TICK / 2 for k in range(1, 6102)]

    def run(wheel):
        advance = wheel.advance
        fired = 0
        for now in nows:
            fired += advance(now)
        assert fired == N

    benchmark.pedantic(run, setup=lambda: _loaded_wheel(wm, size), rounds=8, iterations=1, warmup_rounds=1)
    _per_timer(benchmark)


def test_advance_one_jump_fires_100k(benchmark, wm):
    """One advance() over the whole wheel: visit every bucket, sort and fire N timers."""

    def run(wheel):
        assert wheel.advance(100.0) == N

    benchmark.pedantic(run, setup=lambda: _loaded_wheel(wm), rounds=8, iterations=1, warmup_rounds=1)
    _per_timer(benchmark)


def test_advance_idle_tick_with_100k_pending(benchmark, wm):
    """One advance() of one tick that fires nothing while N timers wait in later
    rounds (~N/size = 195 per bucket).  The Python twin walks the bucket; the
    native wheel skips it (its per-bucket tick floor is above the target)."""
    wheel = wm.TimingWheel(TICK, SIZE, 0.0)
    for i in range(N):
        # tick indices >= 100_000 and spread over all buckets: never due below
        wheel.call_at(1000.0 + i * TICK, id, i)
    clock = [0.0]

    def run():
        clock[0] += TICK
        return wheel.advance(clock[0])

    # 20k ticks in all: far below tick 100_000, where the first timer is due
    assert benchmark.pedantic(run, rounds=200, iterations=100, warmup_rounds=1) == 0
    assert len(wheel) == N and wheel.current_tick < 100_000
    benchmark.extra_info["timers_waiting_per_bucket"] = N // SIZE
    benchmark.extra_info["ns_per_tick"] = round(benchmark.stats.stats.mean * 1e9, 1)
