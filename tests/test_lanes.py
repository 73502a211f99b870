"""Lane scheduler (core/_lanes.pyx and its twin core/_lanes_py.py).

Unit tests run once per implementation through the ``lanes`` fixture; the
differential tests feed both the same operations and require identical
results, drained bytes, errors and counters.  A missing native module is a
failure unless ``TILLWIRE_NO_EXTENSIONS=1``.
"""

from __future__ import annotations

import gc
import os
import random
import sys
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import require_impl
from tillwire.core._impl import both


@pytest.fixture(scope="session", params=["python", "native"])
def lanes(request):
    """Each lane scheduler implementation in turn (module)."""
    return require_impl("lanes", request.param)


@pytest.fixture(scope="session")
def lanes_pair():
    """``(python, native)`` lane scheduler modules, for differential tests."""
    return require_impl("lanes", "python"), require_impl("lanes", "native")


def drain_each(sched, now=0.0):
    """Drain frame by frame (max_bytes=1): the schedule order as a list."""
    out = []
    while True:
        chunk = sched.drain(1, now)
        if not chunk:
            return out
        out.append(chunk)


# ---------------------------------------------------------------- API surface


def test_constants(lanes):
    assert (lanes.ACCEPTED, lanes.CONFLATED, lanes.DROPPED, lanes.OVERFLOW) == (0, 1, 2, 3)


def test_selector():
    import tillwire.core.lanes as selected

    # Without TILLWIRE_NO_EXTENSIONS a fallback to the twin means the native
    # module is missing: that is a failure, not a configuration.
    expected = "python" if os.environ.get("TILLWIRE_NO_EXTENSIONS") else "native"
    assert selected.IMPLEMENTATION == expected
    module = both("lanes")[expected]
    for name in ("LaneScheduler", "push_many", "ACCEPTED", "CONFLATED", "DROPPED", "OVERFLOW"):
        assert getattr(selected, name) is getattr(module, name)


def test_defaults_and_attributes(lanes):
    s = lanes.LaneScheduler()
    assert s.max_bytes == 1 << 20
    assert s.weights == (8, 4, 1)
    assert s.now == 0.0 and isinstance(s.now, float)
    assert (len(s), s.queued_bytes, s.conflated, s.p2_dropped, s.p3_dropped) == (0, 0, 0, 0, 0)
    assert [s.lane_len(i) for i in range(4)] == [0, 0, 0, 0]
    assert [s.lane_bytes(i) for i in range(4)] == [0, 0, 0, 0]
    assert not s
    assert s.drain(100) == b""
    assert s.take_resync() == []
    assert s.clear() == []
    s.now = 5
    assert s.now == 5.0 and isinstance(s.now, float)
    s.max_bytes = 7
    assert s.max_bytes == 7
    assert repr(s) == "<LaneScheduler P0=0 P1=0 P2=0 P3=0 bytes=0/7>"


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"max_bytes": 0}, ValueError),
        ({"max_bytes": -5}, ValueError),
        ({"max_bytes": 1 << 70}, ValueError),
        ({"max_bytes": 1.5}, TypeError),
        ({"max_bytes": "10"}, TypeError),
        ({"weights": (0, 1, 1)}, ValueError),
        ({"weights": (1, 1, -1)}, ValueError),
        ({"weights": (1, 1, 65536)}, ValueError),
        ({"weights": (1, 2)}, ValueError),
        ({"weights": (1, 2, 3, 4)}, ValueError),
        ({"weights": (1, 2.0, 3)}, TypeError),
        ({"weights": 5}, TypeError),
    ],
)
def test_constructor_validation(lanes, kwargs, error):
    with pytest.raises(error):
        lanes.LaneScheduler(**kwargs)


def test_constructor_accepts_any_weights_iterable(lanes):
    assert lanes.LaneScheduler(10, [3, 2, 1]).weights == (3, 2, 1)
    assert lanes.LaneScheduler(weights=(1, 1, 65535)).weights == (1, 1, 65535)


@pytest.mark.parametrize(
    "args, kwargs, error",
    [
        ((4, b"x"), {}, ValueError),
        ((-1, b"x"), {}, ValueError),
        ((1 << 80, b"x"), {}, ValueError),
        ((1.0, b"x"), {}, TypeError),
        (("1", b"x"), {}, TypeError),
        ((1, "x"), {}, TypeError),
        ((1, bytearray(b"x")), {}, TypeError),
        ((1, memoryview(b"x")), {}, TypeError),
        ((2, b"x"), {"key": ["unhashable"]}, TypeError),
        ((2, b"x"), {"channel": {"unhashable": 1}}, TypeError),
        ((3, b"x"), {"deadline": "soon"}, TypeError),
        ((3, b"x"), {"deadline": None}, TypeError),
    ],
)
def test_push_validation(lanes, args, kwargs, error):
    s = lanes.LaneScheduler()
    with pytest.raises(error):
        s.push(*args, **kwargs)
    assert len(s) == 0 and s.queued_bytes == 0


