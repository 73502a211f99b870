"""The timing wheel: native when built, else the Python twin.

``Timer`` and ``TimingWheel`` come from ``core/_wheel.pyx`` or from its
independently written twin ``core/_wheel_py.py``; ``IMPLEMENTATION`` says
which.  See ``core/_impl.py``.
"""

from ._impl import load

_mod, IMPLEMENTATION = load("wheel")

Timer = _mod.Timer
TimingWheel = _mod.TimingWheel

__all__ = ["Timer", "TimingWheel", "IMPLEMENTATION"]
