"""Session state machines (core/_session.pyx and its twin core/_session_py.py).

Unit tests run once per implementation through the ``fam`` fixture (a session
family: the session module with the codec it is built on); the differential
tests feed both the same peer bytes, split at random points and interleaved
with API calls, and require identical returned frames, output bytes, states
and errors after every step.  A missing native module is a failure unless
``TILLWIRE_NO_EXTENSIONS=1``.

Output bytes are compared exactly, except the text of a CLOSE caused by a
decoder error (codes MALFORMED..BAD_KIND): the two codecs word their errors
differently, so there only the frames with that CLOSE's code are compared.
"""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc
from types import SimpleNamespace

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import NO_EXTENSIONS, require_impl
from tillwire.core import _codec_py
from tillwire.core._impl import both
from tillwire.core.codes import Code, Flag, FrameType, Lane, ReceiptStatus
from tillwire.core.errors import ProtocolError

def _family(impl: str) -> SimpleNamespace:
    session = require_impl("session", impl)
    if impl == "python":
        from tillwire.core import _codec_py as codec, _lanes_py as lanes
    else:
        from tillwire.core import _codec as codec, _lanes as lanes
    return SimpleNamespace(name=impl, session=session, codec=codec, lanes=lanes,
                           Encoder=codec.Encoder, Frame=codec.Frame)


@pytest.fixture(scope="session", params=["python", "native"])
def fam(request):
    """Each session family in turn: .session, .codec, .lanes, .Encoder, .Frame."""
    return _family(request.param)


@pytest.fixture(scope="session")
def fam_pair():
    """``(python, native)`` session families, for differential tests."""
    return _family("python"), _family("native")


# ---------------------------------------------------------------- helpers

_PY_ENCODER = _codec_py.Encoder()


def wire(ftype, flags=0, payload=b"", **fields) -> bytes:
    """Bytes of one frame (encoded by the Python codec: the wire is the wire)."""
    return _PY_ENCODER.encode(_codec_py.Frame(ftype, flags, payload, **fields))


def ext(ftype: int, body: bytes = b"", flags: int = 0) -> bytes:
    """An extension frame (types 0x40-0x7f), written by hand."""
    n = 2 + len(body)
    prefix = bytearray()
    while n >= 0x80:
        prefix.append((n & 0x7F) | 0x80)
        n >>= 7
    prefix.append(n)
    return bytes(prefix) + bytes([ftype, flags]) + body


def decode(data: bytes) -> list:
    """Frames of `data` as tuples (type, flags, payload, fields)."""
    return [f.as_tuple() for f in _codec_py.Decoder((1 << 28) - 1).feed(data)]


def tuples(frames) -> list:
    return [f.as_tuple() for f in frames]


def types_of(frames) -> list:
    return [f.type for f in frames]


HELLO = wire(FrameType.HELLO, version=1, heartbeat=0, token="tok")
RESUME = wire(FrameType.RESUME, epoch=1, p0=0, p1=0)
PING = wire(FrameType.PING, payload=b"hi")
SEND = wire(FrameType.SEND, Flag.ACK_REQUESTED | Lane.P1, b"{}", ref=7, to="store:acme/1",
            kind="chat.message")


def ack(lane, seq):
    return wire(FrameType.ACK, lane, seq=seq)


def nack(lane, seq, code=0):
    return wire(FrameType.NACK, lane, seq=seq, code=code)


def server(fam, now=0.0, **kw):
    return fam.session.ServerSession(fam.Encoder(), now=now, **kw)


def opened(fam, now=0.0, **kw):
    """A server session after HELLO, RESUME and accept(), output drained."""
    s = server(fam, now, **kw)
    assert types_of(s.receive_data(HELLO + RESUME, now)) == [FrameType.HELLO, FrameType.RESUME]
    s.accept(1, 30000, 1000, 1 << 20, 1)
    s.data_to_send(1 << 20, now)
    assert s.state == fam.session.OPEN
    return s


def out_frames(session, max_bytes=1 << 20, now=0.0) -> list:
    return decode(session.data_to_send(max_bytes, now))


def closed_with(frames, code):
    assert frames and frames[-1][0] == FrameType.CLOSE, frames
    assert frames[-1][3]["code"] == code, frames[-1]
    return frames[-1][2].decode()


def broadcast(channel, offset, lane=Lane.P2, retransmit=False, payload=b"{}"):
    return wire(FrameType.BROADCAST, lane | (Flag.RETRANSMIT if retransmit else 0), payload,
                channel=channel, offset=offset, kind="price.update")


def client(fam, now=0.0, **kw):
    return fam.session.ClientSession(fam.Encoder(), now=now, **kw)


WELCOME = wire(FrameType.WELCOME, version=1, heartbeat=1000, time=5, max_frame=4096, epoch=0)


def welcomed(fam, now=0.0):
    """A client after hello() and WELCOME (epoch 0), output drained."""
    c = client(fam, now)
    c.hello("tok")
    c.data_to_send(now)
    assert types_of(c.receive_data(WELCOME, now)) == [FrameType.WELCOME]
    return c


# ---------------------------------------------------------------- module surface


def test_constants(fam):
    m = fam.session
    assert (m.AWAIT_HELLO, m.AWAIT_RESUME, m.AWAIT_WELCOME, m.OPEN, m.CLOSED) == (0, 1, 1, 2, 3)
    assert m.IMPLEMENTATION == fam.name
    assert callable(m.fanout)


def test_selector():
    import tillwire.core.session as selected

    expected = "python" if NO_EXTENSIONS else "native"
    assert selected.IMPLEMENTATION == expected
    module = both("session")[expected]
    assert selected.ServerSession is module.ServerSession
    assert selected.ClientSession is module.ClientSession
    assert selected.fanout is module.fanout
    assert selected.Encoder is _family(expected).Encoder


# ---------------------------------------------------------------- server: handshake


def test_server_fresh_state(fam):
    s = server(fam, now=5.0)
    assert s.state == fam.session.AWAIT_HELLO
    assert (s.started, s.last_seen, s.heartbeat_ms, s.close_code, s.dirty) == (5.0, 5.0, 0, 0, False)
    assert s.max_queued_bytes == 1 << 20 and s.lane_weights == (8, 4, 1)
    assert not s.pending and s.queued_bytes == 0
    assert s.data_to_send(100, 5.0) == b""
    assert s.lane_counters() == (0, 0, 0) and s.take_resync() == []
    assert s.inbox_window(0) == (0, 0) and s.inbox_window(1) == (0, 0)


def test_server_hello_must_come_first(fam):
    s = server(fam)
    assert s.receive_data(PING + HELLO, 1.0) == []
    assert s.state == fam.session.CLOSED and s.close_code == Code.UNEXPECTED_FRAME
    assert closed_with(out_frames(s), Code.UNEXPECTED_FRAME) == "PING: the first frame must be HELLO"
    # A closed session ignores input and does not move last_seen.
    assert s.receive_data(HELLO, 2.0) == [] and s.last_seen == 1.0
    assert s.data_to_send(100, 2.0) == b""


def test_server_extension_frame_first_is_unexpected(fam):
    s = server(fam)
    assert s.receive_data(ext(0x41, b"x"), 0.0) == []
    assert closed_with(out_frames(s), Code.UNEXPECTED_FRAME) == "0x41: the first frame must be HELLO"


def test_server_before_resume_only_resume_ping_close(fam):
    s = server(fam)
    frames = s.receive_data(HELLO + PING + ext(0x50), 1.0)
    assert types_of(frames) == [FrameType.HELLO]
    assert s.state == fam.session.AWAIT_RESUME
    assert decode(s.data_to_send(100, 1.0)) == decode(wire(FrameType.PONG, payload=b"hi"))
    assert s.receive_data(SEND + RESUME, 2.0) == []
    assert closed_with(out_frames(s), Code.UNEXPECTED_FRAME) == \
        "SEND: only RESUME, PING or CLOSE may follow HELLO"
    s = server(fam)
    assert types_of(s.receive_data(HELLO + wire(FrameType.PONG), 1.0)) == [FrameType.HELLO]
    assert closed_with(out_frames(s), Code.UNEXPECTED_FRAME) == \
        "PONG: only RESUME, PING or CLOSE may follow HELLO"


def test_server_close_before_resume(fam):
    s = server(fam)
    frames = s.receive_data(HELLO + wire(FrameType.CLOSE, code=Code.NORMAL, payload=b"bye") + PING, 0)
    assert types_of(frames) == [FrameType.HELLO, FrameType.CLOSE]
    assert s.state == fam.session.CLOSED and s.close_code == Code.NORMAL
    assert s.data_to_send(100, 0) == b""      # a peer's CLOSE is not answered


@pytest.mark.parametrize("late", [HELLO, RESUME])
def test_server_after_resume_no_hello_or_resume(fam, late):
    s = opened(fam)
    assert s.receive_data(late, 1.0) == []
    name = FrameType(late[1]).name
    assert closed_with(out_frames(s), Code.UNEXPECTED_FRAME) == f"{name}: not allowed in an open session"


@pytest.mark.parametrize("ftype", [FrameType.WELCOME, FrameType.GOAWAY, FrameType.ERROR,
                                   FrameType.SENDACK, FrameType.DELIVER, FrameType.BROADCAST,
                                   FrameType.SUBSCRIBED, FrameType.UNSUBSCRIBED, FrameType.RESYNC,
                                   FrameType.HISTORY_ITEM, FrameType.HISTORY_END])
