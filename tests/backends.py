"""The store backends under test, shared by the contract suites.

``tests/test_store_contract.py``, ``test_records_contract.py``,
``test_terminals_contract.py`` and ``test_archive_contract.py`` run on every
backend through the ``store_factory`` fixture (conftest.py): memory; SQLite
with its writer in a process (the default; inbox entries stay staged in
small tests) and in a thread, merging staged entries past 3 (so reads meet
merged, staged and mixed inboxes); Redis, on the session's ``redis-server``
(redis_server.py) under a key prefix of the test's own, so stores made by
one test share their data and tests never see each other's keys.
"""

from __future__ import annotations

import asyncio

from tillwire.server.archive import StreamEntry
from redis_server import fresh_prefix, redis_url
from tillwire.server.store_memory import MemoryStore
from tillwire.server.store_redis import RedisStore
from tillwire.server.store_sqlite import SQLiteStore
from tillwire.server.store_sqlite_writer import STAGE_ROWS

BACKENDS = ["memory", "sqlite", "sqlite-thread", "redis"]
T0 = 1_700_000_000.0


def make_backend(kind: str, path: str, **kw):
    """A new, unopened store of backend ``kind`` (SQLite: at ``path``; Redis:
    under ``kw["prefix"]``, a fresh one when not given)."""
    if kind == "memory":
        return MemoryStore(dedup_window=kw.get("dedup_window", 86400.0))
    if kind == "redis":
        return RedisStore(redis_url(), prefix=kw.get("prefix") or fresh_prefix(),
                          dedup_window=kw.get("dedup_window", 86400.0))
    return SQLiteStore(path, synchronous=kw.get("synchronous", "NORMAL"),
                       group_commit_ms=kw.get("group_commit_ms", 0.0),
                       dedup_window=kw.get("dedup_window", 86400.0),
                       writer=kw.get("writer", "thread" if kind == "sqlite-thread" else "process"),
                       stage_rows=kw.get("stage_rows", 3 if kind == "sqlite-thread" else STAGE_ROWS))


def run_with(make, body, **kw):
    """Open a store from ``make``, run ``await body(store)``, close it; return the result."""
    async def main():
        store = make(**kw)
        await store.open()
        try:
            return await body(store)
        finally:
            await store.close()
    return asyncio.run(main())


def stream_entry(offset, key="", version=0, created=T0, expires=0.0, kind="price"):
    """A channel stream entry whose payload names its offset."""
    return StreamEntry(offset, kind, key, version, b'{"o":%d}' % offset, created, expires)
