"""Ingress pacing: P2/P3 SENDs are fanned out a budget per loop iteration, a
flooding publisher stops being read while the backlog is long, and nothing
received is ever dropped for it."""

from __future__ import annotations

import asyncio

import orjson
from support import aiotest, connect, eventually, start_node

from tillwire.core.codes import Lane
from tillwire.server import node as node_mod

FLOOD = 300


def small_pacing(monkeypatch):
    """A budget of 4 recipients per loop iteration and a backlog of 16 sends, so
    a few hundred sends are enough to see the pacing at work."""
    monkeypatch.setattr(node_mod, "BULK_BUDGET", 4)
    monkeypatch.setattr(node_mod, "BULK_BACKLOG", 16)


@aiotest()
async def test_a_flooding_publisher_is_paced_and_loses_nothing(monkeypatch):
    small_pacing(monkeypatch)
    node = await start_node()
    try:
        hq = await connect(node, "hq1", store="hq", roles=("backend",))
        till = await connect(node, "till1", store="s1")
        cashier = await connect(node, "till2", store="s1")
        payer = await connect(node, "pay1", store="hq", roles=("backend",))
        # Every update is sent before any is answered: they reach the server
        # in a few large reads, many more than BULK_BACKLOG deferred at once.
        sends = [hq.send("price.update", {"sku": f"S{i}", "price": "1.00", "version": 1},
                         "store:acme/s1", timeout=30) for i in range(FLOOD)]
        flood = asyncio.gather(*sends)
        await eventually(lambda: len(node._bulk) > 0, timeout=10, interval=0.001)
        # A payment result sent while offers wait is handled on arrival.
        paid = await payer.send("payment.result", {"order": "o1", "status": "paid",
                                                   "amount": "5.00", "currency": "CNY"}, "terminal:acme/till2")
        assert paid.msg_id > 0
        acks = await flood
        offsets = [orjson.loads(a.payload)["offset"] for a in acks]
        assert offsets == list(range(1, FLOOD + 1))          # all published, in send order
        assert node.counters.ingress_pauses >= 1             # the publisher was held back
        got = set()
        while len(got) < FLOOD:
            msg = await till.receive(timeout=10)
            got.add(msg.body["sku"])
        assert len(got) == FLOOD
        kinds = set()
        while "payment.result" not in kinds:         # till2 is in s1 too: offers arrive
            msg = await cashier.receive(timeout=5)
            kinds.add(msg.kind)
            assert msg.lane == (Lane.P0 if msg.kind == "payment.result" else Lane.P2)
        # The paused publisher is read again once the backlog drained.
        assert not node._bulk_paused
        more = await hq.send("price.update", {"sku": "late", "price": "2", "version": 1},
                             "store:acme/s1")
        assert more.payload
    finally:
        await node.stop()


@aiotest()
async def test_stopping_node_publishes_deferred_sends_first(monkeypatch):
    small_pacing(monkeypatch)
    node = await start_node()
    hq = await connect(node, "hq1", store="hq", roles=("backend",))
    sends = [asyncio.ensure_future(
        hq.send("stock.update", {"sku": f"S{i}", "quantity": 1, "version": 1}, "store:acme/s1",
                timeout=30)) for i in range(FLOOD)]
    await eventually(lambda: len(node._bulk) > 10, timeout=10, interval=0.001)
    await node.stop()
    received = node.counters.lane_frames_in[Lane.P2]
    stream = node.hub.stream("store:acme/s1", Lane.P2, create=False)
    # Every SEND the server read was appended to the channel, none left behind.
    assert received > 0 and stream is not None and stream.offset == received
    assert not node._bulk
    for fut in sends:
        fut.cancel()
    await asyncio.gather(*sends, return_exceptions=True)
