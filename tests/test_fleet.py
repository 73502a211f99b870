"""Nodes of several workers over one real ``redis-server``: ``tillwire serve
--workers N --redis URL`` as real subprocesses on loopback.

The kernel spreads connections over a node's workers (SO_REUSEPORT); WELCOME
says which worker holds a session, so a test opens connections until the
terminals it wants apart are on different workers.  Covered: a P0 payment
result between workers and between nodes (SDK and admin API), takeover
across workers, a worker killed with SIGKILL (restarted by its supervisor;
its tills resume on the other workers with nothing lost), the one-by-one
drain on SIGTERM with one audit file per worker, and the refusal of more
than one worker without Redis.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import aiohttp
import orjson
import pytest

from redis_server import PrivateRedis, fresh_prefix, redis_url
from support import SECRET, ServerProcess, aiotest, connect, eventually, token
from tillwire.client.connection import SendError
from tillwire.client.sdk import Client
from tillwire.core.codes import Code, ReceiptStatus
from tillwire.core.errors import SessionClosed

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "fleet-admin-token"


class Node:
    """One ``serve --workers N --redis`` process (the supervisor) and its workers."""

    def __init__(self, tmp_path, name: str, prefix: str, workers: int = 2,
                 url: str | None = None, env: dict | None = None) -> None:
        from support import free_port

        self.workers = workers
        self.server = ServerProcess(
            str(tmp_path / name), admin_port=free_port(),
            env={"TILLWIRE_REDIS_PREFIX": prefix, "TILLWIRE_ADMIN_TOKEN": ADMIN_TOKEN,
                 "TILLWIRE_SERVER_NODE_ID": name, **(env or {})},
            args=["--workers", str(workers), "--redis", url or redis_url()])

    def start(self) -> "Node":
        self.server.start()
        self.wait_listening(range(self.workers))
        return self

    def wait_listening(self, workers, since: int = 0) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            log = self.server.log()[since:]
            if all(re.search(rf"listening .*worker={w}\b", log) for w in workers):
                return
            time.sleep(0.05)
        raise AssertionError(f"workers {list(workers)} not listening:\n{self.server.log()}")

    def pids(self) -> dict[int, int]:
        """worker index -> pid of its newest process."""
        found = {}
        for index, pid in re.findall(r"worker (\d+) started pid=(\d+)", self.server.log()):
            found[int(index)] = int(pid)
        return found

    @property
    def addr(self):
        return self.server.addr

    async def admin(self, method: str, path: str, body=None):
        url = f"http://127.0.0.1:{self.server.admin_port}{path}"
        async with aiohttp.ClientSession() as http:
            async with http.request(method, url, json=body, headers={
                    "Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
                return resp.status, await resp.json()

    def stop(self) -> int:
        status = self.server.stop(timeout=60)
        if status != 0:
            print(self.server.log())          # (shown with the failure)
        return status


@pytest.fixture
def prefix():
    return fresh_prefix()


async def on_worker(node, terminal: str, worker=None, avoid=None, **kwargs):
    """A connection of ``terminal`` on worker ``worker`` (or on any worker
    but ``avoid``): connections are opened until the kernel picks one."""
    for _ in range(60):
        conn = await connect(node.addr, terminal, timeout=5, **kwargs)
        got = conn.info["worker"]
        if (worker is None or got == worker) and (avoid is None or got != avoid):
            return conn
        await conn.close()
    raise AssertionError(f"no connection of {terminal} landed where wanted")


async def subscribed(prefix: str, channel: str, workers: int, url: str | None = None) -> None:
    """Wait until ``workers`` workers subscribed to ``channel`` in Redis (a
    terminal that logged in meanwhile gets what is published from then on)."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url or redis_url())
    try:
        name = f"{prefix}:ch:{channel}"
        for _ in range(200):
            (_, count), = await client.pubsub_numsub(name)
            if count >= workers:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{channel}: {count} of {workers} workers subscribed")
    finally:
        await client.aclose()


async def claimed(prefix: str, terminal: str, owner: str) -> None:
    """Wait until presence says worker ``owner`` holds ``terminal`` (its claim
    is written by a task after WELCOME, and an earlier connection's claim on
    another worker may still be there; meanwhile other workers send what is
    for the terminal to the wrong worker, or find it offline and leave a
    message to its own channel in the history for its catch-up)."""
    import redis.asyncio as aioredis

    from tillwire.server.presence_redis import RedisPresence

    client = aioredis.from_url(redis_url())
    try:
        presence = RedisPresence(client, prefix=prefix)
        for _ in range(200):
            if await presence.owner(terminal) == owner:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{terminal}: {owner} did not claim it")
    finally:
        await client.aclose()


