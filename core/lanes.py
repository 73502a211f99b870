"""The per-connection lane scheduler: native when built, else the Python twin.

``LaneScheduler``, ``push_many`` and the push results ``ACCEPTED``,
``CONFLATED``, ``DROPPED``, ``OVERFLOW`` come from ``core/_lanes.pyx`` or
from its independently written twin ``core/_lanes_py.py``;
``IMPLEMENTATION`` says which.  See ``core/_impl.py``.
"""

from ._impl import load

_mod, IMPLEMENTATION = load("lanes")

LaneScheduler = _mod.LaneScheduler
push_many = _mod.push_many
ACCEPTED = _mod.ACCEPTED
CONFLATED = _mod.CONFLATED
DROPPED = _mod.DROPPED
OVERFLOW = _mod.OVERFLOW

__all__ = [
    "LaneScheduler",
    "push_many",
    "ACCEPTED",
    "CONFLATED",
    "DROPPED",
    "OVERFLOW",
    "IMPLEMENTATION",
]
