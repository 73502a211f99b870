"""Command line of the benchmarks (see bench/__init__.py)."""

from __future__ import annotations

import argparse
import importlib
import sys

import orjson

BENCHMARKS = {
    "abuse": "bench.abuse",
    "codec": "bench.codec",
    "fanout": "bench.fanout",
    "lanes": "bench.lanes",
    "reliability": "bench.reliability",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench",
                                     description="Run a Tillwire benchmark.")
    parser.add_argument("name", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--quick", action="store_true", help="small run (smoke test)")
    parser.add_argument("--json", action="store_true",
                        help="end with one JSON line of results (always done; kept for clarity)")
    args, rest = parser.parse_known_args(argv)
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    results = {}
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        print(f"== {name}{' (quick)' if args.quick else ''}", flush=True)
        results[name] = module.run(quick=args.quick, argv=rest)
    out = results[names[0]] if len(names) == 1 else results
    sys.stdout.write(orjson.dumps(out).decode() + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