class SdkTills:
    """Tills on the SDK (resume state on disk, reconnect with backoff) that
    ack every payment result; ``got[i]`` are till ``i``'s order numbers in
    arrival order."""

    def __init__(self, addr, tmp_path) -> None:
        self.addr, self.tmp_path = addr, tmp_path
        self.clients: list[Client] = []
        self.got: dict[int, list[int]] = {}
        self._readers: list[asyncio.Task] = []

    async def add(self) -> Client:
        i = len(self.clients)
        c = Client(*self.addr, token(f"till{i}"), state_path=str(self.tmp_path / f"t{i}.json"),
                   backoff_base=0.05, backoff_max=0.5, connect_timeout=3)
        self.clients.append(await c.start())
        self.got[i] = []
        self._readers.append(asyncio.create_task(self._receive(c, self.got[i])))
        return c

    @staticmethod
    async def _receive(c: Client, got: list[int]) -> None:
        async for msg in c:
            got.append(int(msg.body["order"][1:]))
            await msg.ack()

    def received(self) -> int:
        return sum(map(len, self.got.values()))

    async def close(self) -> None:
        for r in self._readers:
            r.cancel()
        for c in self.clients:
            await c.close()


def payment(n: int) -> dict:
    return {"order": f"o{n}", "status": "paid"}


@aiotest(120)
async def test_a_p0_result_goes_from_one_worker_to_a_till_on_another_and_any_node(
        tmp_path, prefix):
    a = Node(tmp_path, "node-a", prefix).start()
    b = Node(tmp_path, "node-b", prefix, workers=1).start()
    try:
        till = await on_worker(a, "till1")
        pay = await on_worker(a, "pay1", avoid=till.info["worker"], roles=("backend",))
        assert till.info["node"] == "node-a" and pay.info["worker"] != till.info["worker"]
        await claimed(prefix, "terminal:acme/pay1", f"node-a.w{pay.info['worker']}")
        # Its receipts come back from the till's worker to the payer's.
        ack = await pay.send("payment.result", payment(1), "terminal:acme/till1", receipt=True)
        assert ack.msg_id
        msg = await till.receive(timeout=10)
        assert msg.body["order"] == "o1" and msg.lane == 0
        await msg.ack()
        for status in (ReceiptStatus.DELIVERED, ReceiptStatus.ACKED):
            r = await asyncio.wait_for(pay.receipts.get(), 10)
            assert (r.code, r.msg_id, r.to) == (status, ack.msg_id, "terminal:acme/till1")
        # Any worker of any node says where the till is connected.
        for node in (a, b, a, b, a, b):
            status, doc = await node.admin("GET", "/v1/terminals/acme/till1")
            assert status == 200, doc
            assert (doc["connected"], doc["node"], doc["worker"], doc["state"]) == \
                (True, "node-a", till.info["worker"], "open"), doc
        # A payment terminal on the other node reaches the same till.
        far = await on_worker(b, "pay2", roles=("backend",))
        assert far.info["node"] == "node-b"
        await far.send("payment.result", payment(2), "terminal:acme/till1")
        msg = await till.receive(timeout=10)
        assert msg.body["order"] == "o2"
        await msg.ack()
        # The admin API of either node (whichever worker answers) too.
        for node, n in ((a, 3), (b, 4), (a, 5), (b, 6)):
            status, body = await node.admin("POST", "/v1/publish", {
                "to": "terminal:acme/till1", "kind": "payment.result", "lane": "P0",
                "body": payment(n)})
            assert status == 200, body
            msg = await till.receive(timeout=10)
            assert msg.body["order"] == f"o{n}"
            await msg.ack()
        for conn in (till, pay, far):
            await conn.close()
    finally:
        assert a.stop() == 0
        assert b.stop() == 0


def price(sku: str, version: int, amount: str) -> dict:
    return {"sku": sku, "price": amount, "currency": "EUR", "version": version}


async def channel_messages(conn, count: int) -> list:
    got = []
    while len(got) < count:
        msg = await conn.receive(timeout=10)
        if msg.channel is not None:
            got.append((msg.channel, msg.seq, msg.body))
    return got


