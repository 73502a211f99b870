"""The admin HTTP API end to end: a real Node and the admin app on loopback
ports, real terminal connections, real HTTP requests (aiohttp client).

Every request a test makes through ``Api.call`` is checked against
server/openapi.json: a successful request's body against the operation's
request schema, and every response against the schema the document
declares for that status.  The audit log is read back from disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import time

import aiohttp
import jsonschema
import orjson
import pytest

from support import SECRET, aiotest, connect, eventually, make_config, start_node, token
from tillwire.core.codes import Code, Lane
from tillwire.client.connection import SendError
from tillwire.core.errors import SessionClosed
from tillwire.server.admin import start_admin
from tillwire.server.audit import AuditLog

OPS = "ops-token-0123456789abcdef"           # every tenant
ACME = "acme-token-0123456789abcdef"         # acme only
GLOBEX = "globex-token-0123456789abcdef"     # globex only
ADMIN_TOKENS = [
    {"name": "ops", "token": OPS, "tenants": ["*"]},
    {"name": "acme-desk", "token": ACME, "tenants": ["acme"]},
    {"name": "globex-desk", "token": GLOBEX, "tenants": ["globex"]},
]

SPEC_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "server", "openapi.json")
with open(SPEC_PATH, "rb") as _f:
    SPEC = orjson.loads(_f.read())


def _resolve(obj: dict) -> dict:
    while "$ref" in obj and len(obj) == 1:
        node = SPEC
        for part in obj["$ref"].lstrip("#/").split("/"):
            node = node[part]
        obj = node
    return obj


def validate(schema: dict, instance) -> None:
    """Validate against a schema of the document ($refs resolve inside it)."""
    root = {**schema, "components": SPEC["components"]}
    jsonschema.Draft202012Validator(root).validate(instance)


def operation(template: str, method: str) -> dict:
    assert template in SPEC["paths"], f"{template} is not documented"
    op = SPEC["paths"][template].get(method.lower())
    assert op is not None, f"{method} {template} is not documented"
    return op


def check_response(template: str, method: str, status: int, doc) -> None:
    responses = operation(template, method)["responses"]
    assert str(status) in responses, f"{method} {template}: status {status} is not documented"
    response = _resolve(responses[str(status)])
    validate(response["content"]["application/json"]["schema"], doc)


def check_request(template: str, method: str, body) -> None:
    request = operation(template, method)["requestBody"]
    validate(request["content"]["application/json"]["schema"], body)


class Api:
    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http

    async def call(self, method: str, url: str, template: str | None = None, *,
                   json_body=None, data=None, headers=None, auth: str | None = OPS,
                   expect: int = 200):
        hdrs = dict(headers or {})
        if auth is not None:
            hdrs["Authorization"] = f"Bearer {auth}"
        if json_body is not None:
            data = orjson.dumps(json_body)
            hdrs.setdefault("Content-Type", "application/json")
        async with self.http.request(method, url, data=data, headers=hdrs) as resp:
            raw = await resp.read()
            assert resp.status == expect, f"{method} {url}: {resp.status} {raw[:500]!r}"
            assert resp.content_type == "application/json", resp.content_type
            doc = orjson.loads(raw)
        template = template or url.split("?")[0]
        if 200 <= expect < 300 and json_body is not None:
            check_request(template, method, json_body)
        check_response(template, method, expect, doc)
        if expect >= 400:
            assert doc["error"]
        return doc


class Env:
    def __init__(self, node, api, audit, audit_path, base) -> None:
        self.node = node
        self.api = api
        self.audit = audit
        self.audit_path = audit_path
        self.base = base

    def audit_lines(self) -> list[dict]:
        self.audit.flush()          # (lines are written by the audit log's thread)
        with open(self.audit_path, "rb") as f:
            return [orjson.loads(line) for line in f.read().splitlines()]

    def events(self, name: str) -> list[dict]:
        return [e for e in self.audit_lines() if e["event"] == name]


@contextlib.asynccontextmanager
async def admin_env(tmp_path, store_of=None, **overrides):
    """The admin API on loopback over a node; ``store_of(cfg)``, when given,
    makes the node's store (a failing fake around the real one, say)."""
    audit_path = str(tmp_path / "audit.log")
    cfg = make_config(str(tmp_path), **{"admin.tokens": ADMIN_TOKENS,
                                        "log.audit_path": audit_path, **overrides})
    node = await start_node(cfg, store_of(cfg) if store_of is not None else None)
    audit = AuditLog(audit_path).open()
    node.audit = audit
    runner = await start_admin(node, cfg, audit, "127.0.0.1", 0)
    host, port = runner.addresses[0][:2]
    base = f"http://{host}:{port}"
    try:
        async with aiohttp.ClientSession(base) as http:
            yield Env(node, Api(http), audit, audit_path, base)
    finally:
        await runner.cleanup()
        await node.stop()
        audit.close()


PAY = {"order": "o-1001", "status": "paid", "amount": "12.50", "currency": "CNY"}


# -- publish ---------------------------------------------------------------------------


