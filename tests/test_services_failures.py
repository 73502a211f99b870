"""The services' failure paths, with a failing fake around the real store.

The failing fake of ``tests/failing.py`` wraps a real MemoryStore or
SQLiteStore and forwards everything, but refuses a group commit
(``accept_many_then``) holding messages of chosen kinds, holds one until the
test lets it go, and refuses the services' record writes.  Real nodes over
loopback sockets:

* a ticket.open / assign / reply / resolve or a chat.message whose commit
  the store refuses changes nothing (the terminal gets STORE_UNAVAILABLE),
  and the same SEND retried once the store works is applied once;
* updates of one ticket (messages of one conversation) racing: each is
  checked against what the one before it committed;
* records the store refuses stay due and are written once it recovers;
  stop writes what is still due; WriteBehind's own contract (backoff,
  a change during a write, flush, nothing scheduled once stopping).
"""

from __future__ import annotations

import asyncio
import inspect
import time

import orjson
import pytest

from failing import Failing, carrying, kinds_of
from support import aiotest, connect, eventually, make_config, start_node
from test_offers import offer
from tillwire.client.connection import SendError
from tillwire.core.codes import Code, Flag, Lane
from tillwire.server import chat as chat_module
from tillwire.server import offers as offers_module
from tillwire.server import tickets as tickets_module
from tillwire.server.host import ServiceHost
from tillwire.server.main import make_store
from tillwire.server.writebehind import WriteBehind

SERVICE = "role:acme/*/service"
STAFF = "role:acme/s1/staff"
TILL = "terminal:acme/t1"


NAMESPACES = {"ticket", "conv", "chat", "cap"}      # the services' records


def refuse_puts(store) -> None:
    """Make every write of a service record fail until ``store.heal("records.put")``."""
    store.fail("records.put", None, when=lambda ns, *_: ns in NAMESPACES)


def refused_puts(store) -> list[str]:
    """The namespaces of the record writes the store refused, in order."""
    return [args[0] for name, args in store.refused if name == "records.put"]


async def failing_node(tmp_path=None, backend: str = "memory", **overrides):
    """A node over a failing fake around the backend the config names."""
    cfg = make_config(str(tmp_path) if tmp_path else "", **{"store.backend": backend},
                      **overrides)
    store = Failing(make_store(cfg))
    return await start_node(cfg, store), store


async def nothing_for(conn, seconds: float = 0.3) -> None:
    with pytest.raises(asyncio.TimeoutError):
        msg = await conn.receive(timeout=seconds)
        raise AssertionError(f"unexpected {msg!r} {msg.body}")


async def refused(send) -> SendError:
    with pytest.raises(SendError) as err:
        await send
    return err.value


@aiotest()
async def test_the_node_offers_every_member_of_the_service_host_interface():
    """Node satisfies ServiceHost: every method with the protocol's parameters,
    every attribute set by its constructor."""
    methods = [name for name, member in vars(ServiceHost).items()
               if not name.startswith("_") and callable(member)]
    assert {"spawn", "members", "submit", "service_ack", "answer"} <= set(methods)
    node = await start_node()
    try:
        for name in methods:
            wanted = list(inspect.signature(getattr(ServiceHost, name)).parameters)[1:]
            assert list(inspect.signature(getattr(node, name)).parameters) == wanted, name
        assert inspect.iscoroutinefunction(node.members)
        for name in ServiceHost.__annotations__:
            assert getattr(node, name) is not None, name
        assert node.hub.has_policy_sessions("acme") is False
        assert node.stopping is False
    finally:
        await node.stop()
    assert node.stopping is True


# -- state only after commit ------------------------------------------------------------