def test_key_and_channel_ignored_outside_p2(lanes):
    s = lanes.LaneScheduler()
    assert s.push(1, b"a", key=["unhashable"], channel=["unhashable"]) == lanes.ACCEPTED
    assert s.push(1, b"b", key="k") == lanes.ACCEPTED
    assert s.push(1, b"c", key="k") == lanes.ACCEPTED  # no conflation outside P2
    assert s.push(2, b"d", deadline=-1.0) == lanes.ACCEPTED  # deadline ignored outside P3
    assert drain_each(s, now=100.0) == [b"a", b"b", b"c", b"d"]
    assert s.conflated == 0


def test_lane_arguments_accept_int_like(lanes):
    s = lanes.LaneScheduler()
    assert s.push(True, b"x") == lanes.ACCEPTED  # bool is an int: lane 1
    assert s.lane_len(1) == 1
    with pytest.raises(ValueError):
        s.lane_len(4)
    with pytest.raises(TypeError):
        s.lane_bytes("0")


def test_max_bytes_setter_validation(lanes):
    s = lanes.LaneScheduler(100)
    for bad, error in ((0, ValueError), (-1, ValueError), (2.5, TypeError)):
        with pytest.raises(error):
            s.max_bytes = bad
    assert s.max_bytes == 100
    with pytest.raises(TypeError):
        s.now = "later"


# ---------------------------------------------------------------- schedule order


def test_p0_strictly_first(lanes):
    s = lanes.LaneScheduler()
    s.push(3, b"p3")
    s.push(2, b"p2")
    s.push(1, b"p1")
    s.push(0, b"p0a")
    s.push(0, b"p0b")
    assert s.drain(1) == b"p0a"
    s.push(0, b"p0c")  # a P0 frame pushed later still goes before every other lane
    assert drain_each(s) == [b"p0b", b"p0c", b"p1", b"p2", b"p3"]


def test_weighted_round_robin_order(lanes):
    s = lanes.LaneScheduler(weights=(2, 1, 1))
    for i in range(6):
        s.push(1, b"a%d" % i)
    for i in range(3):
        s.push(2, b"b%d" % i)
        s.push(3, b"c%d" % i)
    assert drain_each(s) == [
        b"a0", b"a1", b"b0", b"c0",
        b"a2", b"a3", b"b1", b"c1",
        b"a4", b"a5", b"b2", b"c2",
    ]


def test_credits_persist_across_drains(lanes):
    def fill(s):
        for i in range(10):
            s.push(1, b"a%d" % i)
            s.push(2, b"b%d" % i)
            s.push(3, b"c%d" % i)

    one_by_one = lanes.LaneScheduler(weights=(3, 2, 1))
    fill(one_by_one)
    in_chunks = lanes.LaneScheduler(weights=(3, 2, 1))
    fill(in_chunks)
    joined = b""
    while chunk := in_chunks.drain(7):  # frames are 2 bytes: 4 frames per call
        assert len(chunk) == 8 or len(in_chunks) == 0
        joined += chunk
    assert joined == b"".join(drain_each(one_by_one))


def test_round_restarts_when_lanes_with_credit_are_empty(lanes):
    s = lanes.LaneScheduler(weights=(1, 1, 1))
    for i in range(5):
        s.push(2, b"b%d" % i)
    # Only P2 has frames: every frame is served, a new round each time.
    assert drain_each(s) == [b"b%d" % i for i in range(5)]


def test_p3_never_starves(lanes):
    s = lanes.LaneScheduler()  # weights (8, 4, 1)
    for i in range(100):
        s.push(1, b"a%02d" % i)
        s.push(2, b"b%02d" % i)
    s.push(3, b"promo")
    order = drain_each(s)
    assert order.index(b"promo") == 12  # after one round of 8 P1 and 4 P2 frames
    assert order[:8] == [b"a%02d" % i for i in range(8)]
    assert order[8:12] == [b"b%02d" % i for i in range(4)]


def test_p0_does_not_consume_credit(lanes):
    s = lanes.LaneScheduler(weights=(1, 1, 1))
    s.push(1, b"a0")
    s.push(1, b"a1")
    s.push(2, b"b0")
    assert s.drain(1) == b"a0"
    s.push(0, b"z")
    assert drain_each(s) == [b"z", b"b0", b"a1"]


