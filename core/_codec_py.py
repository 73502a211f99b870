"""The reference frame codec: a plain-Python reading of PROTOCOL.md.

This module is the twin of the native ``core/_codec.pyx`` and the oracle of
the differential tests.  It follows the specification section by section:

* section 2 (primitive types): ``_read_uvarint``, ``_read_string``,
  ``_read_kind`` and their writing counterparts;
* section 3 and section 16 step 1 (the length prefix): ``Decoder._read_length``;
* sections 4, 6 and 7 (flags, frame types, fields): ``codes.FRAME_SCHEMAS``,
  walked by ``_decode_frame`` and ``Encoder.encode``;
* section 13 (compression): ``_decompress`` and ``Encoder.encode``;
* section 16 (decoding rules and error precedence): the order of the checks
  in ``Decoder._read_length`` and ``_decode_frame``.

The public API (``Frame``, ``Decoder``, ``Encoder``, ``IMPLEMENTATION``) is
the one of notes/CODEC_API.md, identical in both twins.
"""

from __future__ import annotations

import lz4.block

from .codes import (
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
from .errors import ProtocolError

__all__ = ["Frame", "Decoder", "Encoder", "IMPLEMENTATION"]

IMPLEMENTATION = "python"

_COMPRESSED = int(Flag.COMPRESSED)
_UINT64_LIMIT = 1 << 64
_MAX_UVARINT_BYTES = 10  # section 2.1: 64 bits in groups of seven
_MAX_LENGTH_BYTES = 4  # section 3: every frame limit is below 2**28
_REPR_PAYLOAD_BYTES = 64
_FIELD_NAMES = frozenset(INT_FIELDS) | frozenset(STR_FIELDS)


# --------------------------------------------------------------------------
# Frame


class Frame:
    """One frame: its type, flags, payload and every field a frame can carry.

    Only the fields of the type's schema travel on the wire; the others keep
    their defaults (0 for integer fields, "" for string fields).
    """

    __slots__ = ("type", "flags", "payload", *INT_FIELDS, *STR_FIELDS)

    # Frames are mutable, so they must not be hashable.
    __hash__ = None

    def __init__(self, type, flags=0, payload=b"", **fields):
        self.type = type
        self.flags = flags
        self.payload = payload
        for name in INT_FIELDS:
            setattr(self, name, 0)
        for name in STR_FIELDS:
            setattr(self, name, "")
        lane = fields.pop("lane", None)
        for name, value in fields.items():
            if name not in _FIELD_NAMES:
                raise TypeError(f"Frame() got an unexpected keyword argument {name!r}")
            setattr(self, name, value)
        if lane is not None:
            if not isinstance(lane, int):
                raise TypeError(f"lane must be an int, not {lane.__class__.__name__}")
            if not 0 <= lane <= 3:
                raise ValueError(f"lane must be 0..3, not {lane}")
            self.flags = flags | lane

    @property
    def lane(self):
        """The priority lane: the two low bits of the flags."""
        return self.flags & 3

    def as_tuple(self):
        """``(type, flags, payload, {field: value})`` with every INT and STR field."""
        fields = {name: getattr(self, name) for name in INT_FIELDS}
        fields.update((name, getattr(self, name)) for name in STR_FIELDS)
        return (self.type, self.flags, self.payload, fields)

    def __eq__(self, other):
        if not isinstance(other, Frame):
            return NotImplemented
        return self.as_tuple() == other.as_tuple()

    def __ne__(self, other):
        if not isinstance(other, Frame):
            return NotImplemented
        return self.as_tuple() != other.as_tuple()

    def __repr__(self):
        try:
            type_name = FrameType(self.type).name
        except (ValueError, TypeError):
            type_name = f"0x{self.type:02x}" if isinstance(self.type, int) else repr(self.type)
        parts = [type_name]
        parts.append(f"flags=0x{self.flags:02x}" if isinstance(self.flags, int) else f"flags={self.flags!r}")
        schema = FRAME_SCHEMAS.get(self.type) if isinstance(self.type, int) else None
        if schema is not None:
            parts.extend(f"{name}={getattr(self, name)!r}" for name, _ in schema[0])
        if self.payload:
            shown = repr(bytes(self.payload[:_REPR_PAYLOAD_BYTES]))
            if len(self.payload) > _REPR_PAYLOAD_BYTES:
                shown += f"...({len(self.payload)} bytes)"
            parts.append(f"payload={shown}")
        return f"Frame({', '.join(parts)})"


# --------------------------------------------------------------------------
# Reading (PROTOCOL.md sections 2, 13 and 16)


def _read_uvarint(data, pos, end, what):
    """Read one uvarint of ``data[pos:end]``; return ``(value, next_pos)``.

    Section 2.1: past the frame's end is MALFORMED; a non-canonical encoding,
    or a 10th byte other than 01, is BAD_VARINT (decided as soon as the
    offending byte is seen).
    """
    if pos < end and data[pos] < 0x80:  # the common one-byte case
        return data[pos], pos + 1
    value = 0
    for i in range(_MAX_UVARINT_BYTES):
        if pos + i >= end:
            raise ProtocolError(Code.MALFORMED, f"{what}: uvarint runs past the end of the frame")
        byte = data[pos + i]
        if i == _MAX_UVARINT_BYTES - 1 and byte != 0x01:
            raise ProtocolError(Code.BAD_VARINT, f"{what}: 10th uvarint byte is {byte:#04x}, not 0x01")
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise ProtocolError(Code.BAD_VARINT, f"{what}: non-canonical uvarint")
            return value, pos + i + 1
    raise AssertionError("unreachable: the 10th byte either ends the uvarint or fails")


def _read_bytes(data, pos, end, what):
    """Read a uvarint count and that many bytes (section 2.2, without UTF-8)."""
    size, pos = _read_uvarint(data, pos, end, what)
    if size > end - pos:
        raise ProtocolError(Code.MALFORMED, f"{what}: {size} bytes run past the end of the frame")
    return data[pos : pos + size], pos + size


def _utf8(raw, what):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(Code.BAD_UTF8, f"{what}: invalid UTF-8") from None


def _read_string(data, pos, end, what):
    """Section 2.2: a uvarint byte count and that many bytes of UTF-8."""
    raw, pos = _read_bytes(data, pos, end, what)
    return _utf8(raw, what), pos


def _read_kind(data, pos, end, what):
    """Section 2.3: a registered code >= 1, or 0 and an inline name of 1-64 bytes.

    The inline name is read as a string first (its MALFORMED / BAD_UTF8),
    then its length is checked (BAD_KIND).
    """
    code, pos = _read_uvarint(data, pos, end, what)
    if code:
        name = KINDS.get(code)
        if name is None:
            raise ProtocolError(Code.BAD_KIND, f"{what}: unknown kind code {code}")
        return name, pos
    raw, pos = _read_bytes(data, pos, end, what)
    name = _utf8(raw, what)
    if not 1 <= len(raw) <= MAX_CUSTOM_KIND_LEN:
        raise ProtocolError(Code.BAD_KIND, f"{what}: inline kind name of {len(raw)} bytes")
    return name, pos


_READERS = {U: _read_uvarint, S: _read_string, K: _read_kind}


def _decompress(data, limit):
    """Section 13: ``original_size`` then one LZ4 block; checks of section 16 step 6."""
    original_size, pos = _read_uvarint(data, 0, len(data), "original_size")
    if original_size > limit:
        raise ProtocolError(
            Code.FRAME_TOO_LARGE,
            f"decompressed payload of {original_size} bytes exceeds the limit of {limit}",
        )
    if original_size == 0:
        raise ProtocolError(Code.BAD_COMPRESSION, "original_size is 0")
    try:
        payload = lz4.block.decompress(data[pos:], uncompressed_size=original_size)
    except lz4.block.LZ4BlockError:
        raise ProtocolError(Code.BAD_COMPRESSION, "invalid LZ4 block") from None
    if len(payload) != original_size:
        raise ProtocolError(
            Code.BAD_COMPRESSION,
            f"block decompresses to {len(payload)} bytes, original_size says {original_size}",
        )
    return payload


def _decode_frame(data, pos, end, limit):
    """Decode the frame whose type byte is ``data[pos]`` and which ends at ``end``.

    Section 16 steps 3-6, in that order.  ``data`` is ``bytes``.
    """
    frame_type = data[pos]
    flags = data[pos + 1]
    pos += 2
    schema = FRAME_SCHEMAS.get(frame_type)
    if schema is None:
        if frame_type in EXTENSION_TYPES:
            return Frame(frame_type, flags, data[pos:end])
        raise ProtocolError(Code.UNKNOWN_FRAME, f"unknown frame type 0x{frame_type:02x}")
    fields, allowed = schema
    if flags & ~allowed:
        raise ProtocolError(
            Code.BAD_FLAGS,
            f"flags 0x{flags:02x} not allowed for {FrameType(frame_type).name} "
            f"(allowed 0x{allowed:02x})",
        )
    frame = Frame(frame_type, flags & ~_COMPRESSED)
    for name, field_kind in fields:
        value, pos = _READERS[field_kind](data, pos, end, name)
        setattr(frame, name, value)
    payload = data[pos:end]
    if flags & _COMPRESSED:
        payload = _decompress(payload, limit)
    frame.payload = payload
    return frame


def _check_frame_limit(value):
    if not isinstance(value, int):
        raise TypeError(f"max_frame_size must be an int, not {value.__class__.__name__}")
    if not MIN_FRAME_SIZE_LIMIT <= value <= MAX_FRAME_SIZE_LIMIT:
        raise ValueError(
            f"max_frame_size must be in [{MIN_FRAME_SIZE_LIMIT}, {MAX_FRAME_SIZE_LIMIT}], not {value}"
        )
    return value


class Decoder:
    """A streaming decoder: ``feed`` bytes as they arrive, get whole frames back.

    Between calls it holds at most the start of one incomplete frame (at most
    ``max_frame_size + 4`` bytes).  The first malformed frame fails it for good.
    """

    __slots__ = ("_limit", "_pending", "_header", "_failure")

    def __init__(self, max_frame_size=DEFAULT_MAX_FRAME_SIZE):
        self._limit = _check_frame_limit(max_frame_size)
        self._pending = bytearray()  # the first bytes of one incomplete frame
        self._header = None  # (prefix bytes, length) once the pending prefix is complete
        self._failure = None  # (code, message) after an error

    @property
    def buffered(self):
        """Bytes held for an incomplete frame."""
        return len(self._pending)

    @property
    def failed(self):
        """True once the decoder met malformed input."""
        return self._failure is not None

    def feed(self, data):
        """Decode ``data`` (bytes-like); return the frames it completes, in order.

        Raises ProtocolError with ``frames`` = the frames completed earlier in
        this call; every later call raises the same code with ``frames=[]``.
        """
        if self._failure is not None:
            code, message = self._failure
            raise ProtocolError(code, f"decoder already failed: {message}", [])
        if not isinstance(data, bytes):
            data = memoryview(data).tobytes()  # bytearray, memoryview; TypeError for non-buffers
        frames = []
        try:
            pos = self._finish_pending(data, frames)
            end = len(data)
            while pos < end:
                header = self._read_length(data, pos, end)
                if header is None:
                    self._pending += data[pos:]
                    break
                prefix_bytes, length = header
                frame_end = pos + prefix_bytes + length
                if frame_end > end:
                    self._pending += data[pos:]
                    self._header = header
                    break
                frames.append(_decode_frame(data, pos + prefix_bytes, frame_end, self._limit))
                pos = frame_end
        except ProtocolError as exc:
            self._failure = (exc.code, exc.message)
            self._pending.clear()
            self._header = None
            raise ProtocolError(exc.code, exc.message, frames) from None
        return frames

    def _finish_pending(self, data, frames):
        """Complete the pending frame from the head of ``data``; return the bytes used."""
        pending = self._pending
        if not pending:
            return 0
        pos = 0
        # The prefix is at most 4 bytes: add one byte at a time so that its
        # checks run the moment it is complete (section 16 step 1).
        while self._header is None:
            if pos == len(data):
                return pos
            pending.append(data[pos])
            pos += 1
            self._header = self._read_length(pending, 0, len(pending))
        prefix_bytes, length = self._header
        missing = prefix_bytes + length - len(pending)
        pending += data[pos : pos + missing]
        pos += min(missing, len(data) - pos)
        if len(pending) == prefix_bytes + length:
            frame_bytes = bytes(pending)
            pending.clear()
            self._header = None
            frames.append(_decode_frame(frame_bytes, prefix_bytes, len(frame_bytes), self._limit))
        return pos

    def _read_length(self, data, pos, end):
        """Section 16 step 1: ``(prefix bytes, length)``, or None while incomplete."""
        value = 0
        for i in range(_MAX_LENGTH_BYTES):
            if pos + i >= end:
                return None
            byte = data[pos + i]
            value |= (byte & 0x7F) << (7 * i)
            if byte & 0x80:
                continue
            if byte == 0 and i > 0:
                raise ProtocolError(Code.BAD_VARINT, "non-canonical frame length")
            if value > self._limit:
                raise ProtocolError(
                    Code.FRAME_TOO_LARGE,
                    f"frame length {value} exceeds the limit of {self._limit}",
                )
            if value < 2:
                raise ProtocolError(Code.MALFORMED, f"frame length {value} is below 2")
            return i + 1, value
        raise ProtocolError(Code.FRAME_TOO_LARGE, "frame length prefix longer than 4 bytes")


# --------------------------------------------------------------------------
# Writing (PROTOCOL.md sections 2, 3 and 13)


def _uvarint(value):
    """The shortest uvarint of ``0 <= value < 2**64``."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _check_uint(name, value):
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {value.__class__.__name__}")
    if not 0 <= value < _UINT64_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**64), not {value}")
    return value


def _check_str(name, value):
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {value.__class__.__name__}")
    return value.encode("utf-8")  # UnicodeEncodeError (a ValueError) for surrogates


def _write_uvarint(out, name, value):
    out += _uvarint(_check_uint(name, value))


def _write_string(out, name, value):
    raw = _check_str(name, value)
    out += _uvarint(len(raw))
    out += raw


def _write_kind(out, name, value):
    raw = _check_str(name, value)
    if not raw:
        raise ValueError(f"{name} must not be empty")
    code = KIND_CODES.get(value)
    if code is not None:
        out += _uvarint(code)
        return
    if len(raw) > MAX_CUSTOM_KIND_LEN:
        raise ValueError(f"{name}: inline kind name of {len(raw)} bytes (at most {MAX_CUSTOM_KIND_LEN})")
    out.append(0)
    out += _uvarint(len(raw))
    out += raw


_WRITERS = {U: _write_uvarint, S: _write_string, K: _write_kind}


class Encoder:
    """Turns Frames into bytes; compresses large payloads (section 13)."""

    __slots__ = ("_limit", "_threshold")

    def __init__(self, max_frame_size=DEFAULT_MAX_FRAME_SIZE, compress_threshold=DEFAULT_COMPRESS_THRESHOLD):
        self._limit = _check_frame_limit(max_frame_size)
        if not isinstance(compress_threshold, int):
            raise TypeError(
                f"compress_threshold must be an int, not {compress_threshold.__class__.__name__}"
            )
        if compress_threshold < 0:
            raise ValueError(f"compress_threshold must be >= 0, not {compress_threshold}")
        self._threshold = compress_threshold

    @property
    def max_frame_size(self):
        return self._limit

    @property
    def compress_threshold(self):
        return self._threshold

    def encode(self, frame):
        """The bytes of ``frame``: length, type, flags, schema fields, payload."""
        if not isinstance(frame, Frame):
            raise TypeError(f"encode() needs a Frame, not {frame.__class__.__name__}")
        frame_type = frame.type
        flags = frame.flags
        if not isinstance(frame_type, int):
            raise TypeError(f"type must be an int, not {frame_type.__class__.__name__}")
        if not isinstance(flags, int):
            raise TypeError(f"flags must be an int, not {flags.__class__.__name__}")
        schema = FRAME_SCHEMAS.get(frame_type)
        if schema is None:
            if frame_type not in EXTENSION_TYPES:
                raise ValueError(f"unknown frame type {frame_type!r}")
            if not 0 <= flags <= 0xFF:
                raise ValueError(f"flags {flags:#x} do not fit in a byte")
            body = bytearray((frame_type, flags))
            compressible = False
        else:
            fields, allowed = schema
            flags &= ~_COMPRESSED  # the encoder decides about compression
            if flags & ~allowed:
                raise ValueError(
                    f"flags {flags:#x} not allowed for {FrameType(frame_type).name} (allowed {allowed:#04x})"
                )
            body = bytearray((frame_type, flags))
            for name, field_kind in fields:
                _WRITERS[field_kind](body, name, getattr(frame, name))
            compressible = True
        payload = frame.payload
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, not {payload.__class__.__name__}")
        payload = bytes(payload)
        if len(payload) > self._limit:
            raise ProtocolError(
                Code.FRAME_TOO_LARGE,
                f"payload of {len(payload)} bytes exceeds the frame limit of {self._limit}",
            )
        if compressible and self._threshold and len(payload) >= self._threshold:
            block = lz4.block.compress(payload, store_size=False)
            original_size = _uvarint(len(payload))
            if len(original_size) + len(block) < len(payload):
                body[1] |= _COMPRESSED
                payload = original_size + block
        length = len(body) + len(payload)
        if length > self._limit:
            raise ProtocolError(
                Code.FRAME_TOO_LARGE,
                f"frame length {length} exceeds the frame limit of {self._limit}",
            )
        return b"".join((_uvarint(length), body, payload))

    def encode_batch(self, frames):
        """``b"".join(encode(f) for f in frames)``."""
        return b"".join([self.encode(frame) for frame in frames])

    def encode_deliver(self, lane, flags, seq, msg_id, kind, payload):
        """A DELIVER frame's bytes (see ``encode``)."""
        return self.encode(
            Frame(FrameType.DELIVER, flags | lane, payload, seq=seq, msg_id=msg_id, kind=kind)
        )

    def encode_sendack(self, flags, ref, msg_id, payload):
        """A SENDACK frame's bytes (see ``encode``)."""
        return self.encode(Frame(FrameType.SENDACK, flags, payload, ref=ref, msg_id=msg_id))

    def encode_broadcast(self, lane, flags, channel, offset, kind, payload):
        """A BROADCAST frame's bytes: nothing recipient-specific, so encode once, send to all."""
        return self.encode(
            Frame(FrameType.BROADCAST, flags | lane, payload, channel=channel, offset=offset, kind=kind)
        )
