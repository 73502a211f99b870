"""Member offers that don't spam (server/offers.py, the hub's member.notice retention).

Real nodes over loopback sockets: quiet hours by each store's time zone, the
per-member frequency cap (shared by a member's devices, persisted across a
restart), replays on resume going through the same policy, segment and
member audiences, the sender's SENDACK report, and member.notice history
trimmed at retention.member_notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time

import orjson
import pytest

from support import aiotest, connect, eventually, make_config, start_node, token
from tillwire.client import sdk
from tillwire.core.codes import Lane
from tillwire.server.offers import Offers


async def nothing_for(conn, seconds: float = 0.3) -> None:
    with pytest.raises(asyncio.TimeoutError):
        msg = await conn.receive(timeout=seconds)
        raise AssertionError(f"unexpected {msg!r} {msg.body}")


def offer(n) -> dict:
    return {"offer": f"o{n}", "title": f"Deal {n}"}


def quiet_around_now_utc() -> dict:
    """Quiet hours from an hour before to an hour after now (UTC clock)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    minute = now.hour * 60 + now.minute

    def clock(m: int) -> str:
        m %= 1440
        return f"{m // 60:02d}:{m % 60:02d}"

    return {"offers.quiet_start": clock(minute - 60), "offers.quiet_end": clock(minute + 60)}


@aiotest()
async def test_quiet_hours_follow_each_stores_time_zone():
    # Now is quiet in UTC (s1) and not in Kolkata (s2, UTC+05:30, no DST).
    stores = [{"tenant": "acme", "store": "s1", "timezone": "UTC"},
              {"tenant": "acme", "store": "s2", "timezone": "Asia/Kolkata"}]
    node = await start_node(**{"directory.stores": stores, **quiet_around_now_utc()})
    try:
        be = await connect(node, "hq", store="hq", roles=("backend",))
        sleeping = await connect(node, "app1", store="s1", roles=("customer",), member="m1")
        awake = await connect(node, "app2", store="s2", roles=("customer",), member="m2")
        till = await connect(node, "t2", store="s2", roles=("pos",))
        ack = await be.send("promo.offer", offer(1), "tenant:acme")
        doc = orjson.loads(ack.payload)
        # Quiet hours are for customers' phones: the backend in hq (UTC, quiet
        # too) and the till still get it.
        assert doc == {"channel": "tenant:acme", "offset": 1, "delivered": 3, "quiet": 1,
                       "capped": 0}, doc
        for conn in (awake, till):
            msg = await conn.receive(timeout=3)
            assert (msg.kind, msg.lane, msg.body) == ("promo.offer", Lane.P3, offer(1))
        await nothing_for(sleeping)
        # member.notice follows the same policy; other P3 kinds do not.
        ack = await be.send("member.notice", {"member": "m1", "text": "Points expire"},
                            "member:acme/m1")
        assert orjson.loads(ack.payload)["quiet"] == 1
        await nothing_for(sleeping, 0.1)
        ack = await be.send("store.news", {"text": "we are open"}, "tenant:acme", lane=Lane.P3)
        assert orjson.loads(ack.payload) == {"channel": "tenant:acme", "offset": 2}
        assert (await sleeping.receive(timeout=3)).kind == "store.news"
        # The directory override (admin API) moves s1 out of its quiet hours at once.
        await node.directory.put("acme", "s1", timezone="Asia/Kolkata")
        await be.send("promo.offer", offer(2), "store:acme/s1")
        assert (await sleeping.receive(timeout=3)).body == offer(2)
    finally:
        await node.stop()


