"""Cashier exception tickets end to end (server/tickets.py, server/directory.py).

Real nodes over loopback sockets: a till opens a ticket, the store's on-duty
staff get it, auto-replies answer at once, staff assign/reply/resolve it,
unassigned tickets escalate to managers (also across a restart of a real
server process), and every registered kind refuses a bad body.  The store
directory's admin endpoints are checked against server/openapi.json.
"""

from __future__ import annotations

import asyncio
import re
import time

import orjson
import pytest

from support import ServerProcess, aiotest, connect, eventually, start_node
from test_admin import ACME, GLOBEX, admin_env
from tillwire.client.connection import SendError
from tillwire.core.codes import KINDS, Code, Flag, FrameType, Lane
from tillwire.server import tickets as tickets_module

TICKET_ID = re.compile(r"T-[0-9a-z]+-[0-9a-f]{4}\Z")


async def open_ticket(till, body: dict, to: str = "role:acme/s1/staff") -> str:
    """Open a ticket from ``till``; its id, from the SENDACK."""
    return orjson.loads((await till.send("ticket.open", body, to)).payload)["ticket"]


async def nothing_for(conn, seconds: float = 0.3) -> None:
    """Assert the connection receives nothing for a while."""
    with pytest.raises(asyncio.TimeoutError):
        msg = await conn.receive(timeout=seconds)
        raise AssertionError(f"unexpected {msg!r} {msg.body}")


@aiotest()
async def test_open_goes_to_the_store_staff_with_an_id_and_staff_handle_it():
    node = await start_node()
    try:
        staff = await connect(node, "h1", store="s1", roles=("staff",))
        other = await connect(node, "h9", store="s2", roles=("staff",))
        till = await connect(node, "t1", store="s1", roles=("pos",))
        ack = await till.send("ticket.open", {"code": "E42", "text": "printer jam"},
                              "role:acme/s1/staff")
        doc = orjson.loads(ack.payload)
        assert TICKET_ID.match(doc["ticket"]) and doc["recipients"] == 1, doc
        tid = doc["ticket"]
        msg = await staff.receive(timeout=3)
        assert (msg.kind, msg.lane) == ("ticket.open", Lane.P1)
        assert msg.body == {"code": "E42", "text": "printer jam", "ticket": tid,
                            "from": "terminal:acme/t1"}
        await msg.ack()
        await nothing_for(other)
        rec = await node.tickets.get("acme", tid)
        assert (rec["status"], rec["store"], rec["from"]) == ("open", "s1", "terminal:acme/t1")

        # Staff assign (to the opener's terminal: routed as usual), reply, resolve.
        ack = await staff.send("ticket.assign", {"ticket": tid}, "terminal:acme/t1")
        assert orjson.loads(ack.payload) == {"recipients": 1}
        got = await till.receive(timeout=3)
        assert (got.kind, got.body) == ("ticket.assign", {"ticket": tid})
        assert (await node.tickets.get("acme", tid))["assignee"] == "h1"
        await staff.send("ticket.reply", {"ticket": tid, "text": "on my way"}, "terminal:acme/t1")
        assert (await till.receive(timeout=3)).body["text"] == "on my way"
        # The opener may add to its own ticket; a till may not assign or resolve.
        await till.send("ticket.reply", {"ticket": tid, "text": "thanks"}, "role:acme/s1/staff")
        assert (await staff.receive(timeout=3)).body["text"] == "thanks"
        with pytest.raises(SendError) as err:
            await till.send("ticket.resolve", {"ticket": tid, "resolution": "x"},
                            "role:acme/s1/staff")
        assert err.value.code == Code.FORBIDDEN
        await staff.send("ticket.resolve", {"ticket": tid, "resolution": "paper loaded"},
                         "terminal:acme/t1")
        assert (await till.receive(timeout=3)).body["resolution"] == "paper loaded"
        rec = await node.tickets.get("acme", tid)
        assert (rec["status"], rec["resolution"], rec["resolved_by"], rec["replies"]) == \
            ("resolved", "paper loaded", "terminal:acme/h1", 2)
        assert node.tickets.open == {}

        # A resolved, unknown or other store's ticket: BAD_MESSAGE naming body.ticket.
        await till.send("ticket.open", {"code": "E43"}, "store:acme/s1")
        mine = (await staff.receive(timeout=3)).body["ticket"]
        for sender, body, to in (
                (staff, {"ticket": tid}, "terminal:acme/t1"),
                (staff, {"ticket": "T-nope-0000"}, "terminal:acme/t1"),
                (other, {"ticket": mine}, "role:acme/s2/staff")):
            with pytest.raises(SendError) as err:
                await sender.send("ticket.assign", body, to)
            assert err.value.code == Code.BAD_MESSAGE and "body.ticket" in err.value.message
        # A ticket goes to an address of the opener's own store, on P1 only.
        with pytest.raises(SendError) as err:
            await till.send("ticket.open", {"code": "E1"}, "role:acme/*/service")
        assert err.value.code == Code.BAD_MESSAGE and "to:" in err.value.message
        be = await connect(node, "hq", store="hq", roles=("backend",))
        with pytest.raises(SendError) as err:
            await be.send("ticket.open", {"code": "E1"}, "store:acme/s1", lane=Lane.P3)
        assert err.value.code == Code.BAD_MESSAGE and "lane" in err.value.message
    finally:
        await node.stop()


@aiotest()
async def test_auto_reply_resolves_at_once_without_bothering_staff():
    rules = [{"code": "E10", "reply": "Turn the printer off and on"},
             {"code": "E10", "reply": "Call the acme help desk", "tenant": "acme"},
             {"code": "E11", "reply": "Wait a minute"}]
    node = await start_node(**{"tickets.auto_replies": rules})
    try:
        staff = await connect(node, "h1", store="s1", roles=("staff",))
        till = await connect(node, "t1", store="s1", roles=("pos",))
        started = time.perf_counter()
        ack = await till.send("ticket.open", {"code": "E10"}, "role:acme/s1/staff")
        msg = await till.receive(timeout=3)
        elapsed = time.perf_counter() - started
        print(f"auto-reply: open -> ticket.resolve in {elapsed * 1000:.2f} ms")
        doc = orjson.loads(ack.payload)
        assert doc["auto_reply"] is True and TICKET_ID.match(doc["ticket"])
        assert (msg.kind, msg.lane) == ("ticket.resolve", Lane.P1)
        # The tenant's own rule wins over "*".
        assert msg.body == {"ticket": doc["ticket"], "resolution": "Call the acme help desk",
                            "auto": True}
        await msg.ack()
        rec = await node.tickets.get("acme", doc["ticket"])
        assert (rec["status"], rec["auto"]) == ("resolved", True)
        ack = await till.send("ticket.open", {"code": "E11"}, "role:acme/s1/staff")
        assert (await till.receive(timeout=3)).body["resolution"] == "Wait a minute"
        await nothing_for(staff)
        # Another tenant gets the "*" rule.
        g = await connect(node, "g1", tenant="globex", store="s1", roles=("pos",))
        await g.send("ticket.open", {"code": "E10"}, "role:globex/s1/staff")
        assert (await g.receive(timeout=3)).body["resolution"] == "Turn the printer off and on"
        # A resend with the same ref answers the same ticket, once.
        ref = till.next_ref()
        first = await till.send("ticket.open", {"code": "E11"}, "store:acme/s1", ref=ref)
        again = await till.send("ticket.open", {"code": "E11"}, "store:acme/s1", ref=ref)
        assert orjson.loads(first.payload) == orjson.loads(again.payload)
        assert (await till.receive(timeout=3)).kind == "ticket.resolve"
        await nothing_for(till)
    finally:
        await node.stop()


