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

``--redis`` runs the chaos, steady and stored-only phases on a node of
``--workers`` processes (default 2) over Redis instead (``tillwire serve
--workers N --redis URL``, store.backend = redis), each phase over a fresh
Debian ``redis-server`` of its own on a free loopback port with its AOF on
(``--appendfsync``: always, the documented durable default, or everysec
or no to compare).  The tills and the payer connect to the node's port and
the kernel spreads them over the workers.  The chaos phase kills ONE
WORKER with SIGKILL half way (the supervisor starts it again; its tills
resume on the others) instead of the whole server.  The steady phase with
the tills runs ``--rounds`` times (default 5, 2 with ``--quick``) over
Redis and as many times on the embedded SQLite store, alternating, in the
same invocation: ``durable_msgs_per_s`` and ``sqlite_durable_msgs_per_s``
are the median rates, ``redis_vs_sqlite_rounds`` each round's Redis rate
as a share of the SQLite rate measured beside it, and ``redis_vs_sqlite``
their median.

Keys: sent, acked, delivered_unique, lost (acked but never delivered),
duplicates_suppressed (duplicate SENDs answered from the dedup window plus
redelivered messages the tills recognised), reordered (deliveries out of
inbox order), durable_msgs_per_s, stored_only_msgs_per_s,
bare_relay_msgs_per_s, durable_vs_bare, store; with ``--redis`` also
sqlite_durable_msgs_per_s, redis_vs_sqlite, redis_vs_sqlite_rounds,
rounds, workers, appendfsync, killed_worker.  ``steady_cpu_s`` (and
``sqlite_steady_cpu_s``): the CPU seconds each part spent during the
steady phase with tills (the server's processes, redis-server, the payer,
the tills' processes) and its wall seconds, summed over the rounds: where
the time went; with ``--redis`` the same per result
(``workers_us_per_result``, ``redis_server_us_per_result``,
``sqlite_server_us_per_result``) and ``redis_floor_us_per_result``: what
``redis-server`` spends per result, measured in the same run, for the
least a durable store in Redis could do (five plain pipelined commands,
see ``_redis_floor``), and ``redis_floor_client_us_per_result`` what the
least client of those commands spends.  ``redis_vs_sqlite_ceiling`` is the
most ``redis_vs_sqlite`` could be at that moment (``_ceiling``), from
those floors, ``memory_server_us_per_result`` (the same steady phase on
the embedded node with the memory store: the protocol work with nothing
durable), ``memory_store_us_per_result`` (the memory store's own share of
it) and ``load_us_per_result`` (the payer and the tills).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import statistics
import time

from .common import BareServer, RedisServer, Server, Worker, cpu_seconds

TENANT = "rel"

ENV = {"TILLWIRE_HEARTBEAT_INTERVAL": "600", "TILLWIRE_HEARTBEAT_MAX": "600",
       "TILLWIRE_DELIVERY_RETRANSMIT_INITIAL": "2"}
SQLITE_ENV = {**ENV, "TILLWIRE_STORE_BACKEND": "sqlite", "TILLWIRE_STORE_SYNCHRONOUS": "FULL",
              "TILLWIRE_LOG_LEVEL": "warning"}
# (info: the supervisor's "worker N started pid=P" and each worker's
# "listening ... worker=N" lines, which the harness reads)
REDIS_ENV = {**ENV, "TILLWIRE_STORE_BACKEND": "redis", "TILLWIRE_LOG_LEVEL": "info"}
# (the embedded node with nothing durable: the protocol work alone)
MEMORY_ENV = {"TILLWIRE_STORE_BACKEND": "memory"}


def _server(args, redis: RedisServer | None, env: dict | None = None) -> Server:
    """A started server (``env`` added to its environment): the embedded
    SQLite store, or with ``redis`` a node of ``args.workers`` workers over
    it, every worker listening."""
    if redis is None:
        return Server(env={**SQLITE_ENV, **(env or {})}).start()
    server = Server(env={**REDIS_ENV, **(env or {})},
                    args=["--workers", str(args.workers), "--redis", redis.url]).start()
    try:
        server.wait_workers(args.workers)
    except Exception:
        server.stop()
        raise
    return server


def _describe(args, store: str) -> str:
    if store == "redis":
        return f"Redis, appendfsync {args.appendfsync}, {args.workers} workers"
    if store == "memory":
        return "the memory store, nothing durable"
    return "SQLite, synchronous=FULL"


def _tills(port: int, n: int, procs: int, chaos: bool) -> list[Worker]:
    per = n // procs
    out = [Worker("tills", port=port, tenant=TENANT, start=i * per, chaos=chaos,
                  count=per if i < procs - 1 else n - per * (procs - 1))
           for i in range(procs)]
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
    report = None
    while True:
        try:
            msg = payer.recv(STALL)
        except TimeoutError:
            msg = None          # (no report at all: the payer is stuck reconnecting)
        if msg is not None and "progress" not in msg:
            return msg
        now = time.monotonic()
        if msg is not None:
            report = msg
        if msg is not None and msg["progress"] != last:
            last, since = msg["progress"], now
        elif now - since > STALL:
            # (The payer answers nothing else until its pay ends; the tills do.)
            connected = [s["connected"] for s in _stats(tills)]
            raise RuntimeError(f"the payer made no progress for {STALL:.0f} s at {last} acked "
                               f"(its last report: {report}); tills connected per load "
                               f"process: {connected}")
        if msg is not None and on_progress is not None:
            on_progress(msg)


def _cpu(server, redis, payer: Worker, tills: list[Worker]) -> dict:
    """CPU seconds so far of each part of a run (see ``cpu_seconds``)."""
    return {"server": cpu_seconds(server.proc.pid),
            "redis": cpu_seconds(redis.pid) if redis is not None else 0.0,
            "payer": cpu_seconds(payer.proc.pid),
            "tills": sum(cpu_seconds(w.proc.pid) for w in tills)}


def _steady(n: int, args, tills_on: bool, store: str) -> dict:
    """A steady run (no chaos, no restart) on a fresh server, ``store``
    sqlite, memory, redis (a node over a fresh redis-server) or bare (the
    bare relay): {"rate": durable P0 messages per second accepted, "delivered":
    how many distinct results the tills received (None without tills),
    "cpu": CPU seconds per part while the payer paid, and its wall seconds}."""
    # These tills never log in: their tenant keeps results for a first login
    # (delivery.unknown_terminals), as the accept path alone is measured.
    env = {} if tills_on else {"TILLWIRE_DELIVERY_UNKNOWN_TERMINALS": f"{TENANT}=accept"}
    if store == "memory":
        env.update(MEMORY_ENV)
    workers: list[Worker] = []
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer(args.appendfsync)) if store == "redis" else None
        server = BareServer("relay").start() if store == "bare" else _server(args, redis, env)
        stack.callback(server.stop)
        stack.callback(lambda: _stop(workers))
        tills = _tills(server.port, n, args.till_procs, chaos=False) if tills_on else []
        payer = Worker("payer", port=server.port, tenant=TENANT, terminals=n)
        workers = [*tills, payer]
        payer.recv(60)
        before = _cpu(server, redis, payer, tills)
        payer.send(cmd="pay", first=0, count=args.steady, window=args.window, timeout=600)
        steady = _paid(payer, tills)
        after = _cpu(server, redis, payer, tills)
        cpu = {part: round(after[part] - before[part], 2) for part in after}
        cpu["seconds"] = round(steady["seconds"], 2)
        rate = steady["acked"] / steady["seconds"]
        delivered = None
        if tills:
            deadline = time.monotonic() + 30
            while True:       # (the last results may still be on their way to the tills)
                delivered = sum(len(s["seen"]) for s in _stats(tills))
                if delivered >= steady["acked"] or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        if store == "bare":
            print(f"bare uvloop relay (bench.bare), same payer and tills: {steady['acked']} "
                  f"results in {steady['seconds']:.2f} s -> {rate:,.0f} msgs/s", flush=True)
        else:
            print(f"steady ({'tills connected' if tills_on else 'results only stored'}): "
                  f"{steady['acked']} durable P0 messages in {steady['seconds']:.2f} s "
                  f"-> {rate:,.0f} msgs/s ({_describe(args, store)}); CPU s {cpu}", flush=True)
        return {"rate": rate, "delivered": delivered, "cpu": cpu}


