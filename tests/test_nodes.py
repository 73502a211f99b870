"""Two nodes in one process: each its own connection class, sessions, timers
and store, and nothing handed across (the seams issue; the scale-out over a
shared broker and presence builds on this)."""

from __future__ import annotations

import asyncio

import pytest

from support import aiotest, connect, receive_orders, start_node

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
