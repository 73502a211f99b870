"""Fuzzing the native core (fuzz/): a bounded run, and the saved inputs replayed.

* ``test_fuzz_run_finds_nothing`` (slow): every target of fuzz/targets.py
  under atheris on the instrumented build (clang, -fsanitize=address,
  fuzzer-no-link; fuzz/build.py), two at a time, for FUZZ_SECONDS in all
  (default 60, split evenly; not TILLWIRE_* names: the config loader
  refuses unknown ones).  A failing input is saved in
  build/fuzz/findings/<target>/ and printed in hex, to be kept in
  fuzz/crashes/<target>/.  When the instrumented build cannot be had (no
  clang, no atheris) the same targets run under hypothesis on the normal
  build instead (fuzz/fallback.py), with a warning saying why.
  FUZZ_REQUIRE=1 makes that a failure, FUZZ_ENGINE=hypothesis asks for the
  fallback, FUZZ_LZ4=1 builds lz4 instrumented too for the lz4 target (a
  minute more).
* ``test_saved_inputs_replay_clean``: the seed corpus and every input in
  fuzz/crashes/<target>/ replayed on the normal build in a subprocess (a
  native crash must not take pytest with it), bounded in time: a clean
  ProtocolError or CLOSE, never another exception, never a hang.
* ``test_known_findings_still_happen``: each finding of fuzz/known.py that
  is reported and not fixed yet still happens with its saved input, and
  the target's filter for it holds; once fixed the test says what to move.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import subprocess
import sys
import warnings

import pytest

from support import NO_EXTENSIONS

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fuzz import build, known, run, targets  # noqa: E402

pytestmark = pytest.mark.skipif(
    NO_EXTENSIONS, reason="TILLWIRE_NO_EXTENSIONS=1: the native modules are deliberately not built")

TOTAL_SECONDS = int(os.environ.get("FUZZ_SECONDS", "60"))
REQUIRE = os.environ.get("FUZZ_REQUIRE") == "1"
ENGINE = os.environ.get("FUZZ_ENGINE", "atheris")
LZ4 = os.environ.get("FUZZ_LZ4") == "1"       # the lz4 target on an instrumented lz4 too
PARALLEL = 2                # the machine's cores: two workers at a time


class FuzzFallbackWarning(UserWarning):
    """The instrumented build was not available; hypothesis ran instead."""


def _replay(target: str, paths, *extra, timeout: float = 120.0):
    return subprocess.run([sys.executable, "-m", "fuzz", "replay", target, *map(str, paths),
                           *extra], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- the bounded run


def _hypothesis_run(target: str, seconds: int) -> str:
    """The fallback engine (fuzz/fallback.py) in a subprocess; its output,
    which names and shows a failing input."""
    proc = subprocess.run([sys.executable, "-m", "fuzz", "run", target, "--engine", "hypothesis",
                           "--seconds", str(seconds)], cwd=ROOT, capture_output=True, text=True,
                          timeout=seconds + 600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{target} under hypothesis:\n{out}"
    return out.strip()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_fuzz_run_finds_nothing():
    names = list(targets.TARGETS)
    seconds = max(1, TOTAL_SECONDS // len(names))
    try:
        if ENGINE == "hypothesis":
            raise build.Unavailable("FUZZ_ENGINE=hypothesis")
        build.ensure(log=print)
    except build.Unavailable as exc:
        if REQUIRE:
            pytest.fail(f"FUZZ_REQUIRE=1 and the instrumented build is unavailable: {exc}")
        if ENGINE != "hypothesis":
            warnings.warn(FuzzFallbackWarning(f"instrumented fuzzing unavailable, hypothesis "
                                              f"ran instead: {exc}"))
        with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
            for out in pool.map(lambda name: _hypothesis_run(name, seconds), names):
                print(out)
        return
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(lambda name: run.run(name, seconds, lz4=LZ4, log=print), names))
    report = []
    for result in results:
        print(result.summary())
        report += [run.describe(p, result.target) for p in result.findings]
        if result.findings:
            report.append(f"{result.report}\n(whole log: {result.log})")
        assert result.runs > 0, f"{result.target} ran no input: see {result.log}"
    assert not report, "the fuzzer found failing inputs:\n" + "\n".join(report)


# ---------------------------------------------------------------- saved inputs


@pytest.mark.parametrize("target", list(targets.TARGETS))
def test_saved_inputs_replay_clean(target):
    paths = run.inputs(run.SEEDS / target) + run.inputs(run.CRASHES / target)
    assert paths, f"no seed corpus in {run.SEEDS / target}"
    proc = _replay(target, paths)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert f"{len(paths)} passed, 0 failed" in proc.stdout


def test_known_findings_still_happen():
    """Every finding fuzz/known.py lists (reported, not fixed yet) has its
    input in fuzz/known/ and still happens; no input there lacks an entry."""
    inputs = {p.name for p in run.KNOWN.iterdir() if p.is_file() and p.suffix != ".md"}
    assert inputs == set(known.ISSUES), "fuzz/known/ and fuzz/known.py disagree"
    for name, (target, what) in sorted(known.ISSUES.items()):
        path = run.KNOWN / name
        # The target's filter holds: a fuzz run would pass over it...
        proc = _replay(target, [path])
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
        # ...and without it the finding is still there.
        proc = _replay(target, [path], "--known-off", name)
        assert proc.returncode == 1 and "AssertionError" in proc.stderr, (
            f"{name} no longer happens ({what}).  If it was fixed: move {path} to "
            f"fuzz/crashes/{target}/ and delete the entry in fuzz/known.py and its check in "
            f"the target.\n{proc.stdout}\n{proc.stderr}")