@aiotest(120)
async def test_a_store_broadcast_reaches_every_worker_once_and_the_newest_version_wins(
        tmp_path, prefix):
    a = Node(tmp_path, "node-a", prefix).start()
    b = Node(tmp_path, "node-b", prefix, workers=1).start()
    try:
        tills = [await on_worker(a, "till1", worker=0), await on_worker(a, "till2", worker=1),
                 await on_worker(b, "till3")]
        await subscribed(prefix, "store:acme/s1", 3)      # (one per worker with a till)
        # HQ publishes through either node; two publishers of one SKU: the
        # newest version wins once, whichever worker placed it.
        status, first = await a.admin("POST", "/v1/publish", {
            "to": "store:acme/s1", "kind": "price.update", "body": price("sku1", 2, "5.00")})
        assert status == 200 and first["offset"] == 1, first
        status, stale = await b.admin("POST", "/v1/publish", {
            "to": "store:acme/s1", "kind": "price.update", "body": price("sku1", 1, "4.00")})
        assert status == 200 and stale == {"stale": True}
        status, second = await b.admin("POST", "/v1/publish", {
            "to": "store:acme/s1", "kind": "price.update", "body": price("sku2", 1, "1.50")})
        assert status == 200 and second["offset"] == 2
        for till in tills:
            got = await channel_messages(till, 2)
            assert got == [("store:acme/s1", 1, price("sku1", 2, "5.00")),
                           ("store:acme/s1", 2, price("sku2", 1, "1.50"))]
        # Exactly once: nothing more comes.
        for till in tills:
            with pytest.raises(asyncio.TimeoutError):
                await till.receive(timeout=0.5)
        # A till that logs in later, on any worker, reads the last values.
        late = await on_worker(b, "till4")
        items, end = await late.history("store:acme/s1")
        assert [(i.offset, orjson.loads(i.payload)["sku"]) for i in items] == [(1, "sku1"), (2, "sku2")]
        # A P2 message to a terminal's own channel reaches it on its worker.
        status, own = await b.admin("POST", "/v1/publish", {
            "to": "terminal:acme/till2", "kind": "price.update", "lane": "P2",
            "body": price("sku9", 1, "9.00")})
        assert status == 200, own
        got = await channel_messages(tills[1], 1)
        assert got == [("terminal:acme/till2", 1, price("sku9", 1, "9.00"))]
        for conn in (*tills, late):
            await conn.close()
    finally:
        assert a.stop() == 0
        assert b.stop() == 0


@aiotest(120)
async def test_a_tills_own_channel_fed_from_every_worker_arrives_whole_and_in_order(
        tmp_path, prefix):
    # Publishers on three workers of two nodes place P2 messages in one
    # till's own channel at the same time.  Each is placed and told to the
    # till's worker in one step (the History's script publishes it on that
    # worker's control channel), so they arrive in offset order and none is
    # dropped.  (Told after the append, two could cross: the later offset
    # first reset the till's mirror, and the earlier was dropped as old.)
    a = Node(tmp_path, "node-a", prefix).start()
    b = Node(tmp_path, "node-b", prefix, workers=1).start()
    try:
        till = await on_worker(a, "till1", worker=1)
        await claimed(prefix, "terminal:acme/till1", "node-a.w1")
        count = 150

        async def publish(node, first: int) -> None:
            for n in range(first, count, 3):
                status, doc = await node.admin("POST", "/v1/publish", {
                    "to": "terminal:acme/till1", "kind": "price.update", "lane": "P2",
                    "body": price(f"sku{n}", 1, "1.00")})
                assert status == 200, doc

        await asyncio.gather(publish(a, 0), publish(a, 1), publish(b, 2))
        got = await channel_messages(till, count)
        assert [seq for _, seq, _ in got] == list(range(1, count + 1))
        assert sorted(body["sku"] for _, _, body in got) == sorted(f"sku{n}" for n in range(count))
        await till.close()
    finally:
        assert a.stop() == 0
        assert b.stop() == 0