def _compared(n: int, args) -> tuple[dict, dict, list[float]]:
    """The steady phase with tills on Redis and on SQLite, ``args.rounds``
    times each, alternating (Redis then SQLite, then SQLite then Redis, ...):
    a shared host's speed drifts over a run, and a ratio of two rates
    measured seconds apart takes the drift for a difference between the
    stores (the same build measured 0.61 in one run and 1.16 in another,
    one phase of each).  Returns the Redis and the SQLite phase (the
    median rate, the fewest results delivered in any round, the CPU
    seconds summed over the rounds) and each round's Redis rate as a share
    of the SQLite rate measured next to it."""
    got: dict[str, list[dict]] = {"redis": [], "sqlite": []}
    for r in range(args.rounds):
        for store in ("redis", "sqlite") if r % 2 == 0 else ("sqlite", "redis"):
            got[store].append(_steady(n, args, tills_on=args.steady_tills, store=store))
    ratios = [a["rate"] / b["rate"] for a, b in zip(got["redis"], got["sqlite"])]
    print(f"redis_vs_sqlite per round: {', '.join(f'{r:.3f}' for r in ratios)}", flush=True)

    def merged(phases: list[dict]) -> dict:
        delivered = [p["delivered"] for p in phases]
        cpu = {part: round(sum(p["cpu"][part] for p in phases), 2) for part in phases[0]["cpu"]}
        return {"rate": statistics.median([p["rate"] for p in phases]),
                "delivered": None if None in delivered else min(delivered), "cpu": cpu}

    return merged(got["redis"]), merged(got["sqlite"]), ratios


