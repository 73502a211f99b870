"""Dead-letter redrive through the admin API, end to end: a real Node with
the SQLite store (its writer in a process), the admin app on loopback, real
terminal connections.  A redriven message comes back to its terminal as a
new inbox entry (new seq, same message id), its trace shows it, the dead
letter leaves the list, and the redrive is audited; the store failing
changes nothing (tests/failing.py around the real store); and over Redis,
a redrive through another node's admin API reaches the till where it is.  Responses are
checked against server/openapi.json by ``Api.call``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from failing import Failing
from redis_server import fresh_prefix
from support import aiotest, connect, eventually, provision
from test_admin import ACME, GLOBEX, PAY, admin_env
from test_fleet import Node as FleetNode
from tillwire.core.codes import Lane
from tillwire.server.main import make_store

ONE = "/v1/terminals/{tenant}/{terminal}/dead-letters/{id}/redrive"
ALL = "/v1/terminals/{tenant}/{terminal}/dead-letters/redrive"


@contextlib.asynccontextmanager
async def redrive_env(tmp_path):
    """The admin API over a node whose SQLite store is wrapped in Failing."""
    made = []

    def failing(cfg):
        made.append(Failing(make_store(cfg)))
        return made[0]

    async with admin_env(tmp_path, failing, **{"store.backend": "sqlite"}) as env:
        yield env, made[0]


async def dead_lettered(env):
    """Till t1 connected, a payment published to it and refused by it (NACK
    code 7): (the till's connection, the publish answer, the message)."""
    till = await connect(env.node, "t1")
    res = await env.api.call("POST", "/v1/publish", json_body={
        "to": "terminal:acme/t1", "kind": "payment.result", "body": PAY})
    msg = await till.receive(timeout=3)
    till.nack(msg.lane, msg.seq, code=7, reason="unknown order")
    await eventually(lambda: env.node.counters.dead_rejected[0] == 1)
    return till, res, msg


async def dead_letters(env) -> list[dict]:
    doc = await env.api.call("GET", "/v1/dead-letters?tenant=acme", "/v1/dead-letters")
    return doc["dead_letters"]


@aiotest()
async def test_one_dead_letter_comes_back_as_a_new_entry_and_is_audited(tmp_path):
    async with redrive_env(tmp_path) as (env, _):
        till, res, msg = await dead_lettered(env)
        listed = await dead_letters(env)
        assert [(d["id"], d["seq"]) for d in listed] == [(res["id"], msg.seq)]
        url = f"/v1/terminals/acme/t1/dead-letters/{res['id']}/redrive"
        doc = await env.api.call("POST", url, ONE)
        assert doc == {"terminal": "terminal:acme/t1", "redriven": [
            {"id": res["id"], "lane": "P0", "kind": "payment.result", "dead_seq": msg.seq,
             "seq": msg.seq + 1}]}
        # Delivered again at once: the same message, a new seq, not a duplicate.
        again = await till.receive(timeout=3)
        assert (str(again.id), again.seq, again.lane, again.body, again.duplicate) == \
            (res["id"], msg.seq + 1, Lane.P0, PAY, False)
        await again.ack()
        assert await dead_letters(env) == []

        async def trace():
            doc = await env.api.call("GET", f"/v1/messages/{res['id']}", "/v1/messages/{id}")
            return [(r["seq"], r["state"], r["reason"]) for r in doc["recipients"]]

        for _ in range(100):
            states = await trace()
            if states[1][1] == "acked":
                break
            await asyncio.sleep(0.02)
        assert states == [(msg.seq, "rejected", "NACK 7 BAD_UTF8: unknown order"),
                          (msg.seq + 1, "acked", "redriven")]
        [line] = env.events("redrive")
        assert line["who"] == "admin:ops" and line["tenant"] == "acme" and line["terminal"] == "t1"
        assert line["detail"]["entries"] == [
            {"id": res["id"], "lane": "P0", "dead_seq": msg.seq, "seq": msg.seq + 1}]
        call = [e for e in env.events("admin.call") if e["detail"]["path"] == url]
        assert call[0]["detail"]["redriven"] == 1 and call[0]["detail"]["status"] == 200
        # Gone from the dead letters: a second redrive finds nothing.
        doc = await env.api.call("POST", url, ONE, expect=404)
        assert doc["field"] == "id" and res["id"] in doc["error"]


@aiotest()
async def test_all_of_a_terminals_dead_letters_wait_for_it_in_order(tmp_path):
    async with redrive_env(tmp_path) as (env, _):
        await provision(env.node, "t2")          # (known before its first login)
        ids = []
        for n in range(3):
            res = await env.api.call("POST", "/v1/publish", json_body={
                "to": "terminal:acme/t2", "kind": "payment.result", "ttl": 0.05,
                "body": {**PAY, "order": f"o-{n}"}})
            ids.append(res["id"])
        await asyncio.sleep(0.1)
        assert len(await env.node.expire(time.time())) == 3      # t2 never came
        assert [d["reason"] for d in await dead_letters(env)] == ["ttl"] * 3
        doc = await env.api.call("POST", "/v1/terminals/acme/t2/dead-letters/redrive?limit=2",
                                 ALL)
        assert [(e["id"], e["dead_seq"], e["seq"]) for e in doc["redriven"]] == \
            [(ids[0], 1, 4), (ids[1], 2, 5)]
        doc = await env.api.call("POST", "/v1/terminals/acme/t2/dead-letters/redrive", ALL)
        assert [(e["id"], e["seq"]) for e in doc["redriven"]] == [(ids[2], 6)]
        # Nothing left: an empty answer, not an error.
        doc = await env.api.call("POST", "/v1/terminals/acme/t2/dead-letters/redrive", ALL)
        assert doc["redriven"] == []
        # A fresh TTL: the terminal gets all three when it comes, in their old order.
        await asyncio.sleep(0.1)
        assert await env.node.expire(time.time()) == []
        t2 = await connect(env.node, "t2")
        got = [await t2.receive(timeout=3) for _ in range(3)]
        assert [(str(m.id), m.seq, m.body["order"]) for m in got] == \
            [(ids[0], 4, "o-0"), (ids[1], 5, "o-1"), (ids[2], 6, "o-2")]
        assert len(env.events("redrive")) == 3


@aiotest()
async def test_refusals_name_the_problem(tmp_path):
    async with redrive_env(tmp_path) as (env, _):
        doc = await env.api.call("POST", "/v1/terminals/acme/t1/dead-letters/abc/redrive", ONE,
                                 expect=400)
        assert doc["field"] == "id"
        doc = await env.api.call("POST", "/v1/terminals/acme/t1/dead-letters/redrive?limit=0",
                                 ALL, expect=400)
        assert doc["field"] == "limit"
        doc = await env.api.call("POST", "/v1/terminals/acme/t1/dead-letters/redrive", ALL,
                                 auth=GLOBEX, expect=403)
        assert doc["field"] == "tenant"
        doc = await env.api.call("POST", "/v1/terminals/acme/t1/dead-letters/12/redrive", ONE,
                                 auth=ACME, expect=404)
        assert doc["field"] == "id"
        assert env.events("redrive") == []


@aiotest()
async def test_a_failing_store_changes_nothing_and_a_retry_works(tmp_path):
    async with redrive_env(tmp_path) as (env, store):
        till, res, msg = await dead_lettered(env)
        url = f"/v1/terminals/acme/t1/dead-letters/{res['id']}/redrive"
        store.fail("redrive")
        doc = await env.api.call("POST", url, ONE, expect=503)
        assert doc["code"] == "STORE_UNAVAILABLE" and "nothing changed" in doc["error"]
        assert [d["id"] for d in await dead_letters(env)] == [res["id"]]
        assert env.events("redrive") == [] and env.node.counters.redriven == 0
        with contextlib.suppress(asyncio.TimeoutError):
            extra = await till.receive(timeout=0.3)
            raise AssertionError(f"nothing was redriven, yet {extra!r} came")
        doc = await env.api.call("POST", url, ONE)                   # the retry
        assert [e["seq"] for e in doc["redriven"]] == [msg.seq + 1]
        assert (await till.receive(timeout=3)).seq == msg.seq + 1
        assert await dead_letters(env) == [] and env.node.counters.redriven == 1
        assert store.calls["redrive"] == 2


@pytest.mark.slow
@aiotest(120)
async def test_a_redrive_through_another_node_reaches_the_till_where_it_is(tmp_path):
    prefix = fresh_prefix()
    a = FleetNode(tmp_path, "node-a", prefix, workers=1).start()
    b = FleetNode(tmp_path, "node-b", prefix, workers=1).start()
    try:
        till = await connect(a.addr, "till1", timeout=5)
        status, res = await a.admin("POST", "/v1/publish", {
            "to": "terminal:acme/till1", "kind": "payment.result", "body": PAY})
        assert status == 200, res
        msg = await till.receive(timeout=10)
        till.nack(msg.lane, msg.seq, code=7, reason="unknown order")
        # A later one acked: nothing is in flight any more (no retransmit to
        # come), so only the redrive brings the first one back.
        status, _ = await a.admin("POST", "/v1/publish", {
            "to": "terminal:acme/till1", "kind": "payment.result",
            "body": {**PAY, "order": "o-1002"}})
        later = await till.receive(timeout=10)
        await later.ack()
        for _ in range(250):
            status, doc = await b.admin("GET", "/v1/dead-letters?tenant=acme")
            if doc["dead_letters"]:
                break
            await asyncio.sleep(0.02)
        assert [d["id"] for d in doc["dead_letters"]] == [res["id"]]
        status, doc = await b.admin(
            "POST", f"/v1/terminals/acme/till1/dead-letters/{res['id']}/redrive")
        assert status == 200 and [e["seq"] for e in doc["redriven"]] == [msg.seq + 2], doc
        again = await till.receive(timeout=10)
        assert (str(again.id), again.seq, again.body) == (res["id"], msg.seq + 2, PAY)
        await again.ack()
        await till.close()
    finally:
        assert a.stop() == 0
        assert b.stop() == 0