# ---------------------------------------------------------------- P2 conflation


def test_p2_conflation_replaces_and_moves_to_tail(lanes):
    s = lanes.LaneScheduler()
    assert s.push(2, b"k1-old", key="k1", channel="prices") == lanes.ACCEPTED
    assert s.push(2, b"k2", key="k2") == lanes.ACCEPTED
    assert s.push(2, b"nokey") == lanes.ACCEPTED
    assert s.push(2, b"k1-new!", key="k1") == lanes.CONFLATED
    assert s.conflated == 1
    assert s.lane_len(2) == 3 and len(s) == 3
    assert s.lane_bytes(2) == s.queued_bytes == len(b"k2") + len(b"nokey") + len(b"k1-new!")
    assert drain_each(s) == [b"k2", b"nokey", b"k1-new!"]
    # A drained key is forgotten: the same key is queued afresh.
    assert s.push(2, b"again", key="k1") == lanes.ACCEPTED
    assert s.conflated == 1


def test_p2_conflation_uses_equality_not_identity(lanes):
    s = lanes.LaneScheduler()
    sku = "".join(["sku-", "42"])
    s.push(2, b"v1", key=(7, sku))
    assert s.push(2, b"v2", key=(7, "sku-42")) == lanes.CONFLATED
    assert s.push(2, b"v3", key=(7, "sku-43")) == lanes.ACCEPTED
    assert s.push(2, b"v4", key=7.0) == lanes.ACCEPTED
    assert s.push(2, b"v5", key=7) == lanes.CONFLATED  # 7 == 7.0, same hash
    assert drain_each(s) == [b"v2", b"v3", b"v5"]


def test_p2_keys_survive_many_entries(lanes):
    # Enough keys to grow the node array and the key table several times, with
    # removals from the middle (conflation) and from the head (drain).
    s = lanes.LaneScheduler(max_bytes=1 << 30)
    for i in range(500):
        s.push(2, b"%d" % i, key=i % 97)
        if i % 7 == 0:
            s.push(2, b"free%d" % i)
    assert s.lane_len(2) == 97 + 72
    assert s.conflated == 500 - 97
    out = drain_each(s)
    keyed = [f for f in out if not f.startswith(b"free")]
    assert sorted(int(f) % 97 for f in keyed) == list(range(97))
    assert [int(f) for f in keyed] == sorted(int(f) for f in keyed)  # delivery order = last push order
    assert s.push(2, b"x", key=5) == lanes.ACCEPTED


def test_p2_keys_colliding_and_wrapping(lanes):
    # Small ints hash to themselves: 6, 7 and 15 share the end of a small key
    # table, so removing 6 must not move 15 (which wrapped around) before its home.
    s = lanes.LaneScheduler()
    for key in (6, 7, 15):
        s.push(2, b"%d" % key, key=key)
    assert s.drain(1) == b"6"
    assert s.push(2, b"15b", key=15) == lanes.CONFLATED
    assert s.push(2, b"7b", key=7) == lanes.CONFLATED
    assert s.push(2, b"6b", key=6) == lanes.ACCEPTED
    assert drain_each(s) == [b"15b", b"7b", b"6b"]


# ---------------------------------------------------------------- P3 TTL


def test_p3_ttl_at_push(lanes):
    s = lanes.LaneScheduler()
    assert s.push(3, b"old", deadline=-1.0) == lanes.ACCEPTED  # now == 0.0: no push-time check
    s.now = 10.0
    assert s.push(3, b"past", deadline=5.0) == lanes.DROPPED
    assert s.push(3, b"edge", deadline=10.0) == lanes.DROPPED  # deadline <= now
    assert s.p3_dropped == 2
    assert s.push(3, b"later", deadline=10.5) == lanes.ACCEPTED
    assert s.push(3, b"never", deadline=0.0) == lanes.ACCEPTED
    assert s.lane_len(3) == 3
    # drain's now == 0.0 means no clock as well: nothing expires.
    assert drain_each(s) == [b"old", b"later", b"never"]
    assert s.p3_dropped == 2


def test_p3_ttl_at_drain_without_credit(lanes):
    s = lanes.LaneScheduler(weights=(1, 1, 1))
    s.push(3, b"expired1", deadline=5.0)
    s.push(3, b"expired2", deadline=9.0)
    s.push(3, b"fresh", deadline=50.0)
    s.push(3, b"forever")
    for i in range(3):
        s.push(1, b"a%d" % i)
    assert s.lane_len(3) == 4  # expired entries count until they reach the head
    order = drain_each(s, now=10.0)
    # Dropping the two expired heads consumes no credit: 'fresh' is this round's P3 frame.
    assert order == [b"a0", b"fresh", b"a1", b"forever", b"a2"]
    assert s.p3_dropped == 2
    assert len(s) == 0 and s.queued_bytes == 0


