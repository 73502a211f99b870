"""Reliable delivery end to end: durable inboxes, acks, retransmits, resume,
sender dedup, channel history and snapshots, dead letters, traces, receipts.

The crash tests run ``tillwire serve`` as a real subprocess on the SQLite
store and kill it with SIGKILL while messages flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time

import orjson
import pytest

from linkem import Link
from failing import Failing
from support import (
    ServerProcess, aiotest, connect, eventually, make_config, provision, receive_orders,
    start_node,
)
from tillwire.client.connection import Connection, SendError
from tillwire.core.codes import Code, Flag, Lane, ReceiptStatus
from tillwire.core.errors import SessionClosed
from tillwire.server.connection import RESUMING
from tillwire.server.main import make_store
from tillwire.server.store import NewMessage


class Till:
    """A till that remembers its positions across connections (as the SDK's
    state file does) and records every payment it processes."""

    def __init__(self, addr, name: str) -> None:
        self.addr = addr
        self.name = name
        self.epoch = 0
        self.processed = [0, 0]
        self.seen: list[int] = []        # message numbers processed, in order
        self.seqs: list[int] = []        # their inbox seqs
        self.conn: Connection | None = None

    async def open(self) -> Connection:
        self.conn = await connect(self.addr, self.name, epoch=self.epoch,
                                  p0=self.processed[0], p1=self.processed[1])
        if self.conn.welcome.epoch != self.epoch:
            self.epoch = self.conn.welcome.epoch
            self.processed = [0, 0]
        return self.conn

    async def pump(self, until: float) -> None:
        """Process messages until the connection ends or ``until`` (loop time)."""
        conn = self.conn
        loop = asyncio.get_running_loop()
        try:
            while loop.time() < until:
                try:
                    msg = await conn.receive(timeout=max(0.01, until - loop.time()))
                except asyncio.TimeoutError:
                    return
                if msg.channel is not None:
                    continue
                self.seen.append(msg.body["n"])
                self.seqs.append(msg.seq)
                self.processed[msg.lane] = msg.seq
                await msg.ack()
        except SessionClosed:
            return


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def open_until_up(till: Till, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await till.open()
            return
        except (OSError, SessionClosed, asyncio.TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


class Payer:
    """A backend that retries every unacked payment with the same ref."""

    def __init__(self, addr) -> None:
        self.addr = addr
        self.conn: Connection | None = None
        self.acked: dict[int, int] = {}
        self.duplicates = 0
        self._lock = asyncio.Lock()      # one (re)connection at a time, shared by all sends

    async def ensure(self) -> Connection:
        async with self._lock:
            while self.conn is None or not self.conn.is_open:
                try:
                    self.conn = await connect(self.addr, "payer", store="hq",
                                              roles=("backend",))
                except (OSError, SessionClosed, asyncio.TimeoutError):
                    await asyncio.sleep(0.1)
            return self.conn

    async def pay(self, n: int, terminal: str) -> None:
        while n not in self.acked:
            conn = await self.ensure()
            try:
                ack = await conn.send("payment.result", {"order": "o1", "n": n, "status": "paid"},
                                      f"terminal:acme/{terminal}", ref=n + 1, timeout=3)
            except (SessionClosed, asyncio.TimeoutError, ConnectionError):
                await asyncio.sleep(0.05)
                continue
            if ack.flags & Flag.RETRANSMIT:
                self.duplicates += 1
            self.acked[n] = ack.msg_id


@pytest.mark.slow
@aiotest(timeout=180)
async def test_kill_9_while_payments_flow_loses_nothing(tmp_path):
    """Every payment whose sender got a SENDACK is delivered after a SIGKILL and
    restart, exactly once after the till's dedup, in inbox order."""
    server = ServerProcess(str(tmp_path), env={"TILLWIRE_STORE_SYNCHRONOUS": "FULL",
                                               "TILLWIRE_DELIVERY_RETRANSMIT_INITIAL": "1"})
    server.start()
    try:
        tills = [Till(server.addr, f"t{i}") for i in range(8)]
        for t in tills:
            await t.open()
        payer = Payer(server.addr)
        total = 600
        window = asyncio.Semaphore(20)       # a payment backend with 20 requests in flight

        async def pay(n: int) -> None:
            async with window:
                await payer.pay(n, f"t{n % 8}")

        sent = asyncio.gather(*[pay(n) for n in range(total)])
        loop = asyncio.get_running_loop()
        pumps = [asyncio.ensure_future(t.pump(loop.time() + 60)) for t in tills]
        await eventually(lambda: len(payer.acked) >= total // 5, timeout=60, interval=0.001)
        with open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children") as f:
            writers = [int(pid) for pid in f.read().split()]    # the store's writer process
        assert writers
        server.kill()
        # It dies with the server: nothing is left holding the database.
        await eventually(lambda: not any(_running(pid) for pid in writers), timeout=10)
        acked_before_kill = len(payer.acked)
        await asyncio.sleep(0.3)
        server.start()
        for t in tills:                      # the tills reconnect and resume
            await open_until_up(t)
        pumps = [asyncio.ensure_future(t.pump(loop.time() + 60)) for t in tills]
        await asyncio.wait_for(sent, 90)
        await eventually(lambda: sum(len(t.seen) for t in tills) >= total, timeout=60)
        await asyncio.sleep(0.5)
        for p in pumps:
            p.cancel()
        assert acked_before_kill < total
        delivered = [n for t in tills for n in t.seen]
        assert sorted(delivered) == list(range(total))        # all, and each once
        for t in tills:
            assert t.seqs == sorted(t.seqs)                    # in inbox order
            assert len(set(t.seqs)) == len(t.seqs)
            assert all(n % 8 == int(t.name[1:]) for n in t.seen)
        assert len(payer.acked) == total
    finally:
        server.stop()


@aiotest(timeout=60)
async def test_a_dead_store_writer_stops_the_server_with_status_1_and_loses_nothing(tmp_path):
    """If the SQLite writer process dies, the server answers STORE_UNAVAILABLE,
    drains and exits with status 1 (for its supervisor to restart it); after
    the restart every acked payment result is delivered."""
    server = ServerProcess(str(tmp_path)).start()
    try:
        await (await connect(server.addr, "t1")).close()       # (a till the server knows)
        be = await connect(server.addr, "pay", store="hq", roles=("backend",))
        acked = [await be.send("payment.result", {"order": f"o{n}", "status": "paid"},
                               "terminal:acme/t1", ref=n + 1) for n in range(5)]
        with open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children") as f:
            [writer] = [int(pid) for pid in f.read().split()]
        os.kill(writer, signal.SIGKILL)
        # Not acked: refused, or the connection is going away with the node.
        with pytest.raises((SendError, SessionClosed)) as refused:
            await be.send("payment.result", {"order": "o5", "status": "paid"},
                          "terminal:acme/t1", ref=6, timeout=5)
        if isinstance(refused.value, SendError):
            assert refused.value.code == Code.STORE_UNAVAILABLE
        assert await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 20) == 1
        assert "store writer process ended unexpectedly" in server.log()
        server.start()
        till = await connect(server.addr, "t1")
        got = []
        for _ in acked:
            msg = await till.receive(timeout=5)
            got.append(msg.id)
            await msg.ack()
        assert got == [a.msg_id for a in acked]
        await till.close()
    finally:
        server.stop()


