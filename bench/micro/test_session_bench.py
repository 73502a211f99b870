"""Micro-benchmarks of the session state machines, native vs Python twin (pytest-benchmark).

    .venv/bin/python -m pytest bench/micro/test_session_bench.py -q --benchmark-only \
        --benchmark-columns=min,median,rounds --benchmark-group-by=group

Cases:

* ``receive_data-100-acks``: one ``ServerSession.receive_data`` of a chunk of
  100 ACK frames that each advance the P0 window (all returned), the server's
  per-read cost.  ``-stale`` feeds ACKs at or below the window (all dropped).
* ``receive_data-1-ack``: 1_000 reads of one ACK each (the per-call cost).
* ``fanout[dict|list]``: one ``fanout`` of a 64-byte keyed P2 BROADCAST to
  N = 10_000 open sessions whose schedulers exist (a live server), with a
  dirty list, as ``Node.broadcast`` does; the sessions are drained again
  outside the timed part.  Target: native well under 100 ns per session.
* ``fanout-first``: the same to N sessions that never had a scheduler (each
  push creates one).
* ``open-idle``: N sessions created and taken through HELLO, accept() and
  RESUME; ``extra_info`` holds sys.getsizeof and the tracemalloc bytes per
  idle session (with the server's 7 slots), the figure the memory budget is
  about.

Each case records ``ns_per_item`` in ``extra_info``.  A missing native module
fails the native cases unless ``TILLWIRE_NO_EXTENSIONS=1``.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import tracemalloc
from types import SimpleNamespace

import pytest

from tillwire.core import _codec_py
from tillwire.core._impl import both
from tillwire.core.codes import FrameType, Lane

N = 10_000
_WIRE = _codec_py.Encoder()


def _wire(ftype, flags=0, payload=b"", **fields) -> bytes:
    return _WIRE.encode(_codec_py.Frame(ftype, flags, payload, **fields))


HELLO = _wire(FrameType.HELLO, version=1, token="bench-token")
RESUME = _wire(FrameType.RESUME, epoch=1)
# A 64-byte P2 BROADCAST, as the hub encodes it once per update.
BROADCAST = _wire(FrameType.BROADCAST, Lane.P2, b'{"sku":"004711","price":1299,"v":17,"pad":"xxxxxxxx"}',
                  channel=17, offset=123456, kind="price.update")
P2_KEY = (17, "sku-004711")


def _require(impl: str):
    found = both("session")
    if impl in found:
        return found[impl]
    if os.environ.get("TILLWIRE_NO_EXTENSIONS") == "1":
        pytest.skip("TILLWIRE_NO_EXTENSIONS=1: native sessions deliberately not benchmarked")
    try:
        importlib.import_module("tillwire.core._session")
        reason = "not returned by both()"
    except ImportError as exc:
        reason = str(exc)
    pytest.fail(f"native tillwire.core._session is not importable ({reason}); run `make compile`",
                pytrace=False)


@pytest.fixture(scope="module", params=["native", "python"])
def fam(request):
    session = _require(request.param)
    codec = importlib.import_module("tillwire.core._codec" if request.param == "native"
                                    else "tillwire.core._codec_py")
    return SimpleNamespace(name=request.param, session=session, Encoder=codec.Encoder)


def _conn_class(fam):
    class Conn(fam.session.ServerSession):
        """The server's TerminalConnection layout: the session plus 7 slots."""

        __slots__ = ("transport", "claims", "address", "paused", "timer", "inbox", "extra")

    return Conn


def _opened(fam, encoder, cls=None):
    s = (cls or fam.session.ServerSession)(encoder)
    s.receive_data(HELLO, 0.0)
    s.accept(1, 30000, 0, 1 << 20, 1)
    s.receive_data(RESUME, 0.0)
    s.data_to_send(1 << 20, 0.0)
    return s


def _record(benchmark, items: int) -> None:
    if benchmark.stats is not None:
        benchmark.extra_info["ns_per_item"] = round(benchmark.stats.stats.median / items * 1e9, 1)


def _ack_chunks(first: int, count: int) -> list:
    """`count` chunks of 100 P0 ACKs with increasing sequences from `first`."""
    return [b"".join(_wire(FrameType.ACK, Lane.P0, seq=first + k * 100 + i) for i in range(100))
            for k in range(count)]


def _ack_session(fam):
    s = _opened(fam, fam.Encoder())
    s.set_inbox(0, 0)
    s.deliver(0, 1 << 40, 1, "payment.result", b"{}")    # the window: every ACK below advances it
    s.data_to_send(1 << 20, 0.0)
    return s