def test_p3_all_expired_drains_nothing(lanes):
    s = lanes.LaneScheduler()
    s.push(3, b"x" * 10, deadline=1.0)
    s.push(3, b"y" * 10, deadline=2.0)
    assert s.drain(1000, now=3.0) == b""
    assert (len(s), s.queued_bytes, s.p3_dropped) == (0, 0, 2)


def test_p3_expiry_is_lazy(lanes):
    s = lanes.LaneScheduler()
    s.push(1, b"a")
    s.push(3, b"stale", deadline=1.0)
    assert s.drain(1, now=2.0) == b"a"  # stopped before reaching P3
    assert s.lane_len(3) == 1 and s.p3_dropped == 0
    assert s.drain(1, now=2.0) == b""
    assert s.lane_len(3) == 0 and s.p3_dropped == 1


# ---------------------------------------------------------------- byte bound


def test_shedding_order_p3_then_p2_never_p0_p1(lanes):
    s = lanes.LaneScheduler(max_bytes=10)
    assert s.push(1, b"1111") == lanes.ACCEPTED
    assert s.push(2, b"222", channel="c1") == lanes.ACCEPTED
    assert s.push(3, b"333") == lanes.ACCEPTED
    assert s.queued_bytes == 10
    assert s.push(3, b"33") == lanes.ACCEPTED  # 12 > 10: the oldest P3 goes
    assert (s.queued_bytes, s.p3_dropped, s.lane_len(3)) == (9, 1, 1)
    assert s.push(2, b"22b", channel="c2") == lanes.ACCEPTED  # 12: the remaining P3 goes
    assert (s.queued_bytes, s.p3_dropped, s.lane_len(3)) == (10, 2, 0)
    assert s.push(1, b"11111") == lanes.ACCEPTED  # 15: no P3 left, both P2 go (oldest first)
    assert (s.queued_bytes, s.p2_dropped, s.lane_len(2)) == (9, 2, 0)
    assert s.take_resync() == ["c1", "c2"]
    assert s.push(0, b"0") == lanes.ACCEPTED  # exactly 10 fits
    assert s.push(0, b"00") == lanes.OVERFLOW  # 12 > 10 with only P0/P1 left: still queued
    assert (s.queued_bytes, len(s)) == (12, 4)
    assert drain_each(s) == [b"0", b"00", b"1111", b"11111"]


def test_pushed_p3_itself_shed_is_dropped(lanes):
    s = lanes.LaneScheduler(max_bytes=10)
    s.push(1, b"x" * 8)
    s.push(3, b"y")  # 9: fits
    assert s.push(3, b"zzzz") == lanes.DROPPED  # 13: 'y' goes, 12: the pushed frame goes too
    assert (s.p3_dropped, s.lane_len(3), s.queued_bytes) == (2, 0, 8)
    assert s.push(3, b"zz") == lanes.ACCEPTED  # 10: fits


def test_pushed_p2_itself_shed_keeps_result_and_marks_channel(lanes):
    s = lanes.LaneScheduler(max_bytes=10)
    s.push(2, b"old", key="k", channel="ch-a")
    s.push(1, b"x" * 8)  # 11: the P2 frame goes
    assert s.take_resync() == ["ch-a"]
    s.push(2, b"p", key="k", channel="ch-b")  # 9: fits
    assert s.push(2, b"qqqq", key="k", channel="ch-c") == lanes.CONFLATED  # 12 -> shed itself
    assert (s.lane_len(2), s.queued_bytes, s.p2_dropped, s.conflated) == (0, 8, 2, 1)
    assert s.take_resync() == ["ch-c"]
    assert s.push(2, b"big!", channel="ch-d") == lanes.ACCEPTED  # shed at once
    assert s.take_resync() == ["ch-d"]


def test_p3_push_sheds_p2_when_p0_p1_already_overflow(lanes):
    s = lanes.LaneScheduler(max_bytes=10)
    s.push(2, b"22", channel="c")
    assert s.push(1, b"1" * 12) == lanes.OVERFLOW  # P2 shed, still over
    s.max_bytes = 20
    s.push(2, b"22", channel="d")
    s.max_bytes = 5  # lowering does not shed by itself
    assert s.lane_len(2) == 1
    assert s.push(3, b"3") == lanes.DROPPED  # sheds itself, then the P2 entry
    assert (s.lane_len(2), s.lane_len(3)) == (0, 0)
    assert s.take_resync() == ["c", "d"]