@aiotest(timeout=120)
async def test_random_disconnects_and_resume_lose_and_reorder_nothing():
    node = await start_node(**{"delivery.retransmit_initial": 0.3})
    rnd = random.Random(5)
    try:
        tills = [Till(node.addresses[0], f"t{i}") for i in range(10)]
        for t in tills:
            await t.open()
        payer = Payer(node.addresses[0])
        total = 1000
        sent = asyncio.ensure_future(asyncio.gather(
            *[payer.pay(n, f"t{n % 10}") for n in range(total)]))
        loop = asyncio.get_running_loop()
        started = loop.time()
        while not sent.done() or sum(len(t.seen) for t in tills) < total:
            # Each round: every till processes for a while, some crash (abort:
            # their unsent acks are lost) and come back with their positions.
            await asyncio.gather(*[t.pump(loop.time() + rnd.uniform(0.02, 0.15)) for t in tills])
            for t in rnd.sample(tills, 3):
                t.conn.abort()
                await t.conn.closed.wait()
                await t.open()
            assert loop.time() - started < 100, "deliveries stalled"
        delivered = sorted(n for t in tills for n in t.seen)
        assert delivered == list(range(total))
        for t in tills:
            assert t.seqs == sorted(t.seqs) and len(set(t.seqs)) == len(t.seqs)
    finally:
        await node.stop()


