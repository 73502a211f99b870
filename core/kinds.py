"""The native message check (``core/_kinds.pyx``), when there is one.

Unlike the codec, this module has no twin here: its reference and oracle is
``server/kinds.py`` (the message schemas are server policy), which
configures the native module with its tables and falls back to itself when
``NATIVE`` is None (not built, or ``TILLWIRE_NO_EXTENSIONS``).
"""

from __future__ import annotations

from ._impl import NO_EXTENSIONS


def _load():
    if NO_EXTENSIONS:
        return None
    try:
        from . import _kinds
    except ImportError:
        return None
    return _kinds


NATIVE = _load()

__all__ = ["NATIVE"]