def test_resync_set_each_once_in_first_marked_order(lanes):
    s = lanes.LaneScheduler(max_bytes=4)
    for channel in ["b", "a", "b", None, "c", "a"]:
        s.push(2, b"xxx", channel=channel)
        s.push(2, b"yyy")  # sheds the previous one
    assert s.take_resync() == ["b", "a", "c"]
    assert s.take_resync() == []
    s.push(2, b"zzz", channel=(1, "b"))
    s.push(2, b"zzz")
    assert s.take_resync() == [(1, "b")]


def test_overflow_p0_p1_stays_queued(lanes):
    s = lanes.LaneScheduler(max_bytes=5)
    assert s.push(0, b"abc") == lanes.ACCEPTED
    assert s.push(1, b"defg") == lanes.OVERFLOW
    assert s.push(0, b"h") == lanes.OVERFLOW
    assert (len(s), s.queued_bytes) == (3, 8)
    assert s.drain(100) == b"abchdefg"
    assert s.push(1, b"ijklm") == lanes.ACCEPTED  # exactly max_bytes


# ---------------------------------------------------------------- clear, drain


def test_clear_returns_p0_then_p1(lanes):
    s = lanes.LaneScheduler(max_bytes=100, weights=(1, 1, 1))
    s.push(1, b"a0")
    s.push(2, b"b0", key="k", channel="ch")
    s.push(0, b"z0")
    s.push(3, b"c0", deadline=5.0)
    s.push(1, b"a1")
    s.push(0, b"z1")
    s.push(2, b"b1", key="k")
    s.push(1, b"a2")
    conflated = s.conflated
    assert conflated == 1
    assert s.drain(1) == b"z0"
    assert s.clear() == [b"z1", b"a0", b"a1", b"a2"]
    assert (len(s), s.queued_bytes) == (0, 0)
    assert [s.lane_len(i) for i in range(4)] == [0, 0, 0, 0]
    assert [s.lane_bytes(i) for i in range(4)] == [0, 0, 0, 0]
    assert (s.conflated, s.p2_dropped, s.p3_dropped) == (conflated, 0, 0)
    assert s.drain(100) == b""
    # Still usable, and the key table was emptied too.
    assert s.push(2, b"b2", key="k") == lanes.ACCEPTED
    assert s.push(1, b"a3") == lanes.ACCEPTED
    assert s.drain(100) == b"a3b2"


def test_drain_max_bytes_semantics(lanes):
    s = lanes.LaneScheduler()
    for frame in (b"aaaa", b"bbbb", b"cccccccc", b"dd"):
        s.push(1, frame)
    assert s.drain(5) == b"aaaabbbb"  # stops once the size reaches or exceeds 5
    assert s.drain(3) == b"cccccccc"  # at least one frame, even larger than max_bytes
    assert s.drain(0) == b"dd"
    assert s.drain(10) == b""
    for frame in (b"aaaa", b"bbbb", b"cc"):
        s.push(1, frame)
    assert s.drain(8) == b"aaaabbbb"  # exactly reached
    s.push(1, b"dd")
    assert s.drain(-7) == b"cc"
    assert s.drain(1 << 100) == b"dd"
    with pytest.raises(TypeError):
        s.drain(1.5)
    with pytest.raises(TypeError):
        s.drain(10, "now")


def test_drain_many_frames_in_one_call(lanes):
    s = lanes.LaneScheduler(max_bytes=1 << 30)
    frames = [b"%05d" % i for i in range(1000)]
    for i, frame in enumerate(frames):
        s.push(i % 4, frame)
    out = s.drain(1 << 30)
    assert len(out) == 5000 and len(s) == 0
    assert sorted(out[i:i + 5] for i in range(0, 5000, 5)) == frames
    assert out[:5 * 250] == b"".join(frames[0::4])  # all P0 first


def test_bytes_subclass_frames(lanes):
    class Frame(bytes):
        pass

    s = lanes.LaneScheduler()
    s.push(1, Frame(b"abc"))
    out = s.drain(100)
    assert out == b"abc" and type(out) is bytes
    s.push(1, b"x")
    s.push(1, Frame(b"y"))
    out = s.drain(100)
    assert out == b"xy" and type(out) is bytes