@aiotest(timeout=120)
async def test_links_that_go_silent_lose_and_reorder_nothing():
    # Store links fail silently: the path goes dead mid-stream with both
    # sockets open; the server's writes and the till's acks vanish and nobody
    # is told.  The till gives up on the connection, comes back over a new
    # path, takes its session over and resumes: every payment result is
    # processed once, in order, and the server lets go of the dead sockets.
    node = await start_node(**{"delivery.retransmit_initial": 0.3})
    await provision(node, "t1")          # (paid from the start: known before it logs in)
    rnd = random.Random(11)
    links = []
    sending = None
    try:
        till = Till(None, "t1")
        payer = Payer(node.addresses[0])
        total = 300

        async def pay_in_order() -> None:
            for n in range(total):
                await payer.pay(n, "t1")
                await asyncio.sleep(0.004)      # a steady stream over a few seconds

        sending = asyncio.ensure_future(pay_in_order())
        loop = asyncio.get_running_loop()
        started = loop.time()
        cuts = 0
        while len(till.seen) < total:
            link = await Link(node.addresses[0], rate=200_000, delay=0.005).start()
            links.append(link)
            till.addr = link.address
            await till.open()
            await till.pump(loop.time() + rnd.uniform(0.1, 0.3))
            if len(till.seen) < total:
                link.blackhole()
                till.conn.abort()        # its own timeout; the abort reaches nobody
                cuts += 1
            assert loop.time() - started < 100, "deliveries stalled"
        await sending
        assert cuts >= 2
        assert till.seen == list(range(total))
        assert till.seqs == list(range(1, total + 1))
        assert node.counters.takeovers == cuts
        # Results were lost on the silent links (written, or acked unheard)
        # and went again over the new ones.
        assert node.counters.lane_frames_out[0] > total
        # The sessions on silent links were closed by the takeovers and their
        # sockets cut when they did not read the CLOSE: only the last is left.
        await eventually(lambda: node.connection_count == 2, timeout=10)   # till and payer
    finally:
        if sending is not None:
            sending.cancel()
        await node.stop()
        for link in links:
            await link.close()


@aiotest()
async def test_unacked_message_is_retransmitted_flagged_while_connected():
    node = await start_node(**{"delivery.retransmit_initial": 0.2})
    try:
        till = await connect(node, "t1")
        be = await connect(node, "pay", store="hq", roles=("backend",))
        await be.send("payment.result", {"order": "o1", "n": 1, "status": "paid"}, "terminal:acme/t1")
        first = await till.receive(timeout=3)
        assert not first.duplicate
        # Not acked: the server sends it again, flagged RETRANSMIT; the till's
        # session recognises the seq it already holds and drops the copy.
        await eventually(lambda: node.counters.retransmits >= 1, timeout=3)
        await eventually(lambda: till.session.duplicates >= 1, timeout=3)
        assert till._inbox.empty()
        # Once the till acks, nothing more is retransmitted.
        await first.ack()
        await asyncio.sleep(0.6)
        retransmits = node.counters.retransmits
        await asyncio.sleep(0.6)
        assert node.counters.retransmits == retransmits
    finally:
        await node.stop()


@aiotest()
async def test_a_reused_inbox_state_retransmits_to_its_new_terminal_only():
    # The node pools the inbox state (and retransmit timer) of a fully acked
    # inbox and hands it to the next terminal that gets a message: its
    # positions and its timer must then be that terminal's alone.
    node = await start_node(**{"delivery.retransmit_initial": 0.2})
    try:
        t1 = await connect(node, "t1")
        t2 = await connect(node, "t2")
        be = await connect(node, "pay", store="hq", roles=("backend",))
        for n in range(3):
            await be.send("payment.result", {"order": f"o{n}", "n": n, "status": "paid"},
                          "terminal:acme/t1")
            msg = await t1.receive(timeout=3)
            assert msg.seq == n + 1 and not msg.duplicate
            await msg.ack()
            await eventually(lambda: node.hub.sessions["terminal:acme/t1"].inbox is None,
                             timeout=3)
        pooled = node.delivery._inbox_pool[-1]
        assert pooled.timer is not None and pooled.timer.arg is None and not pooled.timer.scheduled

        await be.send("payment.result", {"order": "o9", "n": 9, "status": "paid"},
                      "terminal:acme/t2")
        first = await t2.receive(timeout=3)
        server_t2 = node.hub.sessions["terminal:acme/t2"]
        assert server_t2.inbox is pooled and pooled.timer.arg is server_t2
        assert first.seq == 1 and pooled.cursor == [2, 1] and pooled.last == [1, 0]
        # t2 does not ack: it gets the copy, t1 nothing.
        await eventually(lambda: t2.session.duplicates >= 1, timeout=3)
        assert t1._inbox.empty() and t1.session.duplicates == 0
        await first.ack()
        await eventually(lambda: server_t2.inbox is None, timeout=3)
        assert t1.is_open and t2.is_open
    finally:
        await node.stop()


