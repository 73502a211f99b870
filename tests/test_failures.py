"""Every await on the store has a failure path that loses nothing.

Each test wraps the real backend (memory, SQLite with its writer in a
thread, and Redis on the session's redis-server) in the failing fake of ``tests/failing.py``, breaks one call at the
point under test, and checks that the terminal still gets everything, in
order, once the store answers again:

* a failed commit answers STORE_UNAVAILABLE and stores nothing; the retry
  is stored once;
* a failed positions read while a terminal resumes is retried (the till is
  never left RESUMING with no P0 reaching it);
* a failed inbox read of the pump is retried with nothing else in flight;
* a failed write of acks, delivered marks or registrations keeps them and
  retries (the ACKED receipt still comes, the terminal is still registered);
* a store slower than the senders stops the node reading their P0/P1 SENDs
  (bounded memory) and everything is stored once it catches up.
"""

from __future__ import annotations

import asyncio

import pytest

from failing import Failing
from redis_server import fresh_prefix, redis_url
from support import (
    aiotest, connect, eventually, hello, make_config, payment_sends, read_sendacks,
    provision, receive_orders, start_node, token,
)
from tillwire.client.connection import SendError
from tillwire.client.sdk import Client
from tillwire.core.codec import Encoder, Frame
from tillwire.core.codes import Code, Flag, FrameType, Lane, ReceiptStatus
from tillwire.server.connection import RESUMING
from tillwire.server.main import make_store
from tillwire.server.store_redis import RedisStore

BACKENDS = ["memory", "sqlite", "redis"]
TILL = "terminal:acme/t1"


async def _node(backend: str, tmp_path, **overrides):
    """A node over a failing fake around a real backend of ``backend``."""
    if backend == "sqlite":
        overrides = {"store.backend": "sqlite", "server.data_dir": str(tmp_path),
                     "store.writer": "thread", **overrides}
    cfg = make_config(**overrides)
    if backend == "redis":
        # (Until the node's config names the Redis store: the node takes it as made.)
        store = Failing(RedisStore(redis_url(), prefix=fresh_prefix()))
    else:
        store = Failing(make_store(cfg))
    return await start_node(cfg, store), store