@aiotest(120)
async def test_operators_changes_reach_every_worker_of_every_node(tmp_path, prefix):
    a = Node(tmp_path, "node-a", prefix).start()
    b = Node(tmp_path, "node-b", prefix, workers=1).start()
    try:
        # A stolen handheld, logged in on node B: revoked through node A's API.
        h12 = await on_worker(b, "h12", roles=("staff",))
        old_token = token("h12", roles=("staff",), now=time.time() - 5)
        for _ in range(50):             # (its login's registration is written behind)
            if (await a.admin("GET", "/v1/terminals/acme/h12"))[0] == 200:
                break
            await asyncio.sleep(0.05)
        # (the kick finds its worker through its claim, written after WELCOME;
        # a revoke before it closes the session too, but answers kicked false)
        await claimed(prefix, "terminal:acme/h12", "node-b.w0")
        status, body = await a.admin("POST", "/v1/terminals/acme/h12/revoke",
                                     {"reason": "stolen"})
        assert status == 200 and body["kicked"] is True, body    # kicked on node B
        with pytest.raises(SessionClosed) as closed:
            await h12.receive(timeout=10)
        assert closed.value.code == Code.KICKED
        # Its old tokens are refused on every worker of both nodes, including
        # workers that never saw the terminal.
        for node in (a, a, a, b):
            with pytest.raises(SessionClosed) as refused:
                await connect(node.addr, "h12", token=old_token, timeout=5)
            assert refused.value.code == Code.TOKEN_REVOKED
        # A store's roster changed through node B is what node A's workers use.
        status, _ = await b.admin("PUT", "/v1/stores/acme/s7",
                                  {"timezone": "Europe/Paris", "on_duty": ["staff-1"]})
        assert status == 200

        async def seen_everywhere() -> bool:
            for _ in range(8):           # (the kernel picks the worker of each request)
                status, doc = await a.admin("GET", "/v1/stores/acme/s7")
                if doc.get("on_duty") != ["staff-1"]:
                    return False
            return True

        for _ in range(50):
            if await seen_everywhere():
                break
            await asyncio.sleep(0.1)
        assert await seen_everywhere()
    finally:
        assert a.stop() == 0
        assert b.stop() == 0


@aiotest(120)
async def test_a_chat_started_on_one_worker_is_answered_from_another_by_one_agent(
        tmp_path, prefix):
    node = Node(tmp_path, "node-c", prefix).start()
    try:
        customer = await on_worker(node, "app1", worker=0, roles=("customer",),
                                   member="m-1")
        agents = [await on_worker(node, "agent1", worker=1, roles=("service",)),
                  await on_worker(node, "agent2", worker=0, roles=("service",))]
        await asyncio.sleep(0.3)          # (the agents' registrations are written behind)
        conv = "c-5f0e2d"

        async def chat(conn, text, to=f"chat:acme/{conv}"):
            ack = await conn.send("chat.message", {"conversation": conv, "text": text}, to)
            return orjson.loads(ack.payload)

        async def heard(conn):
            msg = await conn.receive(timeout=10)
            await msg.ack()
            return msg.body["text"]

        assert (await chat(customer, "where is my order?", "role:acme/*/service"))[
            "recipients"] == 2
        assert [await heard(a) for a in agents] == ["where is my order?"] * 2
        # Both answer at once from their workers: one becomes the agent.
        await asyncio.gather(chat(agents[0], "looking"), chat(agents[1], "on it"))
        assert sorted([await heard(customer), await heard(customer)]) == ["looking", "on it"]
        assert (await chat(customer, "thanks"))["recipients"] == 1
        got = await asyncio.gather(*(asyncio.wait_for(heard(a), 2) for a in agents),
                                   return_exceptions=True)
        assert got.count("thanks") == 1, got                       # the agent only
        assert sum(isinstance(g, asyncio.TimeoutError) for g in got) == 1, got
        # Its history reads the same from either worker.
        for a in agents:
            items, end = await a.history(f"chat:acme/{conv}", lane=1)
            texts = [orjson.loads(i.payload)["text"] for i in items]
            assert texts[0] == "where is my order?" and texts[3] == "thanks", texts
            assert sorted(texts[1:3]) == ["looking", "on it"], texts
        for conn in (customer, *agents):
            await conn.close()
    finally:
        assert node.stop() == 0


async def publish_offer(node, n: int) -> None:
    """Offer ``of{n}`` to the whole tenant, sent through ``node``'s admin API."""
    status, body = await node.admin("POST", "/v1/publish", {
        "to": "tenant:acme", "kind": "promo.offer", "lane": "P3",
        "body": {"offer": f"of{n}", "title": f"offer {n}"}})
    assert status == 200, body


