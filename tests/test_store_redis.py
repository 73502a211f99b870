"""What only the Redis Store does (the contract suites run on it too):
the epoch kept in Redis and renewed when the instance loses its data, the
instance's AOF policy in stats() and its warning, and failures — Redis
killed and restarted, connections killed, a reply lost after Redis applied
a batch.  Each test that flushes, kills or reconfigures Redis has a
``redis-server`` of its own (redis_server.PrivateRedis)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from backends import T0, stream_entry
from redis_server import PrivateRedis, fresh_prefix, redis_url
from support import aiotest
from tillwire.core.codes import Lane
from tillwire.server.store import NewMessage
from tillwire.server.store_memory import MemoryStore
from tillwire.server.store_redis import RedisStore, connect

PAY = "terminal:acme/pay1"
TILL = "terminal:acme/till1"


def msg(ref: int, *, created: float = T0) -> NewMessage:
    return NewMessage("acme", PAY, ref, 0, "payment.result", TILL, b'{"n":%d}' % ref,
                      created, created + 3600.0)


@contextlib.asynccontextmanager
async def _private_store():
    """A store (prefix "tw") on a ``redis-server`` of its own, and an admin
    client of that server."""
    with PrivateRedis() as server:
        store = RedisStore(server.url, prefix="tw")
        await store.open()
        admin = aioredis.from_url(server.url)
        try:
            yield store, admin
        finally:
            await admin.aclose()
            await store.close()


@aiotest()
async def test_flushall_renews_the_epoch_once_in_every_store_and_restarts_numbering():
    with PrivateRedis() as server:
        renewed: dict[str, list] = {"a": [], "b": []}
        a = RedisStore(server.url, prefix="tw")
        b = RedisStore(server.url, prefix="tw")
        a.on_new_epoch = lambda old, new: renewed["a"].append((old, new))
        b.on_new_epoch = lambda old, new: renewed["b"].append((old, new))
        await a.open()
        await b.open()
        admin = aioredis.from_url(server.url)
        try:
            old = a.epoch
            assert old and b.epoch == old                  # the second opener took the first's
            assert [x.seqs for x in await a.accept_many([(msg(1), [TILL]), (msg(2), [TILL])])] \
                == [{TILL: 1}, {TILL: 2}]
            assert await b.positions(TILL) == (0, 2, 0, 0)
            await admin.flushall()
            # Both notice on their next call, whichever reads or writes an inbox.
            assert [x.seqs for x in await a.accept_many([(msg(3), [TILL])])] == [{TILL: 1}]
            assert await b.positions(TILL) == (0, 1, 0, 0)
            new = a.epoch
            assert new != old and b.epoch == new
            assert renewed == {"a": [(old, new)], "b": [(old, new)]}
            # A dedup entry went with the rest: ref 1 is a new message now.
            [again] = await b.accept_many([(msg(1), [TILL])])
            assert not again.duplicate and again.seqs == {TILL: 2}
            assert [e.seq for e in await a.inbox(TILL, 0, 0, 10)] == [1, 2]
            assert renewed == {"a": [(old, new)], "b": [(old, new)]}   # once per store
            # Flushed while only one store is busy: the other converges on its epoch.
            await admin.flushall()
            await b.ack_many([(TILL, 0, 1)], T0 + 1)
            assert await a.positions(TILL) == (0, 0, 0, 0)
            assert a.epoch == b.epoch not in (old, new)
            assert len(renewed["a"]) == len(renewed["b"]) == 2
            assert (await a.stats())["epoch"] == a.epoch
        finally:
            await admin.aclose()
            await a.close()
            await b.close()


@aiotest()
async def test_stats_name_the_aof_policy_and_a_weak_one_is_warned_once(caplog):
    caplog.set_level(logging.WARNING, logger="tillwire.store.redis")

    async def policy(url: str) -> tuple[str, list[str]]:
        caplog.clear()
        store = RedisStore(url, prefix=fresh_prefix())
        await store.open()
        try:
            return (await store.stats())["aof"], [r.getMessage() for r in caplog.records]
        finally:
            await store.close()

    with PrivateRedis("--appendonly", "yes", "--appendfsync", "always") as server:
        assert await policy(server.url) == ("always", [])
    with PrivateRedis("--appendonly", "yes", "--appendfsync", "everysec") as server:
        aof, [warning] = await policy(server.url)
        assert aof == "everysec" and "last second of acked messages" in warning
    aof, [warning] = await policy(redis_url())                # the session's: no AOF
    assert aof == "off" and "appendonly no" in warning and "restart loses" in warning
    with PrivateRedis("--rename-command", "CONFIG", "") as server:
        aof, [warning] = await policy(server.url)
        assert aof == "unknown" and "CONFIG GET is refused" in warning
    with PrivateRedis("--appendonly", "yes", "--maxmemory-policy", "allkeys-lru") as server:
        aof, warnings = await policy(server.url)
        assert aof == "everysec" and len(warnings) == 2
        assert "allkeys-lru" in warnings[0] and "noeviction" in warnings[0]


@aiotest(timeout=90.0)
async def test_a_killed_redis_fails_calls_and_its_aof_brings_everything_back(caplog):
    with PrivateRedis("--appendonly", "yes", "--appendfsync", "always") as server:
        renewed = []
        store = RedisStore(connect(server.url, timeout=1.0), prefix="tw",
                           on_new_epoch=lambda old, new: renewed.append(new))
        await store.open()
        try:
            epoch = store.epoch
            first = await store.accept_many([(msg(1), [TILL]), (msg(2), [TILL])])
            await store.records.put("ticket", "acme/T-1", b"{}", T0)
            server.kill()                                  # SIGKILL: nothing flushed at exit
            with pytest.raises(RedisConnectionError):
                await store.accept_many([(msg(3), [TILL])])
            with pytest.raises(RedisConnectionError):
                await store.positions(TILL)
            with pytest.raises(RedisConnectionError):
                await store.records.get("ticket", "acme/T-1")
            failed = asyncio.get_running_loop().create_future()
            store.accept_many_then([(msg(3), [TILL])],
                                   lambda results, exc: failed.set_result((results, exc)))
            results, exc = await asyncio.wait_for(failed, 10)
            assert results is None and isinstance(exc, RedisConnectionError)
            # Channel history appended meanwhile is given up and logged, never raised.
            store.archive.append("tenant:acme", 3, 1, stream_entry(1, kind="note"))
            await store.archive.drain()
            assert any("channel history entries not kept" in r.getMessage()
                       for r in caplog.records)
            server.start()                                 # same port, same AOF
            # Every acked message is back, under the same epoch; the failed
            # batch left nothing, so its retry is a new message.
            assert await store.positions(TILL) == (0, 2, 0, 0)
            assert store.epoch == epoch and renewed == []
            [retry] = await store.accept_many([(msg(3), [TILL])])
            assert not retry.duplicate and retry.seqs == {TILL: 3}
            [dup] = await store.accept_many([(msg(1), [TILL])])
            assert dup.duplicate and dup.msg_id == first[0].msg_id
            assert await store.records.get("ticket", "acme/T-1") == b"{}"
            # Connections killed by the server: the next call gets new ones.
            admin = aioredis.from_url(server.url)
            try:
                assert await admin.client_kill_filter(_type="normal", skipme=True) >= 1
            finally:
                await admin.aclose()
            assert [e.seq for e in await store.inbox(TILL, 0, 0, 10)] == [1, 2, 3]
        finally:
            await store.close()


# A script that keeps Redis busy for about 0.8 s: commands sent meanwhile
# wait in their sockets and run after it.
_BUSY = """
local t = redis.call("TIME")
local start = t[1] * 1000000 + t[2]
while true do
  local n = redis.call("TIME")
  if n[1] * 1000000 + n[2] - start > 800000 then return 1 end
