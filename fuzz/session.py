"""Fuzz target over the server session state machine, native against twin.

The input is a script (``reader.Script``): a first byte picks the session's
limits and how much of the handshake is done up front, then each step is
one call, made on a native ``_session.ServerSession`` and on the Python
twin alike: raw bytes of the input fed to ``receive_data`` in chunks the
input sizes, whole frames built from input numbers, ``receive_data(b"")``,
``data_to_send`` with small and odd budgets, and the application's calls
(accept, deliver, push, control, error, goaway, close, set_inbox, fanout,
release_lanes, take_resync) between them.

Checked after every step: the same result or the same exception type, and
the same observable state (as tests/test_session.py's differential test
does, the text of a decoder-error CLOSE may differ).  Checked on the
native output: it decodes as a clean frame stream, CLOSE is its last
frame, and nothing comes after it.  A CLOSE with a protocol error code is
the clean answer to bad input; any exception other than the ones both
twins raise alike is a finding.
"""

from __future__ import annotations

from tillwire.core import _codec, _codec_py, _session, _session_py
from tillwire.core.codes import Code, Flag, FrameType, Lane
from tillwire.core.errors import ProtocolError

from .codec import as_buffer
from .reader import Script, framed

_PY_WIRE = _codec_py.Encoder()


def wire(ftype, flags=0, payload=b"", **fields) -> bytes:
    """One frame's bytes (the Python twin's encoder: the wire is the wire)."""
    return _PY_WIRE.encode(_codec_py.Frame(ftype, flags, payload, **fields))


HELLO = wire(FrameType.HELLO, version=1, heartbeat=0, token="tok")
RESUME = wire(FrameType.RESUME, epoch=1, p0=0, p1=0)

# Session settings, as the server uses them and at the edges.
SETTINGS = (
    {},
    {"max_frame_size": 64},
    {"max_queued_bytes": 120},
    {"lane_weights": (1, 2, 3)},
    {"handshake_frame_size": 64},
    {"handshake_frame_size": 70, "max_frame_size": 4096},
    {"max_frame_size": 200, "max_queued_bytes": 300},
    {"handshake_frame_size": 64, "max_frame_size": 64, "max_queued_bytes": 64},
)

_SEQ = (0, 1, 2, 3, 5, 8, 255, (1 << 64) - 1)


def _frame_from(s: Script) -> bytes:
    """A frame a terminal might send, its numbers from the input."""
    k = s.byte() % 16
    lane = s.byte() & 3
    seq = s.pick(_SEQ) if s.flag() else s.byte()
    if k == 0:
        return wire(FrameType.ACK, lane, seq=seq)
    if k == 1:
        return wire(FrameType.NACK, lane, seq=seq, code=s.byte())
    if k == 2:
        return wire(FrameType.PING, payload=s.take(s.byte() % 8))
    if k == 3:
        return wire(FrameType.PING, payload=bytes(s.byte() * 4))       # compressed at >= 512
    if k == 4:
        return wire(FrameType.PONG)
    if k == 5:
        return wire(FrameType.SEND, lane | Flag.ACK_REQUESTED, b"{}", ref=s.byte(), to="t:a/1",
                    kind="chat.message")
    if k == 6:
        return wire(FrameType.RECEIPT, msg_id=s.byte(), code=s.byte() % 6)
    if k == 7:
        return wire(FrameType.SUBSCRIBE, lane, ref=1, epoch=s.byte(), offset=seq, to="c:a/p")
    if k == 8:
        return wire(FrameType.UNSUBSCRIBE, lane, ref=1, to="c:a/p")
    if k == 9:
        return wire(FrameType.HISTORY, lane, ref=1, count=s.byte(), to="c:a/p")
    if k == 10:
        t = 0x40 + s.byte() % 0x40                                     # an extension frame
        return framed(bytes((t, s.byte())) + s.take(s.byte() % 8))
    if k == 11:
        return wire(FrameType.HELLO, version=s.byte() % 3, heartbeat=s.u16(), token="t")
    if k == 12:
        return wire(FrameType.RESUME, epoch=s.byte(), p0=seq, p1=s.byte())
    if k == 13:
        return wire(FrameType.CLOSE, code=s.byte(), payload=b"bye")
    if k == 14:
        # Any type byte and flags, with a body from the input: unknown
        # types, bad flags, server-to-terminal frames.
        return framed(bytes((s.byte(), s.byte())) + s.take(s.byte() % 16))
    return wire(FrameType.DELIVER, seq=seq, kind="order.event")