@pytest.mark.parametrize("backend", ["memory", "sqlite"])
@aiotest()
async def test_an_open_the_store_refuses_creates_no_ticket_and_its_retry_opens_one(
        tmp_path, backend):
    node, store = await failing_node(tmp_path, backend)
    try:
        staff = await connect(node, "h1", store="s1", roles=("staff",))
        till = await connect(node, "t1", store="s1", roles=("pos",))
        store.fail("accept_many_then", None, when=carrying("ticket.open"))
        err = await refused(till.send("ticket.open", {"code": "E42"}, STAFF, ref=900))
        assert err.code == Code.STORE_UNAVAILABLE
        assert kinds_of(store.refused) == ["ticket.open"]
        assert node.tickets.open == {} and len(node.tickets.unsaved) == 0
        assert await node.store.records.scan("ticket") == []
        await nothing_for(staff)

        store.heal("accept_many_then")
        ack = await till.send("ticket.open", {"code": "E42"}, STAFF, ref=900)
        assert not ack.flags & Flag.RETRANSMIT
        doc = orjson.loads(ack.payload)
        tid = doc["ticket"]
        assert doc["recipients"] == 1
        msg = await staff.receive(timeout=3)
        assert (msg.kind, msg.body["ticket"]) == ("ticket.open", tid)
        await msg.ack()
        assert list(node.tickets.open) == [f"acme/{tid}"]
        rec = orjson.loads(await node.store.records.get("ticket", f"acme/{tid}"))
        assert (rec["status"], rec["msg_id"]) == ("open", ack.msg_id)
        # Once: the same SEND again is answered like the first, nothing new.
        again = await till.send("ticket.open", {"code": "E42"}, STAFF, ref=900)
        assert again.flags & Flag.RETRANSMIT and again.msg_id == ack.msg_id
        assert orjson.loads(again.payload)["ticket"] == tid
        await nothing_for(staff)
        assert len(node.tickets.open) == 1
        assert len(await node.store.records.scan("ticket")) == 1
    finally:
        await node.stop()


UPDATES = {   # kind -> (body, what the ticket looks like once it is applied)
    "ticket.assign": ({}, {"status": "assigned", "assignee": "h1", "replies": 0}),
    "ticket.reply": ({"text": "on my way"}, {"status": "escalated", "assignee": "",
                                             "replies": 1}),
    "ticket.resolve": ({"resolution": "paper loaded"},
                       {"status": "resolved", "assignee": "", "replies": 0}),
}


@pytest.mark.parametrize("kind", sorted(UPDATES))
@aiotest()
async def test_an_update_the_store_refuses_changes_nothing_and_its_retry_applies_once(kind):
    node, store = await failing_node(**{"tickets.escalate_after": 0.5})
    try:
        manager = await connect(node, "m1", store="s1", roles=("manager",))
        staff = await connect(node, "h1", store="s1", roles=("staff",))
        till = await connect(node, "t1", store="s1", roles=("pos",))
        tid = orjson.loads((await till.send("ticket.open", {"code": "E42"}, STAFF)).payload)[
            "ticket"]
        await (await staff.receive(timeout=3)).ack()
        before = await node.tickets.get("acme", tid)
        body = {"ticket": tid, **UPDATES[kind][0]}

        store.fail("accept_many_then", None, when=carrying(kind))
        err = await refused(staff.send(kind, body, TILL, ref=700))
        assert err.code == Code.STORE_UNAVAILABLE
        assert kinds_of(store.refused) == [kind]
        assert await node.tickets.get("acme", tid) == before
        assert f"acme/{tid}" in node.tickets.open
        await nothing_for(till, 0.1)
        # Still unassigned and open: its escalation was not cancelled.
        msg = await manager.receive(timeout=3)
        assert (msg.kind, msg.body["ticket"]) == ("ticket.escalate", tid)
        await eventually(lambda: node.tickets.open[f"acme/{tid}"]["status"] == "escalated")

        store.heal("accept_many_then")
        ack = await staff.send(kind, body, TILL, ref=700)
        assert not ack.flags & Flag.RETRANSMIT
        assert orjson.loads(ack.payload) == {"recipients": 1}
        got = await till.receive(timeout=3)
        assert (got.kind, got.body) == (kind, body)
        await got.ack()
        after = await node.tickets.get("acme", tid)
        assert {k: after[k] for k in ("status", "assignee", "replies")} == UPDATES[kind][1]
        # Once: the same SEND again is a duplicate, applied and delivered no more.
        again = await staff.send(kind, body, TILL, ref=700)
        assert again.flags & Flag.RETRANSMIT and again.msg_id == ack.msg_id
        assert await node.tickets.get("acme", tid) == after
        await nothing_for(till)
    finally:
        await node.stop()