def test_server_rejects_server_to_terminal_frames(fam, ftype):
    s = opened(fam)
    fields = {"kind": "price.update"} if ftype in (FrameType.DELIVER, FrameType.BROADCAST,
                                                   FrameType.HISTORY_ITEM) else {}
    frames = s.receive_data(SEND + wire(ftype, **fields) + SEND, 1.0)
    assert types_of(frames) == [FrameType.SEND]
    assert s.close_code == Code.UNEXPECTED_FRAME
    assert closed_with(out_frames(s), Code.UNEXPECTED_FRAME) == \
        f"{ftype.name}: not allowed in an open session"


def test_server_open_frames_returned(fam):
    s = opened(fam)
    data = (SEND + wire(FrameType.SUBSCRIBE, Lane.P2, ref=1, to="store:acme/1")
            + wire(FrameType.UNSUBSCRIBE, Lane.P2, ref=2, to="store:acme/1")
            + wire(FrameType.HISTORY, Lane.P3, ref=3, count=5, to="store:acme/1")
            + wire(FrameType.RECEIPT, msg_id=9, code=ReceiptStatus.READ)
            + wire(FrameType.PONG) + ext(0x7F, b"ignored"))
    frames = s.receive_data(data, 3.0)
    assert types_of(frames) == [FrameType.SEND, FrameType.SUBSCRIBE, FrameType.UNSUBSCRIBE,
                                FrameType.HISTORY, FrameType.RECEIPT]
    assert tuples(frames) == decode(data)[:5]
    assert s.last_seen == 3.0 and not s.pending


def test_server_receipt_must_be_read(fam):
    s = opened(fam)
    assert s.receive_data(wire(FrameType.RECEIPT, msg_id=9, code=ReceiptStatus.ACKED), 0) == []
    frames = out_frames(s)
    assert [f[0] for f in frames] == [FrameType.ERROR]
    assert frames[0][3]["code"] == Code.BAD_REQUEST
    assert frames[0][2] == b"RECEIPT: a terminal may only send READ"
    assert s.state == fam.session.OPEN


def test_server_ping_pong_echo_one_pong_at_a_time(fam):
    # One PONG pending per connection: a further PING, and all that came
    # after it, waits until data_to_send drained the PONG before it.
    s = opened(fam)
    big = bytes(range(256)) * 4                     # compressed both ways
    data = wire(FrameType.PING, payload=b"abc") + wire(FrameType.PING) + \
        wire(FrameType.PING, payload=big) + SEND
    assert s.receive_data(data, 0) == []
    assert s.input_held and s.control_bytes == len(wire(FrameType.PONG, payload=b"abc"))
    assert s.receive_data(b"", 0) == [] and s.input_held      # its PONG is still queued
    assert s.data_to_send(10, 0) == wire(FrameType.PONG, payload=b"abc")
    assert s.receive_data(b"", 0) == [] and s.input_held      # the second answered, the third waits
    assert s.data_to_send(10, 0) == wire(FrameType.PONG)
    frames = s.receive_data(b"", 0)
    assert not s.input_held and tuples(frames) == decode(SEND)
    assert s.data_to_send(10, 0) == wire(FrameType.PONG, payload=big)
    assert not s.pending and s.control_bytes == 0


def test_server_held_input_takes_new_data_after_it(fam):
    s = opened(fam)
    assert s.receive_data(PING + PING + SEND[:5], 0) == [] and s.input_held
    assert s.receive_data(SEND[5:] + SEND, 0) == []           # added behind what waits
    s.data_to_send(100, 0)
    assert tuples(s.receive_data(b"", 0)) == decode(SEND + SEND)
    assert not s.input_held and s.data_to_send(100, 0) == wire(FrameType.PONG, payload=b"hi")


def test_server_held_input_is_dropped_by_close(fam):
    s = opened(fam)
    s.receive_data(PING + PING + SEND, 0)
    s.close(Code.SLOW_CONSUMER, "x")
    assert not s.input_held and s.receive_data(b"", 0) == []


def test_server_control_frames_drain_by_max_bytes_at_least_one(fam):
    s = opened(fam)
    frames = [wire(FrameType.PONG, payload=bytes([i]) * 10) for i in range(5)]
    for f in frames:
        s.control(f)
    assert s.control_bytes == sum(map(len, frames)) == s.queued_bytes
    assert s.data_to_send(1, 0) == frames[0]                  # at least one whole frame
    assert s.data_to_send(2 * len(frames[1]), 0) == frames[1] + frames[2]
    assert s.control_bytes == 2 * len(frames[3])
    assert s.data_to_send(1 << 20, 0) == frames[3] + frames[4]
    assert s.control_bytes == 0 and not s.pending


def test_server_frame_limit_before_hello_is_the_handshake_limit(fam):
    s = fam.session.ServerSession(fam.Encoder(), max_frame_size=1 << 20, handshake_frame_size=64)
    assert s.receive_data(b"\x80\x01", 0) == []             # a 128-byte frame announced
    assert s.state == fam.session.CLOSED and s.close_code == Code.FRAME_TOO_LARGE
    s = fam.session.ServerSession(fam.Encoder(), max_frame_size=1 << 20, handshake_frame_size=64)
    payload = b"x" * 200
    data = HELLO + RESUME + wire(FrameType.PING, payload=payload)
    assert types_of(s.receive_data(data, 0)) == [FrameType.HELLO, FrameType.RESUME]
    assert s.state == fam.session.OPEN                        # the full limit after HELLO
    assert s.data_to_send(1 << 20, 0) == wire(FrameType.PONG, payload=payload)


def test_server_ping_split_byte_by_byte(fam):
    s = server(fam)
    data = HELLO + RESUME + PING + SEND
    frames = []
    for i in range(len(data)):
        frames += s.receive_data(data[i:i + 1], float(i))
    assert tuples(frames) == [decode(HELLO)[0], decode(RESUME)[0], decode(SEND)[0]]
    assert s.data_to_send(100, 0) == wire(FrameType.PONG, payload=b"hi")


def test_server_accepts_bytearray_and_memoryview(fam):
    s = server(fam)
    assert types_of(s.receive_data(bytearray(HELLO), 0)) == [FrameType.HELLO]
    assert types_of(s.receive_data(memoryview(RESUME + SEND)[:len(RESUME) + 3], 0)) == [FrameType.RESUME]
    assert types_of(s.receive_data(memoryview(SEND)[3:], 0)) == [FrameType.SEND]
    with pytest.raises(TypeError):
        s.receive_data("text", 0)


def test_server_large_frame_in_small_reads(fam):
    s = opened(fam)
    body = os.urandom(100_000)                       # incompressible: sent as is
    data = wire(FrameType.PING, payload=body) + SEND
    frames = []
    for i in range(0, len(data), 999):
        frames += s.receive_data(data[i:i + 999], 0)
    assert tuples(frames) == decode(SEND)
    assert s.data_to_send(1, 0) == wire(FrameType.PONG, payload=body)


def test_native_pending_frame_buffer():
    """Only the bytes of an incomplete frame are held, as they arrive, and freed when it completes."""
    fam = _family("native")
    s = opened(fam)
    big = wire(FrameType.PING, payload=os.urandom(200_000))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        s.receive_data(big[:4], 0)                   # the prefix announces ~200 KB
        assert tracemalloc.get_traced_memory()[0] - base < 1024
        s.receive_data(big[4:100_000], 0)
        assert 100_000 <= tracemalloc.get_traced_memory()[0] - base < 250_000
        s.receive_data(big[100_000:], 0)
        s.data_to_send(1 << 20, 0)
        assert tracemalloc.get_traced_memory()[0] - base < 1024
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------- server: protocol errors


@pytest.mark.parametrize("bad, code", [
    (b"\x02\x00\x00", Code.UNKNOWN_FRAME),
    (b"\x02\x03\x40", Code.BAD_FLAGS),
    (b"\x01", Code.MALFORMED),
    (b"\x80\x00", Code.BAD_VARINT),
    (b"\xff\xff\xff\xff", Code.FRAME_TOO_LARGE),
    (b"\x03\x14\x00\x80", Code.MALFORMED),            # ACK whose seq runs past the frame
])
def test_server_protocol_error_keeps_earlier_frames(fam, bad, code):
    s = opened(fam)
    s.set_inbox(0, 0)
    s.deliver(0, 1, 100, "payment.result", b"{}")
    s.data_to_send(1 << 20, 0)
    frames = s.receive_data(SEND + PING + ack(0, 1) + bad + SEND, 1.0)
    assert types_of(frames) == [FrameType.SEND, FrameType.ACK]
    assert s.state == fam.session.CLOSED and s.close_code == code
    out = out_frames(s)
    assert [f[0] for f in out] == [FrameType.PONG, FrameType.CLOSE]
    assert closed_with(out, code)                   # the decoder's message, not empty
    assert s.receive_data(SEND, 2.0) == []


def test_server_prefix_error_split_across_reads(fam):
    s = opened(fam, max_frame_size=64)
    assert s.receive_data(SEND + b"\xc1", 0) != []
    assert s.state == fam.session.OPEN
    assert s.receive_data(b"", 0) == []
    assert s.receive_data(b"\x01", 0) == []         # length 193 > 64
    assert s.close_code == Code.FRAME_TOO_LARGE
    closed_with(out_frames(s), Code.FRAME_TOO_LARGE)


def test_server_frame_limit(fam):
    s = opened(fam, max_frame_size=64)
    ok = wire(FrameType.PING, payload=b"x" * 62)
    assert s.receive_data(ok, 0) == [] and s.state == fam.session.OPEN
    s.receive_data(wire(FrameType.PING, payload=b"x" * 63), 0)
    assert s.close_code == Code.FRAME_TOO_LARGE


def test_server_rejects_bad_max_frame_size(fam):
    with pytest.raises(ValueError):
        server(fam, max_frame_size=10)
    with pytest.raises(TypeError):
        server(fam, max_frame_size="big")