@aiotest()
async def test_publish_p0_is_stored_delivered_deduplicated_and_traced(tmp_path):
    async with admin_env(tmp_path) as env:
        till = await connect(env.node, "till7")
        req = {"to": "terminal:acme/till7", "kind": "payment.result", "body": PAY, "ref": 42,
               "receipt": True}
        first = await env.api.call("POST", "/v1/publish", json_body=req)
        assert first["duplicate"] is False and first["recipients"] == 1
        msg = await till.receive(timeout=3)
        assert msg.kind == "payment.result" and msg.lane == Lane.P0
        assert msg.body == PAY and str(msg.id) == first["id"]
        # The same ref again: the first message's id, nothing stored twice.
        again = await env.api.call("POST", "/v1/publish", json_body=req)
        assert again == {"id": first["id"], "duplicate": True, "recipients": 0}
        with pytest.raises(asyncio.TimeoutError):
            await till.receive(timeout=0.3)
        # Refs are per admin token: another token's ref 42 is a new message.
        other = await env.api.call("POST", "/v1/publish", json_body=req, auth=ACME)
        assert other["id"] != first["id"] and other["duplicate"] is False
        await msg.ack()
        second = await till.receive(timeout=3)
        await second.ack()
        await eventually(lambda: env.node.delivery.in_flight() == 0)
        await env.node.delivery.flush_batches()
        trace = await env.api.call("GET", f"/v1/messages/{first['id']}", "/v1/messages/{id}")
        assert trace["sender"] == "admin:ops" and trace["ref"] == 42 and trace["lane"] == "P0"
        assert trace["kind"] == "payment.result" and trace["to"] == "terminal:acme/till7"
        [rcpt] = trace["recipients"]
        assert rcpt["terminal"] == "terminal:acme/till7" and rcpt["state"] == "acked"
        await env.api.call("GET", "/v1/messages/999999", "/v1/messages/{id}", expect=404)
        await env.api.call("GET", "/v1/messages/abc", "/v1/messages/{id}", expect=400)
        # A token of another tenant may not read acme's trace, nor learn that it exists:
        # its answer is a missing message's.
        denied = await env.api.call("GET", f"/v1/messages/{first['id']}", "/v1/messages/{id}",
                                    auth=GLOBEX, expect=404)
        missing = await env.api.call("GET", "/v1/messages/999999", "/v1/messages/{id}",
                                     auth=GLOBEX, expect=404)
        assert denied == {**missing, "error": missing["error"].replace("999999", first["id"])}


@aiotest()
async def test_publish_group_p1_uses_the_registry_and_default_lanes(tmp_path):
    async with admin_env(tmp_path) as env:
        a = await connect(env.node, "t1", store="s1")
        b = await connect(env.node, "t2", store="s1")
        await connect(env.node, "t3", store="s2")
        event = {"order": "A-1", "channel": "mall", "event": "paid"}
        res = await env.api.call("POST", "/v1/publish", json_body={
            "to": "store:acme/s1", "kind": "order.event", "body": event})
        assert res["recipients"] == 2
        for conn in (a, b):
            msg = await conn.receive(timeout=3)
            assert msg.lane == Lane.P1 and msg.body == event
        # An unregistered kind goes to P1 unless a lane is given.
        res = await env.api.call("POST", "/v1/publish", json_body={
            "to": "terminal:acme/t1", "kind": "custom.note", "body": {"text": "hi"}, "lane": 1,
            "ttl": 60})
        assert res["recipients"] == 1
        assert (await a.receive(timeout=3)).kind == "custom.note"


@aiotest()
async def test_publish_p2_and_p3_return_offsets_or_stale(tmp_path):
    async with admin_env(tmp_path) as env:
        till = await connect(env.node, "t1", store="s1")
        price = {"sku": "A1", "price": "5.00", "version": 3}
        res = await env.api.call("POST", "/v1/publish", json_body={
            "to": "store:acme/s1", "kind": "price.update", "body": price})
        assert res == {"channel": "store:acme/s1", "offset": 1}
        stale = await env.api.call("POST", "/v1/publish", json_body={
            "to": "store:acme/s1", "kind": "price.update",
            "body": {"sku": "A1", "price": "4.00", "version": 2}, "lane": "P2"})
        assert stale == {"stale": True}
        offer = await env.api.call("POST", "/v1/publish", json_body={
            "to": "store:acme/s1", "kind": "promo.offer",
            "body": {"offer": "x1", "title": "Two for one"}, "ttl": 30})
        # Offers report what the policy did (tests/test_offers.py covers it).
        assert offer == {"channel": "store:acme/s1", "offset": 1, "delivered": 1, "quiet": 0,
                         "capped": 0}
        got = []
        while len(got) < 2:
            msg = await till.receive(timeout=3)
            if msg.channel:
                got.append((msg.kind, msg.lane, msg.body))
        assert ("price.update", Lane.P2, price) in got
        assert ("promo.offer", Lane.P3, {"offer": "x1", "title": "Two for one"}) in got
        chans = await env.api.call("GET", "/v1/channels?tenant=acme", "/v1/channels")
        by = {(c["name"], c["lane"]): c for c in chans["channels"]}
        assert by[("store:acme/s1", "P2")]["offset"] == 1
        assert by[("store:acme/s1", "P2")]["lvc"] == 1
        assert by[("store:acme/s1", "P3")]["history"] == 1
        # Each stream has an epoch of its own (a freed stream that comes back gets a new one).
        assert by[("store:acme/s1", "P2")]["epoch"] != by[("store:acme/s1", "P3")]["epoch"]
        assert min(by[("store:acme/s1", lane)]["epoch"] for lane in ("P2", "P3")) > 0
        assert (await env.api.call("GET", "/v1/channels?tenant=globex", "/v1/channels",
                                   auth=GLOBEX))["channels"] == []