@pytest.mark.parametrize("first", ["stored", "refused"])
@aiotest()
async def test_of_two_staff_assigning_one_ticket_the_first_committed_has_it(first):
    """h1's assign is being committed when h2's comes: h2's is checked against what
    h1's commit left, not the state before it (h1 has it, or nobody if refused)."""
    node, store = await failing_node()
    try:
        h1 = await connect(node, "h1", store="s1", roles=("staff",))
        h2 = await connect(node, "h2", store="s1", roles=("staff",))
        till = await connect(node, "t1", store="s1", roles=("pos",))
        tid = orjson.loads((await till.send("ticket.open", {"code": "E42"}, STAFF)).payload)[
            "ticket"]
        for staff in (h1, h2):
            await (await staff.receive(timeout=3)).ack()
        store.hold("accept_many_then", when=carrying("ticket.assign"))
        one = asyncio.ensure_future(h1.send("ticket.assign", {"ticket": tid}, TILL))
        await eventually(lambda: store.held)
        frames = node.counters.lane_frames_in[Lane.P1]
        two = asyncio.ensure_future(h2.send("ticket.assign", {"ticket": tid}, TILL))
        await eventually(lambda: node.counters.lane_frames_in[Lane.P1] == frames + 1)
        await asyncio.sleep(0.05)
        assert (await node.tickets.get("acme", tid))["assignee"] == ""   # nothing committed
        store.resume("accept_many_then", refuse=first == "refused")
        if first == "refused":
            assert (await refused(one)).code == Code.STORE_UNAVAILABLE
            await two
            winner = "h2"
        else:
            await one
            err = await refused(two)
            assert err.code == Code.BAD_MESSAGE and "already assigned to h1" in err.message
            winner = "h1"
        rec = await node.tickets.get("acme", tid)
        assert (rec["status"], rec["assignee"]) == ("assigned", winner)
        got = await till.receive(timeout=3)
        assert got.kind == "ticket.assign"
        await got.ack()
        await nothing_for(till)                        # one assignment delivered
    finally:
        await node.stop()


@aiotest()
async def test_a_chat_message_the_store_refuses_changes_no_conversation():
    node, store = await failing_node()
    try:
        agent = await connect(node, "a1", store="cs", roles=("service",))
        cust = await connect(node, "app1", store="s1", roles=("customer",), member="m1")
        hello = {"conversation": "cv1", "text": "hello"}
        store.fail("accept_many_then", None, when=carrying("chat.message"))
        err = await refused(cust.send("chat.message", hello, SERVICE, ref=31))
        assert err.code == Code.STORE_UNAVAILABLE
        assert node.chat.convs == {}
        assert await node.store.records.scan("conv") == [] and await node.store.records.scan("chat") == []
        await nothing_for(agent)

        store.heal("accept_many_then")
        ack = await cust.send("chat.message", hello, SERVICE, ref=31)
        assert orjson.loads(ack.payload) == {"conversation": "cv1", "recipients": 1}
        msg = await agent.receive(timeout=3)
        assert msg.body["text"] == "hello"
        await msg.ack()
        conv = dict(node.chat.convs["acme/cv1"])
        assert conv["agent"] == ""

        # The first agent's answer refused: the conversation still has no agent.
        hi = {"conversation": "cv1", "text": "hi"}
        store.fail("accept_many_then", None, when=carrying("chat.message"))
        err = await refused(agent.send("chat.message", hi, "chat:acme/cv1", ref=32))
        assert err.code == Code.STORE_UNAVAILABLE
        assert node.chat.convs["acme/cv1"] == conv
        await nothing_for(cust)

        store.heal("accept_many_then")
        ack = await agent.send("chat.message", hi, "chat:acme/cv1", ref=32)
        assert not ack.flags & Flag.RETRANSMIT
        assert (await cust.receive(timeout=3)).body["text"] == "hi"
        assert node.chat.convs["acme/cv1"]["agent"] == "terminal:acme/a1"
        again = await agent.send("chat.message", hi, "chat:acme/cv1", ref=32)
        assert again.flags & Flag.RETRANSMIT and again.msg_id == ack.msg_id
        await nothing_for(cust)
        items, _ = await cust.history("chat:acme/cv1", Lane.P1)
        assert [orjson.loads(f.payload)["text"] for f in items] == ["hello", "hi"]
    finally:
        await node.stop()


