"""Helpers shared by the end-to-end tests: tokens, configs, nodes, servers.

Everything talks over real loopback sockets: ``start_node`` runs a Node in
the test's own uvloop event loop; ``ServerProcess`` runs ``tillwire serve``
as a real subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import uvloop

from tillwire.client.connection import Connection
from tillwire.core.codec import Decoder, Encoder, Frame
from tillwire.core.codes import Flag, FrameType, Lane
from tillwire.core._impl import both
from tillwire.server.auth import issue_token
from tillwire.server.config import load_config

SECRET = "test-secret-0123456789"
TENANT = "acme"


NO_EXTENSIONS = os.environ.get("TILLWIRE_NO_EXTENSIONS") == "1"
"""The run is deliberately Python-only: native modules are neither built nor tested."""


def require_impl(name: str, impl: str):
    """The ``impl`` ("python" | "native") module of core module ``name``.

    A missing native module is a FAILURE, not a skip, unless
    ``TILLWIRE_NO_EXTENSIONS=1`` says the run is deliberately Python-only.
    """
    found = both(name)
    if impl in found:
        return found[impl]
    if NO_EXTENSIONS:
        pytest.skip(f"TILLWIRE_NO_EXTENSIONS=1: native tillwire.core._{name} deliberately "
                    "not tested")
    try:
        importlib.import_module(f"tillwire.core._{name}")
        reason = "not returned by tillwire.core._impl.both()"
    except ImportError as exc:
        reason = f"{exc.__class__.__name__}: {exc}"
    pytest.fail(
        f"native module tillwire.core._{name} is not importable ({reason}). Build it with "
        "`make compile`, or set TILLWIRE_NO_EXTENSIONS=1 to test only the Python twin.",
        pytrace=False,
    )


def aiotest(timeout: float = 60.0):
    """Run an ``async def`` test on a fresh uvloop loop, bounded in time."""

    def wrap(fn):
        @functools.wraps(fn)
        def runner(*args, **kwargs):
            async def bounded():
                return await asyncio.wait_for(fn(*args, **kwargs), timeout)

            return uvloop.run(bounded())

        return runner

    return wrap


def uvarint(value: int) -> bytes:
    """The shortest LEB128 uvarint of ``value`` (PROTOCOL.md 2.1): the tests'
    own writer, independent of both codecs."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def token(terminal: str, *, store: str = "s1", roles=("pos",), tenant: str = TENANT,
          region: str = "", member: str = "", ttl: float = 3600.0, now: float | None = None,
          secret: str = SECRET) -> str:
    return issue_token(secret, tenant=tenant, store=store, terminal=terminal, roles=list(roles),
                       region=region, member=member, ttl=ttl, now=now)


def make_config(data_dir: str = "", **overrides):
    """A config for a test node: ephemeral port, no admin port, memory store."""
    values = {"server.port": 0, "admin.port": 0, "store.backend": "memory",
              "heartbeat.tick": 0.05,
              # No offer quiet hours unless a test asks: results must not depend
              # on the time of day the suite runs (tests/test_offers.py sets them).
              "offers.quiet_start": "00:00", "offers.quiet_end": "00:00"}
    if data_dir:
        values["server.data_dir"] = data_dir
    values.update(overrides)
    return load_config(env={"TILLWIRE_SECRET": SECRET}, overrides=values)


async def start_node(cfg=None, store=None, *, node_id: str = "", presence=None, broker=None,
                     **overrides):
    from tillwire.server.main import make_store
    from tillwire.server.node import Node

    cfg = cfg or make_config(**overrides)
    node = Node(cfg, store or make_store(cfg), loop=asyncio.get_running_loop(),
                node_id=node_id, presence=presence, broker=broker)
    await node.start()
    return node


