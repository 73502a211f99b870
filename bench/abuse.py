"""``python -m bench abuse``: what attackers cost the tills that keep paying.

Fifty good tills (``--tills``) take a P0 ``payment.result`` each every
100 ms from a payment backend and ack each at once; that load runs in one
process (``bench.abuse_load``) for the whole run and measures each result
from the backend's write to the till's read.  The server runs in its own
process with its embedded defaults (SQLite store) and the admin API on.
Then, one attack class at a time, each in a process of its own
(``bench.abuse_attacks``, at nice 10 by default so its CPU competes less
with the server's on the shared cores: real attackers use their own
machines), a case runs:

1. baseline: ``--baseline`` seconds (5; quick 2) of the good load alone,
   right before the attack (so each attack has its own baseline, taken at
   the same moment of this noisy machine);
2. attack: ``--attack`` seconds (10; quick 3; slowloris 12, past the 10 s
   auth timeout, so that the server is seen closing the first ones) at the
   attack's fixed rate, bounded in time and in count (rate x seconds), after
   which the attacker closes everything it opened;
3. settle: ``--settle`` seconds (2; quick 1), and on until the server holds
   no more open files than before the attack (at most 20 s more: what an
   attack left behind is not charged to the next case), then the server's
   RSS again.

The attacks (each from its own loopback address; rates are offered rates:
what the server does not read is counted as blocked, never queued):

=================  =======================================================================
garbage            100 connections/s, 1 KiB of random bytes each, held up to 2 s
frames             100 connections/s: a length prefix announcing ~1 MiB before HELLO (and
                   64 KiB of it), a HELLO cut off after 100 of its 4,000 bytes then silence,
                   in turn; every 10th logs in and sends 256 KiB of a 1 MiB SEND, then silence
bombs              4 connections x 100 SENDs/s whose ~4 KiB compressed payload expands to
                   1 MiB (PROTOCOL.md section 13)
slowloris          50 connections/s, each trickling 1 byte/s of a 4,000-byte HELLO
bad_token          200 connections/s from 16 addresses, a HELLO with an invalid token each
send_flood         2 pos connections x 2,000 P1 SENDs/s (ticket.open and x.note in turn);
                   one reads its answers, the other never reads
ping_flood         4 connections x 5,000 PINGs/s with 1 KiB payloads, never reading
subscribe_flood    10 pos connections x 100 SUBSCRIBEs/s to random topics (P2 and P3),
                   UNSUBSCRIBing each 80
churn              100 connections/s: HELLO + RESUME with a valid token, then close
bodies             4 pos connections x 100 SENDs/s of pathological bodies (64 KiB of ones
                   with one non-ASCII character, one byte over the limit, nesting 10,000
                   deep, thousands of 13-19 digit runs, card numbers in disguises, ...)
admin              127 requests/s to the admin API: bad bearer tokens, publishes nested
                   5,000 deep, ~900 KiB and 2 MiB publishes, /v1/channels pages,
                   /v1/messages/<id> probes
=================  =======================================================================

Per case: the good tills' p50/p99 in the baseline and in the attack, their
ratio, whether the attack p99 met the target max(2 x baseline p99,
baseline p99 + 10 ms), the server's RSS (VmRSS of its main process) and
open files before the attack, at their peak during it (read every 0.1 s),
right after it and after settling, how long settling took, what the good tills and the
payer saw go wrong (ERROR, CLOSE, lost connections), the results sent,
acked and lost in each phase, whether the server crashed (it is restarted
and the run goes on), error lines in its log, and the attacker's own
account (what it sent, what was blocked, what the server answered).

Keys: ``cases`` (the per-case figures), ``server_crashes``, ``worst_case``
(the case whose attack p99 is the highest multiple of its own baseline
p99), ``good_p99_ms_baseline`` and ``good_p99_ms_worst`` (that case's
baseline and attack p99), ``abuse_ratio`` (their ratio),
``rss_growth_mb_max`` (the largest growth, before the attack to after
settling, of any case), ``rss_peak_growth_mb_max`` (the same to the peak
during the attack), ``lost`` (payment results the backend got a
SENDACK for that never reached their till, after a grace period at the
end), ``targets_met`` (how many cases met the p99 target).  Targets
(measured, never asserted): no crash, nothing lost, every case within its
p99 target, growth at most 100 MB.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time

import orjson

from .common import SECRET, Server, Worker, free_port, rss_bytes

TENANT = "ab"
CASES = ("garbage", "frames", "bombs", "slowloris", "bad_token", "send_flood", "ping_flood",
         "subscribe_flood", "churn", "bodies", "admin")
MB = 1024 * 1024
SETTLE_MAX = 20.0     # seconds a case waits at most for the server's open files to come back


class Proc(Worker):
    """A ``python -m <module> <args...> '<json params>'`` subprocess spoken to
    in JSON lines (``common.Worker`` for the modules of this benchmark),
    optionally at a lower priority."""

    def __init__(self, module: str, *args: str, nice: int = 0, **params) -> None:
        cmd = [sys.executable, "-m", module, *args, orjson.dumps(params).decode()]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**os.environ, "TILLWIRE_SECRET": SECRET},
            preexec_fn=(lambda: os.nice(nice)) if nice else None)
        self.role = " ".join((module, *args))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _alive(server: Server) -> bool:
    return server.proc is not None and server.proc.poll() is None


def _log_problems(server: Server, start: int) -> tuple[int, list[str]]:
    """(lines at level error or with an exception written since byte ``start``
    of the server's log, the first few of them)."""
    path = os.path.join(server.dir, "server.log")
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", "replace")
    bad = [line for line in text.splitlines()
           if "level=error" in line or "level=critical" in line or "Traceback" in line
           or ' exc="' in line]
    return len(bad), [line[:400] for line in bad[:3]]


def _log_size(server: Server) -> int:
    return os.path.getsize(os.path.join(server.dir, "server.log"))


def _target(base: float | None) -> float | None:
    return None if base is None else max(2 * base, base + 10.0)


def _snapshot(server: Server) -> dict:
    """The server's RSS (bytes), open file descriptors and CPU seconds now
    (None once it is gone)."""
    if _alive(server):
        try:
            pid = server.pid
            return {"rss": rss_bytes(pid), "fds": _fds(pid), "cpu": _cpu_seconds(pid),
                    "t": time.monotonic()}
        except (OSError, RuntimeError, ValueError, IndexError):
            pass            # (it died between the two looks)
    return {"rss": None, "fds": None, "cpu": None, "t": time.monotonic()}


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / MB, 1)


