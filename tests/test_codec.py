"""The frame codec (PROTOCOL.md sections 2-4, 6, 7, 13, 16; notes/CODEC_API.md).

Every test runs against both implementations through the ``codec`` fixture
(tests/conftest.py); the hypothesis tests at the end feed the Python twin and
the native module the same inputs and require identical bytes, frames and
errors.
"""

from __future__ import annotations

import random

import lz4.block
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import uvarint

from tillwire.core.codes import (
    DEFAULT_COMPRESS_THRESHOLD,
    DEFAULT_MAX_FRAME_SIZE,
    EXTENSION_TYPES,
    FRAME_SCHEMAS,
    INT_FIELDS,
    KIND_CODES,
    KINDS,
    MAX_CUSTOM_KIND_LEN,
    MAX_FRAME_SIZE_LIMIT,
    MIN_FRAME_SIZE_LIMIT,
    STR_FIELDS,
    Code,
    Flag,
    FrameType,
    K,
    S,
    U,
)
from tillwire.core import _codec_py as reference
from tillwire.core.errors import ProtocolError

Z = int(Flag.COMPRESSED)
A = int(Flag.ACK_REQUESTED)
R = int(Flag.RETRANSMIT)
C = int(Flag.RECEIPT_REQUESTED)
MAX_U64 = 2**64 - 1


# --------------------------------------------------------------------------
# helpers


uv = uvarint      # (tests/support.py: independent of both codecs)


def raw_frame(frame_type: int, flags: int, body: bytes) -> bytes:
    """A frame assembled by hand: length, type, flags, body."""
    return uv(2 + len(body)) + bytes((frame_type, flags)) + body


def flags_byte(data: bytes) -> int:
    """The flags byte of the first frame of ``data``."""
    prefix = next(i for i, byte in enumerate(data) if byte < 0x80) + 1
    return data[prefix + 1]


