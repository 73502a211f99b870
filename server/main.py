"""``tillwire serve``: run one server process, or a node of worker processes.

Builds the store named by the config, the node, the audit log, TLS on the
terminal listener (``[tls]``) and the admin plane (``[admin]``, when
``admin.port`` is not 0), and runs on a uvloop event loop until stopped.
With ``redis.url`` the store, presence, routing, the registry and channel
history are the fleet's in Redis (``fleet.py``); with ``server.workers``
above 1 a supervisor (``supervisor.py``) runs that many such processes on
the same ports.

Stopping is a graceful drain: SIGTERM or SIGINT (or ``POST /v1/drain``)
sends every terminal GOAWAY, waits for the P0/P1 messages in flight to be
acknowledged (at most ``DRAIN_TIMEOUT`` seconds), writes the pending acks
and exits 0.  A second signal ends the wait at once.

Starting fails in one line naming the key to change (``StartupError``,
printed by the CLI): the data directory, a TLS file, a port, the store,
Redis.  Checks that cost nothing come first (the directory, TLS, binding
the terminal port), before the store is opened.  Once listening, the log
line ``ready: terminals on H:P, admin API on http://H:P`` gives the ports
really bound.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sqlite3
import ssl
import sys

import orjson
import uvloop

from tillwire.core.errors import StartupError

from . import gcpolicy
from .config import Config, node_id
from .connection import listen_socket
from .logs import setup_logging
from .tls import HandshakeLog, make_ssl_context

log = logging.getLogger("tillwire.server")

SWITCH_INTERVAL = 0.0001   # seconds; see serve()

DRAIN_TIMEOUT = 10.0
"""Longest wait for in-flight P0/P1 acks when draining on a signal (seconds)."""


def make_store(cfg: Config):
    """The Store backend the config names."""
    backend = cfg.store.backend
    if backend == "memory":
        from .store_memory import MemoryStore

        return MemoryStore(dedup_window=cfg.delivery.dedup_window)
    if backend == "sqlite":
        from .store_sqlite import SQLiteStore

        return SQLiteStore(os.path.join(cfg.server.data_dir, "tillwire.db"),
                           synchronous=cfg.store.synchronous,
                           group_commit_ms=cfg.store.group_commit_ms,
                           dedup_window=cfg.delivery.dedup_window, writer=cfg.store.writer)
    raise ValueError(f"store.backend: unknown backend {backend!r}")


def _data_dir_usable(path: str) -> None:
    """Create the data directory if needed and prove it writable, or raise
    StartupError naming ``server.data_dir`` (a raw FileNotFoundError from
    deep inside the store says neither what nor where)."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".tillwire-probe-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as exc:
        raise StartupError("server.data_dir", f"cannot use {path!r} as the data directory: "
                           f"{exc.strerror or exc} (set server.data_dir, --data-dir or "
                           "TILLWIRE_SERVER_DATA_DIR to a writable directory)") from None


def _runner_address(runner) -> tuple[str, int]:
    """The admin API's bound (host, port)."""
    host, port = runner.addresses[0][:2]
    return host, port


def _port_error(key: str, flag: str, host: str, port: int, exc: OSError) -> StartupError:
    if isinstance(exc, socket.gaierror):
        key = key.replace(".port", ".host")
        return StartupError(key, f"cannot listen on {host!r}: {exc.strerror or exc}; set {key} "
                            "to an address of this machine")
    env = "TILLWIRE_" + key.upper().replace(".", "_")
    if exc.errno == errno.EADDRINUSE:
        why = f"{host}:{port} is already in use (another server running?)"
    elif exc.errno == errno.EACCES:
        why = f"not allowed to listen on {host}:{port} (ports below 1024 need privileges)"
    else:
        why = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return StartupError(key, f"{why}; choose another with {key}, {flag} or {env}")