def _redis_floor(args, results: int) -> tuple[float, float]:
    """The least a durable store in Redis could cost per payment result, on
    a fresh ``redis-server`` with the same AOF policy: five plain commands
    (no script), pipelined a thousand results at a time: the message stored
    (an HSET of three fields) and entered in its till's inbox (ZADD), marked
    delivered (HSETNX), then acked (HSET) and taken out of the inbox (ZREM).
    What Redis itself costs before any of Tillwire's bookkeeping, and what
    the least client costs: its commands packed by hiredis (C) and its
    replies parsed by hiredis on a bare socket, nothing else.  Returns
    (``redis-server``'s CPU µs per result, this client's)."""
    import hiredis

    body = b'{"n":1,"t":1796539713.308903,"order":"o1","status":"paid"}'
    head = b'["rel","terminal:rel/payer","1","0","payment.result","terminal:rel/t1"]'
    pack = hiredis.pack_command
    with RedisServer(args.appendfsync) as server, \
            socket.create_connection(("127.0.0.1", server.port)) as sock:
        reader = hiredis.Reader()
        before, client_before = cpu_seconds(server.pid), time.process_time()
        for stage in range(3):
            for first in range(0, results, 1000):
                out = []
                for i in range(first, first + 1000):
                    m, q = b"m:%d" % i, b"q:t%d" % (i % 1000)
                    if stage == 0:
                        out.append(pack((b"HSET", m, b"h", head, b"body", body, b"s1",
                                         b"stored")))
                        out.append(pack((b"ZADD", q, i, i)))
                    elif stage == 1:
                        out.append(pack((b"HSETNX", m, b"d1", b"1796539713.5")))
                    else:
                        out.append(pack((b"HSET", m, b"s1", b"acked", b"a1",
                                         b"1796539713.6")))
                        out.append(pack((b"ZREM", q, i)))
                sock.sendall(b"".join(out))
                _replies(sock, reader, len(out))
        spent = cpu_seconds(server.pid) - before
        client = time.process_time() - client_before
    return spent / results * 1e6, client / results * 1e6


def _replies(sock: socket.socket, reader, n: int) -> None:
    """Read ``n`` replies; an error reply is the floor measured wrong."""
    while n:
        reply = reader.gets()
        if reply is False:
            data = sock.recv(1 << 20)
            if not data:
                raise RuntimeError("redis-server closed the floor's connection")
            reader.feed(data)
            continue
        if isinstance(reply, Exception):
            raise RuntimeError(f"the floor's command failed: {reply}")
        n -= 1


def _memory_store_us(results: int) -> float:
    """CPU µs per result that the memory store's own calls take in this
    process (accept in batches of a thousand, each result's delivery and
    ack): the share of the memory-store node's cost that a node over Redis
    does not have (Redis keeps the state)."""
    import asyncio

    from tillwire.server.store import NewMessage
    from tillwire.server.store_memory import MemoryStore

    async def main() -> float:
        store = MemoryStore()
        await store.open()
        body, now = b'{"n":1,"order":"o1","status":"paid"}', time.time()
        batches = [[(NewMessage(TENANT, f"terminal:{TENANT}/payer", i + 1, 0, "payment.result",
                                f"terminal:{TENANT}/t{i % 1000}", body, now, now + 3600),
                     [f"terminal:{TENANT}/t{i % 1000}"]) for i in range(first, first + 1000)]
                   for first in range(0, results, 1000)]      # (made by the node either way)
        start = time.process_time()
        for items in batches:
            accepted = await store.accept_many(items)
            ranges = [(to, 0, seq, seq) for a in accepted for to, seq in a.seqs.items()]
            await store.delivered_many(ranges, now)
            await store.ack_many([(to, lane, last) for to, lane, _, last in ranges], now)
        spent = time.process_time() - start
        await store.close()
        return spent / results * 1e6

    return asyncio.run(main())