async def offers(conn) -> list[str]:
    """The offers ``conn`` gets, in order, until none comes for 1.5 s."""
    got = []
    with pytest.raises(asyncio.TimeoutError):
        while True:
            msg = await conn.receive(timeout=1.5)
            got.append(msg.body["offer"])
    return got


@aiotest(120)
async def test_a_members_devices_on_two_workers_share_one_offer_cap(tmp_path, prefix):
    node = Node(tmp_path, "node-o", prefix, env={
        "TILLWIRE_OFFERS_CAP_COUNT": "2", "TILLWIRE_OFFERS_QUIET_START": "00:00",
        "TILLWIRE_OFFERS_QUIET_END": "00:00"}).start()
    try:
        phone = await on_worker(node, "app1", worker=0, roles=("customer",), member="m-1")
        tablet = await on_worker(node, "app2", worker=1, roles=("customer",), member="m-1")
        other = await on_worker(node, "app3", worker=1, roles=("customer",), member="m-2")
        till = await on_worker(node, "till1", worker=0)
        await subscribed(prefix, "tenant:acme", 2)
        for n in range(3):
            await publish_offer(node, n)
        got = await asyncio.gather(*(offers(c) for c in (phone, tablet, other, till)))
        # One count for the member's two devices: both get the first two offers.
        assert got[0] == got[1] == ["of0", "of1"], got
        assert got[2] == ["of0", "of1"] and got[3] == ["of0", "of1", "of2"], got
        for conn in (phone, tablet, other, till):
            await conn.close()
    finally:
        assert node.stop() == 0


@aiotest(120)
async def test_a_members_offers_replayed_on_another_worker_keep_the_shared_cap(
        tmp_path, prefix):
    # Cap 2.  The member's tablet on worker 1 goes away after the first
    # offer; the second reaches the phone (worker 0): the member's count is
    # 2, so the third is capped.  The tablet comes back to worker 1 and
    # catches up from after the first offer: it gets the second (counted
    # already for the member) and not the third (worker 1's own counts
    # know nothing of the member: only the shared caps do).
    node = Node(tmp_path, "node-r", prefix, env={
        "TILLWIRE_OFFERS_CAP_COUNT": "2", "TILLWIRE_OFFERS_QUIET_START": "00:00",
        "TILLWIRE_OFFERS_QUIET_END": "00:00"}).start()
    try:
        phone = await on_worker(node, "app1", worker=0, roles=("customer",), member="m-1")
        tablet = await on_worker(node, "app2", worker=1, roles=("customer",), member="m-1")
        await subscribed(prefix, "tenant:acme", 2)
        await publish_offer(node, 0)
        assert await offers(tablet) == ["of0"]
        after_first = dict(tablet.session.channel_positions)
        await tablet.close()
        await publish_offer(node, 1)
        await publish_offer(node, 2)
        assert await offers(phone) == ["of0", "of1"]
        back = await on_worker(node, "app2", worker=1, roles=("customer",), member="m-1",
                               channels=after_first)
        assert await offers(back) == ["of1"]
        for conn in (phone, back):
            await conn.close()
    finally:
        assert node.stop() == 0