@aiotest()
async def test_unassigned_tickets_escalate_to_managers_and_assigning_cancels_it():
    node = await start_node(**{"tickets.escalate_after": 0.4})
    try:
        staff = await connect(node, "h1", store="s1", roles=("staff",))
        manager = await connect(node, "m1", store="s1", roles=("manager",))
        elsewhere = await connect(node, "m9", store="s2", roles=("manager",))
        till = await connect(node, "t1", store="s1", roles=("pos",))
        late = await open_ticket(till, {"code": "E5"})
        quick = await open_ticket(till, {"code": "E6"})
        await staff.send("ticket.assign", {"ticket": quick, "assignee": "h1"}, "terminal:acme/t1")
        msg = await manager.receive(timeout=3)
        assert (msg.kind, msg.lane) == ("ticket.escalate", Lane.P1)
        assert msg.body["ticket"] == late and msg.body["code"] == "E5"
        assert msg.body["from"] == "terminal:acme/t1" and msg.body["reason"]
        await msg.ack()
        await nothing_for(manager, 0.6)              # the assigned one never escalates
        await nothing_for(elsewhere, 0.01)
        assert (await node.tickets.get("acme", late))["status"] == "escalated"
        assert (await node.tickets.get("acme", quick))["status"] == "assigned"
        # An escalated ticket can still be assigned and resolved.
        await staff.send("ticket.resolve", {"ticket": late, "resolution": "done"},
                         "terminal:acme/t1")
        assert (await node.tickets.get("acme", late))["status"] == "resolved"
    finally:
        await node.stop()


@aiotest()
async def test_directory_rosters_route_tickets_and_escalations():
    stores = [{"tenant": "acme", "store": "s1", "on_duty": ["h2"], "managers": ["boss"]}]
    node = await start_node(**{"directory.stores": stores, "tickets.escalate_after": 0.3})
    try:
        off_duty = await connect(node, "h1", store="s1", roles=("staff",))
        on_duty = await connect(node, "h2", store="s1", roles=("staff",))
        role_manager = await connect(node, "m1", store="s1", roles=("manager",))
        boss = await connect(node, "boss", store="s1", roles=("manager",))
        till = await connect(node, "t1", store="s1", roles=("pos",))
        ack = await till.send("ticket.open", {"code": "E7"}, "role:acme/s1/staff")
        assert orjson.loads(ack.payload)["recipients"] == 1
        assert (await on_duty.receive(timeout=3)).kind == "ticket.open"
        assert (await boss.receive(timeout=3)).kind == "ticket.escalate"
        await nothing_for(off_duty, 0.1)
        await nothing_for(role_manager, 0.01)
    finally:
        await node.stop()


@aiotest()
async def test_store_directory_and_ticket_admin_endpoints(tmp_path):
    async with admin_env(tmp_path) as env:
        api = env.api
        doc = await api.call("GET", "/v1/stores/acme/s1", "/v1/stores/{tenant}/{store}")
        assert doc == {"tenant": "acme", "store": "s1", "timezone": "UTC", "on_duty": [],
                       "managers": [], "source": "default"}
        doc = await api.call("PUT", "/v1/stores/acme/s1", "/v1/stores/{tenant}/{store}",
                             json_body={"timezone": "Asia/Shanghai", "on_duty": ["h2"]},
                             auth=ACME)
        assert doc == {"tenant": "acme", "store": "s1", "timezone": "Asia/Shanghai",
                       "on_duty": ["h2"], "managers": [], "source": "admin"}
        doc = await api.call("PUT", "/v1/stores/acme/s1", "/v1/stores/{tenant}/{store}",
                             json_body={"managers": ["m7"]})
        assert (doc["timezone"], doc["on_duty"], doc["managers"]) == \
            ("Asia/Shanghai", ["h2"], ["m7"])
        for body, field in (({"timezone": "Mars/Olympus"}, "timezone"),
                            ({"on_duty": "h1"}, "on_duty"),
                            ({"on_duty": ["ok", "bad id"]}, "on_duty[1]"),
                            ({"shift": []}, "shift")):
            err = await api.call("PUT", "/v1/stores/acme/s1", "/v1/stores/{tenant}/{store}",
                                 json_body=body, expect=400)
            assert err["field"] == field, err
        await api.call("GET", "/v1/stores/acme/s1", "/v1/stores/{tenant}/{store}",
                       auth=GLOBEX, expect=403)

        # The override routes tickets at once.
        h1 = await connect(env.node, "h1", store="s1", roles=("staff",))
        h2 = await connect(env.node, "h2", store="s1", roles=("staff",))
        till = await connect(env.node, "t1", store="s1", roles=("pos",))
        tid = await open_ticket(till, {"code": "E1", "text": "scale"})
        assert (await h2.receive(timeout=3)).body["ticket"] == tid
        await nothing_for(h1, 0.1)
        doc = await api.call("GET", f"/v1/tickets/acme/{tid}", "/v1/tickets/{tenant}/{ticket}")
        assert (doc["ticket"], doc["status"], doc["code"], doc["text"], doc["from"]) == \
            (tid, "open", "E1", "scale", "terminal:acme/t1")
        await api.call("GET", "/v1/tickets/acme/T-nope-0000", "/v1/tickets/{tenant}/{ticket}",
                       expect=404)
        await api.call("GET", f"/v1/tickets/acme/{tid}", "/v1/tickets/{tenant}/{ticket}",
                       auth=GLOBEX, expect=403)
        err = await api.call("GET", "/v1/tickets/acme/bad%20id", "/v1/tickets/{tenant}/{ticket}",
                             expect=400)
        assert err["field"] == "ticket"


@aiotest()
async def test_directory_overrides_survive_a_restart(tmp_path):
    overrides = {"store.backend": "sqlite", "server.data_dir": str(tmp_path)}
    node = await start_node(**overrides)
    try:
        await node.directory.put("acme", "s1", timezone="Europe/Berlin", on_duty=("h2",))
    finally:
        await node.stop()
    node = await start_node(**overrides)
    try:
        info = node.directory.get("acme", "s1")
        assert (info.timezone, info.on_duty, info.source) == ("Europe/Berlin", ("h2",), "admin")
    finally:
        await node.stop()