@pytest.mark.parametrize("body, status, field", [
    ({"kind": "payment.result", "body": PAY}, 400, "to"),
    ({"to": "terminal:acme", "kind": "payment.result", "body": PAY}, 400, "to"),
    ({"to": "nowhere:acme/x", "kind": "payment.result", "body": PAY}, 400, "to"),
    ({"to": "terminal:acme/t1", "body": PAY}, 400, "kind"),
    ({"to": "terminal:acme/t1", "kind": "Payment Result", "body": PAY}, 400, "kind"),
    ({"to": "terminal:acme/t1", "kind": "payment.result", "body": [1]}, 400, "body"),
    ({"to": "terminal:acme/t1", "kind": "payment.result", "body": {"status": "paid"}}, 400,
     "body.order"),
    ({"to": "terminal:acme/t1", "kind": "payment.result",
      "body": {**PAY, "status": "maybe"}}, 400, "body.status"),
    ({"to": "terminal:acme/t1", "kind": "order.event",
      "body": {"order": "A", "channel": "mall", "event": "paid", "note": "4111 1111 1111 1111"}},
     400, "body.note"),
    ({"to": "terminal:acme/t1", "kind": "payment.result", "body": PAY, "lane": "P7"}, 400, "lane"),
    ({"to": "terminal:acme/t1", "kind": "payment.result", "body": PAY, "lane": True}, 400, "lane"),
    ({"to": "terminal:acme/t1", "kind": "payment.result", "body": PAY, "ttl": -1}, 400, "ttl"),
    ({"to": "terminal:acme/t1", "kind": "payment.result", "body": PAY, "ttl": "1h"}, 400, "ttl"),
    ({"to": "terminal:acme/t1", "kind": "payment.result", "body": PAY, "ref": -5}, 400, "ref"),
    ({"to": "terminal:acme/t1", "kind": "payment.result", "body": PAY, "ref": 1.5}, 400, "ref"),
    ({"to": "terminal:acme/t1", "kind": "payment.result", "body": PAY, "receipt": "yes"}, 400,
     "receipt"),
    ({"to": "terminal:acme/t1", "kind": "payment.result", "body": PAY, "key": "k"}, 400, "key"),
    ({"to": "terminal:acme/t1", "kind": "payment.result", "body": PAY, "tll": 5}, 400, "tll"),
    ({"to": "terminal:globex/t1", "kind": "payment.result", "body": PAY}, 403, "tenant"),
    # Tickets and chat carry service state: terminals send them, not the back office.
    ({"to": "role:acme/s1/staff", "kind": "ticket.open", "body": {"code": "E1"}}, 400, "kind"),
    ({"to": "terminal:acme/t1", "kind": "chat.message",
      "body": {"conversation": "c1", "text": "hi"}}, 400, "kind"),
])
@aiotest()
async def test_publish_refusals_name_the_field(tmp_path, body, status, field):
    async with admin_env(tmp_path) as env:
        doc = await env.api.call("POST", "/v1/publish", json_body=body, auth=ACME, expect=status)
        assert doc["field"] == field, doc
        if field == "body.note":
            assert doc["code"] == "CARD_DATA" and "4111" not in doc["error"].replace(
                "body.note", "")
        if status == 403:
            assert "globex" in doc["error"] and "acme-desk" in doc["error"]
        assert env.node.counters.accepted == 0 and env.node.counters.broadcasts == 0


