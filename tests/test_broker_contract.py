"""One suite of Broker contract tests, run against every backend.

``broker_backend`` names each backend in turn: memory, and Redis against a
real ``redis-server`` (tests/redis_server.py; a fresh key prefix per test
is a fresh cluster).  :func:`open_brokers` gives unstarted brokers of one
cluster (for the memory backend: on one bus), one per worker id; each test
starts them with a :class:`Recorder`'s handlers.

Delivery is asynchronous, so a test waits for what it expects; to show that
something did *not* arrive, it waits for a fence instead: every worker
started by :func:`start` listens to ``FENCE``, and since a sender's messages
arrive in order, once its fence arrived, everything it sent before did.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys

import pytest

import redis.asyncio as aioredis

from redis_server import fresh_prefix, redis_url
from tillwire.server.broker import Broker
from tillwire.server.broker_memory import MemoryBroker, MemoryBus
from tillwire.server.broker_redis import RedisBroker

BACKENDS = ["memory", "redis"]
FENCE = "topic:test/fence"
WAIT = 5.0                      # seconds a backend gets to deliver


@contextlib.asynccontextmanager
async def open_brokers(kind: str, *worker_ids: str):
    """Unstarted brokers of backend ``kind`` in one fresh cluster, one per id
    (stopped again on the way out)."""
    clients = []
    if kind == "memory":
        bus = MemoryBus()
        brokers = [MemoryBroker(worker_id, bus) for worker_id in worker_ids]
    elif kind == "redis":
        prefix = fresh_prefix()
        clients = [aioredis.from_url(redis_url()) for _ in worker_ids]
        brokers = [RedisBroker(worker_id, client, prefix=prefix)
                   for worker_id, client in zip(worker_ids, clients)]
    else:
        raise ValueError(kind)
    try:
        yield brokers
    finally:
        for broker in brokers:
            await broker.stop()
        for client in clients:
            await client.aclose()


@pytest.fixture(params=BACKENDS)
def broker_backend(request) -> str:
    return request.param


def run_with(backend: str, worker_ids, body):
    """Run ``await body(*brokers)`` on fresh brokers of ``backend``; nothing
    may reach the loop's exception handler (unless ``body`` installs its own)."""
    async def main():
        failures = []
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: failures.append(context))
        async with open_brokers(backend, *worker_ids) as brokers:
            await asyncio.wait_for(body(*brokers), 4 * WAIT)
        assert failures == []
    asyncio.run(main())


