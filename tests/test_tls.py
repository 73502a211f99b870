"""TLS on the terminal port: real ``tillwire serve`` subprocesses with
certificates from a throwaway CA made at run time (trustme), and real
terminal connections through the SDK's ``Connection``."""

from __future__ import annotations

import asyncio
import os
import pathlib
import ssl
import time

import orjson
import pytest
import trustme
import uvloop

from support import (
    ServerProcess, aiotest, connect, eventually, payment_sends, read_sendacks, receive_orders,
    token,
)
from tillwire.core.codec import Decoder, Encoder, Frame
from tillwire.core.codes import FrameType
from tillwire.core.errors import ProtocolError, SessionClosed


@pytest.fixture
def pki(tmp_path):
    """A server CA with a certificate for 127.0.0.1, a client CA with one
    terminal certificate, and a foreign CA with another, as PEM files."""
    server_ca, client_ca, foreign_ca = trustme.CA(), trustme.CA(), trustme.CA()
    server = server_ca.issue_cert("127.0.0.1", "localhost")
    till = client_ca.issue_cert("till7.acme.example", common_name="till7.acme")
    stranger = foreign_ca.issue_cert("mallory.example", common_name="mallory")
    paths = {}
    for name, blob in (("server.pem", server.cert_chain_pems[0]),
                       ("server.key", server.private_key_pem),
                       ("client-ca.pem", client_ca.cert_pem)):
        paths[name] = str(tmp_path / name)
        blob.write_to_path(paths[name])
    return {"paths": paths, "server_ca": server_ca, "till": till, "stranger": stranger}


def client_context(pki, cert=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    pki["server_ca"].configure_trust(ctx)
    if cert is not None:
        cert.configure_cert(ctx)
    return ctx


def tls_env(pki, **extra) -> dict:
    p = pki["paths"]
    return {"TILLWIRE_TLS_CERT": p["server.pem"], "TILLWIRE_TLS_KEY": p["server.key"],
            "TILLWIRE_STORE_BACKEND": "memory", **extra}


async def refused(coro) -> BaseException:
    """The exception a connection attempt ends with; a timeout is not a refusal."""
    started = time.monotonic()
    try:
        await coro
    except BaseException as exc:  # noqa: BLE001
        assert not isinstance(exc, asyncio.TimeoutError), "timed out instead of being refused"
        assert time.monotonic() - started < 5
        assert isinstance(exc, (ssl.SSLError, OSError, SessionClosed)), repr(exc)
        return exc
    raise AssertionError("the connection was accepted")


@aiotest(timeout=60)
async def test_tls_terminal_port_carries_the_protocol(tmp_path, pki):
    with ServerProcess(str(tmp_path / "srv"), env=tls_env(pki)) as server:
        host, port = server.addr
        ctx = client_context(pki)
        till = await connect(server.addr, "t1", ssl=ctx)
        be = await connect(server.addr, "hq", store="hq", roles=("backend",), ssl=ctx)
        assert till.info["terminal"] == "terminal:acme/t1"
        assert till._transport.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        ack = await be.send("payment.result", {"order": "o1", "status": "paid"},
                            "terminal:acme/t1")
        msg = await till.receive(timeout=5)
        assert msg.id == ack.msg_id and msg.body["order"] == "o1"
        await msg.ack()
        # A client that does not trust the server's CA stops at the handshake.
        exc = await refused(connect(server.addr, "t2", ssl=ssl.create_default_context()))
        assert isinstance(exc, ssl.SSLCertVerificationError)
        # Plain TCP gets no WELCOME: the server only speaks TLS here.
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(Encoder().encode(Frame(FrameType.HELLO, version=1, token=token("t3"))))
        data = b""
        try:
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), 5)
                if not chunk:
                    break
                data += chunk
        except (ConnectionError, asyncio.TimeoutError):
            pass
        writer.close()
        try:
            frames = Decoder().feed(data)
        except ProtocolError:
            frames = []            # a TLS alert is not a Tillwire frame
        assert not any(f.type == FrameType.WELCOME for f in frames)
        await till.close()
        await be.close()
    assert "tls=on" in server.log()


@aiotest(timeout=60)
async def test_tls_burst_handled_in_turns_keeps_order(tmp_path, pki):
    # A tiny read budget pauses reading mid-burst; TLS may still hand over
    # records it had decrypted: they must go after the backlog, in order.
    env = tls_env(pki, TILLWIRE_SERVER_READ_BUDGET_MS="0.01")
    with ServerProcess(str(tmp_path / "srv"), env=env) as server:
        ctx = client_context(pki)
        till = await connect(server.addr, "t1", ssl=ctx)
        reader, writer = await asyncio.open_connection(*server.addr, ssl=ctx)
        enc = Encoder()
        writer.write(enc.encode(Frame(FrameType.HELLO, version=1,
                                      token=token("hq", store="hq", roles=("backend",))))
                     + enc.encode(Frame(FrameType.RESUME))
                     + payment_sends("terminal:acme/t1", 0, 600))
        assert await read_sendacks(reader, 600) == list(range(600))
        assert await receive_orders(till, 600) == list(range(600))
        writer.close()
        await till.close()