@aiotest()
async def test_bodies_that_are_not_json_or_too_large(tmp_path):
    async with admin_env(tmp_path, **{"server.max_frame_size": 4096}) as env:
        api = env.api
        doc = await api.call("POST", "/v1/publish", data=b"to=terminal:acme/t1",
                             headers={"Content-Type": "application/x-www-form-urlencoded"},
                             expect=415)
        assert doc["field"] == "Content-Type"
        doc = await api.call("POST", "/v1/publish", data=b'{"to": "terminal:acme/t1",',
                             headers={"Content-Type": "application/json"}, expect=400)
        assert doc["field"] == "body" and "JSON" in doc["error"]
        doc = await api.call("POST", "/v1/publish", data=b"", expect=400,
                             headers={"Content-Type": "application/json"})
        assert doc["field"] == "body"
        big = {"to": "terminal:acme/t1", "kind": "custom.note", "body": {"text": "x" * 5000}}
        doc = await api.call("POST", "/v1/publish", json_body=big, expect=413)
        assert doc["field"] == "body" and "4096" in doc["error"]
        # Chunked (no Content-Length): the limit holds while reading.

        async def chunks():
            yield orjson.dumps(big)[:3000]
            yield orjson.dumps(big)[3000:]

        async with api.http.post("/v1/publish", data=chunks(), headers={
                "Authorization": f"Bearer {OPS}", "Content-Type": "application/json"}) as resp:
            assert resp.status == 413
            assert (await resp.json())["field"] == "body"
        # Unknown endpoints and methods are JSON errors too.
        async with api.http.get("/v1/nope", headers={"Authorization": f"Bearer {OPS}"}) as resp:
            assert resp.status == 404 and (await resp.json())["field"] == "path"
        async with api.http.get("/v1/publish", headers={"Authorization": f"Bearer {OPS}"}) as resp:
            assert resp.status == 405 and (await resp.json())["field"] == "method"
            assert "POST" in resp.headers["Allow"]


# -- authentication and the audit trail ----------------------------------------------------


@aiotest()
async def test_tokens_are_required_and_scoped_to_tenants(tmp_path):
    async with admin_env(tmp_path) as env:
        api = env.api
        for auth, headers, why in ((None, None, "missing"), ("not-a-token", None, "unknown"),
                                   (None, {"Authorization": "Basic Zm9vOmJhcg=="}, "Bearer")):
            doc = await api.call("GET", "/v1/presence?tenant=acme", "/v1/presence",
                                 auth=auth, headers=headers, expect=401)
            assert doc["field"] == "Authorization" and why in doc["error"]
        doc = await api.call("GET", "/v1/presence?tenant=acme", "/v1/presence", auth=GLOBEX,
                             expect=403)
        assert "acme" in doc["error"] and doc["field"] == "tenant"
        await api.call("GET", "/v1/presence?tenant=acme", "/v1/presence", auth=ACME)
        await api.call("GET", "/v1/presence", "/v1/presence", expect=400)
        # Draining the node needs a token for every tenant.
        doc = await api.call("POST", "/v1/drain", auth=ACME, expect=403)
        assert doc["field"] == "tenant"
        assert not env.node.draining
        # The unauthenticated endpoints.
        async with api.http.get("/healthz") as resp:
            doc = await resp.json()
            assert resp.status == 200
            check_response("/healthz", "GET", 200, doc)
        async with api.http.get("/readyz") as resp:
            doc = await resp.json()
            assert resp.status == 200 and doc["ready"] is True
            check_response("/readyz", "GET", 200, doc)
        async with api.http.get("/metrics") as resp:
            assert resp.status == 200 and "tillwire_connections" in await resp.text()
        # Three refusals from one address: the first is written, the others
        # are summed into one line when the window is summarised.
        [first] = env.events("admin.unauthorized")
        assert "missing" in first["detail"]["reason"]
        env.audit.flush_aggregates(force=True)
        unauthorized = env.events("admin.unauthorized")
        assert len(unauthorized) == 2 and unauthorized[1]["detail"]["aggregated"] == 2
        assert sum(unauthorized[1]["detail"]["reasons"].values()) == 2
        assert all(e["who"] == "" and e["from"] == "127.0.0.1" for e in unauthorized)
        calls = env.events("admin.call")
        assert {(c["who"], c["detail"]["status"]) for c in calls} >= {
            ("admin:globex-desk", 403), ("admin:acme-desk", 200), ("admin:ops", 400),
            ("admin:acme-desk", 403)}
        env.audit.flush()
        text = pathlib.Path(env.audit_path).read_text()
        for secret in (OPS, ACME, GLOBEX, "not-a-token", "Zm9vOmJhcg=="):
            assert secret not in text