def test_receive_data_100_acks(benchmark, fam):
    benchmark.group = "receive_data-100-acks"
    s = _ack_session(fam)
    rounds, iterations = 40, 20
    # Fresh chunks for every call (pytest-benchmark may call a few more times than rounds x iterations).
    chunks = iter(_ack_chunks(1, (rounds + 10) * iterations))
    receive = s.receive_data

    def run():
        return receive(next(chunks), 1.0)

    result = benchmark.pedantic(run, rounds=rounds, iterations=iterations, warmup_rounds=2)
    assert len(result) == 100 and result[-1].type == FrameType.ACK
    assert s.state == fam.session.OPEN and not s.pending
    _record(benchmark, 100)


def test_receive_data_100_stale_acks(benchmark, fam):
    benchmark.group = "receive_data-100-acks-stale"
    s = _ack_session(fam)
    chunk = _ack_chunks(1, 1)[0]
    s.receive_data(chunk, 1.0)                  # from now on every ACK of it is stale

    def run():
        return s.receive_data(chunk, 1.0)

    result = benchmark.pedantic(run, rounds=40, iterations=20, warmup_rounds=2)
    assert result == [] and not s.pending
    _record(benchmark, 100)


def test_receive_data_one_ack_per_read(benchmark, fam):
    benchmark.group = "receive_data-1-ack x 1000"
    s = _ack_session(fam)
    reads = iter([_wire(FrameType.ACK, Lane.P0, seq=i) for i in range(1, 70 * 1000 + 1)])
    receive = s.receive_data

    def run():
        for _ in range(1000):
            receive(next(reads), 1.0)

    benchmark.pedantic(run, rounds=50, iterations=1, warmup_rounds=2)
    _record(benchmark, 1000)


def _fanout_case(benchmark, fam, sessions, coll):
    fanout = fam.session.fanout

    def reset():
        for s in sessions:
            s.dirty = False
            s.data_to_send(65536, 0.0)

    def run():
        dirty = []
        overflow = fanout(coll, Lane.P2, BROADCAST, P2_KEY, 0.0, "stream", dirty)
        return overflow, dirty

    overflow, dirty = benchmark.pedantic(run, setup=reset, rounds=25, iterations=1, warmup_rounds=2)
    assert overflow == [] and len(dirty) == N
    assert sessions[-1].data_to_send(65536, 0.0) == BROADCAST
    _record(benchmark, N)


@pytest.mark.parametrize("shape", ["dict", "list"])
def test_fanout(benchmark, fam, shape):
    benchmark.group = f"fanout[{shape}] x {N}"
    enc = fam.Encoder()
    cls = _conn_class(fam)
    sessions = [_opened(fam, enc, cls) for _ in range(N)]
    fam.session.fanout(sessions, Lane.P2, BROADCAST, P2_KEY, 0.0, "stream")   # schedulers exist
    coll = dict.fromkeys(sessions) if shape == "dict" else sessions
    _fanout_case(benchmark, fam, sessions, coll)


def test_fanout_first(benchmark, fam):
    benchmark.group = f"fanout-first x {N}"
    enc = fam.Encoder()
    cls = _conn_class(fam)
    sessions = [_opened(fam, enc, cls) for _ in range(N)]

    def reset():
        for s in sessions:
            s.dirty = False
            s.data_to_send(65536, 0.0)
            s.release_lanes()

    def run():
        return fam.session.fanout(sessions, Lane.P2, BROADCAST, None, 0.0, None, [])

    assert benchmark.pedantic(run, setup=reset, rounds=15, iterations=1, warmup_rounds=1) == []
    _record(benchmark, N)


def memory_figures(fam) -> dict:
    """sys.getsizeof and tracemalloc bytes per idle session (after HELLO, accept, RESUME)."""
    enc = fam.Encoder()
    cls = _conn_class(fam)
    count = 2000
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [_opened(fam, enc, cls) for _ in range(count)]
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return {
        "getsizeof_session": sys.getsizeof(fam.session.ServerSession(enc)),
        "getsizeof_with_7_slots": sys.getsizeof(kept[0]),
        "traced_bytes_idle": round((after - before - sys.getsizeof(kept)) / count, 1),
    }


def test_open_idle(benchmark, fam):
    benchmark.group = f"open-idle x {N}"
    enc = fam.Encoder()
    cls = _conn_class(fam)

    def run():
        return [_opened(fam, enc, cls) for _ in range(N)]

    kept = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    assert all(s.state == fam.session.OPEN for s in kept)
    del kept
    _record(benchmark, N)
    benchmark.extra_info.update(memory_figures(fam))


if __name__ == "__main__":       # quick figures without pytest-benchmark
    for impl in ("native", "python"):
        if impl in both("session"):
            print(impl, memory_figures(SimpleNamespace(
                name=impl, session=both("session")[impl],
                Encoder=importlib.import_module("tillwire.core._codec" if impl == "native"
                                                else "tillwire.core._codec_py").Encoder)))
