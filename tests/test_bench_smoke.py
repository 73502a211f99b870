"""Every benchmark's ``--quick`` mode runs and prints the keys its issue names.

Speed is never asserted here (it is measured by the full benchmarks); these
tests keep the benchmarks from rotting: they run the same code on a small
workload, as a real subprocess from the repo root, and check that the last
stdout line is one JSON object with the required keys and sane values.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import orjson
import pytest

from support import aiotest, eventually

ROOT = pathlib.Path(__file__).resolve().parent.parent

KEYS = {
    "codec": {"decode_fps", "encode_fps", "decode_speedup", "encode_speedup", "decode_fps_1k",
              "encode_fps_1k"},
    "fanout": {"connections", "deliveries_per_s", "fanout_p50_ms", "fanout_p99_ms",
               "server_rss_per_conn_bytes",
               # (and the bare uvloop baseline measured in the same run)
               "bare_fanout_p50_ms", "bare_fanout_p99_ms", "fanout_p99_vs_bare"},
    "lanes": {"p0_p99_ms_idle", "p0_p99_ms_flood", "p0_flood_ratio", "p3_dropped", "p0_lost"},
    "reliability": {"sent", "acked", "delivered_unique", "lost", "duplicates_suppressed",
                    "reordered", "durable_msgs_per_s", "stored_only_msgs_per_s",
                    # (and the bare uvloop relay, same payer and tills, same run)
                    "bare_relay_msgs_per_s", "durable_vs_bare"},
}


def run_bench(name: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench", name, "--quick", "--json", *args],
                          cwd=ROOT, capture_output=True, timeout=600,
                          env={k: v for k, v in os.environ.items()
                               if not k.startswith("TILLWIRE_")})
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    last = proc.stdout.decode().strip().splitlines()[-1]
    return orjson.loads(last)


@pytest.mark.bench
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(KEYS))
def test_quick_benchmark_prints_its_keys(name):
    result = run_bench(name)
    missing = KEYS[name] - set(result)
    assert not missing, f"{name}: missing keys {sorted(missing)} in {result}"
    for key in KEYS[name]:
        value = result[key]
        assert isinstance(value, (int, float)) and value == value, f"{name}.{key} = {value!r}"
        assert value >= 0, f"{name}.{key} = {value!r}"
    if name == "lanes":
        assert result["p0_lost"] == 0
    if name == "reliability":
        assert result["lost"] == 0 and result["reordered"] == 0
        # Both steady runs with tills carried every result to its till.
        assert result["steady_delivered"] == result["steady_sent"]
        assert result["bare_relay_delivered"] == result["steady_sent"]
    if name == "fanout":
        assert result["deliveries"] == result["deliveries_expected"]
        assert result["fanout_p99_vs_bare"] > 0 and result["probes_complete"] > 0


@pytest.mark.bench
@pytest.mark.slow
def test_quick_lanes_behind_weak_links_prints_its_keys():
    # The same keys when every terminal sits behind a 2 Mbit/s link.
    result = run_bench("lanes", "--link", "262144")
    assert KEYS["lanes"] <= set(result), result
    assert result["link_bytes_per_s"] == 262144
    assert result["p0_lost"] == 0 and result["p0_sent"] == result["p0_acked"] > 0
    assert result["p3_delivered"] > 0
    assert 0 <= result["p3_dropped"] < result["p3_offers"] * result["terminals"]


ABUSE_KEYS = {"cases", "server_crashes", "good_p99_ms_baseline", "good_p99_ms_worst",
              "abuse_ratio", "worst_case", "rss_growth_mb_max", "lost"}
ABUSE_CASES = {"garbage", "frames", "bombs", "slowloris", "bad_token", "send_flood",
               "ping_flood", "subscribe_flood", "churn", "bodies", "admin"}
ABUSE_CASE_FIGURES = ("rate", "good_p50_ms_baseline", "good_p99_ms_baseline",
                      "good_p50_ms_attack", "good_p99_ms_attack", "ratio", "target_p99_ms",
                      "rss_before_mb", "rss_after_settle_mb", "rss_growth_mb")


@pytest.mark.bench
@pytest.mark.slow
def test_quick_abuse_prints_its_keys():
    # Every attack class runs against the good tills, the server survives and
    # no acked payment result is lost; the figures themselves are not judged.
    result = run_bench("abuse")
    missing = ABUSE_KEYS - set(result)
    assert not missing, f"abuse: missing keys {sorted(missing)} in {result}"
    assert result["server_crashes"] == 0 and result["lost"] == 0
    cases = {case["name"]: case for case in result["cases"]}
    assert set(cases) == ABUSE_CASES
    for name, case in cases.items():
        for key in ABUSE_CASE_FIGURES:
            value = case[key]
            assert isinstance(value, (int, float)) and value == value, f"{name}.{key} = {value!r}"
        assert case["rate"] > 0 and case["good_p99_ms_attack"] > 0 and case["bound"]
        assert isinstance(case["met"], bool) and not case["server_crashed"]
        for phase in ("baseline", "attack"):
            results = case["results"][phase]
            assert results["sent"] > 0 and results["lost"] == 0, (name, phase, results)
    worst = cases[result["worst_case"]]
    assert result["abuse_ratio"] == worst["ratio"] == max(c["ratio"] for c in cases.values())
    assert result["good_p99_ms_worst"] == worst["good_p99_ms_attack"]
    assert result["good_p99_ms_baseline"] == worst["good_p99_ms_baseline"]


REDIS_RELIABILITY_KEYS = KEYS["reliability"] | {
    "sqlite_durable_msgs_per_s", "redis_vs_sqlite", "workers", "workers_us_per_result",
    "redis_server_us_per_result", "sqlite_server_us_per_result", "redis_floor_us_per_result",
    "memory_server_us_per_result", "memory_store_us_per_result",
    "redis_floor_client_us_per_result", "load_us_per_result", "redis_vs_sqlite_ceiling"}


@pytest.mark.bench
@pytest.mark.slow
def test_quick_reliability_over_redis_prints_its_keys():
    # A node of two workers over a redis-server of the benchmark's own
    # (appendfsync always), one worker killed with SIGKILL in the chaos
    # phase; the same steady phase on SQLite in the same run.
    result = run_bench("reliability", "--redis")
    missing = REDIS_RELIABILITY_KEYS - set(result)
    assert not missing, f"reliability --redis: missing keys {sorted(missing)} in {result}"
    for key in REDIS_RELIABILITY_KEYS:
        value = result[key]
        assert isinstance(value, (int, float)) and value == value, f"{key} = {value!r}"
        assert value >= 0, f"{key} = {value!r}"
    assert result["store"] == "redis" and result["workers"] == 2
    assert result["appendfsync"] == "always" and result["killed_worker"] in (0, 1)
    assert result["lost"] == 0 and result["reordered"] == 0
    assert result["acked"] == result["sent"] == result["delivered_unique"]
    assert result["steady_delivered"] == result["steady_sent"]
    assert result["sqlite_steady_delivered"] == result["steady_sent"]
    assert result["bare_relay_delivered"] == result["steady_sent"]
    assert result["redis_vs_sqlite"] > 0 and result["redis_vs_sqlite_ceiling"] > 0
    # (--quick: two rounds of each store, alternating; the ratio is the
    # median of the rounds' ratios, here their mean)
    rounds = result["redis_vs_sqlite_rounds"]
    assert result["rounds"] == len(rounds) == 2 and min(rounds) > 0
    assert abs(result["redis_vs_sqlite"] - sum(rounds) / 2) <= 0.001


@pytest.mark.bench
@aiotest(60)
async def test_the_payer_keeps_its_newest_connection_when_one_of_its_own_is_taken_over(
        monkeypatch):
    # The reliability payer once stalled for good: a second connection of
    # its own took its session over, and since a takeover's new WELCOME
    # reaches the client before the old connection's end, the old one's
    # loss cleared the new transport; it connected again, taking that one
    # over, without end.  Only the loss of the connection in use counts now.
    import asyncio

    import bench.worker as worker
    from bench.common import SECRET, Server

    monkeypatch.setattr(worker, "SECRET", SECRET)
    # (the tills it pays never log in: their tenant accepts results for them)
    server = Server(env={"TILLWIRE_STORE_BACKEND": "sqlite", "TILLWIRE_LOG_LEVEL": "warning",
                         "TILLWIRE_DELIVERY_UNKNOWN_TERMINALS": "rel=accept"}).start()
    try:
        payer = worker.Payer({"tenant": "rel", "port": server.port, "terminals": 3})
        payer.emit = lambda doc: None
        await payer.connect()
        first = payer.transport
        # (what a WELCOME later than _ensure waited for used to leave behind)
        await asyncio.get_running_loop().create_connection(payer._proto(), "127.0.0.1",
                                                           server.port)
        await eventually(lambda: payer.last_close is not None and payer.lost == 1)
        assert payer.transport is not None and payer.transport is not first
        result = await payer.pay(first=0, count=300, window=100, timeout=20)
        assert result["acked"] == 300 and payer.lost == 1
    finally:
        server.stop()


@pytest.mark.bench
def test_a_workers_lines_that_arrive_in_one_read_are_each_returned():
    # A load worker's last progress report and its result can reach the
    # orchestrator in one read; the second must not wait in a buffer that
    # select() does not see (the reliability runs' stall).
    from bench.common import Lines

    r, w = os.pipe()
    try:
        lines = Lines(r)
        os.write(w, b'{"progress":5000}\n{"acked":5000}\n{"par')
        assert lines.read(1.0) == b'{"progress":5000}\n'
        assert lines.read(1.0) == b'{"acked":5000}\n'
        with pytest.raises(TimeoutError):
            lines.read(0.2)                     # (half a line is not a line)
        os.write(w, b'tial":1}\n')
        assert lines.read(1.0) == b'{"partial":1}\n'
        os.close(w)
        w = None
        assert lines.read(1.0) is None          # the end of the pipe
    finally:
        os.close(r)
        if w is not None:
            os.close(w)


@pytest.mark.bench
def test_a_bench_servers_data_dir_goes_when_its_process_ends_unless_kept(tmp_path):
    # (hundreds of /tmp/tillwire-bench-* directories had piled up)
    code = "from bench.common import Server; print(Server().dir)"
    env = {k: v for k, v in os.environ.items() if k != "TILLWIRE_BENCH_KEEP"}
    gone = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                          capture_output=True, text=True).stdout.strip()
    assert gone.startswith("/") and not os.path.exists(gone)
    kept = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                          env={**env, "TILLWIRE_BENCH_KEEP": "1"},
                          capture_output=True, text=True).stdout.strip()
    assert os.path.isdir(kept)
    os.rmdir(kept)
