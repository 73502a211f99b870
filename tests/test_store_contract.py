"""One suite of Store contract tests, run against every backend.

``store_factory`` (conftest.py) makes a fresh store of each backend in turn
(memory; SQLite in ``tmp_path``, its writer in a process and in a thread; see
backends.py).  Every test is a plain function that runs its coroutine with
:func:`run_with`; the second half holds the SQLite-only tests
(durability across reopen, migrations, online backup, a SIGKILL crash test,
the ``tillwire backup`` command) and a hypothesis differential test that
feeds the memory, SQLite and Redis backends the same operations and requires
the same answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends import T0, make_backend, run_with, stream_entry
from redis_server import fresh_prefix, redis_url
from tillwire.server import logs
from tillwire.server.archive import StreamEntry
from tillwire.server.store import (
    ACKED, DELIVERED, EXPIRED, REJECTED, STORED, NewMessage, ReceiptEvent, Store,
)
from tillwire.server.store_memory import MemoryStore
from tillwire.server.store_redis import RedisStore
from tillwire.server.store_sqlite import DB_FILENAME, SQLiteStore
from tillwire.server.store_sqlite_backup import backup_file
from tillwire.server.store_sqlite_schema import SCHEMA_VERSION, migrate, schema_version
from tillwire.server.store_sqlite_writer import STAGE_ROWS
from tillwire.server.terminals import TerminalRecord

TTL = 3600.0
PAY = "terminal:acme/pay1"
TILL = "terminal:acme/till1"
TILL2 = "terminal:acme/till2"


def msg(ref: int = 0, *, sender: str = PAY, to: str = TILL, lane: int = 0, created: float = T0,
        ttl: float = TTL, receipt: bool = False, kind: str = "payment.result",
        body: bytes | None = None) -> NewMessage:
    return NewMessage("acme", sender, ref, lane, kind, to,
                      body if body is not None else b'{"n":%d}' % ref,
                      created, created + ttl, receipt)


async def seqs_of(store, items):
    return [a.seqs for a in await store.accept_many(items)]


# --------------------------------------------------------------------------
# The contract, on every backend


def test_backend_satisfies_protocol(store_factory):
    store = store_factory()
    assert isinstance(store, Store)


def test_accept_assigns_seq_per_inbox_and_lane(store_factory):
    async def body(store):
        items = [
            (msg(1), [TILL]), (msg(2, lane=1), [TILL]), (msg(3), [TILL2]),
            (msg(4), [TILL]), (msg(5, lane=1), [TILL]), (msg(6), [TILL]),
        ]
        got = await store.accept_many(items)
        assert [a.duplicate for a in got] == [False] * 6
        ids = [a.msg_id for a in got]
        assert ids == sorted(ids) and len(set(ids)) == 6
        assert [a.seqs for a in got] == [
            {TILL: 1}, {TILL: 1}, {TILL2: 1}, {TILL: 2}, {TILL: 2}, {TILL: 3}]
        # A second batch continues every inbox.
        more = await seqs_of(store, [(msg(7, lane=1), [TILL]), (msg(8), [TILL2])])
        assert more == [{TILL: 3}, {TILL2: 2}]
        assert await store.positions(TILL) == (0, 3, 0, 3)
        assert await store.positions(TILL2) == (0, 2, 0, 0)
        p0 = await store.inbox(TILL, 0, 0, 100)
        assert [(e.seq, e.msg_id) for e in p0] == [(1, ids[0]), (2, ids[3]), (3, ids[5])]
        assert p0[0].body == b'{"n":1}' and p0[0].kind == "payment.result"
        assert p0[0].expires == T0 + TTL and not p0[0].delivered
        p1 = await store.inbox(TILL, 1, 0, 100)
        assert [e.seq for e in p1] == [1, 2, 3]
        assert await store.accept_many([]) == []
    run_with(store_factory, body)


def test_group_message_expands_to_every_recipient(store_factory):
    members = [f"terminal:acme/till{i}" for i in range(60)]

    async def body(store):
        await store.accept_many([(msg(1, to=members[0]), [members[0]])])
        [first] = await store.accept_many([(msg(2, to="store:acme/s1"), members + members[:3])])
        assert not first.duplicate
        assert list(first.seqs) == members                 # each once, in order
        assert first.seqs[members[0]] == 2 and all(first.seqs[m] == 1 for m in members[1:])
        [second] = await store.accept_many([(msg(3, to="store:acme/s1", lane=1), members)])
        assert set(second.seqs.values()) == {1}
        trace = await store.trace(first.msg_id)
        assert trace.to == "store:acme/s1"
        assert [(r.terminal, r.seq, r.state) for r in trace.recipients] == \
            [(m, first.seqs[m], STORED) for m in members]
        for m in members[1:]:
            [e] = await store.inbox(m, 0, 0, 10)
            assert e.msg_id == first.msg_id
        assert (await store.stats())["unacked"] == 1 + 60 + 60
    run_with(store_factory, body)


def test_recipients_of_another_tenant_get_their_entries_and_their_trace(store_factory):
    # The node routes within one tenant, but the contract lets a message's
    # recipient be of another tenant: its entry is in that terminal's inbox.
    beta = "terminal:beta/till1"

    async def body(store):
        [one, both] = await store.accept_many([
            (msg(1, to=beta, receipt=True), [beta]),
            (msg(2, to="store:acme/s1", ttl=5.0), [TILL, beta])])
        assert (one.seqs, both.seqs) == ({beta: 1}, {TILL: 1, beta: 2})
        assert [e.msg_id for e in await store.inbox(beta, 0, 0, 10)] == \
            [one.msg_id, both.msg_id]
        assert await store.delivered_many([(beta, 0, 1, 2)], T0 + 1) == \
            [ReceiptEvent(one.msg_id, beta, PAY, 1)]
        assert await store.ack_many([(beta, 0, 2)], T0 + 2) == \
            [ReceiptEvent(one.msg_id, beta, PAY, 1)]
        assert await store.positions(beta) == (2, 2, 0, 0)
        [dead] = await store.expire(T0 + 10)          # TILL's entry of the group message
        assert (dead.msg_id, dead.terminal) == (both.msg_id, TILL)
        trace = await store.trace(both.msg_id)
        assert [(r.terminal, r.state, r.delivered_at, r.acked_at) for r in trace.recipients] == \
            [(TILL, EXPIRED, None, None), (beta, ACKED, T0 + 1, T0 + 2)]
        assert (await store.stats())["unacked"] == 0
        assert await store.trim(T0 + 20, 0.0) == 2
        assert await store.trace(one.msg_id) is None and await store.trace(both.msg_id) is None
    run_with(store_factory, body)


def test_a_lane_other_than_p0_or_p1_is_refused_and_nothing_is_stored(store_factory):
    async def body(store):
        with pytest.raises(ValueError, match="lane must be P0 or P1"):
            await store.accept_many([(msg(1), [TILL]), (msg(2, lane=2), [TILL])])
        assert await store.inbox(TILL, 0, 0, 10) == []
        [ok] = await store.accept_many([(msg(1), [TILL])])
        assert ok.seqs == {TILL: 1} and not ok.duplicate
    run_with(store_factory, body)


def test_receipts_come_in_the_order_of_the_acks_that_earn_them(store_factory):
    # One call, an inbox named twice (its first ack passing nothing): the
    # receipts follow the acks as given, as calls one after the other would.
    async def body(store):
        [a] = await store.accept_many([(msg(0, receipt=True), [TILL, TILL2])])
        got = await store.ack_many([(TILL2, 0, 0), (TILL, 0, 1), (TILL2, 0, 1)], T0 + 1)
        assert [(r.msg_id, r.terminal) for r in got] == [(a.msg_id, TILL), (a.msg_id, TILL2)]
    run_with(store_factory, body)


def test_dedup_within_window_including_same_batch(store_factory):
    async def body(store):
        got = await store.accept_many([
            (msg(7), [TILL]),
            (msg(7, body=b'{"again":1}'), [TILL]),           # same (sender, ref), same batch
            (msg(7, sender="terminal:acme/pay2"), [TILL]),   # same ref, other sender
            (msg(0), [TILL]), (msg(0), [TILL]),                # ref 0: never deduplicated
        ])
        assert [a.duplicate for a in got] == [False, True, False, False, False]
        assert got[1].msg_id == got[0].msg_id and got[1].seqs == {}
        assert len({got[0].msg_id, got[2].msg_id, got[3].msg_id, got[4].msg_id}) == 4
        assert await store.positions(TILL) == (0, 4, 0, 0)
        # Later in the window: still the original, nothing stored.
        [again] = await store.accept_many([(msg(7, created=T0 + 99), [TILL2])])
        assert again.duplicate and again.msg_id == got[0].msg_id
        assert await store.positions(TILL2) == (0, 0, 0, 0)
        # Exactly at the window's end: still a duplicate; after it: a new message.
        [edge] = await store.accept_many([(msg(7, created=T0 + 100), [TILL])])
        assert edge.duplicate
        [late] = await store.accept_many([(msg(7, created=T0 + 100.5), [TILL])])
        assert not late.duplicate and late.msg_id > got[4].msg_id and late.seqs == {TILL: 5}
        # ...and the new one is what the window now remembers.
        [dup] = await store.accept_many([(msg(7, created=T0 + 150), [TILL])])
        assert dup.duplicate and dup.msg_id == late.msg_id
        entries = await store.inbox(TILL, 0, 0, 10)
        assert [e.body for e in entries][:2] == [b'{"n":7}', b'{"n":7}']   # the first body won
    run_with(store_factory, body, dedup_window=100.0)


def test_dedup_window_is_measured_inside_one_batch_too(store_factory):
    async def body(store):
        [stored] = await store.accept_many([(msg(8), [TILL])])
        got = await store.accept_many([
            (msg(8, created=T0 + 50), [TILL]),      # the stored one, within the window
            (msg(8, created=T0 + 101), [TILL]),     # past the stored one's window: new
            (msg(8, created=T0 + 150), [TILL]),     # within the new one's window
            (msg(9, created=T0), [TILL]),
            (msg(9, created=T0 + 150), [TILL]),     # past the first of this batch: new
        ])
        assert [a.duplicate for a in got] == [True, False, True, False, False]
        assert got[0].msg_id == stored.msg_id and got[2].msg_id == got[1].msg_id
        assert got[1].seqs == {TILL: 2} and got[4].seqs == {TILL: 4}
        assert len({stored.msg_id, got[1].msg_id, got[3].msg_id, got[4].msg_id}) == 4
    run_with(store_factory, body, dedup_window=100.0)


def test_dedup_of_a_large_request_from_several_senders(store_factory):
    # More refs per sender than one dedup lookup takes (512), refs stored
    # before and resent, refs repeated inside the request, two senders.
    async def body(store):
        pay2 = "terminal:acme/pay2"
        first = await store.accept_many([(msg(r), [TILL]) for r in range(1, 601, 2)])
        ids = {r: a.msg_id for r, a in zip(range(1, 601, 2), first)}
        items = [(msg(r), [TILL]) for r in range(1, 1201)]             # odd <= 599 stored
        items += [(msg(r, sender=pay2), [TILL2]) for r in range(1, 4)]  # other sender: new
        items += [(msg(5), [TILL]), (msg(1000), [TILL])]                # repeated in the request
        got = await store.accept_many(items)
        dup = [a.duplicate for a in got]
        assert dup[:1200] == [r % 2 == 1 and r < 600 for r in range(1, 1201)]
        assert [got[r - 1].msg_id for r in range(1, 601, 2)] == [ids[r] for r in range(1, 601, 2)]
        assert dup[1200:] == [False, False, False, True, True]
        assert got[-1].msg_id == got[999].msg_id and got[-2].msg_id == ids[5]
        assert await store.positions(TILL) == (0, 300 + 900, 0, 0)
        assert await store.positions(TILL2) == (0, 3, 0, 0)
    run_with(store_factory, body)


def test_accept_many_then_calls_back_once_on_the_loop(store_factory):
    async def body(store):
        loop = asyncio.get_running_loop()
        calls = []
        done = loop.create_future()

        def callback(results, exc):
            calls.append((results, exc))
            assert asyncio.get_running_loop() is loop         # on the loop, not a thread
            done.set_result(None)

        store.accept_many_then([(msg(3), [TILL]), (msg(3), [TILL]), (msg(0), [TILL2])],
                               callback)
        assert calls == []                                    # never before returning
        await asyncio.wait_for(done, 10)
        await asyncio.sleep(0.01)
        [(results, exc)] = calls
        assert exc is None and [a.duplicate for a in results] == [False, True, False]
        assert results[0].seqs == {TILL: 1} and results[2].seqs == {TILL2: 1}
        assert results[1].msg_id == results[0].msg_id
        # The same outcome as accept_many: the stored messages are there.
        assert await store.positions(TILL) == (0, 1, 0, 0)
        # A callback that raises does not stop the store answering others.
        failing = loop.create_future()

        def bad(results, exc):
            failing.set_result(results)
            raise RuntimeError("callback bug")

        store.accept_many_then([(msg(4), [TILL])], bad)
        assert [a.seqs for a in await asyncio.wait_for(failing, 10)] == [{TILL: 2}]
        assert await seqs_of(store, [(msg(5), [TILL])]) == [{TILL: 3}]
    run_with(store_factory, body)


def test_sqlite_accept_many_then_refuses_a_store_not_open(tmp_path):
    async def main():
        store = make_backend("sqlite", str(tmp_path / DB_FILENAME))
        with pytest.raises(RuntimeError):
            store.accept_many_then([(msg(1), [TILL])], lambda r, e: None)
    asyncio.run(main())


def test_refs_use_the_whole_unsigned_64_bit_range(store_factory):
    big = (1 << 64) - 1

    async def body(store):
        got = await store.accept_many([(msg(big, receipt=True, ttl=1), [TILL]),
                                       (msg(1 << 63, ttl=1), [TILL]), (msg(big), [TILL])])
        assert [a.duplicate for a in got] == [False, False, True]
        assert got[2].msg_id == got[0].msg_id
        assert (await store.trace(got[1].msg_id)).ref == 1 << 63
        assert [r.ref for r in await store.ack_many([(TILL, 0, 1)], T0 + 0.5)] == [big]
        [dead] = await store.expire(T0 + 10)
        assert dead.ref == 1 << 63 and (await store.dead_letters(None, 1))[0].ref == 1 << 63
    run_with(store_factory, body)


def test_inbox_after_limit_acked_and_delivered(store_factory):
    async def body(store):
        await store.accept_many([(msg(i), [TILL]) for i in range(1, 11)])
        assert [e.seq for e in await store.inbox(TILL, 0, 3, 4)] == [4, 5, 6, 7]
        assert [e.seq for e in await store.inbox(TILL, 0, 8, 100)] == [9, 10]
        assert await store.inbox(TILL, 0, 10, 100) == []
        assert await store.inbox(TILL, 1, 0, 100) == []
        assert await store.inbox("terminal:acme/nobody", 0, 0, 100) == []
        await store.ack_many([(TILL, 0, 5)], T0 + 1)
        assert [e.seq for e in await store.inbox(TILL, 0, 0, 3)] == [6, 7, 8]
        assert [e.seq for e in await store.inbox(TILL, 0, 7, 100)] == [8, 9, 10]
        await store.delivered_many([(TILL, 0, 6, 8)], T0 + 2)
        flags = [(e.seq, e.delivered) for e in await store.inbox(TILL, 0, 0, 100)]
        assert flags == [(6, True), (7, True), (8, True), (9, False), (10, False)]
    run_with(store_factory, body)


def test_positions(store_factory):
    async def body(store):
        assert await store.positions(TILL) == (0, 0, 0, 0)
        await store.accept_many([(msg(i, lane=i % 2), [TILL]) for i in range(1, 8)])
        assert await store.positions(TILL) == (0, 3, 0, 4)
        await store.ack_many([(TILL, 0, 2), (TILL, 1, 4)], T0 + 1)
        assert await store.positions(TILL) == (2, 3, 4, 4)
    run_with(store_factory, body)


def test_positions_many_answers_each_terminals_positions_in_order(store_factory):
    async def body(store):
        assert await store.positions_many([]) == []
        await store.accept_many([(msg(i, lane=i % 2), [TILL]) for i in range(1, 8)]
                                + [(msg(9), [TILL2])])
        await store.ack_many([(TILL, 0, 2), (TILL, 1, 4)], T0 + 1)
        nobody = "terminal:acme/nobody"
        assert await store.positions_many([TILL2, nobody, TILL]) == \
            [(0, 1, 0, 0), (0, 0, 0, 0), (2, 3, 4, 4)]
        assert await store.positions_many([TILL]) == [await store.positions(TILL)]
    run_with(store_factory, body)


def test_ack_many_is_cumulative_idempotent_and_receipts_only_when_asked(store_factory):
    async def body(store):
        got = await store.accept_many(
            [(msg(i, receipt=i % 2 == 1), [TILL]) for i in range(1, 7)]
            + [(msg(9, receipt=True, to="store:acme/s1"), [TILL, TILL2])])
        ids = [a.msg_id for a in got]
        receipts = await store.ack_many([(TILL, 0, 3)], T0 + 1)
        assert [(r.msg_id, r.terminal, r.sender, r.ref) for r in receipts] == \
            [(ids[0], TILL, PAY, 1), (ids[2], TILL, PAY, 3)]
        assert await store.ack_many([(TILL, 0, 3)], T0 + 2) == []      # idempotent
        assert await store.ack_many([(TILL, 0, 1)], T0 + 2) == []      # older ack: nothing
        assert await store.ack_many([("terminal:acme/nobody", 0, 5), (TILL, 1, 5)], T0 + 2) == []
        # Beyond the last seq: clamped to it; one receipt per newly acked message.
        receipts = await store.ack_many([(TILL, 0, 99)], T0 + 3)
        assert [r.msg_id for r in receipts] == [ids[4], ids[6]]
        assert await store.positions(TILL) == (7, 7, 0, 0)
        # The group message: the other recipient's ack is its own receipt.
        receipts = await store.ack_many([(TILL2, 0, 1)], T0 + 4)
        assert [(r.msg_id, r.terminal) for r in receipts] == [(ids[6], TILL2)]
        # A new message after the clamp gets seq 8 and is not acked yet.
        assert await seqs_of(store, [(msg(10), [TILL])]) == [{TILL: 8}]
        assert [e.seq for e in await store.inbox(TILL, 0, 0, 10)] == [8]
    run_with(store_factory, body)


def test_delivered_many_marks_and_times_delivery(store_factory):
    async def body(store):
        got = await store.accept_many([(msg(i), [TILL]) for i in range(1, 5)])
        await store.delivered_many([(TILL, 0, 1, 2)], T0 + 5)
        await store.delivered_many([(TILL, 0, 1, 2), ("terminal:acme/nobody", 0, 1, 1)], T0 + 6)
        t1 = await store.trace(got[0].msg_id)
        assert t1.recipients[0].state == DELIVERED and t1.recipients[0].delivered_at == T0 + 5
        t3 = await store.trace(got[2].msg_id)
        assert t3.recipients[0].state == STORED and t3.recipients[0].delivered_at is None
        await store.delivered_many([(TILL, 0, 3, 4)], T0 + 7)
        t4 = await store.trace(got[3].msg_id)
        assert (t4.recipients[0].state, t4.recipients[0].delivered_at) == (DELIVERED, T0 + 7)
        assert all(e.delivered for e in await store.inbox(TILL, 0, 0, 10))
    run_with(store_factory, body)


def test_delivered_many_returns_receipts_for_first_deliveries_only(store_factory):
    async def body(store):
        got = await store.accept_many([(msg(i, receipt=i % 2 == 0), [TILL]) for i in range(1, 7)]
                                      + [(msg(9, receipt=True), [TILL2])])
        first = await store.delivered_many([(TILL, 0, 1, 4), (TILL2, 0, 1, 1)], T0 + 5)
        assert [(r.msg_id, r.terminal, r.sender, r.ref) for r in first] == \
            [(got[1].msg_id, TILL, PAY, 2), (got[3].msg_id, TILL, PAY, 4),
             (got[6].msg_id, TILL2, PAY, 9)]
        # Delivered again (a retransmit, a resume): no second receipt.
        assert await store.delivered_many([(TILL, 0, 1, 4)], T0 + 6) == []
        await store.ack_many([(TILL, 0, 4)], T0 + 7)
        # Past the acked ones: only what is new.
        later = await store.delivered_many([(TILL, 0, 5, 6)], T0 + 8)
        assert [r.msg_id for r in later] == [got[5].msg_id]
    run_with(store_factory, body)


def test_reject_makes_one_dead_letter(store_factory):
    async def body(store):
        got = await store.accept_many([(msg(i, receipt=i == 2), [TILL]) for i in range(1, 5)])
        dead = await store.reject(TILL, 0, 2, "unknown sku", T0 + 10)
        assert (dead.msg_id, dead.terminal, dead.lane, dead.seq, dead.kind, dead.reason, dead.at,
                dead.sender, dead.ref, dead.receipt) == \
            (got[1].msg_id, TILL, 0, 2, "payment.result", "unknown sku", T0 + 10, PAY, 2, True)
        assert await store.reject(TILL, 0, 2, "again", T0 + 11) is None       # only once
        assert await store.reject(TILL, 0, 99, "no such seq", T0 + 11) is None
        assert await store.reject("terminal:acme/nobody", 0, 1, "x", T0 + 11) is None
        await store.ack_many([(TILL, 0, 1)], T0 + 12)
        assert await store.reject(TILL, 0, 1, "too late", T0 + 13) is None    # acked already
        assert [e.seq for e in await store.inbox(TILL, 0, 0, 10)] == [3, 4]
        # Acking past the rejected entry sends no receipt for it.
        assert await store.ack_many([(TILL, 0, 4)], T0 + 14) == []
        trace = await store.trace(got[1].msg_id)
        r = trace.recipients[0]
        assert (r.state, r.ended_at, r.reason, r.acked_at) == (REJECTED, T0 + 10, "unknown sku", None)
        assert [(d.msg_id, d.reason) for d in await store.dead_letters(None, 10)] == \
            [(got[1].msg_id, "unknown sku")]
    run_with(store_factory, body)


def test_expire_dead_letters_each_unacked_entry_once(store_factory):
    async def body(store):
        got = await store.accept_many([
            (msg(1, ttl=10), [TILL]),
            (msg(2, ttl=10, receipt=True, to="store:acme/s1"), [TILL, TILL2]),
            (msg(3, ttl=100), [TILL]),
            (msg(4, ttl=10, lane=1), [TILL]),
        ])
        await store.ack_many([(TILL, 0, 1)], T0 + 5)
        assert await store.expire(T0 + 9) == []
        dead = await store.expire(T0 + 10)
        assert [(d.msg_id, d.terminal, d.lane, d.seq, d.reason, d.at, d.receipt) for d in dead] == [
            (got[1].msg_id, TILL, 0, 2, "ttl", T0 + 10, True),
            (got[1].msg_id, TILL2, 0, 1, "ttl", T0 + 10, True),
            (got[3].msg_id, TILL, 1, 1, "ttl", T0 + 10, False),
        ]
        assert dead[0].sender == PAY and dead[0].ref == 2
        assert await store.expire(T0 + 20) == []                 # nothing twice
        assert [e.seq for e in await store.inbox(TILL, 0, 0, 10)] == [3]
        assert await store.inbox(TILL, 1, 0, 10) == []
        assert await store.ack_many([(TILL, 0, 2)], T0 + 21) == []   # no receipt for a dead entry
        assert [d.seq for d in await store.expire(T0 + 100)] == [3]
        # A message accepted already expired (a clock step) is still found.
        [late] = await store.accept_many([(msg(5, created=T0 - 500, ttl=10), [TILL2])])
        assert [d.msg_id for d in await store.expire(T0 + 101)] == [late.msg_id]
        assert (await store.stats())["dead_letters"] == 5
    run_with(store_factory, body)


def test_trace_follows_the_whole_life(store_factory):
    async def body(store):
        assert await store.trace(12345) is None
        [a] = await store.accept_many([(msg(5, receipt=True, to="store:acme/s1", ttl=50),
                                        [TILL, TILL2, "terminal:acme/till3"])])
        t = await store.trace(a.msg_id)
        assert (t.msg_id, t.tenant, t.sender, t.ref, t.lane, t.kind, t.to, t.created, t.expires,
                t.receipt) == (a.msg_id, "acme", PAY, 5, 0, "payment.result", "store:acme/s1",
                               T0, T0 + 50, True)
        assert [r.state for r in t.recipients] == [STORED] * 3
        assert all(r.stored_at == T0 for r in t.recipients)
        await store.delivered_many([(TILL, 0, 1, 1), (TILL2, 0, 1, 1)], T0 + 1)
        await store.ack_many([(TILL, 0, 1)], T0 + 2)
        await store.reject(TILL2, 0, 1, "bad", T0 + 3)
        await store.expire(T0 + 60)
        t = await store.trace(a.msg_id)
        r1, r2, r3 = t.recipients
        assert (r1.state, r1.delivered_at, r1.acked_at, r1.ended_at) == (ACKED, T0 + 1, T0 + 2, None)
        assert (r2.state, r2.delivered_at, r2.ended_at, r2.reason) == (REJECTED, T0 + 1, T0 + 3, "bad")
        assert (r3.state, r3.delivered_at, r3.ended_at, r3.reason) == (EXPIRED, None, T0 + 60, "ttl")
        d = t.to_dict()
        assert d["id"] == str(a.msg_id) and d["lane"] == "P0" and len(d["recipients"]) == 3
    run_with(store_factory, body)


def test_dead_letters_newest_first_by_tenant(store_factory):
    other = "terminal:acme2/till1"           # a tenant whose name extends "acme"

    async def body(store):
        await store.accept_many([(msg(1, ttl=1), [TILL]), (msg(2, ttl=1), [other]),
                                 (msg(3, ttl=1), [TILL2]), (msg(4, ttl=1), ["terminal:zeta/x"])])
        await store.expire(T0 + 2)
        assert [d.ref for d in await store.dead_letters(None, 10)] == [4, 3, 2, 1]
        assert [d.ref for d in await store.dead_letters("acme", 10)] == [3, 1]
        assert [d.ref for d in await store.dead_letters("acme", 1)] == [3]
        assert [d.ref for d in await store.dead_letters("acme2", 10)] == [2]
        assert await store.dead_letters("nobody", 10) == []
    run_with(store_factory, body)


def test_redrive_puts_a_dead_letter_back_as_a_new_entry(store_factory):
    LONG = 100_000.0

    async def body(store):
        got = await store.accept_many([
            (msg(1), [TILL]), (msg(2, ttl=LONG), [TILL]), (msg(3, lane=1, ttl=10), [TILL]),
            (msg(4, to="store:acme/s1", ttl=LONG), [TILL, TILL2]),
        ])
        ids = [a.msg_id for a in got]
        await store.delivered_many([(TILL, 0, 1, 2)], T0 + 1)
        await store.reject(TILL, 0, 1, "out of paper", T0 + 2)
        [expired] = await store.expire(T0 + 10)                  # the P1 one
        ttls = (100.0, 200.0)
        now = T0 + 5000
        assert await store.redrive(TILL, 999_999, now, ttls, 10) == []   # no such dead letter
        assert await store.redrive(TILL2, ids[0], now, ttls, 10) == []   # not this terminal's
        [r] = await store.redrive(TILL, ids[0], now, ttls, 10)
        assert (r.msg_id, r.terminal, r.lane, r.dead_seq, r.seq, r.kind, r.body, r.created,
                r.expires) == (ids[0], TILL, 0, 1, 4, "payment.result", b'{"n":1}', T0,
                               now + 100.0)
        # A new entry: the inbox's next seq, the same message, not delivered yet.
        entries = await store.inbox(TILL, 0, 0, 10)
        assert [(e.seq, e.msg_id, e.delivered) for e in entries] == \
            [(2, ids[1], True), (3, ids[3], False), (4, ids[0], False)]
        assert entries[-1].body == b'{"n":1}' and entries[-1].expires == now + 100.0
        assert entries[-1].created == T0
        assert await store.positions(TILL) == (0, 4, 0, 1)
        # The trace keeps the dead entry and shows the new one after it.
        t = await store.trace(ids[0])
        assert [(x.terminal, x.seq, x.state, x.reason) for x in t.recipients] == \
            [(TILL, 1, REJECTED, "out of paper"), (TILL, 4, STORED, "redriven")]
        assert t.expires == now + 100.0
        # It left the dead letters, and comes back only once.
        assert [d.msg_id for d in await store.dead_letters(None, 10)] == [expired.msg_id]
        assert await store.redrive(TILL, ids[0], now, ttls, 10) == []
        # Delivered and acked like any entry; seqs are never reused.
        assert await seqs_of(store, [(msg(9, ttl=LONG), [TILL])]) == [{TILL: 5}]
        await store.delivered_many([(TILL, 0, 2, 4)], now + 1)
        await store.ack_many([(TILL, 0, 4)], now + 2)
        t = await store.trace(ids[0])
        assert [(x.seq, x.state) for x in t.recipients] == [(1, REJECTED), (4, ACKED)]
        assert t.recipients[1].acked_at == now + 2
        # All of a terminal's: the expired P1 entry, with its lane's TTL from now.
        [r2] = await store.redrive(TILL, None, now, ttls, 10)
        assert (r2.msg_id, r2.lane, r2.dead_seq, r2.seq, r2.expires) == \
            (ids[2], 1, 1, 2, now + 200.0)
        assert await store.dead_letters(None, 10) == []
        assert await store.expire(now + 199) == []
        [again] = await store.expire(now + 200)                 # it can go dead again
        assert (again.msg_id, again.lane, again.seq, again.reason) == (ids[2], 1, 2, "ttl")
        assert (await store.stats())["dead_letters"] == 1
    run_with(store_factory, body)


def test_redrive_all_goes_oldest_first_up_to_the_limit(store_factory):
    async def body(store):
        got = await store.accept_many([(msg(i), [TILL]) for i in range(1, 5)]
                                      + [(msg(5), [TILL2])])
        ids = [a.msg_id for a in got]
        for seq, at in ((3, 1), (1, 2), (2, 3)):
            await store.reject(TILL, 0, seq, f"no {seq}", T0 + at)
        await store.reject(TILL2, 0, 1, "other", T0 + 4)
        first = await store.redrive(TILL, None, T0 + 10, (60.0, 60.0), 2)
        assert [(r.msg_id, r.dead_seq, r.seq) for r in first] == [(ids[2], 3, 5), (ids[0], 1, 6)]
        rest = await store.redrive(TILL, None, T0 + 10, (60.0, 60.0), 2)
        assert [(r.msg_id, r.dead_seq, r.seq) for r in rest] == [(ids[1], 2, 7)]
        assert await store.redrive(TILL, None, T0 + 10, (60.0, 60.0), 2) == []
        assert [(d.terminal, d.msg_id) for d in await store.dead_letters(None, 10)] == \
            [(TILL2, ids[4])]
        assert [e.seq for e in await store.inbox(TILL, 0, 0, 10)] == [4, 5, 6, 7]
    run_with(store_factory, body)


def test_redrive_and_trim(store_factory):
    async def body(store):
        [a, b] = await store.accept_many([(msg(1), [TILL]), (msg(2), [TILL2])])
        await store.reject(TILL, 0, 1, "no", T0 + 1)
        await store.reject(TILL2, 0, 1, "no", T0 + 1)
        [r] = await store.redrive(TILL, a.msg_id, T0 + 2, (3600.0, 3600.0), 10)
        # The redriven entry keeps its message while it waits.
        assert await store.trim(T0 + 500, 100) == 1              # b only
        assert [x.state for x in (await store.trace(a.msg_id)).recipients] == [REJECTED, STORED]
        await store.ack_many([(TILL, 0, r.seq)], T0 + 600)
        assert await store.trim(T0 + 650, 100) == 0
        assert await store.trim(T0 + 701, 100) == 1
        assert await store.trace(a.msg_id) is None
        # A dead letter whose message was trimmed cannot come back: it stays listed.
        assert await store.redrive(TILL2, b.msg_id, T0 + 800, (3600.0, 3600.0), 10) == []
        assert [d.msg_id for d in await store.dead_letters(None, 10)] == [b.msg_id]
        assert await store.inbox(TILL2, 0, 0, 10) == []
    run_with(store_factory, body)


def test_trim_deletes_only_what_is_done_and_old(store_factory):
    async def body(store):
        got = await store.accept_many([
            (msg(1), [TILL]), (msg(2), [TILL]),
            (msg(3, to="store:acme/s1"), [TILL, TILL2]),
            (msg(0, ttl=5), [TILL2]), (msg(0, to=TILL2), [TILL2]),
        ])
        ids = [a.msg_id for a in got]
        await store.delivered_many([(TILL, 0, 1, 3)], T0 + 5)
        await store.ack_many([(TILL, 0, 3)], T0 + 10)
        await store.reject(TILL2, 0, 1, "no", T0 + 10)        # msg 3 at till2: done by rejection
        await store.expire(T0 + 10)                            # the ttl=5 one at till2
        assert await store.trim(T0 + 50, 100) == 0             # nothing old enough yet
        assert await store.trim(T0 + 110, 100) == 4            # 1, 2, 3 (group) and the expired one
        for i in range(4):
            assert await store.trace(ids[i]) is None
        assert (await store.trace(ids[4])).recipients[0].state == STORED
        assert await store.trim(T0 + 10_000, 100) == 0          # the pending one stays
        # Inboxes are intact: positions, replay, and seqs are never reused.
        assert await store.positions(TILL) == (3, 3, 0, 0)
        assert await store.positions(TILL2) == (0, 3, 0, 0)
        assert [e.seq for e in await store.inbox(TILL2, 0, 0, 10)] == [3]
        assert await seqs_of(store, [(msg(10), [TILL]), (msg(11), [TILL2])]) == \
            [{TILL: 4}, {TILL2: 4}]
        [again] = await store.accept_many([(msg(1, created=T0 + 200), [TILL])])
        assert again.duplicate and again.msg_id == ids[0]         # dedup outlives the trim
        later = await store.accept_many([(msg(12), [TILL])])
        assert later[0].msg_id > max(ids) + 2                     # msg_ids are never reused
        dead = await store.dead_letters(None, 10)
        assert len(dead) == 2                                     # dead letters stay
    run_with(store_factory, body)


def test_trim_keeps_a_group_message_until_every_recipient_is_done(store_factory):
    async def body(store):
        [a] = await store.accept_many([(msg(1, to="store:acme/s1"), [TILL, TILL2])])
        await store.delivered_many([(TILL, 0, 1, 1)], T0 + 1)
        await store.ack_many([(TILL, 0, 1)], T0 + 2)
        assert await store.trim(T0 + 500, 100) == 0
        t = await store.trace(a.msg_id)
        assert [(r.state, r.delivered_at, r.acked_at) for r in t.recipients] == \
            [(ACKED, T0 + 1, T0 + 2), (STORED, None, None)]
        await store.ack_many([(TILL2, 0, 1)], T0 + 600)
        assert await store.trim(T0 + 650, 100) == 0
        assert await store.trim(T0 + 701, 100) == 1
        assert await store.trace(a.msg_id) is None
        assert (await store.stats())["messages"] == 0
    run_with(store_factory, body)


def test_stats(store_factory):
    async def body(store):
        await store.accept_many([(msg(i), [TILL, TILL2]) for i in range(1, 4)])
        await store.ack_many([(TILL, 0, 2)], T0 + 1)
        await store.reject(TILL2, 0, 1, "x", T0 + 1)
        await store.terminals.register(TerminalRecord(TILL, "acme", "till1", "s1", "", ("till",)))
        stats = await store.stats()
        assert stats["backend"] == store_factory.backend.split("-")[0]
        if store_factory.backend.startswith("sqlite"):
            assert stats["writer"] == ("thread" if store_factory.backend == "sqlite-thread"
                                       else "process")
            # A writer process freezes what it loaded (gcpolicy); a thread leaves it be.
            frozen = stats["writer_gc_frozen_objects"]
            assert frozen == 0 if stats["writer"] == "thread" else frozen > 1_000
        assert (stats["messages"], stats["unacked"], stats["dead_letters"], stats["terminals"]) == \
            (3, 3, 1, 1)
        assert stats["bytes"] > 0
    run_with(store_factory, body)


# --------------------------------------------------------------------------
# SQLite only


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "data" / DB_FILENAME)


def sqlite_run(path, body, **kw):
    kw.setdefault("synchronous", "FULL")
    return run_with(lambda **k: make_backend("sqlite", path, **k), body, **kw)


def test_sqlite_state_survives_close_and_reopen(db_path):
    async def first(store):
        got = await store.accept_many([(msg(i, receipt=True), [TILL]) for i in range(1, 6)]
                                      + [(msg(9, ttl=1), [TILL2])])
        await store.delivered_many([(TILL, 0, 1, 3)], T0 + 1)
        await store.ack_many([(TILL, 0, 2)], T0 + 2)
        await store.expire(T0 + 5)
        await store.terminals.register(TerminalRecord(TILL, "acme", "till1", "s1", "", ("till",),
                                                      first_seen=T0))
        await store.terminals.retire(TILL, True)
        return store.epoch, [a.msg_id for a in got]

    epoch, ids = sqlite_run(db_path, first)
    assert sorted(os.listdir(os.path.dirname(db_path))) == [DB_FILENAME]   # WAL checkpointed

    async def second(store):
        assert store.epoch == epoch
        assert await store.positions(TILL) == (2, 5, 0, 0)
        entries = await store.inbox(TILL, 0, 0, 10)
        assert [(e.seq, e.msg_id, e.delivered) for e in entries] == \
            [(3, ids[2], True), (4, ids[3], False), (5, ids[4], False)]
        assert [r.msg_id for r in await store.ack_many([(TILL, 0, 5)], T0 + 6)] == ids[2:5]
        assert [d.msg_id for d in await store.dead_letters(None, 5)] == [ids[5]]
        assert (await store.terminals.get(TILL)).retired
        [dup] = await store.accept_many([(msg(3, created=T0 + 10), [TILL])])
        assert dup.duplicate and dup.msg_id == ids[2]
        [new] = await store.accept_many([(msg(10), [TILL])])
        assert new.seqs == {TILL: 6} and new.msg_id == ids[-1] + 1
        t = await store.trace(ids[0])
        assert (t.recipients[0].state, t.recipients[0].acked_at) == (ACKED, T0 + 2)

    sqlite_run(db_path, second)


def _inbox_tables(path: str) -> tuple[int, int]:
    """(rows in inbox, rows in inbox_staged) as committed, read from the file."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return tuple(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                     for t in ("inbox", "inbox_staged"))
    finally:
        conn.close()


