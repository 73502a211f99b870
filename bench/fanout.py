"""``python -m bench fanout``: broadcast throughput and fan-out latency.

N terminals (default 10,000) of one tenant connect to a server in its own
process, from worker processes.  A backend publishes price updates to the
tenant at a steady rate for at least 5 seconds, each for a different SKU so
conflation cannot shrink the count; every delivery passes through the
connection's lane scheduler; deliveries are counted at the terminals.
Fan-out latency is measured separately: probes spaced apart, each timed
from its SEND until the last of the N terminals has it.

Keys: connections, deliveries_per_s, fanout_p50_ms, fanout_p99_ms,
server_rss_per_conn_bytes (RSS growth per idle authenticated connection),
plus the offered rate and the counts.
"""

from __future__ import annotations

import argparse
import time

from .common import BareServer, Server, Worker, percentile, rss_bytes

TENANT = "bench"


def _latencies(subs: list[Worker], sends: list[float]) -> tuple[list[float], int]:
    """Per probe, ms from its SEND until the last terminal had it (complete
    probes only); and how many connections the server closed."""
    for w in subs:
        w.send(cmd="stats")
    stats = [w.recv(60) for w in subs]
    lat = []
    for i, t_send in enumerate(sends):
        arrivals = [s["probes"].get(str(i)) for s in stats]
        if all(a is not None for a in arrivals):
            lat.append((max(arrivals) - t_send) * 1000)
    return lat, sum(s["closed"] for s in stats)


def run(quick: bool = False, argv=()) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench fanout")
    parser.add_argument("--connections", type=int, default=500 if quick else 10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=40 if quick else 200,
                        help="broadcasts per second offered (the default, 2 M deliveries/s to "
                             "10,000 terminals, is above what one server process delivers here, "
                             "so deliveries_per_s measures the server, not the offer)")
    parser.add_argument("--seconds", type=float, default=2.0 if quick else 6.0)
    parser.add_argument("--probes", type=int, default=10 if quick else 40)
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also time probes through a bare uvloop fan-out server "
                             "(bench.bare) with its own terminals, alternating with ours")
    args = parser.parse_args(list(argv))
    n, k = args.connections, args.workers

    server = Server(env={"TILLWIRE_STORE_BACKEND": "memory",
                         "TILLWIRE_HEARTBEAT_INTERVAL": "600", "TILLWIRE_HEARTBEAT_MAX": "600",
                         "TILLWIRE_LOG_LEVEL": "warning"}).start()
    workers: list[Worker] = []
    bare = None
    try:
        # Warm up the server (imports, first stream, allocator) with a few
        # connections before the RSS baseline.
        warm = min(100, n // 10)
        workers.append(Worker("subscribers", port=server.port, tenant=TENANT, start=0,
                              count=warm))
        workers[0].recv(120)
        time.sleep(1.0)
        rss0 = rss_bytes(server.pid)
        per = (n - warm) // k
        t0 = time.monotonic()
        for i in range(k):
            count = per if i < k - 1 else n - warm - per * (k - 1)
            workers.append(Worker("subscribers", port=server.port, tenant=TENANT,
                                  start=warm + i * per, count=count))
        for w in workers[1:]:
            w.recv(600)
        connect_s = time.monotonic() - t0
        time.sleep(2.0)
        rss1 = rss_bytes(server.pid)
        rss_per_conn = (rss1 - rss0) / (n - warm)
        print(f"{n} terminals connected in {connect_s:.1f} s; server RSS "
              f"{rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB ({rss_per_conn:.0f} B/conn)",
              flush=True)

        pub = Worker("publisher", port=server.port, tenant=TENANT)
        workers.append(pub)
        pub.recv(60)
        subs = workers[:-1]
        # Throughput: a steady stream of distinct-SKU updates.
        pub.send(cmd="flood", rate=args.rate, seconds=args.seconds, to=f"tenant:{TENANT}",
                 start_sku=0)
        sent = pub.recv(args.seconds + 60)
        expected = sent["sent"] * n
        deadline = time.monotonic() + 120
        total = last = 0
        while time.monotonic() < deadline:
            total = last = 0
            for w in subs:
                w.send(cmd="stats")
            stats = [w.recv(60) for w in subs]
            total = sum(s["count"] for s in stats)
            last = max(s["last"] for s in stats)
            if total >= expected or time.monotonic() - last > 10.0:
                break
            time.sleep(0.5)
        elapsed = last - sent["t_start"]
        deliveries_per_s = total / elapsed if elapsed > 0 else 0.0
        print(f"throughput: {sent['sent']} broadcasts x {n} = {expected} expected, "
              f"{total} delivered in {elapsed:.2f} s -> {deliveries_per_s:,.0f} deliveries/s",
              flush=True)

        # Latency: probes spaced apart, timed until the last terminal has each,
        # alternating with probes through the bare baseline (bench.bare) and
        # its own terminals, so both see the machine in the same state.
        bare = None
        if args.baseline:
            bare = BareServer().start()
            for i in range(k):
                count = n // k if i < k - 1 else n - n // k * (k - 1)
                workers.append(Worker("subscribers", port=bare.port, tenant=TENANT,
                                      start=i * (n // k), count=count))
            bare_subs = workers[-k:]
            for w in bare_subs:
                w.recv(600)
            bare_pub = Worker("publisher", port=bare.port, tenant=TENANT)
            workers.append(bare_pub)
            bare_pub.recv(60)
        time.sleep(1.0)
        gap = 0.25
        sends, bare_sends = [], []
        for i in range(args.probes):
            pub.send(cmd="probes", n=1, gap=0, first=i, to=f"tenant:{TENANT}")
            sends += pub.recv(60)["sends"]
            time.sleep(gap)
            if bare is not None:
                bare_pub.send(cmd="probes", n=1, gap=0, first=i, to=f"tenant:{TENANT}")
                bare_sends += bare_pub.recv(60)["sends"]
                time.sleep(gap)
        time.sleep(1.5)
        lat, closed = _latencies(subs, sends)
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        print(f"fan-out latency over {len(lat)}/{len(sends)} complete probes: "
              f"p50 {p50:.1f} ms, p99 {p99:.1f} ms", flush=True)
        baseline = {}
        if bare is not None:
            bare_lat, _ = _latencies(bare_subs, bare_sends)
            b50, b99 = percentile(bare_lat, 50), percentile(bare_lat, 99)
            print(f"bare uvloop fan-out (bench.bare), same terminals, alternating probes, "
                  f"{len(bare_lat)}/{len(bare_sends)} complete: p50 {b50:.1f} ms, "
                  f"p99 {b99:.1f} ms; tillwire/bare p99 {p99 / b99:.2f}", flush=True)
            baseline = {"bare_fanout_p50_ms": round(b50, 2), "bare_fanout_p99_ms": round(b99, 2),
                        "fanout_p99_vs_bare": round(p99 / b99, 2)}
        return {
            "connections": n, "deliveries_per_s": round(deliveries_per_s),
            "fanout_p50_ms": round(p50, 2), "fanout_p99_ms": round(p99, 2),
            "server_rss_per_conn_bytes": round(rss_per_conn),
            "offered_broadcasts_per_s": args.rate, "broadcasts": sent["sent"],
            "deliveries_expected": expected, "deliveries": total,
            "probes_complete": len(lat), "closed_by_server": closed, **baseline,
            "quick": quick,
        }
    finally:
        for w in workers:
            try:
                w.send(cmd="quit")
            except Exception:
                pass
            w.close()
        server.stop()
        if bare is not None:
            bare.stop()