def test_server_frames_after_close_are_not_returned(fam):
    s = opened(fam)
    close = wire(FrameType.CLOSE, code=Code.NORMAL)
    frames = s.receive_data(SEND + close + SEND + b"\x00garbage", 0)
    assert types_of(frames) == [FrameType.SEND, FrameType.CLOSE]
    assert s.close_code == Code.NORMAL and s.data_to_send(100, 0) == b""


# ---------------------------------------------------------------- server: inbox windows


def test_server_ack_window(fam):
    s = opened(fam)
    s.set_inbox(0, 3)
    s.set_inbox(1, 10)
    assert s.inbox_window(0) == (3, 3) and s.inbox_window(1) == (10, 10)
    for seq in (4, 5, 6):
        s.deliver(0, seq, 100 + seq, "payment.result", b"{}")
    assert s.inbox_window(0) == (3, 6)
    s.data_to_send(1 << 20, 0)
    frames = s.receive_data(ack(0, 5) + ack(0, 4) + ack(0, 5) + ack(0, 7) + ack(1, 11)
                            + ack(2, 1) + ack(0, 6), 0)
    assert tuples(frames) == decode(ack(0, 5) + ack(0, 6))        # stale ACKs dropped
    assert s.inbox_window(0) == (6, 6)
    out = out_frames(s)
    assert [f[0] for f in out] == [FrameType.ERROR] * 3
    assert all(f[3]["code"] == Code.BAD_REQUEST and f[3]["ref"] == 0 for f in out)
    assert [f[2] for f in out] == [b"ACK: P0 seq 7 was never delivered",
                                   b"ACK: P1 seq 11 was never delivered",
                                   b"ACK: lane must be P0 or P1"]
    assert s.state == fam.session.OPEN


def test_server_nack_window(fam):
    s = opened(fam)
    for seq in (1, 2, 3):
        s.deliver(1, seq, seq, "chat.message", b"{}")
    s.receive_data(ack(1, 1), 0)
    s.data_to_send(1 << 20, 0)
    frames = s.receive_data(nack(1, 1) + nack(1, 2, 34) + nack(1, 3) + nack(1, 4)
                            + nack(3, 2) + nack(0, 1), 0)
    assert tuples(frames) == decode(nack(1, 2, 34) + nack(1, 3))
    out = out_frames(s)
    assert [f[2] for f in out] == [b"NACK: P1 seq 1 is not awaiting an ack",
                                   b"NACK: P1 seq 4 is not awaiting an ack",
                                   b"NACK: lane must be P0 or P1",
                                   b"NACK: P0 seq 1 is not awaiting an ack"]
    assert s.inbox_window(1) == (1, 3)


def test_server_deliver(fam):
    s = opened(fam)
    assert s.deliver(0, 1, 11, "payment.result", b'{"a":1}') == fam.lanes.ACCEPTED
    assert s.deliver(1, 1, 12, "chat.message", b"{}", retransmit=True) == fam.lanes.ACCEPTED
    assert s.deliver(Lane.P0, 2, 13, "payment.result", b"{}") == fam.lanes.ACCEPTED
    s.deliver(0, 1, 11, "payment.result", b"{}")            # a retransmit: sent stays 2
    assert s.inbox_window(0) == (0, 2) and s.inbox_window(1) == (0, 1)
    assert s.pending and s.queued_bytes > 0
    out = s.data_to_send(1 << 20, 0)
    assert decode(out) == decode(
        wire(FrameType.DELIVER, Flag.ACK_REQUESTED, b'{"a":1}', seq=1, msg_id=11, kind="payment.result")
        + wire(FrameType.DELIVER, Flag.ACK_REQUESTED, b"{}", seq=2, msg_id=13, kind="payment.result")
        + wire(FrameType.DELIVER, Flag.ACK_REQUESTED, b"{}", seq=1, msg_id=11, kind="payment.result")
        + wire(FrameType.DELIVER, Flag.ACK_REQUESTED | Flag.RETRANSMIT | Lane.P1, b"{}", seq=1,
               msg_id=12, kind="chat.message"))
    with pytest.raises(ValueError, match="inbox lanes"):
        s.deliver(2, 1, 1, "price.update", b"{}")
    with pytest.raises(ValueError):
        s.deliver(0, -1, 1, "payment.result", b"{}")        # the encoder's check
    assert s.inbox_window(0) == (0, 2)


# ---------------------------------------------------------------- server: output


def test_server_output_order_and_close(fam):
    s = opened(fam)
    s.push(Lane.P2, broadcast(1, 1))
    s.deliver(0, 1, 1, "payment.result", b"{}")
    s.control(b"\x02\x04\x00")                              # an encoded PONG
    s.error(Code.FORBIDDEN, 5, "no")
    s.goaway(Code.DRAINING, 2500, "bye")
    out = out_frames(s)
    assert [f[0] for f in out] == [FrameType.PONG, FrameType.ERROR, FrameType.GOAWAY,
                                   FrameType.DELIVER, FrameType.BROADCAST]
    assert out[2][3]["delay"] == 2500 and out[2][2] == b"bye"
    assert out[1][3]["ref"] == 5

    s.push(Lane.P3, broadcast(2, 1, Lane.P3))
    s.deliver(1, 1, 2, "chat.message", b"{}")
    s.error(Code.FORBIDDEN, 6, "first")
    s.close(Code.KICKED, "kicked")
    s.close(Code.NORMAL, "again")                           # a second close does nothing
    assert s.state == fam.session.CLOSED and s.close_code == Code.KICKED
    assert s.queued_bytes == len(wire(FrameType.ERROR, code=Code.FORBIDDEN, ref=6, payload=b"first")) + \
        len(wire(FrameType.CLOSE, code=Code.KICKED, payload=b"kicked"))
    out = out_frames(s)
    assert [f[0] for f in out] == [FrameType.ERROR, FrameType.CLOSE]     # lanes cleared
    assert out[1][2] == b"kicked"
    assert not s.pending


def test_server_data_to_send_max_bytes(fam):
    s = opened(fam)
    frames = [broadcast(1, i, payload=b"x" * 20) for i in range(1, 6)]
    for f in frames:
        s.push(Lane.P2, f)
    s.control(PING)
    first = s.data_to_send(len(PING) + 1, 0)                # control, then at least one lane frame
    assert first == PING + frames[0]
    assert s.data_to_send(len(frames[0]) * 2, 0) == frames[1] + frames[2]
    assert s.data_to_send(0, 0) == b""
    assert s.data_to_send(-5, 0) == b""
    s.control(PING)
    assert s.data_to_send(1, 0) == PING                     # control alone reaches max_bytes
    assert s.data_to_send(1 << 70, 0) == frames[3] + frames[4]
    assert not s.pending


def test_server_push_errors(fam):
    s = opened(fam)
    with pytest.raises(ValueError):
        s.push(4, b"x")
    with pytest.raises(TypeError):
        s.push("1", b"x")
    with pytest.raises(TypeError):
        s.push(1, "not bytes")
    with pytest.raises(TypeError):
        s.push(2, b"x", key=["unhashable"])
    assert s.push(2, b"x", key=("k", 1), channel="c") == fam.lanes.ACCEPTED
    assert s.push(2, b"y", key=("k", 1), channel="c") == fam.lanes.CONFLATED
    assert s.lane_counters() == (1, 0, 0)


def test_server_control_frames_must_be_bytes(fam):
    s = opened(fam)
    s.control(PING)
    with pytest.raises(TypeError):
        s.control(12345)
    assert s.control_bytes == len(PING) and s.data_to_send(100, 0) == PING


def test_server_deadline(fam):
    s = server(fam, now=100.0)
    assert s.deadline(10.0) == 110.0
    s.receive_data(HELLO, 104.0)
    assert s.deadline(10.0) == 110.0                        # until accept(), from the start
    s.accept(1, 2000, 0, 1 << 20, 0)
    assert s.heartbeat_ms == 2000
    assert s.deadline(10.0) == 104.0 + 3.0
    s.receive_data(PING, 106.5)
    assert s.deadline(10.0) == 109.5


def test_server_accept_encodes_welcome(fam):
    s = server(fam)
    s.receive_data(HELLO, 0)
    s.accept(1, 30000, 123456, 65536, 7, b'{"node":"n1"}')
    assert s.data_to_send(1, 0) == wire(FrameType.WELCOME, version=1, heartbeat=30000, time=123456,
                                        max_frame=65536, epoch=7, payload=b'{"node":"n1"}')


def test_server_inbox_bytes_count_p0_p1_only(fam):
    s = opened(fam)
    assert s.inbox_bytes == 0                               # no scheduler yet
    s.push(Lane.P3, b"offer" * 20)
    s.push(Lane.P2, b"price", key="k")
    assert s.inbox_bytes == 0 and s.queued_bytes > 0
    s.push(Lane.P0, b"p" * 7)
    s.push(Lane.P1, b"q" * 5)
    assert s.inbox_bytes == 12
    s.data_to_send(7, 0)                                    # P0 leaves first
    assert s.inbox_bytes == 5


def test_server_release_lanes(fam):
    s = opened(fam)
    assert s.release_lanes() is None                        # nothing to release
    s.push(Lane.P1, b"frame")
    assert s.release_lanes() is None
    assert s.pending                                        # not released while queued
    assert s.data_to_send(100, 0) == b"frame"
    assert s.release_lanes() == (0, 0, 0)
    assert s.lane_counters() == (0, 0, 0) and s.queued_bytes == 0 and not s.pending
    s.push(Lane.P2, b"a", key="k")
    s.push(Lane.P2, b"b", key="k")
    s.data_to_send(100, 0)
    # Released with its counters handed to the caller; a new scheduler starts at 0.
    assert s.release_lanes() == (1, 0, 0)
    assert s.lane_counters() == (0, 0, 0)


