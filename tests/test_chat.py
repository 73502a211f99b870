"""Customer-service chat end to end (server/chat.py).

Real nodes over loopback sockets: a customer's first message opens a
conversation and reaches every agent, the first agent to answer owns it,
nobody else may post, history is answered to the customer and to agents
(through the SDK after a reconnect, and after a restart with the SQLite
store), receipts work, and retention deletes old conversations.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from support import aiotest, connect, eventually, make_config, start_node, token
from tillwire.client import sdk
from tillwire.client.connection import SendError
from tillwire.core.codes import Code, FrameType, Lane, ReceiptStatus

SERVICE = "role:acme/*/service"


async def nothing_for(conn, seconds: float = 0.3) -> None:
    with pytest.raises(asyncio.TimeoutError):
        msg = await conn.receive(timeout=seconds)
        raise AssertionError(f"unexpected {msg!r} {msg.body}")


async def customer(node, name: str = "app1", member: str = "m1"):
    return await connect(node, name, store="s1", roles=("customer",), member=member)


@aiotest()
async def test_conversation_routing_agents_and_ownership():
    node = await start_node()
    try:
        a1 = await connect(node, "a1", store="cs", roles=("service",))
        a2 = await connect(node, "a2", store="cs", roles=("service",))
        cust = await customer(node)
        ack = await cust.send("chat.message", {"conversation": "cv1", "text": "Where is my order?"},
                              SERVICE)
        assert orjson.loads(ack.payload) == {"conversation": "cv1", "recipients": 2}
        assert ack.msg_id > 0
        for agent in (a1, a2):
            msg = await agent.receive(timeout=3)
            assert (msg.kind, msg.lane, msg.id) == ("chat.message", Lane.P1, ack.msg_id)
            # The server stamps who wrote it (the customer's terminal address).
            assert msg.body == {"conversation": "cv1", "text": "Where is my order?",
                                "from": "terminal:acme/app1"}
            await msg.ack()
        conv = node.chat.convs["acme/cv1"]
        assert (conv["member"], conv["customer"], conv["agent"]) == \
            ("m1", "terminal:acme/app1", "")
        # The first agent to answer owns the conversation; replies go to the customer.
        ack = await a1.send("chat.message", {"conversation": "cv1", "text": "Let me check"},
                            "chat:acme/cv1")
        assert orjson.loads(ack.payload)["recipients"] == 1
        assert (await cust.receive(timeout=3)).body["text"] == "Let me check"
        assert node.chat.convs["acme/cv1"]["agent"] == "terminal:acme/a1"
        await cust.send("chat.message", {"conversation": "cv1", "text": "Thanks",
                                         "attachments": [{"url": "https://cdn.example/r.jpg",
                                                          "mime": "image/jpeg", "size": 2048}]},
                        "chat:acme/cv1")
        got = await a1.receive(timeout=3)
        assert got.body["attachments"][0]["mime"] == "image/jpeg"
        await nothing_for(a2)
        # Another agent may still answer (the customer gets it; the owner stays).
        await a2.send("chat.message", {"conversation": "cv1", "text": "Also: 10% off"},
                      "chat:acme/cv1")
        assert (await cust.receive(timeout=3)).body["text"] == "Also: 10% off"
        assert node.chat.convs["acme/cv1"]["agent"] == "terminal:acme/a1"
    finally:
        await node.stop()


@aiotest()
async def test_nobody_else_may_post_and_bad_messages_name_the_field():
    node = await start_node()
    try:
        agent = await connect(node, "a1", store="cs", roles=("service",))
        cust = await customer(node)
        intruder = await customer(node, "app2", "m2")
        till = await connect(node, "t1", store="s1", roles=("pos",))
        await cust.send("chat.message", {"conversation": "cv1", "text": "hi"}, SERVICE)
        cases = [
            (intruder, {"conversation": "cv1", "text": "me too"}, "chat:acme/cv1",
             Code.BAD_MESSAGE, "is taken"),
            (till, {"conversation": "cv1", "text": "hello"}, "chat:acme/cv1",
             Code.FORBIDDEN, "not yours"),
            (till, {"conversation": "cv9", "text": "hello"}, "chat:acme/cv9",
             Code.FORBIDDEN, "only customers"),
            (agent, {"conversation": "cv9", "text": "hello?"}, "chat:acme/cv9",
             Code.BAD_MESSAGE, "body.conversation"),
            (cust, {"conversation": "cv2", "text": "x"}, "chat:acme/cv1",
             Code.BAD_MESSAGE, "body.conversation"),
            (agent, {"conversation": "cv1", "text": "x"}, "terminal:acme/app1",
             Code.BAD_MESSAGE, "to:"),
            (cust, {"conversation": "cv1"}, "chat:acme/cv1", Code.BAD_MESSAGE, "body.text"),
            (cust, {"conversation": "cv1", "text": "x", "data": "aGk="}, "chat:acme/cv1",
             Code.BAD_MESSAGE, "body.data"),
            (cust, {"conversation": "cv1", "attachments": [
                {"url": "https://x/y", "mime": "text/html", "size": 1}]}, "chat:acme/cv1",
             Code.BAD_MESSAGE, "body.attachments[0].mime"),
            (cust, {"conversation": "cv1", "text": "my card is 4111 1111 1111 1111"},
             "chat:acme/cv1", Code.CARD_DATA, "body.text"),
            (cust, {"conversation": "cv1", "text": "x"}, "chat:globex/cv1",
             Code.BAD_ADDRESS, "another tenant"),
        ]
        for sender, body, to, code, words in cases:
            with pytest.raises(SendError) as err:
                await sender.send("chat.message", body, to)
            assert err.value.code == code and words in err.value.message, (body, err.value)
        with pytest.raises(SendError) as err:
            await cust.send("chat.message", {"conversation": "cv1", "text": "x"},
                            "chat:acme/cv1", lane=Lane.P3)
        assert err.value.code in (Code.FORBIDDEN, Code.BAD_MESSAGE)
        assert (await agent.receive(timeout=3)).body["text"] == "hi"
        await nothing_for(agent, 0.1)
    finally:
        await node.stop()


@aiotest()
async def test_delivery_and_read_receipts_reach_the_sender():
    node = await start_node()
    try:
        agent = await connect(node, "a1", store="cs", roles=("service",))
        cust = await customer(node)
        ack = await cust.send("chat.message", {"conversation": "cv1", "text": "hello"}, SERVICE,
                              receipt=True)
        msg = await agent.receive(timeout=3)
        r = await asyncio.wait_for(cust.receipts.get(), 3)
        assert (r.code, r.msg_id, r.ref, r.to) == \
            (ReceiptStatus.DELIVERED, ack.msg_id, ack.ref, "terminal:acme/a1")
        await msg.ack()
        r = await asyncio.wait_for(cust.receipts.get(), 3)
        assert (r.code, r.msg_id, r.ref, r.to) == \
            (ReceiptStatus.ACKED, ack.msg_id, ack.ref, "terminal:acme/a1")
        agent.read(msg.id)
        r = await asyncio.wait_for(cust.receipts.get(), 3)
        assert (r.code, r.msg_id, r.to) == (ReceiptStatus.READ, ack.msg_id, "terminal:acme/a1")
        # And the other way round (read at once: DELIVERED and READ may cross).
        ack = await agent.send("chat.message", {"conversation": "cv1", "text": "hi!"},
                               "chat:acme/cv1", receipt=True)
        msg = await cust.receive(timeout=3)
        cust.read(msg.id)
        got = {}
        while len(got) < 2:
            r = await asyncio.wait_for(agent.receipts.get(), 3)
            assert (r.msg_id, r.to) == (ack.msg_id, "terminal:acme/app1")
            got[r.code] = got.get(r.code, 0) + 1
        assert got == {ReceiptStatus.DELIVERED: 1, ReceiptStatus.READ: 1}
    finally:
        await node.stop()


@aiotest()
async def test_history_after_reconnect_through_the_sdk(tmp_path):
    node = await start_node()
    host, port = node.addresses[0]
    try:
        agent = await connect(node, "a1", store="cs", roles=("service",))
        app_token = token("app1", store="s1", roles=("customer",), member="m1")
        state = str(tmp_path / "app1.json")
        client = await sdk.connect(host, port, token=app_token, state_path=state)
        for i in range(3):
            await client.send("chat.message", {"conversation": "cv1", "text": f"q{i}"}, SERVICE)
        for i in range(3):
            await (await agent.receive(timeout=3)).ack()
        await agent.send("chat.message", {"conversation": "cv1", "text": "answer"},
                         "chat:acme/cv1")
        msg = await client.receive(timeout=3)
        await msg.ack()
        await client.close()

        client = await sdk.connect(host, port, token=app_token, state_path=state)
        try:
            items, end = await client.history("chat:acme/cv1", Lane.P1, count=10)
            assert [orjson.loads(f.payload)["text"] for f in items] == ["q0", "q1", "q2", "answer"]
            # Each item says who wrote it, so a chat screen can be rebuilt.
            writers = [orjson.loads(f.payload)["from"] for f in items]
            assert writers[:3] == ["terminal:acme/app1"] * 3 and writers[3] == "terminal:acme/a1"
            assert all(f.kind == "chat.message" and f.msg_id for f in items)
            assert items[-1].msg_id == msg.id
            offsets = [f.offset for f in items]
            assert offsets == sorted(offsets) and abs(offsets[-1] / 1000 - time.time()) < 60
            assert (end.count, end.offset, end.code) == (4, offsets[-1], Code.OK)
            items, end = await client.history("chat:acme/cv1", Lane.P1, count=2)
            assert [orjson.loads(f.payload)["text"] for f in items] == ["q2", "answer"]
        finally:
            await client.close()
        # Any service agent reads it; other customers and tills may not.
        items, _ = await agent.history("chat:acme/cv1", Lane.P1, count=100)
        assert len(items) == 4
        other = await customer(node, "app2", "m2")
        till = await connect(node, "t1", store="s1", roles=("pos",))
        for who in (other, till):
            with pytest.raises(SendError) as err:
                await who.history("chat:acme/cv1", Lane.P1)
            assert err.value.code == Code.FORBIDDEN
        with pytest.raises(SendError) as err:
            await agent.history("chat:acme/nope", Lane.P1)
        assert err.value.code == Code.UNKNOWN_CHANNEL
        with pytest.raises(SendError) as err:
            await other.history("chat:acme/nope", Lane.P1)
        assert err.value.code == Code.FORBIDDEN
        with pytest.raises(SendError) as err:
            await agent.history("chat:acme/cv1", Lane.P3)
        assert err.value.code == Code.BAD_REQUEST
    finally:
        await node.stop()


@aiotest()
async def test_conversations_and_history_survive_a_restart_and_retention_deletes_them(tmp_path):
    cfg = make_config(str(tmp_path), **{"store.backend": "sqlite"})
    node = await start_node(cfg)
    try:
        agent = await connect(node, "a1", store="cs", roles=("service",))
        cust = await customer(node)
        await cust.send("chat.message", {"conversation": "cv1", "text": "before"}, SERVICE)
        await (await agent.receive(timeout=3)).ack()
        await agent.send("chat.message", {"conversation": "cv1", "text": "reply"},
                         "chat:acme/cv1")
    finally:
        await node.stop()
    node = await start_node(cfg)
    try:
        assert node.chat.convs["acme/cv1"]["agent"] == "terminal:acme/a1"
        cust = await customer(node)
        msg = await cust.receive(timeout=3)            # the reply waited in the inbox
        assert msg.body["text"] == "reply"
        items, _ = await cust.history("chat:acme/cv1", Lane.P1)
        assert [orjson.loads(f.payload)["text"] for f in items] == ["before", "reply"]
        # Later messages go to the owner (the conversation was reloaded).
        agent = await connect(node, "a1", store="cs", roles=("service",))
        await cust.send("chat.message", {"conversation": "cv1", "text": "after"},
                        "chat:acme/cv1")
        assert (await agent.receive(timeout=3)).body["text"] == "after"
        # A maintenance round far in the future: everything is past retention.chat.
        convs, messages = await node.chat.expire(time.time() + cfg.retention.chat + 10)
        assert (convs, messages) == (1, 3)
        assert node.chat.convs == {}
        assert await node.store.records.scan("chat") == []
        with pytest.raises(SendError) as err:
            await agent.history("chat:acme/cv1", Lane.P1)
        assert err.value.code == Code.UNKNOWN_CHANNEL
    finally:
        await node.stop()


@aiotest()
async def test_history_frames_on_the_wire():
    """HISTORY of a conversation answers HISTORY_ITEMs on P1 then HISTORY_END."""
    node = await start_node()
    try:
        await connect(node, "a1", store="cs", roles=("service",))
        cust = await customer(node)
        await cust.send("chat.message", {"conversation": "cv1", "text": "one"}, SERVICE)
        items, end = await cust.history("chat:acme/cv1", Lane.P1)
        assert [(f.type, f.flags & 3) for f in items] == [(FrameType.HISTORY_ITEM, Lane.P1)]
        assert end.type == FrameType.HISTORY_END and end.count == 1
    finally:
        await node.stop()


@aiotest()
async def test_conversation_ids_are_address_segments_so_no_history_mixes():
    """A conversation id with '/' or ':' could never be addressed (chat:<t>/<id>) and its
    history records would sit under another conversation's key prefix: another customer
    could push messages into (or read) someone else's conversation history."""
    node = await start_node()
    try:
        agent = await connect(node, "a1", store="cs", roles=("service",))
        victim = await customer(node)
        intruder = await customer(node, "app2", "m2")
        await victim.send("chat.message", {"conversation": "cv1", "text": "mine"}, SERVICE)
        await (await agent.receive(timeout=3)).ack()
        for conv in ("cv1/1-", "cv1:x"):
            with pytest.raises(SendError) as err:
                await intruder.send("chat.message", {"conversation": conv, "text": "injected"},
                                    SERVICE)
            assert err.value.code == Code.BAD_MESSAGE, err.value
            assert "body.conversation" in err.value.message
        items, end = await victim.history("chat:acme/cv1", Lane.P1)
        assert [orjson.loads(f.payload)["text"] for f in items] == ["mine"]
        assert end.count == 1
        assert list(node.chat.convs) == ["acme/cv1"]
    finally:
        await node.stop()