def _kill_worker(server: Server, rnd: random.Random) -> tuple[int, int]:
    """SIGKILL one worker of the node, chosen at random (never the
    supervisor, which starts it again): (its index, its pid)."""
    pids = server.worker_pids()
    index = rnd.choice(sorted(pids))
    os.kill(pids[index], signal.SIGKILL)
    return index, pids[index]


def _restarted(server: Server, index: int, old_pid: int, timeout: float = 30.0) -> bool:
    """Whether the supervisor started worker ``index`` again (a new pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.worker_pids().get(index, old_pid) != old_pid:
            return True
        time.sleep(0.1)
    return False


def _per_result(cpu_s: float, results: int) -> float:
    return round(cpu_s / results * 1e6, 1)


def _ceiling(sqlite_cpu: dict, memory_server_s: float, floor: float, floor_client: float,
             memory_store: float, results: int, sqlite_results: int) -> dict:
    """The most ``redis_vs_sqlite`` could be on this machine at this moment,
    from floors measured in the same run.  Both steady phases are bound by
    the machine's CPU (SQLite's runs every core it has), so a rate is the
    cores over the CPU per result of every process of the phase.  On
    SQLite: its server and writer, the payer and the tills, as measured.  A
    node over Redis, at the very least: the same node's protocol work with
    nothing stored (the memory-store node, less the memory store's own
    calls), a client that only packs and parses plain commands at C speed,
    ``redis-server`` running only the floor's five plain commands, and the
    same payer and tills.  Every real part costs more than its floor, so
    the ratio measured stays below this one.  ``results``: the memory-store
    phase's; ``sqlite_results``: those of the SQLite rounds together."""
    load = sqlite_cpu["payer"] + sqlite_cpu["tills"]
    sqlite_total = (sqlite_cpu["server"] + load) / sqlite_results * 1e6
    protocol = max(memory_server_s / results * 1e6 - memory_store, 0.0)
    least = protocol + floor_client + floor + load / sqlite_results * 1e6
    return {
        "memory_server_us_per_result": _per_result(memory_server_s, results),
        "memory_store_us_per_result": round(memory_store, 1),
        "redis_floor_client_us_per_result": round(floor_client, 1),
        "load_us_per_result": _per_result(load, sqlite_results),
        "redis_vs_sqlite_ceiling": round(sqlite_total / least, 3),
    }