def test_server_nothing_queued_after_close(fam):
    s = opened(fam)
    s.close(Code.KICKED, "bye")
    assert s.push(Lane.P2, b"late") == 2                     # DROPPED
    assert s.deliver(Lane.P0, 1, 1, "payment.result", b"{}") == 2
    s.control(b"late control")
    s.error(Code.FORBIDDEN, 1, "late")
    s.goaway(Code.DRAINING, 10)
    dirty = []
    assert fam.session.fanout([s], Lane.P2, b"late fanout", None, 0.0, None, dirty) == []
    assert dirty == []                                       # not marked: nothing to write
    out = s.data_to_send(1 << 20, 0)
    assert out.endswith(b"bye") and b"late" not in out


def test_server_take_resync_on_shed(fam):
    s = opened(fam, max_queued_bytes=100)
    for i in range(6):
        s.push(Lane.P2, bytes(30), key=("k", i), channel="prices")
    assert s.take_resync() == ["prices"]
    assert s.take_resync() == []
    assert s.lane_counters()[1] > 0


def test_server_lane_weights_checked_on_first_push(fam):
    s = opened(fam, lane_weights=[0, 1, 1])
    assert s.lane_weights == (0, 1, 1)
    with pytest.raises(ValueError):
        s.push(1, b"x")


# ---------------------------------------------------------------- server: fanout


def test_fanout_dict_list_and_dirty(fam):
    sessions = [opened(fam) for _ in range(4)]
    sessions[1].dirty = True
    frame = broadcast(3, 1)
    dirty = []
    assert fam.session.fanout(dict.fromkeys(sessions), Lane.P2, frame, ("k", 1), 0.0, "ch", dirty) == []
    assert dirty == [sessions[0], sessions[2], sessions[3]]
    assert all(s.dirty for s in sessions)
    for s in sessions:
        s.dirty = False
    dirty = []
    frame2 = broadcast(3, 2)
    assert fam.session.fanout(sessions[:2], Lane.P2, frame2, ("k", 1), 0.0, "ch", dirty) == []
    assert dirty == sessions[:2]
    assert sessions[0].lane_counters() == (1, 0, 0)       # conflated by key
    assert sessions[0].data_to_send(1000, 0) == frame2
    assert sessions[3].data_to_send(1000, 0) == frame
    # Any iterable; dirty=None marks nothing.
    assert fam.session.fanout(iter(sessions), Lane.P3, frame, None, 5.0) == []
    assert not any(s.dirty for s in sessions[2:])
    assert sessions[2].data_to_send(1000, 1.0) == frame + frame
    assert sessions[3].data_to_send(1000, 6.0) == b""      # its P3 copy expired at 5.0


def test_fanout_overflow(fam):
    small = [opened(fam, max_queued_bytes=50) for _ in range(2)]
    big = opened(fam)
    frame = bytes(30)
    dirty = []
    assert fam.session.fanout([small[0], big, small[1]], Lane.P1, frame, dirty=dirty) == []
    over = fam.session.fanout({small[0]: 1, big: 2, small[1]: 3}, Lane.P1, frame, dirty=dirty)
    assert over == [small[0], small[1]]
    assert dirty == [small[0], big, small[1]]


def test_fanout_argument_errors(fam):
    s = opened(fam)
    assert fam.session.fanout([], 9, "not even bytes") == []     # nothing to push, nothing checked
    with pytest.raises(ValueError):
        fam.session.fanout([s], 9, b"x")
    with pytest.raises(TypeError):
        fam.session.fanout({s: None}, 1, "x")
    with pytest.raises(TypeError):
        fam.session.fanout([s], 2, b"x", key={})


def test_fanout_dict_changed_during_iteration(fam):
    class Growing(fam.session.ServerSession):
        __slots__ = ("group",)

        def push(self, lane, frame, key=None, deadline=0.0, channel=None):
            self.group[object()] = None
            return 0

    g = Growing(fam.Encoder())
    g.group = {}
    g.group[g] = None
    g.group[opened(fam)] = None
    with pytest.raises(RuntimeError):
        fam.session.fanout(g.group, 1, b"x")


def test_fanout_iterable_errors(fam):
    s = opened(fam)

    def sessions():
        yield s
        raise LookupError("source failed")

    with pytest.raises(LookupError):
        fam.session.fanout(sessions(), 1, b"x")
    assert s.data_to_send(100, 0) == b"x"            # the first one was pushed
    with pytest.raises(TypeError):
        fam.session.fanout(None, 1, b"x")


def test_fanout_large_mixed_groups(fam):
    # Enough sessions for the native fanout's prefetch pipeline (which looks
    # up to 8 sessions ahead) to run over every kind of member: sessions with
    # no scheduler yet, with a released one, with a P2 key table (more than 8
    # keys queued), closed ones, subclasses overriding push() and non-sessions.
    calls = []

    class Counting(fam.session.ServerSession):
        __slots__ = ()

        def push(self, lane, frame, key=None, deadline=0.0, channel=None):
            calls.append(self)
            return super().push(lane, frame, key, deadline, channel)

    members, backlogged = [], []
    for i in range(60):
        if i % 11 == 5:
            members.append(_Fake(0))
        elif i % 13 == 7:
            c = Counting(fam.Encoder())
            c.receive_data(HELLO + RESUME, 0.0)
            c.accept(1, 30000, 1000, 1 << 20, 1)
            c.data_to_send(1 << 20, 0.0)
            members.append(c)
        else:
            s = opened(fam)
            if i % 4 == 1:
                for k in range(12):
                    s.push(Lane.P2, b"old%d" % k, ("sku", k))
                backlogged.append(s)
            elif i % 4 == 2:
                s.push(Lane.P3, b"gone")
                s.data_to_send(1 << 20, 0.0)
                s.release_lanes()
            elif i % 9 == 3:
                s.close(Code.NORMAL)
                s.data_to_send(1 << 20, 0.0)
            members.append(s)
    live = [m for m in members if not isinstance(m, _Fake) and m.state == fam.session.OPEN]
    frames = [broadcast(3, 1), broadcast(3, 2)]
    for container, frame in zip((dict.fromkeys(members), list(members)), frames):
        for m in members:
            m.dirty = False
        dirty = []
        assert fam.session.fanout(container, Lane.P2, frame, ("sku", 3), 0.0, "ch", dirty) == []
        assert dirty == [m for m in members if isinstance(m, _Fake) or m.state == fam.session.OPEN]
    assert len(calls) == 2 * sum(isinstance(m, Counting) for m in members) > 0
    for m in members:
        if isinstance(m, _Fake):
            assert [p[2] for p in m.pushed] == [("sku", 3)] * 2
            continue
        out = m.data_to_send(1 << 20, 0.0)
        if m not in live:
            assert out == b""
            continue
        # The second broadcast replaced the first (same key); older keys stay ahead.
        expected = b"".join(b"old%d" % k for k in range(12) if k != 3) if m in backlogged else b""
        assert out == expected + frames[1]


def test_fanout_container_changed_by_a_push(fam):
    # A push that removes (and so frees) the sessions ahead, whose memory the
    # native fanout may have started prefetching: a list is read live by
    # index, as Python's own iteration does; a dict stops with RuntimeError.
    class Pruning(fam.session.ServerSession):
        __slots__ = ("container",)

        def push(self, lane, frame, key=None, deadline=0.0, channel=None):
            if type(self.container) is list:
                del self.container[3:20]
            else:
                for m in list(self.container)[3:20]:
                    del self.container[m]
            return super().push(lane, frame, key, deadline, channel)

    for kind in (list, dict.fromkeys):
        head = [opened(fam) for _ in range(2)]
        pruner = Pruning(fam.Encoder())
        pruner.receive_data(HELLO + RESUME, 0.0)
        pruner.accept(1, 30000, 1000, 1 << 20, 1)
        pruner.data_to_send(1 << 20, 0.0)
        tail = [opened(fam) for _ in range(10)]
        container = kind([*head, pruner, *(opened(fam) for _ in range(17)), *tail])
        pruner.container = container
        if kind is list:
            assert fam.session.fanout(container, Lane.P2, b"f", "k") == []
            assert all(m.data_to_send(100, 0.0) == b"f" for m in [*head, pruner, *tail])
        else:
            with pytest.raises(RuntimeError):
                fam.session.fanout(container, Lane.P2, b"f", "k")
            assert all(m.data_to_send(100, 0.0) == b"f" for m in [*head, pruner])
            assert all(m.data_to_send(100, 0.0) == b"" for m in tail)


_FANOUT_STATES = st.sampled_from(["open", "open", "open", "backlog", "released", "closed",
                                   "fresh", "small"])
_FANOUT_OP = st.tuples(
    st.one_of(                                       # members, by index (repeats dropped)
        st.none(),                                   # all of them
        st.tuples(st.integers(0, 5), st.integers(1, 3)),    # a slice: start, step
        st.lists(st.integers(0, 39), max_size=40)),
    st.booleans(),                                   # a dict (else a list)
    st.integers(0, 3),                               # lane
    st.sampled_from([None, ("sku", 1), ("sku", 2), "k", 3]),   # key
    st.integers(0, 3),                               # frame
    st.sampled_from([0.0, 5.0]),                     # deadline
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states=st.lists(_FANOUT_STATES, min_size=12, max_size=40),
       ops=st.lists(_FANOUT_OP, min_size=1, max_size=12), drain_every=st.integers(1, 5))