async def _pay(be, n: int, to: str = TILL, **kw):
    return await be.send("payment.result", {"order": f"o{n}", "status": "paid"}, to, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@aiotest()
async def test_a_failed_commit_stores_nothing_and_the_retry_is_stored_once(backend, tmp_path):
    node, store = await _node(backend, tmp_path)
    try:
        till = await connect(node, "t1")
        be = await connect(node, "pay", store="hq", roles=("backend",))
        store.fail("accept_many_then")
        with pytest.raises(SendError) as refused:
            await _pay(be, 1, ref=41)
        assert refused.value.code == Code.STORE_UNAVAILABLE
        ack = await _pay(be, 1, ref=41)               # the same SEND again: stored now
        assert not ack.flags & Flag.RETRANSMIT       # (not a duplicate of a stored one)
        assert await receive_orders(till, 1) == [1]
        with pytest.raises(asyncio.TimeoutError):
            await till.receive(timeout=0.3)            # once
        assert node.delivery.uncommitted == 0
    finally:
        await node.stop()


@pytest.mark.parametrize("backend", BACKENDS)
@aiotest()
async def test_a_failed_positions_read_while_resuming_is_retried(backend, tmp_path):
    node, store = await _node(backend, tmp_path)
    try:
        be = await connect(node, "pay", store="hq", roles=("backend",))
        await provision(node, "t1")
        await _pay(be, 1)                             # waits in the store: t1 is offline
        store.fail("positions", 3)
        till = await connect(node, "t1")
        assert await receive_orders(till, 1) == [1]
        assert store.calls["positions"] >= 4
        # A payment result sent after the resume settled goes straight through.
        await _pay(be, 2)
        assert await receive_orders(till, 1) == [2]
        assert node.hub.sessions[TILL].inbox is not RESUMING
    finally:
        await node.stop()


@pytest.mark.parametrize("backend", BACKENDS)
@aiotest()
async def test_a_message_stored_while_the_resume_read_fails_is_not_lost(backend, tmp_path):
    node, store = await _node(backend, tmp_path)
    try:
        be = await connect(node, "pay", store="hq", roles=("backend",))
        store.fail("positions", 4)
        till = await connect(node, "t1")
        await _pay(be, 1)             # stored while the till is still RESUMING
        assert await receive_orders(till, 1) == [1]
    finally:
        await node.stop()


@pytest.mark.parametrize("backend", BACKENDS)
@aiotest()
async def test_a_failed_pump_read_is_retried_with_nothing_else_in_flight(backend, tmp_path):
    node, store = await _node(backend, tmp_path)
    try:
        be = await connect(node, "pay", store="hq", roles=("backend",))
        await provision(node, "t1")
        for n in range(5):
            await _pay(be, n)                         # a backlog for the offline till
        store.fail("inbox", 2)
        till = await connect(node, "t1")
        assert await receive_orders(till, 5) == [0, 1, 2, 3, 4]
        assert store.calls["inbox"] >= 3
    finally:
        await node.stop()


@pytest.mark.parametrize("backend", BACKENDS)
@aiotest()
async def test_a_failed_batch_write_keeps_acks_deliveries_and_registrations(backend, tmp_path):
    node, store = await _node(backend, tmp_path)
    try:
        be = await connect(node, "pay", store="hq", roles=("backend",))
        store.fail("terminals.register", 2)
        till = await connect(node, "t1")
        for _ in range(100):
            if await store.terminals.get(TILL) is not None:
                break
            await asyncio.sleep(0.05)
        assert await store.terminals.get(TILL) is not None and store.calls["terminals.register"] >= 3

        store.fail("delivered_many", 1)
        store.fail("ack_many", 2)
        ack = await _pay(be, 1, receipt=True)
        msg = await till.receive(timeout=3)
        await msg.ack()
        codes = [(await asyncio.wait_for(be.receipts.get(), 5)).code for _ in range(2)]
        assert codes == [ReceiptStatus.DELIVERED, ReceiptStatus.ACKED]
        acked0, last0, _, _ = await store.positions(TILL)
        assert (acked0, last0) == (1, 1)
        trace = await store.trace(ack.msg_id)
        assert trace.recipients[0].state == "acked"
        assert store.calls["ack_many"] >= 3 and store.calls["delivered_many"] >= 2
    finally:
        await node.stop()


@pytest.mark.parametrize("backend", BACKENDS)
@aiotest()
async def test_a_slow_store_stops_reading_senders_and_loses_nothing(backend, tmp_path):
    node, store = await _node(backend, tmp_path, **{"delivery.max_uncommitted": 20,
                                                    "limits.unacked_sends": "backend=1000"})
    try:
        till = await connect(node, "t1")
        reader, writer = await asyncio.open_connection(*node.addresses[0])
        store.hold("accept_many_then")
        writer.write(hello(token("pay", store="hq", roles=("backend",)))
                     + Encoder().encode(Frame(FrameType.RESUME)) + payment_sends(TILL, 0, 300))
        await eventually(lambda: node.counters.store_waits > 0, timeout=5)
        await asyncio.sleep(0.2)
        # Nothing more was taken from the sender than the bound.
        assert node.delivery.uncommitted <= 20
        assert store.waiting("accept_many_then") >= 1
        store.resume("accept_many_then")
        assert sorted(await read_sendacks(reader, 300)) == list(range(300))
        assert await receive_orders(till, 300) == list(range(300))
        writer.close()
    finally:
        await node.stop()


@aiotest()
async def test_a_failed_group_lookup_refuses_the_message_and_the_retry_is_stored():
    node = await start_node()
    node.registry = registry = Failing(node.registry)
    try:
        staff = await connect(node, "h1", store="s1", roles=("staff",))
        be = await connect(node, "pay", store="hq", roles=("backend",))
        registry.fail("members")
        with pytest.raises(SendError) as refused:
            await be.send("store.notice", {"text": "recount"}, "store:acme/s1", lane=1, ref=7)
        assert refused.value.code == Code.STORE_UNAVAILABLE
        ack = await be.send("store.notice", {"text": "recount"}, "store:acme/s1", lane=1, ref=7)
        assert not ack.flags & Flag.RETRANSMIT
        msg = await staff.receive(timeout=3)
        assert msg.body == {"text": "recount"} and node.delivery.uncommitted == 0
    finally:
        await node.stop()


@aiotest()
async def test_a_failed_history_read_answers_store_unavailable_and_reading_goes_on():
    node = await start_node()
    node.history = history = Failing(node.history)
    try:
        be = await connect(node, "hq", store="hq", roles=("backend",))
        till = await connect(node, "t1")
        await be.send("price.update", {"sku": "A1", "price": "1.00", "version": 1},
                      "store:acme/s1", lane=Lane.P2)
        history.fail("tail")
        with pytest.raises(SendError) as refused:
            await till.history("store:acme/s1", Lane.P2, 0, 0, 10)
        assert refused.value.code == Code.STORE_UNAVAILABLE
        items, end = await till.history("store:acme/s1", Lane.P2, 0, 0, 10)
        assert [i.kind for i in items] == ["price.update"] and end.code == Code.OK
    finally:
        await node.stop()


@aiotest()
async def test_the_sdk_asks_again_for_a_history_page_the_server_could_not_read():
    node = await start_node()
    node.history = history = Failing(node.history)
    try:
        be = await connect(node, "hq", store="hq", roles=("backend",))
        for n in range(3):
            await be.send("price.update", {"sku": f"A{n}", "price": "1.00", "version": 1},
                          "store:acme/s1", lane=Lane.P2)
        history.fail("tail", 2)
        client = Client(*node.addresses[0], token("t2", store="s1"))
        await client.start()
        try:
            items, end = await client.history("store:acme/s1", Lane.P2, count=0)
        finally:
            await client.close()
        assert len(items) == 3 and end.code == Code.OK and history.calls["tail"] == 3
    finally:
        await node.stop()
