"""Findings that are reported and not fixed yet.

A target that meets one of these stops the input there (``Known`` is caught
by the worker and by ``replay``), so a fuzz run keeps looking for new
findings instead of finding the same one again every second.  Each entry
has its saved input in fuzz/known/<name>; tests/test_fuzz.py replays it
with the entry switched off and requires the finding to still happen.
Once the code is fixed that test fails: then move the input to
fuzz/crashes/<target>/ (a plain regression test from then on) and delete
the entry here and the check in the target.
"""

from __future__ import annotations

import contextlib
import os

# name -> (target, what goes wrong)
ISSUES: dict[str, tuple[str, str]] = {}

# Entries switched off (``disabled``; in a worker, FUZZ_KNOWN_OFF=a,b from
# ``python -m fuzz run --known-off``, to see whether a fix holds).
_disabled: set[str] = {n for n in os.environ.get("FUZZ_KNOWN_OFF", "").split(",") if n}


class Known(Exception):
    """A target met a known finding (``args[0]`` is its name)."""


def check(name: str, happened: bool) -> None:
    """Raise Known when ``happened`` and the entry is on."""
    if happened and name not in _disabled:
        raise Known(name)


@contextlib.contextmanager
def disabled(*names: str):
    """Let these findings fail as new ones would (for the replay tests)."""
    before = set(_disabled)
    _disabled.update(names)
    try:
        yield
    finally:
        _disabled.clear()
        _disabled.update(before)
