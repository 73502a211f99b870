"""The frame codec (PROTOCOL.md): native when built, else the Python twin.

``Frame``, ``Decoder`` and ``Encoder`` come from ``core/_codec.pyx`` or from
its independently written twin ``core/_codec_py.py``; ``IMPLEMENTATION`` says
which.  See ``core/_impl.py``.
"""

from ._impl import load

_mod, IMPLEMENTATION = load("codec")

Frame = _mod.Frame
Decoder = _mod.Decoder
Encoder = _mod.Encoder

__all__ = ["Frame", "Decoder", "Encoder", "IMPLEMENTATION"]