def test_sqlite_staged_inbox_entries_merge_in_bulk_and_read_as_one_inbox(db_path):
    """Accepts stage their inbox rows; past stage_rows the writer moves them to
    inbox.  Replay pages, positions, receipts, traces and stats see one inbox
    whichever table an entry is in, and an open merges what a crash left staged."""
    async def first(store):
        ids = []
        for i in range(1, 4):
            [a] = await store.accept_many([(msg(i, receipt=True), [TILL])])
            ids.append(a.msg_id)
        assert _inbox_tables(db_path) == (0, 3)
        assert [e.seq for e in await store.inbox(TILL, 0, 0, 10)] == [1, 2, 3]
        assert await store.positions(TILL) == (0, 3, 0, 0)
        got = await store.accept_many([(msg(i, receipt=True), [TILL]) for i in (4, 5)])
        ids += [a.msg_id for a in got]
        await store.ack_many([(TILL, 0, 0)], T0)    # a write: runs after the merge
        assert _inbox_tables(db_path) == (5, 0)
        got = await store.accept_many([(msg(i, receipt=True), [TILL]) for i in (6, 7)])
        ids += [a.msg_id for a in got]
        assert _inbox_tables(db_path) == (5, 2)
        # A page across the two tables, in seq order.
        assert [e.seq for e in await store.inbox(TILL, 0, 3, 3)] == [4, 5, 6]
        assert [e.msg_id for e in await store.inbox(TILL, 0, 0, 10)] == ids
        assert await store.positions(TILL) == (0, 7, 0, 0)
        assert (await store.stats())["unacked"] == 7
        assert (await store.trace(ids[6])).recipients[0].state == STORED
        # First deliveries and acks spanning both tables: receipts in seq order.
        delivered = await store.delivered_many([(TILL, 0, 4, 7)], T0 + 1)
        assert [r.msg_id for r in delivered] == ids[3:7]
        assert (await store.trace(ids[6])).recipients[0].state == DELIVERED
        acked = await store.ack_many([(TILL, 0, 6)], T0 + 2)
        assert [r.msg_id for r in acked] == ids[:6]
        assert (await store.stats())["unacked"] == 1
        return ids

    ids = sqlite_run(db_path, first, stage_rows=4)
    assert _inbox_tables(db_path) == (5, 2)        # closed with two entries staged

    async def second(store):
        assert _inbox_tables(db_path) == (7, 0)    # merged at open
        assert await store.positions(TILL) == (6, 7, 0, 0)
        assert [(e.seq, e.msg_id) for e in await store.inbox(TILL, 0, 0, 10)] == [(7, ids[6])]
        [a] = await store.accept_many([(msg(8), [TILL])])
        assert a.seqs == {TILL: 8}
        # Requests that change entries merge first: a reject of a staged entry.
        dead = await store.reject(TILL, 0, 8, "refused", T0 + 3)
        assert dead is not None and dead.msg_id == a.msg_id
        assert _inbox_tables(db_path) == (8, 0)
        assert [e.seq for e in await store.inbox(TILL, 0, 0, 10)] == [7]
        # A reject of a merged entry leaves the staged ones where they are.
        await store.accept_many([(msg(9), [TILL])])
        assert (await store.reject(TILL, 0, 7, "refused", T0 + 4)).msg_id == ids[6]
        assert _inbox_tables(db_path) == (8, 1)
        assert [e.seq for e in await store.inbox(TILL, 0, 0, 10)] == [9]

    sqlite_run(db_path, second, stage_rows=100)


