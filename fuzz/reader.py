"""Reading a fuzz input as a script: choices, numbers and raw byte runs.

A target reads the fuzzer's bytes front to back through a ``Script``.  Past
the end every read answers zero (or nothing), so any input is a complete
script and a short one is a short script: the fuzzer's mutations (flip a
byte, cut, splice) always produce something a target can run, and an input
saved from a crash replays the same steps in any process, with or without
atheris (``Script`` needs nothing but the bytes).
"""

from __future__ import annotations


class Script:
    """A cursor over one fuzz input."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)
        self.pos = 0

    def more(self) -> bool:
        """Bytes are left."""
        return self.pos < len(self.data)

    def byte(self) -> int:
        """The next byte, 0 once the input is used up."""
        if self.pos >= len(self.data):
            return 0
        b = self.data[self.pos]
        self.pos += 1
        return b

    def u16(self) -> int:
        """Two bytes, little-endian."""
        return self.byte() | self.byte() << 8

    def below(self, n: int) -> int:
        """A number in 0..n-1 from one byte (n <= 256) or two."""
        return (self.byte() if n <= 256 else self.u16()) % n

    def pick(self, options):
        """One of ``options`` (a sequence)."""
        return options[self.below(len(options))]

    def flag(self) -> bool:
        return self.byte() & 1 == 1

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes (fewer at the end)."""
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        """Everything left."""
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out


def uvarint(value: int) -> bytes:
    """Unsigned LEB128, as PROTOCOL.md section 2.1 writes it."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def framed(body: bytes) -> bytes:
    """``body`` (type, flags, fields, payload) behind its length prefix."""
    return uvarint(len(body)) + body