@aiotest()
async def test_audit_log_records_events_but_never_payloads_or_tokens(tmp_path):
    async with admin_env(tmp_path) as env:
        marker = "PAYLOAD-MARKER-7f3a"
        till_token = token("t1")
        till = await connect(env.node, "t1", token=till_token)
        await env.api.call("POST", "/v1/publish", json_body={
            "to": "terminal:acme/t1", "kind": "custom.note", "body": {"text": marker}})
        assert (await till.receive(timeout=3)).body == {"text": marker}
        # A terminal's own events: a forbidden SEND, a takeover, a bad login.
        with pytest.raises(SendError):
            await till.send("payment.result", {**PAY, "note": marker}, "terminal:acme/t2")
        second = await connect(env.node, "t1", token=till_token)
        await asyncio.wait_for(till.closed.wait(), 3)
        bad = token("t9", secret="wrong-secret-000000000")
        with pytest.raises(SessionClosed):
            await connect(env.node, "t9", token=bad)
        await env.api.call("POST", "/v1/terminals/acme/t1/kick",
                           "/v1/terminals/{tenant}/{terminal}/kick",
                           json_body={"reason": "support check"})
        await asyncio.wait_for(second.closed.wait(), 3)
        events = env.audit_lines()
        kinds = [e["event"] for e in events]
        for name in ("auth.ok", "acl.deny", "takeover", "auth.fail", "admin.call", "kick"):
            assert name in kinds, name
        for e in events:
            assert set(e) == {"ts", "event", "who", "tenant", "terminal", "from", "detail"}
            assert e["ts"] > time.time() - 60
        ok = [e for e in events if e["event"] == "auth.ok"]
        assert ok[0]["who"] == "terminal:acme/t1" and ok[0]["tenant"] == "acme"
        assert ok[0]["terminal"] == "t1" and ok[0]["from"] == "127.0.0.1"
        deny = next(e for e in events if e["event"] == "acl.deny")
        assert deny["detail"]["to"] == "terminal:acme/t2" and deny["detail"]["op"] == "send"
        fail = next(e for e in events if e["event"] == "auth.fail")
        assert fail["detail"]["code"] == "AUTH_FAILED"
        kick = next(e for e in events if e["event"] == "kick")
        assert kick["who"] == "admin:ops" and kick["detail"]["reason"] == "support check"
        publish = next(e for e in events if e["event"] == "admin.call"
                       and e["detail"]["path"] == "/v1/publish")
        assert publish["detail"]["to"] == "terminal:acme/t1"
        assert publish["detail"]["kind"] == "custom.note" and publish["detail"]["id"]
        env.audit.flush()
        text = pathlib.Path(env.audit_path).read_text()
        assert marker not in text
        for secret in (till_token, bad, OPS, SECRET):
            assert secret not in text
            assert secret.split(".")[-1] not in text      # not even the signature


def test_audit_log_rotates_by_size_and_keeps_n_backups(tmp_path):
    path = str(tmp_path / "logs" / "audit.log")
    log = AuditLog(path, max_bytes=2000, backups=2).open()
    for i in range(100):
        log.write("admin.call", "admin:ops", tenant="acme", peer="127.0.0.1",
                  detail={"path": f"/v1/presence/{i}", "token": "never-written",
                          "body": {"text": "never"}})
    log.close()
    files = sorted(os.listdir(tmp_path / "logs"))
    assert files == ["audit.log", "audit.log.1", "audit.log.2"]
    seen = []
    for name in ("audit.log.2", "audit.log.1", "audit.log"):
        data = (tmp_path / "logs" / name).read_bytes()
        assert len(data) <= 2000
        for line in data.splitlines():
            e = orjson.loads(line)
            assert "token" not in e["detail"] and "body" not in e["detail"]
            seen.append(int(e["detail"]["path"].rsplit("/", 1)[1]))
    assert seen == sorted(seen) and seen[-1] == 99           # oldest first, newest kept
    assert log.lines == 100
    with pytest.raises(ValueError):
        log.write("made.up", "x")


# -- terminals -------------------------------------------------------------------------------


@aiotest()
async def test_terminal_record_presence_and_kick(tmp_path):
    async with admin_env(tmp_path) as env:
        api = env.api
        till = await connect(env.node, "till1", store="s1", roles=("pos", "staff"),
                             region="north")
        await connect(env.node, "till2", store="s2")
        t = await api.call("GET", "/v1/terminals/acme/till1", "/v1/terminals/{tenant}/{terminal}")
        assert t["connected"] is True and t["node"] == env.node.node_id
        assert t["store"] == "s1" and t["roles"] == ["pos", "staff"] and t["region"] == "north"
        assert t["state"] == "open" and t["heartbeat"] == 30000
        assert abs(t["since"] - time.time()) < 5
        assert t["inbox"] == {"P0": {"acked": 0, "last": 0}, "P1": {"acked": 0, "last": 0}}
        # A payment waits unacked: the inbox positions show it.
        await api.call("POST", "/v1/publish", json_body={
            "to": "terminal:acme/till1", "kind": "payment.result", "body": PAY})
        msg = await till.receive(timeout=3)
        t = await api.call("GET", "/v1/terminals/acme/till1", "/v1/terminals/{tenant}/{terminal}")
        assert t["inbox"]["P0"] == {"acked": 0, "last": 1}
        await msg.ack()
        await eventually(lambda: env.node.delivery.in_flight() == 0)
        await env.node.delivery.flush_batches()
        t = await api.call("GET", "/v1/terminals/acme/till1", "/v1/terminals/{tenant}/{terminal}")
        assert t["inbox"]["P0"] == {"acked": 1, "last": 1}

        p = await api.call("GET", "/v1/presence?tenant=acme", "/v1/presence")
        assert p["count"] == 2 and [x["terminal"] for x in p["terminals"]] == [
            "terminal:acme/till1", "terminal:acme/till2"]
        p = await api.call("GET", "/v1/presence?tenant=acme&store=s2", "/v1/presence")
        assert [x["terminal"] for x in p["terminals"]] == ["terminal:acme/till2"]
        assert p["store"] == "s2"
        p = await api.call("GET", "/v1/presence?tenant=acme&store=bad/store", "/v1/presence",
                           expect=400)
        assert p["field"] == "store"

        kicked = await api.call("POST", "/v1/terminals/acme/till1/kick",
                                "/v1/terminals/{tenant}/{terminal}/kick")
        assert kicked == {"terminal": "terminal:acme/till1", "kicked": True}
        await asyncio.wait_for(till.closed.wait(), 3)
        assert till.close_code == Code.KICKED
        await eventually(lambda: "terminal:acme/till1" not in env.node.hub.sessions)
        t = await api.call("GET", "/v1/terminals/acme/till1", "/v1/terminals/{tenant}/{terminal}")
        assert t["connected"] is False and t["state"] == "offline" and t["node"] is None
        doc = await api.call("POST", "/v1/terminals/acme/till1/kick",
                             "/v1/terminals/{tenant}/{terminal}/kick", expect=409)
        assert doc["field"] == "terminal"
        doc = await api.call("POST", "/v1/terminals/acme/ghost/kick",
                             "/v1/terminals/{tenant}/{terminal}/kick", expect=404)
        assert doc["field"] == "terminal"
        doc = await api.call("GET", "/v1/terminals/acme/ghost",
                             "/v1/terminals/{tenant}/{terminal}", expect=404)
        doc = await api.call("GET", "/v1/terminals/acme/bad%20id",
                             "/v1/terminals/{tenant}/{terminal}", expect=400)
        assert doc["field"] == "terminal"
        doc = await api.call("GET", "/v1/terminals/acme/till1",
                             "/v1/terminals/{tenant}/{terminal}", auth=GLOBEX, expect=403)
        # A till that is kicked may log in again (kick is not revoke).
        again = await connect(env.node, "till1", store="s1")
        assert again.is_open


