"""The Redis backends when Redis goes away and comes back (issue 18's
outage work starts here): a real ``redis-server``, its clients' connections
killed by the server itself (``CLIENT KILL``)."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

import redis.asyncio as aioredis

from redis_server import fresh_prefix, redis_url
from support import aiotest
from tillwire.server.broker_redis import RedisBroker


async def _until_heard(sender, channel: str, heard: list, timeout: float = 10.0) -> None:
    """Publish on ``channel`` until a message of this probe arrives."""
    deadline = asyncio.get_running_loop().time() + timeout
    n = 0
    while asyncio.get_running_loop().time() < deadline:
        n += 1
        await sender.publish(channel, 2, b"probe %d" % n)
        await asyncio.sleep(0.05)
        if heard:
            return
    raise AssertionError(f"nothing heard on {channel} within {timeout} s")


@contextlib.asynccontextmanager
async def two_brokers(ping_every: float | None = None):
    """Workers a and b started on one fresh prefix, and a third client to act
    on Redis with; b records what it hears, its control messages, and
    ``connected`` each time it subscribed again."""
    prefix = fresh_prefix()
    clients = [aioredis.from_url(redis_url()) for _ in range(3)]
    a = RedisBroker("a", clients[0], prefix=prefix)
    b = RedisBroker("b", clients[1], prefix=prefix)
    if ping_every is not None:
        b.ping_every = ping_every
    seen = SimpleNamespace(a=a, b=b, redis=clients[2], heard=[], controls=[], again=[])
    b.on_resubscribed = lambda: seen.again.append(b.connected)
    await a.start(lambda *m: None, lambda c: None)
    await b.start(lambda channel, lane, payload: seen.heard.append(payload),
                  seen.controls.append)
    try:
        yield seen
    finally:
        await a.stop()
        await b.stop()
        for client in clients:
            await client.aclose()


@aiotest()
async def test_a_broker_whose_connection_is_killed_subscribes_again_by_itself():
    async with two_brokers() as w:
        a, b, heard, controls = w.a, w.b, w.heard, w.controls
        await b.subscribe(["store:acme/s1", "store:acme/s2"])
        await _until_heard(a, "store:acme/s1", heard)
        killed = await w.redis.client_kill_filter(_type="pubsub")
        assert killed >= 2                               # a's and b's pub/sub connections
        heard.clear()
        await _until_heard(a, "store:acme/s2", heard)    # b subscribed to both again
        assert w.again == [True] and b.connected         # (the node reconciles then)
        assert await a.send_control("b", b"takeover terminal:acme/t1")
        for _ in range(100):
            if controls:
                break
            await asyncio.sleep(0.02)
        assert controls == [b"takeover terminal:acme/t1"]
        await b.unsubscribe(["store:acme/s2"])
        heard.clear()
        await a.publish("store:acme/s2", 2, b"after unsubscribe")
        await _until_heard(a, "store:acme/s1", heard)
        assert b"after unsubscribe" not in heard


@aiotest()
async def test_a_broker_whose_redis_stops_answering_opens_a_new_connection():
    # (a half-open connection: Redis paused stands for a partition; the broker
    # pings a quiet connection and counts no answer as a failure)
    async with two_brokers(ping_every=0.2) as w:
        await w.b.subscribe(["store:acme/s1"])
        await w.redis.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        for _ in range(200):
            if w.again:
                break
            await asyncio.sleep(0.05)
        assert w.again == [True]
        await _until_heard(w.a, "store:acme/s1", w.heard)     # subscribed again
