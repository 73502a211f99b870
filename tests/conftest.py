"""Shared fixtures: the codec implementations under test.

``codec`` runs a test once per implementation ("python" twin, "native"
Cython module).  A missing native module is a FAILURE, not a skip, unless
``TILLWIRE_NO_EXTENSIONS=1`` says the run is deliberately Python-only.
The fixtures are session-scoped (the modules are stateless) so hypothesis
tests can use them.
"""

from __future__ import annotations

import pytest

from support import require_impl


@pytest.fixture(scope="session", params=["python", "native"])
def codec(request):
    """Each codec implementation in turn (module with Frame, Decoder, Encoder)."""
    return require_impl("codec", request.param)


@pytest.fixture(scope="session")
def codec_pair():
    """``(python, native)`` codec modules, for differential tests."""
    return require_impl("codec", "python"), require_impl("codec", "native")
