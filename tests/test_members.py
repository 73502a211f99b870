"""Personal data: DELETE /v1/members/{tenant}/{member} through the admin API.

A real node with the SQLite store: the member's conversations and chat
history, their frequency-cap record and the history of their member channel
(in the hub and in the store) are deleted, other members' data stays, the
call is audited with the counts, and card numbers are refused on the admin
publish path too.  Responses are checked against server/openapi.json.
"""

from __future__ import annotations

import orjson

from support import aiotest, connect, start_node
from test_admin import ACME, GLOBEX, admin_env
from tillwire.core.codes import Lane

SERVICE = "role:acme/*/service"
PATH = "/v1/members/{tenant}/{member}"


@aiotest()
async def test_deleting_a_member_removes_their_conversations_caps_and_channel(tmp_path):
    overrides = {"store.backend": "sqlite", "offers.cap_count": 5}
    async with admin_env(tmp_path, **overrides) as env:
        node = env.node
        agent = await connect(node, "a1", store="cs", roles=("service",))
        be = await connect(node, "hq", store="hq", roles=("backend",))
        m1 = await connect(node, "app1", store="s1", roles=("customer",), member="m1")
        m2 = await connect(node, "app2", store="s1", roles=("customer",), member="m2")
        for conv, app in (("cv1", m1), ("cv2", m1), ("cv3", m2)):
            await app.send("chat.message", {"conversation": conv, "text": "hello"}, SERVICE)
            await agent.send("chat.message", {"conversation": conv, "text": "hi"},
                             f"chat:acme/{conv}")
        for app in (m1, m2):
            await be.send("member.notice", {"member": app.info["member"], "text": "Points"},
                          f"member:acme/{app.info['member']}", ttl=600)
        await node.offers.flush()
        assert await node.store.records.get("cap", "acme/m1") is not None

        doc = await env.api.call("DELETE", "/v1/members/acme/m1", PATH, auth=ACME)
        assert doc == {"tenant": "acme", "member": "m1", "conversations": 2,
                       "chat_messages": 4, "caps": 1, "channel_entries": 1}
        # m1's data is gone ...
        assert sorted(node.chat.convs) == ["acme/cv3"]
        assert [k for k, _ in await node.store.records.scan("conv")] == ["acme/cv3"]
        assert {k.split("/")[1] for k, _ in await node.store.records.scan("chat")} == {"cv3"}
        assert await node.store.records.get("cap", "acme/m1") is None
        assert ("acme", "m1") not in node.offers.counts
        items, _ = await m1.history("member:acme/m1", Lane.P3)
        assert items == []
        # ... m2's stays.
        items, _ = await m2.history("member:acme/m2", Lane.P3)
        assert [f.kind for f in items] == ["member.notice"]
        assert await node.store.records.get("cap", "acme/m2") is not None
        # Deleting again finds nothing.
        doc = await env.api.call("DELETE", "/v1/members/acme/m1", PATH)
        assert (doc["conversations"], doc["chat_messages"], doc["caps"]) == (0, 0, 0)
        calls = [e for e in env.events("admin.call")
                 if e.get("detail", {}).get("path") == "/v1/members/acme/m1"]
        assert calls[0]["detail"]["conversations"] == 2 and calls[0]["tenant"] == "acme"
        assert calls[0]["detail"]["status"] == 200

        # Refusals name the field.
        err = await env.api.call("DELETE", "/v1/members/acme/bad%20id", PATH, expect=400)
        assert err["field"] == "member"
        err = await env.api.call("DELETE", "/v1/members/acme/m2", PATH, auth=GLOBEX, expect=403)
        assert err["field"] == "tenant"
        # Card numbers are refused on the admin publish path as at the edge.
        err = await env.api.call("POST", "/v1/publish", json_body={
            "to": "member:acme/m2", "kind": "member.notice",
            "body": {"member": "m2", "text": "card 4111 1111 1111 1111"}}, expect=400)
        assert (err["code"], err["field"]) == ("CARD_DATA", "body.text")
    # The store forgot the member channel too: it is not loaded at the next start.
    node = await start_node(store=None, **{"store.backend": "sqlite",
                                           "server.data_dir": str(tmp_path)})
    try:
        assert node.hub.stream("member:acme/m1", Lane.P3, create=False) is None
        kept = node.hub.stream("member:acme/m2", Lane.P3, create=False)
        assert [e.kind for e in kept.history] == ["member.notice"]
        assert orjson.loads((await node.store.records.scan("conv"))[0][1])["member"] == "m2"
    finally:
        await node.stop()