def test_sqlite_group_commit_shares_commits(db_path):
    async def body(store):
        before = (await store.stats())["commits"]
        batches = [[(msg(100 * b + i), [f"terminal:acme/till{i}"]) for i in range(20)]
                   for b in range(10)]
        results = await asyncio.gather(*(store.accept_many(b) for b in batches),
                                       store.ack_many([(TILL, 0, 1)], T0 + 1))
        stats = await store.stats()
        assert stats["commits"] - before < 5 and stats["accepted"] == 200
        assert [r.msg_id for r in results[0]] == list(range(1, 21))
        assert all(not a.duplicate for res in results[:10] for a in res)
        return stats["write_requests"]

    assert sqlite_run(db_path, body, group_commit_ms=30.0) >= 11


def test_sqlite_a_failing_request_does_not_fail_its_batch(db_path):
    async def body(store):
        good1, bad, good2 = await asyncio.gather(
            store.accept_many([(msg(1), [TILL])]),
            store.accept_many([(msg(2), [TILL]), (msg(3, lane=5), [TILL])]),
            store.accept_many([(msg(4), [TILL])]),
            return_exceptions=True)
        assert isinstance(bad, ValueError)
        assert good1[0].seqs == {TILL: 1} and good2[0].seqs == {TILL: 2}
        assert good2[0].msg_id == good1[0].msg_id + 1     # the failed one left no trace
        assert await store.positions(TILL) == (0, 2, 0, 0)
        [again] = await store.accept_many([(msg(2), [TILL])])
        assert not again.duplicate and again.seqs == {TILL: 3}

    sqlite_run(db_path, body, group_commit_ms=50.0)