@aiotest()
async def test_the_policy_loop_runs_only_while_a_customer_or_member_is_connected():
    # Quiet now: tills alone get the offer without the per-session policy;
    # once a customer's app connects its quiet hours hold it back, and after
    # it left (closed, or taken over and closed) the tenant has none again.
    node = await start_node(**quiet_around_now_utc())
    try:
        be = await connect(node, "hq", store="hq", roles=("backend",))
        tills = [await connect(node, f"t{i}", store="s1", roles=("pos",)) for i in range(3)]
        assert not node.hub.has_policy_sessions("acme")
        ack = await be.send("promo.offer", offer(1), "store:acme/s1")
        assert orjson.loads(ack.payload) == {"channel": "store:acme/s1", "offset": 1,
                                             "delivered": 3, "quiet": 0, "capped": 0}
        for t in tills:
            assert (await t.receive(timeout=3)).body == offer(1)
        app = await connect(node, "app1", store="s1", roles=("customer",))
        other = await connect(node, "app2", store="s9", roles=("customer",), tenant="other")
        assert node.hub.has_policy_sessions("acme") and node.hub.has_policy_sessions("other")
        ack = await be.send("promo.offer", offer(2), "store:acme/s1")
        assert orjson.loads(ack.payload)["quiet"] == 1
        await nothing_for(app)
        again = await connect(node, "app1", store="s1", roles=("customer",))   # takes over
        await asyncio.wait_for(app.closed.wait(), 5)
        assert node.hub.has_policy_sessions("acme")
        await again.close()
        await eventually(lambda: not node.hub.has_policy_sessions("acme"))
        assert node.hub.has_policy_sessions("other")
        ack = await be.send("promo.offer", offer(3), "store:acme/s1")
        assert orjson.loads(ack.payload)["quiet"] == 0
        await other.close()
    finally:
        await node.stop()


def test_quiet_window_arithmetic():
    class Cfg:
        class offers:
            quiet_start, quiet_end, cap_count, cap_window = "22:00", "08:00", 3, 60.0

    class N:
        cfg = Cfg

    o = Offers(N, None)
    day = datetime.datetime(2026, 1, 5, tzinfo=datetime.timezone.utc).timestamp()
    at = lambda h, m=0: day + h * 3600 + m * 60          # noqa: E731
    assert [o.in_quiet_hours("UTC", at(h, m)) for h, m in
            ((21, 59), (22, 0), (23, 59), (0, 0), (7, 59), (8, 0), (12, 0))] == \
        [False, True, True, True, True, False, False]
    # Shanghai is UTC+8: 14:00 UTC is 22:00 there.
    assert o.in_quiet_hours("Asia/Shanghai", at(14)) and not o.in_quiet_hours("UTC", at(14))
    Cfg.offers.quiet_start, Cfg.offers.quiet_end = "09:00", "17:30"     # a daytime window
    o = Offers(N, None)
    assert [o.in_quiet_hours("UTC", at(h, m)) for h, m in ((8, 59), (9, 0), (17, 29), (17, 30))] \
        == [False, True, True, False]
    Cfg.offers.quiet_start = Cfg.offers.quiet_end = "10:00"             # equal: none
    assert Offers(N, None).quiet is None


@aiotest()
async def test_frequency_cap_per_member_across_devices():
    node = await start_node(**{"offers.cap_count": 2, "offers.cap_window": 3600.0})
    try:
        be = await connect(node, "hq", store="hq", roles=("backend",))
        phone = await connect(node, "phone", store="s1", roles=("customer",), member="m1")
        tablet = await connect(node, "tablet", store="s1", roles=("customer",), member="m1")
        other = await connect(node, "app2", store="s1", roles=("customer",), member="m2")
        till = await connect(node, "t1", store="s1", roles=("pos",))      # no member: no cap
        reports = []
        for n in range(1, 4):
            ack = await be.send("promo.offer", offer(n), "member:acme/m1")
            reports.append(orjson.loads(ack.payload))
        assert [(r["delivered"], r["quiet"], r["capped"]) for r in reports] == \
            [(2, 0, 0), (2, 0, 0), (0, 0, 2)]
        for device in (phone, tablet):
            assert [(await device.receive(timeout=3)).body["offer"] for _ in range(2)] == \
                ["o1", "o2"]
            await nothing_for(device, 0.1)
        # A tenant-wide offer: m1 is capped, m2 and the till are not.
        ack = await be.send("promo.offer", offer(4), "store:acme/s1")
        assert orjson.loads(ack.payload)["capped"] == 2
        assert (await other.receive(timeout=3)).body == offer(4)
        for n in range(5, 8):
            await be.send("promo.offer", offer(n), "store:acme/s1")
        assert [(await till.receive(timeout=3)).body["offer"] for _ in range(4)] == \
            ["o4", "o5", "o6", "o7"]
        assert (await other.receive(timeout=3)).body == offer(5)
        await nothing_for(other, 0.1)                                     # m2's cap: 2
        assert len(node.offers.counts[("acme", "m1")]) == 2
    finally:
        await node.stop()