def test_accounting(lanes):
    s = lanes.LaneScheduler()
    s.push(0, b"a")
    s.push(1, b"bb")
    s.push(2, b"ccc")
    s.push(3, b"dddd")
    s.push(2, b"")
    assert [s.lane_len(i) for i in range(4)] == [1, 1, 2, 1]
    assert [s.lane_bytes(i) for i in range(4)] == [1, 2, 3, 4]
    assert (len(s), s.queued_bytes) == (5, 10)
    assert s.drain(100) == b"abbcccdddd"
    assert (len(s), s.queued_bytes) == (0, 0)


# ---------------------------------------------------------------- push_many


def test_push_many(lanes):
    scheds = [lanes.LaneScheduler(max_bytes=m) for m in (100, 3, 100, 2)]
    frame = b"abc"
    assert lanes.push_many(scheds, 1, frame) == [3]
    assert lanes.push_many(scheds, 2, b"v1", key=("ch", "sku")) == []
    assert lanes.push_many(scheds, 2, b"v2", key=("ch", "sku"), channel="ch") == []
    assert [s.conflated for s in scheds] == [1, 0, 1, 0]  # max_bytes 3 and 2 shed their P2 frames
    assert [s.drain(100) for s in scheds] == [b"abcv2", b"abc", b"abcv2", b"abc"]
    assert lanes.push_many(iter(scheds), 0, b"zzzz") == [1, 3]  # any iterable
    assert lanes.push_many([], 0, b"z") == []
    assert lanes.push_many(tuple(scheds), 3, b"p", deadline=5.0) == []


def test_push_many_validates_before_pushing(lanes):
    scheds = [lanes.LaneScheduler(), lanes.LaneScheduler()]
    for args, kwargs, error in [
        ((scheds + [object()], 1, b"x"), {}, TypeError),
        ((scheds, 9, b"x"), {}, ValueError),
        ((scheds, 1, "x"), {}, TypeError),
        ((scheds, 2, b"x"), {"key": {}}, TypeError),
        ((scheds, 2, b"x"), {"channel": []}, TypeError),
        ((scheds, 3, b"x"), {"deadline": "x"}, TypeError),
        ((5, 1, b"x"), {}, TypeError),
    ]:
        with pytest.raises(error):
            lanes.push_many(*args, **kwargs)
    assert [len(s) for s in scheds] == [0, 0]


def test_push_many_rejects_the_other_implementation(lanes_pair):
    py, native = lanes_pair
    with pytest.raises(TypeError):
        py.push_many([native.LaneScheduler()], 1, b"x")
    with pytest.raises(TypeError):
        native.push_many([py.LaneScheduler()], 1, b"x")


# ---------------------------------------------------------------- native specifics


def test_native_idle_scheduler_is_small(lanes_pair):
    _, native = lanes_pair
    s = native.LaneScheduler()
    assert sys.getsizeof(s) <= 48
    assert not gc.is_tracked(s)


def test_native_lane_storage_kept_under_load_given_back_after(lanes_pair):
    # A lane that empties after growing large keeps its storage while its
    # cycles fill a quarter of it or more, and gives it back after the first
    # cycle that does not (traced through PyMem by tracemalloc).
    _, native = lanes_pair
    frames = [b"%06d" % i for i in range(2000)]
    keys = [("sku", i) for i in range(2000)]       # (made before tracing starts)
    for lane, keyed in ((0, False), (1, False), (2, True), (3, False)):
        s = native.LaneScheduler(max_bytes=1 << 30)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            sizes = []
            for cycle in range(3):          # two busy cycles, then a light one
                count = 1 if cycle == 2 else 1000
                for i in range(count):
                    s.push(lane, frames[i], keys[i] if keyed else None)
                assert s.drain(1 << 30) == b"".join(frames[:count])
                sizes.append(tracemalloc.get_traced_memory()[0] - base)
        finally:
            tracemalloc.stop()
        assert sizes[0] > 1000 * 8, (lane, sizes)           # kept after a busy cycle
        assert sizes[1] <= sizes[0] * 1.1 + 512, (lane, sizes)   # not grown again
        assert sizes[2] < 1024, (lane, sizes)               # given back after a light one


def test_native_releases_references(lanes_pair):
    _, native = lanes_pair
    frame = b"shared frame " + os.urandom(8)
    key = ("channel", "sku-" + os.urandom(4).hex())
    channel = "channel-" + os.urandom(4).hex()
    refs = [sys.getrefcount(o) for o in (frame, key, channel)]
    scheds = [native.LaneScheduler(max_bytes=200) for _ in range(20)]
    for i in range(50):
        native.push_many(scheds, i % 4, frame, key=key if i % 3 else None, channel=channel,
                         deadline=float(i % 5))
        if i % 5 == 0:
            for s in scheds[::2]:
                s.drain(40, now=2.0)
    for s in scheds[:5]:
        s.clear()
    for s in scheds[5:10]:
        s.drain(1 << 20, now=3.0)
    for s in scheds:
        s.take_resync()
    del scheds, s
    assert [sys.getrefcount(o) for o in (frame, key, channel)] == refs


