"""The fuzz targets by name: what ``python -m fuzz run NAME`` runs.

Each target takes one input (bytes) and returns None when the code under
test behaved, or raises: an AssertionError names the broken invariant or the
difference from the Python twin; any other exception is itself the finding
(``known.Known`` aside: a finding already reported, see fuzz/known.py).
Targets import the native modules by their usual names; the fuzz worker
puts the instrumented build in front of them (see fuzz/worker.py), while
the regression tests replay saved inputs on the normal build.
"""

from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class Target:
    module: str             # in this package
    function: str
    max_len: int            # libFuzzer's -max_len
    native: tuple           # tillwire.core modules it exercises (all must be instrumented)
    # The native code keeps buffers of its own from PyMem (a pending frame):
    # run with PYTHONMALLOC=malloc so ASan knows their bounds (pymalloc
    # would hide them in its arenas), at a third of the speed.
    pymem_buffers: bool


TARGETS = {
    "decoder": Target("codec", "decoder", 4096, ("_codec",), True),
    "lz4": Target("codec", "lz4_block", 4096, ("_codec",), True),
    "session": Target("session", "server", 8192, ("_codec", "_lanes", "_session"), True),
    "kinds": Target("kinds", "card_scan", 4096, ("_kinds",), False),
}


def load(name: str):
    """The target function ``name`` (imports its module, and so the native modules)."""
    t = TARGETS[name]
    return getattr(importlib.import_module(f"fuzz.{t.module}"), t.function)


def max_len(name: str) -> int:
    return TARGETS[name].max_len
