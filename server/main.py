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
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import ssl

import orjson
import uvloop

from . import gcpolicy
from .config import Config, node_id
from .logs import setup_logging

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


def make_ssl_context(cfg: Config) -> ssl.SSLContext | None:
    """The terminal listener's TLS context from ``[tls]`` (None while TLS is off).

    ``client_ca`` turns on client certificate verification: optional
    (a terminal without a certificate still connects; one with a bad
    certificate is refused) unless ``require_client_cert`` makes it required.
    """
    tls = cfg.tls
    if not tls.cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    if tls.client_ca:
        ctx.load_verify_locations(cafile=tls.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def run(cfg: Config, *, ready=None, stop_event: asyncio.Event | None = None,
              freeze_gc: bool = False, worker: int = 0, node_name: str | None = None) -> int:
    """Run a node until SIGTERM/SIGINT, ``stop_event`` or an admin drain; returns an
    exit code.  ``freeze_gc`` (``tillwire serve``): once started, move every object
    alive (modules, configuration, the loaded registry) out of the cyclic garbage
    collector's sight and space out its full collections (see gcpolicy).
    ``worker``/``node_name``: this process's index among its node's workers and the
    node's id (default: derived, see config.node_id)."""
    from .audit import open_audit_log
    from .node import Node

    cfg.require_secret()
    loop = asyncio.get_running_loop()
    os.makedirs(cfg.server.data_dir, exist_ok=True)
    try:
        tls = make_ssl_context(cfg)
    except (OSError, ssl.SSLError) as exc:
        log.error("tls: cannot load tls.cert=%s tls.key=%s tls.client_ca=%s: %s",
                  cfg.tls.cert, cfg.tls.key, cfg.tls.client_ca, exc)
        return 1
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
        await node.start(ssl=tls, reuse_port=cfg.server.workers > 1)
    except Exception as exc:
        # (Redis unreachable, the port taken): one line naming the cause
        log.error("cannot start worker %d of node %s: %s", worker, nid, exc)
        await node.stop()
        audit.close()
        if shared is not None:
            await shared.close()
        return 1
    for host, port in node.addresses:
        log.info("listening host=%s port=%s node=%s worker=%d store=%s tls=%s "
                 "max_connections=%d", host, port, node.node_id, worker, cfg.store.backend,
                 "off" if tls is None else
                 "mutual-required" if cfg.tls.require_client_cert else
                 "mutual-optional" if cfg.tls.client_ca else "on", node.max_connections)
    admin = None
    if cfg.admin.port:
        from .admin import start_admin

        try:
            admin = await start_admin(node, cfg, audit, reuse_port=cfg.server.workers > 1)
        except OSError as exc:
            log.error("admin API: cannot listen on admin.host=%s admin.port=%s: %s",
                      cfg.admin.host, cfg.admin.port, exc)
            await node.stop()
            audit.close()
            if shared is not None:
                await shared.close()
            return 1
        if not cfg.admin.tokens:
            log.warning("admin API has no tokens: every /v1 call is refused (set "
                        "[[admin.tokens]] or TILLWIRE_ADMIN_TOKEN)")
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
    log.info("stopped node=%s worker=%d", node.node_id, worker)
    return node.exit_code


def serve(cfg: Config) -> int:
    """Entry point of ``tillwire serve``."""
    setup_logging(cfg.log)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("configuration %s", orjson.dumps(cfg.to_dict()).decode())   # secrets masked
    if cfg.server.workers > 1:
        from .supervisor import serve_workers

        return serve_workers(cfg, node_id(cfg), _worker)
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