async def _stored_elsewhere(store, till: str, orders) -> list[tuple]:
    """Payment results for ``till`` stored as another worker stores them
    (not through this node): each as the notice that worker sends, (terminal,
    lane, seq, msg_id, kind, body, created)."""
    notices = []
    for n in orders:
        now = time.time()
        body = orjson.dumps({"order": f"o{n}", "status": "paid"})
        msg = NewMessage("acme", "admin:hq", 0, int(Lane.P0), "payment.result", till, body,
                         now, now + 3600)
        (accepted,) = await store.accept_many([(msg, [till])])
        notices.append((till, int(Lane.P0), accepted.seqs[till], accepted.msg_id,
                        "payment.result", body, now))
    return notices


@contextlib.asynccontextmanager
async def _till_on_a_counting_store(early_wait: float | None = None, **overrides):
    """A node on a store that counts its calls (Failing, nothing broken) and
    till t1 logged in, its session settled; with ``early_wait``,
    delivery.EARLY_WAIT is that meanwhile.  Yields (node, store, till)."""
    from tillwire.server import delivery

    cfg = make_config(**overrides)
    store = Failing(make_store(cfg))
    node = await start_node(cfg, store)
    saved = delivery.EARLY_WAIT
    if early_wait is not None:
        delivery.EARLY_WAIT = early_wait
    try:
        till = await connect(node, "t1")
        await eventually(lambda: "terminal:acme/t1" in node.hub.sessions
                         and node.hub.sessions["terminal:acme/t1"].inbox is not RESUMING)
        yield node, store, till
    finally:
        delivery.EARLY_WAIT = saved
        await node.stop()


@aiotest()
async def test_a_notice_overtaken_by_a_later_one_is_waited_for_not_read_back():
    # Two workers store results for one till; the later one's notice arrives
    # first.  It waits for the gap to fill; both go out from the notices, in
    # seq order, without a read of the store.
    async with _till_on_a_counting_store() as (node, store, till):
        first, second = await _stored_elsewhere(store, "terminal:acme/t1", (1, 2))
        reads = store.calls["inbox"]
        node.delivery.deliver_notified([second])
        await asyncio.sleep(0.005)
        node.delivery.deliver_notified([first])
        assert await receive_orders(till, 2) == [1, 2]
        assert store.calls["inbox"] == reads


@aiotest()
async def test_a_gap_that_does_not_fill_is_read_from_the_store_after_the_wait():
    # The notice of the first result is lost: the second waits EARLY_WAIT,
    # then the pump reads both from the store, in seq order.
    async with _till_on_a_counting_store() as (node, store, till):
        _, second, third = await _stored_elsewhere(store, "terminal:acme/t1", (1, 2, 3))
        reads = store.calls["inbox"]
        node.delivery.deliver_notified([second])
        node.delivery.deliver_notified([third])
        assert await receive_orders(till, 3) == [1, 2, 3]
        assert store.calls["inbox"] > reads
        with pytest.raises(asyncio.TimeoutError):
            await till.receive(timeout=0.3)           # once each


