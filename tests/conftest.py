"""Shared fixtures: the codec implementations under test.

``codec`` runs a test once per implementation ("python" twin, "native"
Cython module).  A missing native module is a FAILURE, not a skip, unless
``TILLWIRE_NO_EXTENSIONS=1`` says the run is deliberately Python-only.
The fixtures are session-scoped (the modules are stateless) so hypothesis
tests can use them.
"""

from __future__ import annotations

import importlib
import os

import pytest

from tillwire.core._impl import both


def _require(name: str, impl: str):
    """The ``impl`` ("python" | "native") module of native module ``name``."""
    found = both(name)
    if impl in found:
        return found[impl]
    if os.environ.get("TILLWIRE_NO_EXTENSIONS") == "1":
        pytest.skip(f"TILLWIRE_NO_EXTENSIONS=1: native tillwire.core._{name} deliberately not tested")
    try:
        importlib.import_module(f"tillwire.core._{name}")
        reason = "not returned by tillwire.core._impl.both()"
    except ImportError as exc:
        reason = f"{exc.__class__.__name__}: {exc}"
    pytest.fail(
        f"native module tillwire.core._{name} is not importable ({reason}). "
        f"Build it with `make compile`, or set TILLWIRE_NO_EXTENSIONS=1 to test only the Python twin.",
        pytrace=False,
    )


@pytest.fixture(scope="session", params=["python", "native"])
def codec(request):
    """Each codec implementation in turn (module with Frame, Decoder, Encoder)."""
    return _require("codec", request.param)


@pytest.fixture(scope="session")
def codec_pair():
    """``(python, native)`` codec modules, for differential tests."""
    return _require("codec", "python"), _require("codec", "native")
