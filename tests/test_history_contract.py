"""One suite of History contract tests, run on every backend.

``history`` yields an open backend of each kind in turn (the in-process
hub's streams; Redis Streams in a real ``redis-server``) bounded to ``MAX``
messages and ``AGE`` seconds per stream, and ``advance(seconds)`` moves its
clock (both take their time from the caller's).
"""

from __future__ import annotations

import asyncio

import pytest

import redis.asyncio as aioredis

from redis_server import fresh_prefix, redis_url
from tillwire.core.codec import Encoder, Frame
from tillwire.core.codes import Lane
from tillwire.server.history import History, Page, Placed
from tillwire.server.history_memory import MemoryHistory
from tillwire.server.history_redis import RedisHistory
from tillwire.server.hub import Hub

BACKENDS = ["memory", "redis"]
MAX = 5
AGE = 60.0
PRICES = "store:acme/s1"
OFFERS = "tenant:acme"
P2, P3 = int(Lane.P2), int(Lane.P3)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


_closing: list = []       # clients to close inside the test's own loop (see run)


@pytest.fixture(params=BACKENDS)
def history(request):
    clock = Clock()
    if request.param == "memory":
        hub = Hub(Encoder(), Frame, history_max=MAX, history_age=AGE)
        backend = MemoryHistory(hub, clock)
    else:
        client = aioredis.from_url(redis_url())
        _closing.append(client)
        backend = RedisHistory(client, prefix=fresh_prefix(), history_max=MAX,
                               history_age=AGE, clock=clock)

    def advance(seconds: float) -> None:
        clock.now += seconds

    backend.advance = advance
    return backend


def run(coro):
    """Run a test's coroutine on a fresh loop; close the Redis clients it used there."""
    async def main():
        try:
            return await coro
        finally:
            while _closing:
                await _closing.pop().aclose()
    return asyncio.run(main())


def offsets(page: Page) -> list[int]:
    return [item.offset for item in page.items]


def test_the_backend_is_a_history(history):
    assert isinstance(history, History)


def test_appends_number_offsets_from_one_in_one_epoch(history):
    async def body():
        placed = [await history.append(PRICES, P2, "price.update", f"sku{n}", 1, b"{}")
                  for n in range(3)]
        assert [p.offset for p in placed] == [1, 2, 3]
        assert len({p.epoch for p in placed}) == 1 and placed[0].epoch > 0
        other = await history.append(PRICES, P3, "promo", "", 0, b"{}")
        assert other.offset == 1                       # each lane its own stream
        page = await history.since(PRICES, P2, 0, 0)
        assert (page.epoch, page.offset) == (placed[0].epoch, 3)
    run(body())


def test_the_newest_version_of_a_key_wins(history):
    async def body():
        first = await history.append(PRICES, P2, "price.update", "sku1", 5, b'{"v":5}')
        assert await history.append(PRICES, P2, "price.update", "sku1", 5, b'{"v":5}') is None
        assert await history.append(PRICES, P2, "price.update", "sku1", 4, b'{"v":4}') is None
        newer = await history.append(PRICES, P2, "price.update", "sku1", 6, b'{"v":6}')
        assert isinstance(newer, Placed) and newer.offset == first.offset + 1
        # No version, or no key: never stale.
        assert await history.append(PRICES, P2, "price.update", "sku1", 0, b"{}") is not None
        assert await history.append(PRICES, P2, "price.update", "", 1, b"{}") is not None
        assert await history.append(PRICES, P2, "price.update", "", 1, b"{}") is not None
    run(body())


def test_lanes_given_as_lane_members_check_versions_alike(history):
    async def body():
        # (redis-py sends an int subclass by its repr: the backend must not)
        assert await history.append(PRICES, Lane.P2, "price.update", "sku1", 5, b"{}")
        assert await history.append(PRICES, Lane.P2, "price.update", "sku1", 4, b"{}") is None
        page = await history.snapshot(PRICES, Lane.P2)
        assert [(i.key, i.version) for i in page.items] == [("sku1", 5)]
    run(body())


def test_the_snapshot_is_the_last_value_of_each_key_in_offset_order(history):
    async def body():
        for key, version in [("a", 1), ("b", 1), ("c", 1), ("a", 2)]:
            await history.append(PRICES, P2, "price.update", key, version,
                                 f'{{"{key}":{version}}}'.encode())
        snap = await history.snapshot(PRICES, P2)
        assert [(i.key, i.version) for i in snap.items] == [("b", 1), ("c", 1), ("a", 2)]
        assert offsets(snap) == [2, 3, 4] and not snap.more
        after = await history.snapshot(PRICES, P2, 0, 2)
        assert offsets(after) == [3, 4]
        limited = await history.snapshot(PRICES, P2, 0, 0, 2)
        assert offsets(limited) == [2, 3] and limited.more
        assert offsets(await history.tail(PRICES, P2, 2)) == [3, 4]
        # since reads the history itself, superseded values included.
        assert offsets(await history.since(PRICES, P2, 0, 0)) == [1, 2, 3, 4]
    run(body())