def _cpu_pct(a: dict, b: dict) -> float | None:
    if a["cpu"] is None or b["cpu"] is None:
        return None
    return round(100 * (b["cpu"] - a["cpu"]) / (b["t"] - a["t"]), 1)


def _case(name: str, server: Server, args, admin: tuple[int, str]) -> dict:
    """Run one case (baseline, attack, settle); the good tills' figures come later.
    A server found dead at the end is restarted (``server_crashed``)."""
    seconds = args.slowloris if name == "slowloris" and args.slowloris else args.attack
    attacker = Proc("bench.abuse_attacks", name, nice=args.nice, tenant=TENANT,
                    port=server.port, admin_port=admin[0], admin_token=admin[1],
                    **args.overrides.get(name, {}))
    try:
        info = attacker.recv(60)
        log_start = _log_size(server)
        start = _snapshot(server)
        time.sleep(args.baseline)
        before = _snapshot(server)
        attacker.send(cmd="go", seconds=seconds)
        t_a0 = time.monotonic()
        peak = dict(before)
        while True:           # (the server's peaks, read every 0.1 s until the report)
            try:
                report = attacker.recv(0.1)
                break
            except TimeoutError:
                if time.monotonic() - t_a0 > seconds + 120:
                    raise
                now = _snapshot(server)
                for key in ("rss", "fds"):
                    if now[key] is not None and (peak[key] is None or now[key] > peak[key]):
                        peak[key] = now[key]
        after = _snapshot(server)
    finally:
        attacker.close()
    # Settle: --settle seconds, then until the server holds no more open
    # files than before the attack (at most SETTLE_MAX s more), so that what
    # an attack left behind is not charged to the next case's baseline.
    time.sleep(args.settle)
    settled = _snapshot(server)
    while (settled["fds"] is not None and before["fds"] is not None
           and settled["fds"] > before["fds"] and settled["t"] - after["t"] < SETTLE_MAX):
        time.sleep(0.25)
        settled = _snapshot(server)
    crashed = not _alive(server)
    errors, first_errors = _log_problems(server, log_start)
    crash_log = None
    if crashed:
        crash_log = server.tail()
        server.stop()
        server.start()
    for key in ("t0", "t_attack_end", "t_end", "ready", *info):
        report.pop(key, None)
    bound_count = int(info["rate"] * seconds)
    growth = (None if settled["rss"] is None or before["rss"] is None
              else settled["rss"] - before["rss"])
    return {
        "name": name,
        "rate": info["rate"],                      # items/s offered, all connections
        **{k: info[k] for k in ("rate_per_connection", "connections", "mix") if k in info},
        "what": info["unit"],
        "bound": f"{seconds:g} s and at most {bound_count:,} items "
                 f"({info['rate']:g}/s x {seconds:g} s)",
        "windows": {"baseline": [start["t"], before["t"]], "attack": [t_a0, after["t"]]},
        "attack_seconds": round(after["t"] - t_a0, 2),
        "settle_seconds": round(settled["t"] - after["t"], 2),
        "server_cpu_pct_baseline": _cpu_pct(start, before),
        "server_cpu_pct_attack": _cpu_pct(before, after),
        "rss_before_mb": _mb(before["rss"]),
        "rss_peak_mb": _mb(peak["rss"]),
        "rss_after_attack_mb": _mb(after["rss"]),
        "rss_after_settle_mb": _mb(settled["rss"]),
        "rss_growth_mb": _mb(growth),
        "server_fds_before": before["fds"],
        "server_fds_peak": peak["fds"],
        "server_fds_after_attack": after["fds"],
        "server_fds_after_settle": settled["fds"],
        "server_crashed": crashed,
        "server_log_errors": errors,
        "server_log_first_errors": first_errors,
        "crash_log_tail": crash_log,
        "attacker": report,
    }