@aiotest()
async def test_segment_audience_and_caps_survive_a_restart(tmp_path):
    cfg = make_config(str(tmp_path), **{"store.backend": "sqlite", "offers.cap_count": 1})
    node = await start_node(cfg)
    try:
        be = await connect(node, "hq", store="hq", roles=("backend",))
        app = await connect(node, "app1", store="s1", roles=("customer",), member="m1")
        await app.subscribe("segment:acme/gold", Lane.P3)
        ack = await be.send("promo.offer", offer(1), "segment:acme/gold")
        assert orjson.loads(ack.payload)["delivered"] == 1
        assert (await app.receive(timeout=3)).channel == "segment:acme/gold"
    finally:
        await node.stop()                  # writes the cap counts behind
    node = await start_node(cfg)
    try:
        assert len(node.offers.counts[("acme", "m1")]) == 1
        be = await connect(node, "hq", store="hq", roles=("backend",))
        app = await connect(node, "app1", store="s1", roles=("customer",), member="m1")
        await app.subscribe("segment:acme/gold", Lane.P3)
        ack = await be.send("promo.offer", offer(2), "segment:acme/gold")
        assert orjson.loads(ack.payload)["capped"] == 1
        await nothing_for(app)
    finally:
        await node.stop()


@aiotest()
async def test_replay_on_resume_goes_through_the_policy(tmp_path):
    node = await start_node(**{"offers.cap_count": 1})
    host, port = node.addresses[0]
    try:
        be = await connect(node, "hq", store="hq", roles=("backend",))
        state = str(tmp_path / "app.json")
        tok = token("app1", store="s1", roles=("customer",), member="m1")
        client = await sdk.connect(host, port, token=tok, state_path=state)
        await be.send("store.news", {"text": "hello"}, "member:acme/m1", lane=Lane.P3, ttl=60)
        assert (await client.receive(timeout=3)).kind == "store.news"
        await client.close()
        # Sent while the app is away: nobody counted yet.
        for n in (1, 2):
            await be.send("promo.offer", offer(n), "member:acme/m1", ttl=60)
        await be.send("store.news", {"text": "bye"}, "member:acme/m1", lane=Lane.P3, ttl=60)
        client = await sdk.connect(host, port, token=tok, state_path=state)
        try:
            got = [await client.receive(timeout=3) for _ in range(2)]
            # One offer (the cap), and the other kind untouched; o2 is skipped.
            assert [(m.kind, m.body.get("offer")) for m in got] == \
                [("promo.offer", "o1"), ("store.news", None)]
            with pytest.raises(asyncio.TimeoutError):
                await client.receive(timeout=0.3)
        finally:
            await client.close()
    finally:
        await node.stop()


@aiotest()
async def test_member_notice_history_is_kept_at_most_its_retention():
    node = await start_node(**{"retention.member_notice": 0.5, "history.max_age": 3600.0})
    try:
        be = await connect(node, "hq", store="hq", roles=("backend",))
        app = await connect(node, "app1", store="s1", roles=("customer",), member="m1")
        await be.send("member.notice", {"member": "m1", "text": "Points expire"},
                      "member:acme/m1", ttl=600)
        await be.send("promo.offer", offer(1), "member:acme/m1", ttl=600)
        items, _ = await app.history("member:acme/m1", Lane.P3)
        assert [f.kind for f in items] == ["member.notice", "promo.offer"]
        await asyncio.sleep(0.6)
        items, _ = await app.history("member:acme/m1", Lane.P3)
        assert [f.kind for f in items] == ["promo.offer"]
        await be.send("promo.offer", offer(2), "member:acme/m1", ttl=600)
        stream = node.hub.stream("member:acme/m1", Lane.P3, create=False)
        assert [e.kind for e in stream.history] == ["promo.offer", "promo.offer"]
    finally:
        await node.stop()


@aiotest()
async def test_admin_publish_reports_the_policy_too(tmp_path):
    from test_admin import admin_env
    async with admin_env(tmp_path, **{"offers.cap_count": 1}) as env:
        await connect(env.node, "app1", store="s1", roles=("customer",), member="m1")
        body = {"to": "member:acme/m1", "kind": "promo.offer", "body": offer(1)}
        first = await env.api.call("POST", "/v1/publish", json_body=body)
        second = await env.api.call("POST", "/v1/publish", json_body=body)
        assert (first["delivered"], first["capped"], second["delivered"], second["capped"]) \
            == (1, 0, 0, 1)


