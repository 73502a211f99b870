"""Command line: ``python -m fuzz {list,build,run,replay} ...`` (see fuzz/README.md)."""

from __future__ import annotations

import argparse
import sys
import time

from . import build, targets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz",
                                     description="Coverage-guided fuzzing of Tillwire's native core.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the targets")
    p = sub.add_parser("build", help="build the instrumented core into build/fuzz")
    p.add_argument("--force", action="store_true")
    p.add_argument("--lz4", action="store_true", help="and lz4, for the lz4 target")
    p = sub.add_parser("run", help="fuzz targets, each for a bounded time")
    p.add_argument("target", choices=[*targets.TARGETS, "all"])
    p.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    p.add_argument("--runs", type=int, default=None, help="at most this many inputs per target")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lz4", action="store_true",
                   help="the lz4 target on an instrumented lz4 too (built on first use)")
    p.add_argument("--known-off", action="append", default=[],
                   help="treat this known finding (fuzz/known.py) as a new one")
    p.add_argument("--engine", choices=["atheris", "hypothesis"], default="atheris",
                   help="hypothesis: the fallback, on the normal build, no coverage guidance")
    p = sub.add_parser("replay", help="run saved inputs through a target (normal build)")
    p.add_argument("target", choices=targets.TARGETS)
    p.add_argument("paths", nargs="+")
    p.add_argument("--known-off", action="append", default=[],
                   help="let this known finding fail (fuzz/known.py)")
    p.add_argument("--instrumented", action="store_true",
                   help="on the instrumented build under ASan, in a worker (a native crash's report)")
    args = parser.parse_args(argv)

    if args.command == "list":
        for name, t in targets.TARGETS.items():
            print(f"{name:10} fuzz/{t.module}.py {t.function}()  max_len {t.max_len}  "
                  f"native {', '.join(t.native)}")
        return 0
    if args.command == "build":
        started = time.monotonic()
        try:
            core = build.ensure(force=args.force, log=print)
            if args.lz4:
                print(f"fuzz: instrumented lz4 in {build.ensure_lz4(force=args.force, log=print)}")
        except build.Unavailable as exc:
            print(f"fuzz: unavailable: {exc}", file=sys.stderr)
            return 2
        print(f"fuzz: instrumented core in {core} ({time.monotonic() - started:.1f} s)")
        return 0
    if args.command == "replay" and args.instrumented:
        from .run import replay_instrumented

        return replay_instrumented(args.target, args.paths)
    if args.command == "replay":
        from .run import replay

        failed = replay(args.target, args.paths, known_off=args.known_off)
        for path, tb in failed:
            print(f"FAILED {path}\n{tb}", file=sys.stderr)
        print(f"fuzz replay {args.target}: {len(args.paths) - len(failed)} passed, "
              f"{len(failed)} failed")
        return 1 if failed else 0

    from .run import DEFAULT_RUNS, describe, replay, run

    names = list(targets.TARGETS) if args.target == "all" else [args.target]
    found = 0
    if args.engine == "hypothesis":
        from . import known
        from .fallback import run_hypothesis

        for name in names:
            with known.disabled(*args.known_off):
                count, path = run_hypothesis(name, args.seconds)
            print(f"{name}: {count} inputs under hypothesis, findings {int(path is not None)}",
                  flush=True)
            if path is not None:
                found += 1
                print(describe(path, name))
                for _, tb in replay(name, [path], known_off=args.known_off):
                    print(tb, flush=True)
        return 1 if found else 0
    for name in names:
        try:
            result = run(name, args.seconds, runs=args.runs or DEFAULT_RUNS, seed=args.seed,
                         lz4=args.lz4, known_off=args.known_off)
        except build.Unavailable as exc:
            print(f"fuzz: unavailable: {exc}", file=sys.stderr)
            return 2
        print(result.summary(), flush=True)
        for path in result.findings:
            found += 1
            print(describe(path, name), flush=True)
        if result.findings:
            print(result.report, flush=True)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