def test_differential_fanout_groups(fam_pair, states, ops, drain_every):
    # Both families fan out over the same groups of sessions in every state
    # (the native one prefetching the sessions ahead); what each pushed,
    # marked dirty, overflowed and finally wrote must be the same.
    worlds = []
    for fam in fam_pair:
        sessions = []
        for i, state in enumerate(states):
            if state == "fresh":
                s = server(fam)
            else:
                s = opened(fam, max_queued_bytes=120 if state == "small" else 1 << 20)
                if state == "backlog":
                    for k in range(12):
                        s.push(Lane.P2, b"old%d" % k, ("sku", k + 10))
                elif state == "released":
                    s.push(Lane.P3, b"gone")
                    s.data_to_send(1 << 20, 0.0)
                    s.release_lanes()
                elif state == "closed":
                    s.close(Code.NORMAL)
            sessions.append(s)
        worlds.append((fam, sessions))
    for n, (members, as_dict, lane, key, frame_i, deadline) in enumerate(ops):
        if members is None:
            members = list(range(len(states)))
        elif isinstance(members, tuple):
            members = list(range(len(states)))[members[0]::members[1]]
        else:
            members = list(dict.fromkeys(i for i in members if i < len(states)))
        seen = []
        for fam, sessions in worlds:
            group = [sessions[i] for i in members]
            dirty = []
            over = fam.session.fanout(dict.fromkeys(group) if as_dict else group, lane,
                                      _PUSH_FRAMES[frame_i], key, deadline, "ch", dirty)
            result = [[sessions.index(s) for s in over], [sessions.index(s) for s in dirty]]
            if n % drain_every == 0:
                for s in sessions:
                    s.dirty = False
                    result.append(s.data_to_send(300, 1.0))
            seen.append(result)
        assert seen[0] == seen[1], (n, members)
    finals = [[s.data_to_send(1 << 30, 2.0) for s in sessions] for _, sessions in worlds]
    assert finals[0] == finals[1]


class _Fake:
    """Not a session: fanout just calls push() and uses .dirty."""

    def __init__(self, result):
        self.result = result
        self.dirty = False
        self.pushed = []

    def push(self, lane, frame, key=None, deadline=0.0, channel=None):
        self.pushed.append((lane, frame, key, deadline, channel))
        return self.result


def test_fanout_calls_push_of_other_objects(fam):
    real = opened(fam)
    fakes = [_Fake(0), _Fake(3)]
    dirty = []
    over = fam.session.fanout([fakes[0], real, fakes[1]], 2, b"f", "k", 1.5, "c", dirty)
    assert over == [fakes[1]]
    assert dirty == [fakes[0], real, fakes[1]]
    assert fakes[0].pushed == [(2, b"f", "k", 1.5, "c")]


# ---------------------------------------------------------------- server: subclassing


def test_subclass_with_slots(fam):
    calls = []

    class Conn(fam.session.ServerSession):
        __slots__ = ("transport", "claims", "inbox")
        node = "class attribute"

        def __init__(self):
            super().__init__(fam.Encoder(), max_frame_size=4096, max_queued_bytes=1000,
                             lane_weights=(2, 2, 1), now=3.0)
            self.transport = None
            self.claims = "c"

        def push(self, lane, frame, key=None, deadline=0.0, channel=None):
            calls.append(lane)
            return super().push(lane, frame, key, deadline, channel)

    c = Conn()
    assert (c.started, c.max_queued_bytes, c.lane_weights, c.claims, c.node) == \
        (3.0, 1000, (2, 2, 1), "c", "class attribute")
    if fam.name == "native":            # the twin's base class has a __dict__
        with pytest.raises(AttributeError):
            c.undeclared = 1
    assert types_of(c.receive_data(HELLO + RESUME, 4.0)) == [FrameType.HELLO, FrameType.RESUME]
    c.inbox = [1]
    dirty = []
    assert fam.session.fanout({c: None}, 3, b"p3", dirty=dirty) == []
    assert calls == [3] and dirty == [c] and c.dirty
    assert c.data_to_send(100, 4.0) == b"p3"
    assert hash(c) == hash(c) and {c: 1}[c] == 1
    del c
    gc.collect()


def test_subclass_cycle_is_collected(fam):
    """A session in a reference cycle (through a slot or its control queue) is collected."""
    freed = []

    class Marker:
        def __del__(self):
            freed.append(1)

    class Conn(fam.session.ServerSession):
        __slots__ = ("me",)

    a = Conn(fam.Encoder())
    a.me = (a, Marker())
    class Held(bytes):
        pass

    b = Conn(fam.Encoder())
    b.me = Marker()
    frame = Held(PING)
    frame.owner = b
    b.control(frame)
    del a, b, frame
    gc.collect()
    assert freed == [1, 1]


# ---------------------------------------------------------------- server: memory (native)


def test_native_idle_session_memory():
    fam = _family("native")
    enc = fam.Encoder()

    class Conn(fam.session.ServerSession):
        __slots__ = ("transport", "claims", "address", "paused", "timer", "inbox", "extra")

    bare = fam.session.ServerSession(enc)
    assert sys.getsizeof(bare) <= 192
    n = 2000
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        conns = []
        for _ in range(n):
            c = Conn(enc)
            c.receive_data(HELLO, 0.0)
            c.accept(1, 30000, 0, 1 << 20, 0)
            c.receive_data(RESUME, 0.0)
            c.data_to_send(1 << 16, 0.0)
            conns.append(c)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    per = sum(s.size_diff for s in after.compare_to(before, "filename")) / n
    assert per < 300, per                  # the object itself (240 with 7 slots) + list slot


# ---------------------------------------------------------------- client


def test_client_fresh_state(fam):
    c = client(fam, now=2.0)
    assert c.state == fam.session.AWAIT_HELLO
    assert (c.version, c.heartbeat_ms, c.server_time, c.peer_max_frame, c.epoch) == (0, 0, 0, 0, 0)
    assert (c.close_code, c.close_reason, c.last_received, c.last_sent, c.duplicates) == (0, "", 2.0, 2.0, 0)
    assert list(c.processed) == [0, 0] and list(c.received) == [0, 0]
    assert c.channel_positions == {} and c.outstanding == set()
    assert not c.pending and c.data_to_send(3.0) == b"" and c.last_sent == 2.0


def test_client_hello_and_resume_encoding(fam):
    c = client(fam)
    c.hello("tok", 15000, b'{"client":"t"}')
    with pytest.raises(RuntimeError):
        c.hello("tok")
    assert c.state == fam.session.AWAIT_WELCOME
    c.resume(3, 10, 4, {("prices", 2): (1, 40), ("prices", Lane.P3): (2, 7), ("stock", 2): (1, 1)})
    assert c.epoch == 3 and list(c.processed) == [10, 4] and list(c.received) == [10, 4]
    assert c.channel_positions == {("prices", 2): (1, 40), ("prices", 3): (2, 7), ("stock", 2): (1, 1)}
    assert c.pending
    out = c.data_to_send(9.0)
    assert c.last_sent == 9.0
    payload = orjson.dumps({"channels": {"prices": {"P2": [1, 40], "P3": [2, 7]}, "stock": {"P2": [1, 1]}}})
    assert out == wire(FrameType.HELLO, version=1, heartbeat=15000, token="tok",
                       payload=b'{"client":"t"}') + \
        wire(FrameType.RESUME, epoch=3, p0=10, p1=4, payload=payload)
    c2 = client(fam)
    c2.resume()
    assert c2.data_to_send(0) == wire(FrameType.RESUME)


def test_client_frames_before_hello_or_welcome(fam):
    c = client(fam)
    assert c.receive_data(WELCOME, 0) == []
    assert c.close_code == Code.UNEXPECTED_FRAME
    assert c.close_reason == "WELCOME: unexpected from the server now"
    assert decode(c.data_to_send(0)) == decode(wire(FrameType.CLOSE, code=Code.UNEXPECTED_FRAME,
                                                    payload=c.close_reason.encode()))
    c = client(fam)
    c.hello("t")
    frames = c.receive_data(wire(FrameType.PONG) + ext(0x60) + wire(FrameType.DELIVER, seq=1, kind="order.event"), 0)
    assert frames == [] and c.close_reason == "DELIVER: unexpected from the server now"


def test_client_welcome_version_check(fam):
    c = client(fam)
    c.hello("t")
    c.data_to_send(0)
    assert c.receive_data(wire(FrameType.WELCOME, version=2, heartbeat=5), 0) == []
    assert c.state == fam.session.CLOSED and c.close_code == Code.UNSUPPORTED_VERSION
    assert c.close_reason == "server chose version 2; this terminal speaks 1-1"
    assert c.version == 0 and c.heartbeat_ms == 0


def test_client_welcome_epoch_reset(fam):
    c = client(fam)
    c.hello("t")
    c.resume(1, 5, 6)
    frames = c.receive_data(wire(FrameType.WELCOME, version=1, heartbeat=2000, time=77,
                                 max_frame=9999, epoch=1), 0)
    assert types_of(frames) == [FrameType.WELCOME]
    assert (c.state, c.version, c.heartbeat_ms, c.server_time, c.peer_max_frame) == \
        (fam.session.OPEN, 1, 2000, 77, 9999)
    assert list(c.processed) == [5, 6] and c.epoch == 1         # same epoch: kept
    c = client(fam)
    c.hello("t")
    c.resume(1, 5, 6)
    c.receive_data(wire(FrameType.WELCOME, version=1, epoch=2), 0)
    assert c.epoch == 2 and list(c.processed) == [0, 0] and list(c.received) == [0, 0]


def deliver(lane, seq, retransmit=False, msg_id=1):
    return wire(FrameType.DELIVER, lane | Flag.ACK_REQUESTED | (Flag.RETRANSMIT if retransmit else 0),
                b"{}", seq=seq, msg_id=msg_id, kind="order.event")