class Recorder:
    """What one worker's handlers received (fences apart)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, int, bytes]] = []
        self.controls: list[bytes] = []
        self.arrivals: list[bytes] = []   # message payloads and controls, as they came
        self.fences: list[bytes] = []
        self.stacks: list[bool] = []      # per message: called inside _publishing?
        self._changed = asyncio.Event()

    def on_message(self, channel: str, lane: int, payload: bytes) -> None:
        if channel == FENCE:
            self.fences.append(payload)
        else:
            self.messages.append((channel, lane, payload))
            self.arrivals.append(payload)
        self.stacks.append(_inside_publishing())
        self._changed.set()

    def on_control(self, message: bytes) -> None:
        self.controls.append(message)
        self.arrivals.append(message)
        self._changed.set()

    async def until(self, done) -> None:
        """Wait until ``done()`` holds (at most WAIT seconds)."""
        async def wait():
            while not done():
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(wait(), WAIT)


_fences = itertools.count()


async def start(*brokers: Broker) -> list[Recorder]:
    """Start ``brokers`` with a recorder each, every one listening to FENCE."""
    recorders = []
    for broker in brokers:
        recorder = Recorder()
        await broker.start(recorder.on_message, recorder.on_control)
        await broker.subscribe([FENCE])
        recorders.append(recorder)
    return recorders


async def settle(sender: Broker, *recorders: Recorder) -> None:
    """Wait until everything ``sender`` sent so far reached ``recorders``."""
    fence = b"%d" % next(_fences)
    await sender.publish(FENCE, 3, fence)
    for recorder in recorders:
        await recorder.until(lambda r=recorder: fence in r.fences)


async def _publishing(broker: Broker, channel: str, lane: int, payload: bytes) -> None:
    await broker.publish(channel, lane, payload)


def _inside_publishing() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _publishing.__code__:
            return True
        frame = frame.f_back
    return False


def test_backend_satisfies_protocol(broker_backend):
    async def body(a):
        assert isinstance(a, Broker) and a.worker_id == "w1"
    run_with(broker_backend, ["w1"], body)


def test_publish_reaches_a_subscriber_later_on_the_loop(broker_backend):
    async def body(a, b):
        ra, rb = await start(a, b)
        await b.subscribe(["store:acme/s1"])
        await _publishing(a, "store:acme/s1", 1, b"hello")
        await rb.until(lambda: rb.messages)
        assert rb.messages == [("store:acme/s1", 1, b"hello")]
        assert rb.stacks == [False]                  # not inside the publisher's call
        await settle(a, ra, rb)
        assert ra.messages == [] and rb.messages == [("store:acme/s1", 1, b"hello")]
    run_with(broker_backend, ["w1", "w2"], body)


def test_a_publishers_messages_arrive_in_order(broker_backend):
    async def body(a, b):
        ra, rb = await start(a, b)
        await b.subscribe(["store:acme/s1", "terminal:acme/t1"])
        sent = [("store:acme/s1" if i % 3 else "terminal:acme/t1", i % 4, b"%d" % i)
                for i in range(60)]
        for channel, lane, payload in sent:
            await a.publish(channel, lane, payload)
        await rb.until(lambda: len(rb.messages) == len(sent))
        assert rb.messages == sent
    run_with(broker_backend, ["w1", "w2"], body)


def test_every_subscribed_worker_gets_a_message_once(broker_backend):
    async def body(a, b, c):
        ra, rb, rc = await start(a, b, c)
        await a.subscribe(["role:acme/*/service", "role:acme/*/service"])   # once, twice asked
        await a.subscribe(["role:acme/*/service"])
        await b.subscribe(["role:acme/*/service"])
        await c.publish("role:acme/*/service", 0, b"x")
        await settle(c, ra, rb, rc)
        assert ra.messages == rb.messages == [("role:acme/*/service", 0, b"x")]
        assert rc.messages == []                                    # not subscribed
    run_with(broker_backend, ["w1", "w2", "w3"], body)


def test_the_publisher_hears_itself_when_subscribed(broker_backend):
    async def body(a):
        (ra,) = await start(a)
        await a.subscribe(["tenant:acme"])
        await a.publish("tenant:acme", 2, b"self")
        await settle(a, ra)
        assert ra.messages == [("tenant:acme", 2, b"self")]
    run_with(broker_backend, ["w1"], body)


def test_publish_with_no_subscribers_goes_nowhere(broker_backend):
    async def body(a, b):
        ra, rb = await start(a, b)
        await a.publish("store:acme/empty", 1, b"lost")        # no error
        await b.subscribe(["store:acme/empty"])                 # no history either
        await a.publish("store:acme/empty", 1, b"kept")
        await settle(a, ra, rb)
        assert rb.messages == [("store:acme/empty", 1, b"kept")]
        assert ra.messages == []
    run_with(broker_backend, ["w1", "w2"], body)


def test_subscribe_and_unsubscribe_many(broker_backend):
    async def body(a, b):
        ra, rb = await start(a, b)
        channels = [f"store:acme/s{i}" for i in range(20)]
        await b.subscribe(channels)
        for channel in channels:
            await a.publish(channel, 1, channel.encode())
        await settle(a, rb)
        assert [m[0] for m in rb.messages] == channels
        # Dropping some (and one never subscribed) keeps the rest.
        await b.unsubscribe(channels[:15] + ["store:acme/never"])
        rb.messages.clear()
        for channel in channels:
            await a.publish(channel, 1, channel.encode())
        await settle(a, rb)
        assert [m[0] for m in rb.messages] == channels[15:]
        await b.unsubscribe(channels)                           # some of them twice
        await b.unsubscribe(["store:acme/never"])
        rb.messages.clear()
        await a.publish(channels[-1], 1, b"none")
        await settle(a, rb)
        assert rb.messages == []
    run_with(broker_backend, ["w1", "w2"], body)


def test_unsubscribe_by_one_worker_leaves_the_other(broker_backend):
    async def body(a, b, c):
        ra, rb, rc = await start(a, b, c)
        await a.subscribe(["store:acme/s1"])
        await b.subscribe(["store:acme/s1"])
        await a.unsubscribe(["store:acme/s1"])
        await c.publish("store:acme/s1", 1, b"x")
        await settle(c, ra, rb)
        assert ra.messages == [] and rb.messages == [("store:acme/s1", 1, b"x")]
    run_with(broker_backend, ["w1", "w2", "w3"], body)


def test_control_reaches_one_worker(broker_backend):
    async def body(a, b, c):
        ra, rb, rc = await start(a, b, c)
        await b.subscribe(["terminal:acme/t1"])
        assert await a.send_control("w2", b"takeover terminal:acme/t1") is True
        assert await a.send_control("w2", b"kick terminal:acme/t2") is True
        assert await a.send_control("w1", b"to myself") is True
        await rb.until(lambda: len(rb.controls) == 2)
        await ra.until(lambda: ra.controls)
        await settle(a, ra, rb, rc)
        assert rb.controls == [b"takeover terminal:acme/t1", b"kick terminal:acme/t2"]
        assert ra.controls == [b"to myself"]
        assert rc.controls == []
        assert ra.messages == rb.messages == rc.messages == []      # not on a channel
    run_with(broker_backend, ["w1", "w2", "w3"], body)


def test_control_and_publish_keep_the_senders_order(broker_backend):
    async def body(a, b):
        ra, rb = await start(a, b)
        await b.subscribe(["store:acme/s1"])
        for i in range(10):
            if i % 2:
                assert await a.send_control("w2", b"%d" % i)
            else:
                await a.publish("store:acme/s1", 1, b"%d" % i)
        await rb.until(lambda: len(rb.arrivals) == 10)
        assert rb.arrivals == [b"%d" % i for i in range(10)]
    run_with(broker_backend, ["w1", "w2"], body)


def test_control_to_an_unknown_or_stopped_worker(broker_backend):
    async def body(a, b):
        ra, rb = await start(a, b)
        assert await a.send_control("nobody", b"x") is False
        await b.stop()
        assert await a.send_control("w2", b"x") is False
        await settle(a, ra)
        assert ra.controls == [] and rb.controls == []
    run_with(broker_backend, ["w1", "w2"], body)


def test_a_stopped_worker_hears_nothing(broker_backend):
    async def body(a, b, c):
        ra, rb, rc = await start(a, b, c)
        await b.subscribe(["store:acme/s1"])
        await c.subscribe(["store:acme/s1"])
        await a.publish("store:acme/s1", 1, b"before")
        await b.stop()                  # (perhaps before "before" reached it)
        heard = list(rb.messages)
        await b.stop()                                          # twice is harmless
        await a.publish("store:acme/s1", 1, b"after")
        await settle(a, rc)
        assert rc.messages == [("store:acme/s1", 1, b"before"), ("store:acme/s1", 1, b"after")]
        assert rb.messages == heard     # nothing once stop() returned
        # Started again it has no subscriptions but its control inbox.
        rb2 = Recorder()
        await b.start(rb2.on_message, rb2.on_control)
        await b.subscribe([FENCE])
        await a.publish("store:acme/s1", 1, b"again")
        assert await a.send_control("w2", b"hello again")
        await settle(a, rb2)
        assert rb2.messages == [] and rb2.controls == [b"hello again"]
    run_with(broker_backend, ["w1", "w2", "w3"], body)


def test_a_worker_id_is_started_once(broker_backend):
    async def body(a, twin):
        await start(a)
        with pytest.raises(ValueError):
            await twin.start(Recorder().on_message, Recorder().on_control)
        await a.stop()
        (rt,) = await start(twin)                               # free again
        await twin.publish(FENCE, 3, b"mine")
        await rt.until(lambda: rt.fences == [b"mine"])
    run_with(broker_backend, ["w1", "w1"], body)


def test_connected_while_started(broker_backend):
    async def body(a):
        assert not a.connected
        await start(a)
        assert a.connected
        await a.stop()
        assert not a.connected
    run_with(broker_backend, ["w1"], body)


def test_calls_before_start_are_refused(broker_backend):
    async def body(a):
        for call in (a.publish("tenant:acme", 1, b"x"), a.subscribe(["tenant:acme"]),
                     a.unsubscribe(["tenant:acme"]), a.send_control("w1", b"x")):
            with pytest.raises(RuntimeError):
                await call
        await a.stop()                                          # (does nothing)
    run_with(broker_backend, ["w1"], body)


def test_a_failing_handler_loses_only_its_own_message(broker_backend):
    async def body(a, b, c):
        failures = []
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: failures.append(context.get("exception")))
        ra, rc = await start(a, c)
        rb = Recorder()

        def fails_once(channel, lane, payload):
            if payload == b"first":
                raise RuntimeError("handler bug")
            rb.on_message(channel, lane, payload)
        await b.start(fails_once, rb.on_control)
        await b.subscribe([FENCE, "store:acme/s1"])
        await c.subscribe(["store:acme/s1"])
        await a.publish("store:acme/s1", 1, b"first")
        await a.publish("store:acme/s1", 1, b"second")
        await settle(a, rb, rc)
        assert rc.messages == [("store:acme/s1", 1, b"first"), ("store:acme/s1", 1, b"second")]
        assert rb.messages == [("store:acme/s1", 1, b"second")]
        # The failure is reported on the receiving worker's loop.
        assert [str(exc) for exc in failures] == ["handler bug"]
    run_with(broker_backend, ["w1", "w2", "w3"], body)
