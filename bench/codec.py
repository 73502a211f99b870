"""``python -m bench codec``: native and reference codec throughput, one process.

DELIVER frames with a 32-byte payload and with a 1 KiB JSON payload (which
lz4 compresses, as a real order event would be), through the batch APIs:
``Encoder.encode_batch`` over a list of Frame objects, and ``Decoder.feed``
over the encoded stream in 64 KiB reads (what a server's data_received
sees).  A decoded frame counts only as a built Frame object with its fields
and payload bytes.  Best of several rounds (the machine is shared).

Keys: decode_fps, encode_fps (native, 32-byte payloads), decode_speedup,
encode_speedup (native / reference, 32-byte), decode_fps_1k, encode_fps_1k
(native), plus the reference figures.
"""

from __future__ import annotations

import gc
import random
import time

from tillwire.core import _impl
from tillwire.core.codes import FrameType

CHUNK = 65536


def _frames(mod, n: int, payload_size: int) -> list:
    rnd = random.Random(7)
    if payload_size <= 64:
        payloads = [bytes(f'{{"o":"{rnd.randrange(10**9):09d}","s":"paid!!"}}', "ascii")[:32]
                    .ljust(32, b" ") for _ in range(64)]
    else:
        items = ",".join(f'{{"sku":"69{rnd.randrange(10**11):011d}","qty":{rnd.randrange(1, 9)},'
                         f'"price":"{rnd.randrange(100, 99999) / 100:.2f}"}}' for _ in range(40))
        body = f'{{"order":"o-{rnd.randrange(10**9)}","channel":"mall","items":[{items}]}}'
        payloads = [body.encode()[:payload_size].ljust(payload_size, b" ") for _ in range(8)]
    return [mod.Frame(FrameType.DELIVER, 0x08, payloads[i % len(payloads)], seq=i + 1,
                      msg_id=1_000_000 + i, kind="payment.result") for i in range(n)]


def _best(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _measure(mod, n: int, payload_size: int, rounds: int) -> tuple[float, float]:
    frames = _frames(mod, n, payload_size)
    enc = mod.Encoder()
    data = enc.encode_batch(frames)
    chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
    t_enc = _best(lambda: enc.encode_batch(frames), rounds)

    def decode():
        dec = mod.Decoder()
        count = 0
        for chunk in chunks:
            count += len(dec.feed(chunk))
        assert count == n
    t_dec = _best(decode, rounds)
    return n / t_dec, n / t_enc


def run(quick: bool = False, argv=()) -> dict:
    impls = _impl.both("codec")
    if "native" not in impls:
        raise SystemExit("bench codec: the native codec is not built (run `make compile`)")
    native, ref = impls["native"], impls["python"]
    n = 20_000 if quick else 1_000_000
    n_ref = 2_000 if quick else 50_000
    rounds = 2 if quick else 5
    dec, enc = _measure(native, n, 32, rounds)
    dec_ref, enc_ref = _measure(ref, n_ref, 32, max(1, rounds // 2))
    print(f"32 B  native: decode {dec:,.0f} fps  encode {enc:,.0f} fps")
    print(f"32 B  python: decode {dec_ref:,.0f} fps  encode {enc_ref:,.0f} fps")
    n1k = n // 5
    dec1k, enc1k = _measure(native, n1k, 1024, rounds)
    dec1k_ref, enc1k_ref = _measure(ref, n_ref // 2, 1024, max(1, rounds // 2))
    print(f"1 KiB native: decode {dec1k:,.0f} fps  encode {enc1k:,.0f} fps")
    print(f"1 KiB python: decode {dec1k_ref:,.0f} fps  encode {enc1k_ref:,.0f} fps")
    return {
        "decode_fps": round(dec), "encode_fps": round(enc),
        "decode_speedup": round(dec / dec_ref, 1), "encode_speedup": round(enc / enc_ref, 1),
        "decode_fps_1k": round(dec1k), "encode_fps_1k": round(enc1k),
        "decode_fps_ref": round(dec_ref), "encode_fps_ref": round(enc_ref),
        "decode_fps_1k_ref": round(dec1k_ref), "encode_fps_1k_ref": round(enc1k_ref),
        "frames": n, "quick": quick,
    }