def test_sqlite_history_appends_commit_after_the_messages_of_their_batch(db_path):
    # One group commit gathers three P3 history appends and a P0 message: the
    # message commits first (its sender waits for it); the history waits until
    # no other request is queued and commits in a transaction of its own.
    async def body(store):
        store.archive.configure(10, 3600.0)
        before = (await store.stats())["commits"]
        for i in range(1, 4):
            store.archive.append("tenant:acme", 3, store.epoch, stream_entry(i, kind="note"))
        [accepted] = await store.accept_many([(msg(1), [TILL])])
        assert await store.positions(TILL) == (0, 1, 0, 0) and accepted.seqs == {TILL: 1}
        deadline = time.monotonic() + 10
        while not (states := await store.archive.load(10, 86400.0, T0 + 1)):
            assert time.monotonic() < deadline, "the history was never written"
            await asyncio.sleep(0.01)
        assert [e.offset for e in states[0].history] == [1, 2, 3]
        await store.records.put("ns", "k", b"v", T0)     # a commit of its own (and fresh counters)
        assert (await store.stats())["commits"] - before == 3

    sqlite_run(db_path, body, group_commit_ms=50.0)


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_sqlite_history_waiting_at_a_stop_is_written(db_path, writer):
    async def first(store):
        store.archive.configure(10, 3600.0)
        for i in range(1, 301):
            store.archive.append("tenant:acme", 3, store.epoch, stream_entry(i, kind="note"))
        await store.accept_many([(msg(1), [TILL])])

    async def second(store):
        [state] = await store.archive.load(1000, 86400.0, T0 + 1)
        assert [e.offset for e in state.history] == list(range(291, 301))

    sqlite_run(db_path, first, group_commit_ms=50.0, writer=writer)
    sqlite_run(db_path, second, writer=writer)


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_sqlite_a_failed_history_append_leaves_later_commits_working_and_synced(db_path, writer):
    # A history append that fails (its payload is not bytes) in the same batch
    # as a P0 message: the message commits; the history transaction fails
    # alone; later commits work, still with synchronous FULL.
    async def body(store):
        store.archive.append("tenant:acme", 3, store.epoch,
                             StreamEntry(1, "note", "", 0, None, T0, 0.0))
        [first] = await store.accept_many([(msg(1), [TILL])])
        [second] = await store.accept_many([(msg(2), [TILL])])
        assert (first.seqs, second.seqs) == ({TILL: 1}, {TILL: 2})
        stats = await store.stats()
        assert stats["synchronous"] == "FULL" and stats["failed_commits"] == 0

    sqlite_run(db_path, body, group_commit_ms=50.0, writer=writer)
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 2
    finally:
        conn.close()