@aiotest()
async def test_cap_counts_a_failed_write_did_not_store_are_written_by_the_next_flush(tmp_path):
    """The store refuses a cap write (or the write is cut short at stop): the count stays
    due, and the next flush (or the one at stop) writes it, so it survives a restart."""
    cfg = make_config(str(tmp_path), **{"store.backend": "sqlite", "offers.cap_count": 1})
    node = await start_node(cfg)
    try:
        be = await connect(node, "hq", store="hq", roles=("backend",))
        app = await connect(node, "app1", store="s1", roles=("customer",), member="m1")
        kv_put = node.store.records.put

        async def refused(*args, **kwargs):
            raise OSError("database is locked")

        node.store.records.put = refused
        ack = await be.send("promo.offer", offer(1), "member:acme/m1")
        assert orjson.loads(ack.payload)["delivered"] == 1
        await app.receive(timeout=3)
        with pytest.raises(OSError):
            await node.offers.flush()
        node.store.records.put = kv_put
    finally:
        await node.stop()                  # writes what is still due
    node = await start_node(cfg)
    try:
        assert len(node.offers.counts[("acme", "m1")]) == 1
        be = await connect(node, "hq", store="hq", roles=("backend",))
        await connect(node, "app1", store="s1", roles=("customer",), member="m1")
        ack = await be.send("promo.offer", offer(2), "member:acme/m1")
        assert orjson.loads(ack.payload)["capped"] == 1
    finally:
        await node.stop()


@aiotest()
async def test_an_offer_replayed_to_a_second_device_counts_once(tmp_path):
    """One offer on a phone (live) and on a tablet (replayed when it comes back) counts
    once toward the member's cap, as one offer on two live devices does."""
    node = await start_node(**{"offers.cap_count": 2})
    host, port = node.addresses[0]
    try:
        be = await connect(node, "hq", store="hq", roles=("backend",))
        phone = await connect(node, "phone", store="s1", roles=("customer",), member="m1")
        state = str(tmp_path / "tablet.json")
        tok = token("tablet", store="s1", roles=("customer",), member="m1")
        tablet = await sdk.connect(host, port, token=tok, state_path=state)
        await be.send("store.news", {"text": "hello"}, "member:acme/m1", lane=Lane.P3, ttl=60)
        assert (await tablet.receive(timeout=3)).kind == "store.news"
        assert (await phone.receive(timeout=3)).kind == "store.news"
        await tablet.close()
        ack = await be.send("promo.offer", offer(1), "member:acme/m1", ttl=60)
        assert orjson.loads(ack.payload)["delivered"] == 1
        assert (await phone.receive(timeout=3)).body == offer(1)
        tablet = await sdk.connect(host, port, token=tok, state_path=state)
        try:
            assert (await tablet.receive(timeout=3)).body == offer(1)     # the same offer
            assert len(node.offers.counts[("acme", "m1")]) == 1
            ack = await be.send("promo.offer", offer(2), "member:acme/m1", ttl=60)
            assert orjson.loads(ack.payload)["delivered"] == 2             # the second of 2
            assert (await phone.receive(timeout=3)).body == offer(2)
            assert (await tablet.receive(timeout=3)).body == offer(2)
            ack = await be.send("promo.offer", offer(3), "member:acme/m1", ttl=60)
            assert orjson.loads(ack.payload)["capped"] == 2
        finally:
            await tablet.close()
    finally:
        await node.stop()


@aiotest()
async def test_a_damaged_cap_record_is_skipped_at_start(tmp_path):
    cfg = make_config(str(tmp_path), **{"store.backend": "sqlite", "offers.cap_count": 1})
    node = await start_node(cfg)
    try:
        now = time.time()
        await node.store.records.put("cap", "acme/m1", orjson.dumps([now]), now)
        await node.store.records.put("cap", "acme/m2", b'{"x": 1}', now)
        await node.store.records.put("cap", "acme/m3", b'["soon"]', now)
    finally:
        await node.stop()
    node = await start_node(cfg)
    try:
        assert set(node.offers.counts) == {("acme", "m1")}
    finally:
        await node.stop()


@contextlib.asynccontextmanager
async def _node_with_shared_caps():
    """A node whose offer caps are shared caps (a fleet's, here in memory) in
    a Failing fake, so a test can hold or fail their answers; 5 offers an
    hour.  Yields (node, caps)."""
    from failing import Failing
    from tillwire.server.caps import MemoryCaps
    from tillwire.server.main import make_store
    from tillwire.server.node import Node

    cfg = make_config(**{"offers.cap_count": 5, "offers.cap_window": 3600.0})
    caps = Failing(MemoryCaps())
    node = Node(cfg, make_store(cfg), loop=asyncio.get_running_loop(), caps=caps)
    await node.start()
    try:
        yield node, caps
    finally:
        await node.stop()