@aiotest()
async def test_a_restart_re_arms_escalations_that_are_not_due_yet(tmp_path):
    overrides = {"store.backend": "sqlite", "server.data_dir": str(tmp_path),
                 "tickets.escalate_after": 1.0}
    node = await start_node(**overrides)
    try:
        manager = await connect(node, "m1", store="s1", roles=("manager",))
        till = await connect(node, "t1", store="s1", roles=("pos",))
        ack = await till.send("ticket.open", {"code": "E3"}, "role:acme/s1/staff")
        tid = orjson.loads(ack.payload)["ticket"]
        opened = time.monotonic()
        await manager.close()
    finally:
        await node.stop()
    node = await start_node(**overrides)
    try:
        assert set(node.tickets.open) == {f"acme/{tid}"}
        manager = await connect(node, "m1", store="s1", roles=("manager",))
        # (The store has no staff: its manager got the ticket itself, unacked so far.)
        msg = await manager.receive(timeout=5)
        assert (msg.kind, msg.body["ticket"]) == ("ticket.open", tid)
        await msg.ack()
        msg = await manager.receive(timeout=5)
        assert (msg.kind, msg.body["ticket"]) == ("ticket.escalate", tid)
        assert time.monotonic() - opened >= 0.95        # at its due time, not at start
        assert (await node.tickets.get("acme", tid))["status"] == "escalated"
    finally:
        await node.stop()


# A bad body of every registered kind (lane, address, body, field named).
PAY = {"order": "A1", "status": "paid"}
BAD_BODIES = {
    "payment.result": ({**PAY, "status": "maybe"}, "body.status"),
    "order.event": ({"order": "A1", "channel": "mall"}, "body.event"),
    "ticket.open": ({"text": "no code"}, "body.code"),
    "ticket.assign": ({"assignee": "h1"}, "body.ticket"),
    "ticket.reply": ({"ticket": "T-1"}, "body.text"),
    "ticket.resolve": ({"ticket": "T-1", "resolution": 5}, "body.resolution"),
    "ticket.escalate": ({"ticket": "T-1", "reason": ""}, "body.reason"),
    "chat.message": ({"conversation": "c1"}, "body.text"),
    "price.update": ({"sku": "A", "price": "five", "version": 1}, "body.price"),
    "stock.update": ({"sku": "A", "quantity": 1}, "body.version"),
    "promo.offer": ({"offer": "o1"}, "body.title"),
    "member.notice": ({"member": "m1", "text": ""}, "body.text"),
}


def test_every_registered_kind_has_a_bad_body_case():
    assert set(BAD_BODIES) == set(KINDS.values())


@pytest.mark.parametrize("kind", sorted(BAD_BODIES))
@aiotest()
async def test_bad_bodies_and_card_numbers_are_refused_naming_the_field(kind):
    node = await start_node()
    try:
        be = await connect(node, "hq", store="hq", roles=("backend",))
        body, field = BAD_BODIES[kind]
        to = "store:acme/s1"
        with pytest.raises(SendError) as err:
            await be.send(kind, body, to)
        assert err.value.code == Code.BAD_MESSAGE and field in err.value.message, err.value
        card = {**body, "note": "card 4111-1111-1111-1111"}
        with pytest.raises(SendError) as err:
            await be.send(kind, card, to)
        assert err.value.code == Code.CARD_DATA and "body.note" in err.value.message
        assert "4111" not in err.value.message
        assert node.counters.accepted == 0 and node.counters.broadcasts == 0
    finally:
        await node.stop()


@aiotest(timeout=90)
async def test_escalation_timers_survive_a_server_restart(tmp_path):
    env = {"TILLWIRE_TICKETS_ESCALATE_AFTER": "1.5"}
    server = ServerProcess(str(tmp_path), env=env).start()
    try:
        manager = await connect(server.addr, "m1", store="s1", roles=("manager",))
        await manager.close()                  # registered, offline
        till = await connect(server.addr, "t1", store="s1", roles=("pos",))
        ack = await till.send("ticket.open", {"code": "E99"}, "role:acme/s1/staff")
        tid = orjson.loads(ack.payload)["ticket"]
        opened = time.monotonic()
        await till.close()
        assert server.stop() == 0              # SIGTERM well before the ticket is due
        assert time.monotonic() - opened < 1.5
        await asyncio.sleep(max(0.0, 1.6 - (time.monotonic() - opened)))
        server = ServerProcess(str(tmp_path), port=server.port, env=env).start()
        # The due time passed while the server was down: it fires right after start.
        manager = await connect(server.addr, "m1", store="s1", roles=("manager",))
        msg = await manager.receive(timeout=5)
        assert (msg.kind, msg.body["ticket"], msg.body["code"]) == ("ticket.escalate", tid, "E99")
        await msg.ack()
        await manager.close()
    finally:
        server.stop()


@aiotest()
async def test_customers_and_service_agents_cannot_open_cashier_tickets():
    """Tickets come from the store's own devices: a customer's phone (or a service
    agent) reaching role:<t>/<store>/service must not page the store's staff."""
    node = await start_node()
    try:
        staff = await connect(node, "h1", store="s1", roles=("staff",))
        app = await connect(node, "app1", store="s1", roles=("customer",), member="m1")
        agent = await connect(node, "a1", store="s1", roles=("service",))
        for sender in (app, agent):
            with pytest.raises(SendError) as err:
                await sender.send("ticket.open", {"code": "E42", "text": "spam"},
                                  "role:acme/s1/service")
            assert err.value.code == Code.FORBIDDEN, err.value
        await nothing_for(staff, 0.2)
        assert node.tickets.open == {} and node.counters.accepted == 0
    finally:
        await node.stop()


@aiotest()
async def test_a_resent_update_is_acknowledged_again_not_refused_or_counted_twice():
    """A staff device that lost the SENDACK of its ticket.resolve resends it with the same
    ref: it must get the (retransmit) SENDACK, not BAD_MESSAGE 'no open ticket', and the
    till gets the resolution once; a resent reply is not counted twice."""
    node = await start_node()
    try:
        staff = await connect(node, "h1", store="s1", roles=("staff",))
        till = await connect(node, "t1", store="s1", roles=("pos",))
        ack = await till.send("ticket.open", {"code": "E42"}, "role:acme/s1/staff")
        tid = orjson.loads(ack.payload)["ticket"]
        await (await staff.receive(timeout=3)).ack()
        ref = staff.next_ref()
        body = {"ticket": tid, "text": "coming"}
        first = await staff.send("ticket.reply", body, "terminal:acme/t1", ref=ref)
        again = await staff.send("ticket.reply", body, "terminal:acme/t1", ref=ref)
        assert again.msg_id == first.msg_id and again.flags & Flag.RETRANSMIT
        assert (await node.tickets.get("acme", tid))["replies"] == 1
        await (await till.receive(timeout=3)).ack()
        ref = staff.next_ref()
        body = {"ticket": tid, "resolution": "paper loaded"}
        first = await staff.send("ticket.resolve", body, "terminal:acme/t1", ref=ref)
        again = await staff.send("ticket.resolve", body, "terminal:acme/t1", ref=ref)
        assert again.msg_id == first.msg_id and again.flags & Flag.RETRANSMIT
        msg = await till.receive(timeout=3)
        assert (msg.kind, msg.body["resolution"]) == ("ticket.resolve", "paper loaded")
        await msg.ack()
        await nothing_for(till, 0.2)
        # A fresh resolve (a new ref) of the resolved ticket is still refused.
        with pytest.raises(SendError) as err:
            await staff.send("ticket.resolve", body, "terminal:acme/t1")
        assert err.value.code == Code.BAD_MESSAGE and "body.ticket" in err.value.message
    finally:
        await node.stop()