def test_native_refuses_reentry(lanes_pair):
    _, native = lanes_pair
    s = native.LaneScheduler()

    class Key:
        def __hash__(self):
            return 1

        def __eq__(self, other):
            s.push(1, b"re-entered")
            return True

    s.push(2, b"a", key=Key())
    with pytest.raises(RuntimeError):
        s.push(2, b"b", key=Key())
    assert (s.lane_len(1), s.lane_len(2), s.conflated) == (0, 1, 0)
    assert s.drain(100) == b"a"
    assert s.push(1, b"ok") == native.ACCEPTED  # not left busy


def test_key_eq_error_propagates(lanes):
    s = lanes.LaneScheduler()

    class Key:
        def __hash__(self):
            return 1

        def __eq__(self, other):
            raise ZeroDivisionError

    s.push(2, b"a", key=Key())
    with pytest.raises(ZeroDivisionError):
        s.push(2, b"b", key=Key())
    assert (len(s), s.queued_bytes) == (1, 1)
    assert s.push(2, b"c", key="other") == lanes.ACCEPTED


# ---------------------------------------------------------------- differential

FRAME_SIZES = st.integers(min_value=0, max_value=24)
# Small ints collide in small key tables (their hash is themselves).
KEYS = st.sampled_from([None, None, "a", "b", ("c", 1), 3, 3.0, 6, 7, 14, 15, 22, 23, 31])
CHANNELS = st.sampled_from([None, "x", "y", 7])
DEADLINES = st.sampled_from([0.0, 0.0, 1.0, 5.0, 10.0, -1.0])
NOWS = st.sampled_from([0.0, 2.0, 5.0, 7.5, 12.0])
TARGETS = st.integers(min_value=0, max_value=2)
BAD_PUSHES = [
    ((5, b"x"), {}),
    ((1, "x"), {}),
    ((2, b"x"), {"key": []}),
    ((2, b"x"), {"channel": set()}),
    ((3, b"x"), {"deadline": "x"}),
    ((1.5, b"x"), {}),
]

OPS = st.one_of(
    st.tuples(st.just("push"), TARGETS, st.integers(0, 3), FRAME_SIZES, KEYS, DEADLINES, CHANNELS),
    st.tuples(st.just("push_many"), st.lists(TARGETS, max_size=4), st.integers(0, 3), FRAME_SIZES,
              KEYS, DEADLINES, CHANNELS),
    st.tuples(st.just("drain"), TARGETS, st.integers(-1, 80), NOWS),
    st.tuples(st.just("now"), TARGETS, NOWS),
    st.tuples(st.just("max_bytes"), TARGETS, st.integers(1, 120)),
    st.tuples(st.just("take_resync"), TARGETS),
    st.tuples(st.just("clear"), TARGETS),
    st.tuples(st.just("bad_push"), TARGETS, st.integers(0, len(BAD_PUSHES) - 1)),
)
WEIGHTS = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4))


def _apply(mod, scheds, op, index):
    """Run one operation; returns its outcome (result or exception type)."""
    name = op[0]
    try:
        if name in ("push", "push_many"):
            _, target, lane, size, key, deadline, channel = op
            frame = b"%d:" % index + b"f" * size
            if name == "push":
                return scheds[target].push(lane, frame, key, deadline, channel)
            return mod.push_many([scheds[t] for t in target], lane, frame, key=key,
                                 deadline=deadline, channel=channel)
        s = scheds[op[1]]
        if name == "drain":
            return s.drain(op[2], op[3])
        if name == "now":
            s.now = op[2]
            return None
        if name == "max_bytes":
            s.max_bytes = op[2]
            return None
        if name == "take_resync":
            return s.take_resync()
        if name == "clear":
            return s.clear()
        args, kwargs = BAD_PUSHES[op[2]]
        return s.push(*args, **kwargs)
    except Exception as exc:  # the same error type is part of the behaviour
        return type(exc)


def _snapshot(s):
    return (
        len(s), s.queued_bytes, s.conflated, s.p2_dropped, s.p3_dropped, s.now, s.max_bytes,
        tuple(s.lane_len(i) for i in range(4)), tuple(s.lane_bytes(i) for i in range(4)),
    )