def test_client_deliver_duplicates_and_reack(fam):
    c = welcomed(fam)
    frames = c.receive_data(deliver(1, 1) + deliver(1, 2) + deliver(0, 1) + deliver(1, 2), 1.0)
    assert tuples(frames) == decode(deliver(1, 1) + deliver(1, 2) + deliver(0, 1))
    assert c.duplicates == 1 and list(c.received) == [1, 2]
    assert not c.pending                               # nothing processed yet: no re-ack
    c.ack(1, 1)
    c.ack(1, 2)
    c.ack(1, 1)                                        # lower: ignored
    c.ack(0, 1)
    assert list(c.processed) == [1, 2]
    with pytest.raises(ValueError, match="was not received"):
        c.ack(1, 3)
    with pytest.raises(ValueError, match="inbox lanes"):
        c.ack(2, 1)
    assert c.data_to_send(2.0) == wire(FrameType.ACK, Lane.P0, seq=1) + wire(FrameType.ACK, Lane.P1, seq=2)
    assert c.data_to_send(3.0) == b"" and c.last_sent == 2.0
    assert c.receive_data(deliver(1, 2, True) + deliver(1, 1, True), 4.0) == []
    assert c.duplicates == 3
    assert c.data_to_send(4.0) == wire(FrameType.ACK, Lane.P1, seq=2)     # re-ack
    frames = c.receive_data(wire(FrameType.DELIVER, Lane.P2, seq=9, kind="order.event"), 5.0)
    assert frames == [] and c.close_reason == "DELIVER: lane must be P0 or P1"


def subscribed(channel, name, lane, epoch=1, offset=0):
    return wire(FrameType.SUBSCRIBED, lane, channel=channel, epoch=epoch, offset=offset, to=name)


def test_client_broadcast_positions(fam):
    c = welcomed(fam)
    frames = c.receive_data(subscribed(5, "prices", 2) + subscribed(6, "prices", 3, epoch=4), 0)
    assert types_of(frames) == [FrameType.SUBSCRIBED] * 2
    assert c.channel_name(5) == ("prices", 2) and c.channel_name(6) == ("prices", 3)
    data = (broadcast(5, 1) + broadcast(5, 2) + broadcast(6, 1, Lane.P3) + broadcast(5, 2)
            + broadcast(5, 1, retransmit=True) + broadcast(6, 2, Lane.P3))
    frames = c.receive_data(data, 0)
    assert tuples(frames) == decode(broadcast(5, 1) + broadcast(5, 2) + broadcast(6, 1, Lane.P3)
                                    + broadcast(6, 2, Lane.P3))
    assert c.duplicates == 2
    assert c.channel_positions == {("prices", 2): (1, 2), ("prices", 3): (4, 2)}
    # SUBSCRIBED with another epoch resets that stream's position.
    c.receive_data(subscribed(7, "prices", 2, epoch=9), 0)
    assert c.channel_positions[("prices", 2)] == (9, 0)
    # Lane mismatch: the id is P2's, the frame says P3.
    assert c.receive_data(broadcast(5, 3, Lane.P3), 0) == []
    assert c.close_code == Code.UNEXPECTED_FRAME
    assert c.close_reason == "BROADCAST: channel id 5 unknown in this lane"


def test_client_unknown_channel(fam):
    c = welcomed(fam)
    assert c.receive_data(broadcast(42, 1), 0) == []
    assert c.close_reason == "BROADCAST: channel id 42 unknown in this lane"
    c = welcomed(fam)
    assert c.receive_data(wire(FrameType.RESYNC, channel=43), 0) == []
    assert c.close_code == Code.UNEXPECTED_FRAME and c.close_reason == "RESYNC: unknown channel id 43"
    with pytest.raises(KeyError):
        c.channel_name(43)


def test_client_resync_count_bypass(fam):
    c = welcomed(fam)
    c.receive_data(subscribed(1, "stock", 2) + broadcast(1, 5), 0)
    resync = wire(FrameType.RESYNC, channel=1, epoch=2, offset=3, count=2)
    frames = c.receive_data(resync, 0)
    assert types_of(frames) == [FrameType.RESYNC]
    assert c.channel_positions[("stock", 2)] == (2, 3)
    # Two RETRANSMIT frames pass whatever their offset; then suppression again.
    data = broadcast(1, 1, retransmit=True) + broadcast(1, 2, retransmit=True) + broadcast(1, 3, retransmit=True)
    assert tuples(c.receive_data(data, 0)) == decode(broadcast(1, 1, retransmit=True)
                                                     + broadcast(1, 2, retransmit=True))
    assert c.duplicates == 1 and c.channel_positions[("stock", 2)] == (2, 3)
    assert types_of(c.receive_data(broadcast(1, 4), 0)) == [FrameType.BROADCAST]
    # count 0 cancels a pending bypass.
    c.receive_data(wire(FrameType.RESYNC, channel=1, epoch=2, offset=10, count=5), 0)
    c.receive_data(wire(FrameType.RESYNC, channel=1, epoch=2, offset=10, count=0), 0)
    assert c.receive_data(broadcast(1, 9, retransmit=True), 0) == []
    # UNSUBSCRIBED forgets the id.
    assert types_of(c.receive_data(wire(FrameType.UNSUBSCRIBED, channel=1), 0)) == [FrameType.UNSUBSCRIBED]
    with pytest.raises(KeyError):
        c.channel_name(1)


def test_client_sendack_and_error_clear_outstanding(fam):
    c = welcomed(fam)
    c.send(Lane.P1, "store:acme/1", "chat.message", b"{}", ref=1)
    c.send(Lane.P0, "store:acme/1", "payment.result", b"{}", ref=2, receipt=True, ttl_ms=5, key="k")
    c.send(Lane.P1, "store:acme/1", "chat.message", b"{}", ref=0, ack=False)
    with pytest.raises(ValueError):
        c.send(Lane.P1, "x", "chat.message", b"{}", ref=0)
    assert c.outstanding == {1, 2}
    out = c.data_to_send(0)
    assert out == (wire(FrameType.SEND, Lane.P1 | Flag.ACK_REQUESTED, b"{}", ref=1, to="store:acme/1",
                        kind="chat.message")
                   + wire(FrameType.SEND, Flag.ACK_REQUESTED | Flag.RECEIPT_REQUESTED, b"{}", ref=2,
                          ttl=5, to="store:acme/1", kind="payment.result", key="k")
                   + wire(FrameType.SEND, Lane.P1, b"{}", to="store:acme/1", kind="chat.message"))
    frames = c.receive_data(wire(FrameType.SENDACK, ref=1, msg_id=5)
                            + wire(FrameType.ERROR, code=Code.FORBIDDEN, ref=2, payload=b"no")
                            + wire(FrameType.SENDACK, ref=99), 0)
    assert types_of(frames) == [FrameType.SENDACK, FrameType.ERROR, FrameType.SENDACK]
    assert c.outstanding == set()


def test_client_requests_encoding(fam):
    c = welcomed(fam)
    c.nack(1, 3, Code.BAD_MESSAGE, "bad")
    c.subscribe(1, "prices", 2, 3, 4)
    c.unsubscribe(2, "prices", 2)
    c.history(3, "prices", 3, 1, 2, 50)
    c.read(77)
    c.ping(b"p")
    c.close(reason="done")
    c.close(Code.KICKED)                                # already closed
    assert c.state == fam.session.CLOSED and c.close_code == Code.NORMAL and c.close_reason == "done"
    assert c.data_to_send(0) == (
        wire(FrameType.NACK, 1, b"bad", seq=3, code=Code.BAD_MESSAGE)
        + wire(FrameType.SUBSCRIBE, 2, ref=1, epoch=3, offset=4, to="prices")
        + wire(FrameType.UNSUBSCRIBE, 2, ref=2, to="prices")
        + wire(FrameType.HISTORY, 3, ref=3, epoch=1, offset=2, count=50, to="prices")
        + wire(FrameType.RECEIPT, msg_id=77, code=ReceiptStatus.READ)
        + wire(FrameType.PING, payload=b"p")
        + wire(FrameType.CLOSE, code=Code.NORMAL, payload=b"done"))
    assert c.receive_data(PING, 0) == []


def test_client_ping_pong_and_close_from_server(fam):
    c = welcomed(fam)
    assert c.receive_data(wire(FrameType.PING, payload=b"x") + wire(FrameType.PONG), 3.0) == []
    assert c.last_received == 3.0
    assert c.data_to_send(3.0) == wire(FrameType.PONG, payload=b"x")
    frames = c.receive_data(wire(FrameType.GOAWAY, code=Code.DRAINING, delay=5)
                            + wire(FrameType.CLOSE, code=Code.DRAINING, payload=b"dr\xffain")
                            + PING, 4.0)
    assert types_of(frames) == [FrameType.GOAWAY, FrameType.CLOSE]
    assert c.state == fam.session.CLOSED and c.close_code == Code.DRAINING
    assert c.close_reason == "dr\ufffdain"
    assert c.data_to_send(4.0) == b""


def test_client_protocol_error(fam):
    c = welcomed(fam)
    frames = c.receive_data(deliver(0, 1) + b"\x02\x12\xc0", 0)
    assert types_of(frames) == [FrameType.DELIVER]
    assert c.close_code == Code.BAD_FLAGS and c.close_reason
    assert decode(c.data_to_send(0))[-1][3]["code"] == Code.BAD_FLAGS


def test_client_ping_due_and_dead(fam):
    c = client(fam, now=0.0)
    assert not c.ping_due(100.0) and not c.dead(100.0)          # no heartbeat yet
    c.hello("t")
    c.data_to_send(10.0)
    c.receive_data(wire(FrameType.WELCOME, version=1, heartbeat=1000), 10.0)
    assert not c.ping_due(10.5)
    assert c.ping_due(11.0)
    c.ping()
    c.data_to_send(11.2)
    assert not c.ping_due(12.0) and c.ping_due(12.2)
    assert not c.dead(12.0) and c.dead(12.01)
    c.close()
    assert not c.ping_due(20.0) and c.dead(20.0)