@aiotest()
async def test_history_keeps_order_and_pages_without_loss_within_one_millisecond(monkeypatch):
    """Messages written in the same millisecond: history stays in the order they were
    sent (msg id 10 after 9) and paging by offset loses none of them."""
    import types

    from tillwire.server import chat as chat_module

    frozen = time.time()
    monkeypatch.setattr(chat_module, "time", types.SimpleNamespace(time=lambda: frozen))
    node = await start_node()
    try:
        agent = await connect(node, "a1", store="cs", roles=("service",))
        cust = await customer(node)
        texts = [f"q{i}" for i in range(12)]
        for text in texts:
            await cust.send("chat.message", {"conversation": "cv1", "text": text}, SERVICE)
        items, end = await cust.history("chat:acme/cv1", Lane.P1, count=100)
        assert [orjson.loads(f.payload)["text"] for f in items] == texts
        offsets = [f.offset for f in items]
        assert offsets == sorted(set(offsets)), offsets          # distinct, increasing
        assert abs(offsets[0] - frozen * 1000) < 1000
        # Page through from the first one, three at a time.
        first, _ = await agent.history("chat:acme/cv1", Lane.P1, count=100)
        offset = first[0].offset
        got = [orjson.loads(first[0].payload)["text"]]
        while True:
            page, end = await agent.history("chat:acme/cv1", Lane.P1, offset=offset, count=3)
            if not page:
                break
            got += [orjson.loads(f.payload)["text"] for f in page]
            offset = end.offset
        assert got == texts
    finally:
        await node.stop()


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
@aiotest()
async def test_history_of_a_long_conversation_reads_only_the_newest(tmp_path, backend):
    """A conversation of more than MAX_HISTORY (1000) messages: HISTORY without an
    offset answers the newest ``count`` (1000 at most), oldest first, from one
    bounded newest-first store read, not a scan of the whole conversation."""
    from tillwire.server.chat import CHAT_NS, MAX_HISTORY

    node = await start_node(make_config(str(tmp_path), **{"store.backend": backend}))
    try:
        await connect(node, "a1", store="cs", roles=("service",))
        cust = await customer(node)
        await cust.send("chat.message", {"conversation": "cv1", "text": "newest"}, SERVICE)
        # 1500 older messages written straight into the history (as earlier
        # sends would have), each one ms apart.
        base = 1_600_000_000_000
        older = 1500
        for i in range(older):
            record = orjson.dumps({"id": 10_000 + i, "from": "terminal:acme/app1",
                                   "kind": "chat.message",
                                   "body": {"conversation": "cv1", "text": f"old{i}"},
                                   "ts": (base + i) / 1000})
            await node.store.records.put(CHAT_NS, f"acme/cv1/{base + i:013d}-{10_000 + i}", record,
                                         time.time())
        scans = []
        real_scan = node.store.records.scan

        async def counted(*args, **kwargs):
            page = await real_scan(*args, **kwargs)
            scans.append((args, kwargs, len(page)))
            return page

        node.store.records.scan = counted
        items, end = await cust.history("chat:acme/cv1", Lane.P1, count=3)
        assert [orjson.loads(f.payload)["text"] for f in items] == ["old1498", "old1499",
                                                                    "newest"]
        assert [f.offset for f in items[:2]] == [base + 1498, base + 1499]
        assert items[2].offset > base + 1499
        assert [f.msg_id for f in items[:2]] == [11_498, 11_499]
        assert (end.count, end.offset, end.code) == (3, items[-1].offset, Code.OK)
        assert len(scans) == 1 and scans[0][1].get("reverse") is True and scans[0][2] == 3

        scans.clear()
        items, end = await cust.history("chat:acme/cv1", Lane.P1, count=0)    # = MAX_HISTORY
        # One newest-first read of the window, answered a page at a time
        # (limits.history_page): the rest follows from the END's offset.
        page = node.cfg.limits.history_page
        assert len(items) == end.count == page and end.code == Code.PARTIAL
        assert len(scans) == 1 and scans[0][2] == MAX_HISTORY
        while end.code == Code.PARTIAL:
            more, end = await cust.history("chat:acme/cv1", Lane.P1, offset=end.offset,
                                           count=MAX_HISTORY - len(items))
            items += more
        texts = [orjson.loads(f.payload)["text"] for f in items]
        assert len(items) == MAX_HISTORY
        assert texts == [f"old{i}" for i in range(older - MAX_HISTORY + 1, older)] + ["newest"]
        offsets = [f.offset for f in items]
        assert offsets == sorted(set(offsets)) and end.offset == offsets[-1]

        # Paging on from an offset still answers oldest first after it.
        items, end = await cust.history("chat:acme/cv1", Lane.P1, offset=base + 10, count=4)
        assert [orjson.loads(f.payload)["text"] for f in items] == \
            ["old11", "old12", "old13", "old14"]
        assert end.offset == base + 14
    finally:
        await node.stop()