def encode_field(kind: str, value) -> bytes:
    """A test-local field writer (section 2)."""
    if kind == U:
        return uv(value)
    if kind == K and value in KIND_CODES:
        return uv(KIND_CODES[value])
    raw = value.encode()
    return (b"\x00" if kind == K else b"") + uv(len(raw)) + raw


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def decode_all(codec, data: bytes, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> list:
    """Decode a whole stream; it must end on a frame boundary."""
    decoder = codec.Decoder(max_frame_size)
    frames = decoder.feed(data)
    assert decoder.buffered == 0
    assert not decoder.failed
    return frames


def decode_chunks(codec, chunks, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> list:
    decoder = codec.Decoder(max_frame_size)
    frames = []
    for chunk in chunks:
        frames.extend(decoder.feed(chunk))
    assert decoder.buffered == 0
    return frames


def decode_error(codec, data: bytes, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> ProtocolError:
    decoder = codec.Decoder(max_frame_size)
    with pytest.raises(ProtocolError) as info:
        decoder.feed(data)
    assert decoder.failed
    return info.value


def expected_decoded(codec, frame):
    """What decoding ``frame``'s encoding gives: COMPRESSED cleared, non-schema fields default."""
    if frame.type in EXTENSION_TYPES:
        return codec.Frame(frame.type, frame.flags, bytes(frame.payload))
    fields = {name: getattr(frame, name) for name, _ in FRAME_SCHEMAS[frame.type][0]}
    return codec.Frame(frame.type, frame.flags & ~Z, bytes(frame.payload), **fields)


# Representative values (PROTOCOL.md section 2).
INTS = [0, 1, 127, 128, 16383, 16384, 2**21, 2**28 - 1, 2**32, 2**63, MAX_U64]
STRINGS = ["", "a", "caisse 3 é€", "日本語のレジ", "emoji 🧾🛒", "x" * 300, "role:acme/s1/staff"]
KIND_NAMES = [*KIND_CODES, "x.y", "custom.kind-1", "ü" * 32, "k" * MAX_CUSTOM_KIND_LEN, "🛒"]
PAYLOADS = [b"", b"\x00", b'{"ok":true}', bytes(range(256)), b"a" * 600, random.Random(7).randbytes(70_000)]


def representative_frames(codec) -> list:
    """Several frames of every type of FRAME_SCHEMAS, cycling through the values above."""
    frames = []
    for frame_type, (fields, allowed) in FRAME_SCHEMAS.items():
        for variant in range(8):
            values = {}
            for position, (name, kind) in enumerate(fields):
                index = variant + position
                if kind == U:
                    values[name] = INTS[index % len(INTS)]
                elif kind == S:
                    values[name] = STRINGS[index % len(STRINGS)]
                else:
                    values[name] = KIND_NAMES[(variant * 3 + position) % len(KIND_NAMES)]
            flags = allowed & ~Z if variant % 2 else (allowed & 3 & variant)
            payload = PAYLOADS[variant % len(PAYLOADS)]
            frames.append(codec.Frame(int(frame_type), flags, payload, **values))
    return frames


def stream_frames(codec) -> list:
    """A smaller mixed list for the chunking tests (a few hundred bytes)."""
    F = codec.Frame
    return [
        F(FrameType.HELLO, version=1, heartbeat=30000, token="tw1.abc"),
        F(FrameType.PING),
        F(FrameType.DELIVER, A, b'{"ok":true}', lane=0, seq=1, msg_id=1001, kind="payment.result"),
        F(FrameType.BROADCAST, R, b"a" * 600, lane=2, channel=3, offset=MAX_U64, kind="price.update"),
        F(0x40, 0xFF, b"\x01\x02\x03"),
        F(FrameType.SEND, A | C, b"{}", lane=1, ref=7, ttl=128, to="role:acme/s1/staff", kind="x.y", key="k1"),
        F(FrameType.ACK, lane=1, seq=300),
        F(FrameType.RECEIPT, msg_id=2**40, code=3, ref=0, to="été"),
        F(FrameType.PONG, payload=b"\x00" * 40),
        F(0x7F),
        F(FrameType.HISTORY_END, ref=1, offset=2, count=3, code=0),
    ]


# --------------------------------------------------------------------------
# the module and the Frame class


def test_implementation_constant(codec):
    assert codec.IMPLEMENTATION in ("python", "native")
    assert codec.__name__.endswith("_codec_py") == (codec.IMPLEMENTATION == "python")


def test_frame_defaults(codec):
    frame = codec.Frame(FrameType.PING)
    assert frame.type == FrameType.PING
    assert frame.flags == 0
    assert frame.payload == b""
    assert frame.lane == 0
    for name in INT_FIELDS:
        assert getattr(frame, name) == 0, name
    for name in STR_FIELDS:
        assert getattr(frame, name) == "", name


def test_frame_fields_and_lane_keyword(codec):
    frame = codec.Frame(FrameType.DELIVER, A, b"x", lane=1, seq=5, msg_id=9, kind="order.event")
    assert frame.flags == A | 1
    assert frame.lane == 1
    assert (frame.seq, frame.msg_id, frame.kind, frame.payload) == (5, 9, "order.event", b"x")
    frame.flags = 3
    assert frame.lane == 3
    frame.seq = 2**64 - 1
    frame.to = "store:acme/s1"
    frame.payload = b"y"
    assert (frame.seq, frame.to, frame.payload) == (MAX_U64, "store:acme/s1", b"y")


def test_frame_rejects_unknown_keyword_and_attribute(codec):
    with pytest.raises(TypeError):
        codec.Frame(FrameType.PING, bogus=1)
    frame = codec.Frame(FrameType.PING)
    with pytest.raises(AttributeError):
        frame.bogus = 1
    with pytest.raises(AttributeError):
        frame.lane = 2


def test_frame_equality_and_hash(codec):
    F = codec.Frame
    a = F(FrameType.ACK, lane=1, seq=3)
    b = F(FrameType.ACK, 1, seq=3)
    assert a == b and not (a != b)
    for other in (
        F(FrameType.ACK, lane=2, seq=3),
        F(FrameType.ACK, lane=1, seq=4),
        F(FrameType.ACK, lane=1, seq=3, payload=b"x"),
        F(FrameType.ACK, lane=1, seq=3, to="x"),  # a non-schema field counts too
        F(FrameType.NACK, lane=1, seq=3),
    ):
        assert a != other and not (a == other)
    assert a != "ACK" and not (a == 3)
    with pytest.raises(TypeError):
        hash(a)


def test_frame_as_tuple(codec):
    frame = codec.Frame(FrameType.SEND, A, b"{}", lane=1, ref=7, to="x", kind="chat.message")
    frame_type, flags, payload, fields = frame.as_tuple()
    assert (frame_type, flags, payload) == (FrameType.SEND, A | 1, b"{}")
    assert set(fields) == set(INT_FIELDS) | set(STR_FIELDS)
    assert fields["ref"] == 7 and fields["to"] == "x" and fields["kind"] == "chat.message"
    assert fields["seq"] == 0 and fields["key"] == ""


def test_frame_repr(codec):
    frame = codec.Frame(FrameType.DELIVER, A, b'{"ok":true}', seq=1, msg_id=1001, kind="payment.result")
    assert repr(frame).startswith(
        "Frame(DELIVER, flags=0x08, seq=1, msg_id=1001, kind='payment.result', payload="
    )
    ping = repr(codec.Frame(FrameType.PING))
    assert ping.startswith("Frame(PING, flags=0x00") and "payload" not in ping
    assert repr(codec.Frame(0x40, 0, b"ab")).startswith("Frame(0x40, flags=0x00")
    long = repr(codec.Frame(FrameType.PONG, payload=b"z" * 100_000))
    assert len(long) < 300


# --------------------------------------------------------------------------
# round trips


def test_round_trip_every_frame_type(codec):
    encoder = codec.Encoder()
    frames = representative_frames(codec)
    assert {f.type for f in frames} == set(FRAME_SCHEMAS)
    for frame in frames:
        data = encoder.encode(frame)
        assert isinstance(data, bytes)
        decoded = decode_all(codec, data)
        assert decoded == [expected_decoded(codec, frame)], frame
        assert type(decoded[0].payload) is bytes


def test_round_trip_batch(codec):
    encoder = codec.Encoder()
    frames = representative_frames(codec)
    data = encoder.encode_batch(frames)
    assert data == b"".join(encoder.encode(f) for f in frames)
    assert encoder.encode_batch(iter(frames)) == data
    assert encoder.encode_batch([]) == b""
    assert decode_all(codec, data) == [expected_decoded(codec, f) for f in frames]


def test_field_values_on_the_wire(codec):
    """Field encodings of section 2, pinned byte for byte."""
    encoder = codec.Encoder()
    for value in INTS:
        assert encoder.encode(codec.Frame(FrameType.ACK, seq=value)) == raw_frame(0x14, 0, uv(value))
    for text in STRINGS:
        raw = text.encode()
        frame = codec.Frame(FrameType.UNSUBSCRIBE, ref=1, to=text)
        assert encoder.encode(frame) == raw_frame(0x21, 0, b"\x01" + uv(len(raw)) + raw)
    for name in KIND_NAMES:
        raw = name.encode()
        kind = uv(KIND_CODES[name]) if name in KIND_CODES else b"\x00" + uv(len(raw)) + raw
        frame = codec.Frame(FrameType.DELIVER, seq=1, msg_id=2, kind=name)
        assert encoder.encode(frame) == raw_frame(0x12, 0, b"\x01\x02" + kind)


def test_registered_kind_inline_decodes_to_name(codec):
    """Section 2.3: an inline registered name is accepted and reported by name."""
    for code, name in KINDS.items():
        inline = raw_frame(0x12, A, b"\x01\x02\x00" + uv(len(name)) + name.encode())
        registered = raw_frame(0x12, A, b"\x01\x02" + uv(code))
        expected = codec.Frame(FrameType.DELIVER, A, seq=1, msg_id=2, kind=name)
        assert decode_all(codec, inline) == [expected]
        assert decode_all(codec, registered) == [expected]
        assert codec.Encoder().encode(expected) == registered


def test_extension_types(codec):
    encoder = codec.Encoder()
    for frame_type in (0x40, 0x41, 0x6A, 0x7F):
        for flags in (0, Z, 0xFF):
            for payload in (b"", b"\x01\x02", b"b" * 5000):
                frame = codec.Frame(frame_type, flags, payload)
                data = encoder.encode(frame)
                assert data == raw_frame(frame_type, flags, payload)  # raw, never compressed
                assert decode_all(codec, data) == [frame]


def test_extension_frame_ignores_fields(codec):
    frame = codec.Frame(0x40, 1, b"x", seq=5, kind="")
    assert codec.Encoder().encode(frame) == h("03 40 01 78")
    assert decode_all(codec, h("03 40 01 78")) == [codec.Frame(0x40, 1, b"x")]


def test_non_schema_fields_are_not_encoded(codec):
    encoder = codec.Encoder()
    frame = codec.Frame(FrameType.PING, seq=-5, msg_id=2**70, kind="", token="t")
    assert encoder.encode(frame) == h("02 03 00")
    ack = codec.Frame(FrameType.ACK, seq=3, msg_id=77, to="x")
    assert encoder.encode(ack) == h("03 14 00 03")


def test_compressed_flag_on_input_is_ignored(codec):
    encoder = codec.Encoder()
    assert encoder.encode(codec.Frame(FrameType.PING, Z)) == h("02 03 00")
    assert encoder.encode(codec.Frame(FrameType.ACK, Z | 2, seq=1)) == h("03 14 02 01")


def test_feed_accepts_bytes_like(codec):
    data = codec.Encoder().encode_batch(stream_frames(codec))
    expected = decode_all(codec, data)
    for wrapped in (bytearray(data), memoryview(data)):
        assert codec.Decoder().feed(wrapped) == expected
    for bad in ("text", 5, None):
        with pytest.raises(TypeError):
            codec.Decoder().feed(bad)


# --------------------------------------------------------------------------
# streaming


def test_streaming_whole_bytewise_and_every_split(codec):
    data = codec.Encoder().encode_batch(stream_frames(codec))
    expected = [expected_decoded(codec, f) for f in stream_frames(codec)]
    assert decode_all(codec, data) == expected
    assert decode_chunks(codec, [data[i : i + 1] for i in range(len(data))]) == expected
    for cut in range(len(data) + 1):
        assert decode_chunks(codec, [data[:cut], data[cut:]]) == expected, cut


def test_streaming_random_chunkings(codec):
    data = codec.Encoder().encode_batch(representative_frames(codec))
    expected = decode_all(codec, data)
    rng = random.Random(1)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(data)), 40))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        assert decode_chunks(codec, chunks) == expected


