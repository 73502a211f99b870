"""Prometheus metrics: real traffic through a real Node, scraped over HTTP
from the admin app's ``/metrics`` and parsed with prometheus_client's parser."""

from __future__ import annotations

import asyncio
import contextlib
import gc

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import aiotest, connect, eventually, make_config, start_node, token
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
            yield node, Scraper(http, node.node_id, node.worker)
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