@aiotest()
async def test_register_retire_and_revoke(tmp_path):
    async with admin_env(tmp_path) as env:
        api = env.api
        path = "/v1/terminals/{tenant}/{terminal}"
        rec = await api.call("PUT", "/v1/terminals/acme/k9", path, json_body={
            "store": "s9", "roles": ["kiosk"], "region": "east"}, expect=201)
        assert rec["store"] == "s9" and rec["roles"] == ["kiosk"] and rec["retired"] is False
        rec = await api.call("PUT", "/v1/terminals/acme/k9", path, json_body={
            "store": "s9", "roles": ["kiosk", "staff"]})
        assert rec["roles"] == ["kiosk", "staff"] and rec["region"] == ""
        assert (await env.node.store.terminals.get("terminal:acme/k9")).roles == ("kiosk", "staff")
        # A registered terminal is a member of its store group before it ever logs in.
        res = await api.call("POST", "/v1/publish", json_body={
            "to": "store:acme/s9", "kind": "order.event",
            "body": {"order": "A", "channel": "app", "event": "ready"}})
        assert res["recipients"] == 1
        for bad, field in (({"roles": ["pos"]}, "store"), ({"store": "s9"}, "roles"),
                           ({"store": "s9", "roles": ["wizard"]}, "roles"),
                           ({"store": "s9", "roles": ["pos"], "region": "a b"}, "region"),
                           ({"store": "s9", "roles": ["pos"], "colour": "red"}, "colour")):
            doc = await api.call("PUT", "/v1/terminals/acme/k9", path, json_body=bad,
                                 expect=400)
            assert doc["field"] == field

        # Retire: kicked, refused at login from now on, not a group member any more.
        k9 = await connect(env.node, "k9", store="s9", roles=("kiosk",))
        doc = await api.call("DELETE", "/v1/terminals/acme/k9", path)
        assert doc == {"terminal": "terminal:acme/k9", "retired": True, "kicked": True}
        await asyncio.wait_for(k9.closed.wait(), 3)
        assert k9.close_code == Code.KICKED
        with pytest.raises(SessionClosed) as refused:
            await connect(env.node, "k9", store="s9", roles=("kiosk",))
        assert refused.value.code == Code.TOKEN_REVOKED
        assert (await env.node.store.terminals.get("terminal:acme/k9")).retired is True
        doc = await api.call("PUT", "/v1/terminals/acme/k9", path, json_body={
            "store": "s9", "roles": ["kiosk"]}, expect=409)
        assert doc["field"] == "terminal"
        res = await api.call("POST", "/v1/publish", json_body={
            "to": "store:acme/s9", "kind": "order.event",
            "body": {"order": "B", "channel": "app", "event": "ready"}})
        assert res["recipients"] == 0
        await api.call("DELETE", "/v1/terminals/acme/nobody", path, expect=404)

        # Revoke: a stolen handheld is cut off and its old token cannot log in again.
        old_token = token("h1", store="s1", now=time.time() - 10)
        h1 = await connect(env.node, "h1", token=old_token)
        doc = await api.call("POST", "/v1/terminals/acme/h1/revoke",
                             "/v1/terminals/{tenant}/{terminal}/revoke",
                             json_body={"reason": "reported stolen"})
        assert doc["kicked"] is True and doc["revoked_before"] <= time.time()
        await asyncio.wait_for(h1.closed.wait(), 3)
        assert h1.close_code == Code.KICKED and h1.close_reason == "reported stolen"
        with pytest.raises(SessionClosed) as refused:
            await connect(env.node, "h1", token=old_token)
        assert refused.value.code == Code.TOKEN_REVOKED
        assert (await env.node.store.terminals.get("terminal:acme/h1")).revoked_before == \
            doc["revoked_before"]
        fresh = await connect(env.node, "h1", token=token("h1", store="s1",
                                                          now=time.time() + 2))
        assert fresh.is_open
        events = {e["event"]: e for e in env.audit_lines()}
        assert events["retire"]["terminal"] == "k9" and events["retire"]["who"] == "admin:ops"
        assert events["revoke"]["detail"]["reason"] == "reported stolen"