def test_buffered_tracks_the_incomplete_frame(codec):
    frame = codec.Encoder().encode(codec.Frame(FrameType.PONG, payload=b"p" * 300))
    assert frame[:2] == uv(302)
    decoder = codec.Decoder()
    for i, byte in enumerate(frame[:-1]):
        assert decoder.feed(bytes([byte])) == []
        assert decoder.buffered == i + 1
    assert len(decoder.feed(frame[-1:])) == 1
    assert decoder.buffered == 0
    # Many frames and a partial one in a single chunk: only the partial is held.
    assert len(decoder.feed(frame * 50 + frame[:7])) == 50
    assert decoder.buffered == 7
    assert len(decoder.feed(frame[7:])) == 1
    assert decoder.buffered == 0


def test_many_frames_in_one_chunk(codec):
    encoder = codec.Encoder()
    data = b"".join(encoder.encode(codec.Frame(FrameType.ACK, lane=i % 2, seq=i)) for i in range(5000))
    frames = decode_all(codec, data)
    assert [(f.lane, f.seq) for f in frames] == [(i % 2, i) for i in range(5000)]


def test_empty_feed(codec):
    decoder = codec.Decoder()
    assert decoder.feed(b"") == []
    decoder.feed(b"\x05\x03")
    assert decoder.feed(b"") == []
    assert decoder.buffered == 2


def test_buffer_never_exceeds_limit_plus_4(codec):
    for limit in (MIN_FRAME_SIZE_LIMIT, 200, 20_000):
        encoder = codec.Encoder(max_frame_size=limit, compress_threshold=0)
        payload = b"q" * (limit - 2)  # a PONG of exactly the limit
        data = encoder.encode(codec.Frame(FrameType.PONG, payload=payload)) * 3
        assert len(data) == 3 * (len(uv(limit)) + limit)
        rng = random.Random(limit)
        decoder = codec.Decoder(limit)
        pos = frames = 0
        while pos < len(data):
            step = rng.choice([1, 2, 3, 50, limit, limit + 4, 3 * limit])
            frames += len(decoder.feed(data[pos : pos + step]))
            pos += step
            assert decoder.buffered <= limit + 4
        assert frames == 3 and decoder.buffered == 0


# --------------------------------------------------------------------------
# limits: the frame length (section 3, section 16 step 1)


def test_oversized_frame_rejected_from_its_header_alone(codec):
    # 1 MiB + 1: only the length prefix is fed, no body at all.
    error = decode_error(codec, h("81 80 40"))
    assert error.code == Code.FRAME_TOO_LARGE and error.frames == []
    # A small limit: a one-byte prefix of limit + 1.
    error = decode_error(codec, bytes([MIN_FRAME_SIZE_LIMIT + 1]), max_frame_size=MIN_FRAME_SIZE_LIMIT)
    assert error.code == Code.FRAME_TOO_LARGE
    # Prefix split over calls: the error comes with the byte that completes it.
    decoder = codec.Decoder()
    assert decoder.feed(b"\x81") == [] and decoder.feed(b"\x80") == []
    assert decoder.buffered == 2
    with pytest.raises(ProtocolError) as info:
        decoder.feed(b"\x40")
    assert info.value.code == Code.FRAME_TOO_LARGE


def test_frame_at_the_limit_is_accepted(codec):
    for limit in (MIN_FRAME_SIZE_LIMIT, 1000, DEFAULT_MAX_FRAME_SIZE):
        frame = codec.Frame(FrameType.PONG, payload=b"\x07" * (limit - 2))
        data = codec.Encoder(max_frame_size=limit, compress_threshold=0).encode(frame)
        assert decode_all(codec, data, max_frame_size=limit) == [frame]
        if limit > MIN_FRAME_SIZE_LIMIT:
            assert decode_error(codec, data, max_frame_size=limit - 1).code == Code.FRAME_TOO_LARGE


def test_largest_limit_accepts_a_four_byte_prefix(codec):
    decoder = codec.Decoder(MAX_FRAME_SIZE_LIMIT)
    assert decoder.feed(h("ff ff ff 7f")) == []  # 2**28 - 1: allowed, body awaited
    assert decoder.buffered == 4
    assert decode_error(codec, h("ff ff ff 7f")).code == Code.FRAME_TOO_LARGE  # default 1 MiB


def test_limit_arguments(codec):
    for bad in (0, MIN_FRAME_SIZE_LIMIT - 1, MAX_FRAME_SIZE_LIMIT + 1, -1):
        with pytest.raises(ValueError):
            codec.Decoder(bad)
        with pytest.raises(ValueError):
            codec.Encoder(max_frame_size=bad)
    with pytest.raises(ValueError):
        codec.Encoder(compress_threshold=-1)
    for good in (MIN_FRAME_SIZE_LIMIT, MAX_FRAME_SIZE_LIMIT):
        codec.Decoder(good)
        assert codec.Encoder(max_frame_size=good).max_frame_size == good
    encoder = codec.Encoder()
    assert encoder.max_frame_size == DEFAULT_MAX_FRAME_SIZE
    assert encoder.compress_threshold == DEFAULT_COMPRESS_THRESHOLD
    assert codec.Encoder(compress_threshold=0).compress_threshold == 0
    with pytest.raises(AttributeError):
        encoder.max_frame_size = 100
    with pytest.raises(AttributeError):
        encoder.compress_threshold = 1


# --------------------------------------------------------------------------
# every error of section 16

