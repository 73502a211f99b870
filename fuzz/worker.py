"""The fuzzing process: one target under atheris, on the instrumented core.

Started by ``fuzz.run`` as ``python -m fuzz.worker TARGET CORE_DIR
[--lz4 DIR] [libFuzzer flags and corpus directories]`` with the environment
of ``fuzz.build.environment()`` (LD_PRELOAD of AddressSanitizer +
libFuzzer).  It puts CORE_DIR in front of ``tillwire.core.__path__`` (and
DIR, an instrumented lz4, in front of ``sys.path``) before anything imports
a native module, checks that every native module the target uses came from
there, and hands the target to libFuzzer, which runs until its
``-max_total_time`` / ``-runs`` bound or the first finding.
"""

from __future__ import annotations

import importlib
import sys


def main(argv: list[str]) -> None:
    target, core_dir, flags = argv[0], argv[1], argv[2:]
    lz4_dir = None
    if flags[:1] == ["--lz4"]:
        lz4_dir, flags = flags[1], flags[2:]
        sys.path.insert(0, lz4_dir)
        import lz4.block

        if not lz4.block.__file__.startswith(lz4_dir):
            sys.exit(f"fuzz: lz4.block came from {lz4.block.__file__}, not {lz4_dir}")
    import tillwire.core

    tillwire.core.__path__.insert(0, core_dir)
    import atheris

    from fuzz import known, targets

    one = targets.load(target)
    for name in targets.TARGETS[target].native:
        path = importlib.import_module(f"tillwire.core.{name}").__file__
        if not path.startswith(core_dir):
            sys.exit(f"fuzz: tillwire.core.{name} came from {path}, not the instrumented build")

    def test_one_input(data: bytes) -> None:
        try:
            one(data)
        except known.Known:
            pass

    atheris.Setup([sys.argv[0], *flags], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv[1:])
