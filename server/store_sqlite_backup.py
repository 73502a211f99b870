"""Backups of the SQLite store: a consistent copy of a live database.

:func:`backup_file` copies it from another process (``tillwire backup``);
the store's own online backup (``SQLiteStore.backup``) runs
:func:`copy_database` on its reader thread; :func:`restore_file` puts a
copy back in place of a stopped server's database (``tillwire restore``).
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import time

from .store_sqlite_schema import schema_version


def _durable_replace(tmp: str, dest: str) -> None:
    """Put the finished file ``tmp`` in place as ``dest``, its bytes on disk first."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dest)


def copy_database(source: sqlite3.Connection, dest_path: str) -> None:
    """Copy ``source`` into ``dest_path`` atomically (a temp file, then rename).

    One backup step copies every page under one read transaction, so
    concurrent commits neither block nor restart it (WAL).  The copy is a
    self-contained rollback-journal file.
    """
    dest_path = os.path.abspath(dest_path)
    tmp = f"{dest_path}.tmp-{os.getpid()}"
    for leftover in (tmp, tmp + "-journal", tmp + "-wal", tmp + "-shm"):
        if os.path.exists(leftover):
            os.unlink(leftover)
    dest = sqlite3.connect(tmp, isolation_level=None)
    try:
        source.backup(dest, pages=-1)
        dest.execute("PRAGMA journal_mode = DELETE")
        ok = dest.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise sqlite3.DatabaseError(f"backup copy failed its check: {ok}")
    finally:
        dest.close()
    _durable_replace(tmp, dest_path)


def backup_file(db_path: str, dest_path: str) -> None:
    """Copy the store at ``db_path`` to ``dest_path``, also while a server is
    writing to it (from another process).  Raises FileNotFoundError when
    there is no database and sqlite3.Error when it cannot be read."""
    if not os.path.isfile(db_path):
        raise FileNotFoundError(f"no store database at {db_path}")
    source = sqlite3.connect(db_path, isolation_level=None)
    try:
        source.execute("PRAGMA busy_timeout = 10000")
        source.execute("PRAGMA query_only = ON")
        copy_database(source, dest_path)
    finally:
        source.close()


class StoreInUse(Exception):
    """The database to replace is open in a running server."""


def restore_file(backup_path: str, db_path: str, *, now: float | None = None) -> str | None:
    """Put the backup at ``backup_path`` in place as the store at ``db_path``;
    returns the directory the database there before was moved to (None if
    there was none).  The server must not be running: raises StoreInUse if
    the database is open elsewhere, sqlite3.Error if the backup is not a
    sound Tillwire store, OSError if a file cannot be moved or written.

    The restored store gets a new inbox epoch, and its channel streams new
    epochs: terminals that processed messages after the backup was taken
    remember sequences and offsets the restored store hands out again, and
    would skip the new messages that get them.  A new epoch makes them start
    over from what the restored store has (PROTOCOL.md, RESUME and resync);
    what they see twice is flagged by the store's dedup, never lost.
    """
    now = time.time() if now is None else now
    check = sqlite3.connect(f"file:{backup_path}?mode=ro", uri=True, isolation_level=None)
    try:
        ok = check.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise sqlite3.DatabaseError(f"{backup_path} failed its check: {ok}")
        if schema_version(check) == 0:
            raise sqlite3.DatabaseError(f"{backup_path} is not a Tillwire store")
    finally:
        check.close()
    directory = os.path.dirname(os.path.abspath(db_path))
    aside = None
    if os.path.exists(db_path):
        probe = sqlite3.connect(db_path, isolation_level=None, timeout=0.5)
        try:
            probe.execute("PRAGMA locking_mode = EXCLUSIVE")
            probe.execute("BEGIN EXCLUSIVE")        # fails while a server has it open
            probe.execute("ROLLBACK")
        except sqlite3.OperationalError:
            raise StoreInUse(f"{db_path} is in use: stop the server first") from None
        finally:
            probe.close()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        aside = os.path.join(directory, f"before-restore-{stamp}")
        os.makedirs(aside, exist_ok=True)
        for suffix in ("", "-wal", "-shm"):
            # (a -wal left beside the restored file would be replayed into it)
            if os.path.exists(db_path + suffix):
                os.replace(db_path + suffix, os.path.join(aside, os.path.basename(db_path) + suffix))
    tmp = f"{db_path}.restore-{os.getpid()}"
    shutil.copyfile(backup_path, tmp)
    os.chmod(tmp, 0o600)
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        old = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        epoch = random.randrange(1, 1 << 31)         # (what a new store draws)
        while old is not None and epoch == int(old[0]):
            epoch = random.randrange(1, 1 << 31)
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('epoch', ?)", (epoch,))
        # Channel epochs are unix seconds << 16 (hub.new_epoch): above all before.
        conn.execute("UPDATE streams SET epoch = ?", ((int(now) + 1) << 16,))
        conn.execute("COMMIT")
    finally:
        conn.close()
    _durable_replace(tmp, db_path)
    return aside