def _tls_error(cfg: Config, exc: OSError) -> StartupError:
    """Which of the TLS files is unusable, and why, in one line."""
    tls = cfg.tls
    for key, path in (("tls.cert", tls.cert), ("tls.key", tls.key), ("tls.client_ca", tls.client_ca)):
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as err:
                return StartupError(key, f"cannot read {path!r}: {err.strerror or err}")
    for key, path in (("tls.cert", tls.cert), ("tls.client_ca", tls.client_ca)):
        if path:
            try:
                ssl.create_default_context().load_verify_locations(cafile=path)
            except (OSError, ssl.SSLError):
                return StartupError(key, f"{path!r} holds no PEM certificate")
    reason = getattr(exc, "reason", None) or str(exc)
    with open(tls.key, "rb") as f:
        if b"PRIVATE KEY-----" not in f.read():
            return StartupError("tls.key", f"{tls.key!r} holds no PEM private key")
    if reason == "KEY_VALUES_MISMATCH":
        return StartupError("tls.key", f"{tls.key!r} is not the private key of {tls.cert!r}")
    return StartupError("tls.key", f"cannot use {tls.key!r} as the private key of "
                        f"{tls.cert!r}: {reason}")


def banner(cfg: Config, terminals: tuple[str, int], admin: tuple[str, int] | None,
           tls: bool) -> str:
    """The one line that says where this server listens (the real ports, also
    the ones the kernel chose for port 0)."""
    where = f"ready: terminals on {terminals[0]}:{terminals[1]}{' (TLS)' if tls else ''}"
    if admin is None:
        return f"{where}, admin API off (admin.port = 0); data in {cfg.server.data_dir}"
    return (f"{where}, admin API on http://{admin[0]}:{admin[1]}; "
            f"data in {cfg.server.data_dir}")


async def run(cfg: Config, *, ready=None, stop_event: asyncio.Event | None = None,
              freeze_gc: bool = False, worker: int = 0, node_name: str | None = None) -> int:
    """Run a node until SIGTERM/SIGINT, ``stop_event`` or an admin drain; returns an
    exit code.  ``freeze_gc`` (``tillwire serve``): once started, move every object
    alive (modules, configuration, the loaded registry) out of the cyclic garbage
    collector's sight and space out its full collections (see gcpolicy).
    ``worker``/``node_name``: this process's index among its node's workers and the
    node's id (default: derived, see config.node_id).

    Raises StartupError (one line naming the key to change) when it cannot
    start: the data directory, a TLS file, a port, the store, Redis."""
    from .audit import open_audit_log
    from .node import Node

    cfg.require_secret()
    loop = asyncio.get_running_loop()
    _data_dir_usable(cfg.server.data_dir)
    handshakes = HandshakeLog(loop)
    try:
        tls = make_ssl_context(cfg, handshakes)
    except (OSError, ssl.SSLError) as exc:
        raise _tls_error(cfg, exc) from None
    srv = cfg.server
    reuse_port = srv.workers > 1
    # Bound before the store opens: a port in use costs nothing to report.
    try:
        sock = listen_socket(srv.host, srv.port, srv.send_buffer, srv.notsent_lowat, reuse_port)
    except OSError as exc:
        raise _port_error("server.port", "--port", srv.host, srv.port, exc) from None
    nid = node_name or node_id(cfg)
    shared = None
    if cfg.redis.url:
        from .fleet import connect, worker_name

        shared = connect(cfg, worker_name(nid, worker))
        node = Node(cfg, shared.store, loop=loop, node_id=nid, worker=worker,
                    presence=shared.presence, broker=shared.broker,
                    registry=shared.registry, history=shared.history, caps=shared.caps)
    else:
        node = Node(cfg, make_store(cfg), loop=loop, node_id=nid, worker=worker)
    audit = open_audit_log(cfg)
    node.audit = audit
    try:
        await node.start(sock=sock, ssl=tls, reuse_port=reuse_port)
    except Exception as exc:
        sock.close()
        await node.stop()
        audit.close()
        if shared is not None:
            await shared.close()
        if cfg.redis.url:
            # (Redis unreachable, refused, or it answered what the store cannot use)
            raise StartupError("redis.url", f"worker {worker} of node {nid} cannot open its "
                               f"Redis backends: {exc}") from None
        if not isinstance(exc, (OSError, sqlite3.Error, RuntimeError)):
            raise
        # (RuntimeError: the store's schema is newer than this version, or its
        # writer process could not start)
        fix = "" if isinstance(exc, RuntimeError) else (
            " (check the directory, its permissions and free space, or set server.data_dir)")
        raise StartupError("server.data_dir", f"cannot open the store in "
                           f"{cfg.server.data_dir!r}: {exc}{fix}") from None
    for host, port in node.addresses:
        log.info("listening host=%s port=%s node=%s worker=%d store=%s tls=%s "
                 "max_connections=%d", host, port, node.node_id, worker, cfg.store.backend,
                 "off" if tls is None else
                 "mutual-required" if cfg.tls.require_client_cert else
                 "mutual-optional" if cfg.tls.client_ca else "on", node.max_connections)
    admin = None
    admin_address = None
    if cfg.admin.port:
        from .admin import start_admin

        try:
            admin = await start_admin(node, cfg, audit, reuse_port=cfg.server.workers > 1)
        except OSError as exc:
            await node.stop()
            audit.close()
            if shared is not None:
                await shared.close()
            raise _port_error("admin.port", "--admin-port", cfg.admin.host, cfg.admin.port,
                              exc) from None
        admin_address = _runner_address(admin)
        if not cfg.admin.tokens:
            log.warning("admin API has no tokens: every /v1 call is refused (set "
                        "[[admin.tokens]] or TILLWIRE_ADMIN_TOKEN)")
    log.info("%s", banner(cfg, node.addresses[0], admin_address, tls is not None))
    stop = stop_event or asyncio.Event()
    signals: list[str] = []

    def on_signal(name: str) -> None:
        signals.append(name)
        if len(signals) == 1:
            stop.set()
        else:
            log.warning("%s again: ending the drain now", name)
            node.force_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig.name)
        except (NotImplementedError, RuntimeError):
            pass
    # A worker of a supervisor starts with them blocked (supervisor.py): one
    # that came while it started is handled now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    if freeze_gc:
        # What exists now lives as long as the process (see gcpolicy).
        # Measured under the durable steady load: full-collection pauses of
        # 47-58 ms became 15-33 ms, and then rare.
        gcpolicy.settle()
    if ready is not None:
        ready(node)
    stopped = loop.create_task(node.wait_stopped())
    asked = loop.create_task(stop.wait())
    try:
        await asyncio.wait([stopped, asked], return_when=asyncio.FIRST_COMPLETED)
        if not node.draining and not node.stopped:
            by = signals[0] if signals else "stop_event"
            log.info("draining node=%s on %s", node.node_id, by)
            audit.write("drain", f"signal:{by}" if signals else "process",
                        detail={"node": node.node_id,
                                "connections": len(node.all_connections())})
            node.drain(timeout=DRAIN_TIMEOUT)
        await node.wait_stopped()
    finally:
        for task in (stopped, asked):
            task.cancel()
        if not node.stopped:
            await node.stop()
        if admin is not None:
            await admin.cleanup()
        audit.close()
        if shared is not None:
            await shared.close()
        handshakes.flush()
    log.info("stopped node=%s worker=%d", node.node_id, worker)
    return node.exit_code