@aiotest()
async def test_history_answers_an_error_when_the_store_fails():
    node = await start_node()
    try:
        await connect(node, "a1", store="cs", roles=("service",))
        cust = await customer(node)
        await cust.send("chat.message", {"conversation": "cv1", "text": "one"}, SERVICE)

        async def broken(*args, **kwargs):
            raise OSError("disk on fire")

        node.store.records.scan = broken
        with pytest.raises(SendError) as err:
            await cust.history("chat:acme/cv1", Lane.P1, timeout=3)
        assert err.value.code == Code.STORE_UNAVAILABLE
    finally:
        await node.stop()


@aiotest()
async def test_another_member_on_the_same_terminal_id_is_not_the_customer():
    """The conversation belongs to the member who started it: a token of another
    member for the same app terminal may neither read nor post to it (posting, it is
    told the id is taken)."""
    node = await start_node()
    try:
        agent = await connect(node, "a1", store="cs", roles=("service",))
        first = await customer(node, "app1", "m1")
        await first.send("chat.message", {"conversation": "cv1", "text": "my address is ..."},
                         SERVICE)
        await (await agent.receive(timeout=3)).ack()
        await first.close()
        other = await customer(node, "app1", "m2")
        with pytest.raises(SendError) as err:
            await other.history("chat:acme/cv1", Lane.P1)
        assert err.value.code == Code.FORBIDDEN
        with pytest.raises(SendError) as err:
            await other.send("chat.message", {"conversation": "cv1", "text": "hi"},
                             "chat:acme/cv1")
        assert err.value.code == Code.BAD_MESSAGE and "is taken" in err.value.message
        await nothing_for(agent, 0.1)
    finally:
        await node.stop()


