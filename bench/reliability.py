"""``python -m bench reliability``: no payment result lost, none processed twice.

K payment results (default 100,000) go to 1,000 tills that crash and
reconnect at random (their unsent ACKs die with them), and the server is
killed with SIGKILL and restarted in the middle.  The payment backend
retries every unacked result with the same ref (idempotency), reconnecting
as needed; tills keep their positions across reconnects like the SDK's state
file and suppress duplicates by inbox sequence.

Then a separate steady phase (no chaos, no restart) measures how many
durable P0 messages per second the embedded SQLite store (synchronous=FULL)
accepts end to end while the 1,000 tills take them (``durable_msgs_per_s``),
and one more, on a fresh server, without the tills, the results only stored
(``stored_only_msgs_per_s``: the accept path alone).  ``--no-steady-tills``
runs only the second and reports it under both keys.

The same payer and tills then run once more against a bare uvloop relay
(``bench.bare``, ``relay`` mode: each SEND written to its till as a DELIVER,
the SENDACK at once, the ACK read and dropped; no store, no bookkeeping):
``bare_relay_msgs_per_s`` is the most these load generators and this
machine's sockets carry at this moment with no server work at all, and
``durable_vs_bare`` the steady rate with tills as a share of it.
``--no-baseline`` skips it.

Keys: sent, acked, delivered_unique, lost (acked but never delivered),
duplicates_suppressed (duplicate SENDs answered from the dedup window plus
redelivered messages the tills recognised), reordered (deliveries out of
inbox order), durable_msgs_per_s, stored_only_msgs_per_s,
bare_relay_msgs_per_s, durable_vs_bare.
"""

from __future__ import annotations

import argparse
import time

from .common import BareServer, Server, Worker

TENANT = "rel"


def _tills(port: int, n: int, workers: int, chaos: bool) -> list[Worker]:
    per = n // workers
    out = [Worker("tills", port=port, tenant=TENANT, start=i * per, chaos=chaos,
                  count=per if i < workers - 1 else n - per * (workers - 1))
           for i in range(workers)]
    for w in out:
        w.recv(300)
    return out


def _stats(tills: list[Worker]) -> list[dict]:
    for w in tills:
        w.send(cmd="stats")
    return [w.recv(120) for w in tills]


def _stop(workers: list[Worker]) -> None:
    for w in workers:
        try:
            w.send(cmd="quit")
        except Exception:
            pass
        w.close()


STALL = 60.0     # seconds without a new payer ack that end a run as stalled


def _paid(payer: Worker, tills: list[Worker], on_progress=None) -> dict:
    """Wait for the payer's ``pay`` to end (its result), passing each progress
    report to ``on_progress``.  A run that stops making progress fails after
    STALL seconds and says where it stood, instead of waiting out the long
    timeouts (and a test runner's own)."""
    last, since = -1, time.monotonic()
    while True:
        try:
            msg = payer.recv(STALL)
        except TimeoutError:
            msg = None          # (no report at all: the payer is stuck reconnecting)
        if msg is not None and "progress" not in msg:
            return msg
        now = time.monotonic()
        if msg is not None and msg["progress"] != last:
            last, since = msg["progress"], now
        elif now - since > STALL:
            # (The payer answers nothing else until its pay ends; the tills do.)
            connected = [s["connected"] for s in _stats(tills)]
            raise RuntimeError(f"the payer made no progress for {STALL:.0f} s at {last} acked; "
                               f"tills connected per worker: {connected}")
        if msg is not None and on_progress is not None:
            on_progress(msg)


def _steady(env: dict, n: int, args, tills_on: bool, bare: bool = False
            ) -> tuple[float, int | None]:
    """(durable P0 messages per second accepted in a steady run (no chaos, no
    restart), how many distinct results the tills received (None without
    tills)); ``bare``: the same run through the bare relay instead."""
    if not tills_on:
        # These tills never log in: their tenant keeps results for a first
        # login (delivery.unknown_terminals), as the accept path alone is measured.
        env = {**env, "TILLWIRE_DELIVERY_UNKNOWN_TERMINALS": f"{TENANT}=accept"}
    server = BareServer("relay").start() if bare else Server(env=env).start()
    workers: list[Worker] = []
    try:
        tills = _tills(server.port, n, args.workers, chaos=False) if tills_on else []
        payer = Worker("payer", port=server.port, tenant=TENANT, terminals=n)
        workers = [*tills, payer]
        payer.recv(60)
        payer.send(cmd="pay", first=0, count=args.steady, window=args.window, timeout=600)
        steady = _paid(payer, tills)
        rate = steady["acked"] / steady["seconds"]
        delivered = None
        if tills:
            deadline = time.monotonic() + 30
            while True:       # (the last results may still be on their way to the tills)
                delivered = sum(len(s["seen"]) for s in _stats(tills))
                if delivered >= steady["acked"] or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        if bare:
            print(f"bare uvloop relay (bench.bare), same payer and tills: {steady['acked']} "
                  f"results in {steady['seconds']:.2f} s -> {rate:,.0f} msgs/s", flush=True)
        else:
            print(f"steady ({'tills connected' if tills_on else 'results only stored'}): "
                  f"{steady['acked']} durable P0 messages in {steady['seconds']:.2f} s "
                  f"-> {rate:,.0f} msgs/s (SQLite, synchronous=FULL)", flush=True)
        return rate, delivered
    finally:
        _stop(workers)
        server.stop()