def _good(case: dict, figures: dict) -> None:
    """Put the good tills' figures of ``case``'s two windows into it."""
    base, attack = figures["baseline"], figures["attack"]
    b99, a99 = base["p99_ms"], attack["p99_ms"]
    target = _target(b99)
    case.update({
        "good_p50_ms_baseline": base["p50_ms"], "good_p99_ms_baseline": b99,
        "good_p50_ms_attack": attack["p50_ms"], "good_p99_ms_attack": a99,
        "good_max_ms_attack": attack["max_ms"],
        "ratio": round(a99 / b99, 2) if a99 is not None and b99 else None,
        "target_p99_ms": round(target, 2) if target is not None else None,
        "met": a99 is not None and target is not None and a99 <= target,
        "good_errors": {"baseline": base["errors"], "attack": attack["errors"]},
        "results": {phase: {k: figures[phase][k]
                            for k in ("sent", "acked", "delivered", "lost", "unacked")}
                    for phase in ("baseline", "attack")},
    })


def _line(case: dict) -> str:
    return (f"{case['name']:<16} baseline p50/p99 {case['good_p50_ms_baseline']}/"
            f"{case['good_p99_ms_baseline']} ms, attack {case['good_p50_ms_attack']}/"
            f"{case['good_p99_ms_attack']} ms (x{case['ratio']}, target "
            f"{case['target_p99_ms']}: {'met' if case['met'] else 'NOT met'}); RSS "
            f"{case['rss_before_mb']} -> peak {case['rss_peak_mb']} -> "
            f"{case['rss_after_settle_mb']} MB; open files {case['server_fds_before']} -> peak "
            f"{case['server_fds_peak']} -> {case['server_fds_after_settle']} "
            f"(settled in {case['settle_seconds']} s); server CPU "
            f"{case['server_cpu_pct_baseline']}% -> {case['server_cpu_pct_attack']}%"
            + ("; SERVER CRASHED" if case["server_crashed"] else "")
            + (f"; {case['server_log_errors']} error lines in the server log"
               if case["server_log_errors"] else ""))


