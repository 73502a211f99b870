"""Embedded SQLite Store backend: P0/P1 inboxes that survive crashes and power loss.

One file (``<data_dir>/tillwire.db``) in WAL mode, three workers:

* the **writer** (store_sqlite_writer.py; by default in a process of its
  own, see store_writer.py, ``writer="thread"`` keeps it a thread of the
  server) owns the only write connection and runs every write request in
  arrival order, every request queued at that moment in ONE transaction
  with one commit: group commit.  A request's future resolves only after its
  commit, so a SENDACK is never sent for data a power loss could take back;
* the **reader** (store_sqlite_reader.py) owns a second connection
  (``query_only``) and answers every read, so reads never wait behind an
  fsync (WAL readers see the last commit);
* the **checkpointer** (store_sqlite_checkpoint.py, a thread beside the
  writer) copies the WAL into the database file on a third connection.

The event loop never touches SQLite: a request is a tuple put on a queue
(never blocks) or written to the writer process's socket, and each batch of
results comes back in ONE ``loop.call_soon_threadsafe`` (threads) or one
message (the process); see store_sqlite_requests.py.

This module is the facade the node uses (all on the event loop):
:class:`SQLiteStore`, with the records, terminals and archive of the same
database as ``store.records``, ``store.terminals`` and ``store.archive``.
They share the store's writer and reader (no connection or thread of their
own), so their writes join the same group commits in the same order as
today's messages.  Tables and migrations: store_sqlite_schema.py; backups
from another process: store_sqlite_backup.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from typing import Callable, Sequence

from .archive_sqlite import SQLiteArchive
from .records_sqlite import SQLiteRecords
from .store import Accepted, Completion, DeadLetter, InboxEntry, ReceiptEvent, Redriven, Trace
from .store_sqlite_reader import Reader
from .store_sqlite_requests import STOP, Requests, post
from .store_sqlite_writer import COMMIT_BUCKETS, STAGE_ROWS, Writer
from .store_writer import STOP_TIMEOUT, WriterGone, WriterProcess
from .terminals_sqlite import SQLiteTerminals

__all__ = ["DB_FILENAME", "SQLiteStore"]

log = logging.getLogger("tillwire.store.sqlite")

DB_FILENAME = "tillwire.db"
"""File name of the store inside ``server.data_dir``."""

SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
WRITER_MODES = ("process", "thread")


class SQLiteStore:
    """Store backend in an embedded SQLite database (see the module docstring).

    ``synchronous``: SQLite's PRAGMA (OFF, NORMAL, FULL, EXTRA); with FULL
    (the default) an accepted message survives a power loss.
    ``group_commit_ms``: how long an idle writer waits for more requests to
    share a commit (0 = commit at once).  ``dedup_window``: seconds a
    (sender, ref) is remembered.  ``stage_rows``: staged inbox entries that
    make the writer merge them (see ``Writer.merge_staged``; tests set it
    low to merge often).

    Besides the Store protocol, the backend's own operations: :meth:`stats`,
    :meth:`backup`, :attr:`write_failure` and the ``on_write_failure`` hook.
    """

    def __init__(self, path: str, *, synchronous: str = "FULL", group_commit_ms: float = 2.0,
                 dedup_window: float = 86400.0, writer: str = "process",
                 stage_rows: int = STAGE_ROWS) -> None:
        sync = synchronous.upper()
        if sync not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}, got {synchronous!r}")
        if group_commit_ms < 0:
            raise ValueError(f"group_commit_ms must be >= 0, got {group_commit_ms!r}")
        if stage_rows < 1:
            raise ValueError(f"stage_rows must be >= 1, got {stage_rows!r}")
        if writer not in WRITER_MODES:
            raise ValueError(f"writer must be one of {', '.join(WRITER_MODES)}, got {writer!r}")
        self.path = path
        self.epoch = 0
        if writer == "thread":
            self._writer = Writer(path, sync, group_commit_ms, dedup_window, stage_rows)
        else:
            self._writer = WriterProcess(path, sync, group_commit_ms, dedup_window, stage_rows)
        self._reader = Reader(path)
        # The state (new -> open -> closing -> closed) lives in the requests,
        # which the records, terminals and archive share.
        requests = self._requests = Requests(self._writer, self._reader)
        self._write = requests.write
        self._read = requests.read
        self.records = SQLiteRecords(requests)
        self.terminals = SQLiteTerminals(requests)
        self.archive = SQLiteArchive(requests)
        # Called (on the loop) with a reason when writes fail for good: the
        # writer process died while the store was open.
        self.on_write_failure: Callable[[str], None] | None = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        requests = self._requests
        if requests.state != "new":
            raise RuntimeError(f"SQLiteStore.open: the store is {requests.state}")
        loop = requests.loop = asyncio.get_running_loop()
        self._reader.loop = loop
        writer = self._writer
        if isinstance(writer, Writer):
            writer.post = functools.partial(post, loop)
            ready = loop.create_future()
            thread = threading.Thread(target=writer.run, args=(ready,),
                                      name="tillwire-store-writer", daemon=True)
            thread.start()
            self._threads.append(thread)
            info = await ready
        else:
            writer.on_gone = self._on_writer_gone
            info = await writer.start(loop)
        ready = loop.create_future()
        reader = threading.Thread(target=self._reader.run, args=(ready,),
                                  name="tillwire-store-reader", daemon=True)
        reader.start()
        self._threads.append(reader)
        try:
            await ready
        except BaseException:
            await self._stop_writer()
            raise
        self.epoch = info["epoch"]
        requests.state = "open"

    async def _stop_writer(self) -> None:
        fut = self._requests.loop.create_future()
        self._writer.submit(None, (), fut, 0)
        if isinstance(self._writer, Writer):
            await fut
            return
        try:
            await asyncio.wait_for(fut, STOP_TIMEOUT)
        except WriterGone as exc:       # it died earlier: nothing left to commit
            log.warning("%s", exc)
        except asyncio.TimeoutError:
            log.error("store writer process did not stop in %.0f s: killed", STOP_TIMEOUT)
            self._writer.kill()
        finally:
            await self._writer.wait_exit()

    async def close(self) -> None:
        """Commit what is queued, checkpoint the WAL and stop both threads."""
        requests = self._requests
        if requests.state != "open":
            if requests.state == "new":
                requests.state = "closed"
            return              # closed, or another close() is under way
        requests.state = "closing"
        stopped_reader = requests.loop.create_future()
        self._reader.queue.put((STOP, (), stopped_reader, 0))
        try:
            await stopped_reader
            await self._stop_writer()
        finally:
            requests.state = "closed"
            for thread in self._threads:
                thread.join(timeout=5.0)
            self._threads.clear()

    def _on_writer_gone(self, reason: str) -> None:
        log.error("store writer process ended unexpectedly: %s", reason)
        if self._requests.state == "open" and self.on_write_failure is not None:
            self.on_write_failure(f"writer process: {reason}")

    @property
    def write_failure(self) -> str:
        """Why writes fail for good ("" while they can succeed): the writer process is gone."""
        gone = getattr(self._writer, "gone", None)
        return f"writer process: {gone}" if gone is not None else ""

    # -- the Store protocol --------------------------------------------------------------
    # Arguments cross to another thread: callers must not mutate them after the call.

    async def accept_many(self, items: Sequence) -> list[Accepted]:
        items = list(items)
        if not items:
            return []
        return await self._write("accept_many", (items,), len(items))

    def accept_many_then(self, items: Sequence, callback) -> None:
        items = list(items)
        self._write("accept_many", (items,), len(items), Completion(callback))

    async def inbox(self, terminal: str, lane: int, after: int, limit: int) -> list[InboxEntry]:
        return await self._read("inbox", (terminal, lane, after, limit))

    async def positions(self, terminal: str) -> tuple[int, int, int, int]:
        return await self._read("positions", (terminal,))

    async def positions_many(self, terminals: Sequence[str]
                             ) -> list[tuple[int, int, int, int]]:
        return await self._read("positions_many", (list(terminals),))

    async def ack_many(self, acks: Sequence, now: float) -> list[ReceiptEvent]:
        acks = list(acks)
        return await self._write("ack_many", (acks, now), len(acks))

    async def delivered_many(self, ranges: Sequence, now: float) -> list[ReceiptEvent]:
        ranges = list(ranges)
        return await self._write("delivered_many", (ranges, now), len(ranges))

    async def reject(self, terminal: str, lane: int, seq: int, reason: str,
                     now: float) -> DeadLetter | None:
        return await self._write("reject", (terminal, lane, seq, reason, now))

    async def expire(self, now: float) -> list[DeadLetter]:
        return await self._write("expire", (now,))

    async def trace(self, msg_id: int) -> Trace | None:
        return await self._read("trace", (msg_id,))

    async def dead_letters(self, tenant: str | None, limit: int) -> list[DeadLetter]:
        return await self._read("dead_letters", (tenant, limit))

    async def redrive(self, terminal: str, msg_id: int | None, now: float,
                      ttls: tuple[float, float], limit: int) -> list[Redriven]:
        return await self._write("redrive", (terminal, msg_id, now, tuple(ttls), limit))

    async def trim(self, now: float, keep_acked: float) -> int:
        return await self._write("trim", (now, keep_acked))

    # -- operations of this backend ------------------------------------------------------

    async def stats(self) -> dict:
        """Sizes (messages, unacked entries, dead letters, registered terminals,
        streams, bytes on disk) and the writer's counters (commits, ...)."""
        return await self._read("stats", (self._writer.counters,))

    def writer_metrics(self) -> dict:
        """The writer's health for ``/metrics``, read without I/O: ``queue``
        (write requests waiting for their commit) and, as of its latest
        commit, ``failed_commits``, ``commit_seconds`` (the sum) and
        ``commit_counts`` (COMMITs per bucket of ``commit_bounds``, seconds)."""
        counters = self._writer.counters()
        return {"queue": self._writer.backlog(), "failed_commits": counters["failed_commits"],
                "commit_seconds": counters["commit_seconds"],
                "commit_counts": counters["commit_counts"], "commit_bounds": COMMIT_BUCKETS}

    async def backup(self, dest_path: str) -> None:
        """Write a consistent copy of the database to ``dest_path`` (online;
        runs on the reader thread, writers go on committing meanwhile)."""
        return await self._read("backup", (os.fspath(dest_path),))