ERRORS = [
    # step 1: the length prefix
    ("00", Code.MALFORMED, "length 0"),
    ("01", Code.MALFORMED, "length 1, raised without waiting for a body"),
    ("01 03", Code.MALFORMED, "the doc's example"),
    ("80 00", Code.BAD_VARINT, "non-canonical length 0"),
    ("81 00", Code.BAD_VARINT, "non-canonical length 1: BAD_VARINT before MALFORMED"),
    ("82 80 00", Code.BAD_VARINT, "non-canonical 3-byte length"),
    ("ff ff ff 00", Code.BAD_VARINT, "non-canonical 4-byte length above the limit: BAD_VARINT first"),
    ("80 80 80 80", Code.FRAME_TOO_LARGE, "4th length byte with continuation bit"),
    ("ff ff ff ff 01", Code.FRAME_TOO_LARGE, "4th length byte with continuation bit"),
    ("81 80 40", Code.FRAME_TOO_LARGE, "1 MiB + 1"),
    ("ff ff ff 7f", Code.FRAME_TOO_LARGE, "2**28 - 1 above the default limit"),
    # step 3: type
    ("02 00 00", Code.UNKNOWN_FRAME, "type 0x00"),
    ("02 09 00", Code.UNKNOWN_FRAME, "unassigned core type"),
    ("02 17 00", Code.UNKNOWN_FRAME, "unassigned core type"),
    ("02 3f 00", Code.UNKNOWN_FRAME, "last core type"),
    ("02 80 00", Code.UNKNOWN_FRAME, "reserved"),
    ("02 ff 00", Code.UNKNOWN_FRAME, "reserved"),
    ("02 3f ff", Code.UNKNOWN_FRAME, "type is checked before flags"),
    # step 4: flags
    ("02 03 08", Code.BAD_FLAGS, "ACK_REQUESTED on PING"),
    ("02 03 01", Code.BAD_FLAGS, "lane bits on PING"),
    ("02 03 40", Code.BAD_FLAGS, "reserved bit 6"),
    ("02 03 80", Code.BAD_FLAGS, "reserved bit 7"),
    ("04 11 01 00 00", Code.BAD_FLAGS, "lane bits on SENDACK"),
    ("05 12 20 01 01 01", Code.BAD_FLAGS, "RECEIPT_REQUESTED on DELIVER"),
    ("07 10 10 00 00 00 01 00", Code.BAD_FLAGS, "RETRANSMIT on SEND"),
    ("03 14 08 01", Code.BAD_FLAGS, "ACK_REQUESTED on ACK"),
    ("03 14 80 80", Code.BAD_FLAGS, "flags are checked before fields"),
    # step 5: fields
    ("02 14 00", Code.MALFORMED, "ACK without its seq"),
    ("03 14 00 80", Code.MALFORMED, "seq runs past the end"),
    ("0b 14 00 ff ff ff ff ff ff ff ff ff", Code.MALFORMED, "9-byte uvarint cut by the frame end"),
    ("04 14 00 80 00", Code.BAD_VARINT, "non-canonical seq"),
    ("0c 14 00 80 80 80 80 80 80 80 80 80 00", Code.BAD_VARINT, "10-byte non-canonical"),
    ("0c 14 00 ff ff ff ff ff ff ff ff ff 02", Code.BAD_VARINT, "2**64"),
    ("0c 14 00 ff ff ff ff ff ff ff ff ff 7f", Code.BAD_VARINT, "far above 2**64"),
    ("0d 14 00 ff ff ff ff ff ff ff ff ff 81 01", Code.BAD_VARINT, "11-byte uvarint"),
    ("0c 14 00 ff ff ff ff ff ff ff ff ff 81", Code.BAD_VARINT, "10th byte continues at the frame end"),
    ("05 10 00 00 00 01", Code.MALFORMED, "string count past the end"),
    ("06 10 00 00 00 81 01", Code.MALFORMED, "string count 129 past the end"),
    ("06 10 00 00 00 80 00", Code.BAD_VARINT, "non-canonical string count"),
    ("08 10 00 00 00 02 c3 28 00", Code.BAD_UTF8, "invalid UTF-8"),
    ("09 10 00 00 00 03 ed a0 80 00", Code.BAD_UTF8, "encoded surrogate U+D800"),
    ("08 10 00 00 00 02 c0 af 00", Code.BAD_UTF8, "overlong encoding"),
    ("09 10 00 00 00 03 e2 82 00 00", Code.BAD_UTF8, "truncated sequence"),
    ("0a 10 00 00 00 04 f4 90 80 80 00", Code.BAD_UTF8, "above U+10FFFF"),
    ("06 01 00 01 01 01 ff", Code.BAD_UTF8, "HELLO token"),
    ("05 12 08 01 01 63", Code.BAD_KIND, "unknown kind code 99"),
    ("05 12 08 01 01 0d", Code.BAD_KIND, "reserved kind code 13"),
    ("0e 12 08 01 01 ff ff ff ff ff ff ff ff ff 01", Code.BAD_KIND, "kind code 2**64 - 1"),
    ("06 12 08 01 01 00 00", Code.BAD_KIND, "empty inline kind"),
    ("06 12 08 01 01 80 00", Code.BAD_VARINT, "non-canonical kind code"),
    ("05 12 08 01 01 00", Code.MALFORMED, "inline kind without its count"),
    ("08 12 08 01 01 00 03 78 2e", Code.MALFORMED, "inline kind cut short"),
    ("08 12 08 01 01 00 02 c3 28", Code.BAD_UTF8, "inline kind invalid UTF-8"),
    ("04 12 08 01 01", Code.MALFORMED, "DELIVER without its kind"),
    # An inline name of 65+ bytes is read as a string first (section 2.2), then
    # checked (section 2.3): a cut or invalid string reports its own error.
    ("47 12 08 01 01 00 41" + " 6b" * 65, Code.BAD_KIND, "inline kind of 65 bytes"),
    ("0e 12 08 01 01 00 41" + " 6b" * 8, Code.MALFORMED, "inline kind of 65 bytes cut short"),
    ("47 12 08 01 01 00 41" + " ff" * 65, Code.BAD_UTF8, "inline kind of 65 invalid bytes"),
    ("09 10 00 80 00 00 02 c3 28 00", Code.BAD_VARINT, "first field's error wins (ref before to)"),
    ("09 10 00 00 00 02 c3 28 63 00", Code.BAD_UTF8, "to before kind"),
    ("07 10 00 00 00 00 63 05", Code.BAD_KIND, "kind before key (key runs past the end)"),
    # step 6: compression
    ("05 13 06 01 01 08", Code.MALFORMED, "COMPRESSED without original_size"),
    ("06 13 06 01 01 08 80", Code.MALFORMED, "truncated original_size"),
    ("07 13 06 01 01 08 80 00", Code.BAD_VARINT, "non-canonical original_size"),
    ("0f 13 06 01 01 08 ff ff ff ff ff ff ff ff ff 02", Code.BAD_VARINT, "overflowing original_size"),
    ("09 13 06 01 01 08 81 80 40 00", Code.FRAME_TOO_LARGE, "original_size above the limit, before the block"),
    ("07 13 06 01 01 08 00 00", Code.BAD_COMPRESSION, "original_size 0"),
    ("06 13 06 01 01 08 05", Code.BAD_COMPRESSION, "no block"),
    ("09 13 06 01 01 08 05 00 00 00", Code.BAD_COMPRESSION, "garbage block"),
    ("09 13 06 01 01 63 05 00 00 00", Code.BAD_KIND, "fields are checked before compression"),
    ("03 03 04 05", Code.BAD_COMPRESSION, "compressed PING, no block"),
]


@pytest.mark.parametrize("hex_bytes, code, why", ERRORS, ids=[f"{c.name}-{w}" for _, c, w in ERRORS])
def test_decode_error(codec, hex_bytes, code, why):
    data = h(hex_bytes)
    error = decode_error(codec, data)
    assert error.code == code, why
    assert isinstance(error.code, Code) and error.frames == []
    # Byte by byte: the same code, from the same byte as a one-shot decode.
    decoder = codec.Decoder()
    for i in range(len(data)):
        try:
            assert decoder.feed(data[i : i + 1]) == []
        except ProtocolError as exc:
            assert exc.code == code and exc.frames == []
            break
    else:
        pytest.fail(f"no error after feeding {hex_bytes} byte by byte")


@pytest.mark.parametrize("hex_bytes, code, why", ERRORS, ids=[f"{c.name}-{w}" for _, c, w in ERRORS])
def test_error_carries_frames_of_the_same_call(codec, hex_bytes, code, why):
    encoder = codec.Encoder()
    good = [codec.Frame(FrameType.PING), codec.Frame(FrameType.ACK, lane=1, seq=9)]
    prefix = encoder.encode_batch(good)
    error = decode_error(codec, prefix + h(hex_bytes) + prefix)
    assert error.code == code
    assert error.frames == good
    # Frames returned by an earlier call are not repeated in the error.
    decoder = codec.Decoder()
    assert decoder.feed(prefix + prefix[:1]) == good
    with pytest.raises(ProtocolError) as info:
        decoder.feed(prefix[1:] + h(hex_bytes))
    assert info.value.code == code and info.value.frames == good