@aiotest()
async def test_a_message_in_flight_does_not_bring_back_a_forgotten_member():
    """DELETE /v1/members while a message of the member is being stored: the
    conversation and its history must not be written back afterwards."""
    node = await start_node()
    try:
        agent = await connect(node, "a1", store="cs", roles=("service",))
        cust = await customer(node)
        await cust.send("chat.message", {"conversation": "cv1", "text": "one"}, SERVICE)
        await (await agent.receive(timeout=3)).ack()
        gate = asyncio.Event()
        entered = asyncio.Event()
        accept_many_then = node.store.accept_many_then
        held_back = []

        def held(batch, callback):          # the store takes its time with this batch
            entered.set()

            async def later():
                await gate.wait()
                accept_many_then(batch, callback)
            held_back.append(asyncio.ensure_future(later()))

        node.store.accept_many_then = held
        sending = asyncio.ensure_future(
            cust.send("chat.message", {"conversation": "cv1", "text": "two"}, "chat:acme/cv1"))
        await asyncio.wait_for(entered.wait(), 3)
        assert await node.chat.forget_member("acme", "m1") == (1, 1)
        node.store.accept_many_then = accept_many_then
        gate.set()
        await sending                                   # accepted and delivered all the same
        assert (await agent.receive(timeout=3)).body["text"] == "two"
        await asyncio.sleep(0.05)
        assert node.chat.convs == {}
        assert await node.store.records.scan("conv") == []
        assert await node.store.records.scan("chat") == []
    finally:
        await node.stop()