def run(quick: bool = False, argv=()) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench reliability")
    parser.add_argument("--messages", type=int, default=20_000 if quick else 100_000)
    parser.add_argument("--terminals", type=int, default=100 if quick else 1_000)
    parser.add_argument("--steady", type=int, default=5_000 if quick else 100_000,
                        help="messages in the steady throughput phase")
    parser.add_argument("--window", type=int, default=10_000,
                        help="most unacked payment results in flight at the sender")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steady-tills", action=argparse.BooleanOptionalAction, default=True,
                        help="connect the tills in the steady phase (--no-steady-tills: the "
                             "results are only stored, measuring the accept path alone)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the steady load with tills through a bare uvloop relay "
                             "(bench.bare): the floor the load generators and sockets set")
    args = parser.parse_args(list(argv))
    k, n = args.messages, args.terminals
    env = {"TILLWIRE_STORE_BACKEND": "sqlite", "TILLWIRE_STORE_SYNCHRONOUS": "FULL",
           "TILLWIRE_HEARTBEAT_INTERVAL": "600", "TILLWIRE_HEARTBEAT_MAX": "600",
           "TILLWIRE_DELIVERY_RETRANSMIT_INITIAL": "2", "TILLWIRE_LOG_LEVEL": "warning"}

    # Phase 1: chaos, a kill -9 and a restart.
    server = Server(env=env).start()
    workers: list[Worker] = []
    try:
        tills = _tills(server.port, n, args.workers, chaos=True)
        payer = Worker("payer", port=server.port, tenant=TENANT, terminals=n)
        workers = [*tills, payer]
        payer.recv(60)
        t0 = time.monotonic()
        payer.send(cmd="pay", first=0, count=k, window=args.window, timeout=900)
        killed = False

        def kill_at_half(msg: dict) -> None:
            nonlocal killed
            if not killed and msg["progress"] >= k // 2:
                server.kill()
                killed_at = time.monotonic() - t0
                time.sleep(0.5)
                server.start()
                killed = True
                print(f"server killed (SIGKILL) and restarted at {killed_at:.1f} s, "
                      f"{msg['progress']} acked so far", flush=True)

        result = _paid(payer, tills, kill_at_half)
        print(f"payer: {result['acked']}/{k} acked after {result['sends']} sends "
              f"in {result['seconds']:.1f} s", flush=True)
        for w in tills:
            w.send(cmd="set", chaos=False)
            w.recv(60)
        payer.send(cmd="stats")
        pstats = payer.recv(60)
        acked = set(pstats["acked"])
        deadline = time.monotonic() + 120
        while True:
            stats = _stats(tills)
            seen = set().union(*(set(s["seen"]) for s in stats))
            if acked <= seen or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        lost = len(acked - seen)
        suppressed = pstats["dup_acks"] + sum(s["suppressed"] for s in stats)
        reordered = sum(s["reordered"] + s["reordered_processed"] for s in stats)
        dup_processed = sum(s["dup_processed"] for s in stats)
        crashes = sum(s["crashes"] for s in stats)
        print(f"tills: {len(seen)} distinct results delivered, {crashes} till crashes, "
              f"{suppressed} duplicates suppressed ({pstats['dup_acks']} at the server's "
              f"dedup), {dup_processed} processed twice, {reordered} reordered, {lost} lost",
              flush=True)
    finally:
        _stop(workers)
        server.stop()

    # Phase 2: steady durable throughput, with the tills connected (unless
    # --no-steady-tills), then results only stored, each on a fresh server.
    rate, steady_delivered = _steady(env, n, args, tills_on=args.steady_tills)
    stored_only = _steady(env, n, args, tills_on=False)[0] if args.steady_tills else rate
    bare, bare_delivered = _steady(env, n, args, tills_on=True, bare=True) \
        if args.baseline else (None, None)
    return {
        "sent": k, "acked": len(acked), "delivered_unique": len(seen & set(range(k))),
        "lost": lost, "duplicates_suppressed": suppressed, "reordered": reordered,
        "processed_twice": dup_processed, "durable_msgs_per_s": round(rate),
        "stored_only_msgs_per_s": round(stored_only),
        "bare_relay_msgs_per_s": round(bare) if bare else None,
        "durable_vs_bare": round(rate / bare, 3) if bare and args.steady_tills else None,
        "steady_sent": args.steady, "steady_delivered": steady_delivered,
        "bare_relay_delivered": bare_delivered,
        "till_crashes": crashes, "terminals": n, "steady_tills": args.steady_tills,
        "quick": quick,
    }
