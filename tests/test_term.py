"""``tillwire term`` as a real subprocess against a real server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
import trustme

from support import ServerProcess, aiotest, connect, eventually, free_port, token
from tillwire.server.config import NON_CONFIG_ENV


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
        opened = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert b"-- ticket T-" in opened and b"sent to 1 staff" in opened     # id and reach
        refused = await asyncio.wait_for(proc.stdout.readline(), 10)
        assert b"refused" in refused and b"FORBIDDEN" in refused
        msg = await staff.receive(timeout=5)
        assert msg.kind == "ticket.open" and msg.body["code"] == "E42"
        proc.stdin.write(b"quit\n")
        await proc.stdin.drain()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


# -- what a person sees: config, failures, disconnects, staff commands ---------------------


def cli_env(**extra) -> dict:
    """This environment without Tillwire's configuration variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TILLWIRE_") or k in NON_CONFIG_ENV}
    env.update(extra)
    return env


async def start_term(*args, env=None):
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tillwire", "term", "--no-colour", *args,
        env=env or cli_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)


async def line_with(stream, text: bytes, timeout: float = 15) -> bytes:
    """The next line of ``stream`` holding ``text`` (lines before it are skipped)."""
    async def find():
        seen = []
        while True:
            line = await stream.readline()
            assert line, f"ended before {text!r}; saw {seen!r}"
            seen.append(line)
            if text in line:
                return line
    return await asyncio.wait_for(find(), timeout)


async def typed(proc, line: str) -> None:
    proc.stdin.write(line.encode() + b"\n")
    await proc.stdin.drain()


async def quit_term(proc) -> int:
    await typed(proc, "quit")
    return await asyncio.wait_for(proc.wait(), 10)