@aiotest()
async def test_early_messages_past_the_wait_limit_go_to_the_pump_at_once():
    # More results past a gap than one lane keeps waiting: the pump reads
    # them all at once, in order, without waiting out EARLY_WAIT.
    from tillwire.server.delivery import EARLY_MAX

    async with _till_on_a_counting_store() as (node, store, till):
        notices = await _stored_elsewhere(store, "terminal:acme/t1", range(1, EARLY_MAX + 3))
        reads = store.calls["inbox"]
        for notice in notices[1:]:
            node.delivery.deliver_notified([notice])
        inbox = node.hub.sessions["terminal:acme/t1"].inbox
        assert store.calls["inbox"] > reads or inbox.pumping[0]
        assert await receive_orders(till, EARLY_MAX + 2) == list(range(1, EARLY_MAX + 3))


@aiotest()
async def test_messages_past_a_full_window_are_not_held_as_early():
    # The till's window is full: the message at the cursor waits in the
    # store (nothing is missing), and the ones after it come in order.
    # They must not wait EARLY_WAIT as if a notice were missing: once the
    # till acks, the pump reads them at once.  (EARLY_WAIT is 30 s here: a
    # stall would be plain to see.)
    async with _till_on_a_counting_store(30.0, **{"delivery.inflight": 4}) as (node, store, till):
        notices = await _stored_elsewhere(store, "terminal:acme/t1", range(1, 9))
        inbox = None
        for notice in notices:
            node.delivery.deliver_notified([notice])
            inbox = node.hub.sessions["terminal:acme/t1"].inbox
            await eventually(lambda: not inbox.pumping[0])    # (notices come one by one)
        got = await asyncio.wait_for(receive_orders(till, 8), 3)
        assert got == list(range(1, 9))


@aiotest()
async def test_a_retried_pump_leaves_no_early_message_behind():
    # A pump's store read fails; while its retry waits, later results'
    # notices come and wait as early.  The retry reads them with the rest
    # (as any pump does): none may stay waiting, or the acks do not pump
    # what the full window left in the store until EARLY_WAIT ran out.
    # (EARLY_WAIT is 30 s here: a stall would be plain to see.)
    async with _till_on_a_counting_store(30.0, **{"delivery.inflight": 3}) as (node, store, till):
        notices = await _stored_elsewhere(store, "terminal:acme/t1", range(1, 6))
        store.fail("inbox", 1)
        node.delivery.notified("terminal:acme/t1", 0, 2)       # (its read fails)
        conn = node.hub.sessions["terminal:acme/t1"]
        inbox = conn.inbox
        await eventually(lambda: store.refused and not inbox.pumping[0])
        node.delivery.deliver_notified([notices[2]])           # 3 and 5 wait as early
        node.delivery.deliver_notified([notices[4]])
        # The retry reads 1-3 (the window: 3), and knows 4 and 5 are stored.
        await eventually(lambda: inbox.cursor[0] == 4 and not inbox.pumping[0])
        got = await asyncio.wait_for(receive_orders(till, 5), 3)
        assert got == [1, 2, 3, 4, 5]


@aiotest()
async def test_offline_terminal_gets_its_messages_on_return_in_order():
    node = await start_node()
    try:
        be = await connect(node, "pay", store="hq", roles=("backend",))
        await provision(node, "never-seen-yet")     # (known: provisioned, never logged in)
        ids = []
        for i in range(20):
            ack = await be.send("payment.result" if i % 2 else "order.event",
                                {"n": i, "order": f"o{i}", "status": "paid", "channel": "mall",
                                 "event": "created"},
                                "terminal:acme/never-seen-yet")
            ids.append(ack.msg_id)
        till = await connect(node, "never-seen-yet")
        got = {Lane.P0: [], Lane.P1: []}
        for _ in range(20):
            msg = await till.receive(timeout=3)
            got[msg.lane].append(msg.seq)
            await msg.ack()
        # Two inboxes, each in seq order; P0 may overtake P1.
        assert got[Lane.P0] == list(range(1, 11)) and got[Lane.P1] == list(range(1, 11))
    finally:
        await node.stop()


@aiotest()
async def test_sender_dedup_window_returns_the_first_message_id():
    node = await start_node()
    try:
        be = await connect(node, "pay", store="hq", roles=("backend",))
        till = await connect(node, "t1")
        first = await be.send("payment.result", {"order": "o1", "n": 1, "status": "paid"}, "terminal:acme/t1", ref=777)
        second = await be.send("payment.result", {"order": "o1", "n": 1, "status": "paid"}, "terminal:acme/t1", ref=777)
        assert not first.flags & Flag.RETRANSMIT
        assert second.flags & Flag.RETRANSMIT and second.msg_id == first.msg_id
        msg = await till.receive(timeout=3)
        await msg.ack()
        with pytest.raises(asyncio.TimeoutError):
            await till.receive(timeout=0.3)           # delivered once
        assert node.counters.duplicates == 1
    finally:
        await node.stop()