@aiotest(180)
async def test_a_ticket_from_a_till_on_one_worker_is_handled_by_staff_on_another(
        tmp_path, prefix):
    node = Node(tmp_path, "node-k", prefix,
                env={"TILLWIRE_TICKETS_ESCALATE_AFTER": "2"}).start()
    try:
        till = await on_worker(node, "till1", worker=0)
        staff = await on_worker(node, "staff1", worker=1, roles=("staff",))
        other = await on_worker(node, "staff2", worker=0, roles=("staff",))
        boss = await on_worker(node, "mgr1", worker=1, roles=("manager",))
        ack = await till.send("ticket.open", {"code": "E42", "text": "printer jam"},
                              "role:acme/s1/staff")
        opened = orjson.loads(ack.payload)
        tid = opened["ticket"]
        assert opened["recipients"] == 2, opened
        for conn in (staff, other):
            msg = await conn.receive(timeout=10)
            assert msg.kind == "ticket.open" and msg.body["ticket"] == tid
            await msg.ack()
        # Staff on the other worker than the ticket's: the first assignment wins.
        await staff.send("ticket.assign", {"ticket": tid}, "terminal:acme/till1")
        with pytest.raises(SendError) as taken:
            await other.send("ticket.assign", {"ticket": tid}, "terminal:acme/till1")
        assert "already assigned to staff1" in str(taken.value)
        await staff.send("ticket.reply", {"ticket": tid, "text": "on my way"},
                         "terminal:acme/till1")
        await staff.send("ticket.resolve", {"ticket": tid, "resolution": "paper refilled"},
                         "terminal:acme/till1")
        kinds = []
        while len(kinds) < 3:
            msg = await till.receive(timeout=10)
            kinds.append(msg.kind)
            await msg.ack()
        assert kinds == ["ticket.assign", "ticket.reply", "ticket.resolve"]
        for _ in range(50):              # (its record is written behind)
            status, doc = await node.admin("GET", f"/v1/tickets/acme/{tid}")
            if doc.get("status") == "resolved":
                break
            await asyncio.sleep(0.1)
        assert doc["status"] == "resolved" and doc["assignee"] == "staff1", doc
        # A ticket nobody takes escalates once to the store's manager, also
        # when the node restarts before it is due and both workers hold it.
        ack = await till.send("ticket.open", {"code": "E7"}, "role:acme/s1/staff")
        second = orjson.loads(ack.payload)["ticket"]
        for conn in (till, staff, other, boss):
            await conn.close()
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, node.stop) == 0
        before = len(node.server.log())
        node.server.start()
        node.wait_listening(range(2), since=before)
        boss = await connect(node.addr, "mgr1", roles=("manager",), timeout=5)
        escalations = []
        with pytest.raises(asyncio.TimeoutError):
            while True:
                msg = await boss.receive(timeout=5)
                await msg.ack()
                if msg.kind == "ticket.escalate":
                    escalations.append(msg.body["ticket"])
        assert escalations == [second], escalations
        await boss.close()
    finally:
        assert node.stop() == 0


@aiotest(120)
async def test_a_waiting_ticket_goes_to_staff_logging_in_on_another_worker_and_all_list_it(
        tmp_path, prefix):
    # No one on duty: the ticket waits.  Every worker hears of it (its record
    # was written, announced on @fleet), so the first staff to log in gets
    # it whichever worker the kernel gives it, and GET /v1/tickets answers
    # the same from every worker.  (Before, only the worker that took the
    # ticket knew it: staff on the other worker never got it, and half the
    # listings missed it.)
    node = Node(tmp_path, "node-w", prefix).start()
    try:
        till = await on_worker(node, "till1", worker=0)
        ack = await till.send("ticket.open", {"code": "E9", "text": "scale error"},
                              "role:acme/s1/staff")
        opened = orjson.loads(ack.payload)
        tid = opened["ticket"]
        assert opened["recipients"] == 0 and opened["waiting"] is True, opened
        for _ in range(100):          # (ten listings: the kernel spreads them over both)
            seen = []
            for _ in range(10):
                status, doc = await node.admin("GET", "/v1/tickets?tenant=acme&store=s1")
                assert status == 200, doc
                seen.append([t["ticket"] for t in doc["tickets"]])
            if seen == [[tid]] * 10:
                break
            await asyncio.sleep(0.1)
        assert seen == [[tid]] * 10, seen
        staff = await on_worker(node, "staff1", worker=1, roles=("staff",))
        msg = await staff.receive(timeout=10)
        assert msg.kind == "ticket.open" and msg.body["ticket"] == tid, msg
        await msg.ack()
        # It went to one staff once: a second staff logging in gets nothing.
        other = await on_worker(node, "staff2", worker=0, roles=("staff",))
        with pytest.raises(asyncio.TimeoutError):
            await other.receive(timeout=1.5)
        for conn in (till, staff, other):
            await conn.close()
    finally:
        assert node.stop() == 0


@aiotest(120)
async def test_a_login_on_another_worker_takes_the_session_over(tmp_path, prefix):
    node = Node(tmp_path, "node-t", prefix).start()
    try:
        first = await on_worker(node, "till7")
        second = await on_worker(node, "till7", avoid=first.info["worker"])
        with pytest.raises(SessionClosed) as closed:
            await first.receive(timeout=10)
        assert closed.value.code == Code.TAKEOVER
        # The new session is the one that gets the till's payment results.
        pay = await connect(node.addr, "pay1", roles=("backend",), timeout=5)
        await pay.send("payment.result", payment(1), "terminal:acme/till7")
        msg = await second.receive(timeout=10)
        assert msg.body["order"] == "o1"
        await msg.ack()
        await second.close()
        await pay.close()
    finally:
        assert node.stop() == 0