def run(quick: bool = False, argv=()) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench abuse")
    parser.add_argument("--tills", type=int, default=50, help="good tills")
    parser.add_argument("--period", type=float, default=0.1,
                        help="seconds between two payment results to one till")
    parser.add_argument("--baseline", type=float, default=2.0 if quick else 5.0,
                        help="seconds of the baseline right before each attack")
    parser.add_argument("--attack", type=float, default=3.0 if quick else 10.0,
                        help="seconds of each attack")
    parser.add_argument("--slowloris", type=float, default=None if quick else 12.0,
                        help="seconds of the slowloris attack (default: 12, past the 10 s auth "
                             "timeout, so the server's closing them is seen; quick: --attack)")
    parser.add_argument("--settle", type=float, default=1.0 if quick else 2.0,
                        help="seconds after each attack before the RSS is read again (and on "
                             "until the server's open files are back, at most 20 s more)")
    parser.add_argument("--grace", type=float, default=15.0,
                        help="most seconds to wait at the end for acked results to arrive")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--set", action="append", default=[], metavar="CASE.KEY=N",
                        help="change an attack's rate (per connection) or its connections, "
                             "e.g. --set bombs.rate=50 --set bombs.conns=1")
    parser.add_argument("--nice", type=int, default=10,
                        help="niceness of the attacker processes (0: as the server)")
    args = parser.parse_args(list(argv))
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown cases: {', '.join(unknown)}")
    args.overrides = {}
    for item in args.set:
        target, _, value = item.partition("=")
        case, _, key = target.partition(".")
        if case not in CASES or key not in ("rate", "conns") or not value:
            parser.error(f"--set {item}: expected CASE.rate=N or CASE.conns=N")
        args.overrides.setdefault(case, {})[key] = float(value) if key == "rate" else int(value)

    started = time.monotonic()
    admin = (free_port(), secrets.token_urlsafe(24))
    server = Server(env={"TILLWIRE_ADMIN_TOKEN": admin[1]},
                    args=["--admin-port", str(admin[0])]).start()
    load = None
    cases: list[dict] = []
    crashes = 0
    try:
        load = Proc("bench.abuse_load", tenant=TENANT, port=server.port, tills=args.tills,
                    period=args.period)
        hello = load.recv(120)
        print(f"{hello['connected'] - 1} good tills and their payer connected in "
              f"{hello['seconds']:.2f} s; server RSS {rss_bytes(server.pid) / MB:.1f} MB",
              flush=True)
        load.send(cmd="start")
        load.recv(30)
        time.sleep(1.0)           # (the first results warm the server's paths up)
        for name in names:
            case = _case(name, server, args, admin)
            crashes += case["server_crashed"]
            load.send(cmd="window", windows=[[w, *case["windows"][w]]
                                             for w in ("baseline", "attack")])
            _good(case, load.recv(60))
            print(_line(case), flush=True)
            cases.append(case)
        load.send(cmd="stop")
        load.recv(30)
        deadline = time.monotonic() + args.grace
        while True:
            load.send(cmd="totals")
            totals = load.recv(30)
            settled = totals["lost"] == 0 and totals["acked"] == totals["sent"]
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        load.send(cmd="window", final=True,
                  windows=[[f"{c['name']}/{w}", *c["windows"][w]]
                           for c in cases for w in ("baseline", "attack")])
        final = load.recv(120)
        for case in cases:
            _good(case, {w: final[f"{case['name']}/{w}"] for w in ("baseline", "attack")})
        rss_end = _snapshot(server)["rss"]
        log_errors, first = _log_problems(server, 0)
    finally:
        if load is not None:
            try:
                load.send(cmd="quit")
            except OSError:
                pass
            load.close()
        server.stop()

    for case in cases:
        del case["windows"]
    rated = [c for c in cases if c["ratio"] is not None]
    worst = max(rated, key=lambda c: c["ratio"]) if rated else None
    growth = [c["rss_growth_mb"] for c in cases if c["rss_growth_mb"] is not None]
    peaks = [c["rss_peak_mb"] - c["rss_before_mb"] for c in cases
             if c["rss_peak_mb"] is not None and c["rss_before_mb"] is not None]
    print(f"totals: {totals['sent']} results sent, {totals['acked']} acked, "
          f"{totals['delivered']} delivered, {totals['lost']} lost (acked, not delivered), "
          f"{totals['sent'] - totals['acked']} never acked, {totals['skipped']} "
          f"skipped while the payer was disconnected; {crashes} server crashes; "
          f"{log_errors} error lines in the server log; "
          f"{time.monotonic() - started:.0f} s", flush=True)
    return {
        "cases": cases,
        "server_crashes": crashes,
        "worst_case": worst["name"] if worst else None,
        "good_p99_ms_baseline": worst["good_p99_ms_baseline"] if worst else None,
        "good_p99_ms_worst": worst["good_p99_ms_attack"] if worst else None,
        "abuse_ratio": worst["ratio"] if worst else None,
        "rss_growth_mb_max": max(growth) if growth else None,
        "rss_peak_growth_mb_max": round(max(peaks), 1) if peaks else None,
        "lost": totals["lost"],
        "targets_met": sum(1 for c in cases if c["met"]),
        "cases_run": len(cases),
        "slowloris_s": args.slowloris or args.attack,
        "results_sent": totals["sent"], "results_acked": totals["acked"],
        "results_unacked": totals["sent"] - totals["acked"],
        "results_delivered": totals["delivered"], "results_skipped": totals["skipped"],
        "server_rss_end_mb": _mb(rss_end),
        "server_log_errors": log_errors, "server_log_first_errors": first,
        "tills": args.tills, "period_s": args.period, "baseline_s": args.baseline,
        "attack_s": args.attack, "settle_s": args.settle, "attacker_nice": args.nice,
        "seconds": round(time.monotonic() - started, 1), "quick": quick,
    }
