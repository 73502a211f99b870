"""End-to-end tests of the single-node server over loopback sockets.

Each test runs a real Node (uvloop, real listening socket) and real terminal
connections; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import gc
import random
import socket
import string
import time

import orjson
import pytest

from linkem import Link
from support import (
    aiotest, connect, eventually, hello, make_config, payment_sends, read_sendacks, receive_orders,
    provision, start_node, token,
)
from tillwire.client.connection import Connection, SendError
from tillwire.core.codec import Decoder, Encoder, Frame
from tillwire.core.codes import Code, FrameType, Lane


async def raw_frames(host, port, data: bytes, *, wait: float = 2.0) -> list:
    """Send raw bytes, return every frame the server sends until it closes."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    decoder = Decoder()
    frames = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), wait)
            if not chunk:
                break
            frames.extend(decoder.feed(chunk))
    finally:
        writer.close()
    return frames


def pad(n: int) -> str:
    """Incompressible filler without digits (lz4 would shrink a repeated
    character, and digit runs could look like card numbers)."""
    rnd = random.Random(n)
    return "".join(rnd.choices(string.ascii_letters, k=n))


# -- handshake and auth -------------------------------------------------------------


@aiotest()
async def test_welcome_carries_time_heartbeat_and_identity():
    node = await start_node()
    try:
        before = time.time()
        conn = await connect(node, "till1", store="s1", roles=("pos",), region="north")
        w = conn.welcome
        assert w.version == 1
        assert w.heartbeat == 30000
        assert before * 1000 - 5 <= w.time <= time.time() * 1000 + 5
        assert w.max_frame == 65536 + 1024          # what it takes: limits.max_send_body + 1 KiB
        assert w.epoch == node.store.epoch
        assert conn.info["terminal"] == "terminal:acme/till1"
        assert conn.info["roles"] == ["pos"] and conn.info["region"] == "north"
        await conn.close()
    finally:
        await node.stop()


@aiotest()
async def test_heartbeat_request_is_clamped_to_bounds():
    node = await start_node(**{"heartbeat.min": 10.0, "heartbeat.max": 60.0})
    try:
        slow = await connect(node, "till1", heartbeat=300.0)
        fast = await connect(node, "till2", heartbeat=1.0)
        ok = await connect(node, "till3", heartbeat=45.0)
        assert slow.welcome.heartbeat == 60000
        assert fast.welcome.heartbeat == 10000
        assert ok.welcome.heartbeat == 45000
    finally:
        await node.stop()


@pytest.mark.parametrize("case, expected", [
    ("garbage", Code.AUTH_FAILED),
    ("wrong-secret", Code.AUTH_FAILED),
    ("expired", Code.TOKEN_EXPIRED),
])
@aiotest()
async def test_bad_token_gets_close_with_code(case, expected):
    node = await start_node()
    host, port = node.addresses[0]
    tok = {
        "garbage": "tw1.not-a-token",
        "wrong-secret": token("t1", secret="another-secret-entirely"),
        "expired": token("t1", ttl=10, now=time.time() - 4000),
    }[case]
    try:
        frames = await raw_frames(host, port, hello(tok))
        assert [f.type for f in frames] == [FrameType.CLOSE]
        assert frames[0].code == expected
        assert frames[0].payload  # a human-readable reason
        assert node.counters.auth_failures == 1
    finally:
        await node.stop()


@aiotest()
async def test_expired_token_within_clock_skew_is_accepted():
    node = await start_node(**{"auth.clock_skew": 600.0})
    try:
        # Expired 100 s ago: a till with a slow clock; inside the 600 s leeway.
        tok = token("t1", ttl=10, now=time.time() - 110)
        conn = await Connection.open(*node.addresses[0], tok)
        assert conn.is_open
        await conn.close()
    finally:
        await node.stop()


@aiotest()
async def test_unsupported_version_and_unexpected_first_frame():
    node = await start_node()
    host, port = node.addresses[0]
    try:
        frames = await raw_frames(host, port, hello(token("t1"), version=0))
        assert frames[-1].type == FrameType.CLOSE and frames[-1].code == Code.UNSUPPORTED_VERSION
        frames = await raw_frames(host, port, Encoder().encode(Frame(FrameType.PING)))
        assert frames[-1].type == FrameType.CLOSE and frames[-1].code == Code.UNEXPECTED_FRAME
    finally:
        await node.stop()


