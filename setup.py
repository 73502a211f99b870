"""Build script for Tillwire's native core.

The import packages map onto the design card's folders (``tillwire.core`` is
``core/``), but Cython resolves ``cimport tillwire.core.x`` by dotted name on
its include path.  We therefore generate ``build/cython-include/tillwire/core``
as a symlink to ``core/`` and hand that directory to Cython, so one ``.pyx``
can cimport another's ``.pxd`` in editable and regular builds alike.

Environment switches (build time, not configuration):
  TILLWIRE_NO_EXTENSIONS=1  build nothing native (the pure-Python twins run)
  TILLWIRE_DEBUG=1          compile with assertions and without -O2
"""

import os
import pathlib
import sys

from setuptools import Extension, setup

ROOT = pathlib.Path(__file__).resolve().parent
NATIVE_MODULES = ["_codec", "_wheel", "_lanes", "_session", "_kinds"]


def _cython_include_dir() -> str:
    inc = ROOT / "build" / "cython-include"
    pkg = inc / "tillwire"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.pxd").touch()
    link = pkg / "core"
    target = ROOT / "core"
    if link.is_symlink() and link.resolve() != target:
        link.unlink()
    if not link.exists():
        link.symlink_to(target, target_is_directory=True)
    return str(inc)


def _extensions():
    if os.environ.get("TILLWIRE_NO_EXTENSIONS"):
        return []
    from Cython.Build import cythonize

    debug = bool(os.environ.get("TILLWIRE_DEBUG"))
    cflags = ["-O0", "-g"] if debug else ["-O2"]
    exts = [
        Extension(
            f"tillwire.core.{name}",
            [f"core/{name}.pyx"],
            extra_compile_args=cflags,
            define_macros=[("CYTHON_TRACE", "0")],
        )
        for name in NATIVE_MODULES
        if (ROOT / "core" / f"{name}.pyx").exists()
    ]
    return cythonize(
        exts,
        include_path=[_cython_include_dir()],
        language_level=3,
        compiler_directives={
            "boundscheck": debug,
            "wraparound": False,
            "initializedcheck": debug,
            "cdivision": True,
            "embedsignature": True,
        },
        build_dir=str(ROOT / "build" / "cython"),
        quiet=True,
    )


setup(ext_modules=_extensions())
