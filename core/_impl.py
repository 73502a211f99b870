"""Choosing between a native module and its pure-Python twin.

Every native module ``core/_<name>.pyx`` has a twin ``core/_<name>_py.py``
written independently from PROTOCOL.md (the twin is the oracle of the
differential tests).  The public module ``core/<name>.py`` re-exports one of
them:

* ``TILLWIRE_NO_EXTENSIONS=1`` forces the Python twin;
* otherwise the native module is used, and if it was not built (a source
  checkout without ``make compile``) the twin is used and ``IMPLEMENTATION``
  says so, so nobody benchmarks the slow path by accident.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

NO_EXTENSIONS = bool(os.environ.get("TILLWIRE_NO_EXTENSIONS"))


def load(name: str) -> tuple[ModuleType, str]:
    """Return ``(module, "native" | "python")`` for native module ``name``."""
    if not NO_EXTENSIONS:
        try:
            return importlib.import_module(f"tillwire.core._{name}"), "native"
        except ImportError:
            pass
    return importlib.import_module(f"tillwire.core._{name}_py"), "python"


def both(name: str) -> dict[str, ModuleType]:
    """Both implementations that are importable, for tests and benchmarks."""
    found = {"python": importlib.import_module(f"tillwire.core._{name}_py")}
    try:
        found["native"] = importlib.import_module(f"tillwire.core._{name}")
    except ImportError:
        pass
    return found
