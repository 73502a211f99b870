"""Sans-IO session state machines: native when built, else the Python twin.

The session family decides the codec and lane scheduler family too: the
native sessions use the native codec and scheduler, the Python twin the
Python ones, so ``Frame`` and ``Encoder`` exported here always match the
sessions (a native ``Encoder`` only encodes native ``Frame`` objects).
"""

from ._impl import NO_EXTENSIONS

if NO_EXTENSIONS:
    from . import _codec_py as _codec, _lanes_py as _lanes, _session_py as _session
    IMPLEMENTATION = "python"
else:
    try:
        from . import _codec, _lanes, _session
        IMPLEMENTATION = "native"
    except ImportError:
        from . import _codec_py as _codec, _lanes_py as _lanes, _session_py as _session
        IMPLEMENTATION = "python"

ServerSession = _session.ServerSession
ClientSession = _session.ClientSession
fanout = _session.fanout
Frame = _codec.Frame
Encoder = _codec.Encoder
Decoder = _codec.Decoder
LaneScheduler = _lanes.LaneScheduler
OVERFLOW = _lanes.OVERFLOW

AWAIT_HELLO = _session.AWAIT_HELLO
AWAIT_RESUME = _session.AWAIT_RESUME
AWAIT_WELCOME = _session.AWAIT_WELCOME
OPEN = _session.OPEN
CLOSED = _session.CLOSED

__all__ = [
    "ServerSession", "ClientSession", "fanout", "Frame", "Encoder", "Decoder",
    "LaneScheduler", "OVERFLOW", "AWAIT_HELLO", "AWAIT_RESUME", "AWAIT_WELCOME", "OPEN",
    "CLOSED", "IMPLEMENTATION",
]
