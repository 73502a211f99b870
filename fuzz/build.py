"""The instrumented build: the native core compiled by clang with
``-fsanitize=address,fuzzer-no-link`` into build/fuzz/lib.

setup.py is run as it is, with the compiler and flags swapped through the
environment and ``build_ext --build-lib``, so the extensions land in
build/fuzz/lib/tillwire/core/ and the in-place modules in core/ that the
test suite imports are never touched.  (The generated C in build/cython is
shared with the normal build: the Cython directives are the same.)

Nothing here imports the native modules.  The fuzz worker puts
build/fuzz/lib/tillwire/core first on ``tillwire.core.__path__`` and runs
under ``LD_PRELOAD`` of atheris's ``asan_with_fuzzer.so`` (AddressSanitizer
with libFuzzer linked in), which supplies the sanitizer runtime and the
coverage callbacks the modules were compiled against.

Optionally (``ensure_lz4``) the lz4 package itself, the installed version
built from its PyPI sdist the same way into build/fuzz/lz4 (it bundles the
lz4 C library), so the ``lz4`` target is guided inside LZ4_decompress_safe
too.  It costs a pip download and about a minute of compiling.

Needs: clang and Debian's libclang-rt-14-dev (``asan_static``), and atheris
from PyPI.  ``Unavailable`` says which is missing, with the tool's words.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "fuzz"
LIB = OUT / "lib"
CORE = LIB / "tillwire" / "core"
STAMP = OUT / "stamp"
LZ4 = OUT / "lz4"
SANITIZE = "-fsanitize=address,fuzzer-no-link"
CFLAGS = f"{SANITIZE} -fno-omit-frame-pointer -g"
MODULES = ("_codec", "_kinds", "_lanes", "_session", "_wheel")


class Unavailable(Exception):
    """The instrumented build cannot be made or loaded here (the reason is the message)."""


def atheris_dir() -> pathlib.Path:
    """Where atheris keeps asan_with_fuzzer.so (``atheris.path()``), without importing it."""
    spec = importlib.util.find_spec("atheris")
    if spec is None or spec.origin is None:
        raise Unavailable(f"atheris is not installed in {sys.prefix} "
                          "(pip install atheris: a manylinux wheel for CPython 3.11)")
    # atheris.path() is the directory above the package (site-packages).
    where = pathlib.Path(spec.origin).resolve().parent.parent
    if not (where / "asan_with_fuzzer.so").exists():
        raise Unavailable(f"atheris has no asan_with_fuzzer.so in {where}")
    return where


def preload() -> str:
    return str(atheris_dir() / "asan_with_fuzzer.so")


def _clang() -> str:
    clang = shutil.which("clang")
    if clang is None:
        raise Unavailable("clang not found on PATH (Debian: apt-get install clang libclang-rt-14-dev)")
    return clang


def _fingerprint(clang: str) -> str:
    h = hashlib.sha256()
    version = subprocess.run([clang, "--version"], capture_output=True, text=True).stdout
    h.update(version.encode())
    h.update(CFLAGS.encode())
    h.update(sys.version.encode())
    for path in sorted([*(ROOT / "core").glob("*.pyx"), *(ROOT / "core").glob("*.pxd"),
                        ROOT / "setup.py"]):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def built() -> bool:
    """The instrumented modules exist (whether or not they are current)."""
    return all(any(CORE.glob(f"{name}.*.so")) for name in MODULES)


@contextlib.contextmanager
def _lock():
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure(*, force: bool = False, log=None) -> pathlib.Path:
    """Build the instrumented modules unless they are current; return the
    directory to put first on ``tillwire.core.__path__``.  Raises Unavailable."""
    atheris_dir()
    clang = _clang()
    with _lock():
        stamp = _fingerprint(clang)
        if not force and built() and STAMP.exists() and STAMP.read_text() == stamp:
            return CORE
        env = dict(os.environ)
        env.update(CC=clang, LDSHARED=f"{clang} -shared", CFLAGS=CFLAGS, LDFLAGS=SANITIZE)
        env.pop("TILLWIRE_NO_EXTENSIONS", None)
        cmd = [sys.executable, "setup.py", "-q", "build_ext", "--force", "--parallel", "2",
               "--build-lib", str(LIB), "--build-temp", str(OUT / "temp")]
        if log is not None:
            log(f"fuzz: building the instrumented core: CC={clang} CFLAGS='{CFLAGS}'")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=900)
        if proc.returncode != 0 or not built():
            errors = [line for line in (proc.stdout + proc.stderr).splitlines()
                      if "error" in line.lower()]
            raise Unavailable("the instrumented build failed: "
                              + ("\n".join(errors[-8:]) or proc.stderr[-2000:]))
        _check_loads()
        STAMP.write_text(stamp)
    return CORE


def _check_loads() -> None:
    """Import every instrumented module under the preload, in a subprocess."""
    code = ("import tillwire.core as c; c.__path__.insert(0, %r)\n"
            "import importlib\n"
            "for m in %r:\n"
            "    mod = importlib.import_module('tillwire.core.' + m)\n"
            "    assert mod.__file__.startswith(%r), mod.__file__\n") % (str(CORE), MODULES, str(CORE))
    proc = subprocess.run([sys.executable, "-c", code], env=environment(), capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0:
        raise Unavailable("the instrumented modules do not load under "
                          f"LD_PRELOAD={preload()}: {proc.stderr.strip()[-2000:]}")


def ensure_lz4(*, force: bool = False, log=None) -> pathlib.Path:
    """Build the installed lz4 version instrumented into build/fuzz/lz4 unless
    it is there; return the directory to put first on ``sys.path``."""
    atheris_dir()
    clang = _clang()
    version = importlib.metadata.version("lz4")
    stamp = f"lz4=={version} {CFLAGS} {sys.version}"
    marker = LZ4 / ".stamp"
    with _lock():
        if not force and marker.exists() and marker.read_text() == stamp:
            return LZ4
        shutil.rmtree(LZ4, ignore_errors=True)
        env = dict(os.environ)
        env.update(CC=clang, LDSHARED=f"{clang} -shared", CFLAGS=CFLAGS, LDFLAGS=SANITIZE)
        if log is not None:
            log(f"fuzz: building lz4=={version} instrumented from its sdist")
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-cache-dir",
                               "--disable-pip-version-check", "--no-binary", "lz4", "--no-deps",
                               "--target", str(LZ4), f"lz4=={version}"],
                              env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise Unavailable(f"the instrumented lz4 build failed: {proc.stderr.strip()[-2000:]}")
        marker.write_text(stamp)
    return LZ4


def environment(*, python_malloc: bool = True) -> dict:
    """The environment of a process running the instrumented modules."""
    env = dict(os.environ)
    env.pop("TILLWIRE_NO_EXTENSIONS", None)
    env["LD_PRELOAD"] = preload()
    # Python leaks at exit by design; a huge allocation is an error, not an abort.
    env["ASAN_OPTIONS"] = "detect_leaks=0:allocator_may_return_null=1:handle_abort=1"
    if python_malloc:
        # Every PyMem/PyObject allocation through malloc, so ASan sees the
        # bounds of small buffers too (pymalloc would hide them in its arenas).
        env["PYTHONMALLOC"] = "malloc"
    return env
