"""The SQLite store's checkpointer: a thread beside the writer that copies the
WAL into the database file (PASSIVE checkpoints on a connection of its
own), which SQLite would otherwise do inside one of the writer's commits."""

from __future__ import annotations

import logging
import sqlite3
import threading

from .store_sqlite_schema import connect

log = logging.getLogger("tillwire.store.sqlite")


class Checkpointer:
    """Copies committed WAL pages into the database file on its own connection.

    SQLite's automatic checkpoint would run inside the writer's COMMIT (with
    its fsyncs of the WAL and the database file), delaying every request of
    that group commit.  Here a PASSIVE checkpoint runs at most every
    ``interval`` seconds after commits, concurrently with the writer (WAL
    allows it); its own ``synchronous`` equals the writer's, so the database
    file is synced before the writer may restart the WAL.
    """

    def __init__(self, path: str, synchronous: str, interval: float = 0.25) -> None:
        self.path = path
        self.synchronous = synchronous
        self.interval = interval
        self.wake = threading.Event()
        self.halt = threading.Event()
        self.checkpoints = 0

    def run(self) -> None:
        try:
            conn = connect(self.path)
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        except sqlite3.Error as exc:         # pragma: no cover - the writer checkpoints then
            log.error("store checkpointer cannot open the database: %s", exc)
            return
        try:
            while not self.halt.is_set():
                self.wake.wait()
                # Let commits pile up: fewer, larger checkpoints.
                if self.halt.wait(self.interval):
                    break
                self.wake.clear()
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error as exc:   # pragma: no cover - retried after the next commit
                    log.warning("store checkpoint failed: %s", exc)
        finally:
            conn.close()

    def stop(self) -> None:
        self.halt.set()
        self.wake.set()