def test_errors_raised_when_the_length_prefix_completes(codec):
    """Section 16 step 1: nothing after the prefix is needed to raise these."""
    cases = [
        ("80 00", Code.BAD_VARINT, DEFAULT_MAX_FRAME_SIZE),
        ("ff ff ff 00", Code.BAD_VARINT, MIN_FRAME_SIZE_LIMIT),
        ("80 80 80 80", Code.FRAME_TOO_LARGE, MAX_FRAME_SIZE_LIMIT),
        ("41", Code.FRAME_TOO_LARGE, MIN_FRAME_SIZE_LIMIT),
        ("c1 00", Code.BAD_VARINT, MIN_FRAME_SIZE_LIMIT),
        ("01", Code.MALFORMED, DEFAULT_MAX_FRAME_SIZE),
    ]
    for hex_bytes, code, limit in cases:
        data = h(hex_bytes)
        decoder = codec.Decoder(limit)
        if len(data) > 1:
            assert decoder.feed(data[:-1]) == []
        with pytest.raises(ProtocolError) as info:
            decoder.feed(data[-1:])
        assert info.value.code == code, hex_bytes


def test_nothing_but_the_length_is_checked_before_the_frame_is_complete(codec):
    """Section 16 step 2: a bad type, flags or field waits for the whole frame."""
    for hex_bytes, code in [
        ("05 3f 00 00 00 00", Code.UNKNOWN_FRAME),
        ("05 03 08 00 00 00", Code.BAD_FLAGS),
        ("06 14 00 80 80 80 80", Code.MALFORMED),
        ("07 14 00 80 00 00 00 00", Code.BAD_VARINT),
        ("07 13 06 01 01 08 00 00", Code.BAD_COMPRESSION),
    ]:
        data = h(hex_bytes)
        decoder = codec.Decoder()
        assert decoder.feed(data[:-1]) == []
        assert decoder.buffered == len(data) - 1 and not decoder.failed
        with pytest.raises(ProtocolError) as info:
            decoder.feed(data[-1:])
        assert info.value.code == code, hex_bytes


def test_failed_decoder_stays_failed(codec):
    decoder = codec.Decoder()
    ping = h("02 03 00")
    with pytest.raises(ProtocolError) as info:
        decoder.feed(ping + h("02 03 08") + ping)
    assert info.value.code == Code.BAD_FLAGS
    assert [f.type for f in info.value.frames] == [FrameType.PING]
    assert decoder.failed
    for later in (ping, b"", h("02 3f 00"), bytearray(ping)):
        with pytest.raises(ProtocolError) as info:
            decoder.feed(later)
        assert info.value.code == Code.BAD_FLAGS and info.value.frames == []
        assert decoder.failed
    assert not codec.Decoder().failed


def test_extension_frames_are_yielded_raw_and_decoding_goes_on(codec):
    data = h("04 40 00 01 02") + h("06 7f ff 05 00 00 00") + h("02 03 00")
    F = codec.Frame
    assert decode_all(codec, data) == [
        F(0x40, 0, h("01 02")),
        F(0x7F, 0xFF, h("05 00 00 00")),  # COMPRESSED among the flags: still raw
        F(FrameType.PING),
    ]


# --------------------------------------------------------------------------
# compression (section 13)


def compressed_broadcast(original_size: int, block: bytes, kind: bytes = b"\x08") -> bytes:
    return raw_frame(0x13, 2 | Z, b"\x01\x01" + kind + uv(original_size) + block)


def test_compression_threshold(codec):
    encoder = codec.Encoder()  # threshold 512
    below = codec.Frame(FrameType.PONG, payload=b"a" * 511)
    assert encoder.encode(below) == raw_frame(0x04, 0, b"a" * 511)
    at = codec.Frame(FrameType.PONG, payload=b"a" * 512)
    block = lz4.block.compress(b"a" * 512, store_size=False)
    assert encoder.encode(at) == raw_frame(0x04, Z, uv(512) + block)
    assert decode_all(codec, encoder.encode(at)) == [at]


def test_compression_custom_threshold_and_disabled(codec):
    payload = b"abc" * 100
    frame = codec.Frame(FrameType.BROADCAST, R, payload, lane=3, channel=1, offset=2, kind="promo.offer")
    compressed = codec.Encoder(compress_threshold=1).encode(frame)
    assert compressed[2] == 3 | R | Z
    assert len(compressed) < len(payload)
    assert decode_all(codec, compressed) == [frame]
    plain = codec.Encoder(compress_threshold=0).encode(frame)
    assert plain[3] == 3 | R and plain.endswith(payload)
    assert codec.Encoder(compress_threshold=301).encode(frame) == plain
    assert codec.Encoder(compress_threshold=300).encode(frame) == compressed
    huge = codec.Frame(FrameType.PONG, payload=b"a" * 100_000)
    assert codec.Encoder(compress_threshold=0).encode(huge).endswith(b"a" * 100_000)


# Payloads whose compressed form (size prefix + block) is exactly as long as
# they are, and one byte shorter: the first stays raw, the second is compressed.
BREAK_EVEN = b"baabbbbabbbaaabaaabbbabbaababa"
ONE_SHORTER = bytes(range(14)) + b"a" * 13


def test_compression_only_when_shorter(codec):
    for payload, saving in ((BREAK_EVEN, 0), (ONE_SHORTER, 1)):
        block = lz4.block.compress(payload, store_size=False)
        assert len(payload) - len(uv(len(payload))) - len(block) == saving, "lz4 output changed"
        data = codec.Encoder(compress_threshold=1).encode(codec.Frame(FrameType.PONG, payload=payload))
        if saving:
            assert data == raw_frame(0x04, Z, uv(len(payload)) + block)
        else:
            assert data == raw_frame(0x04, 0, payload)
    noise = random.Random(3).randbytes(4096)
    frame = codec.Frame(FrameType.PONG, payload=noise)
    assert codec.Encoder().encode(frame) == raw_frame(0x04, 0, noise)
    # A tiny payload: a 1-byte size + the block is never shorter.
    for payload in (b"a", b"aaaa", b"abcdefgh" * 2):
        tiny = codec.Frame(FrameType.PONG, payload=payload)
        assert codec.Encoder(compress_threshold=1).encode(tiny) == raw_frame(0x04, 0, payload)


def test_decompressed_size_cap(codec):
    limit = 1000
    for size, code in ((limit, None), (limit + 1, Code.FRAME_TOO_LARGE)):
        data = compressed_broadcast(size, lz4.block.compress(b"z" * size, store_size=False))
        assert len(data) < 64
        if code is None:
            frames = decode_all(codec, data, max_frame_size=limit)
            assert frames[0].payload == b"z" * size and frames[0].flags == 2
        else:
            assert decode_error(codec, data, max_frame_size=limit).code == code
    # An absurd original_size is refused before anything is allocated.
    assert decode_error(codec, compressed_broadcast(2**63, b"\x00")).code == Code.FRAME_TOO_LARGE


def test_decompression_size_mismatch_and_garbage(codec):
    block = lz4.block.compress(b"a" * 600, store_size=False)
    assert decode_all(codec, compressed_broadcast(600, block))[0].payload == b"a" * 600
    for size in (599, 601, 1, 10_000):
        assert decode_error(codec, compressed_broadcast(size, block)).code == Code.BAD_COMPRESSION, size
    for garbage in (b"", b"\x00", b"\xff" * 8, block[:-1], block + b"\x00", b"\x10"):
        assert decode_error(codec, compressed_broadcast(600, garbage)).code == Code.BAD_COMPRESSION
    assert decode_error(codec, compressed_broadcast(0, block)).code == Code.BAD_COMPRESSION


def test_compressed_frames_decode_with_flag_cleared(codec):
    payload = b'{"sku":"A1","price":"5.00"}' * 40
    for frame_type, extra in ((FrameType.SEND, {"to": "topic:a/b", "kind": "x.y"}), (FrameType.PONG, {})):
        frame = codec.Frame(frame_type, 0, payload, **extra)
        data = codec.Encoder().encode(frame)
        assert flags_byte(data) & Z and len(data) < len(payload)
        decoded = decode_all(codec, data)
        assert decoded == [frame] and not decoded[0].flags & Z


