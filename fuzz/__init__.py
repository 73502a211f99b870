"""Coverage-guided fuzzing of the native core with atheris (see fuzz/README.md).

Targets (fuzz/targets.py) feed arbitrary bytes to the native decoder, the
decoder's lz4 path, the server session state machine and the card-number
scan, and compare each with its plain-Python twin.  fuzz/build.py builds
the Cython modules with clang's -fsanitize=address,fuzzer-no-link into
build/fuzz, fuzz/worker.py runs one target on them under libFuzzer, and
fuzz/run.py bounds a run and collects what it found; fuzz/fallback.py runs
the same targets under hypothesis where that build cannot be had.
"""