def _run_both(lanes_pair, weights, max_bytes, ops):
    py, native = lanes_pair
    worlds = [
        (mod, [mod.LaneScheduler(max_bytes=m, weights=weights) for m in max_bytes])
        for mod in (py, native)
    ]
    for index, op in enumerate(ops):
        outcomes = [_apply(mod, scheds, op, index) for mod, scheds in worlds]
        assert outcomes[0] == outcomes[1], (index, op)
        states = [[_snapshot(s) for s in scheds] for _, scheds in worlds]
        assert states[0] == states[1], (index, op)
    # Finally everything still queued comes out identically.
    finals = [[s.drain(1 << 40, 100.0) for s in scheds] for _, scheds in worlds]
    assert finals[0] == finals[1]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    weights=WEIGHTS,
    max_bytes=st.lists(st.integers(1, 120), min_size=3, max_size=3),
    ops=st.lists(OPS, max_size=80),
)
def test_differential_random_operations(lanes_pair, weights, max_bytes, ops):
    _run_both(lanes_pair, weights, max_bytes, ops)


def _long_run_ops(seed, count=6000):
    """Alternating fill and empty phases, so every queue grows to hundreds of
    entries (node arrays, rings and key tables grow, then shrink again)."""
    rng = random.Random(seed)
    keys = [None] * 20 + list(range(300)) + [("sku", i) for i in range(100)]
    ops = []
    for i in range(count):
        filling = (i // 700) % 2 == 0
        r = rng.random()
        if r < (0.90 if filling else 0.30):
            ops.append(("push", rng.randrange(3), rng.choice((0, 1, 1, 2, 2, 2, 3, 3)),
                        rng.randrange(40), rng.choice(keys), rng.choice((0.0, 5.0, 50.0, 500.0)),
                        rng.choice((None, "x", "y", 1, 2))))
        elif r < (0.95 if filling else 0.35):
            ops.append(("push_many", [rng.randrange(3) for _ in range(3)], rng.randrange(4),
                        rng.randrange(40), rng.choice(keys), 0.0, "z"))
        elif r < (0.96 if filling else 0.40):
            ops.append(("now", rng.randrange(3), rng.choice((0.0, 1.0, 20.0))))
        elif r < (0.975 if filling else 0.45):
            ops.append(("take_resync", rng.randrange(3)))
        elif r < (0.985 if filling else 0.46):
            ops.append(("max_bytes", rng.randrange(3), rng.choice((2000, 8000, 50000))))
        elif r < (0.987 if filling else 0.465):
            ops.append(("clear", rng.randrange(3)))
        else:
            ops.append(("drain", rng.randrange(3), rng.randrange(-1, 600), rng.choice((0.0, 10.0, 100.0))))
    return ops


def _threshold_ops(count):
    """Around the size where the native P2 lane starts indexing its keys:
    ``count`` distinct keys (equal-but-not-identical ones and ones whose
    hashes share their low bits among them), each conflated once, a partial
    drain, more keys, a drain to empty, then the same keys again."""
    keys = [i * 64 if i % 3 else float(i) for i in range(count)]
    ops = [("push", 0, 2, 4 + i % 5, k, 0.0, "x" if i % 2 else None) for i, k in enumerate(keys)]
    ops[1:1] = [("push", 0, 2, 3, None, 0.0, None)]        # an unkeyed entry among them
    ops += [("push", 0, 2, 3, int(k) if isinstance(k, float) else k, 0.0, "y")
            for k in reversed(keys)]
    ops += [("drain", 0, count * 3, 0.0)]
    ops += [("push", 0, 2, 2, ("sku", i), 0.0, None) for i in range(count)]
    ops += [("push", 0, 2, 5, keys[i], 0.0, None) for i in range(0, count, 2)]
    ops += [("drain", 0, 1 << 20, 0.0)]
    ops += [("push", 0, 2, 1, k, 0.0, None) for k in keys]
    ops += [("push", 0, 2, 6, k, 0.0, None) for k in keys[::3]]
    return ops


@pytest.mark.parametrize("count", [1, 7, 8, 9, 10, 17, 40])
def test_differential_p2_key_index_threshold(lanes_pair, count):
    # The native lane walks its list up to 8 keyed entries and builds its key
    # table past that (then keeps it); the twin has one dict throughout.
    _run_both(lanes_pair, (1, 1, 1), [1 << 20] * 3, _threshold_ops(count))


@pytest.mark.parametrize("seed", range(4))
def test_differential_long_run(lanes_pair, seed):
    # Long sequences grow and shrink every queue far beyond what the short
    # hypothesis examples reach.
    _run_both(lanes_pair, (3, 2, 1), [8000, 20000, 1 << 20], _long_run_ops(seed))