@aiotest()
async def test_a_message_behind_a_refused_first_one_starts_the_conversation():
    """A customer's second message comes while the first (which would create the
    conversation) is being committed; the first is refused: the second is routed
    by what was committed (no conversation yet) and creates it."""
    node, store = await failing_node()
    try:
        agent = await connect(node, "a1", store="cs", roles=("service",))
        cust = await connect(node, "app1", store="s1", roles=("customer",), member="m1")
        store.hold("accept_many_then", when=carrying("chat.message"))
        one = asyncio.ensure_future(
            cust.send("chat.message", {"conversation": "cv1", "text": "one"}, SERVICE))
        await eventually(lambda: store.held)
        frames = node.counters.lane_frames_in[Lane.P1]
        two = asyncio.ensure_future(
            cust.send("chat.message", {"conversation": "cv1", "text": "two"}, SERVICE))
        await eventually(lambda: node.counters.lane_frames_in[Lane.P1] == frames + 1)
        await asyncio.sleep(0.05)
        assert kinds_of(store.held) == ["chat.message"]          # the second waits for its turn
        assert node.chat.convs == {}
        store.resume("accept_many_then", refuse=True)
        assert (await refused(one)).code == Code.STORE_UNAVAILABLE
        ack = await two
        assert orjson.loads(ack.payload) == {"conversation": "cv1", "recipients": 1}
        assert (await agent.receive(timeout=3)).body["text"] == "two"
        await nothing_for(agent)
        assert node.chat.convs["acme/cv1"]["customer"] == "terminal:acme/app1"
        items, _ = await cust.history("chat:acme/cv1", Lane.P1)
        assert [orjson.loads(f.payload)["text"] for f in items] == ["two"]
    finally:
        await node.stop()


# -- written behind ---------------------------------------------------------------------

def _quick_retries(monkeypatch, seconds: float) -> None:
    monkeypatch.setattr(tickets_module, "RETRY_DELAY", seconds)
    monkeypatch.setattr(chat_module, "RETRY_DELAY", seconds)
    monkeypatch.setattr(offers_module, "FLUSH_DELAY", seconds)


async def _one_of_each(node):
    """A ticket, a conversation with one message and a member's cap count."""
    till = await connect(node, "t1", store="s1", roles=("pos",))
    cust = await connect(node, "app1", store="s1", roles=("customer",), member="m1")
    be = await connect(node, "hq", store="hq", roles=("backend",))
    tid = orjson.loads((await till.send("ticket.open", {"code": "E42"}, STAFF)).payload)[
        "ticket"]
    await cust.send("chat.message", {"conversation": "cv1", "text": "hello"}, SERVICE)
    assert orjson.loads((await be.send("promo.offer", offer(1), "member:acme/m1")).payload)[
        "delivered"] == 1
    await cust.receive(timeout=3)
    return tid