def test_sqlite_writer_process_logs_in_the_servers_format(db_path, capfd):
    # The writer process logs to the stderr it shares with the server, in the
    # server's format (JSON lines here) and marked as its own.
    root = logging.getLogger("tillwire")
    saved = root.handlers[:], root.level, root.propagate
    logs.configure("json", "info")
    try:
        async def body(store):
            store.archive.append("tenant:acme", 3, store.epoch,
                                 StreamEntry(1, "note", "", 0, None, T0, 0.0))   # fails
            await store.accept_many([(msg(1), [TILL])])

        sqlite_run(db_path, body, writer="process")
    finally:
        root.handlers[:], root.level, root.propagate = saved
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    records = [orjson.loads(line) for line in lines if '"store-writer"' in line]
    assert {r["process"] for r in records} == {"store-writer"}
    # At the server's level: its migrations (info) and the failed append (error).
    assert any(r["level"] == "info" and "schema migrated to v5" in r["msg"] for r in records)
    [error] = [r for r in records if r["level"] == "error"]
    assert error["logger"] == "tillwire.store.sqlite" and "stream_append" in error["msg"]


def test_sqlite_a_failed_commit_fails_the_whole_batch(db_path):
    async def body(store):
        writer = store._writer                # failure injection: the flush before COMMIT
        real_flush = writer._flush

        def failing_flush():
            writer._flush = real_flush
            raise sqlite3.OperationalError("disk I/O error (injected)")

        await store.accept_many([(msg(1), [TILL])])
        writer._flush = failing_flush
        results = await asyncio.gather(
            store.accept_many([(msg(2), [TILL])]), store.accept_many([(msg(3), [TILL2])]),
            store.ack_many([(TILL, 0, 1)], T0 + 1), return_exceptions=True)
        assert all(isinstance(r, sqlite3.OperationalError) for r in results), results
        # Nothing of that batch is stored; the store goes on from where it was.
        assert await store.positions(TILL) == (0, 1, 0, 0)
        assert await store.positions(TILL2) == (0, 0, 0, 0)
        [again] = await store.accept_many([(msg(2), [TILL])])
        assert (again.duplicate, again.msg_id, again.seqs) == (False, 2, {TILL: 2})
        assert (await store.stats())["failed_commits"] == 1

    sqlite_run(db_path, body, group_commit_ms=50.0, synchronous="NORMAL", writer="thread")


