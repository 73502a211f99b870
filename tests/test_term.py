"""``tillwire term`` as a real subprocess against a real server."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from support import ServerProcess, aiotest, connect, token


@pytest.mark.slow
@aiotest(timeout=90)
async def test_term_shows_messages_by_lane_and_sends_tickets(tmp_path):
    with ServerProcess(str(tmp_path)) as server:
        staff = await connect(server.addr, "h1", store="s1", roles=("staff",))
        be = await connect(server.addr, "hq", store="hq", roles=("backend",))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tillwire", "term", "--port", str(server.port),
            "--token", token("till1", store="s1"), "--no-colour",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"connected as terminal:acme/till1" in line
        await be.send("payment.result", {"order": "o1", "status": "paid"}, "terminal:acme/till1")
        shown = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert b"[P0] payment.result via inbox" in shown and b'"order":"o1"' in shown
        proc.stdin.write(b"ack\nticket E42 printer jam\n"
                         b"send payment.result terminal:acme/t2 "
                         b"'{\"order\": \"o\", \"status\": \"paid\"}'\n")
        await proc.stdin.drain()
        assert b"acked 1" in await asyncio.wait_for(proc.stdout.readline(), 10)
        assert b"ticket sent" in await asyncio.wait_for(proc.stdout.readline(), 10)
        refused = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert b"refused" in refused and b"FORBIDDEN" in refused
        msg = await staff.receive(timeout=5)
        assert msg.kind == "ticket.open" and msg.body["code"] == "E42"
        proc.stdin.write(b"quit\n")
        await proc.stdin.drain()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