@aiotest(180)
async def test_a_worker_killed_is_restarted_and_its_tills_resume_elsewhere_losing_nothing(
        tmp_path, prefix):
    node = Node(tmp_path, "node-k", prefix).start()
    tills = SdkTills(node.addr, tmp_path)
    clients = tills.clients
    try:
        # At least eight tills, and until both workers hold some (the kernel picks).
        while len(clients) < 8 or {c.info["worker"] for c in clients} != {0, 1}:
            assert len(clients) < 40, "the kernel put every till on one worker"
            await tills.add()
        pay = await connect(node.addr, "pay1", roles=("backend",), timeout=5)
        sent = 0

        async def pay_round():
            nonlocal sent
            for i in range(len(clients)):
                await pay.send("payment.result", payment(sent), f"terminal:acme/till{i}")
                sent += 1

        for _ in range(5):
            await pay_round()
        victim = 1 - pay.info["worker"]            # (the payer stays connected)
        before = len(node.server.log())
        os.kill(node.pids()[victim], signal.SIGKILL)
        for _ in range(10):                         # while its tills move
            await pay_round()
            await asyncio.sleep(0.05)
        node.wait_listening([victim], since=before)    # the supervisor started it again
        assert re.search(rf"worker {victim} exited \(signal 9\)", node.server.log())
        await pay_round()
        await eventually(lambda: tills.received() == sent, timeout=30)
        # Every result once, each till's in the order sent.
        for mine in tills.got.values():
            assert mine == sorted(set(mine)) and len(mine) == sent // len(clients)
        await pay.close()
    finally:
        await tills.close()
        assert node.stop() == 0


@aiotest(120)
async def test_sigterm_drains_the_workers_one_at_a_time_each_with_its_audit_file(
        tmp_path, prefix):
    node = Node(tmp_path, "node-d", prefix).start()
    tills = [await on_worker(node, "till1", worker=0), await on_worker(node, "till2", worker=1)]
    node.server.proc.send_signal(signal.SIGTERM)
    # GOAWAY reaches the tills of worker 0 first, worker 1's only after.
    goaway = []
    for t in tills:
        with pytest.raises(SessionClosed):
            while True:
                await t.receive(timeout=30)
        assert t.goaway is not None and t.close_code == Code.SHUTDOWN, (t.goaway, t.close_code)
        goaway.append(time.monotonic())
    assert node.server.proc.wait(60) == 0
    log = node.server.log()
    stopped = [int(w) for w in re.findall(r"worker (\d+) stopped \(status 0\)", log)]
    assert stopped == [0, 1], log
    for w in (0, 1):
        audit = tmp_path / "node-d" / f"audit.w{w}.log"
        lines = [orjson.loads(line) for line in audit.read_text().splitlines()]
        assert any(e.get("event") == "drain" for e in lines), lines
        assert any(e.get("who") == f"terminal:acme/till{w + 1}" for e in lines), lines


@aiotest(180)
async def test_redis_restarted_mid_traffic_refuses_then_carries_on_losing_nothing(
        tmp_path, prefix):
    with PrivateRedis("--appendonly", "yes", "--appendfsync", "always") as redis:
        node = Node(tmp_path, "node-r", prefix, url=redis.url).start()
        tills = SdkTills(node.addr, tmp_path)
        clients = tills.clients
        try:
            for _ in range(4):
                await tills.add()
            pay = await connect(node.addr, "pay1", roles=("backend",), timeout=5)
            refused = []

            async def pay_one(n: int) -> None:
                # A backend's way: the same ref again until a SENDACK comes.
                while True:
                    try:
                        await pay.send("payment.result", payment(n),
                                       f"terminal:acme/till{n % len(clients)}",
                                       ref=n + 1, timeout=5)
                        return
                    except SendError as exc:
                        assert exc.code == Code.STORE_UNAVAILABLE, exc
                        refused.append(n)
                    except asyncio.TimeoutError:
                        pass
                    await asyncio.sleep(0.1)

            for n in range(20):
                await pay_one(n)
            redis.kill()
            status, body = await node.admin("GET", "/readyz")
            assert status == 503 and not body["ready"], body
            sending = asyncio.create_task(pay_one(20))       # refused while Redis is away
            await eventually(lambda: refused, timeout=15)
            redis.start()                                    # its AOF brings the data back
            await asyncio.wait_for(sending, 30)
            for n in range(21, 40):
                await pay_one(n)

            async def ready() -> bool:
                return (await node.admin("GET", "/readyz"))[0] == 200

            for _ in range(100):
                if await ready():
                    break
                await asyncio.sleep(0.2)
            assert await ready()
            await eventually(lambda: tills.received() >= 40, timeout=30)
            for i, mine in tills.got.items():
                assert mine == list(range(i, 40, len(clients))), (i, mine)
            await pay.close()
        finally:
            await tills.close()
            assert node.stop() == 0