async def eventually_true(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "never became true"
        await asyncio.sleep(0.01)


def test_sqlite_writer_process_death_fails_requests_instead_of_hanging(db_path):
    from tillwire.server.store_writer import WriterGone

    async def body(store):
        proc = store._writer._proc           # the writer process of this store
        # A SIGTERM or SIGINT to the whole process group (a service manager
        # stopping the server, a Ctrl-C) leaves it to the server to stop it.
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGINT)
        await asyncio.sleep(0.2)
        await store.accept_many([(msg(1), [TILL])])
        assert store.write_failure == ""
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        await eventually_true(lambda: store.write_failure)   # what /readyz reports
        with pytest.raises(WriterGone):
            await asyncio.wait_for(store.accept_many([(msg(2), [TILL])]), 10)
        with pytest.raises(WriterGone):      # and every later one, at once
            await asyncio.wait_for(store.ack_many([(TILL, 0, 1)], T0 + 1), 10)
        assert await store.positions(TILL) == (0, 1, 0, 0)   # reads still answer

    sqlite_run(db_path, body)

    async def reopened(store):               # what was committed is all there
        return await store.positions(TILL)

    assert sqlite_run(db_path, reopened) == (0, 1, 0, 0)


def test_sqlite_never_blocks_the_event_loop(db_path):
    async def body(store):
        ticks = 0
        done = False

        async def spin():
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        spinner = asyncio.ensure_future(spin())
        await asyncio.sleep(0)
        got = await store.accept_many([(msg(i + 1, to=f"terminal:acme/t{i % 50}"),
                                        [f"terminal:acme/t{i % 50}"]) for i in range(5000)])
        done = True
        await spinner
        assert len(got) == 5000
        # The loop kept turning while the writer thread stored 5000 messages.
        assert ticks > 10

    sqlite_run(db_path, body)