async def provision(node, terminal: str, *, store: str = "s1", roles=("pos",),
                    tenant: str = TENANT, region: str = "", member: str = "") -> None:
    """Make ``terminal`` known before it ever logs in, as ``POST /v1/terminals``
    does (its record in the store and the registry): P0/P1 messages to it then
    wait for its first login instead of being refused UNKNOWN_TERMINAL."""
    from tillwire.server.terminals import TerminalRecord

    rec = TerminalRecord(f"terminal:{tenant}/{terminal}", tenant, terminal, store, region,
                         tuple(roles), member, time.time(), 0.0, False, 0.0)
    await node.store.terminals.register(rec)
    await node.registry.put(rec)


def address_of(node) -> tuple[str, int]:
    return node.addresses[0]


async def connect(node_or_addr, terminal: str, **kwargs) -> Connection:
    """Open a terminal connection; token claims come from kwargs (store, roles...)."""
    host, port = node_or_addr if isinstance(node_or_addr, tuple) else address_of(node_or_addr)
    token_kwargs = {k: kwargs.pop(k) for k in ("store", "roles", "tenant", "region", "member",
                                                "ttl", "now", "secret") if k in kwargs}
    tok = kwargs.pop("token", None) or token(terminal, **token_kwargs)
    return await Connection.open(host, port, tok, **kwargs)


async def eventually(predicate, timeout: float = 5.0, interval: float = 0.01):
    """Wait until ``predicate()`` is true; fail the test if it never is."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        await asyncio.sleep(interval)


def hello(tok: str, version: int = 1, heartbeat: int = 0) -> bytes:
    """A raw HELLO frame carrying ``tok``."""
    return Encoder().encode(Frame(FrameType.HELLO, version=version, heartbeat=heartbeat, token=tok))


def payment_sends(to: str, first: int, count: int, *, ack: bool = True) -> bytes:
    """Raw SEND frames of payment results o<first>..o<first+count-1> (ref = n + 1)."""
    enc = Encoder()
    flags = Lane.P0 | (Flag.ACK_REQUESTED if ack else 0)
    return b"".join(enc.encode(Frame(
        FrameType.SEND, flags, b'{"order":"o%d","status":"paid"}' % n, ref=n + 1, to=to,
        kind="payment.result")) for n in range(first, first + count))


async def read_sendacks(reader: asyncio.StreamReader, count: int) -> list[int]:
    """The payment numbers (ref - 1) of the next ``count`` SENDACKs on a raw connection."""
    decoder = Decoder()
    acked: list[int] = []
    while len(acked) < count:
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        assert chunk, "the server closed the sender's connection"
        acked += [f.ref - 1 for f in decoder.feed(chunk) if f.type == FrameType.SENDACK]
    return acked


async def receive_orders(till: Connection, count: int) -> list[int]:
    """Receive and ack ``count`` payment results; their order numbers, in arrival order."""
    got: list[int] = []
    while len(got) < count:
        msg = await till.receive(timeout=5)
        got.append(int(msg.body["order"][1:]))
        await msg.ack()
    return got


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 15.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


class ServerProcess:
    """``tillwire serve`` as a real subprocess on a free loopback port."""

    def __init__(self, data_dir: str, *, port: int | None = None, admin_port: int = 0,
                 env: dict | None = None, args=()) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.admin_port = admin_port
        self.env = {**os.environ, "TILLWIRE_SECRET": SECRET, **(env or {})}
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(data_dir, f"server-{self.port}.log")
        self._log = None

    def start(self) -> "ServerProcess":
        os.makedirs(self.data_dir, exist_ok=True)
        cmd = [sys.executable, "-m", "tillwire", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--data-dir", self.data_dir,
               "--admin-port", str(self.admin_port), *self.args]
        if self._log is not None:
            self._log.close()          # (a restart after kill(): the server before had it)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=self._log)
        wait_port("127.0.0.1", self.port, proc=self.proc)
        if self.admin_port:
            wait_port("127.0.0.1", self.admin_port, proc=self.proc)
        return self

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def kill(self) -> None:
        """SIGKILL: the crash a durability test wants."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
