"""Two nodes in one process: each its own connection class, sessions, timers
and store, and nothing handed across; and two nodes sharing one presence and
one broker (what the workers of a cluster share), where a login on one takes
the other's session over, a lost control message is repaired by the lease
renewal, and a claim the presence refuses is retried."""

from __future__ import annotations

import asyncio

import pytest

from failing import Failing
from support import aiotest, connect, eventually, receive_orders, start_node
from tillwire.core.codes import Code
from tillwire.core.errors import SessionClosed
from tillwire.server.broker_memory import MemoryBroker, MemoryBus
from tillwire.server.presence_memory import MemoryPresence

TILL = "terminal:acme/t1"


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


async def _owner_becomes(presence, owner, timeout: float = 3.0) -> None:
    """Wait until presence says ``owner`` holds TILL (claims are written by a task)."""
    for _ in range(int(timeout / 0.02)):
        if await presence.owner(TILL) == owner:
            return
        await asyncio.sleep(0.02)
    assert await presence.owner(TILL) == owner


async def _shared_pair(broker_of=lambda broker: broker):
    """Two nodes sharing one presence and one broker bus (and nothing else)."""
    presence, bus = MemoryPresence(), MemoryBus()
    a = await start_node(node_id="a", presence=presence,
                         broker=broker_of(MemoryBroker("a", bus)))
    b = await start_node(node_id="b", presence=presence,
                         broker=broker_of(MemoryBroker("b", bus)))
    return a, b, presence


@aiotest()
async def test_a_login_on_another_node_takes_the_session_over():
    a, b, presence = await _shared_pair()
    try:
        old = await connect(a, "t1")
        await _owner_becomes(presence, "a")
        new = await connect(b, "t1")
        with pytest.raises(SessionClosed) as closed:
            await old.receive(timeout=3)
        assert closed.value.code == Code.TAKEOVER
        assert a.counters.takeovers == 1 and TILL not in a.hub.sessions
        assert await presence.owner(TILL) == "b"       # a's release did not undo b's claim
        # The new session works; a logout releases the lease.
        pay = await connect(b, "pay", store="hq", roles=("backend",))
        await pay.send("payment.result", {"order": "o1", "status": "paid"}, TILL)
        assert await receive_orders(new, 1) == [1]
        await new.close()
        await eventually(lambda: TILL not in b.hub.sessions)
        await _owner_becomes(presence, None)
    finally:
        await a.stop()
        await b.stop()


@aiotest()
async def test_a_lost_takeover_message_is_repaired_by_the_next_renewal():
    a, b, presence = await _shared_pair(Failing)
    try:
        old = await connect(a, "t1")
        b.ownership.broker.fail("send_control")      # b's word to a never arrives
        await connect(b, "t1")
        with pytest.raises(asyncio.TimeoutError):
            await old.receive(timeout=0.3)             # a has not heard
        assert TILL in a.hub.sessions
        await a.ownership.renew()                      # a's renewal finds the lease gone to b
        with pytest.raises(SessionClosed) as closed:
            await old.receive(timeout=3)
        assert closed.value.code == Code.TAKEOVER
        assert await presence.owner(TILL) == "b"
    finally:
        await a.stop()
        await b.stop()


@aiotest()
async def test_a_claim_the_presence_refuses_is_kept_and_retried():
    a, b, presence = await _shared_pair()
    a.ownership.presence = failing = Failing(presence)
    try:
        failing.fail("claim", 3)
        await connect(a, "t1")
        await _owner_becomes(presence, "a")
        assert failing.calls["claim"] == 4
    finally:
        await a.stop()
        await b.stop()