async def _stored(store, tid: str) -> dict:
    return {"ticket": await store.records.get("ticket", f"acme/{tid}") is not None,
            "conv": await store.records.get("conv", "acme/cv1") is not None,
            "chat": len(await store.records.scan("chat", "acme/cv1/")),
            "cap": await store.records.get("cap", "acme/m1") is not None}


@aiotest()
async def test_records_the_store_refuses_stay_due_and_are_written_once_it_recovers(
        monkeypatch):
    _quick_retries(monkeypatch, 0.05)
    node, store = await failing_node(**{"offers.cap_count": 5})
    try:
        refuse_puts(store)
        tid = await _one_of_each(node)               # acknowledged all the same
        await eventually(lambda: set(refused_puts(store)) == NAMESPACES)
        await asyncio.sleep(0.3)                     # retried, refused again, kept
        assert refused_puts(store).count("ticket") >= 2
        assert await _stored(node.store, tid) == \
            {"ticket": False, "conv": False, "chat": 0, "cap": False}
        assert f"acme/{tid}" in node.tickets.unsaved
        assert ("conv", "acme/cv1") in node.chat.unsaved and len(node.chat.unsaved) == 2
        assert ("acme", "m1") in node.offers.unsaved
        store.heal("records.put")
        for service in (node.tickets, node.chat, node.offers):
            await eventually(lambda service=service: len(service.unsaved) == 0)
        assert await _stored(node.store, tid) == \
            {"ticket": True, "conv": True, "chat": 1, "cap": True}
        rec = orjson.loads(await node.store.records.get("ticket", f"acme/{tid}"))
        assert rec["status"] == "open"
    finally:
        await node.stop()


@pytest.mark.parametrize("recovered", [True, False])
@aiotest()
async def test_stop_writes_the_records_still_due(tmp_path, monkeypatch, recovered):
    """Retries far away: what is due at stop is written by stop's flush (the store
    works again), or stays unwritten without stop hanging (it still refuses)."""
    _quick_retries(monkeypatch, 60.0)
    node, store = await failing_node(tmp_path, "sqlite", **{"offers.cap_count": 5})
    try:
        refuse_puts(store)
        tid = await _one_of_each(node)
        assert await _stored(node.store, tid) == \
            {"ticket": False, "conv": False, "chat": 0, "cap": False}
        assert len(node.offers.unsaved) == 1          # (its first write is 60 s away)
        if recovered:
            store.heal("records.put")
    finally:
        started = time.monotonic()
        await node.stop()
        assert time.monotonic() - started < 5.0
    monkeypatch.undo()
    node = await start_node(make_config(str(tmp_path), **{"store.backend": "sqlite"}))
    try:
        assert await _stored(node.store, tid) == (
            {"ticket": True, "conv": True, "chat": 1, "cap": True} if recovered else
            {"ticket": False, "conv": False, "chat": 0, "cap": False})
        if recovered:
            assert (await node.tickets.get("acme", tid))["status"] == "open"
            assert list(node.chat.convs) == ["acme/cv1"]
            assert len(node.offers.counts[("acme", "m1")]) == 1
    finally:
        await node.stop()