@aiotest()
async def test_newer_terminal_version_is_negotiated_down():
    node = await start_node()
    host, port = node.addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(hello(token("t1"), version=7))
        decoder = Decoder()
        frames = []
        while not frames:
            frames = decoder.feed(await asyncio.wait_for(reader.read(4096), 2))
        assert frames[0].type == FrameType.WELCOME and frames[0].version == 1
    finally:
        writer.close()
        await node.stop()


@aiotest()
async def test_garbage_bytes_get_protocol_error_close():
    node = await start_node()
    host, port = node.addresses[0]
    try:
        frames = await raw_frames(host, port, b"\x80\x00")
        assert frames == [frames[0]] and frames[0].type == FrameType.CLOSE
        assert frames[0].code == Code.BAD_VARINT
        frames = await raw_frames(host, port, b"\x81\x80\x40")
        assert frames[0].code == Code.FRAME_TOO_LARGE
    finally:
        await node.stop()


@aiotest()
async def test_auth_timeout_closes_silent_connection():
    node = await start_node(**{"server.auth_timeout": 0.3})
    host, port = node.addresses[0]
    try:
        t0 = time.monotonic()
        frames = await raw_frames(host, port, b"", wait=3.0)
        elapsed = time.monotonic() - t0
        assert frames[-1].type == FrameType.CLOSE and frames[-1].code == Code.AUTH_TIMEOUT
        assert 0.25 <= elapsed <= 1.5
    finally:
        await node.stop()


@aiotest()
async def test_takeover_closes_older_session_with_reason():
    node = await start_node()
    try:
        first = await connect(node, "till7")
        second = await connect(node, "till7")
        await asyncio.wait_for(first.closed.wait(), 3)
        assert first.close_code == Code.TAKEOVER
        assert "another connection" in first.close_reason
        assert second.is_open
        assert node.hub.sessions["terminal:acme/till7"] is not None
        assert node.counters.takeovers == 1
        # The new session gets messages for the terminal.
        backend = await connect(node, "pay1", store="hq", roles=("backend",))
        await backend.send("payment.result", {"order": "o1", "status": "paid"}, "terminal:acme/till7")
        msg = await second.receive(timeout=3)
        assert msg.body["order"] == "o1"
    finally:
        await node.stop()


@aiotest()
async def test_heartbeat_expiry_closes_silent_connection_within_bound():
    interval = 0.4
    node = await start_node(**{"heartbeat.min": 0.1, "heartbeat.interval": interval,
                               "heartbeat.tick": 0.05})
    host, port = node.addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        enc = Encoder()
        writer.write(hello(token("t1")) + enc.encode(Frame(FrameType.RESUME)))
        decoder = Decoder()
        frames = []
        t0 = None
        while not frames or frames[-1].type != FrameType.CLOSE:
            chunk = await asyncio.wait_for(reader.read(4096), 5)
            if not chunk:
                break
            if t0 is None:
                t0 = time.monotonic()
            frames.extend(decoder.feed(chunk))
        silent_for = time.monotonic() - t0
        assert frames[0].type == FrameType.WELCOME
        assert frames[-1].code == Code.HEARTBEAT_TIMEOUT
        # Closed within 1.5 intervals plus one tick (and some scheduling slack).
        assert 1.5 * interval - 0.05 <= silent_for <= 1.5 * interval + 0.05 + 0.25
        assert node.counters.heartbeat_timeouts == 1
    finally:
        writer.close()
        await node.stop()


@aiotest()
async def test_pings_keep_a_connection_alive():
    node = await start_node(**{"heartbeat.min": 0.1, "heartbeat.interval": 0.3})
    try:
        conn = await connect(node, "t1")     # the client pings every half interval
        await asyncio.sleep(1.2)
        assert conn.is_open
        await conn.close()
    finally:
        await node.stop()


# -- ACL ----------------------------------------------------------------------------


