"""Micro-benchmarks of the lane scheduler, native vs Python twin (pytest-benchmark).

    .venv/bin/python -m pytest bench/micro/test_lanes_bench.py -q --benchmark-only \
        --benchmark-columns=min,median,rounds --benchmark-group-by=group

Cases (N = 10_000 schedulers, one per simulated connection; FRAME is a
64-byte encoded BROADCAST shared by all of them, as the hub fans it out):

* ``push_many[<lane>]``: one ``push_many`` of FRAME into N idle-but-used
  schedulers (P1; P2 without key; P2 with a str key; P2 with a (channel,
  sku) tuple key; P3 with a deadline).  Target: native well under 100 ns per
  scheduler.  The schedulers are drained again outside the timed part.
* ``fanout-cycle``: what a loop iteration costs per connection for one
  update: ``push_many`` into N schedulers, then ``drain`` of each.
* ``drain-4``: N schedulers holding 4 frames (P0, P1, P2 keyed, P3) drained
  into one bytes object each.
* ``push-drain``: one scheduler, 1_000 x (push P0, P1, P2 keyed, P3 then
  drain), the per-connection throughput.
* ``create``: N new schedulers; ``extra_info`` holds the memory of an idle
  scheduler and of one holding a single keyed P2 frame (tracemalloc).

Each case records ``ns_per_item`` in ``extra_info``.  A missing native module
fails the native cases unless ``TILLWIRE_NO_EXTENSIONS=1``.
"""

from __future__ import annotations

import importlib
import os
import sys
import tracemalloc

import pytest

from tillwire.core._impl import both

N = 10_000
FRAME = bytes(range(64))
P2_KEY_STR = "prices/acme:sku-004711"
P2_KEY_TUPLE = (17, "sku-004711")


def _require(impl: str):
    found = both("lanes")
    if impl in found:
        return found[impl]
    if os.environ.get("TILLWIRE_NO_EXTENSIONS") == "1":
        pytest.skip("TILLWIRE_NO_EXTENSIONS=1: native lane scheduler deliberately not benchmarked")
    try:
        importlib.import_module("tillwire.core._lanes")
        reason = "not returned by both()"
    except ImportError as exc:
        reason = str(exc)
    pytest.fail(f"native tillwire.core._lanes is not importable ({reason}); run `make compile`",
                pytrace=False)


@pytest.fixture(scope="module", params=["native", "python"])
def lanes(request):
    return _require(request.param)


def _used_schedulers(lanes) -> list:
    """N schedulers whose lanes were all used once (storage allocated, as on a live connection)."""
    scheds = [lanes.LaneScheduler() for _ in range(N)]
    for lane in range(4):
        lanes.push_many(scheds, lane, FRAME, key=P2_KEY_STR)
    for s in scheds:
        s.drain(1 << 20)
    return scheds


def _drain_all(scheds) -> None:
    for s in scheds:
        s.drain(1 << 20)


def _record(benchmark, items: int) -> None:
    if benchmark.stats is not None:
        benchmark.extra_info["ns_per_item"] = round(benchmark.stats.stats.median / items * 1e9, 1)


PUSH_CASES = {
    "P1": dict(lane=1),
    "P2": dict(lane=2, channel=17),
    "P2-key-str": dict(lane=2, key=P2_KEY_STR, channel=17),
    "P2-key-tuple": dict(lane=2, key=P2_KEY_TUPLE, channel=17),
    "P3-deadline": dict(lane=3, deadline=1e12),
}


@pytest.mark.parametrize("case", list(PUSH_CASES))
def test_push_many(benchmark, lanes, case):
    benchmark.group = f"push_many[{case}] x {N}"
    scheds = _used_schedulers(lanes)
    extra = dict(PUSH_CASES[case])
    lane = extra.pop("lane")

    def run():
        return lanes.push_many(scheds, lane, FRAME, **extra)

    result = benchmark.pedantic(run, setup=lambda: _drain_all(scheds), rounds=30, iterations=1,
                                warmup_rounds=2)
    assert result == []
    assert all(len(s) == 1 for s in scheds)
    _record(benchmark, N)


def test_fanout_cycle(benchmark, lanes):
    benchmark.group = f"fanout-cycle x {N}"
    scheds = _used_schedulers(lanes)
    push_many = lanes.push_many

    def run():
        push_many(scheds, 2, FRAME, key=P2_KEY_STR, channel=17)
        for s in scheds:
            s.drain(65536)

    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    _record(benchmark, N)


def test_drain_four_frames(benchmark, lanes):
    benchmark.group = f"drain-4 x {N}"
    scheds = _used_schedulers(lanes)

    def fill():
        for lane in range(4):
            lanes.push_many(scheds, lane, FRAME, key=P2_KEY_STR)

    def run():
        for s in scheds:
            s.drain(65536)

    benchmark.pedantic(run, setup=fill, rounds=20, iterations=1, warmup_rounds=1)
    assert all(len(s) == 0 for s in scheds)
    _record(benchmark, N)


def test_push_drain(benchmark, lanes):
    benchmark.group = "push-drain x 1000 (4 frames each)"
    s = lanes.LaneScheduler()
    key = P2_KEY_STR

    def run():
        push = s.push
        drain = s.drain
        for _ in range(1000):
            push(0, FRAME)
            push(1, FRAME)
            push(2, FRAME, key)
            push(3, FRAME, None, 1e12)
            drain(65536)

    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=1)
    assert len(s) == 0
    _record(benchmark, 4000)


def _traced_bytes_per(make, count: int = 2000) -> float:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [make() for _ in range(count)]
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    list_bytes = sys.getsizeof(kept)
    return (after - before - list_bytes) / count


def memory_figures(lanes) -> dict:
    """sys.getsizeof and tracemalloc bytes per idle scheduler / per one holding a P2 frame."""

    def holding_p2():
        s = lanes.LaneScheduler()
        s.push(2, FRAME, P2_KEY_STR, 0.0, 17)
        return s

    def used_idle():
        s = holding_p2()
        s.push(0, FRAME)
        s.push(1, FRAME)
        s.push(3, FRAME)
        s.drain(1 << 20)
        return s

    return {
        "getsizeof_idle": sys.getsizeof(lanes.LaneScheduler()),
        "traced_bytes_idle": round(_traced_bytes_per(lanes.LaneScheduler), 1),
        "traced_bytes_one_p2_frame": round(_traced_bytes_per(holding_p2), 1),
        "traced_bytes_idle_after_use": round(_traced_bytes_per(used_idle), 1),
    }


def test_create(benchmark, lanes):
    benchmark.group = f"create x {N}"
    cls = lanes.LaneScheduler

    def run():
        return [cls() for _ in range(N)]

    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=1)
    _record(benchmark, N)
    benchmark.extra_info.update(memory_figures(lanes))


if __name__ == "__main__":  # quick memory report: python bench/micro/test_lanes_bench.py
    for impl, mod in both("lanes").items():
        print(impl, memory_figures(mod))