@aiotest()
async def test_concurrent_directory_updates_keep_every_field(tmp_path):
    """Two PUTs of different fields at once: 'fields left out keep their value' holds,
    in memory and in the store."""
    overrides = {"store.backend": "sqlite", "server.data_dir": str(tmp_path)}
    node = await start_node(**overrides)
    try:
        d = node.directory
        await asyncio.gather(d.put("acme", "s1", timezone="Europe/Berlin"),
                             d.put("acme", "s1", on_duty=("h2",)),
                             d.put("acme", "s1", managers=("m7",)))
        info = d.get("acme", "s1")
        assert (info.timezone, info.on_duty, info.managers) == \
            ("Europe/Berlin", ("h2",), ("m7",))
    finally:
        await node.stop()
    node = await start_node(**overrides)
    try:
        info = node.directory.get("acme", "s1")
        assert (info.timezone, info.on_duty, info.managers) == \
            ("Europe/Berlin", ("h2",), ("m7",))
    finally:
        await node.stop()


@aiotest()
async def test_a_resend_of_an_open_still_in_flight_makes_one_ticket():
    """The SDK resends with the same ref after a reconnect, possibly before the first
    SEND was answered: one ticket, one auto-reply, one answer for both."""
    node = await start_node(**{"tickets.auto_replies": [{"code": "E10", "reply": "reboot"}]})
    try:
        staff = await connect(node, "h1", store="s1", roles=("staff",))
        till = await connect(node, "t1", store="s1", roles=("pos",))
        for code in ("E10", "E77"):           # auto-replied, then routed to staff
            ref = till.next_ref()
            body = {"code": code}
            till.session.send(Lane.P1, "role:acme/s1/staff", "ticket.open", orjson.dumps(body),
                              ref=ref)
            ack = await till.send("ticket.open", body, "role:acme/s1/staff", ref=ref)
            tid = orjson.loads(ack.payload)["ticket"]
            await asyncio.sleep(0.1)
            if code == "E10":
                msg = await till.receive(timeout=3)
                assert (msg.kind, msg.body["ticket"]) == ("ticket.resolve", tid)
                await msg.ack()
                await nothing_for(till, 0.2)
            else:
                msg = await staff.receive(timeout=3)
                assert msg.body["ticket"] == tid
                await msg.ack()
                await nothing_for(staff, 0.2)
        tickets = [orjson.loads(v)["code"] for _, v in await node.store.records.scan("ticket")]
        assert sorted(tickets) == ["E10", "E77"], tickets
        assert list(node.tickets.open) == [f"acme/{tid}"]
    finally:
        await node.stop()


@aiotest()
async def test_two_staff_assigning_at_once_one_wins_and_a_manager_may_reassign():
    """Both staff tap 'take it': the first assignment wins, the other is told the
    ticket is taken (both cannot believe they own it); the assignee may hand it
    over and a manager may reassign it."""
    node = await start_node()
    try:
        h1 = await connect(node, "h1", store="s1", roles=("staff",))
        h2 = await connect(node, "h2", store="s1", roles=("staff",))
        boss = await connect(node, "m1", store="s1", roles=("manager",))
        till = await connect(node, "t1", store="s1", roles=("pos",))
        tid = await open_ticket(till, {"code": "E42"})
        results = await asyncio.gather(
            h1.send("ticket.assign", {"ticket": tid}, "terminal:acme/t1"),
            h2.send("ticket.assign", {"ticket": tid}, "terminal:acme/t1"),
            return_exceptions=True)
        refused = [r for r in results if isinstance(r, SendError)]
        assert len(refused) == 1, results
        assert refused[0].code == Code.BAD_MESSAGE and "body.ticket" in refused[0].message
        winner = "h1" if not isinstance(results[0], SendError) else "h2"
        assert (await node.tickets.get("acme", tid))["assignee"] == winner
        assert (await till.receive(timeout=3)).kind == "ticket.assign"
        await nothing_for(till, 0.2)
        # The assignee hands it over; the manager reassigns it.
        owner = h1 if winner == "h1" else h2
        await owner.send("ticket.assign", {"ticket": tid, "assignee": "h9"}, "terminal:acme/t1")
        assert (await node.tickets.get("acme", tid))["assignee"] == "h9"
        await boss.send("ticket.assign", {"ticket": tid, "assignee": winner}, "terminal:acme/t1")
        assert (await node.tickets.get("acme", tid))["assignee"] == winner
    finally:
        await node.stop()


@aiotest()
async def test_a_damaged_record_does_not_stop_the_node_from_starting(tmp_path):
    """One unreadable directory or ticket record (a bad write, an older version sharing
    the store) is skipped and logged at start; the good ones are loaded."""
    overrides = {"store.backend": "sqlite", "server.data_dir": str(tmp_path),
                 "tickets.escalate_after": 600.0}
    node = await start_node(**overrides)
    try:
        till = await connect(node, "t1", store="s1", roles=("pos",))
        tid = await open_ticket(till, {"code": "E1"})
        await node.directory.put("acme", "s1", timezone="Europe/Berlin")
        now = time.time()
        for ns, key, value in (("directory", "acme/s2", b"{not json"),
                               ("directory", "acme/s3", b'{"store": "s3"}'),
                               ("directory", "acme/s4", b'[1, 2]'),
                               ("ticket", "acme/T-bad-0000", b"\x00\x01"),
                               ("ticket", "acme/T-bad-0001", b'{"ticket": "T-bad-0001"}'),
                               ("ticket", "acme/T-bad-0002", b'"open"')):
            await node.store.records.put(ns, key, value, now)
    finally:
        await node.stop()
    node = await start_node(**overrides)
    try:
        assert node.directory.get("acme", "s1").timezone == "Europe/Berlin"
        assert set(node.tickets.open) == {f"acme/{tid}"}
    finally:
        await node.stop()


