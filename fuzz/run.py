"""Running a target for a bounded time, and replaying saved inputs.

``run(target, seconds)`` starts ``fuzz.worker`` under the instrumented
build, bounded three ways: libFuzzer's ``-max_total_time`` and ``-runs``,
and a hard subprocess timeout a little past them.  Its corpus grows in
build/fuzz/corpus/<target> (seeded from fuzz/corpus/<target>, which is
never written); an input that fails is written by libFuzzer to
build/fuzz/findings/<target>/ and listed in the result, which also carries
the run's statistics parsed from libFuzzer's output (kept in
build/fuzz/logs/<target>.log).

``replay(target, paths)`` runs saved inputs through a target in this
process, on whatever build ``tillwire.core`` imports (the normal one in
the tests).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import subprocess
import sys
import time
import traceback

from . import build, targets

ROOT = build.ROOT
SEEDS = ROOT / "fuzz" / "corpus"
CRASHES = ROOT / "fuzz" / "crashes"
KNOWN = ROOT / "fuzz" / "known"
WORK = build.OUT / "corpus"
FINDINGS = build.OUT / "findings"
LOGS = build.OUT / "logs"
DEFAULT_RUNS = 50_000_000
INPUT_TIMEOUT = 10          # seconds one input may take before libFuzzer calls it a hang
_FINDING_PREFIXES = ("crash-", "timeout-", "oom-", "leak-")


@dataclasses.dataclass
class Result:
    target: str
    seconds: float              # wall time of the worker
    runs: int                   # inputs executed
    execs_per_sec: int
    coverage: int               # libFuzzer's "cov": native edges reached
    features: int               # its "ft"
    corpus: int                 # inputs in the corpus at the end
    findings: list              # paths of inputs that failed
    returncode: int
    log: pathlib.Path
    report: str                 # the log from the first error on (a traceback, ASan's report)

    def summary(self) -> str:
        return (f"{self.target}: {self.runs} runs in {self.seconds:.1f} s "
                f"({self.execs_per_sec}/s), cov {self.coverage}, ft {self.features}, "
                f"corpus {self.corpus}, findings {len(self.findings)}")


_ERROR_MARKS = ("=== Uncaught Python exception", "ERROR: AddressSanitizer", "ERROR: libFuzzer",
                "ALARM: working on the last Unit", "==ERROR:")


def _report(text: str, lines: int = 60) -> str:
    """The log from the first error marker on, at most ``lines`` lines."""
    starts = [i for i in (text.find(m) for m in _ERROR_MARKS) if i >= 0]
    if not starts:
        return ""
    return "\n".join(text[min(starts):].splitlines()[:lines])


def _stat(text: str, name: str) -> int:
    m = re.search(rf"stat::{name}:\s*(\d+)", text)
    return int(m.group(1)) if m else 0


def _progress(text: str) -> tuple[int, int, int]:
    """(cov, ft, corpus units) of libFuzzer's last progress line."""
    found = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)/", text)
    return tuple(int(v) for v in found[-1]) if found else (0, 0, 0)


def run(target: str, seconds: int, *, runs: int = DEFAULT_RUNS, seed: int | None = None,
        lz4: bool = False, known_off=(), log=print) -> Result:
    """Fuzz ``target`` for at most ``seconds`` and ``runs`` inputs (raises
    build.Unavailable when the instrumented build cannot be had).  ``lz4``:
    the ``lz4`` target runs on an instrumented lz4 too (build.ensure_lz4);
    ``known_off``: findings of fuzz/known.py to treat as new ones."""
    core = build.ensure(log=log)
    extra = ["--lz4", str(build.ensure_lz4(log=log))] if lz4 and target == "lz4" else []
    work, findings, seeds = WORK / target, FINDINGS / target, SEEDS / target
    for d in (work, findings, LOGS):
        d.mkdir(parents=True, exist_ok=True)
    before = set(findings.iterdir())
    flags = [f"-max_total_time={seconds}", f"-runs={runs}", f"-timeout={INPUT_TIMEOUT}",
             "-rss_limit_mb=2048", f"-max_len={targets.max_len(target)}", "-detect_leaks=0",
             "-print_final_stats=1", f"-artifact_prefix={findings}/"]
    if seed is not None:
        flags.append(f"-seed={seed}")
    dirs = [str(work)] + ([str(seeds)] if seeds.is_dir() else [])
    cmd = [sys.executable, "-m", "fuzz.worker", target, str(core), *extra, *flags, *dirs]
    logfile = LOGS / f"{target}.log"
    started = time.monotonic()
    with open(logfile, "w") as out:
        try:
            env = build.environment(python_malloc=targets.TARGETS[target].pymem_buffers)
            env["FUZZ_KNOWN_OFF"] = ",".join(known_off)
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=seconds + 120)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = -9
    elapsed = time.monotonic() - started
    text = logfile.read_text(errors="replace")
    new = sorted(p for p in set(findings.iterdir()) - before
                 if p.name.startswith(_FINDING_PREFIXES))
    if rc != 0 and not new:
        raise RuntimeError(f"fuzz worker for {target} exited with {rc} and saved no input; "
                           f"log {logfile}:\n{text[-3000:]}")
    cov, ft, corp = _progress(text)
    return Result(target, elapsed, _stat(text, "number_of_executed_units"),
                  _stat(text, "average_exec_per_sec"), cov, ft, corp, new, rc, logfile,
                  _report(text) if new else "")


def describe(path: pathlib.Path, target: str, limit: int = 1024) -> str:
    """How a failing input looks, and how to keep it as a regression test."""
    data = path.read_bytes()
    shown = data[:limit].hex() + ("..." if len(data) > limit else "")
    return (f"{path} ({len(data)} bytes): {shown}\n"
            f"  keep it as a regression test: cp {path} fuzz/crashes/{target}/<what-it-is>\n"
            f"  replay it: python -m fuzz replay {target} {path}")


def inputs(directory: pathlib.Path) -> list:
    """Saved inputs in a directory (notes and hidden files aside)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix != ".md")


def replay(target: str, paths, *, known_off=()) -> list:
    """Run saved inputs through ``target`` here; return (path, traceback) of
    each that failed (a known finding counts as passing unless it is in
    ``known_off``)."""
    from . import known

    one = targets.load(target)
    failed = []
    with known.disabled(*known_off):
        for path in paths:
            try:
                one(pathlib.Path(path).read_bytes())
            except known.Known:
                pass
            except Exception:                   # noqa: BLE001 - every failure is reported
                failed.append((str(path), traceback.format_exc()))
    return failed


def replay_instrumented(target: str, paths) -> int:
    """Run saved inputs once each in a worker on the instrumented build
    (libFuzzer runs files given instead of directories); its output,
    ASan's report included, goes to this process's; returns its exit code."""
    core = build.ensure()
    cmd = [sys.executable, "-m", "fuzz.worker", target, str(core), f"-timeout={INPUT_TIMEOUT}",
           "-detect_leaks=0", *map(str, paths)]
    return subprocess.run(cmd, cwd=ROOT, env=build.environment(), timeout=600).returncode