@aiotest()
async def test_dead_letters_of_a_tenant(tmp_path):
    async with admin_env(tmp_path) as env:
        till = await connect(env.node, "t1")
        res = await env.api.call("POST", "/v1/publish", json_body={
            "to": "terminal:acme/t1", "kind": "payment.result", "body": PAY})
        msg = await till.receive(timeout=3)
        till.nack(msg.lane, msg.seq, code=7, reason="unknown order")
        dead = []

        async def fetch():
            dead[:] = (await env.api.call("GET", "/v1/dead-letters?tenant=acme&limit=5",
                                          "/v1/dead-letters"))["dead_letters"]
            return dead

        for _ in range(100):
            if await fetch():
                break
            await asyncio.sleep(0.02)
        [d] = dead
        assert d["id"] == res["id"] and d["terminal"] == "terminal:acme/t1"
        assert d["lane"] == "P0" and "unknown order" in d["reason"] and d["sender"] == "admin:ops"
        doc = await env.api.call("GET", "/v1/dead-letters?tenant=acme&limit=0",
                                 "/v1/dead-letters", expect=400)
        assert doc["field"] == "limit"
        assert (await env.api.call("GET", "/v1/dead-letters?tenant=globex", "/v1/dead-letters",
                                   auth=GLOBEX))["dead_letters"] == []


@aiotest()
async def test_a_nack_records_its_reject_code_in_the_dead_letter(tmp_path):
    # (Before issue 19 a NACK with a text payload kept the text and lost its code.)
    async with admin_env(tmp_path) as env:
        till = await connect(env.node, "t1")
        ids = []
        for n in range(2):
            res = await env.api.call("POST", "/v1/publish", json_body={
                "to": "terminal:acme/t1", "kind": "payment.result",
                "body": {**PAY, "order": f"o{n}"}})
            ids.append(res["id"])
        first = await till.receive(timeout=3)
        till.nack(first.lane, first.seq, code=int(Code.BAD_MESSAGE), reason="unknown order")
        second = await till.receive(timeout=3)
        till.nack(second.lane, second.seq, code=4711)           # a vendor's own code, no text
        dead = []
        for _ in range(100):
            dead = (await env.api.call("GET", "/v1/dead-letters?tenant=acme", "/v1/dead-letters"))[
                "dead_letters"]
            if len(dead) == 2:
                break
            await asyncio.sleep(0.02)
        reasons = {d["id"]: d["reason"] for d in dead}
        assert reasons == {ids[0]: "NACK 34 BAD_MESSAGE: unknown order", ids[1]: "NACK 4711"}
        trace = await env.api.call("GET", f"/v1/messages/{ids[0]}", "/v1/messages/{id}")
        assert trace["recipients"][0]["reason"] == "NACK 34 BAD_MESSAGE: unknown order"


@aiotest()
async def test_publish_of_a_misspelled_kind_is_a_400_naming_the_kind_it_meant(tmp_path):
    async with admin_env(tmp_path) as env:
        await connect(env.node, "t1")
        doc = await env.api.call("POST", "/v1/publish", json_body={
            "to": "terminal:acme/t1", "kind": "paymnt.result", "body": PAY, "lane": "P0"},
            expect=400)
        assert doc["field"] == "kind" and doc["code"] == "BAD_MESSAGE"
        assert "did you mean payment.result?" in doc["error"]
        doc = await env.api.call("POST", "/v1/publish", json_body={
            "to": "store:acme/s1", "kind": "price.notice", "body": {"a": 1}}, expect=400)
        assert "price. namespace is reserved" in doc["error"]


# -- drain and readiness -----------------------------------------------------------------------


