"""Fuzz targets over the frame codec: the native Decoder against its twin.

``decoder``: an arbitrary byte stream, cut into chunks the input chooses and
handed over as bytes, bytearray or memoryview (contiguous or not), fed to
the native ``_codec.Decoder`` and to the plain-Python twin.  Both must give
the same frames, the same ``buffered`` counts and the same error codes, at
the same chunk; a failed decoder must stay failed; ``buffered`` never
exceeds the limit + 4.  Every frame decoded is encoded again by both
encoders (same bytes or same exception type), and what they write decodes
to the same frame.

``lz4``: one frame with the COMPRESSED flag whose original size and lz4
block come from the input, raw or as a real block of input bytes, then
damaged; the decompressed payload is checked against the limit by both
twins alike, and an undamaged block must give its input back.

A ProtocolError is the clean answer to bad bytes; any other exception, a
difference between the twins or a broken invariant is a finding.
"""

from __future__ import annotations

import lz4.block

from tillwire.core import _codec, _codec_py
from tillwire.core.codes import DEFAULT_MAX_FRAME_SIZE, Flag, FrameType
from tillwire.core.errors import ProtocolError

from .reader import Script, framed, uvarint

# Frame limits near the edges of 1-, 2- and 3-byte length prefixes.
LIMITS = (64, 65, 100, 127, 128, 200, 1000, 4096, 16383, 16384, 65536, DEFAULT_MAX_FRAME_SIZE)

_PY_REENCODE = {}
_NATIVE_REENCODE = {}


def _encoders(limit):
    """(python, native) encoders that never compress, one pair per limit."""
    if limit not in _PY_REENCODE:
        _PY_REENCODE[limit] = _codec_py.Encoder(limit, compress_threshold=0)
        _NATIVE_REENCODE[limit] = _codec.Encoder(limit, compress_threshold=0)
    return _PY_REENCODE[limit], _NATIVE_REENCODE[limit]


def as_buffer(form: int, chunk: bytes):
    """``chunk`` as bytes, bytearray, a memoryview, or a non-contiguous memoryview."""
    form &= 3
    if form == 1:
        return bytearray(chunk)
    if form == 2:
        return memoryview(chunk)
    if form == 3:
        doubled = bytearray(2 * len(chunk))
        doubled[::2] = chunk
        return memoryview(doubled)[::2]
    return chunk


def split(stream: bytes, sizes: list) -> list:
    """``stream`` in chunks of ``sizes`` (cycled); one chunk when there are none."""
    if not sizes:
        return [stream]
    chunks, pos, i = [], 0, 0
    while pos < len(stream):
        chunks.append(stream[pos:pos + sizes[i % len(sizes)]])
        pos += sizes[i % len(sizes)]
        i += 1
    return chunks or [b""]


def feed_record(codec, chunks, limit, forms=0):
    """What a decoder does with each chunk (and one more empty one after):
    ("ok", frames, buffered) or ("error", code, frames before the error)."""
    decoder = codec.Decoder(limit)
    record = []
    failed = False
    for i, chunk in enumerate(chunks + [b""]):
        try:
            frames = decoder.feed(as_buffer(forms >> (2 * (i % 4)), chunk))
        except ProtocolError as exc:
            record.append(("error", int(exc.code), [f.as_tuple() for f in exc.frames]))
            assert not failed or exc.frames == [], "a failed decoder returned frames"
            failed = True
        else:
            assert not failed, f"{codec.IMPLEMENTATION}: a failed decoder decoded again"
            assert decoder.buffered <= limit + 4, (codec.IMPLEMENTATION, decoder.buffered, limit)
            record.append(("ok", frames, decoder.buffered))
        assert decoder.failed == failed, codec.IMPLEMENTATION
    return record


def _outcome(call):
    try:
        return ("ok", call())
    except ProtocolError as exc:        # FRAME_TOO_LARGE: a decompressed payload re-encoded
        return ("ProtocolError", int(exc.code))
    except (ValueError, TypeError, OverflowError) as exc:
        return (type(exc).__name__,)