# ---------------------------------------------------------------- differential (hypothesis)


def _normalized(data: bytes):
    """`data` itself, or its frames with the text of a decoder-error CLOSE blanked."""
    try:
        frames = decode(data)
    except ProtocolError:
        return data
    if any(f[0] == FrameType.CLOSE and 1 <= f[3]["code"] <= 8 for f in frames):
        return [(t, fl, b"<decoder error>" if t == FrameType.CLOSE and 1 <= fields["code"] <= 8 else p,
                 fields) for t, fl, p, fields in frames]
    return data


def _call(obj, name, *args, **kw):
    """(result, None) or (None, exception type)."""
    try:
        return getattr(obj, name)(*args, **kw), None
    except Exception as exc:      # noqa: BLE001 - the type is what is compared
        return None, type(exc)


def _same_result(name, a, b):
    (ra, ea), (rb, eb) = a, b
    assert ea == eb, (name, ea, eb)
    if name == "receive_data":
        assert tuples(ra or []) == tuples(rb or []), name
    elif name == "data_to_send" and ra is not None:
        assert _normalized(ra) == _normalized(rb), name
    else:
        assert ra == rb, (name, ra, rb)


_lane = st.integers(0, 3)
_seq = st.integers(0, 8)
_small = st.integers(0, 5)


def _mostly(usual, rare):
    """`usual` 11 times in 12 (one_of() would pick each branch about equally)."""
    return st.sampled_from([False] * 11 + [True]).flatmap(lambda odd: rare if odd else usual)


def _server_piece():
    """A frame (or bytes) a terminal might send: mostly what an open session
    takes (so sessions stay open long enough), sometimes anything."""
    ack = st.builds(lambda ln, s: wire(FrameType.ACK, ln, seq=s), st.integers(0, 1), _seq)
    nack_ = st.builds(lambda ln, s, c: wire(FrameType.NACK, ln, seq=s, code=c), st.integers(0, 1), _seq,
                      _small)
    usual = st.one_of(
        ack, ack, nack_,
        st.builds(lambda p: wire(FrameType.PING, payload=p), st.binary(max_size=4)),
        st.just(wire(FrameType.PONG)),
        st.builds(lambda ln, ref: wire(FrameType.SEND, ln | Flag.ACK_REQUESTED, b"{}", ref=ref,
                                       to="t:a/1", kind="chat.message"), _lane, st.integers(1, 4)),
        st.builds(lambda c: wire(FrameType.RECEIPT, msg_id=3, code=c), st.sampled_from([3, 3, 1])),
        st.builds(lambda ln: wire(FrameType.SUBSCRIBE, ln, ref=1, to="c:a/p"), _lane),
        st.just(wire(FrameType.UNSUBSCRIBE, 2, ref=1, to="c:a/p")),
        st.just(wire(FrameType.HISTORY, 2, ref=1, count=3, to="c:a/p")),
        st.builds(lambda t, b: ext(t, b), st.integers(0x40, 0x7F), st.binary(max_size=3)),
    )
    rare = st.one_of(
        st.builds(lambda v, hb: wire(FrameType.HELLO, version=v, heartbeat=hb, token="t"),
                  st.integers(0, 3), st.integers(0, 3000)),
        st.builds(lambda e, a, b: wire(FrameType.RESUME, epoch=e, p0=a, p1=b), _small, _seq, _seq),
        st.just(wire(FrameType.PING, payload=bytes(600))),           # compressed, both ways
        st.builds(lambda c: wire(FrameType.CLOSE, code=c, payload=b"bye"), st.sampled_from([48, 53])),
        st.builds(lambda ln, s: wire(FrameType.ACK, ln, seq=s), st.integers(2, 3), _seq),
        st.builds(lambda ln, s: wire(FrameType.NACK, ln, seq=s), st.integers(2, 3), _seq),
        st.just(wire(FrameType.DELIVER, seq=1, kind="order.event")),
        st.just(wire(FrameType.SENDACK, ref=1)),
        st.just(wire(FrameType.WELCOME, version=1)),
        st.sampled_from([b"\x00", b"\x01", b"\x02\x00\x00", b"\x02\x03\x80", b"\xff\xff\xff\xff",
                         b"\x80\x00", b"\x03\x14\x00\x80", b"\x02\x30\x00"]),
    )
    return _mostly(usual, rare)


_now = st.floats(0, 1000, allow_nan=False)

_SERVER_OPS = st.one_of(
    st.tuples(st.just("feed"), st.integers(1, 48)),
    st.tuples(st.just("feed"), st.integers(1, 48)),
    st.tuples(st.just("feed"), st.integers(1, 48)),
    st.tuples(st.just("accept"), st.integers(0, 5000), _small),
    st.tuples(st.just("set_inbox"), st.integers(0, 1), _seq),
    st.tuples(st.just("deliver"), st.integers(0, 2), st.integers(1, 8), st.booleans()),
    st.tuples(st.just("deliver"), st.integers(0, 1), st.integers(1, 8), st.booleans()),
    st.tuples(st.just("deliver"), st.integers(0, 1), st.integers(1, 8), st.booleans()),
    st.tuples(st.just("push"), _lane, st.integers(0, 3), st.sampled_from([None, "k", ("k", 2)]),
              st.sampled_from([0.0, 5.0, 500.0])),
    st.tuples(st.just("control"), st.integers(0, 3)),
    st.tuples(st.just("error"), st.sampled_from([32, 40]), _small, st.text(max_size=5)),
    st.tuples(st.just("goaway"), st.sampled_from([52, 55]), st.integers(0, 9000), st.text(max_size=5)),
    st.tuples(st.just("close"), st.sampled_from([48, 50, 53]), st.text(max_size=5)),
    st.tuples(st.just("drain"), st.integers(-1, 400), _now),
    st.tuples(st.just("release")),
    st.tuples(st.just("resync")),
    st.tuples(st.just("fanout"), _lane, st.integers(0, 3)),
)

_PUSH_FRAMES = [broadcast(1, 1), broadcast(2, 7, Lane.P3, payload=b"x" * 90),
                wire(FrameType.DELIVER, seq=3, kind="order.event", payload=b"y" * 30), b"\x02\x04\x00"]


@st.composite
def _server_script(draw):
    # Mostly an opened session; the first example hypothesis tries is one.
    start = draw(st.sampled_from([[HELLO, RESUME], [HELLO, RESUME], [], [HELLO]]))
    pieces = start + draw(st.lists(_server_piece(), min_size=2, max_size=25))
    # Inbox messages delivered up front, so the ACKs and NACKs in the stream meet a window.
    ops = draw(st.lists(st.tuples(st.just("deliver"), st.integers(0, 1), st.integers(1, 8), st.booleans()),
                        min_size=1, max_size=4))
    ops += draw(st.lists(_SERVER_OPS, min_size=4, max_size=40))
    kw = draw(st.sampled_from([{}, {"max_frame_size": 64}, {"max_queued_bytes": 120},
                               {"lane_weights": (1, 2, 3)}, {"handshake_frame_size": 64},
                               {"handshake_frame_size": 70, "max_frame_size": 4096}]))
    return b"".join(pieces), ops, kw


def _server_observe(s):
    # After a decoder-error CLOSE the queue holds that CLOSE's (codec-worded) text.
    queued = s.queued_bytes if not 1 <= s.close_code <= 8 else None
    control = s.control_bytes if not 1 <= s.close_code <= 8 else None
    return (s.state, s.close_code, s.pending, queued, control, s.input_held, s.inbox_window(0),
            s.inbox_window(1), s.lane_counters(), s.heartbeat_ms, s.deadline(10.0), s.dirty,
            s.last_seen)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=_server_script())
def test_server_differential(fam_pair, script):
    stream, ops, kw = script
    sessions = [fam.session.ServerSession(fam.Encoder(), now=1.0, **kw) for fam in fam_pair]
    pos = 0
    now = 1.0

    def step(name, *args):
        _same_result(name, *[_call(s, name, *args) for s in sessions])
        assert _server_observe(sessions[0]) == _server_observe(sessions[1]), name

    for op in ops + [("feed", len(stream))]:
        kind = op[0]
        now += 0.25
        if kind == "feed":
            chunk = stream[pos:pos + op[1]]
            pos += len(chunk)
            step("receive_data", chunk, now)
        elif kind == "accept":
            step("accept", 1, op[1], 99, 1 << 20, op[2])
        elif kind == "set_inbox":
            step("set_inbox", op[1], op[2])
        elif kind == "deliver":
            step("deliver", op[1], op[2], 1000 + op[2], "order.event", b"{}", op[3])
        elif kind == "push":
            step("push", op[1], _PUSH_FRAMES[op[2]], op[3], op[4], "chan")
        elif kind == "control":
            step("control", _PUSH_FRAMES[op[1]])
        elif kind == "error":
            step("error", op[1], op[2], op[3])
        elif kind == "goaway":
            step("goaway", op[1], op[2], op[3])
        elif kind == "close":
            step("close", op[1], op[2])
        elif kind == "drain":
            step("data_to_send", op[1], op[2])
        elif kind == "release":
            step("release_lanes")
        elif kind == "resync":
            step("take_resync")
        elif kind == "fanout":
            results = []
            for fam, s in zip(fam_pair, sessions):
                dirty = []
                results.append((fam.session.fanout([s], op[1], _PUSH_FRAMES[op[2]], ("k", 1), 0.0, "ch",
                                                   dirty) == [s], dirty == [s]))
            assert results[0] == results[1]
            assert _server_observe(sessions[0]) == _server_observe(sessions[1])
            for s in sessions:
                s.dirty = False
    # Everything left must come out identically too.
    step("data_to_send", 1 << 30, now + 1)