@aiotest()
async def test_an_accepted_message_whose_history_write_failed_is_acked_and_kept_later():
    """The store took the message (it is delivered) but refused its history record:
    the sender must not be told 'not stored, retry' (a retry is only a duplicate and
    the message would be missing from the history for good); the record is written
    once the store works again."""
    node = await start_node()
    try:
        agent = await connect(node, "a1", store="cs", roles=("service",))
        cust = await customer(node)
        await cust.send("chat.message", {"conversation": "cv1", "text": "one"}, SERVICE)
        await (await agent.receive(timeout=3)).ack()
        kv_put = node.store.records.put
        fail = [True]

        async def flaky(ns, *args):
            if fail[0] and ns in ("chat", "conv"):
                raise OSError("database is locked")
            return await kv_put(ns, *args)

        node.store.records.put = flaky
        ack = await cust.send("chat.message", {"conversation": "cv1", "text": "two"},
                              "chat:acme/cv1")
        assert orjson.loads(ack.payload) == {"conversation": "cv1", "recipients": 1}
        assert (await agent.receive(timeout=3)).body["text"] == "two"
        fail[0] = False

        async def texts():
            items, _ = await cust.history("chat:acme/cv1", Lane.P1)
            return [orjson.loads(f.payload)["text"] for f in items]

        for _ in range(50):
            if await texts() == ["one", "two"]:
                break
            await asyncio.sleep(0.1)
        assert await texts() == ["one", "two"]
    finally:
        await node.stop()


