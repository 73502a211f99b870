"""The fallback engine: the same targets under hypothesis, on the normal build.

Used where the instrumented build cannot be had (no clang, no atheris):
no coverage guidance, no sanitizer, but the same targets and invariants on
random inputs and on seed inputs with a few bytes spliced in.  Bounded by
time: rounds of 200 examples until ``seconds`` have passed.  A failing
input is shrunk by hypothesis and saved in build/fuzz/findings/<target>/
like libFuzzer's.
"""

from __future__ import annotations

import hashlib
import time

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from . import known, run, targets


def run_hypothesis(target: str, seconds: float):
    """(inputs run, path of the saved failing input or None)."""
    one = targets.load(target)
    seeds = [p.read_bytes() for p in run.inputs(run.SEEDS / target)] or [b""]
    spliced = st.tuples(st.sampled_from(seeds), st.integers(0, 4096), st.binary(max_size=8)).map(
        lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + len(t[2]):])
    failing = []
    count = 0

    @settings(max_examples=200, deadline=None, database=None, derandomize=False,
              phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    @given(data=st.one_of(spliced, st.binary(max_size=targets.max_len(target))))
    def fuzz(data):
        nonlocal count
        count += 1
        try:
            one(data)
        except known.Known:
            pass
        except Exception:
            failing.append(data)
            raise

    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            fuzz()
    except Exception:                       # noqa: BLE001 - hypothesis re-raised the finding
        smallest = min(failing, key=len)
        out = run.FINDINGS / target
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"hypothesis-{hashlib.sha1(smallest).hexdigest()}"
        path.write_bytes(smallest)
        return count, path
    return count, None
