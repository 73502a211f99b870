"""Writes the seed corpus, fuzz/corpus/<target>/ (``python -m fuzz.seeds``).

Seeds are inputs the targets read as meaningful scripts: valid frames of
every type, a compressed frame, an extension frame, an opened session that
is delivered to and acknowledges, JSON bodies of every registered kind.
The fuzzer starts from them instead of from nothing, so the first seconds
of a short run already reach the decoders' deep paths.  The files are
committed; this script says how they were made.
"""

from __future__ import annotations

import hashlib
import pathlib

import lz4.block
import orjson

from tillwire.core import _codec_py
from tillwire.core.codes import Flag, FrameType, Lane

from .codec import LIMITS
from .reader import framed
from .session import HELLO, RESUME, wire

CORPUS = pathlib.Path(__file__).resolve().parent / "corpus"


def _frames() -> list:
    enc = _codec_py.Encoder(compress_threshold=64)
    F = _codec_py.Frame
    return [
        HELLO, RESUME,
        wire(FrameType.WELCOME, version=1, heartbeat=1000, time=5, max_frame=4096, epoch=2),
        wire(FrameType.PING, payload=b"hi"), wire(FrameType.PONG),
        wire(FrameType.GOAWAY, code=52, delay=10, payload=b"drain"),
        wire(FrameType.CLOSE, code=48, payload=b"bye"),
        wire(FrameType.ERROR, code=40, ref=3, payload=b"no"),
        wire(FrameType.SEND, Flag.ACK_REQUESTED | Lane.P1, b"{}", ref=7, to="store:acme/1",
             kind="chat.message"),
        wire(FrameType.SEND, Lane.P2, b"{}", ref=8, to="c:a/p", kind="x.custom", key="k"),
        wire(FrameType.SENDACK, ref=7, msg_id=99),
        wire(FrameType.DELIVER, Flag.ACK_REQUESTED | Lane.P0, b'{"a":1}', seq=1, msg_id=5,
             kind="payment.result"),
        wire(FrameType.BROADCAST, Lane.P2, b"{}", channel=1, offset=9, kind="price.update"),
        wire(FrameType.ACK, Lane.P1, seq=3), wire(FrameType.NACK, Lane.P0, seq=2, code=34),
        wire(FrameType.RECEIPT, msg_id=5, code=3, ref=1, to="t:a/2"),
        wire(FrameType.SUBSCRIBE, Lane.P2, ref=1, epoch=1, offset=4, to="c:a/p"),
        wire(FrameType.UNSUBSCRIBE, Lane.P3, ref=2, to="c:a/p"),
        wire(FrameType.SUBSCRIBED, Lane.P2, channel=1, epoch=1, offset=4, to="c:a/p"),
        wire(FrameType.UNSUBSCRIBED, channel=1, code=37),
        wire(FrameType.RESYNC, channel=1, epoch=2, offset=3, count=4),
        wire(FrameType.HISTORY, Lane.P2, ref=1, count=3, to="c:a/p"),
        wire(FrameType.HISTORY_ITEM, Lane.P2, b"{}", ref=1, offset=2, msg_id=3, kind="price.update"),
        wire(FrameType.HISTORY_END, ref=1, offset=3, count=1, code=0),
        enc.encode(F(FrameType.PING, payload=b"a" * 300)),                 # compressed
        framed(bytes((0x41, 0x00)) + b"ext"),
    ]


def _decoder_seeds() -> list:
    frames = _frames()
    default = LIMITS.index(1 << 20)
    seeds = [bytes((default, 0, 0)) + f for f in frames]
    seeds.append(bytes((default, 0b11100100, 3, 1, 5, 64)) + b"".join(frames))
    seeds.append(bytes((0, 0, 1, 7)) + b"".join(frames[:8]))            # limit 64, 7-byte reads
    seeds.append(bytes((default, 0, 0)) + b"\x02\x03\x00\x80\x80\x80\x80\x01")   # bad prefix
    return seeds


def _lz4_seeds() -> list:
    seeds = []
    default = LIMITS.index(1 << 20)
    for head in range(7):
        # (limit, head, mode, piece length - 1, piece, repeats, size delta, ...)
        seeds.append(bytes((default, head, 1 | 8, 5)) + b"price " + bytes((30, 0, 0, 0)))
        seeds.append(bytes((default, head, 2, 5)) + b"price " + bytes((30, 0, 7, 0, 0x41, 3, 0)))
        seeds.append(bytes((default, head, 3, 5)) + b"price " + bytes((30, 0, 9, 0, 0, 0)))
    block = lz4.block.compress(b"z" * 200, store_size=False)
    seeds.append(bytes((default, 0, 0, 200, 0)) + block)
    seeds.append(bytes((0, 2, 1, 0, 0x7A, 63, 0, 0, 0)))               # over the 64-byte limit
    return seeds


