"""``tillwire serve``: run one server process on the embedded default.

Builds the store named by the config, the node, and the optional admin
plane, installs signal handlers (SIGTERM/SIGINT stop the node), and runs
until stopped on a uvloop event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import uvloop

from ..core.codes import Code
from .config import Config, node_id
from .logs import setup_logging

log = logging.getLogger("tillwire.server")


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
                           dedup_window=cfg.delivery.dedup_window)
    raise ValueError(f"store.backend: unknown backend {backend!r}")


async def run(cfg: Config, *, ready=None, stop_event: asyncio.Event | None = None) -> int:
    """Run a node until SIGTERM/SIGINT (or ``stop_event``); returns an exit code."""
    from .node import Node

    cfg.require_secret()
    loop = asyncio.get_running_loop()
    os.makedirs(cfg.server.data_dir, exist_ok=True)
    node = Node(cfg, make_store(cfg), loop=loop, node_id=node_id(cfg))
    await node.start()
    for host, port in node.addresses:
        log.info("listening host=%s port=%s node=%s store=%s", host, port, node.node_id,
                 cfg.store.backend)
    stop = stop_event or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    if ready is not None:
        ready(node)
    await stop.wait()
    log.info("stopping node=%s", node.node_id)
    await node.stop(Code.SHUTDOWN, "server stopping")
    return 0


def serve(cfg: Config) -> int:
    """Entry point of ``tillwire serve``."""
    setup_logging(cfg.log)
    uvloop.install()
    return asyncio.run(run(cfg))