def test_any_valid_lz4_block_is_accepted(codec):
    """Section 13: blocks are not canonical; a block from another compressor decodes."""
    payload = bytes(range(64)) * 20
    for mode in ("default", "fast", "high_compression"):
        block = lz4.block.compress(payload, mode=mode, store_size=False)
        assert decode_all(codec, compressed_broadcast(len(payload), block))[0].payload == payload
    literal_only = bytes([0xF0, 0x0F]) + payload[:30]  # one literal run of 30 bytes, no match
    assert decode_all(codec, compressed_broadcast(30, literal_only))[0].payload == payload[:30]


# --------------------------------------------------------------------------
# encoder errors (CODEC_API.md)


def test_encoder_rejects_unknown_types(codec):
    encoder = codec.Encoder()
    for frame_type in (0x00, 0x09, 0x17, 0x3F, 0x80, 0xFF, 0x100, -1):
        with pytest.raises(ValueError):
            encoder.encode(codec.Frame(frame_type))


def test_encoder_rejects_flags(codec):
    encoder = codec.Encoder()
    for frame_type, flags in [
        (FrameType.PING, A),
        (FrameType.PING, 1),
        (FrameType.PING, 0x40),
        (FrameType.DELIVER, C),
        (FrameType.SEND, R),
        (FrameType.SENDACK, 2),
        (FrameType.ACK, A),
        (FrameType.BROADCAST, A),
        (FrameType.PING, 0x100),
        (FrameType.PING, -1),
        (0x40, 0x100),
        (0x40, -1),
    ]:
        with pytest.raises(ValueError):
            encoder.encode(codec.Frame(frame_type, flags, kind="x.y"))
    with pytest.raises(TypeError):
        encoder.encode(codec.Frame(FrameType.PING, "0"))


def test_encoder_int_field_range(codec):
    encoder = codec.Encoder()
    assert encoder.encode(codec.Frame(FrameType.ACK, seq=MAX_U64)) == raw_frame(0x14, 0, uv(MAX_U64))
    for bad in (-1, 2**64, 2**100):
        with pytest.raises(ValueError):
            encoder.encode(codec.Frame(FrameType.ACK, seq=bad))
    for bad in ("1", 1.0, None, b"\x01"):
        with pytest.raises(TypeError):
            encoder.encode(codec.Frame(FrameType.ACK, seq=bad))


def test_encoder_string_fields(codec):
    encoder = codec.Encoder()
    for bad in (5, b"to", None):
        with pytest.raises(TypeError):
            encoder.encode(codec.Frame(FrameType.UNSUBSCRIBE, to=bad))
        with pytest.raises(TypeError):
            encoder.encode(codec.Frame(FrameType.DELIVER, kind=bad))
    with pytest.raises(ValueError):  # a lone surrogate cannot be UTF-8
        encoder.encode(codec.Frame(FrameType.UNSUBSCRIBE, to="\ud800"))


def test_encoder_kind_rules(codec):
    encoder = codec.Encoder()
    for frame_type in (FrameType.SEND, FrameType.DELIVER, FrameType.BROADCAST, FrameType.HISTORY_ITEM):
        with pytest.raises(ValueError):
            encoder.encode(codec.Frame(frame_type, kind=""))
        with pytest.raises(ValueError):
            encoder.encode(codec.Frame(frame_type, kind="k" * (MAX_CUSTOM_KIND_LEN + 1)))
        with pytest.raises(ValueError):
            encoder.encode(codec.Frame(frame_type, kind="é" * 33))  # 66 bytes, 33 characters
        encoder.encode(codec.Frame(frame_type, kind="é" * 32))  # 64 bytes


def test_encoder_payload_type(codec):
    encoder = codec.Encoder()
    for bad in ("text", 5, None, [1]):
        with pytest.raises(TypeError):
            encoder.encode(codec.Frame(FrameType.PONG, payload=bad))
    with pytest.raises(TypeError):
        encoder.encode("not a frame")


def test_encoder_frame_too_large(codec):
    limit = 1000
    noise = random.Random(1).randbytes(limit)  # incompressible
    encoder = codec.Encoder(max_frame_size=limit)
    assert len(encoder.encode(codec.Frame(FrameType.PONG, payload=noise[: limit - 2]))) == limit + 2
    for frame in (
        codec.Frame(FrameType.PONG, payload=noise[: limit - 1]),  # length limit + 1
        codec.Frame(FrameType.PONG, payload=b"a" * (limit + 1)),  # compressible, but the payload is too big
        codec.Frame(0x40, payload=b"\x00" * limit),  # extension payloads are never compressed
        codec.Frame(FrameType.ACK, seq=MAX_U64, payload=noise[: limit - 11]),
    ):
        with pytest.raises(ProtocolError) as info:
            encoder.encode(frame)
        assert info.value.code == Code.FRAME_TOO_LARGE
    # A compressible payload of exactly the limit fits once compressed.
    fits = codec.Frame(FrameType.PONG, payload=b"a" * limit)
    assert decode_all(codec, encoder.encode(fits), max_frame_size=limit) == [fits]


def test_encode_batch_propagates_errors(codec):
    encoder = codec.Encoder()
    with pytest.raises(ValueError):
        encoder.encode_batch([codec.Frame(FrameType.PING), codec.Frame(FrameType.PING, A)])


# --------------------------------------------------------------------------
# DELIVER and BROADCAST fast paths


def test_encode_deliver_equals_encode(codec):
    for compress_threshold in (0, 16, DEFAULT_COMPRESS_THRESHOLD):
        encoder = codec.Encoder(compress_threshold=compress_threshold)
        for lane, flags, seq, msg_id, kind, payload in [
            (0, A, 1, 1001, "payment.result", b'{"ok":true}'),
            (1, A | R, 2**21, 2**28, "x.y", b""),
            (1, A, MAX_U64, MAX_U64, "ü" * 32, b"b" * 5000),
        ]:
            expected = encoder.encode(
                codec.Frame(FrameType.DELIVER, flags | lane, payload, seq=seq, msg_id=msg_id, kind=kind)
            )
            assert encoder.encode_deliver(lane, flags, seq, msg_id, kind, payload) == expected
    assert codec.Encoder().encode_deliver(0, A, 1, 1001, "payment.result", b'{"ok":true}') == h(
        "11 12 08 01 e9 07 01 7b 22 6f 6b 22 3a 74 72 75 65 7d"
    )
    with pytest.raises(ValueError):
        codec.Encoder().encode_deliver(0, C, 1, 1, "order.event", b"")
    with pytest.raises(ValueError):
        codec.Encoder().encode_deliver(0, A, -1, 1, "order.event", b"")


def test_encode_sendack_equals_encode(codec):
    for compress_threshold in (0, 16, DEFAULT_COMPRESS_THRESHOLD):
        encoder = codec.Encoder(compress_threshold=compress_threshold)
        for flags, ref, msg_id, payload in [
            (0, 1, 1001, b'{"recipients":1}'),
            (R, 2**21, 2**28, b""),
            (0, MAX_U64, MAX_U64, b"r" * 5000),
        ]:
            expected = encoder.encode(
                codec.Frame(FrameType.SENDACK, flags, payload, ref=ref, msg_id=msg_id))
            assert encoder.encode_sendack(flags, ref, msg_id, payload) == expected
    # PROTOCOL.md: SENDACK 0x11, flags, ref u, msg_id u, then the payload.
    assert codec.Encoder().encode_sendack(0, 7, 1001, b"") == h("05 11 00 07 e9 07")
    with pytest.raises(ValueError):
        codec.Encoder().encode_sendack(A, 7, 1, b"")          # ACK_REQUESTED: not on a SENDACK
    with pytest.raises(ValueError):
        codec.Encoder().encode_sendack(0, -1, 1, b"")


