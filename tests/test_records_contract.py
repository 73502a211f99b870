"""One suite of Records contract tests (the services' key-value records), run
against every backend: ``store.records`` of each store backend in turn
(``store_factory``, conftest.py), then a differential test of the memory,
SQLite and Redis records against a sorted list, and SQLite-only tests (the scan's query plan, records across reopen).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends import make_backend, run_with
from redis_server import fresh_prefix, redis_url
from tillwire.server.records import SCAN_PAGE, Records, scan_all
from tillwire.server.store_memory import MemoryStore
from tillwire.server.store_redis import RedisStore
from tillwire.server.store_sqlite import DB_FILENAME, SQLiteStore
from tillwire.server.store_sqlite_reader import Reader
from tillwire.server.store_sqlite_schema import migrate


# --------------------------------------------------------------------------
# The contract, on every backend


def test_backend_satisfies_protocol(store_factory):
    assert isinstance(store_factory().records, Records)


def test_key_value_records(store_factory):
    async def body(store):
        records = store.records
        await records.put("ticket", "acme/T-2", b'{"n":2}', 100.0)
        await records.put("ticket", "acme/T-1", b'{"n":1}', 50.0)
        await records.put("ticket", "other/T-1", b'{"n":9}', 100.0)
        await records.put("conv", "acme/c1", b"{}", 100.0)
        await records.put("ticket", "acme/T-2", b'{"n":22}', 120.0)     # replace
        assert await records.get("ticket", "acme/T-2") == b'{"n":22}'
        assert await records.get("ticket", "acme/T-9") is None
        assert [k for k, _ in await records.scan("ticket", "acme/")] == ["acme/T-1", "acme/T-2"]
        assert [k for k, _ in await records.scan("ticket", "acme/", after="acme/T-1")] == \
            ["acme/T-2"]
        assert len(await records.scan("ticket", limit=2)) == 2
        assert await records.expire("ticket", 60.0) == 1             # acme/T-1 is older
        assert await records.delete("ticket", "other/T-1") is True
        assert await records.delete("ticket", "other/T-1") is False
        assert await records.delete_prefix("ticket", "acme/") == 1
        assert await records.scan("ticket") == []
        assert await records.get("conv", "acme/c1") == b"{}"
    run_with(store_factory, body)


def test_put_new_claims_a_key_once(store_factory):
    async def body(store):
        kv = store.records
        assert await kv.put_new("claim", "acme/cv1", b"agent-1", 10.0) == b"agent-1"
        assert await kv.put_new("claim", "acme/cv1", b"agent-2", 11.0) == b"agent-1"
        assert await kv.get("claim", "acme/cv1") == b"agent-1"
        # Claims at once: one wins, every claimer learns which.
        won = await asyncio.gather(*(kv.put_new("claim", "acme/cv2", b"a%d" % i, 12.0)
                                     for i in range(5)))
        assert len(set(won)) == 1 and won[0] in {b"a%d" % i for i in range(5)}
        # A claim is a record like any: deleted, it may be claimed again; it ages out.
        assert await kv.delete("claim", "acme/cv1")
        assert await kv.put_new("claim", "acme/cv1", b"agent-3", 13.0) == b"agent-3"
        assert await kv.expire("claim", 12.5) == 1               # (cv2's, put at 12.0)
        assert [k for k, _ in await kv.scan("claim")] == ["acme/cv1"]
    run_with(store_factory, body)


def test_replace_puts_only_over_the_value_expected(store_factory):
    async def body(store):
        kv = store.records
        # None expected: only where there is no record (a first write).
        assert await kv.replace("dir", "acme/s1", None, b"v1", 10.0) == b"v1"
        assert await kv.replace("dir", "acme/s1", None, b"other", 11.0) == b"v1"
        # A write over the value read wins; one over a value since replaced
        # is refused with what is there now, and changes nothing.
        assert await kv.replace("dir", "acme/s1", b"v1", b"v2", 12.0) == b"v2"
        assert await kv.replace("dir", "acme/s1", b"v1", b"v3", 13.0) == b"v2"
        assert await kv.get("dir", "acme/s1") == b"v2"
        # Expecting a record that is not there: refused, still none.
        assert await kv.replace("dir", "acme/s2", b"v1", b"v2", 14.0) is None
        assert await kv.get("dir", "acme/s2") is None
        # Read-modify-writes at once from the same value: one wins.
        won = await asyncio.gather(*(kv.replace("dir", "acme/s1", b"v2", b"w%d" % i, 15.0)
                                     for i in range(5)))
        assert len(set(won)) == 1 and won[0] in {b"w%d" % i for i in range(5)}
        # A replaced record is written at its new time (retention).
        assert await kv.expire("dir", 14.5) == 0
        assert [k for k, _ in await kv.scan("dir")] == ["acme/s1"]
        assert await kv.expire("dir", 15.5) == 1
    run_with(store_factory, body)


def test_kv_scan_reverse_is_newest_first_within_prefix_and_limit(store_factory):
    async def body(store):
        records = store.records
        # Neighbours of the prefix on both sides, and a key equal to the prefix
        # without its slash: none of them belongs to "acme/cv1/".
        for key in ("acme/cv0/9", "acme/cv1", "acme/cv1/001", "acme/cv1/002", "acme/cv1/003",
                    "acme/cv1/004", "acme/cv10/001", "acme/cv2/001", "other/cv1/005"):
            await records.put("chat", key, key.encode(), 100.0)
        await records.put("conv", "acme/cv1/999", b"{}", 100.0)      # another namespace
        newest = await records.scan("chat", "acme/cv1/", reverse=True)
        assert newest == [(k, k.encode()) for k in
                          ("acme/cv1/004", "acme/cv1/003", "acme/cv1/002", "acme/cv1/001")]
        assert [k for k, _ in await records.scan("chat", "acme/cv1/", limit=2, reverse=True)] \
            == ["acme/cv1/004", "acme/cv1/003"]
        assert await records.scan("chat", "acme/cv1/", limit=0, reverse=True) == []
        # Without a prefix: the whole namespace, highest key first.
        everything = [k for k, _ in await records.scan("chat", reverse=True)]
        assert everything == sorted(everything, reverse=True) and len(everything) == 9
        assert everything[0] == "other/cv1/005"
        # after is still an exclusive lower bound; before an exclusive upper bound
        # (also when scanning forward); "" leaves a bound open.
        assert [k for k, _ in await records.scan("chat", "acme/cv1/", "acme/cv1/002",
                                                 reverse=True)] == \
            ["acme/cv1/004", "acme/cv1/003"]
        assert [k for k, _ in await records.scan("chat", "acme/cv1/", before="acme/cv1/003",
                                                 reverse=True)] == \
            ["acme/cv1/002", "acme/cv1/001"]
        assert [k for k, _ in await records.scan("chat", "acme/cv1/", before="acme/cv1/003")] \
            == ["acme/cv1/001", "acme/cv1/002"]
        assert [k for k, _ in await records.scan("chat", "acme/cv1/", "acme/cv1/001",
                                                 before="acme/cv1/004", reverse=True)] == \
            ["acme/cv1/003", "acme/cv1/002"]
        # A before above the prefix's keys does not widen the prefix.
        assert [k for k, _ in await records.scan("chat", "acme/cv1/", before="zzz",
                                                 reverse=True)] == [k for k, _ in newest]
        # The forward scan is unchanged.
        assert [k for k, _ in await records.scan("chat", "acme/cv1/")] == \
            [k for k, _ in reversed(newest)]
    run_with(store_factory, body)


def test_kv_scan_reverse_pages_with_before_without_loss_or_duplicates(store_factory):
    async def body(store):
        records = store.records
        keys = [f"acme/cv1/{i:013d}-{i}" for i in range(1, 38)]
        for key in keys:
            await records.put("chat", key, key.encode(), 100.0)
        await records.put("chat", "acme/cv1/~", b"{}", 100.0)       # above every page
        await records.put("chat", "acme/cv2/0000000000001-1", b"{}", 100.0)
        got: list[str] = []
        before = "acme/cv1/~"
        pages = 0
        while True:
            page = await records.scan("chat", "acme/cv1/", limit=5, reverse=True, before=before)
            got += [k for k, _ in page]
            pages += 1
            if len(page) < 5:
                break
            before = page[-1][0]
        assert got == keys[::-1]                      # every key once, newest first
        assert pages == 8                             # 7 full pages and one of 2
        # The page below the oldest key is empty, as are empty prefixes,
        # namespaces and ranges.
        assert await records.scan("chat", "acme/cv1/", reverse=True, before=keys[0]) == []
        assert await records.scan("chat", "acme/cv9/", reverse=True) == []
        assert await records.scan("nothing", reverse=True) == []
        assert await records.scan("chat", "acme/cv1/", keys[20], reverse=True,
                                  before=keys[20]) == []
        assert await records.scan("chat", "acme/cv1/", keys[21], before=keys[20]) == []
    run_with(store_factory, body)


def test_scan_all_pages_through_a_namespace_in_key_order(store_factory):
    keys = [f"acme/T-{i:05d}" for i in range(SCAN_PAGE + 5)]

    async def body(store):
        records = store.records
        await asyncio.gather(*(records.put("ticket", key, key.encode(), 1.0) for key in keys),
                             records.put("ticket", "other/T-1", b"{}", 1.0))
        got = [k async for k, _ in scan_all(records, "ticket", "acme/")]
        assert got == keys                               # two pages, every key once
        assert [k async for k, _ in scan_all(records, "ticket", "acme/", keys[-3])] == keys[-2:]
        firsts = []
        async for key, value in scan_all(records, "ticket"):
            firsts.append((key, value))
            if len(firsts) == 2:
                break
        assert firsts == [(k, k.encode()) for k in keys[:2]]
    run_with(store_factory, body)


# --------------------------------------------------------------------------
# Differential: every backend against a sorted list


_KV_KEYS = st.text(alphabet="ab/\u00e9\U0001f600", max_size=4)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(keys=st.sets(_KV_KEYS, max_size=20),
       scans=st.lists(st.tuples(st.text(alphabet="ab/\u00e9", max_size=2), _KV_KEYS, _KV_KEYS,
                                st.integers(0, 6), st.booleans()), min_size=1, max_size=15))
def test_kv_scan_matches_a_sorted_list_on_every_backend(tmp_path, keys, scans):
    """Any prefix/after/before/limit/direction: every backend answers what filtering a
    sorted list of the keys answers (non-ASCII keys: SQLite and Redis compare UTF-8
    bytes, which orders like Python compares code points)."""
    path = str(tmp_path / f"kv-{time.monotonic_ns()}.db")

    def expected(prefix, after, before, limit, reverse):
        found = sorted((k for k in keys if k.startswith(prefix) and k > after and
                        (not before or k < before)), reverse=reverse)
        return [(k, k.encode()) for k in found[:limit]]

    async def main():
        stores = [MemoryStore(), SQLiteStore(path, synchronous="OFF", group_commit_ms=0.0),
                  RedisStore(redis_url(), prefix=fresh_prefix())]
        for store in stores:
            await store.open()
        try:
            for store in stores:
                records = store.records
                for key in keys:
                    await records.put("ns", key, key.encode(), 1.0)
                for prefix, after, before, limit, reverse in scans:
                    got = await records.scan("ns", prefix, after, limit, reverse=reverse,
                                             before=before)
                    assert got == expected(prefix, after, before, limit, reverse), \
                        (type(store).__name__, prefix, after, before, limit, reverse)
        finally:
            for store in stores:
                await store.close()

    asyncio.run(main())


# --------------------------------------------------------------------------
# SQLite only


def test_sqlite_kv_scan_walks_the_primary_key_in_both_directions():
    """A reverse scan is a bounded walk of the (ns, key) primary key: no sort of
    the prefix's rows, so its cost does not grow with the conversation."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrate(conn)
    for sql in Reader._KV_SCAN.values():
        plan = " ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql,
                                                         ("ns", "a", "b", 10)))
        assert "USING PRIMARY KEY" in plan and "TEMP B-TREE" not in plan, (sql, plan)
    conn.close()


def test_sqlite_key_value_records_survive_reopen(tmp_path):
    path = str(tmp_path / DB_FILENAME)

    def make(**kw):
        return make_backend("sqlite", path, **kw)

    async def write(store):
        await store.records.put("directory", "acme/s1", b'{"timezone":"Asia/Shanghai"}', 1.0)

    async def read(store):
        return await store.records.get("directory", "acme/s1")

    run_with(make, write)
    assert run_with(make, read) == b'{"timezone":"Asia/Shanghai"}'
