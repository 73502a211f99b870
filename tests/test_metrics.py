"""Prometheus metrics: real traffic through a real Node, scraped over HTTP
from the admin app's ``/metrics`` and parsed with prometheus_client's parser."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import aiotest, connect, eventually, make_config, provision, start_node, token
from tillwire.client.connection import SendError
from tillwire.core.codec import Encoder, Frame
from tillwire.core.codes import FrameType
from tillwire.core.errors import SessionClosed
from tillwire.server.admin import start_admin


class Scraper:
    def __init__(self, http: aiohttp.ClientSession, node: str, worker: str = "0") -> None:
        self.http = http
        self.node = node
        self.worker = worker
        self.samples: dict = {}

    async def scrape(self) -> "Scraper":
        async with self.http.get("/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
        self.samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = dict(s.labels)
                if s.name.startswith("tillwire_"):
                    # One label scheme on every series, the process's included.
                    assert labels.pop("node") == self.node, s
                    assert labels.pop("worker") == self.worker, s
                self.samples[(s.name, tuple(sorted(labels.items())))] = s.value
        return self

    def __call__(self, name: str, **labels) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]


@contextlib.asynccontextmanager
async def scraped_node(**overrides):
    node = await start_node(make_config(**overrides))
    runner = await start_admin(node, node.cfg, None, "127.0.0.1", 0)
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession(f"http://{host}:{port}") as http:
            yield node, Scraper(http, node.node_id, str(node.worker))
    finally:
        await runner.cleanup()
        await node.stop()


@aiotest()
async def test_connections_traffic_by_lane_and_latency_histograms():
    async with scraped_node() as (node, m):
        await m.scrape()
        assert m("tillwire_connections_open") == 0
        assert m("tillwire_store_write_seconds_count") == 0
        be = await connect(node, "hq", store="hq", roles=("backend",))
        t1 = await connect(node, "t1", store="s1", roles=("pos", "staff"))
        t2 = await connect(node, "t2", store="s1")
        await m.scrape()
        assert m("tillwire_connections", tenant="acme", role="pos") == 2
        assert m("tillwire_connections", tenant="acme", role="staff") == 1
        assert m("tillwire_connections", tenant="acme", role="backend") == 1
        assert m("tillwire_connections_open") == 3 and m("tillwire_auth_ok_total") == 3

        pay = {"order": "o1", "status": "paid"}
        await be.send("payment.result", pay, "terminal:acme/t1")
        msg = await t1.receive(timeout=3)
        await m.scrape()
        assert m("tillwire_inflight_messages") == 1             # delivered, not acked
        await msg.ack()
        price = {"sku": "A1", "price": "5.00", "version": 1}
        await be.send("price.update", price, "store:acme/s1")
        for conn in (t1, t2):
            assert (await conn.receive(timeout=3)).kind == "price.update"
        await eventually(lambda: node.counters.ack_latency.count == 1)
        await m.scrape()
        p0, p2 = len(orjson.dumps(pay)), len(orjson.dumps(price))
        assert m("tillwire_messages_in_total", lane="P0", source="terminal") == 1
        assert m("tillwire_message_bytes_in_total", lane="P0", source="terminal") == p0
        assert m("tillwire_messages_in_total", lane="P2", source="terminal") == 1
        assert m("tillwire_messages_out_total", lane="P0") == 1
        assert m("tillwire_message_bytes_out_total", lane="P0") == p0
        assert m("tillwire_messages_out_total", lane="P2") == 2       # fan-out: two tills
        assert m("tillwire_message_bytes_out_total", lane="P2") == 2 * p2
        assert m("tillwire_messages_out_total", lane="P1") == 0
        assert m("tillwire_messages_accepted_total") == 1 and m("tillwire_broadcasts_total") == 1
        assert m("tillwire_inflight_messages") == 0
        assert m("tillwire_store_write_seconds_count") == 1
        assert m("tillwire_store_write_seconds_bucket", le="+Inf") == 1
        assert 0 < m("tillwire_store_write_seconds_sum") < 1
        assert m("tillwire_ack_latency_seconds_count") == 1
        assert 0 < m("tillwire_ack_latency_seconds_sum") < 3
        # Buckets are cumulative and end at the count.
        les = sorted((float(dict(k[1])["le"]), v) for k, v in m.samples.items()
                     if k[0] == "tillwire_ack_latency_seconds_bucket")
        assert [v for _, v in les] == sorted(v for _, v in les) and les[-1][1] == 1
        assert m("tillwire_frames_received_total") >= 9       # 3 x (HELLO, RESUME), 2 SEND, ACK
        assert m("tillwire_bytes_written_total") > 0 and m("tillwire_writes_total") > 0
        assert m("tillwire_channels") == 1 and m("tillwire_registered_terminals") == 3
        assert m("tillwire_draining") == 0 and m("tillwire_uptime_seconds") >= 0
        assert m("tillwire_gc_frozen_objects") == 0        # only `tillwire serve` freezes
        assert [m("tillwire_gc_threshold", generation=str(g)) for g in range(3)] == \
            list(gc.get_threshold())                       # (and only it changes these)
        assert m("tillwire_process_resident_memory_bytes") > 0
        await t2.close()
        await eventually(lambda: node.connection_count == 2)
        await m.scrape()
        assert m("tillwire_connections", tenant="acme", role="pos") == 1


@aiotest()
async def test_refusals_closes_and_retransmits_are_counted():
    async with scraped_node(**{"heartbeat.min": 0.1,
                               "delivery.retransmit_initial": 0.2}) as (node, m):
        host, port = node.addresses[0]
        be = await connect(node, "hq", store="hq", roles=("backend",))
        till = await connect(node, "t1")
        with pytest.raises(SessionClosed):                       # a forged token
            await connect(node, "t9", token=token("t9", secret="another-secret-00000"))
        with pytest.raises(SendError):                           # a till may not send P0
            await till.send("payment.result", {"order": "o", "status": "paid"},
                            "terminal:acme/t2")
        with pytest.raises(SendError):                           # nor watch another store
            await till.subscribe("store:acme/s2")
        again = await connect(node, "t1")                        # takes over t1
        await asyncio.wait_for(till.closed.wait(), 3)
        # A terminal that goes silent after the handshake (200 ms heartbeat).
        enc = Encoder()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(enc.encode(Frame(FrameType.HELLO, version=1, heartbeat=200,
                                      token=token("mute")))
                     + enc.encode(Frame(FrameType.RESUME)))
        # A payment nobody acks is retransmitted.
        await be.send("payment.result", {"order": "o2", "status": "paid"}, "terminal:acme/t1")
        await again.receive(timeout=3)
        await eventually(lambda: again.session.duplicates >= 1, timeout=3)   # the resend arrived
        await eventually(lambda: node.counters.heartbeat_timeouts == 1, timeout=3)
        assert node.kick("terminal:acme/t1", "bye")
        await m.scrape()
        assert m("tillwire_auth_failures_total") == 1
        assert m("tillwire_acl_denials_total") == 2
        assert m("tillwire_takeovers_total") == 1
        assert m("tillwire_heartbeat_timeouts_total") == 1
        assert m("tillwire_retransmits_total") >= 1
        assert m("tillwire_messages_out_total", lane="P0") == 1 + m("tillwire_retransmits_total")
        assert m("tillwire_kicks_total") == 1
        assert m("tillwire_slow_consumer_closes_total") == 0
        writer.close()


@aiotest()
async def test_slow_terminal_queued_bytes_and_conflation():
    async with scraped_node() as (node, m):
        be = await connect(node, "hq", store="hq", roles=("backend",))
        till = await connect(node, "t1", rcvbuf=4096)
        till.pause_reading()
        conn = node.hub.sessions["terminal:acme/t1"]
        i = 0
        while not conn.paused:                   # fill the socket and the transport
            await be.send("promo.offer", {"offer": "p", "title": "Deal", "n": i, "pad": "x" * 8000},
                          "terminal:acme/t1")
            i += 1
            assert i < 5000
        for v in range(1, 51):
            await be.send("price.update", {"sku": "A1", "price": f"{v}.00", "version": v},
                          "store:acme/s1")
        await m.scrape()
        assert m("tillwire_conflated_total") >= 49
        assert m("tillwire_queued_bytes") >= conn.queued_bytes > 0
        assert m("tillwire_connections_write_paused") == 1      # the till, not the backend
        assert m("tillwire_messages_out_total", lane="P2") == 50
        assert m("tillwire_messages_out_total", lane="P3") == i
        # OpenMetrics is served when asked for.
        async with m.http.get("/metrics", headers={
                "Accept": "application/openmetrics-text; version=1.0.0"}) as resp:
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await resp.text()).rstrip().endswith("# EOF")
        till.abort()         # (it stopped reading: it would never see the server close)


ADMIN = "metrics-admin-token-0123456789"
ADMIN_TOKENS = [{"name": "ops", "token": ADMIN, "tenants": ["*"]}]
AUTH = {"Authorization": f"Bearer {ADMIN}"}
ORDER = {"order": "o2", "channel": "app", "event": "ready"}


async def publish(m: Scraper, doc: dict, expect: int = 200) -> dict:
    async with m.http.post("/v1/publish", data=orjson.dumps(doc),
                           headers={**AUTH, "Content-Type": "application/json"}) as resp:
        assert resp.status == expect, await resp.text()
        return await resp.json()


@aiotest()
async def test_messages_in_by_source_refusals_by_code_and_admin_requests():
    async with scraped_node(**{"admin.tokens": ADMIN_TOKENS}) as (node, m):
        await m.scrape()
        till = await connect(node, "t1")
        pay = {"order": "o1", "status": "paid"}
        # Published through the admin API: counted in with source="admin".
        await publish(m, {"to": "terminal:acme/t1", "kind": "payment.result", "body": pay})
        assert (await till.receive(timeout=3)).kind == "payment.result"
        price = {"sku": "A1", "price": "5.00", "version": 1}
        await publish(m, {"to": "store:acme/s1", "kind": "price.update", "body": price})
        refused = await publish(m, {"to": "terminal:acme/t1", "kind": "payment.result",
                                    "body": {"status": "paid"}}, expect=400)   # no order
        # A terminal's refused SEND: counted in, and refused with its code.
        with pytest.raises(SendError):
            await till.send("payment.result", pay, "terminal:acme/t2")
        async with m.http.get("/v1/nowhere", headers=AUTH) as resp:
            assert resp.status == 404
        async with m.http.get("/v1/dead-letters?tenant=acme") as resp:
            assert resp.status == 401                      # no token
        await m.scrape()
        assert m("tillwire_messages_in_total", lane="P0", source="admin") == 2
        assert m("tillwire_message_bytes_in_total", lane="P0", source="admin") == \
            len(orjson.dumps(pay)) + len(orjson.dumps({"status": "paid"}))
        assert m("tillwire_messages_in_total", lane="P2", source="admin") == 1
        assert m("tillwire_messages_in_total", lane="P0", source="terminal") == 1
        assert m("tillwire_messages_in_total", lane="P1", source="admin") == 0
        assert m("tillwire_messages_refused_total", source="admin",
                 code=refused["code"]) == 1
        assert m("tillwire_messages_refused_total", source="terminal", code="FORBIDDEN") == 1
        assert m("tillwire_messages_accepted_total") == 1
        assert m("tillwire_admin_requests_total", route="/v1/publish", method="POST",
                 status="200") == 2
        assert m("tillwire_admin_requests_total", route="/v1/publish", method="POST",
                 status="400") == 1
        assert m("tillwire_admin_requests_total", route="unmatched", method="GET",
                 status="404") == 1
        assert m("tillwire_admin_requests_total", route="/v1/dead-letters", method="GET",
                 status="401") == 1
        assert m("tillwire_admin_requests_total", route="/metrics", method="GET",
                 status="200") == 1                       # the scrape before this one


@aiotest()
async def test_end_to_end_latency_per_lane_written_and_acked():
    async with scraped_node(**{"admin.tokens": ADMIN_TOKENS,
                               "delivery.retransmit_initial": 0.2}) as (node, m):
        till = await connect(node, "t1")
        await publish(m, {"to": "terminal:acme/t1", "kind": "payment.result",
                          "body": {"order": "o1", "status": "paid"}})
        msg = await till.receive(timeout=3)
        # Not acked yet: retransmitted, and a retransmit is no first write.
        await eventually(lambda: till.session.duplicates >= 1, timeout=3)
        await msg.ack()
        await eventually(lambda: node.counters.acked[0].count == 1)
        # A P1 message to a terminal that is offline: its latency includes the wait.
        await provision(node, "t2")          # (known before its first login)
        await publish(m, {"to": "terminal:acme/t2", "kind": "order.event", "lane": "P1",
                          "body": ORDER})
        await asyncio.sleep(0.3)
        t2 = await connect(node, "t2")
        order = await t2.receive(timeout=3)
        assert order.kind == "order.event"
        await order.ack()
        await eventually(lambda: node.counters.acked[1].count == 1)
        await m.scrape()

        def hist(lane, stage):
            return (m("tillwire_delivery_latency_seconds_count", lane=lane, stage=stage),
                    m("tillwire_delivery_latency_seconds_sum", lane=lane, stage=stage),
                    m("tillwire_delivery_latency_seconds_bucket", lane=lane, stage=stage,
                      le="+Inf"))

        written0, acked0 = hist("P0", "written"), hist("P0", "acked")
        assert written0[0] == written0[2] == 1 and acked0[0] == acked0[2] == 1
        assert 0 < written0[1] <= acked0[1]              # written before acked
        assert acked0[1] >= 0.2                          # the ack came after the retransmit
        written1, acked1 = hist("P1", "written"), hist("P1", "acked")
        assert written1[0] == acked1[0] == 1
        assert 0.3 <= written1[1] <= acked1[1]           # the time it waited offline counts
        assert m("tillwire_retransmits_total") >= 1


@aiotest()
async def test_dead_letters_by_reason_and_redriven():
    async with scraped_node(**{"admin.tokens": ADMIN_TOKENS}) as (node, m):
        till = await connect(node, "t1")
        for order in ("o1", "o2"):
            await publish(m, {"to": "terminal:acme/t1", "kind": "payment.result",
                              "body": {"order": order, "status": "paid"}})
        first = await till.receive(timeout=3)
        till.nack(first.lane, first.seq, code=7, reason="unknown order")
        await eventually(lambda: node.counters.dead_rejected[0] == 1)
        await provision(node, "t3")          # (known, never logged in)
        await publish(m, {"to": "terminal:acme/t3", "kind": "order.event", "ttl": 0.05,
                          "body": ORDER})
        await asyncio.sleep(0.1)
        assert len(await node.expire(time.time())) == 1
        await node.redrive("terminal:acme/t3")
        await m.scrape()
        assert m("tillwire_dead_letters_total", lane="P0", reason="rejected") == 1
        assert m("tillwire_dead_letters_total", lane="P0", reason="expired") == 0
        assert m("tillwire_dead_letters_total", lane="P1", reason="expired") == 1
        assert m("tillwire_dead_letters_total", lane="P1", reason="rejected") == 0
        assert m("tillwire_redriven_total") == 1


@aiotest()
async def test_sqlite_writer_queue_and_commit_times(tmp_path):
    async with scraped_node(**{"store.backend": "sqlite",
                               "server.data_dir": str(tmp_path)}) as (node, m):
        await m.scrape()
        before = m("tillwire_store_commit_seconds_count")
        be = await connect(node, "hq", store="hq", roles=("backend",))
        till = await connect(node, "t1")
        for n in range(3):
            await be.send("payment.result", {"order": f"o{n}", "status": "paid"},
                          "terminal:acme/t1")
        for _ in range(3):
            await (await till.receive(timeout=3)).ack()
        await m.scrape()
        assert m("tillwire_store_commit_seconds_count") >= before + 1     # the accepts' commits
        assert m("tillwire_store_commit_seconds_bucket", le="+Inf") == \
            m("tillwire_store_commit_seconds_count")
        assert m("tillwire_store_commit_seconds_sum") > 0
        assert m("tillwire_store_writer_queue") >= 0
        assert m("tillwire_store_failed_commits_total") == 0


@aiotest()
async def test_tickets_chat_and_offer_cap_are_counted():
    async with scraped_node(**{"tickets.escalate_after": 0.3, "offers.cap_count": 1,
                               "offers.cap_window": 3600.0}) as (node, m):
        till = await connect(node, "t1")
        # No staff on duty: nobody receives it (it waits for the first staff login).
        ack = await till.send("ticket.open", {"code": "E1"}, "role:acme/s1/staff")
        assert orjson.loads(ack.payload)["recipients"] == 0
        first = orjson.loads(ack.payload)["ticket"]
        staff = await connect(node, "h1", roles=("staff",))
        assert (await staff.receive(timeout=3)).body["ticket"] == first
        ack = await till.send("ticket.open", {"code": "E2"}, "role:acme/s1/staff")
        tid = orjson.loads(ack.payload)["ticket"]
        assert (await staff.receive(timeout=3)).body["ticket"] == tid
        await staff.send("ticket.resolve", {"ticket": tid, "resolution": "fixed"},
                         "terminal:acme/t1")
        # The first ticket escalates: no manager in s1 or its region, so to the
        # tenant's managers (tickets.escalate_role).
        await connect(node, "m9", store="hq", roles=("manager",))
        await eventually(lambda: node.counters.tickets["escalated"] == 1, timeout=5)
        agent = await connect(node, "a1", store="cs", roles=("service",))
        app = await connect(node, "app1", roles=("customer",), member="m1")
        for text in ("hello", "anyone?"):
            await app.send("chat.message", {"conversation": "cv1", "text": text},
                           "role:acme/*/service")
        assert (await agent.receive(timeout=3)).kind == "chat.message"
        be = await connect(node, "hq", store="hq", roles=("backend",))
        for n in range(3):
            await be.send("promo.offer", {"offer": f"o{n}", "title": "Deal"}, "member:acme/m1")
        await m.scrape()
        assert m("tillwire_tickets_total", event="opened") == 2
        assert m("tillwire_tickets_total", event="resolved") == 1
        assert m("tillwire_tickets_total", event="escalated") == 1
        assert m("tillwire_tickets_total", event="unattended") == 1    # at open
        assert m("tillwire_tickets_open") == 1
        assert m("tillwire_chat_conversations_total") == 1
        assert m("tillwire_chat_messages_total") == 2
        assert m("tillwire_offers_capped_total") == 2


@aiotest()
async def test_node_and_worker_labels_of_a_worker_process():
    from tillwire.server.main import make_store
    from tillwire.server.node import Node

    cfg = make_config()
    node = Node(cfg, make_store(cfg), node_id="edge-1", worker=3)
    await node.start()
    try:
        runner = await start_admin(node, node.cfg, None, "127.0.0.1", 0)
        host, port = runner.addresses[0][:2]
        try:
            async with aiohttp.ClientSession(f"http://{host}:{port}") as http:
                m = await Scraper(http, "edge-1", "3").scrape()     # checks every series
                assert m("tillwire_process_resident_memory_bytes") > 0
                assert m("tillwire_connections_open") == 0
        finally:
            await runner.cleanup()
    finally:
        await node.stop()