def serve(cfg: Config) -> int:
    """Entry point of ``tillwire serve``."""
    setup_logging(cfg.log)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("configuration %s", orjson.dumps(cfg.to_dict()).decode())   # secrets masked
    if cfg.server.workers > 1:
        from .supervisor import serve_workers

        return serve_workers(cfg, node_id(cfg), _supervised_worker)
    return _worker(cfg, 0, None)


def _worker(cfg: Config, index: int, node_name: str | None) -> int:
    """One server process: worker ``index`` of node ``node_name``."""
    # The store's reader thread (and its writer, with store.writer = "thread")
    # hands the GIL back and forth with the event loop on every SQLite step;
    # when the loop is busy (a broadcast flood) a 5 ms switch interval makes
    # each handoff wait up to 5 ms.  0.1 ms keeps them moving at a small cost
    # to the loop.
    sys.setswitchinterval(SWITCH_INTERVAL)
    uvloop.install()
    return asyncio.run(run(cfg, freeze_gc=True, worker=index, node_name=node_name))


def _supervised_worker(cfg: Config, index: int, node_name: str | None) -> int:
    """A worker of ``serve --workers N``: one that cannot start logs the
    one-line reason (the supervisor restarts it with a growing delay)."""
    try:
        return _worker(cfg, index, node_name)
    except StartupError as exc:
        log.error("worker %d cannot start: %s", index, exc)
        return 1