def test_sqlite_refuses_bad_settings_and_use_before_open(db_path):
    with pytest.raises(ValueError):
        SQLiteStore(db_path, synchronous="SOMETIMES")
    with pytest.raises(ValueError):
        SQLiteStore(db_path, group_commit_ms=-1)

    async def main():
        store = SQLiteStore(db_path)
        with pytest.raises(RuntimeError):
            await store.positions(TILL)
        await store.open()
        await store.close()
        with pytest.raises(RuntimeError):
            await store.accept_many([(msg(1), [TILL])])
        store.archive.append("x", 2, 1, stream_entry(1))          # ignored once closed
    asyncio.run(main())


def _build_v1_database(path: str) -> None:
    """A database as the first release wrote it: schema v1 only, rows by hand."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn, 1) == 1 and schema_version(conn) == 1
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO meta VALUES (?, ?)", [("epoch", 4242), ("created", T0)])
    conn.execute("INSERT INTO terminals(tid, address, tenant, terminal, store, roles, first_seen, "
                 "registered) VALUES (1, ?, 'acme', 'till1', 's1', '[\"till\"]', ?, 1)", (TILL, T0))
    conn.execute("INSERT INTO terminals(tid, address) VALUES (2, ?)", (TILL2,))
    for i in range(1, 6):              # messages 1-5 to till1 P0 (seq i), 5 with a receipt
        recipients = f"1:{i}" if i < 5 else "1:5,2:1"
        conn.execute("INSERT INTO messages VALUES (?, 'acme', ?, ?, 0, 'payment.result', ?, ?, ?, ?, "
                     "?, ?)", (i, PAY, i, TILL, b'{"v1":%d}' % i, T0, T0 + TTL, int(i == 5),
                               recipients))
        conn.execute("INSERT INTO inbox(k, msg_id) VALUES (?, ?)", ((1 << 41) | i, i))
    conn.execute("INSERT INTO inbox(k, msg_id) VALUES (?, 5)", ((2 << 41) | 1,))
    conn.execute("INSERT INTO cursors VALUES (2, 5, 2, 3)")          # till1 P0: acked 2, delivered 3
    conn.execute("INSERT INTO rangelog VALUES (1, 0, 2, 1, 2, ?)", (T0 + 1,))
    conn.execute("COMMIT")
    conn.close()


def test_sqlite_migration_from_v1_keeps_every_message(db_path):
    _build_v1_database(db_path)

    async def body(store):
        assert store.epoch == 4242
        stats = await store.stats()
        assert (stats["schema_version"], stats["messages"], stats["unacked"]) == (SCHEMA_VERSION, 5, 4)
        assert await store.positions(TILL) == (2, 5, 0, 0)
        assert [(e.seq, e.msg_id, e.body, e.delivered) for e in await store.inbox(TILL, 0, 0, 10)] == \
            [(3, 3, b'{"v1":3}', True), (4, 4, b'{"v1":4}', False), (5, 5, b'{"v1":5}', False)]
        assert [e.msg_id for e in await store.inbox(TILL2, 0, 0, 10)] == [5]
        # The receipt flag was backfilled into the new inbox column.
        assert [(r.msg_id, r.ref) for r in await store.ack_many([(TILL, 0, 5)], T0 + 2)] == [(5, 5)]
        t = await store.trace(1)
        assert (t.recipients[0].state, t.recipients[0].acked_at) == (ACKED, T0 + 1)
        [dup] = await store.accept_many([(msg(4, created=T0 + 5), [TILL])])
        assert dup.duplicate and dup.msg_id == 4
        [new] = await store.accept_many([(msg(6), [TILL])])
        assert (new.msg_id, new.seqs) == (6, {TILL: 6})
        assert [r.address for r in await store.terminals.all()] == [TILL]
        assert len(await store.expire(T0 + TTL)) == 2     # v1 entries expire like new ones

    sqlite_run(db_path, body)
    conn = sqlite3.connect(db_path)
    assert schema_version(conn) == SCHEMA_VERSION
    conn.close()


def test_sqlite_refuses_a_newer_schema(db_path):
    sqlite_run(db_path, lambda store: asyncio.sleep(0))
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,))
    conn.close()

    async def main():
        with pytest.raises(RuntimeError, match="newer"):
            await SQLiteStore(db_path).open()
    asyncio.run(main())


async def _keep_writing(store, stop: asyncio.Event, counter: list) -> None:
    i = 0
    while not stop.is_set():
        res = await store.accept_many([(msg(10_000 + i + j, to=f"terminal:acme/t{j % 13}"),
                                        [f"terminal:acme/t{j % 13}"]) for j in range(50)])
        i += 50
        counter[0] = res[-1].msg_id


def _count_messages(path: str) -> int:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    finally:
        conn.close()


def test_sqlite_online_backup_while_writing(db_path, tmp_path):
    copy = str(tmp_path / "copy.db")

    async def body(store):
        stop = asyncio.Event()
        counter = [0]
        writer = asyncio.ensure_future(_keep_writing(store, stop, counter))
        while counter[0] < 500:
            await asyncio.sleep(0.01)
        seen = counter[0]
        await store.backup(copy)
        await asyncio.sleep(0.05)
        stop.set()
        await writer
        return seen, counter[0]

    seen, final = sqlite_run(db_path, body, synchronous="NORMAL")
    assert seen <= _count_messages(copy) <= final
    assert not [f for f in os.listdir(tmp_path) if f.startswith("copy.db") and f != "copy.db"]

    async def check(store):           # the copy is a working store
        assert (await store.trace(seen)).msg_id == seen
    sqlite_run(copy, check)


@pytest.mark.slow
def test_sqlite_backup_command_in_another_process(db_path, tmp_path):
    out = str(tmp_path / "backup" / "snap.db")
    os.makedirs(os.path.dirname(out))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLWIRE_")}
    cmd = [sys.executable, "-m", "tillwire", "backup", "--data-dir", os.path.dirname(db_path),
           "--out", out]

    async def body(store):
        stop = asyncio.Event()
        counter = [0]
        writer = asyncio.ensure_future(_keep_writing(store, stop, counter))
        while counter[0] < 300:
            await asyncio.sleep(0.01)
        seen = counter[0]
        proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE)
        stdout, stderr = await proc.communicate()
        stop.set()
        await writer
        return seen, counter[0], proc.returncode, stderr.decode()

    seen, final, rc, stderr = sqlite_run(db_path, body, synchronous="NORMAL")
    assert rc == 0, stderr
    assert "snap.db" in stderr
    assert seen <= _count_messages(out) <= final
    # No database there: a clear failure, exit code 1, nothing written.
    missing = subprocess.run([sys.executable, "-m", "tillwire", "backup", "--data-dir",
                              str(tmp_path / "none"), "--out", str(tmp_path / "x.db")],
                             env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no store database" in missing.stderr
    assert not os.path.exists(tmp_path / "x.db")
    # backup_file works on a stopped store too.
    backup_file(db_path, str(tmp_path / "cold.db"))
    assert _count_messages(str(tmp_path / "cold.db")) == _count_messages(db_path)


_CRASH_CHILD = textwrap.dedent("""
    import asyncio, sys
    from tillwire.server.store import NewMessage
    from tillwire.server.store_sqlite import SQLiteStore

    async def pipeline(store, lane, first):
        ref = first
        while True:
            batch = []
            for j in range(25):
                to = "terminal:acme/till%d" % (ref % 7)
                batch.append((NewMessage("acme", "terminal:acme/pay", ref, lane, "k", to,
                                         b'{"ref":%d}' % ref, 1.0e9, 2.0e9), [to]))
                ref += 1
            for acc, (m, rcpt) in zip(await store.accept_many(batch), batch):
                seq = acc.seqs[rcpt[0]]
                sys.stdout.write("%d %s %d %d\\n" % (acc.msg_id, rcpt[0], lane, seq))
            sys.stdout.flush()

    async def main():
        store = SQLiteStore(sys.argv[1], synchronous="FULL", group_commit_ms=1.0)
        await store.open()
        print("open", flush=True)
        await asyncio.gather(pipeline(store, 0, 1), pipeline(store, 1, 10**9))

    asyncio.run(main())