@aiotest()
async def test_write_behind_backs_off_keeps_a_change_made_during_a_write_and_flushes():
    node = await start_node()
    try:
        attempts: list[tuple[float, str, object]] = []
        written: dict = {}
        successes: list = []
        failing = [True]
        hold = asyncio.Event()
        hold.set()

        async def write(key, value):
            attempts.append((time.monotonic(), key, value))
            await hold.wait()
            if failing[0]:
                raise OSError("database is locked")
            written[key] = value
            successes.append((key, value))

        wb = WriteBehind(node, write, retry=0.05, retry_max=0.2, what="test records")
        wb.put("a", 1)
        await eventually(lambda: len(attempts) >= 6)
        gaps = [b[0] - a[0] for a, b in zip(attempts, attempts[1:])]
        # Doubling from 0.05 s, then capped at 0.2 s (lower bounds: the machine is noisy).
        for gap, least in zip(gaps, (0.045, 0.09, 0.18, 0.18, 0.18)):
            assert gap >= least, gaps
        assert max(gaps) < 1.0, gaps
        assert "a" in wb and wb.get("a") == 1
        with pytest.raises(OSError):
            await wb.flush()                        # refused: raised, and still due
        assert "a" in wb

        # A put while the key is being written: that write does not clear it,
        # the newer value is written after it.
        failing[0] = False
        hold.clear()
        tried = len(attempts)
        writing = asyncio.ensure_future(wb.flush())
        await eventually(lambda: len(attempts) == tried + 1)
        wb.put("a", 2)
        hold.set()
        await writing
        await eventually(lambda: "a" not in wb)
        assert successes == [("a", 1), ("a", 2)] and written == {"a": 2}

        # A key put and awaited: written() returns once it was tried.
        wb.put("b", 3)
        await asyncio.wait_for(wb.written("b"), 2)
        assert written["b"] == 3 and len(wb) == 0
    finally:
        await node.stop()
    # Once the host stops nothing is scheduled; flush still writes.
    tried = len(attempts)
    wb.put("c", 4)
    await asyncio.sleep(0.2)
    assert len(attempts) == tried and "c" in wb
    await wb.written("c")                           # (returns at once: stopping)
    await wb.flush()
    assert written["c"] == 4 and len(wb) == 0


@aiotest()
async def test_a_waiting_tickets_hand_over_claim_the_store_refuses_leaves_it_waiting():
    # A fleet node (records shared with other workers): a waiting ticket is
    # handed to the first staff login only once the hand-over is claimed in
    # the records (staff on two workers at once must not both get it).  The
    # claim refused: the ticket stays waiting, the next login gets it.  The
    # hand-over's message refused: the claim is given back, and the ticket
    # still waits.
    from tillwire.server.node import Node
    from tillwire.server.registry_memory import MemoryRegistry

    cfg = make_config()
    store = Failing(make_store(cfg))
    node = Node(cfg, store, loop=asyncio.get_running_loop(), node_id="n",
                registry=MemoryRegistry())          # (a registry given: shared, as a fleet's)
    await node.start()
    try:
        assert node.shared_registry
        till = await connect(node, "t1", store="s1", roles=("pos",))
        ack = await till.send("ticket.open", {"code": "E42"}, STAFF)
        tid = orjson.loads(ack.payload)["ticket"]
        key = f"acme/{tid}"
        store.fail("records.put_new", 1, when=lambda ns, *_: ns == "tickethand")
        first = await connect(node, "h1", store="s1", roles=("staff",))
        await eventually(lambda: store.calls["records.put_new"] >= 1)
        await nothing_for(first)
        assert node.tickets.waiting == {("acme", "s1"): {key}}
        assert await node.store.records.get("tickethand", key) is None
        # Its message refused: the claim goes back, the ticket waits on.
        store.fail("accept_many_then", 1, when=carrying("ticket.open"))
        await first.close()
        second = await connect(node, "h2", store="s1", roles=("staff",))
        await eventually(lambda: kinds_of(store.refused) == ["ticket.open"])
        await eventually(lambda: store.calls["records.delete"] >= 1)
        await nothing_for(second)
        assert node.tickets.waiting == {("acme", "s1"): {key}}
        assert await node.store.records.get("tickethand", key) is None
        # The next login gets it, claimed once.
        third = await connect(node, "h3", store="s1", roles=("staff",))
        msg = await third.receive(timeout=3)
        assert (msg.kind, msg.body["ticket"]) == ("ticket.open", tid)
        await msg.ack()
        assert await node.store.records.get("tickethand", key) == b"n"
        await eventually(lambda: node.tickets.waiting == {})
    finally:
        await node.stop()