def _raw(chunk: bytes) -> bytes:
    """A session script step that feeds ``chunk`` (at most 255 bytes) as raw input."""
    assert len(chunk) < 256
    return bytes((0, len(chunk))) + chunk


def _session_seeds() -> list:
    opened = bytes((3 << 3,))                       # default settings, HELLO + RESUME + accept
    drain = bytes((10, 7))                          # data_to_send(1 MiB)
    small = bytes((11, 3))                          # data_to_send(7)
    deliver = bytes((15, 1, 1, 1, 0)) + bytes((15, 0, 2, 1, 1))     # P1 seq 1, P0 seq 2
    frames = _frames()
    seeds = [
        opened + drain + deliver + drain + _raw(wire(FrameType.ACK, 1, seq=1)) + drain,
        opened + deliver + _raw(wire(FrameType.NACK, 0, seq=2, code=34)) + small + small + drain,
        opened + _raw(wire(FrameType.PING, payload=b"1") + wire(FrameType.PING, payload=b"2"))
        + small + bytes((13,)) + drain + bytes((13,)) + drain,
        opened + bytes((16, 2, 0, 1, 0, 1, 16, 3, 1, 2, 1, 2)) + small + drain,
        bytes((0,)) + _raw(HELLO) + bytes((14, 0x30, 0x75, 1)) + _raw(RESUME) + drain,
        bytes((4,)) + _raw(HELLO[:5]) + _raw(HELLO[5:] + RESUME) + drain,       # handshake limit
        opened + _raw(frames[-2]) + drain,                                      # compressed PING
        opened + _raw(frames[-1] + frames[8]) + bytes((20, 0, 1)) + drain,      # ext, SEND, close
        opened + bytes((23, 2, 0, 21, 0, 4)) + drain,                           # fanout, set_inbox
        opened + b"".join(_raw(f) for f in frames if len(f) < 200) + drain,
    ]
    return seeds


def _kinds_seeds() -> list:
    # (index in fuzz.kinds.KINDS, body)
    bodies = [
        (1, {"order": "o1", "status": "paid", "amount": "5.00", "currency": "CNY",
             "transaction": "4111111111111111"}),
        (2, {"order": "o2", "channel": "mall", "event": "created",
             "items": [{"sku": "6901234567892", "qty": 2}, {"sku": "x", "qty": 1}]}),
        (3, {"ticket": "t1", "code": "c", "text": "card 4111 1111 1111 1111 please"}),
        (8, {"conversation": "c1", "text": "\u0664\u0661\u0661\u0661\u2007" * 4}),
        (9, {"sku": "s1", "price": "9.99", "version": 1700000000123, "effective": 1.5}),
        (10, {"sku": "s1", "quantity": -3, "version": 4111111111111111}),
        (11, {"offer": "o", "title": "t", "valid_until": 1e9}),
        (12, {"member": "m", "text": "\uff14\uff11\uff11\uff11-1111-1111-1111"}),
        (0, {"a": [[[{"b": "4111-1111-1111-1111"}]]]}),
    ]
    seeds = [bytes((0, kind)) + orjson.dumps(b) for kind, b in bodies]
    seeds.append(b"\x00\x09" + b'{"s\\u006bu": "4111\\u00201111 1111 1111", "n": 4111111111111111.5}')
    seeds.append(b"\x00\x00" + b'{"k": "\\ud83d\\ude00 4111 1111 1111 1111"}')
    seeds.append(bytes((1, 5, 2, 0, 4, 5, 0, 3, 6, 1, 2, 3)))
    seeds.append(bytes((2, 0, 3, 3, 1, 4)))
    return seeds


SEEDS = {"decoder": _decoder_seeds, "lz4": _lz4_seeds, "session": _session_seeds,
         "kinds": _kinds_seeds}


def main() -> None:
    for target, make in SEEDS.items():
        d = CORPUS / target
        d.mkdir(parents=True, exist_ok=True)
        for data in make():
            (d / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)
        print(f"{target}: {len(list(d.iterdir()))} seeds in {d}")


if __name__ == "__main__":
    main()