@aiotest()
async def test_acl_denials_get_error_frames_and_session_goes_on():
    node = await start_node()
    try:
        till = await connect(node, "till1", store="s1", roles=("pos",))
        cust = await connect(node, "app1", store="online", roles=("customer",), member="m1")
        # Only backends send payment results.
        with pytest.raises(SendError) as info:
            await till.send("payment.result", {"order": "o1", "x": 1, "status": "paid"}, "terminal:acme/till2")
        assert info.value.code == Code.FORBIDDEN
        # Only backend/manager broadcast prices.
        with pytest.raises(SendError) as info:
            await till.send("price.update", {"sku": "A", "price": "1", "version": 1},
                            "store:acme/s1")
        assert info.value.code == Code.FORBIDDEN
        # Tenant isolation: another chain's address.
        with pytest.raises(SendError) as info:
            await till.send("ticket.open", {"code": "E1"}, "role:other/s1/staff")
        assert info.value.code == Code.BAD_ADDRESS
        # Customers only reach customer service.
        with pytest.raises(SendError) as info:
            await cust.send("chat.message", {"conversation": "c1", "text": "hi"}, "store:acme/s1")
        assert info.value.code == Code.FORBIDDEN
        ok = await cust.send("chat.message", {"conversation": "c1", "text": "hi"}, "role:acme/*/service")
        assert ok.type == FrameType.SENDACK
        # Tills open tickets to their own store's staff.
        ok = await till.send("ticket.open", {"code": "E1"}, "role:acme/s1/staff")
        assert ok.type == FrameType.SENDACK
        with pytest.raises(SendError) as info:
            await till.send("ticket.open", {"code": "E1"}, "role:acme/s2/staff")
        assert info.value.code == Code.FORBIDDEN
        assert node.counters.acl_denials == 4
        assert till.is_open and cust.is_open
    finally:
        await node.stop()


@aiotest()
async def test_bad_addresses_and_bodies_are_refused_with_clear_errors():
    node = await start_node()
    try:
        be = await connect(node, "hq1", store="hq", roles=("backend",))
        cases = [
            ("payment.result", b'{"a":1}', "nowhere", Code.BAD_ADDRESS, "scope"),
            ("payment.result", b'{"a":1}', "terminal:acme/bad id", Code.BAD_ADDRESS, "segment"),
            ("payment.result", b'[1,2]', "terminal:acme/t1", Code.BAD_MESSAGE, "JSON object"),
            ("payment.result", b'{nope', "terminal:acme/t1", Code.BAD_MESSAGE, "JSON"),
            ("price.update", b'{"price":"1","version":1}', "store:acme/s1", Code.BAD_MESSAGE,
             "body.sku"),
            ("Bad Kind", b'{}', "store:acme/s1", Code.BAD_MESSAGE, "kind"),
        ]
        for kind, body, to, code, words in cases:
            with pytest.raises(SendError) as info:
                await be.send(kind, body, to)
            assert info.value.code == code, (kind, to)
            assert words in info.value.message, info.value.message
    finally:
        await node.stop()


@aiotest()
async def test_subscribe_acl_and_topics():
    node = await start_node()
    try:
        till = await connect(node, "till1", store="s1", roles=("pos",))
        be = await connect(node, "hq1", store="hq", roles=("backend",))
        with pytest.raises(SendError) as info:
            await till.subscribe("store:acme/s2", Lane.P2)
        assert info.value.code == Code.FORBIDDEN
        with pytest.raises(SendError) as info:
            await till.subscribe("topic:other/x", Lane.P2)
        assert info.value.code == Code.BAD_ADDRESS
        sub = await till.subscribe("topic:acme/menu", Lane.P2)
        assert sub.to == "topic:acme/menu"
        await be.send("price.update", {"sku": "X", "price": "2", "version": 1}, "topic:acme/menu")
        msg = await till.receive(timeout=3)
        assert msg.channel == "topic:acme/menu" and msg.body["sku"] == "X"
    finally:
        await node.stop()


# -- lanes, conflation, TTL, slow consumers -----------------------------------------------