@aiotest(timeout=60)
async def test_mutual_tls_refuses_terminals_without_a_client_certificate(tmp_path, pki):
    env = tls_env(pki, TILLWIRE_TLS_CLIENT_CA=pki["paths"]["client-ca.pem"],
                  TILLWIRE_TLS_REQUIRE_CLIENT_CERT="true")
    data_dir = str(tmp_path / "srv")
    with ServerProcess(data_dir, env=env) as server:
        await refused(connect(server.addr, "t1", ssl=client_context(pki)))
        await refused(connect(server.addr, "t1", ssl=client_context(pki, pki["stranger"])))
        till = await connect(server.addr, "t1", ssl=client_context(pki, pki["till"]))
        assert till.is_open and till.info["terminal"] == "terminal:acme/t1"
        await till.close()
        audit_path = os.path.join(data_dir, "audit.log")
        await eventually(lambda: os.path.exists(audit_path)
                         and b"auth.ok" in pathlib.Path(audit_path).read_bytes())
        ok = [orjson.loads(line) for line in pathlib.Path(audit_path).read_bytes().splitlines()
              if b'"auth.ok"' in line]
        assert ok[0]["detail"]["cert"] == "till7.acme" and ok[0]["from"] == "127.0.0.1"
    assert "tls=mutual-required" in server.log()


@aiotest(timeout=60)
async def test_optional_client_certificates_are_verified_when_presented(tmp_path, pki):
    env = tls_env(pki, TILLWIRE_TLS_CLIENT_CA=pki["paths"]["client-ca.pem"])
    with ServerProcess(str(tmp_path / "srv"), env=env) as server:
        anonymous = await connect(server.addr, "t1", ssl=client_context(pki))
        assert anonymous.is_open
        signed = await connect(server.addr, "t2", ssl=client_context(pki, pki["till"]))
        assert signed.is_open
        await refused(connect(server.addr, "t3", ssl=client_context(pki, pki["stranger"])))
        await anonymous.close()
        await signed.close()


def test_failed_handshakes_are_logged_bounded_per_window(tmp_path, pki, caplog):
    """A flood of non-TLS clients: one line at once, then one line with the
    count per window, however many fail."""
    from tillwire.server.config import load_config
    from tillwire.server.tls import HandshakeLog, make_ssl_context

    p = pki["paths"]
    cfg = load_config(env={}, overrides={"tls.cert": p["server.pem"], "tls.key": p["server.key"]})

    async def flood():
        loop = asyncio.get_running_loop()
        failures = HandshakeLog(loop, window=0.5)
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0,
                                          ssl=make_ssl_context(cfg, failures))
        port = server.sockets[0].getsockname()[1]
        for _ in range(40):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: till\r\n\r\n")
            await writer.drain()
            writer.close()
        await eventually(lambda: failures.total == 40, timeout=10)
        await asyncio.sleep(0.7)                 # the window closes: its summary is written
        server.close()
        return failures

    caplog.set_level("WARNING", logger="tillwire.server")
    failures = uvloop.run(flood())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tls:")]
    assert failures.total == 40
    assert lines[0] == "tls: handshake failed reason=HTTP_REQUEST (an HTTP request on the TLS port)"
    summaries = lines[1:]
    assert 1 <= len(summaries) <= 3, lines      # bounded by windows, not by failures
    counted = sum(int(line.split()[1]) for line in summaries if "more handshakes" in line)
    first_lines = sum(1 for line in summaries if "more handshakes" not in line)
    assert counted + first_lines + 1 == 40, lines


@aiotest(timeout=60)
async def test_a_tls_handshake_that_never_finishes_is_dropped_at_the_auth_timeout(
        tmp_path, pki):
    # A plaintext client that sends a few bytes an SSL parser waits on (or
    # nothing at all) holds its descriptor only until server.auth_timeout,
    # not asyncio's 60 s handshake timeout.
    with ServerProcess(str(tmp_path), env=tls_env(pki, TILLWIRE_SERVER_AUTH_TIMEOUT="1")) as srv:
        for opening in (b"", b"\x80\x10"):
            reader, writer = await asyncio.open_connection(*srv.addr)
            writer.write(opening)
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 10) == b""     # closed by the server
            assert time.monotonic() - started < 5
            writer.close()