@aiotest()
async def test_a_damaged_conversation_record_is_skipped_at_start(tmp_path):
    cfg = make_config(str(tmp_path), **{"store.backend": "sqlite"})
    node = await start_node(cfg)
    try:
        await connect(node, "a1", store="cs", roles=("service",))
        cust = await customer(node)
        await cust.send("chat.message", {"conversation": "cv1", "text": "hi"}, SERVICE)
        now = time.time()
        for key, value in (("acme/cv2", b"{broken"), ("acme/cv3", b'{"updated": 1e12}'),
                           ("acme/cv4", b"[]")):
            await node.store.records.put("conv", key, value, now)
    finally:
        await node.stop()
    node = await start_node(cfg)
    try:
        assert list(node.chat.convs) == ["acme/cv1"]
        cust = await customer(node)
        await cust.send("chat.message", {"conversation": "cv1", "text": "again"},
                        "chat:acme/cv1")
    finally:
        await node.stop()


@aiotest()
async def test_a_conversation_id_taken_by_another_customer_asks_for_a_new_random_id():
    """Two customers choosing the same id: the second is told the id is taken and to
    choose a new random one (BAD_MESSAGE naming body.conversation, whose it is is not
    said), not FORBIDDEN for the conversation's whole lifetime; with a new id it works."""
    node = await start_node()
    try:
        agent = await connect(node, "a1", store="cs", roles=("service",))
        first = await customer(node, "app-b", "m-b")
        second = await customer(node, "app-a", "m-a")
        await first.send("chat.message", {"conversation": "c-20250101-7f3a", "text": "hi"},
                         SERVICE)
        await (await agent.receive(timeout=3)).ack()
        for to in (SERVICE, "chat:acme/c-20250101-7f3a"):
            with pytest.raises(SendError) as err:
                await second.send("chat.message",
                                  {"conversation": "c-20250101-7f3a", "text": "order?"}, to)
            assert err.value.code == Code.BAD_MESSAGE, err.value
            words = err.value.message
            assert "body.conversation" in words and "taken" in words and "random" in words
            assert "m-b" not in words and "app-b" not in words
        await nothing_for(agent, 0.1)
        fresh = {"conversation": "9b2f0c1e-4d5a-46b8-a1c3-e7f2d9b0a6c4", "text": "order?"}
        ack = await second.send("chat.message", fresh, SERVICE)
        assert orjson.loads(ack.payload)["recipients"] == 1
        assert (await agent.receive(timeout=3)).body["text"] == "order?"
    finally:
        await node.stop()


