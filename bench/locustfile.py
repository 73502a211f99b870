"""Locust scenarios: a retail chain's holiday peak against a Tillwire server.

Users speak the binary protocol over gevent sockets through the same
sans-IO terminal session (``ClientSession``) the asyncio SDK drives:

* ``Till``: a checkout terminal.  It stays connected and keeps reading (a
  till never stops listening), acks every inbox message after "processing"
  it, pings when idle, and about every ``TW_TICKET_EVERY`` seconds opens a
  cashier ticket.
* ``PaymentBackend``: sends P0 payment results to tills that are connected
  now (a payment result answers a payment the till started; results for
  terminals that never log in would pile up in the store for their TTL).
* ``PricingHQ``: pushes P2 price updates to stores.

What Locust reports (every time is measured in this one process, one clock):

* ``connect``: TCP connect, HELLO, WELCOME: a till's login.
* ``send payment.result`` / ``send price.update``: the backend's SEND to its
  SENDACK.  For P0 that is the server's durable accept: the result is in
  the store (group commit and fsync) before the SENDACK leaves.
* ``payment.result``: end to end, the backend's send time (in the body) to
  the moment the till read it: the accept, the delivery and the network.
* ``price.update``: the HQ's version stamp (milliseconds, in the body) to the
  moment a till read it: the P2 fan-out.
* ``ticket.open``: a till's SEND of a ticket to its SENDACK.

``HolidayPeak`` (``LOAD_SHAPE=holiday``) ramps from a normal day
(``TW_NORMAL_USERS``, default 20 users) to 10x and 30x and back and then ends
by itself; given ``-t``, it squeezes the whole ramp into that time.

Run against a server (the token secret must match the server's)::

    make load                                       # the server `make run` started
    LOAD_SHAPE=holiday make load TIME=3m
    TILLWIRE_SECRET=... locust -f bench/locustfile.py --host tcp://127.0.0.1:7070 \\
        --headless -u 200 -r 50 -t 60s

Without ``--host`` the server's address comes from the same config as
``tillwire serve`` (``TILLWIRE_CONFIG``, ``TILLWIRE_SERVER_HOST``/``_PORT``).
Environment: ``TILLWIRE_SECRET`` (required), ``TW_TENANT`` (default bench),
``TW_STORES`` (default 50), ``TW_TILLS`` (default 10000: the id space tills
draw from), ``TW_TICKET_EVERY`` (default 30 seconds).
"""

from __future__ import annotations

import itertools
import os
import random
import socket
import time

import orjson
from locust import LoadTestShape, User, between, constant, events, task

from tillwire.core.codes import Code, FrameType, Lane
from tillwire.core.session import CLOSED, OPEN, ClientSession, Encoder
from tillwire.server.auth import issue_token
from tillwire.server.config import load_config

SECRET = os.environ.get("TILLWIRE_SECRET", "")
TENANT = os.environ.get("TW_TENANT", "bench")
STORES = int(os.environ.get("TW_STORES", "50"))
TILLS = int(os.environ.get("TW_TILLS", "10000"))
TICKET_EVERY = float(os.environ.get("TW_TICKET_EVERY", "30"))
_ENC = Encoder()

_CONNECTED: list[int] = []
"""Indexes of the tills connected now (the payment backend pays only those)."""


def _default_host() -> str:
    """The terminal listener of the server `tillwire serve` would run with
    this environment (config file, TILLWIRE_* variables)."""
    cfg = load_config(os.environ.get("TILLWIRE_CONFIG") or None)
    host = "127.0.0.1" if cfg.server.host in ("0.0.0.0", "::", "") else cfg.server.host
    return f"tcp://{host}:{cfg.server.port}"


DEFAULT_HOST = _default_host()


def _hostport(host: str) -> tuple[str, int]:
    host = (host or "tcp://127.0.0.1:7070").split("://")[-1]
    name, _, port = host.rpartition(":")
    return name or "127.0.0.1", int(port or 7070)


class Terminal:
    """One protocol session over a (gevent) socket."""

    def __init__(self, host: str, token: str) -> None:
        self.sock = socket.create_connection(_hostport(host), timeout=10)
        self.session = ClientSession(_ENC, now=time.monotonic())
        self.session.hello(token, 60_000)
        self.session.resume()
        self.flush()
        while self.session.state != OPEN:
            self.read()
            if self.session.state == CLOSED:
                raise ConnectionError(f"refused: {Code(self.session.close_code).name}")

    def flush(self) -> None:
        data = self.session.data_to_send(time.monotonic())
        if data:
            self.sock.sendall(data)

    def read(self, timeout: float | None = None) -> list:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return []
        if not data:
            raise ConnectionError("server closed the connection")
        return self.session.receive_data(data, time.monotonic())

    def close(self) -> None:
        try:
            self.session.close(Code.NORMAL, "bye")
            self.flush()
        finally:
            self.sock.close()


def _report(name: str, started: float, length: int, exc: Exception | None = None) -> None:
    events.request.fire(request_type="tillwire", name=name,
                        response_time=(time.time() - started) * 1000, response_length=length,
                        exception=exc, context={})