def run(quick: bool = False, argv=()) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench reliability")
    parser.add_argument("--messages", type=int, default=20_000 if quick else 100_000)
    parser.add_argument("--terminals", type=int, default=100 if quick else 1_000)
    parser.add_argument("--steady", type=int, default=5_000 if quick else 100_000,
                        help="messages in the steady throughput phase")
    parser.add_argument("--window", type=int, default=10_000,
                        help="most unacked payment results in flight at the sender")
    parser.add_argument("--till-procs", type=int, default=2,
                        help="load processes the tills are spread over")
    parser.add_argument("--redis", action="store_true",
                        help="run the server as a node of --workers workers over a "
                             "redis-server of its own (store.backend = redis); the steady "
                             "phase also runs on SQLite for comparison")
    parser.add_argument("--workers", type=int, default=2,
                        help="the node's worker processes with --redis")
    parser.add_argument("--rounds", type=int, default=2 if quick else 5,
                        help="with --redis: steady phases with tills on Redis and on SQLite, "
                             "this many of each, alternating (see _compared)")
    parser.add_argument("--appendfsync", choices=("always", "everysec", "no"),
                        default="always", help="the redis-server's AOF policy with --redis")
    parser.add_argument("--steady-tills", action=argparse.BooleanOptionalAction, default=True,
                        help="connect the tills in the steady phase (--no-steady-tills: the "
                             "results are only stored, measuring the accept path alone)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the steady load with tills through a bare uvloop relay "
                             "(bench.bare): the floor the load generators and sockets set")
    args = parser.parse_args(list(argv))
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    k, n = args.messages, args.terminals
    store = "redis" if args.redis else "sqlite"
    rnd = random.Random()
    killed_worker = None

    # Phase 1: chaos, and a kill -9: of the server (restarted) on SQLite, of
    # one worker (restarted by its supervisor) over Redis.
    workers: list[Worker] = []
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer(args.appendfsync)) if args.redis else None
        server = _server(args, redis)
        stack.callback(server.stop)
        stack.callback(lambda: _stop(workers))
        tills = _tills(server.port, n, args.till_procs, chaos=True)
        payer = Worker("payer", port=server.port, tenant=TENANT, terminals=n)
        workers = [*tills, payer]
        payer.recv(60)
        t0 = time.monotonic()
        payer.send(cmd="pay", first=0, count=k, window=args.window, timeout=900)
        killed = None

        def kill_at_half(msg: dict) -> None:
            nonlocal killed
            if killed is None and msg["progress"] >= k // 2:
                if redis is not None:
                    killed = _kill_worker(server, rnd)
                    print(f"worker {killed[0]} (pid {killed[1]}) killed (SIGKILL) at "
                          f"{time.monotonic() - t0:.1f} s, {msg['progress']} acked so far",
                          flush=True)
                    return
                server.kill()
                killed_at = time.monotonic() - t0
                time.sleep(0.5)
                server.start()
                killed = (None, None)
                print(f"server killed (SIGKILL) and restarted at {killed_at:.1f} s, "
                      f"{msg['progress']} acked so far", flush=True)

        result = _paid(payer, tills, kill_at_half)
        print(f"payer: {result['acked']}/{k} acked after {result['sends']} sends "
              f"in {result['seconds']:.1f} s", flush=True)
        if redis is not None:
            if killed is None:
                raise RuntimeError("the run ended before half its results were acked: "
                                   "no worker was killed")
            if not _restarted(server, *killed):
                raise RuntimeError(f"the supervisor did not start worker {killed[0]} again: "
                                   f"{server.tail()}")
            killed_worker = killed[0]
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

    # Phase 2: steady durable throughput, with the tills connected (unless
    # --no-steady-tills), then results only stored, each on a fresh server
    # (and a fresh redis-server); over Redis the same steady phase with tills
    # on the embedded SQLite store too; then the bare relay's floor.
    if args.redis:
        steady, sqlite, ratios = _compared(n, args)
    else:
        steady, sqlite, ratios = _steady(n, args, tills_on=args.steady_tills, store=store), None, []
    rate = steady["rate"]
    stored_only = _steady(n, args, tills_on=False, store=store)["rate"] \
        if args.steady_tills else rate
    bare = _steady(n, args, tills_on=True, store="bare") if args.baseline else None
    memory = _steady(n, args, tills_on=True, store="memory") if args.redis else None
    floor, floor_client = _redis_floor(args, 10_000 if quick else 40_000) \
        if args.redis else (None, None)
    bare_rate = bare["rate"] if bare else None
    out = {
        "sent": k, "acked": len(acked), "delivered_unique": len(seen & set(range(k))),
        "lost": lost, "duplicates_suppressed": suppressed, "reordered": reordered,
        "processed_twice": dup_processed, "durable_msgs_per_s": round(rate),
        "stored_only_msgs_per_s": round(stored_only),
        "bare_relay_msgs_per_s": round(bare_rate) if bare else None,
        "durable_vs_bare": round(rate / bare_rate, 3) if bare and args.steady_tills else None,
        "steady_sent": args.steady, "steady_delivered": steady["delivered"],
        "bare_relay_delivered": bare["delivered"] if bare else None,
        "till_crashes": crashes, "terminals": n, "steady_tills": args.steady_tills,
        "store": store, "steady_cpu_s": steady["cpu"], "quick": quick,
    }
    if args.redis:
        results = args.steady * args.rounds
        ceiling = _ceiling(sqlite["cpu"], memory["cpu"]["server"], floor, floor_client,
                           _memory_store_us(10_000 if quick else 50_000), args.steady, results)
        out.update({
            "sqlite_durable_msgs_per_s": round(sqlite["rate"]),
            "redis_vs_sqlite": round(statistics.median(ratios), 3),
            "redis_vs_sqlite_rounds": [round(r, 3) for r in ratios],
            "rounds": args.rounds,
            "sqlite_steady_delivered": sqlite["delivered"],
            "sqlite_steady_cpu_s": sqlite["cpu"],
            "workers": args.workers, "appendfsync": args.appendfsync,
            "killed_worker": killed_worker,
            # CPU microseconds per result in the steady phase with tills
            # (over every round)
            "workers_us_per_result": _per_result(steady["cpu"]["server"], results),
            "redis_server_us_per_result": _per_result(steady["cpu"]["redis"], results),
            "sqlite_server_us_per_result": _per_result(sqlite["cpu"]["server"], results),
            "redis_floor_us_per_result": round(floor, 1),
            **ceiling,
        })
    return out