end
"""


@aiotest()
async def test_a_batch_whose_reply_was_lost_is_answered_as_duplicates_on_retry():
    with PrivateRedis() as server:
        store = RedisStore(connect(server.url, timeout=0.3), prefix="tw")
        await store.open()
        busy_client = aioredis.from_url(server.url)
        try:
            batch = [(msg(ref), [TILL]) for ref in (11, 12, 13)]
            busy = asyncio.create_task(busy_client.eval(_BUSY, 0))
            await asyncio.sleep(0.1)
            # The batch reaches Redis, which applies it once the busy script
            # ends; the store gave up waiting for the reply long before.
            with pytest.raises((RedisTimeoutError, RedisConnectionError)):
                await store.accept_many(batch)
            assert await busy == 1
            retry = await store.accept_many(batch)
            assert [a.duplicate for a in retry] == [True, True, True]
            assert len({a.msg_id for a in retry}) == 3
            assert [(await store.trace(a.msg_id)).ref for a in retry] == [11, 12, 13]
            assert await store.positions(TILL) == (0, 3, 0, 0)      # stored once
            assert [e.msg_id for e in await store.inbox(TILL, 0, 0, 10)] == \
                [a.msg_id for a in retry]
        finally:
            await busy_client.aclose()
            await store.close()


@aiotest()
async def test_a_store_not_open_refuses_accept_many_then():
    store = RedisStore(redis_url(), prefix=fresh_prefix())
    with pytest.raises(RuntimeError, match="not open"):
        store.accept_many_then([(msg(1), [TILL])], lambda results, exc: None)
    await store.close()


@aiotest()
async def test_batches_are_stored_in_the_order_asked_and_queued_ones_share_a_script():
    async with _private_store() as (store, admin):
        await admin.config_resetstat()
        loop = asyncio.get_running_loop()
        answers: list = []
        all_in = loop.create_future()

        def callback(results, exc):
            assert exc is None
            answers.append(results)
            if len(answers) == 50 and not all_in.done():
                all_in.set_result(None)

        for ref in range(1, 51):             # 50 batches asked in one loop iteration
            store.accept_many_then([(msg(ref), [TILL])], callback)
        acks = asyncio.ensure_future(store.ack_many([(TILL, 0, 50)], T0 + 1))
        await asyncio.wait_for(all_in, 10)
        # Each batch got the seq of its place in the order asked, answered in that order.
        assert [results[0].seqs for results in answers] == [{TILL: n} for n in range(1, 51)]
        # The ack asked after them all came after them all.
        assert len(await acks) == 0 and await store.positions(TILL) == (50, 50, 0, 0)
        stats = await admin.info("commandstats")
        scripts = stats["cmdstat_evalsha"]["calls"]
        assert scripts < 50                  # queued batches shared scripts


@aiotest()
async def test_deliveries_and_acks_asked_together_share_one_script_and_keep_their_answers():
    # The node's batch asks its deliveries and its acks in one loop turn;
    # the store joins them into one script (each inbox's positions read
    # once) and gives each call its own receipts, as asked one by one.
    def receipted(ref: int, to: str) -> NewMessage:
        m = msg(ref)
        m.to, m.receipt = to, True
        return m

    till2 = "terminal:acme/till2"
    items = [(receipted(1, TILL), [TILL]), (receipted(2, TILL), [TILL]),
             (receipted(3, till2), [till2])]
    memory = MemoryStore()
    async with _private_store() as (store, admin):
        answers = []
        for s in (memory, store):
            await s.accept_many(items)
            await admin.config_resetstat()
            answers.append(await asyncio.gather(
                s.delivered_many([(TILL, 0, 1, 2), (till2, 0, 1, 1)], T0 + 1),
                s.ack_many([(TILL, 0, 1), (till2, 0, 1)], T0 + 1)))
        stats = await admin.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 1
        delivered, acked = answers[1]
        assert sorted(r.ref for r in delivered) == [1, 2, 3]
        assert sorted(r.ref for r in acked) == [1, 3]
        assert answers[0] == answers[1]
        for msg_id in (1, 2, 3):
            assert await store.trace(msg_id) == await memory.trace(msg_id)


@aiotest()
async def test_a_store_in_another_key_layout_is_refused_at_open_and_left_alone():
    with PrivateRedis() as server:
        admin = aioredis.from_url(server.url)
        try:
            # What an older Tillwire left: an epoch and tenants with messages,
            # no layout marker.
            await admin.set("tw:epoch", 7)
            await admin.sadd("tw:tenants", "acme")
            store = RedisStore(server.url, prefix="tw")
            with pytest.raises(RuntimeError, match="key layout 1.*another prefix"):
                await store.open()
            await store.close()
            assert await admin.get("tw:layout") is None
            assert await admin.get("tw:epoch") == b"7"
            # Another prefix on the same instance opens, and is marked.
            other = RedisStore(server.url, prefix="tw2")
            await other.open()
            await other.close()
            assert await admin.get("tw2:layout") == b"2"
        finally:
            await admin.aclose()


@aiotest()
async def test_expire_and_trim_take_at_most_2000_terminals_a_call_and_the_next_the_rest():
    # A script blocks Redis while it runs: each call sweeps a bounded part.
    tills = [f"terminal:acme/t{i}" for i in range(2001)]
    store = RedisStore(redis_url(), prefix=fresh_prefix())
    await store.open()
    try:
        await store.accept_many([(msg(0), [t]) for t in tills])
        assert [len(await store.expire(T0 + 3600)) for _ in range(3)] == [2000, 1, 0]
        await store.accept_many([(msg(0, created=T0 + 4000), [t]) for t in tills])
        await store.ack_many([(t, 0, 2) for t in tills], T0 + 4001)
        # (A call: 2,000 terminals' acked messages and 2,000 ended entries'.)
        assert [await store.trim(T0 + 5000, 0.0) for _ in range(3)] == [4000, 2, 0]
        assert (await store.stats())["messages"] == 0
    finally:
        await store.close()


@aiotest()
async def test_trim_keeps_the_log_of_entries_still_held_and_leaves_none_behind():
    prefix = fresh_prefix()
    store = RedisStore(redis_url(), prefix=prefix)
    await store.open()
    admin = aioredis.from_url(redis_url())
    log = f"{prefix}:{{acme}}:s:g:{TILL}"
    try:
        [one, two] = await store.accept_many([(msg(1), [TILL]), (msg(2), [TILL])])
        await store.delivered_many([(TILL, 0, 1, 2)], T0 + 1)
        await store.ack_many([(TILL, 0, 1)], T0 + 2)
        assert await store.trim(T0 + 100, 0.0) == 1
        assert await store.trace(one.msg_id) is None
        [rec] = (await store.trace(two.msg_id)).recipients
        assert (rec.state, rec.delivered_at) == ("delivered", T0 + 1)
        assert await admin.llen(log) == 1                # (that delivery's record)
        await store.ack_many([(TILL, 0, 2)], T0 + 200)
        assert await store.trim(T0 + 300, 0.0) == 1
        assert await admin.llen(log) == 0
        assert await store.positions(TILL) == (2, 2, 0, 0)
        [three] = await store.accept_many([(msg(3, created=T0 + 300), [TILL])])
        assert three.seqs == {TILL: 3}
        assert [e.seq for e in await store.inbox(TILL, 0, 0, 10)] == [3]
    finally:
        await admin.aclose()
        await store.close()


@aiotest()
async def test_a_batch_larger_than_the_scripts_slices_is_stored_read_and_acked_whole():
    # The accept script reads a batch's dedup entries 1,000 at a time and
    # adds an inbox's entries 2,000 at a time (unpack's bound); each inbox's
    # last seq is written once per batch.  5,000 messages to one till, every
    # third asking for a receipt, a third of them sent again in the batch.
    async with _private_store() as (store, admin):
        def one(ref: int) -> NewMessage:
            m = msg(ref)
            m.receipt = ref % 3 == 0
            return m

        items = [(one(ref), [TILL]) for ref in range(1, 5001)]
        items += [(one(ref), [TILL]) for ref in range(1, 5001, 3)]
        await admin.config_resetstat()
        got = await store.accept_many(items)
        fresh, again = got[:5000], got[5000:]
        assert [a.seqs for a in fresh] == [{TILL: n} for n in range(1, 5001)]
        assert all(a.duplicate for a in again)
        assert [a.msg_id for a in again] == [fresh[ref - 1].msg_id for ref in range(1, 5001, 3)]
        stats = await admin.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 1
        # The inbox's last seq moves once for the whole batch.
        assert stats["cmdstat_hincrby"]["calls"] == 1 + 3     # (and the three counters)
        assert "cmdstat_hget" not in stats
        assert await store.positions(TILL) == (0, 5000, 0, 0)
        entries = await store.inbox(TILL, 0, 4990, 100)
        assert [(e.seq, e.body) for e in entries] == \
            [(n, b'{"n":%d}' % n) for n in range(4991, 5001)]
        assert (await store.stats())["unacked"] == 5000
        receipts = await store.ack_many([(TILL, 0, 5000)], T0 + 1)
        assert [r.ref for r in receipts] == list(range(3, 5001, 3))
        assert (await store.stats())["unacked"] == 0
        assert await store.trim(T0 + 10, 1) == 5000


@aiotest()
async def test_an_ack_across_holes_left_by_rejects_takes_only_what_it_covers():
    # Rejects leave holes in an inbox's seqs: an ack past them takes the
    # entries up to its seq, none after.
    store = RedisStore(redis_url(), prefix=fresh_prefix())
    await store.open()
    try:
        got = await store.accept_many([(msg(ref), [TILL]) for ref in range(1, 8)])
        assert [a.seqs[TILL] for a in got] == list(range(1, 8))
        for seq in (2, 4):
            assert (await store.reject(TILL, 0, seq, "bad", T0 + 1)).seq == seq
        assert await store.ack_many([(TILL, 0, 4)], T0 + 2) == []
        assert [e.seq for e in await store.inbox(TILL, 0, 0, 10)] == [5, 6, 7]
        assert await store.positions(TILL) == (4, 7, 0, 0)
        assert [(r.state, r.acked_at) for r in (await store.trace(got[4].msg_id)).recipients] \
            == [("stored", None)]
        assert [r.state for r in (await store.trace(got[2].msg_id)).recipients] == ["acked"]
        await store.ack_many([(TILL, 0, 6)], T0 + 3)
        assert [e.seq for e in await store.inbox(TILL, 0, 0, 10)] == [7]
        assert (await store.stats())["unacked"] == 1
    finally:
        await store.close()


@aiotest()
async def test_lanes_given_as_the_lane_enum_reach_the_same_inboxes_and_streams():
    # redis-py sends an int subclass as its repr(): the node passes Lane members.
    store = RedisStore(redis_url(), prefix=fresh_prefix())
    await store.open()
    try:
        m = msg(1)
        m.lane = Lane.P1
        [a] = await store.accept_many([(m, [TILL])])
        assert a.seqs == {TILL: 1} and await store.positions(TILL) == (0, 0, 0, 1)
        assert [e.msg_id for e in await store.inbox(TILL, Lane.P1, 0, 10)] == [a.msg_id]
        await store.delivered_many([(TILL, Lane.P1, 1, 1)], T0 + 1)
        assert (await store.trace(a.msg_id)).recipients[0].delivered_at == T0 + 1
        assert await store.reject(TILL, Lane.P1, 1, "no", T0 + 2) is not None
        await store.ack_many([(TILL, Lane.P1, 1)], T0 + 3)
        assert await store.positions(TILL) == (0, 0, 1, 1)
        store.archive.configure(10, 3600.0)
        store.archive.append("store:acme/s1", Lane.P2, 7, stream_entry(1, "sku", version=1))
        [state] = await store.archive.load(10, 3600.0, T0)
        assert (state.lane, state.epoch, [e.key for e in state.lvc]) == (2, 7, ["sku"])
    finally:
        await store.close()


@aiotest()
async def test_a_hung_redis_times_out_the_write_in_flight_and_fails_the_queued_ones_with_it():
    with PrivateRedis() as server:
        store = RedisStore(connect(server.url, timeout=0.5), prefix="tw")
        await store.open()
        try:
            await store.accept_many([(msg(1), [TILL])])
            server.pause()
            try:
                failed: list = []
                store.accept_many_then([(msg(2), [TILL])], lambda r, exc: failed.append(exc))
                acks = asyncio.ensure_future(store.ack_many([(TILL, 0, 1)], T0 + 1))
                await asyncio.sleep(0)       # (the first is sent, the ack queued behind it)
                store.accept_many_then([(msg(3), [TILL])], lambda r, exc: failed.append(exc))
                with pytest.raises(RedisTimeoutError) as ack_failed:
                    await acks
                await asyncio.sleep(0)
                # One timeout answered all three: the two queued behind the
                # first were never sent.
                assert len(failed) == 2 and failed[0] is failed[1] is ack_failed.value
            finally:
                server.resume()
            # The first had reached Redis, which applies it once it runs again
            # (a lost reply: its retry is a duplicate); the others never came.
            for _ in range(200):
                if await store.positions(TILL) == (0, 2, 0, 0):
                    break
                await asyncio.sleep(0.02)
            assert await store.positions(TILL) == (0, 2, 0, 0)
            two, three = await store.accept_many([(msg(2), [TILL]), (msg(3), [TILL])])
            assert two.duplicate and not three.duplicate and three.seqs == {TILL: 3}
        finally:
            await store.close()


@aiotest()
async def test_writes_keep_their_order_when_redis_has_lost_only_some_scripts():
    # Redis restarted (or SCRIPT FLUSH): the first write after it, alone in
    # its round trip, loads its own script again and no other.  The next
    # round trip carries a reject and then an ack of the same entry: the
    # reject must run first (its entry is dead, the ack finds nothing), not
    # after the ack whose script Redis still had.
    async with _private_store() as (store, admin):
        [a] = await store.accept_many([(msg(1), [TILL])])
        await admin.script_flush()
        assert await store.ack_many([(TILL, 0, 0)], T0) == []     # loads progress only
        dead, receipts = await asyncio.gather(
            store.reject(TILL, 0, 1, "refused", T0 + 1),
            store.ack_many([(TILL, 0, 1)], T0 + 2))
        assert dead is not None and dead.msg_id == a.msg_id and dead.reason == "refused"
        assert receipts == []
        [r] = (await store.trace(a.msg_id)).recipients
        assert (r.state, r.ended_at, r.acked_at) == ("rejected", T0 + 1, None)
        assert [d.msg_id for d in await store.dead_letters(None, 10)] == [a.msg_id]


@aiotest(timeout=120)
async def test_a_round_trip_meeting_another_workers_reload_keeps_a_senders_order():
    # Redis lost its scripts (restart, SCRIPT FLUSH).  One worker sends a
    # long round trip of accepts to one till (Redis reads it in parts) while
    # another worker loads the scripts again.  Were the round trip a plain
    # pipeline, its first scripts could be refused (NOSCRIPT) and its later
    # ones run, the first then running again after them: the sender's
    # messages stored out of order.  As one transaction it runs whole with
    # the scripts Redis has at EXEC: all or none refused, run again in order.
    import orjson

    def big(n: int) -> NewMessage:
        body = orjson.dumps({"n": n, "pad": "x" * 1000})
        return NewMessage("acme", "terminal:acme/pay", n + 1, Lane.P0, "payment.result", TILL,
                          body, T0, T0 + 3600)

    with PrivateRedis() as server:
        admin = aioredis.from_url(server.url)
        try:
            for attempt in range(8):
                prefix = fresh_prefix()
                sender = RedisStore(server.url, prefix=prefix)
                other = RedisStore(server.url, prefix=prefix)
                await sender.open()
                await other.open()
                try:
                    await admin.script_flush()
                    writes, n = [], 0
                    for _ in range(12):          # (an ack between: accepts are not joined)
                        writes.append(asyncio.ensure_future(sender.accept_many(
                            [(big(n + k), [TILL]) for k in range(150)])))
                        writes.append(asyncio.ensure_future(sender.ack_many([(TILL, 0, 0)], T0)))
                        n += 150
                    await asyncio.sleep(0.002 * attempt)
                    await other._load_scripts()
                    await asyncio.gather(*writes)
                    got = [orjson.loads(e.body)["n"]
                           for e in await sender.inbox(TILL, 0, 0, n)]
                    assert got == list(range(n)), f"attempt {attempt}: stored out of order"
                finally:
                    await sender.close()
                    await other.close()
        finally:
            await admin.aclose()


@aiotest()
async def test_a_batch_that_cannot_be_encoded_fails_and_never_hangs():
    # A recipient Redis cannot be sent (not UTF-8: a lone surrogate) fails
    # the script of its batch (and of the batches joined with it), and the
    # writes after it go on: no caller waits forever.
    store = RedisStore(redis_url(), prefix=fresh_prefix())
    await store.open()
    try:
        bad = asyncio.ensure_future(store.accept_many([(msg(1), ["terminal:acme/\udc80"])]))
        acks = asyncio.ensure_future(store.ack_many([(TILL, 0, 1)], T0 + 1))
        done, pending = await asyncio.wait([bad, acks], timeout=5)
        assert not pending, "a write was never answered"
        assert isinstance(bad.exception(), (TypeError, ValueError))
        assert acks.result() == []
        assert [a.seqs for a in await store.accept_many([(msg(2), [TILL])])] == [{TILL: 1}]
    finally:
        await store.close()


@aiotest()
async def test_a_write_that_cannot_be_encoded_fails_alone_not_its_round_trip():
    # An ack naming a terminal Redis cannot be sent (a lone surrogate) fails;
    # the accept that goes in the same round trip is stored all the same.
    store = RedisStore(redis_url(), prefix=fresh_prefix())
    await store.open()
    try:
        bad, good = await asyncio.gather(
            store.ack_many([("terminal:acme/\udc80", 0, 1)], T0 + 1),
            store.accept_many([(msg(1), [TILL])]), return_exceptions=True)
        assert isinstance(bad, ValueError)
        assert not isinstance(good, Exception), good
        assert [a.seqs for a in good] == [{TILL: 1}]
    finally:
        await store.close()


@aiotest()
async def test_writes_run_again_after_noscript_fail_together_at_the_first_timeout():
    # Redis lost its scripts and then stopped answering: the writes of the
    # round trip that met NOSCRIPT run again one by one; once one of them
    # times out the rest fail at once, as the writes queued behind a
    # timeout do, rather than one timeout after another.
    with PrivateRedis() as server:
        store = RedisStore(connect(server.url, timeout=0.5), prefix="tw")
        await store.open()
        admin = aioredis.from_url(server.url)
        run = store._run
        paused = []

        async def run_after_pause(name, *args):
            if not paused:
                server.pause()
                paused.append(True)
            return await run(name, *args)

        try:
            await store.accept_many([(msg(1), [TILL])])
            await admin.script_flush()
            store._run = run_after_pause
            started = asyncio.get_running_loop().time()
            got = await asyncio.gather(*(store.ack_many([(TILL, 0, 0)], T0 + k)
                                         for k in range(8)), return_exceptions=True)
            took = asyncio.get_running_loop().time() - started
            assert paused and all(isinstance(g, RedisTimeoutError) for g in got), got
            assert took < 2.0, f"{took:.1f} s: one timeout after another"
        finally:
            server.resume()
            store._run = run
            await admin.aclose()
            await store.close()


@aiotest()
async def test_a_message_with_an_empty_body_is_trimmed():
    # (HINCRBY of "-0", what Lua makes of minus an empty body's length, is
    # refused: the trim failed, every time, while the message was held.)
    store = RedisStore(redis_url(), prefix=fresh_prefix())
    await store.open()
    try:
        empty = msg(1)
        empty.body = b""
        [a] = await store.accept_many([(empty, [TILL])])
        await store.ack_many([(TILL, 0, 1)], T0 + 1)
        assert await store.trim(T0 + 10, 1) == 1
        assert await store.trace(a.msg_id) is None
        assert (await store.stats())["bytes"] == 0
    finally:
        await store.close()