class Till(User):
    weight = 20
    host = DEFAULT_HOST
    # No think time between reads: a till never stops listening, so what the
    # payment.result latency measures is the server and the network, not a
    # simulated till that looked away for a second or two.
    wait_time = constant(0)
    _ids = itertools.count()     # one terminal id per simulated till (a second login would take over)

    def on_start(self) -> None:
        self.index = next(Till._ids) % TILLS
        token = issue_token(SECRET, tenant=TENANT, store=f"s{self.index % STORES}",
                            terminal=f"t{self.index}", roles=["pos"], ttl=86400)
        t0 = time.time()
        self.term = Terminal(self.host, token)
        _report("connect", t0, 0)
        self.next_ticket = time.monotonic() + random.expovariate(1.0 / TICKET_EVERY)
        _CONNECTED.append(self.index)

    def on_stop(self) -> None:
        if self.index in _CONNECTED:
            _CONNECTED.remove(self.index)
        self.term.close()

    @task
    def serve_checkout(self) -> None:
        """Read what arrives (for up to a second), process and ack it; now and
        then open a ticket."""
        term = self.term
        for frame in term.read(timeout=1.0):
            if frame.type == FrameType.DELIVER:
                body = orjson.loads(frame.payload)
                if frame.kind == "payment.result" and "t" in body:
                    _report("payment.result", body["t"], len(frame.payload))
                term.session.ack(frame.flags & 3, frame.seq)
            elif frame.type == FrameType.BROADCAST:
                body = orjson.loads(frame.payload)
                if frame.kind == "price.update" and isinstance(body.get("version"), int):
                    _report("price.update", body["version"] / 1000.0, len(frame.payload))
        if term.session.ping_due(time.monotonic()):
            term.session.ping()
        term.flush()
        if time.monotonic() >= self.next_ticket:
            self.next_ticket = time.monotonic() + random.expovariate(1.0 / TICKET_EVERY)
            self.open_ticket()

    def open_ticket(self) -> None:
        term = self.term
        ref = random.randrange(1, 1 << 60)
        t0 = time.time()
        term.session.send(Lane.P1, f"role:{TENANT}/s{self.index % STORES}/staff", "ticket.open",
                          orjson.dumps({"code": random.choice(["E42", "E7", "PRN"])}), ref=ref)
        term.flush()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and ref in term.session.outstanding:
            term.read(timeout=0.5)
        _report("ticket.open", t0, 0, None if ref not in term.session.outstanding
                else TimeoutError("no SENDACK"))


class _Backend(User):
    abstract = True
    host = DEFAULT_HOST
    role_name = "backend"

    def on_start(self) -> None:
        token = issue_token(SECRET, tenant=TENANT, store="hq",
                            terminal=f"{self.role_name}-{random.randrange(1 << 30)}",
                            roles=["backend"], ttl=86400)
        self.term = Terminal(self.host, token)

    def on_stop(self) -> None:
        self.term.close()

    def _send(self, name: str, lane: int, to: str, kind: str, body: dict) -> None:
        term = self.term
        ref = random.randrange(1, 1 << 60)
        t0 = time.time()
        term.session.send(lane, to, kind, orjson.dumps(body), ref=ref)
        term.flush()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and ref in term.session.outstanding:
            term.read(timeout=0.5)
        _report(name, t0, 0, None if ref not in term.session.outstanding
                else TimeoutError("no SENDACK"))


class PaymentBackend(_Backend):
    weight = 2
    wait_time = between(0.01, 0.05)
    role_name = "payments"

    @task
    def pay(self) -> None:
        if not _CONNECTED:
            return                   # no till is taking payments yet
        n = random.choice(_CONNECTED)
        self._send("send payment.result", Lane.P0, f"terminal:{TENANT}/t{n}", "payment.result",
                   {"order": f"o{random.randrange(1 << 40)}", "status": "paid",
                    "amount": "12.50", "currency": "CNY", "t": time.time()})


class PricingHQ(_Backend):
    weight = 1
    wait_time = between(0.1, 0.5)
    role_name = "pricing"

    @task
    def price(self) -> None:
        self._send("send price.update", Lane.P2, f"store:{TENANT}/s{random.randrange(STORES)}",
                   "price.update", {"sku": f"69{random.randrange(10**11):011d}",
                                    "price": f"{random.randrange(100, 9999) / 100:.2f}",
                                    "version": int(time.time() * 1000)})


class HolidayPeak(LoadTestShape):
    """Normal day, then the sale: ramp to 30x, hold, come back down, end.

    Locust ignores ``-t`` for a load shape, so this one reads it: the whole
    ramp is squeezed into ``-t`` when given (180 s of stages otherwise) and
    the run ends when the last stage does."""

    use_common_options = True        # (reads -t; -u and -r do not apply)
    normal = int(os.environ.get("TW_NORMAL_USERS", "20"))
    stages = [(30, 1), (60, 10), (120, 30), (150, 10), (180, 1)]   # (until second, x normal)

    def tick(self):
        options = self.runner.environment.parsed_options if self.runner is not None else None
        limit = getattr(options, "run_time", None)
        length = self.stages[-1][0]
        scale = limit / length if limit else 1.0
        run_time = self.get_run_time() / scale
        for until, factor in self.stages:
            if run_time < until:
                users = self.normal * factor
                return users, max(1.0, users / (10.0 * scale))
        return None


if os.environ.get("LOAD_SHAPE") != "holiday":
    del HolidayPeak      # only used when asked for (locust picks up any shape class)
