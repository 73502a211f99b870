"""Nothing disappears silently (issue 19): a P0/P1 message to a terminal the
registry does not know is refused, on the wire (ERROR UNKNOWN_TERMINAL) and
through the admin API (404 naming the address), and nothing is stored; a
terminal is known once it logged in or was provisioned (POST /v1/terminals);
a tenant set to ``accept`` keeps the wait-for-first-login behaviour; the
check asks the authoritative registry (a real redis-server, a record another
worker put), and a registry that fails answers STORE_UNAVAILABLE and stores
nothing (tests/failing.py around the real registry).

Real nodes on loopback ports, the SDK connection and real HTTP requests.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest
import redis.asyncio as aioredis

from failing import Failing
from redis_server import fresh_prefix, redis_url
from support import aiotest, connect, provision, receive_orders, start_node
from test_admin import GLOBEX, admin_env
from tillwire.client.connection import SendError
from tillwire.core.codes import Code, Flag, Lane
from tillwire.server.registry_redis import RedisRegistry
from tillwire.server.terminals import TerminalRecord

PAY = {"order": "o1", "status": "paid"}


async def _refused(sender, to: str, *, kind: str = "payment.result", body=PAY, lane=Lane.P0,
                   ref: int | None = None) -> SendError:
    with pytest.raises(SendError) as refused:
        await sender.send(kind, body, to, lane=lane, **({"ref": ref} if ref else {}))
    return refused.value


@aiotest()
async def test_a_p0_or_p1_to_a_terminal_nobody_knows_is_refused_and_nothing_is_stored():
    node = await start_node()
    try:
        be = await connect(node, "pay", store="hq", roles=("backend",))
        err = await _refused(be, "terminal:acme/nosuch", ref=5)
        assert err.code == Code.UNKNOWN_TERMINAL
        assert "terminal:acme/nosuch" in err.message and "POST /v1/terminals" in err.message
        err = await _refused(be, "terminal:acme/nosuch", kind="order.event", lane=Lane.P1,
                             body={"order": "A1", "channel": "mall", "event": "paid"})
        assert err.code == Code.UNKNOWN_TERMINAL
        # Nothing was stored: no inbox, no message, the same ref is not a duplicate later.
        assert await node.store.positions("terminal:acme/nosuch") == (0, 0, 0, 0)
        assert node.counters.accepted == 0 and node.delivery.uncommitted == 0
        # (tillwire_messages_refused_total{source="terminal",code="UNKNOWN_TERMINAL"})
        assert node.counters.refused[("terminal", "UNKNOWN_TERMINAL")] == 2
        # A message to a known terminal is not held up by the refusals.
        till = await connect(node, "t1")
        ack = await be.send("payment.result", PAY, "terminal:acme/t1", ref=6)
        assert orjson.loads(ack.payload) == {"recipients": 1}
        assert await receive_orders(till, 1) == [1]
        # Once it logged in, a terminal stays known: offline, its messages wait.
        await till.close()
        await asyncio.sleep(0.05)
        ack = await be.send("payment.result", {**PAY, "order": "o2"}, "terminal:acme/t1")
        assert orjson.loads(ack.payload) == {"recipients": 1}
        till = await connect(node, "t1")
        assert await receive_orders(till, 1) == [2]
        # The refused ref was never stored: sent again once the terminal exists, it is new.
        await provision(node, "nosuch")
        ack = await be.send("payment.result", PAY, "terminal:acme/nosuch", ref=5)
        assert not ack.flags & Flag.RETRANSMIT and orjson.loads(ack.payload) == {"recipients": 1}
    finally:
        await node.stop()


@aiotest()
async def test_the_admin_api_answers_404_naming_the_address_until_the_terminal_is_provisioned(
        tmp_path):
    async with admin_env(tmp_path) as env:
        doc = await env.api.call("POST", "/v1/publish", json_body={
            "to": "terminal:acme/nosuch", "kind": "payment.result", "body": PAY}, expect=404)
        assert doc["code"] == "UNKNOWN_TERMINAL" and doc["field"] == "to"
        assert "terminal:acme/nosuch" in doc["error"]
        assert await env.node.store.positions("terminal:acme/nosuch") == (0, 0, 0, 0)
        # Provisioned through the API: known from now on, before any login.
        rec = await env.api.call("POST", "/v1/terminals", json_body={
            "tenant": "acme", "id": "nosuch", "store": "s1", "roles": ["pos"]}, expect=201)
        assert rec["terminal"] == "terminal:acme/nosuch" and rec["last_seen"] == 0
        again = await env.api.call("POST", "/v1/terminals", json_body={
            "tenant": "acme", "id": "nosuch", "store": "s2", "roles": ["pos"]})
        assert again["store"] == "s2"           # (200: updated)
        res = await env.api.call("POST", "/v1/publish", json_body={
            "to": "terminal:acme/nosuch", "kind": "payment.result", "body": PAY})
        assert res["recipients"] == 1
        till = await connect(env.node, "nosuch", store="s2")
        assert await receive_orders(till, 1) == [1]
        # Bad provisioning requests name the problem.
        bad = await env.api.call("POST", "/v1/terminals", json_body={
            "tenant": "acme", "store": "s1", "roles": ["pos"]}, expect=400)
        assert bad["field"] == "id"
        bad = await env.api.call("POST", "/v1/terminals", json_body={
            "tenant": "acme", "id": "x1", "store": "s1", "roles": ["boss"]}, expect=400)
        assert bad["field"] == "roles"
        bad = await env.api.call("POST", "/v1/terminals", json_body={
            "tenant": "acme", "id": "x1", "store": "s1", "roles": ["pos"]}, auth=GLOBEX,
            expect=403)
        assert bad["field"] == "tenant"
        await env.api.call("DELETE", "/v1/terminals/acme/nosuch",
                           "/v1/terminals/{tenant}/{terminal}")
        bad = await env.api.call("POST", "/v1/terminals", json_body={
            "tenant": "acme", "id": "nosuch", "store": "s1", "roles": ["pos"]}, expect=409)
        assert "retired" in bad["error"]


@aiotest()
async def test_a_tenant_set_to_accept_keeps_messages_for_a_first_login():
    node = await start_node(**{"delivery.unknown_terminals": {"legacy": "accept"}})
    try:
        be = await connect(node, "pay", store="hq", roles=("backend",), tenant="legacy")
        ack = await be.send("payment.result", PAY, "terminal:legacy/t9")
        assert orjson.loads(ack.payload) == {"recipients": 1}
        till = await connect(node, "t9", tenant="legacy")
        assert await receive_orders(till, 1) == [1]
        # Every other tenant still refuses.
        acme = await connect(node, "pay", store="hq", roles=("backend",))
        assert (await _refused(acme, "terminal:acme/t9")).code == Code.UNKNOWN_TERMINAL
    finally:
        await node.stop()


@aiotest()
async def test_a_failing_registry_answers_store_unavailable_and_stores_nothing():
    node = await start_node()
    node.registry = registry = Failing(node.registry)
    try:
        be = await connect(node, "pay", store="hq", roles=("backend",))
        await provision(node, "t1")
        registry.fail("get")
        err = await _refused(be, "terminal:acme/t2", ref=9)
        assert err.code == Code.STORE_UNAVAILABLE
        assert registry.refused and registry.refused[0] == ("get", ("terminal:acme/t2",))
        assert node.counters.accepted == 0 and node.delivery.uncommitted == 0
        assert await node.store.positions("terminal:acme/t2") == (0, 0, 0, 0)
        # A known terminal does not need the lookup: its message goes on meanwhile.
        ack = await be.send("payment.result", PAY, "terminal:acme/t1", ref=10)
        assert orjson.loads(ack.payload) == {"recipients": 1}
        # Healed, the same SEND gets the registry's answer: t2 is not known.
        assert (await _refused(be, "terminal:acme/t2", ref=9)).code == Code.UNKNOWN_TERMINAL
    finally:
        await node.stop()


@aiotest()
async def test_the_check_asks_the_shared_registry_not_a_cache_that_lags():
    # Two workers share a Redis registry; the other one registered t5 (this
    # node's cache has never seen it): a message to t5 is stored, one to t6 is
    # refused.
    client = aioredis.from_url(redis_url())
    prefix = fresh_prefix()
    node = await start_node()
    try:
        node.registry = RedisRegistry(client, prefix=prefix)
        other = RedisRegistry(client, prefix=prefix)
        await other.put(TerminalRecord("terminal:acme/t5", "acme", "t5", "s1", "", ("pos",), "",
                                       1.0, 1.0, False, 0.0))
        assert node.registry.cached("terminal:acme/t5") is None
        be = await connect(node, "pay", store="hq", roles=("backend",))
        ack = await be.send("payment.result", PAY, "terminal:acme/t5")
        assert orjson.loads(ack.payload) == {"recipients": 1}
        assert (await _refused(be, "terminal:acme/t6")).code == Code.UNKNOWN_TERMINAL
        till = await connect(node, "t5")
        assert await receive_orders(till, 1) == [1]
    finally:
        await node.stop()
        await client.aclose()


def test_tillwire_token_provision_makes_the_terminal_known_before_its_first_login(tmp_path):
    import os
    import subprocess
    import sys
    import urllib.request

    from support import SECRET, ServerProcess, free_port

    admin_token = "provision-admin-token"
    with ServerProcess(str(tmp_path), admin_port=free_port(),
                       env={"TILLWIRE_ADMIN_TOKEN": admin_token}) as srv:
        env = {**os.environ, "TILLWIRE_SECRET": SECRET, "TILLWIRE_ADMIN_TOKEN": admin_token,
               "TILLWIRE_ADMIN_PORT": str(srv.admin_port)}

        def tillwire(*args):
            return subprocess.run([sys.executable, "-m", "tillwire", *args], env=env,
                                  capture_output=True, text=True, timeout=60)

        def publish_status(to: str) -> int:
            req = urllib.request.Request(
                f"http://127.0.0.1:{srv.admin_port}/v1/publish", method="POST",
                data=orjson.dumps({"to": to, "kind": "payment.result",
                                   "body": {"order": "o1", "status": "paid"}}),
                headers={"Authorization": f"Bearer {admin_token}",
                         "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return resp.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert publish_status("terminal:acme/till9") == 404          # nobody knows it
        made = tillwire("token", "--tenant", "acme", "--store", "s1", "--terminal", "till9",
                        "--role", "pos", "--provision")
        assert made.returncode == 0, made.stderr
        assert "terminal:acme/till9 provisioned" in made.stderr
        assert made.stdout.strip().count(".") >= 1                    # the token
        assert publish_status("terminal:acme/till9") == 200          # waits for its login
        # Nothing listening there: one line naming it, no token printed.
        failed = tillwire("token", "--tenant", "acme", "--store", "s1", "--terminal", "till8",
                          "--role", "pos", "--provision", "--admin",
                          f"http://127.0.0.1:{free_port()}")
        assert failed.returncode == 1 and "cannot reach" in failed.stderr
        assert failed.stdout == ""
