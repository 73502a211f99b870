"""``python -m bench lanes``: P0 payment results under a P3 promotion flood.

T terminals (default 200) hold connections to a server in its own process
(the embedded default store unless ``--store`` says otherwise) and ack what
they receive.  A backend sends P0 payment results to random terminals at a
steady rate; latency is measured from SEND to arrival at the terminal.
Phase 1 is idle; in phase 2 a second backend floods P3 offers to the whole
tenant faster than the terminals can take them, so the lanes must shed P3
while P0 keeps going first.

With ``--link BYTES_PER_S`` each terminal sits behind a weak store link
instead (it takes what it reads only when the link has carried it, and a
small receive buffer stands for the bytes in flight): the flood then
saturates the links, not the CPU, the lanes shed P3, and a payment result
waits only behind what was already handed to the kernel.

Keys: p0_p99_ms_idle, p0_p99_ms_flood, p0_flood_ratio (flood p99 / idle
p99), p3_dropped (offers addressed to terminals that never reached them:
shed or expired), p0_lost (payment results the server acked that no
terminal received).
"""

from __future__ import annotations

import argparse
import time

from .common import Server, Worker, percentile

TENANT = "lanes"


def _collect(terms: list[Worker]) -> tuple[dict, int, int]:
    for w in terms:
        w.send(cmd="stats")
    stats = [w.recv(60) for w in terms]
    p0 = {}
    for s in stats:
        p0.update({int(k): v for k, v in s["p0"].items()})
    return p0, sum(s["p3"] for s in stats), sum(s["closed"] for s in stats)


def run(quick: bool = False, argv=()) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench lanes")
    parser.add_argument("--terminals", type=int, default=50 if quick else 200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--p0-rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=2.0 if quick else 8.0)
    parser.add_argument("--flood-rate", type=float, default=500.0 if quick else 2000.0,
                        help="P3 offers per second to the whole tenant")
    parser.add_argument("--offer-size", type=int, default=1024)
    parser.add_argument("--store", default="sqlite", choices=["sqlite", "memory"])
    parser.add_argument("--link", type=float, default=0.0, metavar="BYTES_PER_S",
                        help="each terminal behind a weak store link of this many bytes/s "
                             "(0: loopback speed, the flood then saturates the CPU instead)")
    parser.add_argument("--link-buffer", type=int, default=4096, metavar="BYTES",
                        help="with --link: the terminals' SO_RCVBUF, standing for the bytes "
                             "in flight on the link (the kernel doubles it)")
    args = parser.parse_args(list(argv))
    t = args.terminals
    server = Server(env={"TILLWIRE_STORE_BACKEND": args.store,
                         "TILLWIRE_HEARTBEAT_INTERVAL": "600", "TILLWIRE_HEARTBEAT_MAX": "600",
                         "TILLWIRE_LOG_LEVEL": "warning"}).start()
    workers: list[Worker] = []
    try:
        per = t // args.workers
        terms = [Worker("terminals", port=server.port, tenant=TENANT, start=i * per,
                        count=per if i < args.workers - 1 else t - per * (args.workers - 1),
                        link=args.link, link_buffer=args.link_buffer if args.link else 0)
                 for i in range(args.workers)]
        workers += terms
        for w in terms:
            w.recv(300)
        payer = Worker("sender", port=server.port, tenant=TENANT, name="payer")
        flooder = Worker("sender", port=server.port, tenant=TENANT, name="flooder")
        workers += [payer, flooder]
        payer.recv(60)
        flooder.recv(60)

        # Phase 1: idle.
        payer.send(cmd="payments", rate=args.p0_rate, seconds=args.seconds, terminals=t, first=0)
        idle_sent = payer.recv(args.seconds + 60)["sent"]
        time.sleep(1.0)
        # Phase 2: the same P0 stream under a P3 flood.
        first = 10_000_000
        flooder.send(cmd="promos", rate=args.flood_rate, seconds=args.seconds + 1.0,
                     size=args.offer_size)
        time.sleep(0.5)
        payer.send(cmd="payments", rate=args.p0_rate, seconds=args.seconds, terminals=t,
                   first=first)
        flood_sent = payer.recv(args.seconds + 60)["sent"]
        promos_sent = flooder.recv(args.seconds + 60)["sent"]

        # Let queues drain, then count.
        deadline = time.monotonic() + 60
        acked: set[int] = set()
        while time.monotonic() < deadline:
            time.sleep(1.0)
            payer.send(cmd="stats")
            acked = set(payer.recv(60)["acked"])
            p0, p3, closed = _collect(terms)
            if acked <= set(p0) and len(acked) == idle_sent + flood_sent:
                break
        p0, p3, closed = _collect(terms)
        if args.link:
            # Offers still queued behind the slow links are not dropped: count
            # them once they have arrived (the count stops growing).
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(1.5)
                before = p3
                p0, p3, closed = _collect(terms)
                if p3 == before:
                    break
        idle = [v for k, v in p0.items() if k < first]
        flood = [v for k, v in p0.items() if k >= first]
        p99_idle, p99_flood = percentile(idle, 99), percentile(flood, 99)
        lost = len(acked - set(p0))
        dropped = promos_sent * t - p3
        print(f"P0 idle:  {len(idle)}/{idle_sent} received, p50 {percentile(idle, 50):.2f} ms, "
              f"p99 {p99_idle:.2f} ms", flush=True)
        print(f"P0 flood: {len(flood)}/{flood_sent} received, p50 {percentile(flood, 50):.2f} ms, "
              f"p99 {p99_flood:.2f} ms", flush=True)
        print(f"P3 flood: {promos_sent} offers x {t} terminals, {p3} delivered, {dropped} shed; "
              f"P0 lost {lost}; connections closed by server {closed}", flush=True)
        return {
            "p0_p99_ms_idle": round(p99_idle, 3), "p0_p99_ms_flood": round(p99_flood, 3),
            "p0_flood_ratio": round(p99_flood / p99_idle, 2) if p99_idle else None,
            "p3_dropped": dropped, "p0_lost": lost,
            "p0_sent": idle_sent + flood_sent, "p0_acked": len(acked),
            "p3_offers": promos_sent, "p3_delivered": p3, "terminals": t, "store": args.store,
            "closed_by_server": closed, "link_bytes_per_s": args.link, "quick": quick,
        }
    finally:
        for w in workers:
            try:
                w.send(cmd="quit")
            except Exception:
                pass
            w.close()
        server.stop()