async def _fill_socket(node, target: Connection, backend: Connection, *, timeout: float = 10):
    """Stop reading on ``target`` and flood P3 until the server pauses writing to it."""
    target.pause_reading()
    conn = node.hub.sessions[target.info["terminal"]]
    blob = "x" * 8000
    i = 0
    while not conn.paused:
        await backend.send("promo.offer", {"offer": "promo", "title": "Deal", "n": i, "pad": blob},
                           f"terminal:acme/{target.info['terminal'].split('/')[-1]}")
        i += 1
        assert i < 5000, "the server never paused writing"
    return conn


async def _stalled_till(node) -> tuple[Connection, Connection, object]:
    """A backend hq1 and a till1 (store s1) that stopped reading, with the
    server's side of till1 paused for writing: (backend, till, server side)."""
    be = await connect(node, "hq1", store="hq", roles=("backend",))
    till = await connect(node, "till1", store="s1", rcvbuf=4096)
    return be, till, await _fill_socket(node, till, be)


async def _padded_promos(be: Connection, count: int, size: int) -> None:
    """``count`` offers to store:acme/s1 (ids 0..count-1), each padded with ``size``
    incompressible characters (lz4 would shrink a repeated one to nothing)."""
    for i in range(count):
        await be.send("promo.offer", {"offer": "promo", "title": "Deal", "id": i,
                                      "pad": pad(size)}, "store:acme/s1")


async def _store_promos_before_payment(till: Connection) -> int:
    """Receive until a payment result; how many store:acme/s1 offers came first."""
    seen = 0
    while True:
        msg = await till.receive(timeout=5)
        if msg.kind == "payment.result":
            return seen
        if msg.channel == "store:acme/s1":
            seen += 1


@aiotest()
async def test_p2_conflation_keeps_newest_per_key_for_a_slow_terminal():
    node = await start_node()
    try:
        be, till, server_side = await _stalled_till(node)
        for v in range(1, 101):
            await be.send("price.update", {"sku": "A1", "price": str(v), "version": v},
                          "store:acme/s1")
        await be.send("price.update", {"sku": "B2", "price": "9", "version": 1}, "store:acme/s1")
        assert server_side.lane_counters()[0] >= 99      # conflated in the queue
        till.resume_reading()
        prices = []
        while True:
            msg = await till.receive(timeout=5)
            if msg.kind == "price.update":
                prices.append((msg.body["sku"], msg.body["version"]))
                if msg.body["sku"] == "B2":
                    break
        assert prices == [("A1", 100), ("B2", 1)]
    finally:
        await node.stop()


@aiotest()
async def test_stale_price_version_never_overwrites_newer():
    node = await start_node()
    try:
        be = await connect(node, "hq1", store="hq", roles=("backend",))
        till = await connect(node, "till1", store="s1")
        await be.send("price.update", {"sku": "A1", "price": "5", "version": 7}, "store:acme/s1")
        late = await be.send("price.update", {"sku": "A1", "price": "4", "version": 6},
                             "store:acme/s1")
        assert orjson.loads(late.payload) == {"stale": True}
        await be.send("price.update", {"sku": "A1", "price": "6", "version": 8}, "store:acme/s1")
        got = [(await till.receive(timeout=3)).body["version"] for _ in range(2)]
        assert got == [7, 8]
    finally:
        await node.stop()


@aiotest()
async def test_p3_ttl_expired_offers_are_never_sent():
    node = await start_node()
    try:
        be, till, server_side = await _stalled_till(node)
        for i in range(20):
            await be.send("promo.offer", {"offer": "promo", "title": "Deal", "id": f"short{i}"}, "store:acme/s1", ttl=0.2)
        await be.send("promo.offer", {"offer": "promo", "title": "Deal", "id": "long"}, "store:acme/s1", ttl=60)
        await asyncio.sleep(0.4)
        till.resume_reading()
        ids = []
        while "long" not in ids:
            msg = await till.receive(timeout=5)
            if msg.channel == "store:acme/s1":
                ids.append(msg.body["id"])
        assert ids == ["long"]
        assert server_side.lane_counters()[2] >= 20
    finally:
        await node.stop()