def test_another_epoch_reads_nothing_and_names_the_current_one(history):
    async def body():
        placed = await history.append(PRICES, P2, "price.update", "a", 1, b"{}")
        page = await history.since(PRICES, P2, placed.epoch + 1, 0)
        assert page.items == [] and (page.epoch, page.offset) == (placed.epoch, 1)
        page = await history.snapshot(PRICES, P2, placed.epoch - 1, 0)
        assert page.items == [] and page.epoch == placed.epoch
        assert offsets(await history.since(PRICES, P2, placed.epoch, 0)) == [1]
    run(body())


def test_a_channel_never_published_to_reads_empty(history):
    async def body():
        for page in (await history.since("store:acme/none", P2, 0, 0),
                     await history.snapshot("store:acme/none", P2),
                     await history.tail("store:acme/none", P3, 5)):
            assert page == Page(0, 0, [])
        assert await history.trim("store:acme/none", P2) == 0
        assert await history.forget("store:acme/none") == 0
    run(body())


def test_since_pages_with_a_limit(history):
    async def body():
        for n in range(5):
            await history.append(OFFERS, P3, "promo", "", 0, b"{}")
        page = await history.since(OFFERS, P3, 0, 1, 2)
        assert offsets(page) == [2, 3] and page.more
        page = await history.since(OFFERS, P3, 0, 3, 2)
        assert offsets(page) == [4, 5] and not page.more
        assert offsets(await history.since(OFFERS, P3, 0, 5)) == []
    run(body())


def test_p3_messages_are_not_read_after_their_ttl(history):
    async def body():
        await history.append(OFFERS, P3, "promo", "", 0, b'{"n":1}', ttl=10.0)
        await history.append(OFFERS, P3, "promo", "", 0, b'{"n":2}', ttl=100.0)
        history.advance(20.0)
        assert offsets(await history.since(OFFERS, P3, 0, 0)) == [2]
        assert offsets(await history.tail(OFFERS, P3)) == [2]
        assert offsets(await history.snapshot(OFFERS, P3)) == [2]
    run(body())


def test_history_is_bounded_by_count_and_age(history):
    async def body():
        for n in range(MAX + 3):
            await history.append(OFFERS, P3, "promo", "", 0, b"{}")
        assert offsets(await history.since(OFFERS, P3, 0, 0)) == list(range(4, MAX + 4))
        history.advance(AGE + 1)
        assert await history.trim(OFFERS, P3) == MAX
        page = await history.since(OFFERS, P3, 0, 0)
        assert page.items == [] and page.offset == MAX + 3      # offsets go on
        placed = await history.append(OFFERS, P3, "promo", "", 0, b"{}")
        assert placed.offset == MAX + 4
    run(body())


def test_forget_drops_both_streams_and_offsets_go_on(history):
    async def body():
        await history.append(PRICES, P2, "price.update", "a", 1, b"{}")
        await history.append(PRICES, P2, "price.update", "b", 1, b"{}")
        await history.append(PRICES, P3, "promo", "", 0, b"{}")
        assert await history.forget(PRICES) >= 3
        assert (await history.snapshot(PRICES, P2)).items == []
        assert (await history.since(PRICES, P3, 0, 0)).items == []
        placed = await history.append(PRICES, P2, "price.update", "a", 1, b"{}")
        assert placed.offset == 3          # (a forgotten key's old version is no bar either)
    run(body())


def test_concurrent_publishers_of_one_key_leave_the_newest_version(history):
    async def body():
        versions = [3, 7, 1, 7, 5, 2, 6, 4]
        placed = await asyncio.gather(*(
            history.append(PRICES, P2, "price.update", "sku1", v, b'{"v":%d}' % v)
            for v in versions))
        won = [v for v, p in zip(versions, placed) if p is not None]
        assert won.count(7) == 1                       # the newest won, once, never twice
        offsets_won = [p.offset for p in placed if p is not None]
        assert len(set(offsets_won)) == len(won) and max(offsets_won) == len(won)
        snap = await history.snapshot(PRICES, P2)
        assert [(i.key, i.version, i.payload) for i in snap.items] == [("sku1", 7, b'{"v":7}')]
    run(body())


def test_redis_appends_publish_in_offset_order_whoever_appends():
    # (a fleet's channel messages: placed and published in one script, so a
    # subscriber never sees offset 3 before 2, however the appends interleave)
    import struct as _struct

    async def body():
        client = aioredis.from_url(redis_url())
        _closing.append(client)
        prefix = fresh_prefix()
        history = RedisHistory(client, prefix=prefix)
        listener = aioredis.from_url(redis_url())
        _closing.append(listener)
        pubsub = listener.pubsub()
        topic = f"{prefix}:ch:{PRICES}".encode()
        await pubsub.subscribe(topic)
        await pubsub.get_message(timeout=1)                    # (the subscribe confirmation)
        placed = await asyncio.gather(*(
            history.append_published(PRICES, P3, "promo", "", 0, b"{}", 60.0, topic,
                                     b"\x03", b"tail%d" % n) for n in range(50)))
        got = []
        while len(got) < 50:
            msg = await pubsub.get_message(timeout=5)
            if msg and msg["type"] == "message":
                data = msg["data"]
                epoch, offset = _struct.unpack_from(">QQ", data, 1)
                assert data[0] == 3 and epoch == placed[0].epoch and data[17:21] == b"tail"
                got.append(offset)
        assert got == list(range(1, 51)) == sorted(p.offset for p in placed)
        await pubsub.aclose()
    run(body())