# Encoded frames the application pushes (all well-formed: the session
# queues what it is given, and its output is checked to decode).
PUSH_FRAMES = (
    wire(FrameType.BROADCAST, Lane.P2, b"{}", channel=1, offset=1, kind="price.update"),
    wire(FrameType.BROADCAST, Lane.P3, b"x" * 90, channel=2, offset=7, kind="price.update"),
    wire(FrameType.DELIVER, seq=3, kind="order.event", payload=b"y" * 30),
    wire(FrameType.RESYNC, channel=1, epoch=2, offset=3, count=4),
    wire(FrameType.BROADCAST, Lane.P2, b"z" * 700, channel=3, offset=9, kind="price.update"),
)
_BUDGETS = (-1, 0, 1, 7, 30, 64, 300, 1 << 20)
_KEYS = (None, "k", ("k", 2), "j")
_TEXT = ("", "x", "bye", "\u00e9t\u00e9", "z" * 70)


def _call(obj, name, *args):
    """(result, None) or (None, exception type)."""
    try:
        return getattr(obj, name)(*args), None
    except Exception as exc:            # noqa: BLE001 - the type is what is compared
        return None, type(exc)


def _decoder_close(session) -> bool:
    # A CLOSE whose text is the decoder's own (codes 1-8) differs in wording.
    return 1 <= session.close_code <= 8


def _normalized(out: bytes):
    """Output as frames, with the text of a decoder-error CLOSE blanked."""
    frames = [f.as_tuple() for f in _codec_py.Decoder((1 << 28) - 1).feed(out)]
    return [(t, fl, b"<decoder error>" if t == FrameType.CLOSE and 1 <= fields["code"] <= 8 else p,
             fields) for t, fl, p, fields in frames]


def _observe(s):
    # After a decoder-error CLOSE the queues hold that CLOSE's text, whose
    # length differs, so a budget may fit it in one twin and not the other.
    odd = _decoder_close(s)
    return (s.state, s.close_code, None if odd else s.pending, None if odd else s.queued_bytes,
            None if odd else s.control_bytes, s.input_held, s.inbox_window(0), s.inbox_window(1),
            s.lane_counters(), s.heartbeat_ms, s.deadline(10.0), s.dirty, s.last_seen)


class _Pair:
    """A native session and its twin, driven in step; checks as it goes."""

    def __init__(self, settings: dict) -> None:
        self.native = _session.ServerSession(_codec.Encoder(), now=1.0, **settings)
        self.twin = _session_py.ServerSession(_codec_py.Encoder(), now=1.0, **settings)
        self.out = _codec_py.Decoder((1 << 28) - 1)    # the native output stream
        self.closed_out = False                        # a CLOSE went out
        self.sent = ([], [])                           # normalized frames out: twin, native

    def step(self, name, *args):
        a = _call(self.twin, name, *args)
        b = _call(self.native, name, *args)
        assert a[1] == b[1], (name, "exception", a[1], b[1])
        if name == "receive_data":
            assert [f.as_tuple() for f in a[0] or []] == [f.as_tuple() for f in b[0] or []], name
        elif name == "data_to_send" and b[0] is not None:
            self._check_output(b[0])
            self.sent[0].extend(_normalized(a[0]))
            self.sent[1].extend(_normalized(b[0]))
            if _decoder_close(self.native):
                # The CLOSE may go in this call in one twin, in the next in the other.
                n = min(len(self.sent[0]), len(self.sent[1]))
                assert self.sent[0][:n] == self.sent[1][:n], name
            else:
                assert self.sent[0] == self.sent[1], name
        else:
            assert a[0] == b[0], (name, a[0], b[0])
        assert _observe(self.twin) == _observe(self.native), (name, _observe(self.twin),
                                                              _observe(self.native))
        return b[0]

    def finish(self) -> None:
        """Everything queued has gone out: the two outputs are the same."""
        assert self.sent[0] == self.sent[1], "output"
        assert self.twin.pending == self.native.pending is False, "pending at the end"

    def _check_output(self, out: bytes) -> None:
        if not out:
            return
        assert not self.closed_out, "bytes sent after CLOSE"
        try:
            frames = self.out.feed(out)
        except ProtocolError as exc:
            raise AssertionError(f"the session wrote a malformed frame: {exc}") from None
        assert self.out.buffered == 0, "data_to_send split a frame"
        for i, f in enumerate(frames):
            if f.type == FrameType.CLOSE:
                assert i == len(frames) - 1, "a frame after CLOSE"
                self.closed_out = True


