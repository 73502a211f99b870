"""Backups of the SQLite store: a consistent copy of a live database.

:func:`backup_file` copies it from another process (``tillwire backup``);
the store's own online backup (``SQLiteStore.backup``) runs
:func:`copy_database` on its reader thread.
"""

from __future__ import annotations

import os
import sqlite3


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
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dest_path)


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
