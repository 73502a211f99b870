"""Shared fixtures: the codec implementations and the store backends under test.

``codec`` runs a test once per implementation ("python" twin, "native"
Cython module).  A missing native module is a FAILURE, not a skip, unless
``TILLWIRE_NO_EXTENSIONS=1`` says the run is deliberately Python-only.
The codec fixtures are session-scoped (the modules are stateless) so
hypothesis tests can use them.  ``store_factory`` runs a contract test once
per store backend (see backends.py).
"""

from __future__ import annotations

import pytest

from backends import BACKENDS, make_backend
from redis_server import fresh_prefix
from support import require_impl


@pytest.fixture(scope="session", params=["python", "native"])
def codec(request):
    """Each codec implementation in turn (module with Frame, Decoder, Encoder)."""
    return require_impl("codec", request.param)


@pytest.fixture(scope="session")
def codec_pair():
    """``(python, native)`` codec modules, for differential tests."""
    return require_impl("codec", "python"), require_impl("codec", "native")


@pytest.fixture(params=BACKENDS)
def store_factory(request, tmp_path):
    """``make(**kw)`` -> a new, unopened store of the backend under test
    (SQLite stores made by one test share one file, Redis stores one key
    prefix, so a second one reopens it)."""
    path = str(tmp_path / "tillwire.db")
    prefix = fresh_prefix() if request.param == "redis" else ""

    def make(**kw):
        if prefix:
            kw.setdefault("prefix", prefix)
        return make_backend(request.param, path, **kw)

    make.backend = request.param
    make.path = path
    return make
