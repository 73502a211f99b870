"""Abuse resistance, end to end over loopback (issue 16): what one hostile or
broken connection may cost, tried as an attacker would.

Each test runs a real Node and real sockets, one attack at a time, and
checks the bound the server keeps (and, where it matters, that a
well-behaved terminal is not touched).  Speed is never asserted here: the
same attacks are timed by ``python -m bench abuse``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import time

import lz4.block
import orjson
import pytest

from support import (
    aiotest, connect, eventually, hello, start_node, token, uvarint,
)
from tillwire.client.connection import Connection, SendError, connected_socket
from tillwire.client.sdk import Client
from tillwire.core.codec import Decoder, Encoder, Frame
from tillwire.core.codes import Code, Flag, FrameType, Lane
from tillwire.server.connection import HOLD_ANSWERS, HOLD_BACKLOG, HOLD_BUDGET, HOLD_PONG
from tillwire.server.limits import FD_RESERVE, Sources

ENC = Encoder()


def frame(ftype, flags=0, payload=b"", **fields) -> bytes:
    return ENC.encode(Frame(ftype, flags, payload, **fields))


RESUME = frame(FrameType.RESUME, epoch=0, p0=0, p1=0)


async def raw_session(node, terminal: str, *, rcvbuf: int | None = None, **claims):
    """A raw authenticated connection: (reader, writer) after WELCOME."""
    host, port = node.addresses[0]
    if rcvbuf is None:
        reader, writer = await asyncio.open_connection(host, port)
    else:
        sock = await connected_socket(host, port, rcvbuf=rcvbuf)
        reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(hello(token(terminal, **claims)) + RESUME)
    decoder = Decoder()
    while True:
        frames = decoder.feed(await asyncio.wait_for(reader.read(65536), 5))
        if any(f.type == FrameType.WELCOME for f in frames):
            return reader, writer


async def read_frames(reader, until, timeout: float = 5.0) -> list:
    """Frames from a raw connection until ``until(frames)`` holds (or it closes)."""
    decoder = Decoder()
    frames: list = []
    deadline = time.monotonic() + timeout
    while not until(frames):
        left = deadline - time.monotonic()
        assert left > 0, f"no such frames within {timeout} s: {[f.type for f in frames]}"
        chunk = await asyncio.wait_for(reader.read(65536), left)
        if not chunk:
            break
        frames += decoder.feed(chunk)
    return frames


def session_of(node, terminal: str):
    return node.hub.sessions[f"terminal:acme/{terminal}"]


# -- 1, 8: pathological bodies -----------------------------------------------------------


@aiotest()
async def test_big_and_deep_bodies_are_bad_messages_and_the_session_goes_on():
    node = await start_node()
    try:
        till = await connect(node, "t1", store="s1")
        # What a terminal may send is announced: a SEND body of limits.max_send_body
        # and its header.  Just over the body limit: BAD_MESSAGE naming it.
        assert till.welcome.max_frame == 65536 + 1024
        over = b'{"t":"\xc3\xa9","a":[' + b"1," * 32_761 + b'1]}'
        assert 65536 < len(over) < 65536 + 512
        with pytest.raises(SendError) as info:
            await till.send("x.note", over, "store:acme/s1")
        assert info.value.code == Code.BAD_MESSAGE
        assert "limits.max_send_body" in info.value.message
        # 1 MiB of "1,1,1..." with one non-ASCII character: refused by the SDK
        # before it is sent (the server would close the connection for it).
        big = b'{"t":"\xc3\xa9","a":[' + b"1," * 400_000 + b'1]}'
        with pytest.raises(SendError) as info:
            await till.send("x.note", big, "store:acme/s1")
        assert info.value.code == Code.BAD_MESSAGE and "max_frame" in info.value.message
        # ... and sent anyway, raw, or as a 4 KB compression bomb: FRAME_TOO_LARGE,
        # before buffering or decompressing it.
        bomb = b'{"a":[' + b"1," * 500_000 + b'1]}'
        packed = lz4.block.compress(bomb, store_size=False)
        assert len(packed) < 8192 < len(bomb)
        plain = Encoder(1 << 20, 0)                 # (an encoder that never compresses)
        sends = [plain.encode(Frame(FrameType.SEND, Lane.P1 | Flag.ACK_REQUESTED, big, ref=9,
                                    to="store:acme/s1", kind="x.note")),
                 _compressed(plain.encode(Frame(FrameType.SEND, Lane.P1 | Flag.ACK_REQUESTED,
                                                uvarint(len(bomb)) + packed, ref=9,
                                                to="store:acme/s1", kind="x.note")))]
        for n, data in enumerate(sends):
            reader, writer = await raw_session(node, f"t{n + 2}", store="s1")
            writer.write(data)
            frames = await read_frames(reader, lambda fs: any(
                f.type == FrameType.CLOSE for f in fs))
            assert frames[-1].type == FrameType.CLOSE, (n, frames)
            assert frames[-1].code == Code.FRAME_TOO_LARGE
            writer.close()
        # 1,000 levels with a non-ASCII character: BAD_MESSAGE naming the depth (it
        # was a RecursionError that aborted the connection without CLOSE).
        deep = b'{"a":' * 1000 + b'"\xc3\xa9"' + b"}" * 1000
        with pytest.raises(SendError) as info:
            await till.send("x.note", deep, "store:acme/s1")
        assert info.value.code == Code.BAD_MESSAGE
        assert "nested more than 32 levels" in info.value.message
        # ... and the session is still open and useful.
        ack = await till.send("x.note", {"text": "still here"}, "store:acme/s1")
        assert ack.type == FrameType.SENDACK
    finally:
        await node.stop()


def _compressed(data: bytes) -> bytes:
    """An encoded frame with COMPRESSED set (its payload already is an lz4 block)."""
    prefix = next(i for i, b in enumerate(data) if not b & 0x80) + 1
    return data[:prefix + 1] + bytes([data[prefix + 1] | Flag.COMPRESSED]) + data[prefix + 2:]


# -- 3: control frames ---------------------------------------------------------------------


@aiotest()
async def test_a_ping_flood_that_never_reads_holds_one_pong_and_stops_being_read():
    node = await start_node(**{"delivery.slow_consumer_timeout": 4.0})
    try:
        reader, writer = await raw_session(node, "pinger", store="s1", rcvbuf=4096)
        conn = session_of(node, "pinger")
        before = node.counters.bytes_in
        # 4 MB of pings with incompressible payloads (each PONG as big): the
        # kernel's buffers take what the server does not read.
        pings = b"".join(frame(FrameType.PING, payload=os.urandom(1000)) for _ in range(4000))
        writer.write(pings)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(writer.drain(), 2.0)
        await eventually(lambda: conn.holds & HOLD_PONG and conn.paused)
        await asyncio.sleep(0.3)
        read = node.counters.bytes_in - before
        # It stopped reading once a PONG could not go out: what it read is about
        # what the socket buffers between us took in PONGs, and it holds at most
        # one PONG and one read of input.
        assert read < len(pings) // 4
        assert conn.control_bytes <= 1100
        assert conn.state != 3 and node.counters.ping_holds >= 1
        # Held so for delivery.slow_consumer_timeout: a slow consumer.
        await eventually(lambda: conn.state == 3, timeout=5)
        assert conn.close_code == Code.SLOW_CONSUMER
        writer.transport.abort()
    finally:
        await node.stop()


@aiotest()
async def test_pings_are_all_answered_one_at_a_time_when_the_terminal_reads():
    node = await start_node()
    try:
        reader, writer = await raw_session(node, "p2", store="s1")
        writer.write(b"".join(frame(FrameType.PING, payload=b"%d" % i) for i in range(500)))
        frames = await read_frames(reader, lambda fs: sum(
            f.type == FrameType.PONG for f in fs) >= 500)
        assert [f.payload for f in frames if f.type == FrameType.PONG] == \
            [b"%d" % i for i in range(500)]
        writer.close()
    finally:
        await node.stop()


@aiotest()
async def test_control_frames_over_their_budget_stop_reading_then_close_slow_consumer():
    # A backend (no rate limit) that sends and never reads its SENDACKs: they
    # take the control budget (half the connection's), reading stops, and
    # after delivery.slow_consumer_timeout it is closed.
    node = await start_node(**{"lanes.max_queued_bytes": 256 * 1024,
                               "server.max_frame_size": 65536,
                               "delivery.slow_consumer_timeout": 1.0})
    try:
        reader, writer = await raw_session(node, "hq", store="hq", roles=("backend",),
                                           rcvbuf=4096)
        conn = session_of(node, "hq")
        sends = b"".join(frame(FrameType.SEND, Lane.P2 | Flag.ACK_REQUESTED,
                               orjson.dumps({"sku": f"S{i}", "price": "1.00", "version": 1}),
                               ref=i + 1, to="store:acme/s1", kind="price.update")
                         for i in range(40_000))
        writer.write(sends)
        # (Once its socket takes no more: until then what the kernel absorbs may
        # drain the control frames below the budget again for a moment.)
        await eventually(lambda: conn.holds & HOLD_BUDGET and conn.paused, timeout=10)
        assert conn.control_bytes <= node.max_queued_bytes
        assert node.counters.budget_holds >= 1
        await asyncio.sleep(0.3)
        # It read what its answers' room allowed, not the 40,000 it was sent.
        assert node.hub.stream("store:acme/s1", Lane.P2, False).offset < 20_000
        await eventually(lambda: conn.state == 3, timeout=5)
        assert conn.close_code == Code.SLOW_CONSUMER
        assert node.counters.slow_consumer_closes == 1
        writer.transport.abort()
    finally:
        await node.stop()


@aiotest()
async def test_a_terminal_that_asks_for_history_and_never_reads_holds_one_answer():
    node = await start_node(**{"limits.request_rate": 0})
    try:
        backend = await connect(node, "hq", store="hq", roles=("backend",))
        for i in range(2000):
            backend.session.send(Lane.P2, "store:acme/s1", "price.update",
                                 orjson.dumps({"sku": f"S{i:04d}" + "x" * 40, "price": "1.00",
                                               "version": 1}), ref=0, ack=False)
        backend._write()
        await eventually(lambda: (s := node.hub.stream("store:acme/s1", Lane.P2, False))
                         is not None and len(s.lvc) == 2000)
        reader, writer = await raw_session(node, "asker", store="s1", rcvbuf=4096)
        conn = session_of(node, "asker")
        before = node.counters.frames_in
        writer.write(b"".join(frame(FrameType.HISTORY, Lane.P2, ref=i, count=0,
                                    to="store:acme/s1") for i in range(1, 1000)))
        await eventually(lambda: conn.holds & HOLD_ANSWERS)
        await asyncio.sleep(0.3)
        # One answer at a time, queued as the terminal reads (it does not):
        # the requests behind it wait unread; its control frames stay small.
        assert len(conn.extra["answers"]) == 1
        assert conn.control_bytes <= node.control_budget // 2 + 1024
        frames, start = conn.extra["backlog"]
        assert len(frames) - start >= 900 and node.counters.frames_in - before < 2000
        writer.transport.abort()
    finally:
        await node.stop()


@aiotest()
async def test_history_is_paged_and_the_sdk_reads_page_after_page(tmp_path):
    node = await start_node(**{"limits.history_page": 50})
    try:
        backend = await connect(node, "hq", store="hq", roles=("backend",))
        for i in range(230):
            backend.session.send(Lane.P2, "store:acme/s1", "price.update",
                                 orjson.dumps({"sku": f"S{i:04d}", "price": "1.00", "version": 1}),
                                 ref=0, ack=False)
        backend._write()
        await eventually(lambda: (s := node.hub.stream("store:acme/s1", Lane.P2, False))
                         is not None and len(s.lvc) == 230)
        till = await connect(node, "t1", store="s1")
        # One page: at most limits.history_page items, PARTIAL, and where to go on from.
        items, end = await till.history("store:acme/s1", Lane.P2, count=0)
        assert len(items) == end.count == 50 and end.code == Code.PARTIAL
        assert end.offset == items[-1].offset
        more, end2 = await till.history("store:acme/s1", Lane.P2, offset=end.offset, count=0)
        assert [i.offset for i in more][0] > end.offset and end2.code == Code.PARTIAL
        # The SDK pages on by itself: the whole snapshot, in offset order, once each.
        client = Client(*node.addresses[0], token("t2", store="s1"))
        await client.start()
        try:
            items, end = await client.history("store:acme/s1", Lane.P2, count=0)
            skus = [orjson.loads(i.payload)["sku"] for i in items]
            assert skus == [f"S{i:04d}" for i in range(230)] and end.code == Code.OK
            newest, end = await client.history("store:acme/s1", Lane.P2, count=120)
            assert [orjson.loads(i.payload)["sku"] for i in newest] == skus[-120:]
        finally:
            await client.close()
    finally:
        await node.stop()


# -- 4: subscriptions -----------------------------------------------------------------------


@aiotest()
async def test_subscribing_makes_no_stream_and_leaving_frees_what_it_held():
    node = await start_node(**{"limits.request_rate": 0})
    try:
        before = node.hub.stream_count()
        reader, writer = await raw_session(node, "sub", store="s1")
        writer.write(b"".join(frame(FrameType.SUBSCRIBE, Lane.P2, ref=i, to=f"topic:acme/t{i}")
                              for i in range(1, 201)))
        frames = await read_frames(reader, lambda fs: sum(
            f.type in (FrameType.SUBSCRIBED, FrameType.ERROR) for f in fs) >= 200)
        subscribed = [f for f in frames if f.type == FrameType.SUBSCRIBED]
        refused = [f for f in frames if f.type == FrameType.ERROR]
        # A cap per connection; no stream made for any of them.
        assert len(subscribed) == 64 and len(refused) == 136
        assert {f.code for f in refused} == {Code.TOO_MANY_SUBSCRIPTIONS}
        assert node.hub.stream_count() == before and node.hub.pending_count() == 64
        # The first publish to one of them makes its stream, under the id announced.
        backend = await connect(node, "hq", store="hq", roles=("backend",))
        await backend.send("price.update", {"sku": "A", "price": "1.00", "version": 1},
                           "topic:acme/t7", lane=Lane.P2)
        [announced] = [f for f in subscribed if f.to == "topic:acme/t7"]
        got = await read_frames(reader, lambda fs: any(f.type == FrameType.BROADCAST for f in fs))
        [bc] = [f for f in got if f.type == FrameType.BROADCAST]
        assert bc.channel == announced.channel and bc.offset == 1
        assert node.hub.stream_count() == before + 1 and node.hub.pending_count() == 63
        # Leaving frees every pending one.
        writer.transport.abort()
        await eventually(lambda: node.hub.pending_count() == 0)
    finally:
        await node.stop()


@aiotest()
async def test_who_may_subscribe_to_topics_and_segments_is_configured_by_role():
    node = await start_node(**{"limits.topic_roles": ["staff"]})
    try:
        app = await connect(node, "app1", store="s1", roles=("customer",), member="m1")
        with pytest.raises(SendError) as info:
            await app.subscribe("topic:acme/news", Lane.P2)
        assert info.value.code == Code.FORBIDDEN and "limits.topic_roles" in info.value.message
        await app.subscribe("segment:acme/gold", Lane.P3)          # customers: segments
        till = await connect(node, "t1", store="s1", roles=("pos",))
        with pytest.raises(SendError) as info:
            await till.subscribe("segment:acme/gold", Lane.P3)
        assert info.value.code == Code.FORBIDDEN
        staff = await connect(node, "st1", store="s1", roles=("staff",))
        assert (await staff.subscribe("topic:acme/news", Lane.P2)).type == FrameType.SUBSCRIBED
        assert node.counters.acl_denials == 2
    finally:
        await node.stop()


@aiotest()
async def test_a_stream_nobody_holds_that_retains_nothing_is_freed_and_comes_back_anew():
    node = await start_node(**{"history.max_age": 0.3})
    try:
        backend = await connect(node, "hq", store="hq", roles=("backend",))
        sub = await connect(node, "st1", store="s1", roles=("staff",))
        first = await sub.subscribe("topic:acme/flash", Lane.P3)
        await backend.send("promo.offer", {"offer": "o1", "title": "t"}, "topic:acme/flash",
                           lane=Lane.P3)
        stream = node.hub.stream("topic:acme/flash", Lane.P3, create=False)
        assert stream is not None and stream.id == first.channel
        await asyncio.sleep(0.4)                          # its history ages out
        assert not await _freed(node)                     # (still subscribed)
        await sub.close()
        await eventually(lambda: node.hub.stream("topic:acme/flash", Lane.P3, False) is None)
        # A publish after that is a new stream: a new epoch, so a terminal that
        # held a position in the old one resyncs instead of skipping messages.
        await backend.send("promo.offer", {"offer": "o2", "title": "t"}, "topic:acme/flash",
                           lane=Lane.P3)
        again = node.hub.stream("topic:acme/flash", Lane.P3, create=False)
        assert again.epoch > first.epoch and again.offset == 1
    finally:
        await node.stop()


async def _freed(node) -> int:
    return await node.sweep_streams()


@aiotest()
async def test_idle_streams_are_swept_once_their_history_aged_out():
    node = await start_node(**{"history.max_age": 0.2})
    try:
        backend = await connect(node, "hq", store="hq", roles=("backend",))
        for i in range(30):
            await backend.send("promo.offer", {"offer": f"o{i}", "title": "t"},
                               f"terminal:acme/gone{i}", lane=Lane.P3)
        assert node.hub.stream_count() >= 30
        await asyncio.sleep(0.3)
        assert await _freed(node) >= 30
        assert node.hub.stream("terminal:acme/gone3", Lane.P3, create=False) is None
    finally:
        await node.stop()


# -- 5: flow control on SENDs ------------------------------------------------------------


@aiotest()
async def test_the_unacked_window_is_enforced_with_a_retry_hint_and_the_sdk_honours_it():
    node = await start_node(**{"limits.unacked_sends": {"pos": 4}})
    try:
        reader, writer = await raw_session(node, "t1", store="s1")
        # 40 SENDs in one write: at most 4 may await their commit at once.
        writer.write(b"".join(frame(FrameType.SEND, Lane.P1 | Flag.ACK_REQUESTED,
                                    b'{"n":%d}' % i, ref=i + 1, to="store:acme/s1",
                                    kind="x.note") for i in range(40)))
        frames = await read_frames(reader, lambda fs: sum(
            f.type in (FrameType.SENDACK, FrameType.ERROR) for f in fs) >= 40)
        refused = [f for f in frames if f.type == FrameType.ERROR]
        assert refused and {f.code for f in refused} == {Code.TOO_MANY_UNACKED}
        text = refused[0].payload.decode()
        assert text.startswith("retry_ms=") and int(text[9:].split(" ")[0]) > 0
        assert node.counters.window_refusals == len(refused)
        writer.close()
        # The SDK waits the hint and sends again (same ref): every message arrives once.
        client = Client(*node.addresses[0], token("t2", store="s1"))
        await client.start()
        try:
            acks = await asyncio.gather(*(client.send("x.note", {"n": i}, "store:acme/s1")
                                          for i in range(40)))
            assert len({a.msg_id for a in acks}) == 40
        finally:
            await client.close()
        assert node.counters.window_refusals > len(refused)      # (it was hit, and honoured)
    finally:
        await node.stop()


@aiotest()
async def test_over_its_rate_a_connection_is_not_read_and_its_sends_wait():
    node = await start_node(**{"limits.send_rate": {"pos": 20}, "limits.send_burst": {"pos": 5},
                               "limits.unacked_sends": {"pos": 0}})
    try:
        reader, writer = await raw_session(node, "t1", store="s1")
        conn = session_of(node, "t1")
        started = time.monotonic()
        writer.write(b"".join(frame(FrameType.SEND, Lane.P1 | Flag.ACK_REQUESTED,
                                    b'{"n":%d}' % i, ref=i + 1, to="store:acme/s1",
                                    kind="x.note") for i in range(25)))
        await eventually(lambda: conn.holds & HOLD_BACKLOG)
        frames = await read_frames(reader, lambda fs: sum(
            f.type == FrameType.SENDACK for f in fs) >= 25)
        took = time.monotonic() - started
        # No error: the 20 beyond the burst waited for their tokens, in order.
        assert [f.ref for f in frames if f.type == FrameType.SENDACK] == list(range(1, 26))
        assert not [f for f in frames if f.type == FrameType.ERROR]
        assert took >= 0.8 and node.counters.rate_waits >= 1     # 20 tokens at 20/s
        assert not conn.holds
        writer.close()
    finally:
        await node.stop()


@aiotest()
async def test_sends_that_would_wait_too_long_are_refused_rate_limited():
    node = await start_node(**{"limits.send_rate": {"pos": 10}, "limits.send_burst": {"pos": 2},
                               "limits.send_wait_max": 0.5, "limits.unacked_sends": {"pos": 0}})
    try:
        reader, writer = await raw_session(node, "t1", store="s1")
        writer.write(b"".join(frame(FrameType.SEND, Lane.P1 | Flag.ACK_REQUESTED,
                                    b'{"n":%d}' % i, ref=i + 1, to="store:acme/s1",
                                    kind="x.note") for i in range(30)))
        frames = await read_frames(reader, lambda fs: sum(
            f.type in (FrameType.SENDACK, FrameType.ERROR) for f in fs) >= 30)
        acked = [f.ref for f in frames if f.type == FrameType.SENDACK]
        refused = [f for f in frames if f.type == FrameType.ERROR]
        assert 2 + 4 <= len(acked) <= 2 + 8 and acked == sorted(acked)   # burst + ~0.5 s
        assert refused and {f.code for f in refused} == {Code.RATE_LIMITED}
        assert all(f.payload.startswith(b"retry_ms=") for f in refused)
        assert node.counters.rate_refusals == len(refused)
        writer.close()
    finally:
        await node.stop()


@aiotest()
async def test_a_backend_window_of_ten_thousand_is_untouched_by_the_defaults():
    node = await start_node()
    try:
        backend = await connect(node, "pay", store="hq", roles=("backend",))
        await connect(node, "t1", store="s1")
        n = 10_000
        for i in range(n):
            backend.session.send(Lane.P0, "terminal:acme/t1", "payment.result",
                                 b'{"order":"o%d","status":"paid"}' % i, ref=i + 1)
        backend._write()
        await eventually(lambda: node.counters.accepted == n, timeout=30)
        assert node.counters.window_refusals == 0 and node.counters.rate_waits == 0
    finally:
        await node.stop()


# -- 6: before HELLO, connection caps and auth throttling ---------------------------------


@aiotest()
async def test_before_hello_a_connection_may_buffer_only_a_handshake():
    node = await start_node()
    try:
        host, port = node.addresses[0]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"\x80\x80\x40" + b"x" * 1000)             # announces a 1 MiB frame
        [close] = await read_frames(reader, lambda fs: any(f.type == FrameType.CLOSE for f in fs))
        assert close.code == Code.FRAME_TOO_LARGE
        writer.close()
        # A real HELLO with a long token still fits (8 KiB by default) ...
        conn = await connect(node, "t1", store="s1")
        # ... and after it the full frame limit applies.
        ack = await conn.send("x.note", {"text": "y" * 50_000}, "store:acme/s1")
        assert ack.type == FrameType.SENDACK
    finally:
        await node.stop()


@aiotest()
async def test_max_connections_defaults_to_the_open_file_limit_and_refuses_with_its_code():
    node = await start_node()
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert node.max_connections == soft - FD_RESERVE
    finally:
        await node.stop()
    node = await start_node(**{"server.max_connections": 2})
    try:
        a = await connect(node, "t1", store="s1")
        b = await connect(node, "t2", store="s1")
        host, port = node.addresses[0]
        reader, writer = await asyncio.open_connection(host, port)
        [close] = await read_frames(reader, lambda fs: any(f.type == FrameType.CLOSE for f in fs))
        assert close.code == Code.CONNECTION_LIMIT and 48 <= close.code <= 63
        assert node.counters.connections_refused == 1
        writer.close()
        await a.close()
        await eventually(lambda: node.connection_count == 1)
        c = await connect(node, "t3", store="s1")                # room again
        await asyncio.gather(b.close(), c.close())
    finally:
        await node.stop()


@aiotest()
async def test_per_source_and_per_tenant_caps_are_off_by_default_and_hold_when_set():
    node = await start_node()
    try:
        conns = [await connect(node, f"t{i}", store="s1") for i in range(30)]
        assert len(node.hub.sessions) == 30          # one loopback address, no cap
        for c in conns:
            await c.close()
    finally:
        await node.stop()
    node = await start_node(**{"limits.max_connections_per_source": 2,
                               "limits.max_connections_per_tenant": 3})
    try:
        host, port = node.addresses[0]
        a = await Connection.open(host, port, token("a1", store="s1"), local_addr=("127.0.0.2", 0))
        b = await Connection.open(host, port, token("a2", store="s1"), local_addr=("127.0.0.2", 0))
        with pytest.raises(Exception) as info:
            await Connection.open(host, port, token("a3", store="s1"), local_addr=("127.0.0.2", 0))
        assert getattr(info.value, "code", None) == Code.CONNECTION_LIMIT
        # Another source: a third session of the tenant, then the tenant is full.
        c = await Connection.open(host, port, token("c1", store="s1"), local_addr=("127.0.0.3", 0))
        with pytest.raises(Exception) as info:
            await Connection.open(host, port, token("c2", store="s1"),
                                  local_addr=("127.0.0.4", 0))
        assert getattr(info.value, "code", None) == Code.CONNECTION_LIMIT
        # A takeover is not a new session of the tenant.
        c_again = await Connection.open(host, port, token("c1", store="s1"),
                                        local_addr=("127.0.0.4", 0))
        await eventually(lambda: c.closed.is_set())
        assert c.close_code == Code.TAKEOVER
        await a.close()
        await eventually(lambda: node.commands._tenant_sessions.get("acme") == 2)
        d = await Connection.open(host, port, token("d1", store="s1"), local_addr=("127.0.0.5", 0))
        for conn in (b, c_again, d):
            await conn.close()
        await eventually(lambda: not node.commands._tenant_sessions and not node.sources.connections)
    finally:
        await node.stop()


@aiotest()
async def test_repeated_bad_tokens_wait_longer_and_longer_but_a_good_one_never_waits():
    node = await start_node(**{"limits.auth_fail_delay_max": 0.4})
    try:
        host, port = node.addresses[0]

        async def bad_login() -> float:
            started = time.monotonic()
            reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.7", 0))
            writer.write(hello("tw1.not-a-token") + RESUME)
            [close] = await read_frames(reader, lambda fs: any(
                f.type == FrameType.CLOSE for f in fs))
            assert close.code == Code.AUTH_FAILED
            took = time.monotonic() - started
            # ... and the server lets go of it at once (not at the auth timeout).
            assert await asyncio.wait_for(reader.read(1), 1.0) == b""
            writer.close()
            return took

        waits = [await bad_login() for _ in range(7)]
        assert max(waits[:3]) < 0.2                      # the first three: at once
        assert waits[5] >= 0.1 and waits[6] >= 0.2       # then 50, 100, 200, 400 ms ...
        assert node.counters.auth_delays == 4
        started = time.monotonic()
        good = await Connection.open(host, port, token("t1", store="s1"),
                                     local_addr=("127.0.0.7", 0))
        assert time.monotonic() - started < 0.2 and good.welcome is not None
        await good.close()
    finally:
        await node.stop()


def test_auth_failure_delays_grow_and_are_forgotten_after_a_quiet_minute():
    src = Sources(0, 5.0)
    delays = [src.auth_failed("10.0.0.1", 100.0 + i) for i in range(12)]
    assert delays[:3] == [0.0, 0.0, 0.0] and delays[3:6] == [0.05, 0.1, 0.2]
    assert delays[-1] == 5.0                               # capped
    assert src.auth_failed("10.0.0.2", 111.0) == 0.0       # another source is not slowed
    assert src.auth_failed("10.0.0.1", 200.0) == 0.0       # a quiet minute later: afresh
    src.sweep(300.0)
    assert not src.failures
    assert Sources(0, 0.0).auth_failed("10.0.0.1", 1.0) == 0.0


# -- 7: the audit trail under a flood -------------------------------------------------------


@aiotest()
async def test_a_bad_token_flood_is_summarised_in_the_audit_log(tmp_path):
    from tillwire.server.audit import AuditLog
    node = await start_node(**{"limits.auth_fail_delay_max": 0})
    audit = AuditLog(str(tmp_path / "audit.log"), max_bytes=64 * 1024).open()
    node.audit = audit
    try:
        host, port = node.addresses[0]
        for _ in range(300):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(hello("tw1.forged"))
            await read_frames(reader, lambda fs: any(f.type == FrameType.CLOSE for f in fs))
            writer.close()
        audit.flush_aggregates(force=True)
        audit.flush()
        lines = [orjson.loads(x) for x in (tmp_path / "audit.log").read_bytes().splitlines()]
        fails = [e for e in lines if e["event"] == "auth.fail"]
        assert len(fails) == 2 and fails[0]["detail"]["code"] == "AUTH_FAILED"
        assert fails[1]["detail"]["aggregated"] == 299
        assert fails[1]["detail"]["reasons"] == {"AUTH_FAILED": 299}
        assert not (tmp_path / "audit.log.1").exists()          # nothing rotated away
        assert node.counters.auth_failures == 300 and audit.aggregated == 299
    finally:
        await node.stop()
        audit.close()


def test_the_audit_log_is_written_off_the_calling_thread(tmp_path):
    import threading
    from tillwire.server.audit import AuditLog
    log = AuditLog(str(tmp_path / "a.log")).open()
    writers = []
    real = log._write_line
    log._write_line = lambda line: (writers.append(threading.current_thread().name),
                                    real(line))[1]
    log.write("kick", "admin:ops", detail={"reason": "x"})
    deadline = time.monotonic() + 5
    while not writers and time.monotonic() < deadline:      # (within WRITE_INTERVAL)
        time.sleep(0.01)
    assert writers == ["tillwire-audit"]
    log.close()
    assert orjson.loads((tmp_path / "a.log").read_bytes())["event"] == "kick"


@aiotest()
async def test_refused_and_answered_sends_leave_the_window():
    # Every way a SEND is answered (stored, refused by a service, stored by a
    # service, passed on by a service to be stored as any P1, refused at the
    # edge) gives its place in the window back.
    node = await start_node(**{"limits.unacked_sends": {"pos": 2, "customer": 2,
                                                        "staff": 2}})
    try:
        till = await connect(node, "t1", store="s1")
        staff = await connect(node, "st1", store="s1", roles=("staff",))
        app = await connect(node, "app1", store="s1", roles=("customer",), member="m1")
        for i in range(5):
            await till.send("x.note", {"n": i}, "store:acme/s1")
            ack = await till.send("ticket.open", {"code": f"E{i}"}, "role:acme/s1/staff")
            ticket = orjson.loads(ack.payload)["ticket"]
            await staff.send("ticket.reply", {"ticket": ticket, "text": "coming"},
                             "terminal:acme/t1")
            with pytest.raises(SendError) as info:   # refused by the ticket service
                await till.send("ticket.open", {"code": "E1"}, "terminal:acme/st1")
            assert info.value.code == Code.BAD_MESSAGE and "opener's store" in str(info.value)
            with pytest.raises(SendError):           # FORBIDDEN by the ACL
                await app.send("ticket.open", {"code": "E1"}, "role:acme/s1/staff")
            with pytest.raises(SendError):           # BAD_MESSAGE at the edge
                await till.send("x.note", b"[1]", "store:acme/s1")
        for name in ("t1", "app1", "st1"):
            assert session_of(node, name).extra["limits"].unacked == 0
        assert node.counters.window_refusals == 0
    finally:
        await node.stop()


@aiotest()
async def test_a_hello_with_garbage_behind_it_gets_close_and_no_welcome():
    # Found by the fuzzer: HELLO (a valid token) and a bad byte in one write.
    # The HELLO before the bad byte is valid and handled (PROTOCOL.md 16: it
    # logs in, taking over the terminal's older session), but CLOSE is the
    # last frame sent: no WELCOME after it.
    node = await start_node()
    try:
        live = await connect(node, "t1", store="s1")
        host, port = node.addresses[0]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(hello(token("t1", store="s1")) + b"\x00")
        frames = await read_frames(reader, lambda fs: any(f.type == FrameType.CLOSE for f in fs))
        assert [f.type for f in frames] == [FrameType.CLOSE]
        assert frames[0].code == Code.MALFORMED
        writer.close()
        await eventually(lambda: live.closed.is_set())
        assert live.close_code == Code.TAKEOVER
        await eventually(lambda: "terminal:acme/t1" not in node.hub.sessions)
        # And a refused HELLO with SENDs behind it in the same read: they are not read.
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(hello("tw1.forged") + RESUME + frame(
            FrameType.SEND, Lane.P1, b"{}", ref=1, to="store:acme/s1", kind="x.note"))
        frames = await read_frames(reader, lambda fs: any(f.type == FrameType.CLOSE for f in fs))
        assert [f.code for f in frames] == [Code.AUTH_FAILED]
        assert node.counters.lane_frames_in[1] == 0
        writer.close()
    finally:
        await node.stop()