@aiotest()
async def test_group_message_expands_to_registered_members_connected_or_not():
    node = await start_node()
    try:
        staff = [await connect(node, f"h{i}", store="s1", roles=("staff",)) for i in range(3)]
        await staff[2].close()                       # registered, now offline
        be = await connect(node, "hq", store="hq", roles=("backend",))
        ack = await be.send("ticket.open", {"code": "E7"}, "role:acme/s1/staff")
        assert orjson.loads(ack.payload)["recipients"] == 3     # (and the ticket's id)
        for conn in staff[:2]:
            msg = await conn.receive(timeout=3)
            assert msg.kind == "ticket.open" and msg.id == ack.msg_id
        back = await connect(node, "h2", store="s1", roles=("staff",))
        msg = await back.receive(timeout=3)
        assert msg.id == ack.msg_id
    finally:
        await node.stop()


@aiotest()
async def test_trace_receipts_nack_and_dead_letters():
    node = await start_node()
    try:
        be = await connect(node, "pay", store="hq", roles=("backend",))
        till = await connect(node, "t1")
        ack = await be.send("payment.result", {"order": "o1", "n": 1, "status": "paid"}, "terminal:acme/t1", receipt=True)
        msg = await till.receive(timeout=3)
        # Handed to the till: DELIVERED (once, when the delivery batch is written).
        receipt = await asyncio.wait_for(be.receipts.get(), 3)
        assert receipt.msg_id == ack.msg_id and receipt.code == ReceiptStatus.DELIVERED
        assert receipt.to == "terminal:acme/t1" and receipt.ref == ack.ref
        await msg.ack()
        receipt = await asyncio.wait_for(be.receipts.get(), 3)
        assert receipt.msg_id == ack.msg_id and receipt.code == ReceiptStatus.ACKED
        assert receipt.to == "terminal:acme/t1"
        await node.delivery.flush_batches()
        trace = await node.store.trace(ack.msg_id)
        assert trace.recipients[0].state == "acked"
        assert trace.recipients[0].delivered_at is not None

        # A till that refuses a message for good: dead letter + REJECTED receipt.
        ack2 = await be.send("payment.result", {"order": "o1", "n": 2, "status": "paid"}, "terminal:acme/t1", receipt=True)
        msg2 = await till.receive(timeout=3)
        receipt = await asyncio.wait_for(be.receipts.get(), 3)
        assert receipt.code == ReceiptStatus.DELIVERED and receipt.msg_id == ack2.msg_id
        till.nack(msg2.lane, msg2.seq, code=7, reason="unknown order")
        receipt = await asyncio.wait_for(be.receipts.get(), 3)
        assert receipt.code == ReceiptStatus.REJECTED and receipt.msg_id == ack2.msg_id
        dead = await node.store.dead_letters("acme", 10)
        assert [d.msg_id for d in dead] == [ack2.msg_id] and "unknown order" in dead[0].reason

        # An offline till's message expires: dead letter + EXPIRED receipt.
        await provision(node, "offline")
        ack3 = await be.send("payment.result", {"order": "o1", "n": 3, "status": "paid"}, "terminal:acme/offline", ttl=0.1,
                             receipt=True)
        await asyncio.sleep(0.2)
        for dead in await node.store.expire(time.time()):
            node.delivery.send_receipt(dead.sender, dead.ref, dead.msg_id,
                                       ReceiptStatus.EXPIRED, dead.terminal)
        receipt = await asyncio.wait_for(be.receipts.get(), 3)
        assert receipt.code == ReceiptStatus.EXPIRED and receipt.msg_id == ack3.msg_id
        trace = await node.store.trace(ack3.msg_id)
        assert trace.recipients[0].state == "expired"
        assert be.receipts.empty()       # no DELIVERED for what never left the store
    finally:
        await node.stop()


# -- channel history -----------------------------------------------------------------