""")


@pytest.mark.slow
def test_sqlite_survives_sigkill_mid_write(db_path, tmp_path):
    """Every msg_id the child printed (after accept_many returned) is in the database."""
    script = tmp_path / "child.py"
    script.write_text(_CRASH_CHILD)
    os.makedirs(os.path.dirname(db_path))
    proc = subprocess.Popen([sys.executable, str(script), db_path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 30
    try:
        assert proc.stdout.readline().strip() == "open", proc.stderr.read()
        while len(lines) < 400 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    lines += rest.splitlines(keepends=True)
    printed = [line.split() for line in lines if line.endswith("\n")]
    assert len(printed) >= 400

    async def check(store):
        last_seq: dict[tuple[str, int], int] = {}
        for msg_id, terminal, lane, seq in printed:
            trace = await store.trace(int(msg_id))
            assert trace is not None, f"msg {msg_id} was acknowledged but lost"
            assert [(r.terminal, r.seq) for r in trace.recipients] == [(terminal, int(seq))]
            key = (terminal, int(lane))
            last_seq[key] = max(last_seq.get(key, 0), int(seq))
        for (terminal, lane), top in last_seq.items():
            acked0, last0, acked1, last1 = await store.positions(terminal)
            last = last1 if lane else last0
            assert last >= top
            seqs = [e.seq for e in await store.inbox(terminal, lane, 0, 100_000)]
            assert seqs == list(range(1, last + 1))          # no hole, nothing lost
            [new] = await store.accept_many([(msg(0, to=terminal, lane=lane), [terminal])])
            assert new.seqs == {terminal: last + 1}           # no seq handed out twice

    sqlite_run(db_path, check)


# --------------------------------------------------------------------------
# Differential: the memory, SQLite and Redis backends answer the same operations alike


TERMINALS = [TILL, TILL2, "terminal:acme/till3"]
_terminal = st.sampled_from(TERMINALS)
_lane = st.integers(0, 1)
_ops = st.lists(st.one_of(
    st.tuples(st.just("accept"), st.lists(st.tuples(
        st.sampled_from([PAY, "terminal:acme/pay2"]), st.integers(0, 4), _lane,
        st.lists(_terminal, min_size=1, max_size=4), st.booleans(), st.sampled_from([5.0, 40.0])),
        min_size=1, max_size=4)),
    st.tuples(st.just("ack"), st.lists(st.tuples(_terminal, _lane, st.integers(0, 9)), max_size=3)),
    st.tuples(st.just("delivered"), st.lists(st.tuples(_terminal, _lane, st.integers(1, 9)),
                                             max_size=3)),
    st.tuples(st.just("reject"), _terminal, _lane, st.integers(1, 9)),
    st.tuples(st.just("expire")),
    st.tuples(st.just("trim"), st.sampled_from([0.0, 10.0, 30.0])),
    st.tuples(st.just("tick"), st.sampled_from([1.0, 7.0, 25.0])),
    st.tuples(st.just("redrive"), _terminal, st.sampled_from([1, 5])),
    st.tuples(st.just("redrive_one"), _terminal),
), min_size=1, max_size=30)


async def _apply(store, ops) -> list:
    out = []
    now = T0
    ids = set()
    for op in ops:
        # Every call happens at its own time, as with a real clock (a dead
        # entry's delivery counts only if it came before its end).
        now += 0.001
        name = op[0]
        if name == "accept":
            items = [(msg(ref, sender=sender, lane=lane, to=rcpt[0], created=now, ttl=ttl,
                          receipt=receipt), rcpt)
                     for sender, ref, lane, rcpt, receipt, ttl in op[1]]
            res = await store.accept_many(items)
            ids.update(a.msg_id for a in res)
            out.append(res)
        elif name == "ack":
            out.append(await store.ack_many(op[1], now))
        elif name == "delivered":
            # The node delivers in order: a range starts at the first unacked seq.
            ranges = []
            for terminal, lane, last in op[1]:
                pos = await store.positions(terminal)
                ranges.append((terminal, lane, pos[2 * lane] + 1, last))
            out.append(await store.delivered_many(ranges, now))
        elif name == "reject":
            out.append(await store.reject(op[1], op[2], op[3], "refused", now))
        elif name == "expire":
            out.append(await store.expire(now))
        elif name == "trim":
            out.append(await store.trim(now, op[1]))
        elif name == "redrive":
            out.append(await store.redrive(op[1], None, now, (20.0, 40.0), op[2]))
        elif name == "redrive_one":
            # The terminal's oldest dead letter (both backends list the same).
            mine = [d.msg_id for d in await store.dead_letters(None, 100) if d.terminal == op[1]]
            if mine:
                out.append(await store.redrive(op[1], mine[-1], now, (20.0, 40.0), 1))
        else:
            now += op[1]
    for terminal in TERMINALS:
        out.append(await store.positions(terminal))
        for lane in (0, 1):
            out.append(await store.inbox(terminal, lane, 0, 100))
    for msg_id in sorted(ids):
        out.append(await store.trace(msg_id))
    out.append(await store.dead_letters(None, 100))
    stats = await store.stats()
    out.append({k: stats[k] for k in ("messages", "unacked", "dead_letters")})
    return out


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=_ops, stage_rows=st.sampled_from([1, 2, 5, STAGE_ROWS]))
def test_memory_sqlite_and_redis_agree(tmp_path, ops, stage_rows):
    path = str(tmp_path / f"diff-{time.monotonic_ns()}.db")

    async def main():
        memory = MemoryStore(dedup_window=30.0)
        sqlite = SQLiteStore(path, synchronous="OFF", group_commit_ms=0.0, dedup_window=30.0,
                             stage_rows=stage_rows)
        redis = RedisStore(redis_url(), prefix=fresh_prefix(), dedup_window=30.0)
        for store in (memory, sqlite, redis):
            await store.open()
        try:
            return [await _apply(store, ops) for store in (memory, sqlite, redis)]
        finally:
            for store in (memory, sqlite, redis):
                await store.close()

    expected, *others = asyncio.run(main())
    for name, got in zip(("sqlite", "redis"), others):
        for i, (a, b) in enumerate(zip(expected, got)):
            assert a == b, f"{name}: result {i} differs"
        assert len(expected) == len(got)