def _check_reencode(py_frames, native_frames, limit):
    """Both encoders agree on every decoded frame, and what they write
    decodes to that frame again."""
    py_enc, native_enc = _encoders(limit)
    for pf, nf in zip(py_frames, native_frames):
        repr(nf)
        a = _outcome(lambda: py_enc.encode(pf))
        b = _outcome(lambda: native_enc.encode(nf))
        assert a == b, ("re-encode", pf.as_tuple(), a, b)
        if a[0] == "ok":
            again = _codec_py.Decoder(limit).feed(a[1])
            assert [f.as_tuple() for f in again] == [pf.as_tuple()], ("round trip", pf.as_tuple())


def compare(chunks, limit, forms=0):
    """Feed both twins the same chunks; they must agree step by step."""
    py = feed_record(_codec_py, chunks, limit, forms)
    native = feed_record(_codec, chunks, limit, forms)
    assert len(py) == len(native)
    for step, (a, b) in enumerate(zip(py, native)):
        if a[0] == "ok" and b[0] == "ok":
            assert [f.as_tuple() for f in a[1]] == [f.as_tuple() for f in b[1]], ("frames", step)
            assert a[2] == b[2], ("buffered", step, a[2], b[2])
            _check_reencode(a[1], b[1], limit)
        else:
            assert a == b, ("outcome", step, a, b)
    return native


def decoder(data: bytes) -> None:
    """Target: an arbitrary stream, chunked as the input says."""
    s = Script(data)
    limit = s.pick(LIMITS)
    forms = s.byte()
    sizes = [1 + s.byte() for _ in range(s.byte() % 8)]
    compare(split(s.rest(), sizes), limit, forms)


# Frame heads (type, flags with COMPRESSED, fields) a compressed payload may follow.
_Z = int(Flag.COMPRESSED)
_HEADS = (
    bytes((FrameType.PING, _Z)),
    bytes((FrameType.PONG, _Z)),
    bytes((FrameType.DELIVER, _Z | 1)) + uvarint(7) + uvarint(1001) + uvarint(0) + uvarint(11)
    + b"order.event",
    bytes((FrameType.SEND, _Z | 8 | 1)) + uvarint(3) + uvarint(0) + uvarint(3) + b"t:a"
    + uvarint(0) + uvarint(12) + b"chat.message" + uvarint(0),
    bytes((FrameType.BROADCAST, _Z | 2)) + uvarint(1) + uvarint(2) + uvarint(0) + uvarint(12)
    + b"price.update",
    bytes((FrameType.CLOSE, _Z)) + uvarint(48),
    bytes((FrameType.HELLO, _Z)) + uvarint(1) + uvarint(0) + uvarint(3) + b"tok",
)
_AFTER = framed(bytes((FrameType.PING, 0)) + b"after")


def lz4_block(data: bytes) -> None:
    """Target: a compressed payload's original size and block."""
    s = Script(data)
    limit = s.pick(LIMITS)
    head = s.pick(_HEADS)
    mode = s.byte()
    plain = None
    if mode & 3 == 0:
        # Size and block straight from the input.
        size = s.u16() | (s.byte() << 16 if mode & 4 else 0)
        block = s.rest()
    else:
        # A real block of input bytes (repeated, so lz4 finds matches)...
        piece = s.take(1 + s.byte())
        plain = (piece * (1 + s.byte() % 64))[:1 << 17]
        block = bytearray(lz4.block.compress(plain, store_size=False))
        size = len(plain) + s.pick((0, 0, 0, 0, 1, -1, len(plain) + 1, -len(plain)))
        size = max(size, 0)
        # ...then damaged: one byte changed, or cut short.
        if mode & 3 == 2 and block:
            block[s.u16() % len(block)] = s.byte()
        elif mode & 3 == 3:
            del block[s.u16() % (len(block) + 1):]
        block = bytes(block)
    body = head + uvarint(size) + block
    stream = framed(body) + (_AFTER if mode & 8 else b"")
    if len(body) > (1 << 28) - 1:
        return
    cut = s.u16() % (len(stream) + 1)
    compare([stream], limit)
    native = compare([stream[:cut], stream[cut:]], limit, mode >> 4)
    if plain is not None and mode & 3 == 1 and size == len(plain) and 0 < size <= limit \
            and len(body) <= limit:
        frames = [f for step in native if step[0] == "ok" for f in step[1]]
        assert frames and frames[0].payload == plain, "an intact block did not decompress to its input"