def server(data: bytes) -> None:
    """Target: a server session fed an arbitrary script."""
    s = Script(data)
    cfg = s.byte()
    pair = _Pair(SETTINGS[cfg & 7])
    now = 1.0
    start = (cfg >> 3) & 3
    if start:
        pair.step("receive_data", HELLO + (RESUME if start > 1 else b""), now)
        if start == 3:
            pair.step("accept", 1, 30000, 99, 1 << 20, 1)
    steps = 0
    while s.more() and steps < 400:
        steps += 1
        op = s.byte() % 24
        now += 0.25
        if op < 6:                  # raw input, as bytes, bytearray or memoryview
            pair.step("receive_data", as_buffer(op, s.take(s.byte())), now)
        elif op < 10:                                   # a whole frame, maybe in two reads
            frame = _frame_from(s)
            if op == 9:
                cut = s.byte() % (len(frame) + 1)
                pair.step("receive_data", frame[:cut], now)
                frame = frame[cut:]
            pair.step("receive_data", frame, now)
        elif op < 13:
            pair.step("data_to_send", s.pick(_BUDGETS), now)
        elif op == 13:
            pair.step("receive_data", b"", now)
        elif op == 14:
            args = (1, s.u16(), 99, 1 << 20, s.byte())
            pair.step("accept", *args)
        elif op == 15:
            lane = s.byte() % 3                         # P2 is refused by both
            seq = s.byte()
            pair.step("deliver", lane, seq, 1000 + seq, "order.event",
                      b"{}" if s.flag() else b"p" * (4 * s.byte()), s.flag())
        elif op == 16:
            pair.step("push", s.byte() & 3, s.pick(PUSH_FRAMES), s.pick(_KEYS),
                      s.pick((0.0, 5.0, 500.0)), s.pick((None, "chan", "other")))
        elif op == 17:
            pair.step("control", s.pick(PUSH_FRAMES))
        elif op == 18:
            pair.step("error", s.pick((Code.FORBIDDEN, Code.BAD_REQUEST)), s.byte(), s.pick(_TEXT))
        elif op == 19:
            pair.step("goaway", s.pick((Code.DRAINING, Code.SHUTDOWN)), s.u16(), s.pick(_TEXT))
        elif op == 20:
            pair.step("close", s.pick((Code.NORMAL, Code.HEARTBEAT_TIMEOUT, Code.KICKED)),
                      s.pick(_TEXT))
        elif op == 21:
            pair.step("set_inbox", s.byte() & 1, s.byte())
        elif op == 22:
            pair.step("release_lanes" if s.flag() else "take_resync")
        else:
            lane, frame = s.byte() & 3, s.pick(PUSH_FRAMES)
            results = []
            for mod, sess in ((_session_py, pair.twin), (_session, pair.native)):
                dirty = []
                over = mod.fanout([sess], lane, frame, ("k", 1), 0.0, "ch", dirty)
                results.append((over == [sess], dirty == [sess]))
                sess.dirty = False
            assert results[0] == results[1], ("fanout", results)
            assert _observe(pair.twin) == _observe(pair.native), "fanout"
    # Everything left comes out alike, and the held input is handled.
    for _ in range(500):           # (each round lets one held PING through)
        pair.step("receive_data", b"", now + 1)
        pair.step("data_to_send", 1 << 30, now + 1)
        if not pair.native.input_held and not pair.twin.input_held:
            break
    pair.finish()