@aiotest()
async def test_no_sendack_for_a_chat_message_that_did_not_ask_for_one():
    """PROTOCOL.md section 7: a SENDACK only when the SEND set ACK_REQUESTED; a
    refused one still gets its ERROR."""
    node = await start_node()
    try:
        agent = await connect(node, "a1", store="cs", roles=("service",))
        cust = await customer(node)
        till = await connect(node, "t1", store="s1", roles=("pos",))
        seen = []
        for conn in (cust, till):
            on_frame = conn._on_frame

            def spy(frame, on_frame=on_frame):
                if frame.type in (FrameType.SENDACK, FrameType.ERROR):
                    seen.append(frame)
                on_frame(frame)

            conn._on_frame = spy
        cust.session.send(Lane.P1, SERVICE, "chat.message",
                          orjson.dumps({"conversation": "cv1", "text": "hi"}), ref=91, ack=False)
        cust._schedule_write()
        assert (await agent.receive(timeout=3)).body["text"] == "hi"
        await asyncio.sleep(0.2)
        assert [f for f in seen if f.ref == 91] == []
        till.session.send(Lane.P1, "chat:acme/cv1", "chat.message",
                          orjson.dumps({"conversation": "cv1", "text": "x"}), ref=92, ack=False)
        till._schedule_write()
        await eventually(lambda: any(f.ref == 92 for f in seen))
        assert [(f.type, f.code) for f in seen if f.ref == 92] == \
            [(FrameType.ERROR, Code.FORBIDDEN)]
        ack = await cust.send("chat.message", {"conversation": "cv1", "text": "again"},
                              "chat:acme/cv1")
        assert orjson.loads(ack.payload)["conversation"] == "cv1"
    finally:
        await node.stop()