@aiotest(180)
async def test_a_rolling_restart_of_one_node_under_p0_traffic_loses_nothing(tmp_path, prefix):
    a = Node(tmp_path, "node-a", prefix).start()
    b = Node(tmp_path, "node-b", prefix, workers=1).start()
    tills = SdkTills(a.addr, tmp_path)
    clients = tills.clients
    try:
        for _ in range(6):
            await tills.add()
        pay = await connect(b.addr, "pay1", roles=("backend",), timeout=5)   # on node B
        sent = 0
        stop = asyncio.Event()

        async def pay_loop():
            nonlocal sent
            while not stop.is_set() and sent < 600:
                await pay.send("payment.result", payment(sent),
                               f"terminal:acme/till{sent % len(clients)}", ref=sent + 1)
                sent += 1
                await asyncio.sleep(0.01)

        paying = asyncio.create_task(pay_loop())
        await asyncio.sleep(0.5)
        # Node A drains its workers one at a time and stops; its tills wait
        # (their address is node A's) while payments go on being stored.
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, a.stop) == 0
        await asyncio.sleep(0.5)
        before = len(a.server.log())
        a.server.start()                             # the new version comes up
        a.wait_listening(range(2), since=before)
        await asyncio.sleep(1.0)
        stop.set()
        await paying
        await eventually(lambda: tills.received() == sent, timeout=30)
        for i, mine in tills.got.items():
            assert mine == list(range(i, sent, len(clients))), (i, mine[:20])
        assert all(c.connects >= 2 for c in clients)   # each moved across the restart
        await pay.close()
    finally:
        await tills.close()
        assert a.stop() == 0
        assert b.stop() == 0


def test_more_than_one_worker_without_redis_is_refused_naming_the_key(tmp_path):
    env = {**os.environ, "TILLWIRE_SECRET": SECRET}
    done = subprocess.run([sys.executable, "-m", "tillwire", "serve", "--workers", "2",
                           "--data-dir", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2
    assert "server.workers" in done.stderr and "redis.url" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_node_whose_workers_cannot_start_stops_with_one_line_naming_redis(tmp_path):
    from support import free_port

    env = {**os.environ, "TILLWIRE_SECRET": SECRET}
    nowhere = f"redis://127.0.0.1:{free_port()}/0"          # nothing listens there
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "tillwire", "serve", "--workers", "2",
                           "--redis", nowhere, "--port", str(free_port()),
                           "--admin-port", "0", "--data-dir", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - started < 30
    assert "redis.url" in done.stderr and "could not start" in done.stderr, done.stderr



def test_workers_end_with_their_supervisor_and_a_ctrl_c_reaches_the_supervisor_only(
        tmp_path, prefix):
    # SIGKILL of the supervisor: its workers stop rather than serve on (a
    # restarted node would find the port taken by orphans).
    node = Node(tmp_path, "node-p", prefix).start()
    pids = list(node.pids().values())
    node.server.kill()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") and
                                              not _zombie(p) for p in pids):
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{p}") and not _zombie(p) for p in pids)
    # Ctrl-C at a terminal signals the foreground process group: the workers
    # are in groups of their own (not the supervisor's), so only the
    # supervisor gets it, and it drains them one at a time.
    node = Node(tmp_path, "node-q", prefix).start()
    pids = node.pids()
    group = os.getpgid(node.server.proc.pid)
    assert all(os.getpgid(p) == p != group for p in pids.values())
    node.server.proc.send_signal(signal.SIGINT)
    assert node.server.proc.wait(60) == 0
    stopped = [int(w) for w in re.findall(r"worker (\d+) stopped \(status 0\)",
                                          node.server.log())]
    assert stopped == [0, 1]


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return True