@pytest.mark.slow
@aiotest(timeout=120)
async def test_send_and_term_read_the_config_file_and_environment_like_serve(tmp_path):
    admin_port = free_port()
    with ServerProcess(str(tmp_path / "srv"), admin_port=admin_port,
                       env={"TILLWIRE_ADMIN_TOKEN": "adm-token-1"}) as server:
        config = tmp_path / "tillwire.toml"
        config.write_text(f'[server]\nport = {server.port}\n\n[admin]\nport = {admin_port}\n\n'
                          '[[admin.tokens]]\nname = "ops"\ntoken = "adm-token-1"\n'
                          'tenants = ["*"]\n')
        # term: the port from --config, then from TILLWIRE_SERVER_PORT (no --port either time)
        for args, env in ((("--config", str(config)), cli_env()),
                          ((), cli_env(TILLWIRE_SERVER_PORT=str(server.port)))):
            proc = await start_term("--token", token("till1"), *args, env=env)
            await line_with(proc.stdout, b"connected as terminal:acme/till1")
            assert await quit_term(proc) == 0
        # send: the admin API and its token from --config, then from the environment
        body = '{"order": "o1", "status": "paid"}'
        till = await connect(server.addr, "till1")
        for args, env in ((("--config", str(config)), cli_env()),
                          ((), cli_env(TILLWIRE_ADMIN_PORT=str(admin_port),
                                       TILLWIRE_ADMIN_TOKEN="adm-token-1"))):
            done = subprocess.run(
                [sys.executable, "-m", "tillwire", "send", "payment.result", "--to",
                 "terminal:acme/till1", "--body", body, *args],
                env=env, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr
            assert '"recipients":1' in done.stdout
            msg = await till.receive(timeout=5)
            assert msg.kind == "payment.result" and msg.body["order"] == "o1"
            await msg.ack()
        # The admin API switched off in the config: send says which key to set.
        off = subprocess.run([sys.executable, "-m", "tillwire", "send", "price.update", "--to",
                              "store:acme/s1", "--body", "{}"],
                             env=cli_env(TILLWIRE_ADMIN_PORT="0", TILLWIRE_ADMIN_TOKEN="x"),
                             capture_output=True, text=True, timeout=30)
        assert off.returncode == 2 and "admin.port" in off.stderr


@aiotest(timeout=60)
async def test_term_says_in_one_line_when_nothing_listens(tmp_path):
    port = free_port()
    proc = await start_term("--port", str(port), "--token", token("till1"))
    # It gives up by itself (the SDK alone would retry for ever): exit 1.
    assert await asyncio.wait_for(proc.wait(), 15) == 1
    err = (await proc.stderr.read()).decode().strip().splitlines()
    assert err == [f"tillwire term: cannot connect to 127.0.0.1:{port}: connection refused "
                   "(nothing listening there?)"], err


@pytest.mark.slow
@aiotest(timeout=120)
async def test_term_reports_tls_mistakes_within_seconds_and_the_server_logs_them(tmp_path):
    ca, other = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    env = {"TILLWIRE_TLS_CERT": str(tmp_path / "server.pem"),
           "TILLWIRE_TLS_KEY": str(tmp_path / "server.key"), "TILLWIRE_STORE_BACKEND": "memory"}
    with ServerProcess(str(tmp_path / "srv"), env=env) as server:
        cases = (((), "WELCOME", "--tls-ca"),
                 (("--tls-ca", str(tmp_path / "other-ca.pem")), "certificate is not trusted",
                  "check the CA"))
        for n, (args, why, fix) in enumerate(cases):
            proc = await start_term("--port", str(server.port), "--token", token("till1"), *args)
            assert await asyncio.wait_for(proc.wait(), 20) == 1     # gives up by itself
            err = (await proc.stderr.read()).decode().strip().splitlines()
            assert len(err) == 1 and why in err[0] and fix in err[0], err
            if n == 0:      # the server logs the plaintext client's failed handshake
                await eventually(lambda: "tls: handshake failed" in server.log(), timeout=10)
                assert "a plaintext client on the TLS port?" in server.log()
        # The right CA connects.
        proc = await start_term("--port", str(server.port), "--token", token("till1"),
                                "--tls-ca", str(tmp_path / "ca.pem"))
        await line_with(proc.stdout, b"connected as terminal:acme/till1")
        assert await quit_term(proc) == 0


@pytest.mark.slow
@aiotest(timeout=120)
async def test_term_shows_disconnects_and_reconnects(tmp_path):
    server = ServerProcess(str(tmp_path / "srv")).start()
    try:
        proc = await start_term("--port", str(server.port), "--token", token("till1"))
        await line_with(proc.stdout, b"connected as terminal:acme/till1")
        server.stop()
        gone = await line_with(proc.stdout, b"-- disconnected")
        assert b"SHUTDOWN" in gone and b"reconnecting" in gone
        server.start()
        await line_with(proc.stdout, b"-- reconnected", timeout=30)
        be = await connect(server.addr, "hq", store="hq", roles=("backend",))
        await be.send("payment.result", {"order": "o9", "status": "paid"}, "terminal:acme/till1")
        assert b'"order":"o9"' in await line_with(proc.stdout, b"payment.result")
        assert await quit_term(proc) == 0
    finally:
        server.stop()


@pytest.mark.slow
@aiotest(timeout=120)
async def test_term_is_kicked_out_with_a_reason_and_exit_1(tmp_path):
    with ServerProcess(str(tmp_path / "srv")) as server:
        proc = await start_term("--port", str(server.port), "--token", token("till1"))
        await line_with(proc.stdout, b"connected as terminal:acme/till1")
        again = await connect(server.addr, "till1")          # the same till logs in elsewhere
        assert b"TAKEOVER" in await line_with(proc.stdout, b"-- disconnected")
        assert b"ended for good" in await line_with(proc.stdout, b"!!")
        assert await asyncio.wait_for(proc.wait(), 10) == 1
        await again.close()


@pytest.mark.slow
@aiotest(timeout=120)
async def test_staff_assign_reply_and_resolve_tickets_from_term(tmp_path):
    with ServerProcess(str(tmp_path / "srv")) as server:
        staff = await start_term("--port", str(server.port),
                                 "--token", token("h1", roles=("staff",)))
        await line_with(staff.stdout, b"connected as terminal:acme/h1")
        till = await start_term("--port", str(server.port), "--token", token("till1"))
        await line_with(till.stdout, b"connected as terminal:acme/till1")
        await typed(till, "ticket E42 printer jam")
        opened = await line_with(till.stdout, b"-- ticket")
        assert b"sent to 1 staff" in opened, opened
        tid = opened.split()[2].decode()
        shown = await line_with(staff.stdout, b"ticket.open")
        assert tid.encode() in shown and b"printer jam" in shown
        await typed(staff, f"assign {tid}")
        assert b"assigned" in await line_with(staff.stdout, b"-- ticket")
        assert b"ticket.assign" in await line_with(till.stdout, tid.encode())
        # JSON with spaces, unquoted, as the help shows it
        await typed(staff, f'send ticket.reply terminal:acme/till1 {{"ticket": "{tid}", '
                           '"text": "on my way"}')
        assert b"accepted" in await line_with(staff.stdout, b"--")
        assert b"on my way" in await line_with(till.stdout, b"ticket.reply")
        await typed(till, f"reply {tid} thanks, it is urgent")
        assert b"reply sent" in await line_with(till.stdout, b"-- ticket")
        assert b"it is urgent" in await line_with(staff.stdout, b"ticket.reply")
        await typed(staff, f"resolve {tid} cleared the jam")
        assert b"resolved" in await line_with(staff.stdout, b"-- ticket")
        assert b"cleared the jam" in await line_with(till.stdout, b"ticket.resolve")
        await typed(staff, "assign T-nosuch")
        assert b"has not been shown here" in await line_with(staff.stdout, b"!!")
        assert await quit_term(staff) == 0 and await quit_term(till) == 0


@pytest.mark.slow
@aiotest(timeout=90)
async def test_every_form_in_terms_help_is_understood(tmp_path):
    with ServerProcess(str(tmp_path / "srv")) as server:
        proc = await start_term("--port", str(server.port), "--token", token("till1"))
        await line_with(proc.stdout, b"connected as")
        await typed(proc, "help")
        lines = [await line_with(proc.stdout, b"ack ")]
        while b"help | quit" not in lines[-1]:
            lines.append(await line_with(proc.stdout, b""))
        text = b"".join(lines).decode()
        example = next(line.strip() for line in text.splitlines()
                       if line.strip().startswith("send order.event"))
        assert '"order": "o-1"' in example           # JSON with spaces, as documented
        await typed(proc, example)
        answer = await line_with(proc.stdout, b"-- ")
        assert b"accepted" in answer, answer
        await typed(proc, "frobnicate")
        assert b"unknown command" in await line_with(proc.stdout, b"!!")
        assert await quit_term(proc) == 0