def test_broadcast_is_encoded_once_for_every_recipient(codec):
    args = (2, R, 3, 42, "price.update", b'{"sku":"A1","price":"5.00","version":7}')
    encoder = codec.Encoder()
    data = encoder.encode_broadcast(*args)
    assert isinstance(data, bytes)  # immutable: one object can be written to every subscriber
    lane, flags, channel, offset, kind, payload = args
    frame = codec.Frame(FrameType.BROADCAST, flags | lane, payload, channel=channel, offset=offset, kind=kind)
    assert data == encoder.encode(frame)
    # Nothing recipient-specific: other encoders and later calls give the same bytes ...
    assert codec.Encoder().encode_broadcast(*args) == data == encoder.encode_broadcast(*args)
    # ... and every recipient's decoder reads the same frame from that one object.
    recipients = [codec.Decoder() for _ in range(5)]
    assert all(decoder.feed(data) == [frame] for decoder in recipients)
    big = encoder.encode_broadcast(3, 0, 1, 2, "promo.offer", b"offer " * 200)
    assert big[2] == 3 | Z and decode_all(codec, big)[0].payload == b"offer " * 200
    with pytest.raises(ValueError):
        encoder.encode_broadcast(2, A, 3, 42, "price.update", b"")


# --------------------------------------------------------------------------
# hypothesis: the Python twin and the native module, side by side

UINT64 = st.one_of(st.sampled_from(INTS + [2**7 - 1, 2**14, 2**35, 2**56 - 1, 2**56]), st.integers(0, MAX_U64))
TEXT = st.text(max_size=24)
KIND = st.one_of(
    st.sampled_from(sorted(KIND_CODES)),
    st.text(min_size=1, max_size=MAX_CUSTOM_KIND_LEN).filter(lambda s: len(s.encode()) <= MAX_CUSTOM_KIND_LEN),
)
PAYLOAD = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([BREAK_EVEN, ONE_SHORTER, BREAK_EVEN * 20]),
    st.builds(lambda unit, count: unit * count, st.binary(min_size=1, max_size=8), st.integers(1, 400)),
    st.binary(min_size=500, max_size=1200),
)
FIELD_VALUES = {U: UINT64, S: TEXT, K: KIND}
SCHEMA_TYPES = sorted(int(t) for t in FRAME_SCHEMAS)
DIFF_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@st.composite
def frame_specs(draw):
    """``(type, flags, payload, fields)`` of a valid frame, buildable in either twin."""
    frame_type = draw(st.one_of(st.sampled_from(SCHEMA_TYPES), st.sampled_from([0x40, 0x5A, 0x7F])))
    flags = draw(st.integers(0, 0xFF))
    payload = draw(PAYLOAD)
    if frame_type in EXTENSION_TYPES:
        return frame_type, flags, payload, {}
    schema, allowed = FRAME_SCHEMAS[frame_type]
    fields = {name: draw(FIELD_VALUES[kind]) for name, kind in schema}
    # Non-schema fields with any valid value: the encoder must ignore them.
    for name in draw(st.lists(st.sampled_from(INT_FIELDS + STR_FIELDS), max_size=3)):
        if name not in fields:
            fields[name] = draw(UINT64 if name in INT_FIELDS else TEXT)
    return frame_type, flags & allowed, payload, fields


def build(codec, spec):
    frame_type, flags, payload, fields = spec
    return codec.Frame(frame_type, flags, payload, **fields)


def outcome(call):
    """A comparable summary of calling ``call()``: its result or its error class/code."""
    try:
        return ("ok", call())
    except ProtocolError as exc:
        return ("ProtocolError", int(exc.code))
    except TypeError:
        return ("TypeError",)
    except ValueError:
        return ("ValueError",)


def feed_record(codec, chunks, max_frame_size=DEFAULT_MAX_FRAME_SIZE):
    """What a decoder does with each chunk: frames + buffered, or error code + frames."""
    decoder = codec.Decoder(max_frame_size)
    record = []
    for chunk in chunks:
        try:
            frames = decoder.feed(chunk)
            record.append(("ok", [f.as_tuple() for f in frames], decoder.buffered))
        except ProtocolError as exc:
            record.append(("error", int(exc.code), [f.as_tuple() for f in exc.frames]))
        assert decoder.failed == any(entry[0] == "error" for entry in record)
    return record


def split(data: bytes, cuts) -> list:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


@DIFF_SETTINGS
@given(
    specs=st.lists(frame_specs(), min_size=1, max_size=6),
    threshold=st.sampled_from([0, 1, 16, 100, DEFAULT_COMPRESS_THRESHOLD]),
    cuts=st.lists(st.integers(0, 10**6), max_size=8),
)
def test_differential_valid_frames(codec_pair, specs, threshold, cuts):
    py, native = codec_pair
    py_encoder, native_encoder = py.Encoder(compress_threshold=threshold), native.Encoder(compress_threshold=threshold)
    parts = []
    for spec in specs:
        py_bytes = py_encoder.encode(build(py, spec))
        assert native_encoder.encode(build(native, spec)) == py_bytes, spec
        parts.append(py_bytes)
    stream = b"".join(parts)
    assert native_encoder.encode_batch([build(native, s) for s in specs]) == stream
    expected = [expected_decoded(py, build(py, spec)).as_tuple() for spec in specs]
    chunks = split(stream, cuts)
    for codec in codec_pair:
        assert [f.as_tuple() for f in decode_chunks(codec, chunks)] == expected, codec.IMPLEMENTATION
    assert feed_record(py, chunks) == feed_record(native, chunks)


def mutate(draw, data: bytearray) -> None:
    """One random bit flip, byte change, truncation, insertion or deletion, in place."""
    op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
    pos = draw(st.integers(0, len(data)))
    if op == "flip" and pos < len(data):
        data[pos] ^= 1 << draw(st.integers(0, 7))
    elif op == "set" and pos < len(data):
        data[pos] = draw(st.sampled_from([0x00, 0x01, 0x02, 0x7F, 0x80, 0xFF, 0x3F, 0x40, 0x0D, 0x04, 0xC3]))
    elif op == "truncate":
        del data[pos:]
    elif op == "insert":
        data[pos:pos] = draw(st.binary(min_size=1, max_size=6))
    elif op == "delete":
        del data[pos : pos + draw(st.integers(1, 4))]