async def _prices(be, store: str, updates):
    for sku, version in updates:
        await be.send("price.update", {"sku": sku, "price": f"{version}.00", "version": version},
                      f"store:acme/{store}")


async def _drain(conn, wait: float = 0.3) -> list:
    out = []
    while True:
        try:
            out.append(await conn.receive(timeout=wait))
        except asyncio.TimeoutError:
            return out


@aiotest()
async def test_resume_inside_window_replays_missed_p2_conflated():
    node = await start_node()
    try:
        be = await connect(node, "hq", store="hq", roles=("backend",))
        till = await connect(node, "t1", store="s1")
        await _prices(be, "s1", [("A", 1)])
        await till.receive(timeout=3)
        positions = dict(till.session.channel_positions)
        await till.close()
        await _prices(be, "s1", [("A", 2), ("B", 1), ("A", 3)])
        back = await connect(node, "t1", store="s1", channels=positions)
        got = [(m.body["sku"], m.body["version"], m.duplicate) for m in await _drain(back)]
        assert got == [("B", 1, True), ("A", 3, True)]      # A2 conflated away
    finally:
        await node.stop()


@aiotest()
async def test_resume_outside_window_gets_resync_and_snapshot():
    node = await start_node(**{"history.max_messages": 3})
    try:
        be = await connect(node, "hq", store="hq", roles=("backend",))
        till = await connect(node, "t1", store="s1")
        await _prices(be, "s1", [("A", 1)])
        await till.receive(timeout=3)
        positions = dict(till.session.channel_positions)
        await till.close()
        await _prices(be, "s1", [("A", 2), ("B", 1), ("C", 1), ("D", 1), ("B", 2)])
        await be.send("promo.offer", {"offer": "promo", "title": "Deal", "id": "gone"}, "store:acme/s1")
        back = await connect(node, "t1", store="s1", channels=positions)
        got = sorted((m.body["sku"], m.body["version"]) for m in await _drain(back)
                     if m.kind == "price.update")
        # The snapshot: the newest value of every key.
        assert got == [("A", 2), ("B", 2), ("C", 1), ("D", 1)]
    finally:
        await node.stop()


@aiotest()
async def test_p3_history_replayed_inside_window_and_expired_ones_skipped():
    node = await start_node()
    try:
        be = await connect(node, "hq", store="hq", roles=("backend",))
        till = await connect(node, "t1", store="s1")
        await be.send("promo.offer", {"offer": "promo", "title": "Deal", "id": 0}, "store:acme/s1")
        await till.receive(timeout=3)
        positions = dict(till.session.channel_positions)
        await till.close()
        await be.send("promo.offer", {"offer": "promo", "title": "Deal", "id": "short"}, "store:acme/s1", ttl=0.1)
        await be.send("promo.offer", {"offer": "promo", "title": "Deal", "id": "long"}, "store:acme/s1", ttl=60)
        await asyncio.sleep(0.2)
        back = await connect(node, "t1", store="s1", channels=positions)
        assert [m.body["id"] for m in await _drain(back)] == ["long"]
    finally:
        await node.stop()


@pytest.mark.slow
@aiotest(timeout=90)
async def test_channel_history_and_last_values_survive_a_restart(tmp_path):
    server = ServerProcess(str(tmp_path))
    server.start()
    try:
        be = await connect(server.addr, "hq", store="hq", roles=("backend",))
        till = await connect(server.addr, "t1", store="s1")
        await _prices(be, "s1", [("A", 1), ("B", 1)])
        for _ in range(2):
            await till.receive(timeout=3)
        positions = dict(till.session.channel_positions)
        await _prices(be, "s1", [("A", 2)])
        await asyncio.sleep(0.3)           # the stream write is group-committed
        server.stop()
        server.start()
        back = await connect(server.addr, "t1", store="s1", channels=positions)
        got = [(m.body["sku"], m.body["version"]) for m in await _drain(back)]
        assert got == [("A", 2)]          # same epoch: replayed from the kept history
        fresh = await connect(server.addr, "t2", store="s1")
        items, end = await fresh.history("store:acme/s1", Lane.P2)
        snap = sorted((orjson.loads(i.payload)["sku"], orjson.loads(i.payload)["version"])
                      for i in items)
        assert snap == [("A", 2), ("B", 1)] and end.count == 2
    finally:
        server.stop()
