"""The terminal SDK against real servers: reconnects, resume across restarts,
exactly-once processing with the state file, idempotent sends, auto-ack."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from support import ServerProcess, aiotest, connect, eventually, provision, start_node, token
import tillwire.client
from tillwire.client import ClientClosed, ConnectFailed, Kicked, Refused
from tillwire.core.codes import Code, Lane


async def sdk(addr, terminal, tmp_path=None, **kwargs):
    host, port = addr
    tok_kwargs = {k: kwargs.pop(k) for k in ("store", "roles") if k in kwargs}
    state = os.path.join(str(tmp_path), f"{terminal}.json") if tmp_path else None
    return await tillwire.client.connect(host, port, token=token(terminal, **tok_kwargs),
                                         state_path=state, backoff_base=0.05,
                                         backoff_max=0.5, **kwargs)


@aiotest()
async def test_ten_line_till_receives_prices_and_payments():
    node = await start_node()
    try:
        be = await connect(node, "hq", store="hq", roles=("backend",))
        client = await sdk(node.addresses[0], "till1")
        await be.send("price.update", {"sku": "A", "price": "5.00", "version": 1}, "store:acme/s1")
        await be.send("payment.result", {"order": "o1", "status": "paid"}, "terminal:acme/till1")
        got = []
        async for msg in client:
            got.append((msg.kind, msg.lane, msg.channel))
            await msg.ack()
            if len(got) == 2:
                break
        assert sorted(got) == [("payment.result", Lane.P0, None),
                               ("price.update", Lane.P2, "store:acme/s1")]
        await client.close()
    finally:
        await node.stop()


@pytest.mark.slow
@aiotest(timeout=120)
async def test_reconnect_and_resume_across_server_restart(tmp_path):
    server = ServerProcess(str(tmp_path / "srv")).start()
    os.makedirs(tmp_path / "till", exist_ok=True)
    try:
        client = await sdk(server.addr, "till1", tmp_path / "till")
        payer = await sdk(server.addr, "pay", tmp_path / "till", store="hq", roles=("backend",))
        for n in range(5):
            await payer.send("payment.result", {"order": "o1", "n": n, "status": "paid"}, "terminal:acme/till1", ref=100 + n)
        for n in range(5):
            msg = await client.receive(timeout=5)
            assert msg.body["n"] == n
            await msg.ack()
        server.stop()
        server.start()          # the SDK reconnects by itself
        for n in range(5, 10):
            await payer.send("payment.result", {"order": "o1", "n": n, "status": "paid"}, "terminal:acme/till1", ref=100 + n,
                             timeout=20)
        got = [(await client.receive(timeout=20)) for _ in range(5)]
        assert [m.body["n"] for m in got] == list(range(5, 10))
        assert client.connects >= 2
        for m in got:
            await m.ack()
        await client.close()
        await payer.close()
    finally:
        server.stop()


@aiotest()
async def test_state_file_survives_an_app_restart_exactly_once(tmp_path):
    node = await start_node()
    try:
        be = await connect(node, "hq", store="hq", roles=("backend",))
        await provision(node, "till1")          # (known before its first login)
        for n in range(6):
            await be.send("payment.result", {"order": "o1", "n": n, "status": "paid"}, "terminal:acme/till1")
        client = await sdk(node.addresses[0], "till1", tmp_path)
        for n in range(3):                     # process three, then the app "crashes"
            msg = await client.receive(timeout=3)
            assert msg.body["n"] == n
            await msg.ack()
        unprocessed = await client.receive(timeout=3)   # received, never processed
        assert unprocessed.body["n"] == 3
        await asyncio.sleep(0.1)               # the state file is written (debounced)
        client.conn.abort()                    # crash: no goodbye
        await client.close()
        again = await sdk(node.addresses[0], "till1", tmp_path)
        rest = [(await again.receive(timeout=3)) for _ in range(3)]
        assert [m.body["n"] for m in rest] == [3, 4, 5]   # 3 comes back; 0-2 do not
        assert rest[0].duplicate                  # the server had delivered it before
        await again.close()
    finally:
        await node.stop()


@aiotest()
async def test_auto_ack_acks_when_the_next_message_is_taken():
    node = await start_node()
    try:
        be = await connect(node, "hq", store="hq", roles=("backend",))
        client = await sdk(node.addresses[0], "till1", auto_ack=True)
        for n in range(3):
            await be.send("payment.result", {"order": "o1", "n": n, "status": "paid"}, "terminal:acme/till1")
        for n in range(3):
            assert (await client.receive(timeout=3)).body["n"] == n
        await client.close()                  # acks the last one too
        await node.delivery.flush_batches()
        acked0, last0, _, _ = await node.store.positions("terminal:acme/till1")
        assert acked0 == last0 == 3
    finally:
        await node.stop()


@aiotest()
async def test_send_is_idempotent_across_reconnect_and_errors_are_clear():
    node = await start_node()
    try:
        till = await sdk(node.addresses[0], "till1")
        ack = await till.send("ticket.open", {"code": "E1"}, "role:acme/s1/staff", ref=42)
        again = await till.send("ticket.open", {"code": "E1"}, "role:acme/s1/staff", ref=42)
        assert again.msg_id == ack.msg_id
        with pytest.raises(tillwire.client.SendError) as info:
            await till.send("payment.result", {"order": "o1", "x": 1, "status": "paid"}, "terminal:acme/t2")
        assert info.value.code == Code.FORBIDDEN
        await till.close()
    finally:
        await node.stop()


@aiotest()
async def test_takeover_and_bad_token_stop_the_client():
    node = await start_node()
    try:
        first = await sdk(node.addresses[0], "till1")
        second = await sdk(node.addresses[0], "till1")
        with pytest.raises(ClientClosed) as info:
            await first.receive(timeout=5)
        assert info.value.code == Code.TAKEOVER
        await second.close()
        host, port = node.addresses[0]
        with pytest.raises(ClientClosed) as info:
            await tillwire.client.connect(host, port, token="tw1.bad.token")
        assert info.value.code == Code.AUTH_FAILED
    finally:
        await node.stop()


@aiotest()
async def test_a_kicked_client_raises_from_async_for_instead_of_ending_quietly():
    node = await start_node()
    try:
        first = await sdk(node.addresses[0], "till1")
        second = await sdk(node.addresses[0], "till1")         # takes the session over
        with pytest.raises(Kicked) as info:
            async for _msg in first:
                pass
        assert info.value.code == Code.TAKEOVER
        with pytest.raises(Kicked):                            # and so does send
            await first.send("ticket.open", {"code": "E1"}, "role:acme/s1/staff")
        # An operator's kick (CLOSE KICKED) ends the other one the same way.
        node.kick("terminal:acme/till1")
        with pytest.raises(Kicked) as info:
            async for _msg in second:
                pass
        assert info.value.code == Code.KICKED
        # Only the application's own close() ends the loop quietly.
        third = await sdk(node.addresses[0], "till1")
        await third.close()
        assert [m async for m in third] == []
    finally:
        await node.stop()


@aiotest()
async def test_refused_for_good_raises_refused_and_connect_limits_raise_connect_failed():
    node = await start_node()
    try:
        host, port = node.addresses[0]
        with pytest.raises(Refused) as info:
            await tillwire.client.connect(host, port, token=token("till1", ttl=60,
                                                                  now=time.time() - 3600))
        assert info.value.code == Code.TOKEN_EXPIRED
    finally:
        await node.stop()
    # Nothing listens there any more: by default the client keeps trying; a
    # limit makes connect() give up with the last attempt's reason.
    with pytest.raises(ConnectFailed) as failed:
        await tillwire.client.connect(host, port, token=token("till1"), first_attempts=2,
                                      backoff_base=0.01)
    assert "connection refused" in failed.value.reason
    with pytest.raises(ConnectFailed):
        await tillwire.client.connect(host, port, token=token("till1"), first_timeout=0.3,
                                      backoff_base=0.01)


@aiotest()
async def test_connect_and_disconnect_callbacks_see_each_session():
    node = await start_node()
    events = []
    try:
        client = await sdk(node.addresses[0], "till1",
                           on_connected=lambda info: events.append(("up", info["terminal"])),
                           on_disconnected=lambda code, reason: events.append(("down", code)))
        client.conn.abort()                                    # the network drops it
        await eventually(lambda: len(events) >= 3, timeout=5)
        assert events[:3] == [("up", "terminal:acme/till1"), ("down", Code.INTERNAL_ERROR),
                              ("up", "terminal:acme/till1")]
        assert client.connects == 2
        await client.close()
    finally:
        await node.stop()