@st.composite
def mutated_streams(draw):
    """A valid stream of frames (encoded by the Python twin), damaged.

    1-3 mutations hit frame bodies, which are then re-framed with a correct
    length (so they reach the type, flag, field and compression checks);
    0-2 more hit the raw stream (length prefixes, truncation).
    """
    specs = draw(st.lists(frame_specs(), min_size=1, max_size=4))
    threshold = draw(st.sampled_from([0, 16, DEFAULT_COMPRESS_THRESHOLD]))
    encoder = reference.Encoder(compress_threshold=threshold)
    bodies = []
    for spec in specs:
        data = encoder.encode(build(reference, spec))
        prefix = next(i for i, byte in enumerate(data) if byte < 0x80) + 1
        bodies.append(bytearray(data[prefix:]))
    for _ in range(draw(st.integers(1, 3))):
        body = bodies[draw(st.integers(0, len(bodies) - 1))]
        if draw(st.booleans()):
            mutate(draw, body)
        elif draw(st.booleans()):  # another type
            body[0] = draw(st.one_of(st.sampled_from(SCHEMA_TYPES), st.integers(0, 0xFF)))
        else:  # other flags
            body[1] = draw(st.integers(0, 0xFF))
        if len(body) < 2:
            body[:] = body + b"\x00" * (2 - len(body))
    stream = bytearray(b"".join(uv(len(body)) + body for body in bodies))
    for _ in range(draw(st.integers(0, 2))):
        mutate(draw, stream)
    return bytes(stream)


JUNK_PIECES = [
    b"\x80", b"\x80\x00", b"\xff" * 9 + b"\x01", b"\xff" * 9 + b"\x02", b"\x00", b"\x0d", b"\x63",
    b"\xc3\x28", b"\x02\xed\xa0", b"\x00\x00", b"\x00\x41" + b"k" * 10, b"\x00\x41" + b"\xff" * 65,
    b"\x00\x41" + b"k" * 65, b"\x00\x03x.y",
]
BLOCK_600 = lz4.block.compress(b"a" * 600, store_size=False)
COMPRESSED_PIECES = [
    b"", b"\x00", b"\x00\x00", b"\x00" + BLOCK_600, b"\x80", b"\x80\x00", b"\x05\x00\x00\x00", uv(600) + BLOCK_600,
    uv(599) + BLOCK_600, uv(601) + BLOCK_600, uv(600) + BLOCK_600[:-1], uv(2**20 + 1) + BLOCK_600,
    uv(600) + BLOCK_600 + b"\x00",
]


KIND_TYPES = [t for t in SCHEMA_TYPES if any(kind == K for _, kind in FRAME_SCHEMAS[t][0])]


@st.composite
def framed_junk(draw):
    """Frames with a correct length, a core type and allowed flags, and bodies
    that are valid fields or junk, followed by valid or broken payloads."""
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        frame_type = draw(st.one_of(st.sampled_from(SCHEMA_TYPES), st.sampled_from(KIND_TYPES)))
        schema, allowed = FRAME_SCHEMAS[frame_type]
        flags = draw(st.integers(0, 0xFF)) & allowed
        if draw(st.integers(0, 3)):  # each field valid, or now and then a junk piece
            body = b""
            for name, kind in schema:
                if draw(st.integers(0, 2)) == 0:
                    body += draw(st.sampled_from(JUNK_PIECES))
                else:
                    body += encode_field(kind, draw(FIELD_VALUES[kind]))
        else:
            body = b"".join(draw(st.lists(st.one_of(st.binary(max_size=4), st.sampled_from(JUNK_PIECES)), max_size=6)))
        if draw(st.booleans()):
            flags |= Z
            body += draw(st.sampled_from(COMPRESSED_PIECES))
        else:
            body += draw(st.binary(max_size=8))
        body = bytes((frame_type, flags)) + body
        out += uv(len(body)) + body
    return out


@settings(DIFF_SETTINGS, max_examples=400)
@given(stream=framed_junk(), cuts=st.lists(st.integers(0, 10**6), max_size=3))
def test_differential_framed_junk(codec_pair, stream, cuts):
    chunks = split(stream, cuts)
    py, native = codec_pair
    assert feed_record(py, chunks) == feed_record(native, chunks)


@DIFF_SETTINGS
@given(
    stream=st.one_of(st.binary(max_size=300), mutated_streams(), framed_junk()),
    cuts=st.lists(st.integers(0, 10**6), max_size=6),
    tail=st.binary(max_size=8),
)
def test_differential_garbage_and_mutations(codec_pair, stream, cuts, tail):
    chunks = split(stream, cuts) + [tail]
    py, native = codec_pair
    assert feed_record(py, chunks) == feed_record(native, chunks)


LIMITS = st.one_of(
    st.integers(MIN_FRAME_SIZE_LIMIT, 1500),
    st.sampled_from([MIN_FRAME_SIZE_LIMIT, 127, 128, 16383, 16384, DEFAULT_MAX_FRAME_SIZE, MAX_FRAME_SIZE_LIMIT]),
    st.integers(MIN_FRAME_SIZE_LIMIT, MAX_FRAME_SIZE_LIMIT),
)


@DIFF_SETTINGS
@given(
    specs=st.lists(frame_specs(), min_size=1, max_size=4),
    threshold=st.sampled_from([0, 100, DEFAULT_COMPRESS_THRESHOLD]),
    damage=st.integers(0, 2),
    cuts=st.lists(st.integers(0, 10**6), max_size=4),
    data=st.data(),
)
def test_differential_frame_limits(codec_pair, specs, threshold, damage, cuts, data):
    py, native = codec_pair
    frames = [py.Encoder(compress_threshold=threshold).encode(build(py, spec)) for spec in specs]
    # Limits right at the interesting sizes: frame lengths and payload sizes, +-1.
    sizes = [len(f) - len(uv(len(f))) for f in frames] + [len(spec[2]) for spec in specs]
    near = st.builds(
        lambda size, delta: min(max(size + delta, MIN_FRAME_SIZE_LIMIT), MAX_FRAME_SIZE_LIMIT),
        st.sampled_from(sizes),
        st.sampled_from([-1, 0, 1]),
    )
    limit = data.draw(st.one_of(near, LIMITS), label="limit")
    results = []
    for codec in codec_pair:
        encoder = codec.Encoder(max_frame_size=limit, compress_threshold=threshold)
        results.append([outcome(lambda s=s: encoder.encode(build(codec, s))) for s in specs])
    assert results[0] == results[1]
    stream = bytearray(b"".join(frames))
    for _ in range(damage):
        mutate(data.draw, stream)
    chunks = split(bytes(stream), cuts)
    assert feed_record(py, chunks, limit) == feed_record(native, chunks, limit)


BAD_VALUES = st.sampled_from([-1, 2**64, 2**70, 1.5, None, "7", b"x", "", "\ud800", "k" * 65, "é" * 33, []])


@DIFF_SETTINGS
@given(
    spec=frame_specs(),
    frame_type=st.one_of(st.none(), st.integers(-2, 0x101)),
    flags=st.one_of(st.none(), st.integers(-2, 0x1FF)),
    field=st.sampled_from(INT_FIELDS + STR_FIELDS),
    bad=BAD_VALUES,
    payload=st.sampled_from([None, "text", bytearray(b"ba"), memoryview(b"mv"), b"p" * 2000]),
    limit=st.sampled_from([MIN_FRAME_SIZE_LIMIT, 1000, DEFAULT_MAX_FRAME_SIZE]),
)
def test_differential_encoder_errors(codec_pair, spec, frame_type, flags, field, bad, payload, limit):
    spec_type, spec_flags, spec_payload, fields = spec
    fields = {**fields, field: bad}
    spec = (
        spec_type if frame_type is None else frame_type,
        spec_flags if flags is None else flags,
        spec_payload if payload is None else payload,
        fields,
    )
    results = []
    for codec in codec_pair:
        encoder = codec.Encoder(max_frame_size=limit)
        results.append(outcome(lambda: encoder.encode(build(codec, spec))))
    assert results[0] == results[1], spec