@aiotest()
async def test_with_shared_caps_a_members_offers_keep_their_order_whatever_order_caps_answer():
    # In a fleet a member's sessions get an offer once the shared caps
    # decided (one call for all of the offer's members).  The second offer's
    # decision coming back first must not put it ahead of the first on the
    # member's sessions: the SDK would then drop the first as old.
    async with _node_with_shared_caps() as (node, caps):
        be = await connect(node, "hq", store="hq", roles=("backend",))
        phone = await connect(node, "phone", store="s1", roles=("customer",), member="m1")
        caps.hold("take", when=lambda tenant, members, offer, *_: offer.endswith(":1"))
        for n in (1, 2):
            await be.send("promo.offer", offer(n), "member:acme/m1")
        await eventually(lambda: caps.calls["take"] == 2)
        await nothing_for(phone, 0.3)            # (the second waits for the first)
        caps.resume("take")
        got = [await phone.receive(timeout=3) for _ in range(2)]
        assert [(m.body["offer"], m.seq) for m in got] == [("o1", 1), ("o2", 2)]


@aiotest()
async def test_with_shared_caps_a_catch_up_asks_the_caps_in_order_and_a_refusal_sends_no_offer():
    # A member's phone catches up on its offers (RESUME from where it was).
    # In a fleet the shared caps decide each replayed offer, one after the
    # other: when they cannot be asked, no offer goes (offers must not
    # spam); asked again on the next catch-up, they pass in offset order.
    async with _node_with_shared_caps() as (node, caps):
        be = await connect(node, "hq", store="hq", roles=("backend",))
        phone = await connect(node, "phone", store="s1", roles=("customer",), member="m1")
        await be.send("promo.offer", offer(1), "member:acme/m1")
        assert (await phone.receive(timeout=3)).body["offer"] == "o1"
        positions = dict(phone.session.channel_positions)
        await phone.close()
        for n in (2, 3):
            await be.send("promo.offer", offer(n), "member:acme/m1")
        caps.fail("take", None)
        phone = await connect(node, "phone", store="s1", roles=("customer",), member="m1",
                              channels=positions)
        await eventually(lambda: len(caps.refused) == 1)    # (the rest not asked)
        await nothing_for(phone, 0.5)
        await phone.close()
        caps.heal("take")
        # The first replayed offer's decision is slow: nothing overtakes it.
        caps.hold("take", when=lambda tenant, members, offer, *_: offer.endswith(":2"))
        phone = await connect(node, "phone", store="s1", roles=("customer",), member="m1",
                              channels=positions)
        await eventually(lambda: caps.waiting("take") == 1)
        await nothing_for(phone, 0.3)
        caps.resume("take")
        got = [await phone.receive(timeout=3) for _ in range(2)]
        assert [m.body["offer"] for m in got] == ["o2", "o3"]
        await nothing_for(phone, 0.3)


@aiotest()
async def test_with_shared_caps_a_message_of_another_kind_waits_behind_a_members_offer():
    # An offer waits for the shared caps to reach the member's phone; a P3
    # message of another kind on the same stream comes meanwhile.  The
    # phone gets the offer first (the SDK drops an entry older than one it
    # has: the other way round the offer would be lost); a till without a
    # member gets the other message at once.
    async with _node_with_shared_caps() as (node, caps):
        be = await connect(node, "hq", store="hq", roles=("backend",))
        phone = await connect(node, "phone", store="s1", roles=("customer",), member="m1")
        till = await connect(node, "till", store="s1")
        caps.hold("take")
        await be.send("promo.offer", offer(1), "store:acme/s1")
        await eventually(lambda: caps.waiting("take") == 1)
        await be.send("store.banner", {"text": "closing at 8"}, "store:acme/s1", lane=Lane.P3)
        assert [(await till.receive(timeout=3)).kind for _ in range(2)] == \
            ["promo.offer", "store.banner"]
        await nothing_for(phone, 0.3)             # (both wait for the offer's decision)
        caps.resume("take")
        got = [await phone.receive(timeout=3) for _ in range(2)]
        assert [m.kind for m in got] == ["promo.offer", "store.banner"]