@aiotest()
async def test_tickets_resolved_or_not_are_deleted_a_retention_after_their_last_change(tmp_path):
    """retention.tickets: resolved, assigned, escalated and still-open tickets last changed
    before the horizon go from memory and the store (their escalation timer too); a
    recent one stays.  ``expire`` is called with a future ``now`` instead of waiting."""
    retention = 86400.0
    async with admin_env(tmp_path, **{"store.backend": "sqlite",
                                      "tickets.escalate_after": 0.3,
                                      "retention.tickets": "1d"}) as env:
        node, api = env.node, env.api
        tickets = node.tickets
        assert tickets.retention == retention
        staff = await connect(node, "h1", store="s1", roles=("staff",))
        manager = await connect(node, "m1", store="s1", roles=("manager",))
        till = await connect(node, "t1", store="s1", roles=("pos",))

        async def opened(code: str) -> str:
            tid = await open_ticket(till, {"code": code})
            assert (await staff.receive(timeout=3)).body["ticket"] == tid
            return tid

        resolved = await opened("E1")
        await staff.send("ticket.resolve", {"ticket": resolved, "resolution": "done"},
                         "terminal:acme/t1")
        escalated = await opened("E2")
        assigned = await opened("E3")
        await staff.send("ticket.assign", {"ticket": assigned}, "terminal:acme/t1")
        msg = await manager.receive(timeout=3)
        assert (msg.kind, msg.body["ticket"]) == ("ticket.escalate", escalated)
        await msg.ack()
        pending = await opened("E4")            # its escalation is still due
        assert f"acme/{pending}" in tickets._timers
        horizon = time.time()
        await asyncio.sleep(0.02)
        recent = await opened("E5")
        await staff.send("ticket.assign", {"ticket": recent}, "terminal:acme/t1")
        got = []
        for _ in range(3):                            # the opener gets the updates
            msg = await till.receive(timeout=3)
            got.append((msg.kind, msg.body["ticket"]))
            await msg.ack()
        assert got == [("ticket.resolve", resolved), ("ticket.assign", assigned),
                       ("ticket.assign", recent)]
        await tickets.flush()
        old = [resolved, escalated, assigned, pending]
        for tid in old + [recent]:
            assert await node.store.records.get("ticket", f"acme/{tid}") is not None
        assert (await tickets.get("acme", escalated))["status"] == "escalated"
        assert (await tickets.get("acme", resolved))["status"] == "resolved"

        assert await tickets.expire(horizon + retention - 30.0) == 0   # nothing old enough
        assert await tickets.expire(horizon + retention) == 4
        assert set(tickets.open) == {f"acme/{recent}"}
        assert set(tickets._timers) == set()          # pending's timer went with it
        for tid in old:
            assert await node.store.records.get("ticket", f"acme/{tid}") is None
            assert await tickets.get("acme", tid) is None
            await api.call("GET", f"/v1/tickets/acme/{tid}", "/v1/tickets/{tenant}/{ticket}",
                           expect=404)
        doc = await api.call("GET", f"/v1/tickets/acme/{recent}",
                             "/v1/tickets/{tenant}/{ticket}")
        assert (doc["status"], doc["assignee"]) == ("assigned", "h1")
        assert await node.store.records.get("ticket", f"acme/{recent}") is not None
        await nothing_for(manager, 0.5)               # the cancelled escalation never fires
        assert await tickets.expire(horizon + retention) == 0

        # An update naming an expired ticket is refused like an unknown one.
        for kind, body in (("ticket.assign", {"ticket": escalated}),
                           ("ticket.reply", {"ticket": assigned, "text": "still there?"}),
                           ("ticket.resolve", {"ticket": resolved, "resolution": "again"})):
            with pytest.raises(SendError) as err:
                await staff.send(kind, body, "terminal:acme/t1")
            assert err.value.code == Code.BAD_MESSAGE and "body.ticket" in err.value.message
        await nothing_for(till, 0.1)
        # The recent ticket is still handled as usual.
        await staff.send("ticket.resolve", {"ticket": recent, "resolution": "ok"},
                         "terminal:acme/t1")
        assert (await till.receive(timeout=3)).body["resolution"] == "ok"
        assert (await tickets.get("acme", recent))["status"] == "resolved"


@aiotest()
async def test_records_without_an_updated_time_expire_by_their_latest_timestamp(tmp_path):
    """Records written before ``updated`` existed: their newest of created, escalated_at
    and resolved_at is their last change, in memory and in the store, across a restart."""
    overrides = {"store.backend": "sqlite", "server.data_dir": str(tmp_path),
                 "tickets.escalate_after": 600.0, "retention.tickets": 1000.0}
    now = time.time()

    def legacy(tid: str, status: str, created: float, escalated_at: float = 0.0,
               resolved_at: float = 0.0) -> bytes:
        return orjson.dumps({
            "ticket": tid, "tenant": "acme", "store": "s1", "code": "E9", "text": "",
            "from": "terminal:acme/t1", "ref": 0, "status": status, "auto": False,
            "created": created, "due": created + 600.0, "assignee": "",
            "resolution": "x" if resolved_at else "", "escalated_at": escalated_at,
            "resolved_at": resolved_at, "resolved_by": "", "replies": 0, "msg_id": 7})

    records = {   # ticket -> (record, stored at, deleted by expire(now)?)
        "T-old-0001": (legacy("T-old-0001", "escalated", now - 5000, now - 1500), now - 1500, True),
        "T-new-0002": (legacy("T-new-0002", "escalated", now - 5000, now - 500), now - 500, False),
        "T-old-0003": (legacy("T-old-0003", "resolved", now - 4000, 0.0, now - 2000),
                       now - 2000, True),
        "T-new-0004": (legacy("T-new-0004", "assigned", now - 300), now - 300, False),
    }
    node = await start_node(**overrides)
    try:
        for tid, (raw, at, _) in records.items():
            await node.store.records.put("ticket", f"acme/{tid}", raw, at)
    finally:
        await node.stop()
    node = await start_node(**overrides)
    try:
        assert set(node.tickets.open) == {"acme/T-old-0001", "acme/T-new-0002",
                                          "acme/T-new-0004"}
        assert node.tickets.open["acme/T-old-0001"]["updated"] == now - 1500
        await node._expire_services(now)             # the maintenance round's retention
        for tid, (_, _, gone) in records.items():
            stored = await node.store.records.get("ticket", f"acme/{tid}")
            assert (stored is None) == gone, tid
            assert (f"acme/{tid}" in node.tickets.open) == (not gone and tid != "T-old-0003")
    finally:
        await node.stop()
    node = await start_node(**overrides)             # deleted ones stay deleted
    try:
        assert set(node.tickets.open) == {"acme/T-new-0002", "acme/T-new-0004"}
    finally:
        await node.stop()


def _failing_kv_put(node, fail: list):
    """Make the store's records.put of ticket records fail while ``fail`` is non-empty
    (each failure pops one item; ``[...] * n`` fails n times)."""
    real = node.store.records.put

    async def flaky(ns, key, value, at):
        if ns == "ticket" and fail:
            fail.pop()
            raise OSError("database is locked")
        return await real(ns, key, value, at)

    node.store.records.put = flaky
    return real