@aiotest()
async def test_drain_endpoint_sends_goaway_waits_for_acks_then_stops(tmp_path):
    async with admin_env(tmp_path) as env:
        api = env.api
        addr = env.node.addresses[0]
        till = await connect(env.node, "t1")
        idle = await connect(env.node, "t2")
        await api.call("POST", "/v1/publish", json_body={
            "to": "terminal:acme/t1", "kind": "payment.result", "body": PAY})
        msg = await till.receive(timeout=3)            # delivered, not acked yet
        res = await api.call("POST", "/v1/drain", json_body={
            "delay_ms": 200, "spread_ms": 300, "timeout_s": 5}, expect=202)
        assert res["draining"] is True and res["connections"] == 2
        await eventually(lambda: till.goaway is not None and idle.goaway is not None)
        for conn in (till, idle):
            assert conn.goaway.code == Code.DRAINING and 200 <= conn.goaway.delay <= 500
        doc = await api.call("POST", "/v1/drain", expect=409)
        assert doc["field"] == "drain"
        async with api.http.get("/readyz") as resp:
            doc = await resp.json()
            assert resp.status == 503 and doc == {"ready": False, "reason": "draining",
                                                  "node": env.node.node_id}
            check_response("/readyz", "GET", 503, doc)
        # New connections are refused while draining.
        with pytest.raises((OSError, SessionClosed, asyncio.TimeoutError)):
            await connect(addr, "t3", timeout=1)
        await asyncio.sleep(0.3)
        assert not env.node.stopped              # the payment in flight holds the drain
        # Messages published while draining are stored, not handed out.
        await api.call("POST", "/v1/publish", json_body={
            "to": "terminal:acme/t1", "kind": "payment.result", "body": {**PAY, "order": "o2"}})
        started = time.monotonic()
        await msg.ack()
        await asyncio.wait_for(env.node.wait_stopped(), 3)
        assert time.monotonic() - started < 2
        assert env.node.delivery.in_flight() == 0
        await asyncio.wait_for(till.closed.wait(), 3)
        assert till.close_code == Code.SHUTDOWN
        acked0, last0, _, _ = await env.node.store.positions("terminal:acme/t1")
        assert (acked0, last0) == (1, 2)          # the ack was written; o2 waits in the store
        drains = env.events("drain")
        assert drains and drains[0]["who"] == "admin:ops"


# -- the document ------------------------------------------------------------------------------


@aiotest()
async def test_openapi_document_is_served_valid_and_complete(tmp_path):
    async with admin_env(tmp_path) as env:
        served = await env.api.call("GET", "/v1/openapi.json")
        assert served == SPEC
        assert SPEC["openapi"].startswith("3.1")
        for name, schema in SPEC["components"]["schemas"].items():
            jsonschema.Draft202012Validator.check_schema(schema)
        assert SPEC["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
        # Every route the app serves is documented, with its method.
        from tillwire.server.admin import make_app
        routes = {(r.method, r.resource.canonical) for r in make_app(
            env.node, env.node.cfg).router.routes() if r.method != "HEAD"}
        for method, path in routes:
            operation(path, method)
        documented = {(m.upper(), p) for p, item in SPEC["paths"].items()
                      for m in item if m != "parameters"}
        assert documented == routes


@aiotest()
async def test_publish_nested_past_the_depth_limit_is_a_400_naming_it(tmp_path):
    async with admin_env(tmp_path) as env:
        for depth in (33, 300, 2000):           # (300 was a 500: orjson's own limit)
            body = "{}"
            for _ in range(depth - 1):
                body = '{"a":' + body + "}"
            raw = ('{"to": "store:acme/s1", "kind": "x.note", "body": ' + body + "}").encode()
            async with env.api.http.post("/v1/publish", data=raw, headers={
                    "Authorization": f"Bearer {OPS}", "Content-Type": "application/json"}) as resp:
                doc = await resp.json()
                assert resp.status == 400, (depth, doc)
                check_response("/v1/publish", "POST", 400, doc)
            assert doc["field"] == "body" and "limits.max_body_depth" in doc["error"]
        ok = await env.api.call("POST", "/v1/publish", json_body={
            "to": "store:acme/s1", "kind": "x.note", "body": {"a": {"b": [1, {"c": 2}]}}})
        assert ok["duplicate"] is False and ok["id"]


@aiotest()
async def test_channels_are_listed_a_page_at_a_time(tmp_path):
    async with admin_env(tmp_path) as env:
        for i in range(25):
            await env.api.call("POST", "/v1/publish", json_body={
                "to": f"topic:acme/t{i:02d}", "kind": "x.note", "body": {"n": i}, "lane": "P3"})
        names, after, pages = [], None, 0
        while True:
            query = "/v1/channels?tenant=acme&limit=10" + (f"&after={after}" if after else "")
            page = await env.api.call("GET", query.replace("#", "%23"), "/v1/channels")
            pages += 1
            assert page["total"] == 25 and len(page["channels"]) <= 10
            names += [c["name"] for c in page["channels"]]
            after = page.get("next")
            if after is None:
                break
        assert pages == 3 and names == [f"topic:acme/t{i:02d}" for i in range(25)]
        bad = await env.api.call("GET", "/v1/channels?tenant=acme&after=nolane", "/v1/channels",
                                 expect=400)
        assert bad["field"] == "after"
        await env.api.call("GET", "/v1/channels?tenant=acme&limit=0", "/v1/channels", expect=400)