@aiotest()
async def test_p0_goes_ahead_of_queued_promotions():
    node = await start_node()
    try:
        be, till, _ = await _stalled_till(node)
        await _padded_promos(be, 50, 1000)
        await be.send("payment.result", {"order": "o9", "status": "paid"}, "terminal:acme/till1")
        till.resume_reading()
        seen_store_promos = await _store_promos_before_payment(till)
        # Whatever the kernel already held may come first; nothing queued after it.
        assert seen_store_promos == 0
    finally:
        await node.stop()


# The buffers before the low-water mark: no TCP_NOTSENT_LOWAT, 64 KiB of
# transport buffer and write chunk.
_PREVIOUS_BUFFERS = {"server.notsent_lowat": 0, "server.write_high_water": 65536,
                     "server.write_chunk": 65536}


async def _frames_ahead_of_a_payment(**overrides) -> tuple[int, int]:
    """Stall a till behind a P3 flood, then send it a payment result: how many
    offers it receives before the payment, and the low-water mark of the
    server's socket of that till (inherited from the listener)."""
    node = await start_node(**overrides)
    try:
        be, till, server_side = await _stalled_till(node)
        lowat = server_side.transport.get_extra_info("socket").getsockopt(
            socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
        await be.send("payment.result", {"order": "o9", "status": "paid"}, "terminal:acme/till1")
        till.resume_reading()
        ahead = 0
        while (await till.receive(timeout=5)).kind != "payment.result":
            ahead += 1
        return ahead, lowat
    finally:
        await node.stop()


@aiotest()
async def test_a_slow_terminals_payment_waits_behind_little_already_written():
    # What the server already handed to the kernel and the transport cannot
    # be reordered: on a weak link a P0 waits until it has gone through.  The
    # low-water mark (and the small transport buffer) keep that little; the
    # rest stays in the lanes, where the P0 goes first.
    ahead, lowat = await _frames_ahead_of_a_payment()
    assert lowat == make_config().server.notsent_lowat
    unbounded, system = await _frames_ahead_of_a_payment(**_PREVIOUS_BUFFERS)
    assert system == 0                           # 0 leaves the system's default (unset)
    assert 0 < ahead and ahead * 3 < unbounded, (ahead, unbounded)


async def _bytes_ahead_over_a_weak_link(**overrides) -> int:
    """A till behind a 2 Mbit/s link while offers flood its store faster than
    the link carries them; a payment result is sent once the server's side
    is backed up: how many offer bytes reached the till after the payment
    was accepted and before it."""
    node = await start_node(**overrides)
    link = Link(node.addresses[0], rate=262_144, delay=0.01, queue=8192)
    reading = None
    try:
        await link.start()
        till = await connect(link.address, "till1", store="s1")
        be = await connect(node, "hq1", store="hq", roles=("backend",))
        server_side = node.hub.sessions[till.info["terminal"]]
        arrivals = []

        async def read() -> None:
            while True:
                msg = await till.receive(timeout=30)
                arrivals.append((asyncio.get_running_loop().time(), msg))
                if msg.kind == "payment.result":
                    return

        reading = asyncio.ensure_future(read())
        for i in range(400):
            await be.send("promo.offer", {"offer": "promo", "title": "Deal", "id": i,
                                          "pad": pad(4000)}, "store:acme/s1")
            if server_side.paused and i > 100:
                break
        assert server_side.paused, "the link never backed the server up"
        await be.send("payment.result", {"order": "o9", "status": "paid"}, "terminal:acme/till1")
        accepted = asyncio.get_running_loop().time()
        await asyncio.wait_for(reading, 30)
        return sum(len(msg.body["pad"]) for t, msg in arrivals
                   if t >= accepted and msg.kind == "promo.offer")
    finally:
        if reading is not None:
            reading.cancel()
        await node.stop()
        await link.close()


@aiotest()
async def test_a_payment_over_a_weak_link_waits_behind_little_of_the_flood():
    ahead = await _bytes_ahead_over_a_weak_link()
    unbounded = await _bytes_ahead_over_a_weak_link(**_PREVIOUS_BUFFERS)
    # (Measured: about 70 KB against 164 KB: the rest of the lead is the
    # link's own queue and the socket buffers on its way.)
    assert 0 < ahead and ahead * 3 < unbounded * 2, (ahead, unbounded)


@aiotest()
async def test_p0_is_not_held_back_by_a_queue_full_of_promotions():
    # Queued P3 bytes over the inbox budget (half of lanes.max_queued_bytes)
    # must not keep a payment result in the store: P3 gives way to it.
    node = await start_node(**{"lanes.max_queued_bytes": 200_000,
                               "server.max_frame_size": 100_000})
    try:
        be, till, server_side = await _stalled_till(node)
        await _padded_promos(be, 150, 1000)
        assert server_side.queued_bytes > node.inbox_budget
        await be.send("payment.result", {"order": "o9", "status": "paid"}, "terminal:acme/till1")
        assert server_side.inbox_bytes > 0          # handed to the lanes at once
        till.resume_reading()
        seen_store_promos = await _store_promos_before_payment(till)
        assert seen_store_promos == 0
    finally:
        await node.stop()


@aiotest()
async def test_slow_consumer_p3_shed_and_queue_bounded():
    node = await start_node(**{"lanes.max_queued_bytes": 200_000,
                               "server.max_frame_size": 100_000})
    try:
        be, till, server_side = await _stalled_till(node)
        await _padded_promos(be, 100, 5000)
        assert server_side.queued_bytes <= 200_000
        assert server_side.lane_counters()[2] > 50
        assert till.is_open          # P3 shedding never closes a connection
    finally:
        # The stopping server drops the till it cannot write to (a close
        # would wait for it to read what is buffered).
        await node.stop()
    await eventually(lambda: server_side.transport is None, timeout=3)
    await asyncio.wait_for(be.closed.wait(), 5)
    till.abort()


@aiotest()
async def test_slow_consumer_with_p0_is_closed_and_nothing_is_lost():
    node = await start_node(**{"lanes.max_queued_bytes": 1_100_000,
                               "delivery.slow_consumer_timeout": 1.0,
                               "delivery.retransmit_initial": 0.2})
    try:
        be, till, _ = await _stalled_till(node)
        filler = pad(20000)
        sent = []
        for i in range(120):
            ack = await be.send("payment.result", {"order": f"o{i}", "n": i, "pad": filler, "status": "paid"}, "terminal:acme/till1")
            sent.append(ack.msg_id)
        await eventually(lambda: node.counters.slow_consumer_closes == 1)
        till.resume_reading()
        await asyncio.wait_for(till.closed.wait(), 5)
        # The CLOSE frame reaches a terminal that reads again in time; one that
        # does not is cut off (reset) after the grace period.
        assert till.close_code in (Code.SLOW_CONSUMER, Code.INTERNAL_ERROR)
        # Everything is still deliverable: reconnect and receive all 120, in order.
        again = await connect(node, "till1", store="s1")
        got = []
        while len(got) < 120:
            msg = await again.receive(timeout=5)
            if msg.kind == "payment.result":
                got.append(msg.id)
                await msg.ack()
        assert got == sent
    finally:
        await node.stop()


@aiotest()
async def test_a_burst_is_handled_in_turns_in_order_and_completely():
    # A backend writes 800 payment results in one go; with a tiny read budget
    # the server handles them over many turns (reading paused in between),
    # and every one is stored, acked and delivered in the order sent.
    node = await start_node(**{"server.read_budget_ms": 0.01})
    host, port = node.addresses[0]
    till = await connect(node, "till1", store="s1")
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(hello(token("hq1", store="hq", roles=("backend",)))
                     + Encoder().encode(Frame(FrameType.RESUME))
                     + payment_sends("terminal:acme/till1", 0, 800))
        assert await read_sendacks(reader, 800) == list(range(800))
        assert await receive_orders(till, 800) == list(range(800))
        assert node.counters.read_yields > 0
    finally:
        writer.close()
        await node.stop()


@aiotest()
async def test_frames_before_a_bad_one_are_all_handled_even_past_the_read_budget():
    # A read of 300 SENDs and then a frame a terminal may not send (WELCOME): the
    # session closes at the bad frame, and every SEND before it is still
    # stored, however many turns the read budget splits them into.
    node = await start_node(**{"server.read_budget_ms": 0.01})
    await provision(node, "till1")          # (known before its first login)
    host, port = node.addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        enc = Encoder()
        bad = enc.encode(Frame(FrameType.WELCOME, version=1))     # server -> terminal only
        writer.write(hello(token("hq1", store="hq", roles=("backend",)))
                     + enc.encode(Frame(FrameType.RESUME))
                     + payment_sends("terminal:acme/till1", 0, 300) + bad)
        decoder = Decoder()
        frames = []
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                break
            frames += decoder.feed(chunk)
        assert [f.code for f in frames if f.type == FrameType.CLOSE] == [Code.UNEXPECTED_FRAME]
        # (Their SENDACKs are not sent on a closed session: a sender resends
        # with the same refs and the dedup window answers.)
        await eventually(lambda: node.counters.accepted == 300)
        assert node.counters.read_yields > 0
        till = await connect(node, "till1", store="s1")
        assert await receive_orders(till, 300) == list(range(300))
    finally:
        writer.close()
        await node.stop()


@aiotest()
async def test_bytes_handed_over_while_a_backlog_waits_go_after_it():
    # A transport may deliver data after pause_reading (TLS records already
    # decrypted): those frames must queue behind the backlog, not jump it.
    node = await start_node(**{"server.read_budget_ms": 0.01})
    try:
        be = await connect(node, "hq1", store="hq", roles=("backend",))
        till = await connect(node, "till1", store="s1")
        conn = node.hub.sessions["terminal:acme/hq1"]
        # Over budget: leaves a backlog.
        conn.data_received(payment_sends("terminal:acme/till1", 0, 400, ack=False))
        assert conn.has_backlog
        # As if the transport had it already.
        conn.data_received(payment_sends("terminal:acme/till1", 400, 20, ack=False))
        assert await receive_orders(till, 420) == list(range(420))
        assert be.is_open
    finally:
        await node.stop()


# -- fan-out -----------------------------------------------------------------------------


@aiotest()
async def test_broadcast_is_encoded_once_and_reaches_every_subscriber():
    node = await start_node()
    try:
        be = await connect(node, "hq1", store="hq", roles=("backend",))
        tills = [await connect(node, f"t{i}", store="s1" if i % 2 else "s2", roles=("pos",))
                 for i in range(40)]
        await be.send("price.update", {"sku": "Z", "price": "1", "version": 1}, "tenant:acme")
        frames = set()
        for t in tills:
            msg = await t.receive(timeout=3)
            assert msg.body["sku"] == "Z" and msg.channel == "tenant:acme"
        stream = node.hub.stream("tenant:acme", Lane.P2, create=False)
        entry = stream.history[-1]
        # Every subscriber's scheduler got this very bytes object (encode once).
        assert entry.frame.count(b"\x13") >= 1
        frames.add(id(entry.frame))
        assert len(frames) == 1
        # Store scope reaches only that store.
        await be.send("price.update", {"sku": "Y", "price": "1", "version": 1}, "store:acme/s1")
        for i, t in enumerate(tills):
            if i % 2:
                assert (await t.receive(timeout=3)).body["sku"] == "Y"
        await asyncio.sleep(0.1)
        for i, t in enumerate(tills):
            if not i % 2:
                assert t._inbox.empty()
    finally:
        await node.stop()


@aiotest()
async def test_writes_are_coalesced_per_connection_per_iteration():
    node = await start_node()
    try:
        be = await connect(node, "hq1", store="hq", roles=("backend",))
        tills = [await connect(node, f"t{i}", store="s1") for i in range(20)]
        writes_before = node.counters.writes
        # 50 broadcasts in one burst: each till gets far fewer than 50 writes.
        await asyncio.gather(*[be.send("promo.offer", {"offer": "promo", "title": "Deal", "i": i}, "store:acme/s1")
                               for i in range(50)])
        for t in tills:
            for _ in range(50):
                await t.receive(timeout=3)
        writes = node.counters.writes - writes_before
        assert writes < 20 * 50 / 4, writes
    finally:
        await node.stop()


@aiotest()
async def test_a_flush_past_its_slice_writes_the_rest_next_turn_once_each_in_order():
    # With a tiny flush slice, a broadcast's writes to 40 tills are spread
    # over several turns; each till still gets every offer, in order, and a
    # payment result sent meanwhile is delivered too.
    node = await start_node(**{"server.flush_slice_ms": 0.001})
    try:
        be = await connect(node, "hq1", store="hq", roles=("backend",))
        tills = [await connect(node, f"t{i}", store="s1") for i in range(40)]
        writes_before = node.counters.writes
        sends = [be.send("promo.offer", {"offer": "promo", "title": "Deal", "i": i},
                         "store:acme/s1") for i in range(30)]
        sends.append(be.send("payment.result", {"order": "o1", "status": "paid"},
                             "terminal:acme/t7"))
        await asyncio.gather(*sends)
        for n, t in enumerate(tills):
            got = []
            while len(got) < (31 if n == 7 else 30):
                msg = await t.receive(timeout=5)
                got.append(msg.body.get("i", msg.kind))
                if msg.kind == "payment.result":
                    await msg.ack()
            assert [i for i in got if i != "payment.result"] == list(range(30))
            assert ("payment.result" in got) == (n == 7)
        assert node.counters.flush_yields > 0
        assert node.counters.writes - writes_before < 40 * 30 / 2
    finally:
        await node.stop()


@aiotest()
async def test_a_closed_connection_is_freed_without_the_cyclic_collector():
    # `tillwire serve` runs full collections rarely (gcpolicy): a closed
    # connection must not wait for one.  Its heartbeat and retransmit timers
    # each held it; dropping them at the close lets reference counting free it.
    from tillwire.server.connection import TerminalConnection

    def alive():
        return sum(1 for o in gc.get_objects() if isinstance(o, TerminalConnection))

    node = await start_node()
    gc.collect()
    gc.disable()
    before = alive()        # (other tests' connections still referenced, if any)
    try:
        be = await connect(node, "hq1", store="hq", roles=("backend",))
        tills = [await connect(node, f"t{i}", store="s1") for i in range(20)]
        for i in range(20):      # (a P0 in flight gives each an inbox and its timer)
            await be.send("payment.result", {"order": f"o{i}", "status": "paid"},
                          f"terminal:acme/t{i}")
        for t in tills:
            await t.receive(timeout=5)
        assert alive() == before + 21
        for t in tills:
            await t.close()
        await eventually(lambda: node.connection_count == 1)
        assert alive() == before + 1
    finally:
        gc.enable()
        await node.stop()


@aiotest()
async def test_a_stop_writes_every_close_frame_whatever_the_flush_slice():
    # Stopping closes every connection with CLOSE SHUTDOWN; slicing the flush
    # must not leave some of them to a bare socket close.
    node = await start_node(**{"server.flush_slice_ms": 0.001})
    tills = [await connect(node, f"t{i}", store="s1") for i in range(120)]
    await node.stop()
    for t in tills:
        await asyncio.wait_for(t.closed.wait(), 5)
    assert {t.close_code for t in tills} == {Code.SHUTDOWN}


@aiotest()
async def test_role_and_region_groups():
    node = await start_node()
    try:
        be = await connect(node, "hq1", store="hq", roles=("backend",))
        staff = await connect(node, "h1", store="s1", roles=("staff",), region="north")
        till = await connect(node, "t1", store="s1", roles=("pos",), region="north")
        south = await connect(node, "t2", store="s9", roles=("pos",), region="south")
        await be.send("promo.offer", {"offer": "promo", "title": "Deal", "to": "staff"}, "role:acme/s1/staff")
        assert (await staff.receive(timeout=3)).body["to"] == "staff"
        await be.send("promo.offer", {"offer": "promo", "title": "Deal", "to": "north"}, "region:acme/north")
        assert (await staff.receive(timeout=3)).body["to"] == "north"
        assert (await till.receive(timeout=3)).body["to"] == "north"
        await asyncio.sleep(0.1)
        assert south._inbox.empty()
        # P1 to a role group goes to members' inboxes, connected or not.
        ack = await be.send("ticket.open", {"code": "E1"}, "role:acme/s1/staff")
        assert orjson.loads(ack.payload)["recipients"] == 1     # (and the ticket's id)
        msg = await staff.receive(timeout=3)
        assert msg.kind == "ticket.open" and msg.lane == Lane.P1 and msg.channel is None
    finally:
        await node.stop()