@aiotest()
async def test_a_failed_record_write_is_kept_and_retried_so_a_resolved_ticket_stays_resolved(
        tmp_path, monkeypatch):
    """The store refused the record of a resolve once: the record stays due and is
    written again (retry, maintenance round, stop); after a restart the ticket is
    resolved, never open again nor escalated."""
    monkeypatch.setattr(tickets_module, "RETRY_DELAY", 0.1)
    overrides = {"store.backend": "sqlite", "server.data_dir": str(tmp_path),
                 "tickets.escalate_after": 1.0}
    node = await start_node(**overrides)
    try:
        staff = await connect(node, "h1", store="s1", roles=("staff",))
        till = await connect(node, "t1", store="s1", roles=("pos",))
        tid = await open_ticket(till, {"code": "E42"})
        await (await staff.receive(timeout=3)).ack()
        key = f"acme/{tid}"
        await eventually(lambda: key not in node.tickets.unsaved)
        fail = [1]
        real_put = _failing_kv_put(node, fail)
        await staff.send("ticket.resolve", {"ticket": tid, "resolution": "done"},
                         "terminal:acme/t1")
        await eventually(lambda: not fail)                 # the first write failed...
        stored = {}

        async def status():
            stored["rec"] = orjson.loads(await node.store.records.get("ticket", key))
            return stored["rec"]["status"]

        for _ in range(100):                               # ... and was written again
            if await status() == "resolved":
                break
            await asyncio.sleep(0.05)
        assert stored["rec"]["status"] == "resolved"
        # (The reader may see the commit before the write's completion reaches
        # the loop and clears the record's "unsaved" mark.)
        await eventually(lambda: key not in node.tickets.unsaved)
        # Failing for good while running: kept, then written by the flush at stop.
        other = await open_ticket(till, {"code": "E43"})
        await (await staff.receive(timeout=3)).ack()
        await eventually(lambda: f"acme/{other}" not in node.tickets.unsaved)
        fail.extend([1] * 1000)
        await staff.send("ticket.reply", {"ticket": other, "text": "after"},
                         "terminal:acme/t1")
        await staff.send("ticket.resolve", {"ticket": other, "resolution": "ok"},
                         "terminal:acme/t1")
        await asyncio.sleep(0.3)
        assert f"acme/{other}" in node.tickets.unsaved
        fail.clear()
        node.store.records.put = real_put
        await till.close()
        await staff.close()
    finally:
        await node.stop()
    node = await start_node(**overrides)
    try:
        assert node.tickets.open == {}
        assert (await node.tickets.get("acme", tid))["status"] == "resolved"
        rec = await node.tickets.get("acme", other)
        assert (rec["status"], rec["replies"]) == ("resolved", 1)
        manager = await connect(node, "m1", store="s1", roles=("manager",))
        await nothing_for(manager, 1.3)
    finally:
        await node.stop()


@aiotest()
async def test_a_maintenance_round_writes_the_records_still_due():
    node = await start_node()
    try:
        till = await connect(node, "t1", store="s1", roles=("pos",))
        fail = [1] * 1000
        real_put = _failing_kv_put(node, fail)
        tid = await open_ticket(till, {"code": "E1"})
        key = f"acme/{tid}"
        assert key in node.tickets.unsaved and key in node.tickets.open
        fail.clear()
        node.store.records.put = real_put
        await node._expire_services(time.time())          # the maintenance round
        assert key not in node.tickets.unsaved
        assert orjson.loads(await node.store.records.get("ticket", key))["status"] == "open"
    finally:
        await node.stop()


@aiotest()
async def test_an_open_accepted_whose_record_write_failed_keeps_the_ticket(monkeypatch):
    """The store took the ticket.open message (staff got it) but refused its record:
    the till gets its ticket id (a 'retry' would only be a duplicate of a message
    already delivered), the ticket is kept and its record written later."""
    monkeypatch.setattr(tickets_module, "RETRY_DELAY", 0.1)
    node = await start_node()
    try:
        staff = await connect(node, "h1", store="s1", roles=("staff",))
        till = await connect(node, "t1", store="s1", roles=("pos",))
        fail = [1]
        _failing_kv_put(node, fail)
        ack = await till.send("ticket.open", {"code": "E42"}, "role:acme/s1/staff")
        tid = orjson.loads(ack.payload)["ticket"]
        msg = await staff.receive(timeout=3)
        assert msg.body["ticket"] == tid
        key = f"acme/{tid}"
        assert key in node.tickets.open
        await eventually(lambda: key not in node.tickets.unsaved)
        rec = orjson.loads(await node.store.records.get("ticket", key))
        assert (rec["status"], rec["msg_id"]) == ("open", ack.msg_id)
        # Still handled as usual.
        await staff.send("ticket.resolve", {"ticket": tid, "resolution": "ok"},
                         "terminal:acme/t1")
        assert (await till.receive(timeout=3)).body["resolution"] == "ok"
    finally:
        await node.stop()


@aiotest()
async def test_an_escalation_due_while_the_node_stops_is_not_lost(tmp_path):
    """A ticket due while stop() waits for in-flight work: its timer is cancelled at
    the start of stop, the ticket stays open in the store and escalates after the
    restart (not marked escalated with the message never sent)."""
    overrides = {"store.backend": "sqlite", "server.data_dir": str(tmp_path),
                 "tickets.escalate_after": 0.5}
    node = await start_node(**overrides)
    try:
        manager = await connect(node, "m1", store="s1", roles=("manager",))
        await manager.close()                         # (a known manager, offline)
        till = await connect(node, "t1", store="s1", roles=("pos",))
        tid = await open_ticket(till, {"code": "E42"})
        created = node.tickets.open[f"acme/{tid}"]["created"]
        # In-flight service work at stop lasting past the ticket's due time.
        node.spawn(asyncio.sleep(max(0.0, created + 0.5 - time.time()) + 0.1))
        await till.close()
    finally:
        await node.stop()
    node = await start_node(**overrides)
    try:
        assert (await node.tickets.get("acme", tid))["status"] in ("open", "escalated")
        manager = await connect(node, "m1", store="s1", roles=("manager",))
        msg = await manager.receive(timeout=3)
        assert (msg.kind, msg.body["ticket"]) == ("ticket.escalate", tid)
        await eventually(lambda: node.tickets.open[f"acme/{tid}"]["status"] == "escalated")
    finally:
        await node.stop()


@aiotest()
async def test_an_escalation_the_store_refused_stays_open_and_is_tried_again(monkeypatch):
    monkeypatch.setattr(tickets_module, "RETRY_DELAY", 0.2)
    node = await start_node(**{"tickets.escalate_after": 0.2})
    try:
        manager = await connect(node, "m1", store="s1", roles=("manager",))
        till = await connect(node, "t1", store="s1", roles=("pos",))
        real = node.store.accept_many_then
        refused = []

        def flaky(items, done):
            if not refused and any(m.kind == "ticket.escalate" for m, _ in items):
                refused.append(time.monotonic())
                raise OSError("disk full")
            return real(items, done)

        node.store.accept_many_then = flaky
        tid = await open_ticket(till, {"code": "E42"})
        key = f"acme/{tid}"
        await eventually(lambda: refused)
        await asyncio.sleep(0.05)
        assert node.tickets.open[key]["status"] == "open"
        assert key in node.tickets._timers                 # re-armed
        msg = await manager.receive(timeout=3)
        assert (msg.kind, msg.body["ticket"]) == ("ticket.escalate", tid)
        assert time.monotonic() - refused[0] >= 0.15
        await eventually(lambda: node.tickets.open[key]["status"] == "escalated")
        await nothing_for(manager, 0.5)                    # once
    finally:
        await node.stop()