def _client_piece():
    """A frame (or bytes) a server might send: mostly what an open session takes."""
    chan = st.integers(1, 3)
    usual = st.one_of(
        st.builds(lambda ln, s, r: deliver(ln, s, r), st.integers(0, 1), st.integers(0, 6), st.booleans()),
        st.builds(lambda ln, s, r: deliver(ln, s, r), st.integers(0, 1), st.integers(0, 6), st.booleans()),
        # Channel 1 is P2, channel 2 is P3 (as the scripts subscribe them).
        st.builds(lambda o, r: broadcast(1, o, Lane.P2, r), st.integers(0, 6), st.booleans()),
        st.builds(lambda o, r: broadcast(2, o, Lane.P3, r), st.integers(0, 6), st.booleans()),
        st.builds(lambda o, r: broadcast(1, o, Lane.P2, r), st.integers(0, 6), st.booleans()),
        st.builds(lambda c, name, ln, e: subscribed(c, name, ln, e), chan, st.sampled_from(["a", "b"]),
                  st.integers(2, 3), st.integers(0, 2)),
        st.builds(lambda c, e, o, n: wire(FrameType.RESYNC, channel=c, epoch=e, offset=o, count=n),
                  st.integers(1, 3), st.integers(0, 2), st.integers(0, 6), st.integers(0, 3)),
        st.builds(lambda r: wire(FrameType.SENDACK, ref=r, msg_id=1), st.integers(1, 4)),
        st.builds(lambda r: wire(FrameType.ERROR, code=Code.FORBIDDEN, ref=r), st.integers(1, 4)),
        st.builds(lambda p: wire(FrameType.PING, payload=p), st.binary(max_size=4)),
        st.just(wire(FrameType.PONG)),
        st.just(wire(FrameType.GOAWAY, code=52, delay=10)),
        st.just(wire(FrameType.RECEIPT, msg_id=1, code=ReceiptStatus.READ)),
        st.just(wire(FrameType.HISTORY_ITEM, 2, ref=1, offset=1, kind="price.update")),
        st.just(wire(FrameType.HISTORY_END, ref=1)),
        st.builds(lambda t: ext(t, b"e"), st.integers(0x40, 0x7F)),
    )
    rare = st.one_of(
        st.builds(lambda c, ln, o, r: broadcast(c, o, ln, r), chan, st.integers(2, 3), st.integers(0, 6),
                  st.booleans()),
        st.builds(lambda v, hb, e: wire(FrameType.WELCOME, version=v, heartbeat=hb, time=5,
                                        max_frame=999, epoch=e),
                  st.sampled_from([0, 1, 1, 1, 2]), st.integers(0, 3000), st.integers(0, 2)),
        st.builds(lambda s: deliver(2, s), st.integers(0, 6)),
        st.builds(lambda c: wire(FrameType.UNSUBSCRIBED, channel=c), chan),
        st.just(wire(FrameType.RESYNC, channel=4)),
        st.builds(lambda p: wire(FrameType.CLOSE, code=55, payload=p), st.binary(max_size=3)),
        st.just(wire(FrameType.SEND, to="x", kind="chat.message")),
        st.sampled_from([b"\x00", b"\x02\x12\xc0", b"\x02\x99\x00", b"\x80\x00", b"\x04\x13\x01"]),
    )
    return _mostly(usual, rare)


_CLIENT_OPS = st.one_of(
    st.tuples(st.just("feed"), st.integers(1, 48)),
    st.tuples(st.just("feed"), st.integers(1, 48)),
    st.tuples(st.just("feed"), st.integers(1, 48)),
    st.tuples(st.just("hello"), st.integers(0, 2000)),
    st.tuples(st.just("resume"), st.integers(0, 2), st.integers(0, 4), st.integers(0, 4),
              st.dictionaries(st.tuples(st.sampled_from(["a", "b"]), st.integers(2, 3)),
                              st.tuples(st.integers(0, 2), st.integers(0, 6)), max_size=3)),
    st.tuples(st.just("send"), st.integers(0, 3), st.integers(0, 4), st.booleans(), st.booleans()),
    st.tuples(st.just("ack"), st.integers(0, 2), st.integers(0, 7)),
    st.tuples(st.just("ack"), st.integers(0, 1), st.integers(0, 7)),
    st.tuples(st.just("nack"), st.integers(0, 3), st.integers(0, 7)),
    st.tuples(st.just("subscribe"), st.sampled_from(["a", "b"]), st.integers(2, 3)),
    st.tuples(st.just("read"), st.integers(0, 9)),
    st.tuples(st.just("ping"), st.binary(max_size=3)),
    st.tuples(st.just("close"), st.sampled_from([48, 53]), st.text(max_size=4)),
    st.tuples(st.just("drain")),
    st.tuples(st.just("timers"), st.floats(0, 10, allow_nan=False)),
)


@st.composite
def _client_script(draw):
    start = draw(st.sampled_from([
        [WELCOME, subscribed(1, "a", 2), subscribed(2, "a", 3)], [WELCOME], [WELCOME], []]))
    pieces = start + draw(st.lists(_client_piece(), min_size=2, max_size=25))
    ops = draw(st.lists(_CLIENT_OPS, min_size=4, max_size=40))
    if start and draw(st.sampled_from([True, True, False])):
        ops = [("hello", 1000)] + ops
    return b"".join(pieces), ops


def _client_observe(c):
    reason = c.close_reason if not 1 <= c.close_code <= 8 else "<decoder error>"
    return (c.state, c.close_code, reason, c.version, c.heartbeat_ms, c.server_time,
            c.peer_max_frame, c.epoch, c.duplicates, list(c.processed), list(c.received),
            dict(c.channel_positions), set(c.outstanding), c.pending, c.last_received, c.last_sent)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=_client_script())
def test_client_differential(fam_pair, script):
    stream, ops = script
    sessions = [fam.session.ClientSession(fam.Encoder(), now=1.0) for fam in fam_pair]
    pos = 0
    now = 1.0

    def step(name, *args, **kw):
        _same_result(name, *[_call(c, name, *args, **kw) for c in sessions])
        assert _client_observe(sessions[0]) == _client_observe(sessions[1]), name

    for op in ops + [("feed", len(stream))]:
        kind = op[0]
        now += 0.25
        if kind == "feed":
            chunk = stream[pos:pos + op[1]]
            pos += len(chunk)
            step("receive_data", chunk, now)
        elif kind == "hello":
            step("hello", "tok", op[1])
        elif kind == "resume":
            step("resume", op[1], op[2], op[3], op[4])
        elif kind == "send":
            step("send", op[1], "t:a/1", "chat.message", b"{}", ref=op[2], ack=op[3], receipt=op[4])
        elif kind == "ack":
            step("ack", op[1], op[2])
        elif kind == "nack":
            step("nack", op[1], op[2], 34, "r")
        elif kind == "subscribe":
            step("subscribe", 1, op[1], op[2], 0, 0)
        elif kind == "read":
            step("read", op[1])
        elif kind == "ping":
            step("ping", op[1])
        elif kind == "close":
            step("close", op[1], op[2])
        elif kind == "drain":
            step("data_to_send", now)
        elif kind == "timers":
            step("ping_due", now + op[1])
            step("dead", now + op[1])
    step("data_to_send", now + 1)


@settings(max_examples=150, deadline=None)
@given(pieces=st.lists(_server_piece(), max_size=12), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_server_chunking_does_not_matter(fam, pieces, cuts):
    """Any split of the same bytes gives the same frames and output."""
    data = HELLO + RESUME + b"".join(pieces)
    whole = server(fam)
    expected = tuples(whole.receive_data(data, 0))
    split = server(fam)
    got = []
    last = 0
    for cut in sorted(set(c for c in cuts if c < len(data))) + [len(data)]:
        got += tuples(split.receive_data(data[last:cut], 0))
        last = cut
    assert got == expected
    assert (split.state, split.close_code) == (whole.state, whole.close_code)
    assert split.data_to_send(1 << 20, 0) == whole.data_to_send(1 << 20, 0)


def test_server_partial_drain_of_the_last_control_frame_empties_the_queue(fam):
    # Found by the fuzzer (fuzz/crashes/session/session-pending-after-partial-drain):
    # a control frame larger than max_bytes, drained alone, left an empty queue
    # behind (pending stayed True and the PONG's hold with it).
    s = opened(fam)
    s.receive_data(wire(FrameType.PING, payload=b"x" * 100) + PING + SEND, 0)
    assert s.input_held
    out = s.data_to_send(30, 0)
    assert out == wire(FrameType.PONG, payload=b"x" * 100) and not s.pending
    assert tuples(s.receive_data(b"", 0)) == decode(SEND) and not s.input_held
    assert s.data_to_send(30, 0) == wire(FrameType.PONG, payload=b"hi") and not s.pending


def test_server_accept_after_close_queues_nothing(fam):
    # Found by the fuzzer (fuzz/crashes/session/session-accept-after-close): a
    # HELLO and bad bytes in one read; the application then accepted the HELLO.
    s = server(fam)
    assert types_of(s.receive_data(HELLO + b"\x00", 0)) == [FrameType.HELLO]
    assert s.state == fam.session.CLOSED
    s.accept(1, 30000, 0, 1 << 20, 1)
    frames = decode(s.data_to_send(1 << 20, 0))
    assert [f[0] for f in frames] == [FrameType.CLOSE] and s.heartbeat_ms == 0
