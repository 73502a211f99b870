"""One suite of Caps contract tests (offer frequency caps), on memory and on
Redis against a real ``redis-server`` (a fresh key prefix per test)."""

from __future__ import annotations

import asyncio

import pytest

import redis.asyncio as aioredis

from redis_server import fresh_prefix, redis_url
from tillwire.server.caps import Caps, MemoryCaps
from tillwire.server.caps_redis import RedisCaps

BACKENDS = ["memory", "redis"]
T0 = 1_700_000_000.0


@pytest.fixture(params=BACKENDS)
def caps_backend(request) -> str:
    return request.param


def run_with(kind: str, body):
    async def main():
        if kind == "memory":
            return await body(MemoryCaps())
        client = aioredis.from_url(redis_url())
        try:
            return await body(RedisCaps(client, prefix=fresh_prefix()))
        finally:
            await client.aclose()
    return asyncio.run(main())


def test_backend_satisfies_protocol(caps_backend):
    async def body(caps):
        assert isinstance(caps, Caps)
    run_with(caps_backend, body)


def test_a_member_gets_count_offers_per_window_and_one_offer_counts_once(caps_backend):
    async def body(caps):
        take = caps.take
        assert await take("acme", [], "o1", T0, 2, 60.0) == {}
        assert await take("acme", ["m1", "m2"], "o1", T0, 2, 60.0) == {"m1": False, "m2": False}
        # The same offer on another device of m1 (another worker): passes, not counted.
        assert await take("acme", ["m1"], "o1", T0 + 1, 2, 60.0) == {"m1": False}
        assert await take("acme", ["m1"], "o2", T0 + 2, 2, 60.0) == {"m1": False}
        assert await take("acme", ["m1", "m2"], "o3", T0 + 3, 2, 60.0) == \
            {"m1": True, "m2": False}
        # Capped offers are not counted; the window slides.
        assert await take("acme", ["m1"], "o4", T0 + 59, 2, 60.0) == {"m1": True}
        assert await take("acme", ["m1"], "o5", T0 + 60.5, 2, 60.0) == {"m1": False}
        # Tenants apart; a forgotten member starts afresh.
        assert await take("bolt", ["m1"], "o6", T0 + 61, 1, 60.0) == {"m1": False}
        await caps.forget("acme", "m2")
        assert await take("acme", ["m2"], "o7", T0 + 61, 1, 60.0) == {"m2": False}
    run_with(caps_backend, body)


def test_offers_taken_at_once_never_pass_the_cap(caps_backend):
    async def body(caps):
        got = await asyncio.gather(*(caps.take("acme", ["m1"], f"o{i}", T0 + i * 0.001, 3,
                                               60.0) for i in range(10)))
        assert sum(not v["m1"] for v in got) == 3
    run_with(caps_backend, body)