@aiotest()
async def test_resent_updates_after_a_restart_are_duplicates_never_refused_or_applied_twice(
        tmp_path):
    """The applied (sender, ref) pairs are kept in the ticket record: a staff device
    resending its reply / resolve after the node restarted gets the retransmit
    SENDACK, and nothing is applied (or delivered) twice."""
    overrides = {"store.backend": "sqlite", "server.data_dir": str(tmp_path)}
    node = await start_node(**overrides)
    try:
        till = await connect(node, "t1", store="s1", roles=("pos",))
        staff = await connect(node, "h1", store="s1", roles=("staff",))
        done = await open_ticket(till, {"code": "E1"})
        still = await open_ticket(till, {"code": "E2"})
        first = {
            501: await staff.send("ticket.reply", {"ticket": done, "text": "x"},
                                  "terminal:acme/t1", ref=501),
            502: await staff.send("ticket.resolve", {"ticket": done, "resolution": "ok"},
                                  "terminal:acme/t1", ref=502),
            503: await staff.send("ticket.reply", {"ticket": still, "text": "y"},
                                  "terminal:acme/t1", ref=503),
        }
        for _ in range(3):
            await (await till.receive(timeout=3)).ack()
        await till.close()
        await staff.close()
    finally:
        await node.stop()
    node = await start_node(**overrides)
    try:
        till = await connect(node, "t1", store="s1", roles=("pos",))
        staff = await connect(node, "h1", store="s1", roles=("staff",))
        resends = [(502, "ticket.resolve", {"ticket": done, "resolution": "ok"}),
                   (501, "ticket.reply", {"ticket": done, "text": "x"}),
                   (503, "ticket.reply", {"ticket": still, "text": "y"})]
        for ref, kind, body in resends:
            again = await staff.send(kind, body, "terminal:acme/t1", ref=ref)
            assert again.flags & Flag.RETRANSMIT and again.msg_id == first[ref].msg_id, kind
        assert (await node.tickets.get("acme", still))["replies"] == 1
        assert (await node.tickets.get("acme", done))["status"] == "resolved"
        await nothing_for(till, 0.3)
        # The record answered by the admin API carries no resend memory.
        assert "refs" not in await node.tickets.get("acme", still)
        # A new ref is still a new update.
        await staff.send("ticket.reply", {"ticket": still, "text": "z"}, "terminal:acme/t1")
        assert (await node.tickets.get("acme", still))["replies"] == 2
    finally:
        await node.stop()


def _record_frames(conn) -> list:
    """Keep every SENDACK and ERROR frame the connection receives."""
    seen = []
    on_frame = conn._on_frame

    def spy(frame):
        if frame.type in (FrameType.SENDACK, FrameType.ERROR):
            seen.append(frame)
        on_frame(frame)

    conn._on_frame = spy
    return seen


@aiotest()
async def test_no_sendack_for_a_ticket_send_that_did_not_ask_for_one_errors_still_come():
    """PROTOCOL.md section 7: a SENDACK only when the SEND set ACK_REQUESTED."""
    node = await start_node()
    try:
        staff = await connect(node, "h1", store="s1", roles=("staff",))
        till = await connect(node, "t1", store="s1", roles=("pos",))
        seen = _record_frames(till)
        till.session.send(Lane.P1, "role:acme/s1/staff", "ticket.open",
                          orjson.dumps({"code": "E42"}), ref=77, ack=False)
        till._schedule_write()
        msg = await staff.receive(timeout=3)
        assert msg.kind == "ticket.open"
        tid = msg.body["ticket"]
        await eventually(lambda: f"acme/{tid}" not in node.tickets.unsaved)
        await asyncio.sleep(0.2)
        assert [f for f in seen if f.ref == 77] == []
        # A refused one is still answered with an ERROR.
        till.session.send(Lane.P1, "role:acme/s1/staff", "ticket.open",
                          orjson.dumps({"text": "no code"}), ref=78, ack=False)
        till._schedule_write()
        await eventually(lambda: any(f.ref == 78 for f in seen))
        assert [(f.type, f.code) for f in seen if f.ref == 78] == \
            [(FrameType.ERROR, Code.BAD_MESSAGE)]
        # Asked: answered.
        ack = await till.send("ticket.open", {"code": "E43"}, "role:acme/s1/staff")
        assert "ticket" in orjson.loads(ack.payload)
    finally:
        await node.stop()


# -- a ticket never reaches no one (issue 19) ---------------------------------------------------


def _gauge(text: str, name: str) -> float:
    """The value of an unlabelled-but-worker gauge in a /metrics scrape."""
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the scrape")


async def _scrape(env) -> str:
    async with env.api.http.get("/metrics") as resp:
        return await resp.text()


@aiotest()
async def test_a_ticket_opened_with_no_one_on_duty_waits_for_the_first_staff_login(tmp_path):
    async with admin_env(tmp_path) as env:
        node = env.node
        till = await connect(node, "t1", store="s1", roles=("pos",))
        ack = await till.send("ticket.open", {"code": "E42", "text": "printer jam"},
                              "role:acme/s1/staff")
        doc = orjson.loads(ack.payload)
        tid = doc["ticket"]
        assert TICKET_ID.match(tid) and doc["recipients"] == 0 and doc["waiting"] is True
        page = await env.api.call("GET", "/v1/tickets?tenant=acme&store=s1", "/v1/tickets")
        assert [(t["ticket"], t["recipients"], t["status"]) for t in page["tickets"]] == \
            [(tid, 0, "open")]
        assert _gauge(await _scrape(env), "tillwire_tickets_waiting") == 1
        # Staff of another store do not get it; the first staff of s1 to log in does.
        other = await connect(node, "h9", store="s2", roles=("staff",))
        staff = await connect(node, "h1", store="s1", roles=("staff",))
        msg = await staff.receive(timeout=3)
        assert (msg.kind, msg.lane) == ("ticket.open", Lane.P1)
        assert msg.body == {"code": "E42", "text": "printer jam", "ticket": tid,
                            "from": "terminal:acme/t1"}
        await msg.ack()
        await nothing_for(other, 0.1)
        await eventually(lambda: node.tickets.open[f"acme/{tid}"]["recipients"] == 1)
        page = await env.api.call("GET", "/v1/tickets?tenant=acme&store=s1", "/v1/tickets")
        assert page["tickets"][0]["recipients"] == 1
        assert _gauge(await _scrape(env), "tillwire_tickets_waiting") == 0
        # A second staff login gets nothing more: the ticket has someone.
        late = await connect(node, "h2", store="s1", roles=("staff",))
        await nothing_for(late, 0.2)
        await staff.send("ticket.assign", {"ticket": tid}, "terminal:acme/t1")


