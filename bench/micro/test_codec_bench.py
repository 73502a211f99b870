"""Micro-benchmarks of the frame codec, native vs Python twin (pytest-benchmark).

    .venv/bin/python -m pytest bench/micro/test_codec_bench.py -q --benchmark-only \
        --benchmark-columns=min,mean,median,rounds --benchmark-group-by=group

Every case works on a batch of N = 10_000 DELIVER frames (lane P0,
ACK_REQUESTED, registered kind, growing seq / msg_id) through the batch APIs:
``Encoder.encode_batch(list_of_frames)`` and ``Decoder.feed(one_buffer)``.
Payloads:

* ``32B``: a 32-byte JSON body, the target case (native >= 3M frames/s each
  way and >= 15x the twin);
* ``1KiB``: a 1024-byte JSON body with the default encoder, so the encoder
  lz4-compresses it and the decoder decompresses it, as in production;
* ``1KiB-raw``: the same body with compression off (``compress_threshold=0``),
  the codec's own cost on a larger payload.

The decode cases time ``feed`` *and* freeing the decoded frames (a frame's
life ends somewhere), so they are a lower bound on pure decoding speed.  Each
benchmark records ``frames_per_s`` (N / mean) in ``extra_info``; cases are
grouped by operation and payload so native and python sit side by side.  A
missing native module fails the native cases unless ``TILLWIRE_NO_EXTENSIONS=1``.
"""

from __future__ import annotations

import importlib
import os

import pytest

from tillwire.core._impl import both
from tillwire.core.codes import DEFAULT_COMPRESS_THRESHOLD, Flag, FrameType, Lane

N = 10_000

_BODY_32 = b'{"ok":true,"ref":"T-0001","n":1}'
# A plausible order event: compressible, as real JSON bodies are.
_ITEM = b'{"sku":"A1-0042","qty":2,"price":"5.00","name":"Sparkling water 1.5l"}'
_BODY_1K = (b'{"order":"O-000123","store":"acme/s1","items":[' + b",".join([_ITEM] * 14))[:1022] + b"]}"

# case -> (payload, compress_threshold)
CASES = {
    "32B": (_BODY_32, DEFAULT_COMPRESS_THRESHOLD),
    "1KiB": (_BODY_1K, DEFAULT_COMPRESS_THRESHOLD),
    "1KiB-raw": (_BODY_1K, 0),
}
assert len(_BODY_32) == 32 and len(_BODY_1K) == 1024


def _require(impl: str):
    found = both("codec")
    if impl in found:
        return found[impl]
    if os.environ.get("TILLWIRE_NO_EXTENSIONS") == "1":
        pytest.skip("TILLWIRE_NO_EXTENSIONS=1: native codec deliberately not benchmarked")
    try:
        importlib.import_module("tillwire.core._codec")
        reason = "not returned by both()"
    except ImportError as exc:
        reason = str(exc)
    pytest.fail(f"native tillwire.core._codec is not importable ({reason}); run `make compile`", pytrace=False)


@pytest.fixture(scope="module", params=["native", "python"])
def codec(request):
    return _require(request.param)


def _frames(codec, payload: bytes) -> list:
    flags = Flag.ACK_REQUESTED | Lane.P0
    return [
        codec.Frame(FrameType.DELIVER, flags, payload, seq=i + 1, msg_id=1_000_000 + i, kind="payment.result")
        for i in range(N)
    ]


def _record(benchmark, group: str) -> None:
    if benchmark.stats is not None:
        benchmark.extra_info["frames_per_s"] = round(N / benchmark.stats.stats.mean)
        benchmark.extra_info["ns_per_frame"] = round(benchmark.stats.stats.mean / N * 1e9, 1)


@pytest.mark.parametrize("case", list(CASES))
def test_encode_batch_deliver(benchmark, codec, case):
    """encode_batch of N DELIVER frames into one bytes object."""
    payload, threshold = CASES[case]
    benchmark.group = f"encode_batch DELIVER {case}"
    frames = _frames(codec, payload)
    encoder = codec.Encoder(compress_threshold=threshold)

    data = benchmark(encoder.encode_batch, frames)

    # The bench measured real work: the buffer decodes back to the frames.
    assert codec.Decoder().feed(data) == frames
    _record(benchmark, benchmark.group)


@pytest.mark.parametrize("case", list(CASES))
def test_decode_feed_deliver(benchmark, codec, case):
    """Decoder.feed of one buffer holding N DELIVER frames (frames freed in the timing)."""
    payload, threshold = CASES[case]
    benchmark.group = f"feed DELIVER {case}"
    frames = _frames(codec, payload)
    data = codec.Encoder(compress_threshold=threshold).encode_batch(frames)
    prefix = next(i for i, byte in enumerate(data) if byte < 0x80) + 1  # the first frame's length prefix
    compressed = data[prefix + 1] & Flag.COMPRESSED  # ... then its type byte and flags byte
    assert bool(compressed) == (threshold > 0 and len(payload) >= threshold)

    def decode():
        return len(codec.Decoder().feed(data))

    assert benchmark(decode) == N
    assert codec.Decoder().feed(data) == frames
    _record(benchmark, benchmark.group)
