"""Two nodes in one process: each its own connection class, sessions, timers
and store, and nothing handed across; and two nodes sharing one presence and
one broker (what the workers of a cluster share: in memory, and in a real
redis-server), where a login on one takes the other's session over, a lost
control message is repaired by the lease renewal, and a claim the presence
refuses is retried."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import orjson
import pytest
import redis.asyncio as aioredis

from failing import Failing
from redis_server import fresh_prefix, redis_url
from support import aiotest, connect, eventually, provision, receive_orders, start_node
from tillwire.core.codes import Code
from tillwire.core.errors import SessionClosed
from tillwire.server.broker_memory import MemoryBroker, MemoryBus
from tillwire.server.broker_redis import RedisBroker
from tillwire.server.ownership import RECONCILE_EVERY, RECONCILE_GRACE, RENOTIFY
from tillwire.server.presence_memory import MemoryPresence
from tillwire.server.presence_redis import RedisPresence

TILL = "terminal:acme/t1"
SHARED = ["memory", "redis"]      # what the two nodes share: in memory, or a redis-server


@contextlib.asynccontextmanager
async def _shared_redis_pair(wrap: bool = False, registry: bool = False, **overrides):
    """Two nodes in this process sharing one Redis store, presence, broker
    and channel history (a fleet's workers); with ``wrap`` the presence is
    in a Failing fake; with ``registry`` they share a Redis registry too
    (each with its own cache); ``overrides`` are configuration keys
    (``make_config``'s).  Yields (a, b, presence)."""
    from tillwire.server.history_redis import RedisHistory
    from tillwire.server.node import Node
    from tillwire.server.registry_redis import RedisRegistry
    from tillwire.server.store_redis import RedisStore
    from support import make_config

    prefix = fresh_prefix()
    clients = [aioredis.from_url(redis_url()) for _ in range(4)]
    presence = RedisPresence(clients[0], prefix=prefix)
    if wrap:
        presence = Failing(presence)
    nodes = []
    try:
        for name, client in (("a", clients[1]), ("b", clients[2])):
            node = Node(make_config(**overrides), RedisStore(redis_url(), prefix=prefix),
                        loop=asyncio.get_running_loop(), node_id=name, presence=presence,
                        broker=RedisBroker(name, client, prefix=prefix),
                        history=RedisHistory(clients[3], prefix=prefix),
                        registry=RedisRegistry(clients[3], prefix=prefix) if registry else None)
            await node.start()
            nodes.append(node)
        yield nodes[0], nodes[1], presence
    finally:
        for node in nodes:
            await node.stop()
        for client in clients:
            await client.aclose()


@aiotest()
async def test_two_nodes_in_one_process_keep_their_terminals_apart():
    a = await start_node()
    b = await start_node()
    try:
        assert a.connection_class is not b.connection_class
        assert a.connection_class.node is a and b.connection_class.node is b
        till_a = await connect(a, "t1")
        till_b = await connect(b, "t1")          # the same terminal, on the other node
        pay_a = await connect(a, "pay", store="hq", roles=("backend",))
        pay_b = await connect(b, "pay", store="hq", roles=("backend",))
        assert type(a.hub.sessions[TILL]).node is a and type(b.hub.sessions[TILL]).node is b
        assert a.counters.takeovers == b.counters.takeovers == 0
        await pay_a.send("payment.result", {"order": "o1", "status": "paid"}, TILL)
        await pay_b.send("payment.result", {"order": "o2", "status": "paid"}, TILL)
        assert await receive_orders(till_a, 1) == [1]
        assert await receive_orders(till_b, 1) == [2]
        with pytest.raises(asyncio.TimeoutError):
            await till_a.receive(timeout=0.3)    # node b's result stays on node b
        # Stopping one node closes its terminals only.
        await a.stop()
        await pay_b.send("payment.result", {"order": "o3", "status": "paid"}, TILL)
        assert await receive_orders(till_b, 1) == [3]
        assert b.connection_count == 2 and a.connection_count == 0
    finally:
        await a.stop()
        await b.stop()


async def _owner_becomes(presence, owner, timeout: float = 3.0, terminal: str = TILL) -> None:
    """Wait until presence says ``owner`` holds ``terminal`` (claims are
    written by a task)."""
    for _ in range(int(timeout / 0.02)):
        if await presence.owner(terminal) == owner:
            return
        await asyncio.sleep(0.02)
    assert await presence.owner(terminal) == owner


async def _closed(conn, timeout: float = 3.0) -> int:
    """The code of the CLOSE that ends ``conn`` (within ``timeout``)."""
    with pytest.raises(SessionClosed) as closed:
        await conn.receive(timeout=timeout)
    return closed.value.code


@contextlib.asynccontextmanager
async def _shared_pair(kind: str, broker_of=lambda broker: broker):
    """Two nodes sharing one presence and one broker (and nothing else): in
    memory, or in a real redis-server (the fleet's way)."""
    clients = []
    if kind == "memory":
        presence, bus = MemoryPresence(), MemoryBus()
        brokers = [MemoryBroker(node_id, bus) for node_id in ("a", "b")]
    else:
        prefix = fresh_prefix()
        clients = [aioredis.from_url(redis_url()) for _ in range(3)]
        presence = RedisPresence(clients[0], prefix=prefix)
        brokers = [RedisBroker(node_id, client, prefix=prefix)
                   for node_id, client in zip(("a", "b"), clients[1:])]
    a = await start_node(node_id="a", presence=presence, broker=broker_of(brokers[0]))
    b = await start_node(node_id="b", presence=presence, broker=broker_of(brokers[1]))
    try:
        yield a, b, presence
    finally:
        await a.stop()
        await b.stop()
        for client in clients:
            await client.aclose()


@pytest.mark.parametrize("kind", SHARED)
@aiotest()
async def test_a_login_on_another_node_takes_the_session_over(kind, tmp_path):
    from tillwire.server.audit import AuditLog

    async with _shared_pair(kind) as (a, b, presence):
        a.audit = audit = AuditLog(str(tmp_path / "audit.log")).open()
        old = await connect(a, "t1")
        await _owner_becomes(presence, "a")
        new = await connect(b, "t1")
        assert await _closed(old) == Code.TAKEOVER
        assert a.counters.takeovers == 1 and TILL not in a.hub.sessions
        # Audited where the older session was, naming the worker it went to.
        audit.flush()
        raw = (tmp_path / "audit.log").read_bytes()
        lines = [orjson.loads(line) for line in raw.splitlines()]
        [line] = [line for line in lines if line["event"] == "takeover"]
        assert (line["who"], line["detail"]) == (TILL, {"worker": "b"})
        a.audit = None
        audit.close()
        assert await presence.owner(TILL) == "b"       # a's release did not undo b's claim
        # The new session works; a logout releases the lease.
        pay = await connect(b, "pay", store="hq", roles=("backend",))
        await pay.send("payment.result", {"order": "o1", "status": "paid"}, TILL)
        assert await receive_orders(new, 1) == [1]
        await new.close()
        await eventually(lambda: TILL not in b.hub.sessions)
        await _owner_becomes(presence, None)


@pytest.mark.parametrize("kind", SHARED)
@aiotest()
async def test_a_lost_takeover_message_is_repaired_by_the_next_renewal(kind):
    async with _shared_pair(kind, Failing) as (a, b, presence):
        old = await connect(a, "t1")
        b.ownership.broker.fail("send_control")      # b's word to a never arrives
        await connect(b, "t1")
        await _owner_becomes(presence, "b")            # (b's claim is written by a task)
        with pytest.raises(asyncio.TimeoutError):
            await old.receive(timeout=0.3)             # a has not heard
        assert TILL in a.hub.sessions
        await a.ownership.renew()                      # a's renewal finds the lease gone to b
        assert await _closed(old) == Code.TAKEOVER
        assert await presence.owner(TILL) == "b"


@pytest.mark.parametrize("kind", SHARED)
@aiotest()
async def test_a_renewal_keeps_a_login_whose_claim_is_not_written_yet(kind):
    # t1 moves from node a to node b.  b renews its leases while its claim
    # is not written yet (held here): presence still names a, but b's
    # session is the newer login and stays; the claim then takes t1 over
    # from a (before, the renewal closed b's session as taken over).
    async with _shared_pair(kind) as (a, b, presence):
        old = await connect(a, "t1")
        await _owner_becomes(presence, "a")
        b.ownership.presence = held = Failing(presence)
        held.hold("claim")
        new = await connect(b, "t1")
        await eventually(lambda: held.waiting("claim") == 1)
        await b.ownership.renew()
        held.resume("claim")
        assert await _closed(old) == Code.TAKEOVER
        await _owner_becomes(presence, "b")
        b.ownership.presence = presence              # (Failing's own release() shadows it)
        with pytest.raises(asyncio.TimeoutError):
            await new.receive(timeout=0.3)           # (open: no CLOSE comes)
        assert TILL in b.hub.sessions and b.counters.takeovers == 0


@pytest.mark.parametrize("kind", SHARED)
@aiotest()
async def test_a_claim_the_presence_refuses_is_kept_and_retried(kind):
    async with _shared_pair(kind) as (a, b, presence):
        a.ownership.presence = failing = Failing(presence)
        failing.fail("claim", 3)
        await connect(a, "t1")
        await _owner_becomes(presence, "a")
        assert failing.calls["claim"] == 4


@aiotest()
async def test_a_result_stored_on_one_node_reaches_a_till_on_another_in_the_notice():
    # Two nodes sharing presence, a broker and one store: the node that
    # stores a payment result for a till held by the other hands the message
    # over in its notice, so the other delivers it without reading its store
    # (here every inbox read of that node fails, and the result still comes).
    from tillwire.server.store_memory import MemoryStore

    store = MemoryStore()
    presence, bus = MemoryPresence(), MemoryBus()
    a = await start_node(node_id="a", store=store, presence=presence,
                         broker=MemoryBroker("a", bus))
    failing = Failing(store)
    b = await start_node(node_id="b", store=failing, presence=presence,
                         broker=MemoryBroker("b", bus))
    try:
        till = await connect(b, "t1")
        await _owner_becomes(presence, "b")
        failing.fail("inbox", None)
        await provision(a, "t1")         # (a's registry is its own here)
        pay = await connect(a, "pay", store="hq", roles=("backend",))
        for n in range(3):
            await pay.send("payment.result", {"order": f"o{n + 1}", "status": "paid"}, TILL)
        assert await receive_orders(till, 3) == [1, 2, 3]
        assert failing.calls["inbox"] == 0
        await pay.close()
        await till.close()
    finally:
        await a.stop()
        await b.stop()


@contextlib.asynccontextmanager
async def _pair_behind_a_held_lookup():
    """Nodes a and b sharing a memory store, presence and bus; b's store and
    a's broker in Failing fakes (to count b's reads, to keep a's notices);
    a till on b, a payer on a; from the payer's first result on, a's first
    owners lookup waits until ``presence.resume("owners")``.  Yields
    (presence, b_store, broker_a, till, pay)."""
    from tillwire.server.store_memory import MemoryStore

    store = MemoryStore()
    presence, bus = Failing(MemoryPresence()), MemoryBus()
    broker_a = Failing(MemoryBroker("a", bus))
    a = await start_node(node_id="a", store=store, presence=presence, broker=broker_a)
    b_store = Failing(store)
    b = await start_node(node_id="b", store=b_store, presence=presence,
                         broker=MemoryBroker("b", bus))
    try:
        till = await connect(b, "t1")
        await _owner_becomes(presence, "b")
        await provision(a, "t1")
        pay = await connect(a, "pay", store="hq", roles=("backend",))
        lookups = itertools.count(1)
        presence.hold("owners", when=lambda terminals: next(lookups) == 1)   # (the first only)
        yield presence, b_store, broker_a, till, pay
        await pay.close()
        await till.close()
    finally:
        await a.stop()
        await b.stop()


@aiotest()
async def test_a_notice_never_overtakes_an_earlier_one_whose_owner_lookup_is_slow():
    # Node a looks up the owners of a batch's tills before it tells them.
    # The lookup for the first result is slow (held here for longer than
    # EARLY_WAIT, as behind Redis's long scripts under load); the second
    # result's notice waits behind it instead of reaching node b first,
    # where the second result would wait for the gap and then be read from
    # the store.  Both come in the notices, in order, and b reads nothing.
    from tillwire.server.delivery import EARLY_WAIT

    async with _pair_behind_a_held_lookup() as (presence, b_store, _, till, pay):
        await pay.send("payment.result", {"order": "o1", "status": "paid"}, TILL)
        await eventually(lambda: presence.waiting("owners") == 1)
        await pay.send("payment.result", {"order": "o2", "status": "paid"}, TILL)
        with pytest.raises(asyncio.TimeoutError):
            await till.receive(timeout=EARLY_WAIT + 0.2)     # (o2 did not go ahead)
        presence.resume("owners")
        assert await receive_orders(till, 2) == [1, 2]
        assert b_store.calls["inbox"] == 0


@aiotest()
async def test_a_round_of_notices_stops_at_what_one_notice_carries(monkeypatch):
    # Results queued behind a slow round go in the next round, but only as
    # many as NOTICE_TOTAL bytes of bodies (two here): the third goes in a
    # round of its own, carried too, rather than told as a position that
    # node b would read back from the store.
    import orjson

    from tillwire.server import ownership

    body = {"order": "o2", "status": "paid"}
    monkeypatch.setattr(ownership, "NOTICE_TOTAL", int(2.5 * len(orjson.dumps(body))))
    async with _pair_behind_a_held_lookup() as (presence, b_store, _, till, pay):
        await pay.send("payment.result", {"order": "o1", "status": "paid"}, TILL)
        await eventually(lambda: presence.waiting("owners") == 1)
        for n in range(2, 5):
            await pay.send("payment.result", {"order": f"o{n}", "status": "paid"}, TILL)
        presence.resume("owners")
        assert await receive_orders(till, 4) == [1, 2, 3, 4]
        assert b_store.calls["inbox"] == 0


@aiotest()
async def test_the_second_notice_names_each_inbox_once_with_its_highest_seq():
    # A second after a round of deliver notices, node a tells the owners
    # once more which inboxes hold what it stored (an ``inbox`` notice, in
    # case the first was lost): one line per inbox, its highest seq, not one
    # per message.  Four results to one till go in one round here (the
    # round before them waits on its owners lookup).
    async with _pair_behind_a_held_lookup() as (presence, _, broker_a, till, pay):
        inbox_notices = lambda owner, message: message.startswith(b"inbox")
        broker_a.fail("send_control", None, when=inbox_notices)      # (kept to be read)
        await pay.send("payment.result", {"order": "o1", "status": "paid"}, TILL)
        await eventually(lambda: presence.waiting("owners") == 1)
        for n in range(2, 6):
            await pay.send("payment.result", {"order": f"o{n}", "status": "paid"}, TILL)
        presence.resume("owners")
        assert await receive_orders(till, 5) == [1, 2, 3, 4, 5]
        await eventually(lambda: len(broker_a.refused) == 2, timeout=RENOTIFY + 2)
        assert [args[1] for _, args in broker_a.refused] == [
            b"inbox\0\0terminal:acme/t1 0 1", b"inbox\0\0terminal:acme/t1 0 5"]


@aiotest()
async def test_a_result_whose_notices_were_all_lost_arrives_by_the_owners_reconciliation():
    # Two nodes sharing a Redis store, presence and broker (a fleet's
    # workers).  Every control message node a sends is lost: the notice
    # that carries the stored result and the one a second later.  Node b
    # reconciles the inboxes of its sessions against the store every
    # RECONCILE_EVERY seconds and reads what is still missing RECONCILE_GRACE
    # later (5.5 s: the bound README states) and delivers it.
    from tillwire.server.store_redis import RedisStore

    prefix = fresh_prefix()
    clients = [aioredis.from_url(redis_url()) for _ in range(3)]
    presence = RedisPresence(clients[0], prefix=prefix)
    broker_a = Failing(RedisBroker("a", clients[1], prefix=prefix))
    broker_b = RedisBroker("b", clients[2], prefix=prefix)
    a = await start_node(store=RedisStore(redis_url(), prefix=prefix), node_id="a",
                         presence=presence, broker=broker_a)
    b = await start_node(store=RedisStore(redis_url(), prefix=prefix), node_id="b",
                         presence=presence, broker=broker_b)
    try:
        await provision(a, "t1")
        till = await connect(b, "t1")
        await _owner_becomes(presence, "b")
        broker_a.fail("send_control", None)
        pay = await connect(a, "pay", store="hq", roles=("backend",))
        await pay.send("payment.result", {"order": "o1", "status": "paid"}, TILL)
        sent = asyncio.get_running_loop().time()
        msg = await till.receive(timeout=RECONCILE_EVERY + RECONCILE_GRACE + 1.5)
        assert msg.body["order"] == "o1"
        await msg.ack()
        assert asyncio.get_running_loop().time() - sent > RENOTIFY    # (no notice brought it)
        await eventually(lambda: len(broker_a.refused) >= 2)     # both notices were lost
        assert {name for name, _ in broker_a.refused} == {"send_control"}
    finally:
        await a.stop()
        await b.stop()
        for client in clients:
            await client.aclose()


def test_receipt_control_messages_carry_any_ref_and_address_and_refuse_a_cut_one():
    from tillwire.server.ownership import pack_receipt, unpack_receipts

    receipts = [("terminal:acme/pay", 1 << 63, 2**64 - 1, 2, "terminal:acme/t1"),
                ("terminal:acme/kasse-ä", 0, 7, 5, "member:acme/m1")]
    data = b"".join(map(pack_receipt, receipts))
    assert unpack_receipts(data) == receipts
    with pytest.raises(ValueError):
        unpack_receipts(data[:-1])


async def _receipt(conn, timeout: float = 3.0):
    r = await asyncio.wait_for(conn.receipts.get(), timeout)
    return r.code, r.msg_id, r.to


@aiotest()
async def test_receipts_reach_a_sender_held_by_another_worker():
    # The payment backend asks for receipts on node a; the tills are on node
    # b, whose deliveries, acks, read receipts, NACKs and expiry make them.
    # Each RECEIPT reaches the backend through a's control inbox (a fleet's
    # workers over a real redis-server).  A forwarding that meets presence
    # or the broker failing is kept and retried, not dropped.
    import time

    from tillwire.core.codes import ReceiptStatus

    pay_address = "terminal:acme/pay"
    async with _shared_redis_pair(wrap=True, registry=True) as (a, b, presence):
        await provision(a, "t1")
        await provision(a, "t2")                 # (never connects: its result expires)
        till = await connect(b, "t1")
        pay = await connect(a, "pay", store="hq", roles=("backend",))
        await _owner_becomes(presence, "b")
        await _owner_becomes(presence, "a", terminal=pay_address)
        first = await pay.send("payment.result", {"order": "o1", "status": "paid"}, TILL,
                               receipt=True)
        msg = await till.receive(timeout=3)
        assert await _receipt(pay) == (ReceiptStatus.DELIVERED, first.msg_id, TILL)
        # The ACKED receipt's owners lookup fails once: retried.
        presence.fail("owners", 1, when=lambda terminals: pay_address in terminals)
        await msg.ack()
        assert await _receipt(pay) == (ReceiptStatus.ACKED, first.msg_id, TILL)
        assert ("owners", ([pay_address],)) in [(n, (list(args[0]),))
                                                for n, args in presence.refused]
        till.read(msg.id)
        assert await _receipt(pay) == (ReceiptStatus.READ, first.msg_id, TILL)
        # The REJECTED receipt's control message fails once: retried.
        second = await pay.send("payment.result", {"order": "o2", "status": "paid"}, TILL,
                                receipt=True)
        msg = await till.receive(timeout=3)
        assert await _receipt(pay) == (ReceiptStatus.DELIVERED, second.msg_id, TILL)
        b.ownership.broker = broker = Failing(b.ownership.broker)
        broker.fail("send_control", 1)
        till.nack(msg.lane, msg.seq, 34, "unknown order")
        assert await _receipt(pay) == (ReceiptStatus.REJECTED, second.msg_id, TILL)
        assert [name for name, _ in broker.refused] == ["send_control"]
        # Node b's expiry dead-letters t2's result (a's sweep may not have run).
        third = await pay.send("payment.result", {"order": "o3", "status": "paid"},
                               "terminal:acme/t2", receipt=True, ttl=0.2)
        await b.expire(time.time() + 1.0)
        assert await _receipt(pay) == (ReceiptStatus.EXPIRED, third.msg_id, "terminal:acme/t2")
        # A sender with no session anywhere gets none (as on one node): its
        # owner is looked up, and nothing is kept for it.
        fourth = await pay.send("payment.result", {"order": "o4", "status": "paid"},
                                "terminal:acme/t2", receipt=True, ttl=0.2)
        await pay.close()
        await _owner_becomes(presence, None, terminal=pay_address)
        looked = presence.calls["owners"]
        dead = await b.expire(time.time() + 1.0)
        assert [d.msg_id for d in dead] == [fourth.msg_id]
        await eventually(lambda: presence.calls["owners"] > looked)
        await eventually(lambda: len(b.ownership._receipt_batches) == 0)


@contextlib.asynccontextmanager
async def _admin_of(node, tmp_path):
    """``node``'s admin API on loopback: an aiohttp session with a token
    for every tenant."""
    import aiohttp

    from support import make_config
    from test_admin import ADMIN_TOKENS, OPS
    from tillwire.server.admin import start_admin
    from tillwire.server.audit import AuditLog

    audit = AuditLog(str(tmp_path / f"audit-{node.node_id}.log")).open()
    runner = await start_admin(node, make_config(**{"admin.tokens": ADMIN_TOKENS}), audit,
                               "127.0.0.1", 0)
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession(f"http://{host}:{port}", headers={
                "Authorization": f"Bearer {OPS}"}) as http:
            yield http
    finally:
        await runner.cleanup()
        audit.close()


@aiotest()
async def test_the_admin_api_of_any_worker_says_which_worker_holds_a_terminal(tmp_path):
    # GET /v1/terminals/... on worker a for a till held by worker b: presence
    # names b; the connection's own details are b's to know (null here).
    # Presence failing is a 503 naming it, not a false "offline".
    from test_admin import check_response

    template = "/v1/terminals/{tenant}/{terminal}"
    async with _shared_redis_pair(wrap=True, registry=True) as (a, b, presence):
        await provision(a, "t1")
        till = await connect(b, "t1")
        await _owner_becomes(presence, "b")
        async with _admin_of(a, tmp_path) as http:
            async with http.get("/v1/terminals/acme/t1") as resp:
                doc = await resp.json()
            assert resp.status == 200, doc
            check_response(template, "GET", 200, doc)
            assert (doc["connected"], doc["node"], doc["worker"], doc["since"],
                    doc["state"]) == (True, "b", None, None, "open")
            presence.fail("owner", 1)
            async with http.get("/v1/terminals/acme/t1") as resp:
                doc = await resp.json()
            assert resp.status == 503 and doc["error"].startswith("presence: "), doc
            await till.close()
            await _owner_becomes(presence, None)
            async with http.get("/v1/terminals/acme/t1") as resp:
                doc = await resp.json()
            assert (doc["connected"], doc["node"], doc["state"]) == (False, None, "offline")


@aiotest()
async def test_a_members_data_deleted_through_one_worker_leaves_no_copy_on_another(tmp_path):
    # A member's phone is on worker b, which holds a copy of the member
    # channel (its notices).  DELETE /v1/members on worker a deletes the
    # shared history, and every worker drops its copy: the phone's
    # HISTORY on b finds nothing.
    from tillwire.core.codes import Lane

    channel = "member:acme/m1"
    async with _shared_redis_pair(registry=True) as (a, b, presence):
        be = await connect(a, "hq", store="hq", roles=("backend",))
        phone = await connect(b, "app1", store="s1", roles=("customer",), member="m1")
        await be.send("member.notice", {"member": "m1", "text": "Points"}, channel, ttl=600)
        got = await phone.receive(timeout=3)
        assert got.kind == "member.notice"
        mirror = b.hub.stream(channel, Lane.P3, create=False)
        assert [e.kind for e in mirror.history] == ["member.notice"]
        async with _admin_of(a, tmp_path) as http:
            async with http.delete("/v1/members/acme/m1") as resp:
                doc = await resp.json()
        assert resp.status == 200 and doc["channel_entries"] == 1, doc
        await eventually(lambda: not mirror.history)
        items, _ = await phone.history(channel, Lane.P3)
        assert items == []


@aiotest(30)
async def test_a_ticket_escalates_from_another_worker_once_the_one_that_opened_it_is_gone():
    # A till on worker a opens a ticket nobody takes; worker b learns it from
    # a's announcement.  a is then taken away (its node scaled in) before
    # the ticket is due: b escalates it to the store's manager.
    async with _shared_redis_pair(registry=True, **{"tickets.escalate_after": 2.0}) as (
            a, b, presence):
        await provision(a, "mgr1", roles=("manager",))
        boss = await connect(b, "mgr1", roles=("manager",))
        till = await connect(a, "t1")
        ack = await till.send("ticket.open", {"code": "E7"}, "role:acme/s1/staff")
        tid = orjson.loads(ack.payload)["ticket"]
        await eventually(lambda: f"acme/{tid}" in b.tickets.open)
        await till.close()
        await a.stop()
        msg = await boss.receive(timeout=6)
        assert (msg.kind, msg.body["ticket"], msg.body["level"]) == ("ticket.escalate", tid,
                                                                      "store")
        await msg.ack()


@aiotest(30)
async def test_ticket_resends_on_another_worker_are_answered_as_resends():
    # A till's SENDACK is lost and it resends on another worker, as after a
    # reconnect: an auto-answered ticket.open is answered with the first
    # ticket (no second ticket, no second reply), a plain one with its
    # ticket's id, and a ticket.resolve that closed the ticket as a resend,
    # not refused as "no open ticket".
    from tillwire.core.codes import Flag

    rules = [{"code": "E10", "reply": "reboot the printer"}]
    async with _shared_redis_pair(registry=True, **{"tickets.auto_replies": rules}) as (
            a, b, presence):
        await provision(a, "staff1", roles=("staff",))
        till = await connect(a, "t1")
        first = await till.send("ticket.open", {"code": "E10"}, "role:acme/s1/staff", ref=501)
        auto = orjson.loads(first.payload)
        assert auto["auto_reply"] is True
        reply = await till.receive(timeout=3)
        assert reply.kind == "ticket.resolve" and reply.body["ticket"] == auto["ticket"]
        await reply.ack()
        plain = await till.send("ticket.open", {"code": "E42"}, "role:acme/s1/staff", ref=502)
        opened = orjson.loads(plain.payload)
        staff = await connect(a, "staff1", roles=("staff",))
        msg = await staff.receive(timeout=3)
        assert msg.kind == "ticket.open"
        await msg.ack()
        done = await staff.send("ticket.resolve", {"ticket": opened["ticket"],
                                                   "resolution": "paper"}, TILL, ref=77)
        key = f"acme/{opened['ticket']}"
        # (b has read the resolved record: the ticket is closed there too)
        await eventually(lambda: key not in a.tickets.unsaved)
        await b.tickets.refresh(key)
        assert key not in b.tickets.open
        await till.close()
        await staff.close()
        # The same SENDs again, on worker b.
        till = await connect(b, "t1")
        again = await till.send("ticket.open", {"code": "E10"}, "role:acme/s1/staff", ref=501)
        assert again.flags & Flag.RETRANSMIT and again.msg_id == first.msg_id
        assert orjson.loads(again.payload) == {"ticket": auto["ticket"], "auto_reply": True}
        again = await till.send("ticket.open", {"code": "E42"}, "role:acme/s1/staff", ref=502)
        assert again.flags & Flag.RETRANSMIT and again.msg_id == plain.msg_id
        assert orjson.loads(again.payload) == {"ticket": opened["ticket"]}
        staff = await connect(b, "staff1", roles=("staff",))
        again = await staff.send("ticket.resolve", {"ticket": opened["ticket"],
                                                    "resolution": "paper"}, TILL, ref=77)
        assert again.flags & Flag.RETRANSMIT and again.msg_id == done.msg_id
        # One auto-reply and one resolve reached the till: nothing came twice.
        got = await till.receive(timeout=3)
        assert (got.kind, got.body["ticket"]) == ("ticket.resolve", opened["ticket"])
        await got.ack()
        with pytest.raises(asyncio.TimeoutError):
            await till.receive(timeout=0.5)
        assert a.counters.tickets["opened"] + b.counters.tickets["opened"] == 2


@aiotest(30)
async def test_a_worker_whose_pub_sub_was_down_reads_the_tickets_again():
    # Worker b held a's ticket; while b's pub/sub connection was down the
    # ticket was resolved and another one opened elsewhere (their
    # announcements never reached b).  Subscribed again, b reads the
    # tickets again: the resolved one leaves, the new one is held (listed,
    # handed to staff logging in, escalated).
    import time

    from tillwire.server.tickets import NS

    async with _shared_redis_pair(registry=True) as (a, b, presence):
        till = await connect(a, "t1")
        ack = await till.send("ticket.open", {"code": "E42"}, "role:acme/s1/staff")
        old = f"acme/{orjson.loads(ack.payload)['ticket']}"
        await eventually(lambda: old in b.tickets.open)
        records = a.store.records
        rec = orjson.loads(await records.get(NS, old))
        await records.put(NS, old, orjson.dumps({**rec, "status": "resolved"}), time.time())
        new = "acme/T-written-elsewhere"
        await records.put(NS, new, orjson.dumps({**rec, "ticket": "T-written-elsewhere"}),
                          time.time())
        assert old in b.tickets.open and new not in b.tickets.open
        b.ownership._on_resubscribed()
        await eventually(lambda: new in b.tickets.open and old not in b.tickets.open)
        assert new in b.tickets._timers          # (its escalation armed here too)


@aiotest()
async def test_partial_directory_changes_on_two_workers_keep_each_others_fields():
    # PUT /v1/stores with some fields keeps the others from the entry in the
    # store, not from the worker's copy: b has not heard of a's roster yet
    # (no announcement here) when it changes the time zone; and two such
    # changes at once on a and b both land.
    async with _shared_redis_pair() as (a, b, presence):
        await a.directory.put("acme", "s1", on_duty=("staff1",))
        info = await b.directory.put("acme", "s1", timezone="Europe/Berlin")
        assert (info.timezone, info.on_duty) == ("Europe/Berlin", ("staff1",))
        await asyncio.gather(a.directory.put("acme", "s2", managers=("mgr1",)),
                             b.directory.put("acme", "s2", on_duty=("staff2",)))
        await a.directory.reload("acme", "s2")
        got = a.directory.get("acme", "s2")
        assert (got.managers, got.on_duty) == (("mgr1",), ("staff2",))


async def _conversation_across(a, b):
    """Conversation cv1 of customer app1 (member m1) on worker ``a``, its
    first message ("hello") received and acked by agent a1 on worker ``b``:
    (customer, agent, that message)."""
    cust = await connect(a, "app1", store="s1", roles=("customer",), member="m1")
    agent = await connect(b, "a1", store="cs", roles=("service",))
    await cust.send("chat.message", {"conversation": "cv1", "text": "hello"},
                    "role:acme/*/service")
    first = await agent.receive(timeout=3)
    await first.ack()
    return cust, agent, first


@aiotest(30)
async def test_chat_written_at_once_on_two_workers_keeps_one_history_time_per_message():
    # A customer on worker a and its agent on worker b write at once.  Every
    # message gets its own history time (HISTORY offset), and paging by
    # offset a few at a time reads each message once.
    from tillwire.core.codes import Lane

    channel = "chat:acme/cv1"
    async with _shared_redis_pair(registry=True) as (a, b, presence):
        cust, agent, first = await _conversation_across(a, b)
        sent = await asyncio.gather(
            *(cust.send("chat.message", {"conversation": "cv1", "text": f"c{i}"}, channel)
              for i in range(15)),
            *(agent.send("chat.message", {"conversation": "cv1", "text": f"a{i}"}, channel)
              for i in range(15)))
        await eventually(lambda: not a.chat.unsaved and not b.chat.unsaved)
        items, end = await cust.history(channel, Lane.P1, count=100)
        offsets = [item.offset for item in items]
        assert len(items) == 31 and offsets == sorted(set(offsets)), offsets
        assert {item.msg_id for item in items} == {first.id} | {ack.msg_id for ack in sent}
        paged, offset = [], 0
        while True:
            page, end = await cust.history(channel, Lane.P1, offset=offset or 1, count=4)
            if not page:
                break
            paged += [item.offset for item in page]
            offset = end.offset
        assert paged == offsets


@aiotest(30)
async def test_a_chat_message_whose_time_cannot_be_taken_is_refused_and_changes_nothing():
    # The conversation's clock record cannot be written (the store fails
    # right there): the sender gets STORE_UNAVAILABLE, nothing is stored or
    # delivered, and the resend goes through.
    from tillwire.client.connection import SendError
    from tillwire.core.codes import Lane

    channel = "chat:acme/cv1"
    async with _shared_redis_pair(registry=True) as (a, b, presence):
        cust, agent, _ = await _conversation_across(a, b)
        a.store = failing = Failing(a.store)
        failing.fail("records.replace", 1)
        with pytest.raises(SendError) as refused:
            await cust.send("chat.message", {"conversation": "cv1", "text": "again"}, channel,
                            ref=900)
        assert refused.value.code == Code.STORE_UNAVAILABLE
        with pytest.raises(asyncio.TimeoutError):
            await agent.receive(timeout=0.3)
        ack = await cust.send("chat.message", {"conversation": "cv1", "text": "again"}, channel,
                              ref=900)
        msg = await agent.receive(timeout=3)
        assert (msg.id, msg.body["text"]) == (ack.msg_id, "again")
        items, _ = await cust.history(channel, Lane.P1, count=10)
        assert [orjson.loads(item.payload)["text"] for item in items] == ["hello", "again"]


@aiotest()
async def test_an_announcement_the_broker_refuses_is_published_again():
    # Worker a retires h12 and announces it; the broker refuses the first
    # publish.  The announcement is kept and published again, and worker b,
    # which holds h12's session, closes it.
    import dataclasses

    address = "terminal:acme/h12"
    async with _shared_redis_pair(registry=True) as (a, b, presence):
        await provision(a, "h12", roles=("staff",))
        conn = await connect(b, "h12", roles=("staff",))
        await _owner_becomes(presence, "b", terminal=address)
        a.ownership.broker = broker = Failing(a.ownership.broker)
        broker.fail("publish", 1)
        rec = await a.registry.get(address)
        await a.registry.put(dataclasses.replace(rec, retired=True))
        a.terminal_changed(address)
        assert await _closed(conn) == Code.KICKED
        assert [name for name, _ in broker.refused] == ["publish"]


@aiotest()
async def test_the_batches_behind_a_tills_first_lookup_take_its_record_from_the_cache():
    # A worker that has not seen a till asks the shared registry for it
    # once.  The SENDs to it that arrive while that lookup is out wait
    # behind it, and take the record it brought: no lookup each (with Redis,
    # a round trip each, a few thousand per second under load).
    import time

    from tillwire.server.main import make_store
    from tillwire.server.node import Node
    from tillwire.server.registry_redis import RedisRegistry
    from tillwire.server.terminals import TerminalRecord
    from support import make_config

    prefix = fresh_prefix()
    client = aioredis.from_url(redis_url())
    registry = Failing(RedisRegistry(client, prefix=prefix))
    cfg = make_config()
    node = Node(cfg, make_store(cfg), loop=asyncio.get_running_loop(), registry=registry)
    await node.start()
    try:
        # The till is provisioned by another worker: this one's cache lacks it.
        await RedisRegistry(client, prefix=prefix).put(TerminalRecord(
            TILL, "acme", "t1", "s1", "", ("pos",), "", time.time(), 0.0, False, 0.0))
        pay = await connect(node, "pay", store="hq", roles=("backend",))
        asked = registry.calls["get"]
        registry.hold("get", when=lambda address: address == TILL)
        sends = []
        for n in range(5):      # five reads, five batches: four wait behind the first
            sends.append(asyncio.ensure_future(pay.send(
                "payment.result", {"order": f"o{n}", "status": "paid"}, TILL)))
            await asyncio.sleep(0.05)
        assert registry.waiting("get") == 1
        registry.resume("get")
        acks = await asyncio.gather(*sends)
        assert len({a.msg_id for a in acks}) == 5
        assert registry.calls["get"] - asked == 1
        till = await connect(node, "t1")
        assert await receive_orders(till, 5) == [0, 1, 2, 3, 4]
    finally:
        await node.stop()
        await client.aclose()


@aiotest()
async def test_an_own_channel_message_placed_before_the_claim_reaches_the_session_once_claimed():
    # A till's session is open on node b, but its presence claim is not
    # written yet.  A P3 message to the till's own channel from node a finds
    # no owner: it is placed in the shared history and sent to no worker.
    # A second after the claim names b, b reads the own channel past its
    # mirror and the till gets the message (before, only at its next resume).
    async with _shared_redis_pair(wrap=True) as (a, b, presence):
        hq = await connect(a, "hq", store="hq", roles=("backend",))
        presence.hold("claim", when=lambda address, *_: address == TILL)
        till = await connect(b, "t1")
        await eventually(lambda: presence.waiting("claim") == 1
                         and b.channels.interest.primed([TILL]))
        await hq.send("promo.offer", {"offer": "o1", "title": "Deal"}, TILL)
        with pytest.raises(asyncio.TimeoutError):
            await till.receive(timeout=0.3)          # (no owner: sent to nobody)
        presence.resume("claim")
        msg = await till.receive(timeout=RENOTIFY + 2)
        assert (msg.kind, msg.body["offer"]) == ("promo.offer", "o1")
        with pytest.raises(asyncio.TimeoutError):
            await till.receive(timeout=0.5)          # once


@aiotest()
async def test_a_channel_message_lost_on_the_way_is_read_from_the_history_in_order():
    # Node b holds a till; P3 messages to its own channel come from node a.
    # The second one never reaches b (lost on the way: a broker reconnect,
    # or a claim that named another worker a moment).  When the third comes,
    # b sees the gap, reads the missing one from the shared history, and the
    # till gets all three in order (before, b's mirror started again at the
    # third and the second was never delivered).
    async with _shared_redis_pair(wrap=False) as (a, b, presence):
        b.ownership.renotify = 60.0     # (no own-channel read after the claim: the gap repairs)
        hq = await connect(a, "hq", store="hq", roles=("backend",))
        till = await connect(b, "t1")
        await _owner_becomes(presence, "b")
        arrived, lost = set(), []
        receive = b.channels.receive

        def lossy(name, lane, data):
            if name == TILL:
                offset = b.channels.placed_offset(data)
                arrived.add(offset)
                if offset == 2 and not lost:
                    lost.append(data)
                    return                  # (lost on the way)
            receive(name, lane, data)

        b.channels.receive = lossy
        for n in (1, 2, 3):
            await hq.send("promo.offer", {"offer": f"o{n}", "title": "Deal"}, TILL)
            await eventually(lambda: n in arrived)
        assert lost
        got = [await till.receive(timeout=3) for _ in range(3)]
        assert [m.body["offer"] for m in got] == ["o1", "o2", "o3"]
        assert [m.seq for m in got] == [1, 2, 3]


@aiotest()
async def test_a_revoked_token_is_refused_while_the_worker_reads_the_record_again():
    # Another worker revoked h12's tokens and announced it.  This worker had
    # h12's record cached; while it reads the record again (the read held
    # here), a login with an old token must not pass on the cached record.
    import time

    from tillwire.server.node import Node
    from tillwire.server.registry_redis import RedisRegistry
    from tillwire.server.store_redis import RedisStore
    from tillwire.server.terminals import TerminalRecord
    from support import make_config, token

    prefix = fresh_prefix()
    clients = [aioredis.from_url(redis_url()) for _ in range(3)]
    registry = Failing(RedisRegistry(clients[0], prefix=prefix))
    cfg = make_config()
    node = Node(cfg, RedisStore(redis_url(), prefix=prefix), loop=asyncio.get_running_loop(),
                node_id="a", presence=RedisPresence(clients[1], prefix=prefix),
                broker=RedisBroker("a", clients[2], prefix=prefix), registry=registry)
    await node.start()
    try:
        address = "terminal:acme/h12"
        rec = TerminalRecord(address, "acme", "h12", "s1", "", ("staff",), "", time.time() - 60,
                             0.0, False, 0.0)
        other = RedisRegistry(clients[0], prefix=prefix)       # (another worker)
        await other.put(rec)
        assert await registry.get(address) == rec              # (cached here)
        old_token = token("h12", roles=("staff",), now=time.time() - 5)
        await other.put(TerminalRecord(address, "acme", "h12", "s1", "", ("staff",), "",
                                       rec.first_seen, 0.0, False, time.time()))
        registry.hold("get")
        node.ownership._on_announcement(b"registry\0" + address.encode())
        login = asyncio.ensure_future(connect(node, "h12", roles=("staff",), token=old_token))
        await eventually(lambda: registry.waiting("get") >= 1)
        registry.resume("get")
        with pytest.raises(SessionClosed) as refused:
            await login
        assert refused.value.code == Code.TOKEN_REVOKED
    finally:
        await node.stop()
        for client in clients:
            await client.aclose()


class _HeldAnswers:
    """A Redis client whose pipelines' answers wait, once Redis gave them,
    until ``gate`` is set (a reply on its way while other things happen)."""

    def __init__(self, client) -> None:
        self._client = client
        self.gate = asyncio.Event()
        self.gate.set()
        self.answered = 0

    def __getattr__(self, name):
        return getattr(self._client, name)

    def pipeline(self, *args, **kwargs):
        return _HeldPipeline(self, self._client.pipeline(*args, **kwargs))


class _HeldPipeline:
    def __init__(self, held: _HeldAnswers, pipe) -> None:
        self._held = held
        self._pipe = pipe

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    async def __aenter__(self):
        await self._pipe.__aenter__()
        return self

    async def __aexit__(self, *exc):
        return await self._pipe.__aexit__(*exc)

    async def execute(self, *args, **kwargs):
        replies = await self._pipe.execute(*args, **kwargs)
        self._held.answered += 1
        await self._held.gate.wait()
        return replies


@aiotest()
async def test_a_record_read_before_a_change_is_not_cached_when_its_answer_comes_after():
    # This worker asks Redis for h12's record; Redis answers with the record
    # as it is, then another worker revokes h12's tokens and announces it,
    # and only then does the answer reach this worker (held here).  The
    # answer predates the change: it must not be cached, or the revoked
    # token would pass here until the record's next change.
    import time

    from tillwire.server.node import Node
    from tillwire.server.registry_redis import RedisRegistry
    from tillwire.server.store_redis import RedisStore
    from tillwire.server.terminals import TerminalRecord
    from support import make_config, token

    prefix = fresh_prefix()
    clients = [aioredis.from_url(redis_url()) for _ in range(3)]
    held = _HeldAnswers(clients[0])
    registry = RedisRegistry(held, prefix=prefix)
    node = Node(make_config(), RedisStore(redis_url(), prefix=prefix),
                loop=asyncio.get_running_loop(), node_id="a",
                presence=RedisPresence(clients[1], prefix=prefix),
                broker=RedisBroker("a", clients[2], prefix=prefix), registry=registry)
    await node.start()
    try:
        address = "terminal:acme/h12"
        rec = TerminalRecord(address, "acme", "h12", "s1", "", ("staff",), "", time.time() - 60,
                             0.0, False, 0.0)
        other = RedisRegistry(clients[0], prefix=prefix)       # (another worker)
        await other.put(rec)
        old_token = token("h12", roles=("staff",), now=time.time() - 5)
        held.gate.clear()
        read = asyncio.ensure_future(registry.get(address))
        await eventually(lambda: held.answered == 1)          # (Redis answered: the old record)
        await other.put(TerminalRecord(address, "acme", "h12", "s1", "", ("staff",), "",
                                       rec.first_seen, 0.0, False, time.time()))
        node.ownership._on_announcement(b"registry\0" + address.encode())
        held.gate.set()
        assert await read == rec                # (that read began before the change)
        assert registry.cached(address) is None
        with pytest.raises(SessionClosed) as refused:
            await connect(node, "h12", roles=("staff",), token=old_token)
        assert refused.value.code == Code.TOKEN_REVOKED
    finally:
        await node.stop()
        for client in clients:
            await client.aclose()


class _SlowClaim(MemoryPresence):
    """Presence in memory whose claims of ``slow`` wait until ``go`` is set."""

    def __init__(self, slow: str) -> None:
        super().__init__()
        self.slow = slow
        self.go = asyncio.Event()
        self.waiting = 0
        self.releases: list[str] = []

    async def claim(self, terminal, *args):
        if terminal == self.slow:
            self.waiting += 1
            await self.go.wait()
        return await super().claim(terminal, *args)

    async def release(self, terminal, owner):
        self.releases.append(terminal)
        return await super().release(terminal, owner)


@aiotest()
async def test_a_slow_claim_does_not_hold_back_the_claims_of_other_terminals():
    # A login storm's claims are written several at a time: while t1's
    # claim waits (a slow round trip), the claims of the terminals that
    # logged in after it are written; t1's own release waits behind its
    # claim, in order.
    presence = _SlowClaim(TILL)
    node = await start_node(node_id="a", presence=presence, broker=MemoryBroker("a", MemoryBus()))
    try:
        t1 = await connect(node, "t1")
        await eventually(lambda: presence.waiting == 1)
        others = [await connect(node, f"t{n}") for n in range(2, 6)]
        for n in range(2, 6):
            await _owner_becomes(presence, "a", terminal=f"terminal:acme/t{n}")
        assert await presence.owner(TILL) is None
        await t1.close()
        await asyncio.sleep(0.1)
        assert presence.releases == []          # (behind t1's claim)
        presence.go.set()
        await eventually(lambda: presence.releases == [TILL])
        assert await presence.owner(TILL) is None
        for conn in others:
            await conn.close()
    finally:
        await node.stop()


@pytest.mark.parametrize("change", ["revoke", "retire"])
@aiotest()
async def test_a_session_whose_claim_is_not_written_yet_is_closed_by_a_revoke(change):
    # A stolen handheld logs in on node b; its presence claim is not written
    # yet (held here) when an operator revokes its tokens (or retires it)
    # through node a.  a's kick finds no owner in presence, but b hears the
    # change, reads the record again and closes the session (before, it
    # stayed open on the revoked token for as long as it kept connected).
    import dataclasses
    import time

    address = "terminal:acme/h12"
    async with _shared_redis_pair(wrap=True, registry=True) as (a, b, presence):
        presence.hold("claim", when=lambda terminal, *_: terminal == address)
        h12 = await connect(b, "h12", roles=("staff",), now=time.time() - 5)
        await eventually(lambda: presence.waiting("claim") == 1)
        rec = await a.registry.get(address)
        await a.registry.put(dataclasses.replace(rec, revoked_before=time.time())
                             if change == "revoke" else dataclasses.replace(rec, retired=True))
        a.terminal_changed(address)
        assert not await a.kick_anywhere(address, "stolen")      # (no owner yet)
        assert await _closed(h12) == Code.KICKED
        presence.resume("claim")