@aiotest()
async def test_a_waiting_ticket_goes_to_the_terminals_put_on_duty(tmp_path):
    async with admin_env(tmp_path) as env:
        till = await connect(env.node, "t1", store="s1", roles=("pos",))
        tid = await open_ticket(till, {"code": "E7"})
        await env.api.call("PUT", "/v1/stores/acme/s1", "/v1/stores/{tenant}/{store}",
                           json_body={"on_duty": ["h7"]})
        assert env.node.tickets.open[f"acme/{tid}"]["recipients"] == 1
        on_duty = await connect(env.node, "h7", store="s1", roles=("staff",))   # (logs in later)
        msg = await on_duty.receive(timeout=3)
        assert (msg.kind, msg.body["ticket"]) == ("ticket.open", tid)


@aiotest()
async def test_escalation_climbs_from_the_store_to_its_region_to_the_tenant_role():
    node = await start_node(**{"tickets.escalate_after": 0.3})
    try:
        # s1 and s2 are in region north, s3 in south; only s2 has a manager.
        north = await connect(node, "m2", store="s2", region="north", roles=("manager",))
        hq = await connect(node, "ops", store="hq", roles=("service",))
        t1 = await connect(node, "t1", store="s1", region="north", roles=("pos",))
        t3 = await connect(node, "t3", store="s3", region="south", roles=("pos",))
        staff1 = await connect(node, "h1", store="s1", region="north", roles=("staff",))
        staff3 = await connect(node, "h3", store="s3", region="south", roles=("staff",))
        first = await open_ticket(t1, {"code": "E1"})
        msg = await north.receive(timeout=3)
        assert (msg.kind, msg.body["ticket"], msg.body["level"], msg.body["store"]) == \
            ("ticket.escalate", first, "region", "s1")
        await msg.ack()
        # South has no manager at all: the tenant-wide role (tickets.escalate_role,
        # manager by default) is m2 again, at the tenant level.
        second = await open_ticket(t3, {"code": "E3"}, "role:acme/s3/staff")
        msg = await north.receive(timeout=3)
        assert (msg.kind, msg.body["ticket"], msg.body["level"], msg.body["store"]) == \
            ("ticket.escalate", second, "tenant", "s3")
        for key in (f"acme/{first}", f"acme/{second}"):
            await eventually(lambda: node.tickets.open[key]["status"] == "escalated")
        assert [node.tickets.open[f"acme/{t}"]["level"] for t in (first, second)] == \
            ["region", "tenant"]
        await nothing_for(hq, 0.1)
        for staff in (staff1, staff3):
            assert (await staff.receive(timeout=3)).kind == "ticket.open"
    finally:
        await node.stop()


@aiotest()
async def test_a_ticket_with_no_one_at_any_level_stays_open_unattended_and_counted(tmp_path):
    async with admin_env(tmp_path, **{"tickets.escalate_after": 0.3,
                                      "tickets.escalate_role": ""}) as env:
        node = env.node
        till = await connect(node, "t1", store="s1", roles=("pos",))
        staff = await connect(node, "h1", store="s1", roles=("staff",))
        tid = await open_ticket(till, {"code": "E9"})
        assert (await staff.receive(timeout=3)).kind == "ticket.open"
        key = f"acme/{tid}"
        await eventually(lambda: node.tickets.open[key].get("unattended") is True, timeout=3)
        rec = node.tickets.open[key]
        assert rec["status"] == "open" and rec["due"] > rec["created"] + 0.3   # tried again later
        page = await env.api.call("GET", "/v1/tickets?tenant=acme&unattended=true",
                                  "/v1/tickets")
        assert [t["ticket"] for t in page["tickets"]] == [tid] and page["unattended"] == 1
        assert page["tickets"][0]["unattended"] is True
        assert _gauge(await _scrape(env), "tillwire_tickets_unattended") == 1
        # A manager appears: the next round reaches them and the ticket is attended.
        manager = await connect(node, "m1", store="s1", roles=("manager",))
        msg = await manager.receive(timeout=3)
        assert (msg.kind, msg.body["ticket"], msg.body["level"]) == \
            ("ticket.escalate", tid, "store")
        await eventually(lambda: node.tickets.open[key]["status"] == "escalated")
        assert node.tickets.open[key]["unattended"] is False
        assert _gauge(await _scrape(env), "tillwire_tickets_unattended") == 0
        page = await env.api.call("GET", "/v1/tickets?tenant=acme&unattended=true",
                                  "/v1/tickets")
        assert page["tickets"] == [] and page["unattended"] == 0


@aiotest()
async def test_open_tickets_are_listed_a_page_at_a_time(tmp_path):
    async with admin_env(tmp_path) as env:
        till = await connect(env.node, "t1", store="s1", roles=("pos",))
        other = await connect(env.node, "t2", store="s2", roles=("pos",))
        staff = await connect(env.node, "h1", store="s1", roles=("staff",))
        mine = [await open_ticket(till, {"code": f"E{n}"}) for n in range(5)]
        await open_ticket(other, {"code": "X"}, "role:acme/s2/staff")
        await staff.send("ticket.resolve", {"ticket": mine[0], "resolution": "done"},
                         "terminal:acme/t1")
        seen, after = [], None
        while True:
            url = "/v1/tickets?tenant=acme&store=s1&limit=2" + (f"&after={after}" if after else "")
            page = await env.api.call("GET", url, "/v1/tickets")
            assert page["total"] == 4 and len(page["tickets"]) <= 2
            seen += [t["ticket"] for t in page["tickets"]]
            after = page.get("next")
            if after is None:
                break
        assert seen == sorted(mine[1:])
        everything = await env.api.call("GET", "/v1/tickets?tenant=acme", "/v1/tickets")
        assert everything["total"] == 5
        for query, field in (("tenant=acme&limit=0", "limit"), ("tenant=acme&store=a/b", "store"),
                             ("tenant=acme&unattended=maybe", "unattended"),
                             ("tenant=acme&after=bad%20id", "after"), ("", "tenant")):
            bad = await env.api.call("GET", f"/v1/tickets?{query}", "/v1/tickets", expect=400)
            assert bad["field"] == field, (query, bad)
        denied = await env.api.call("GET", "/v1/tickets?tenant=acme", "/v1/tickets",
                                    auth=GLOBEX, expect=403)
        assert denied["field"] == "tenant"


@aiotest()
async def test_a_waiting_ticket_still_waits_after_a_restart(tmp_path):
    overrides = {"store.backend": "sqlite", "server.data_dir": str(tmp_path)}
    node = await start_node(**overrides)
    try:
        till = await connect(node, "t1", store="s1", roles=("pos",))
        tid = await open_ticket(till, {"code": "E5"})
        await till.close()
    finally:
        await node.stop()
    node = await start_node(**overrides)
    try:
        assert node.tickets.waiting == {("acme", "s1"): {f"acme/{tid}"}}
        staff = await connect(node, "h1", store="s1", roles=("staff",))
        msg = await staff.receive(timeout=3)
        assert (msg.kind, msg.body["ticket"], msg.body["from"]) == \
            ("ticket.open", tid, "terminal:acme/t1")
        await eventually(lambda: not node.tickets.waiting)
    finally:
        await node.stop()
