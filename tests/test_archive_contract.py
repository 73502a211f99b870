"""One suite of ChannelArchive contract tests (P2/P3 channel history), run
against every backend: ``store.archive`` of each store backend in turn.

``archive_factory`` reopens what it made: SQLite stores of one test share
one file, Redis stores one key prefix, and a memory store, which nothing survives, is reopened as the
same object (what lives in a process lives as long as the object), so the
same tests check what a load gives back after appends on both.  How the
SQLite writer orders stream appends against P0/P1 commits is tested with
the store (tests/test_store_contract.py).
"""

from __future__ import annotations

import time

import pytest

from backends import T0, run_with, stream_entry
from tillwire.server.archive import ChannelArchive


@pytest.fixture
def archive_factory(store_factory):
    """``store_factory``, but a memory store is made once and then reopened."""
    if store_factory.backend != "memory":
        return store_factory
    made = []

    def make(**kw):
        if not made:
            made.append(store_factory(**kw))
        return made[0]

    make.backend = store_factory.backend
    return make


def test_backend_satisfies_protocol(store_factory):
    assert isinstance(store_factory().archive, ChannelArchive)


def test_streams_persist_history_and_last_values(archive_factory):
    p2, p3 = "store:acme/s1", "tenant:acme"
    now = T0 + 1000

    async def write(store):
        archive = store.archive
        archive.configure(5, 3600.0)
        epoch = store.epoch
        for i in range(1, 13):
            archive.append(p2, 2, epoch, stream_entry(i, f"sku{i % 3}", version=i,
                                                      created=now - 100 + i))
        # A stale version of sku0 (newest is version 12) never replaces it.
        archive.append(p2, 2, epoch, stream_entry(13, "sku0", version=3, created=now - 80))
        # Equal versions: the later offset wins.
        archive.append(p2, 2, epoch, stream_entry(14, "sku1", version=10, created=now - 79))
        for i in range(1, 5):
            archive.append(p3, 3, epoch, stream_entry(
                i, created=now - 5000 if i == 1 else now - 10,
                expires=now - 1 if i == 2 else 0.0, kind="note"))
        return epoch

    async def read(store):
        return store.epoch, await store.archive.load(5, 3600.0, now)

    epoch = run_with(archive_factory, write)
    epoch2, states = run_with(archive_factory, read)
    assert epoch2 == epoch
    by_name = {(s.name, s.lane): s for s in states}
    s2 = by_name[(p2, 2)]
    assert (s2.epoch, s2.offset) == (epoch, 14)
    assert [e.offset for e in s2.history] == [10, 11, 12, 13, 14]
    assert s2.history[0] == stream_entry(10, "sku1", version=10, created=now - 90)
    assert {e.key: (e.offset, e.version) for e in s2.lvc} == \
        {"sku0": (12, 12), "sku1": (14, 10), "sku2": (11, 11)}
    assert [e.offset for e in s2.lvc] == sorted(e.offset for e in s2.lvc)
    s3 = by_name[(p3, 3)]
    # Entry 1 is older than history_age, entry 2 expired: neither is loaded.
    assert (s3.offset, [e.offset for e in s3.history], s3.lvc) == (4, [3, 4], [])

    # A different epoch resets that stream's history and last values.
    async def reset(store):
        store.archive.configure(5, 3600.0)
        store.archive.append(p2, 2, epoch + 1, stream_entry(1, "sku9", version=1, created=now))
        return await store.archive.load(5, 3600.0, now)

    async def after_reset(store):
        return await store.archive.load(5, 3600.0, now)

    run_with(archive_factory, reset)
    states = {(s.name, s.lane): s for s in run_with(archive_factory, after_reset)}
    assert (states[(p2, 2)].epoch, states[(p2, 2)].offset) == (epoch + 1, 1)
    assert [e.key for e in states[(p2, 2)].lvc] == ["sku9"]
    assert [e.offset for e in states[(p3, 3)].history] == [3, 4]


def test_a_load_applies_its_own_bounds(archive_factory):
    now = T0 + 1000

    async def write(store):
        store.archive.configure(10, 3600.0)
        for i in range(1, 9):
            store.archive.append("tenant:acme", 3, store.epoch,
                                 stream_entry(i, created=now - 90 + 10 * i, kind="note"))

    async def read(store):
        narrow = await store.archive.load(3, 3600.0, now)
        recent = await store.archive.load(10, 45.0, now)
        return [[e.offset for e in s.history] for s in (narrow + recent)]

    run_with(archive_factory, write)
    assert run_with(archive_factory, read) == [[6, 7, 8], [5, 6, 7, 8]]


def test_without_history_only_last_values_are_kept(archive_factory):
    now = T0 + 1000

    async def write(store):
        store.archive.configure(0, 3600.0)
        for i in range(1, 4):
            store.archive.append("store:acme/s1", 2, store.epoch,
                                 stream_entry(i, f"sku{i % 2}", version=i, created=now))
            store.archive.append("tenant:acme", 3, store.epoch, stream_entry(i, created=now))

    async def read(store):
        return {(s.name, s.lane): (s.offset, [e.offset for e in s.history],
                                   [e.offset for e in s.lvc])
                for s in await store.archive.load(0, 3600.0, now)}

    run_with(archive_factory, write)
    assert run_with(archive_factory, read) == {
        ("store:acme/s1", 2): (3, [], [2, 3]), ("tenant:acme", 3): (3, [], [])}


def test_expire_kind_deletes_only_that_kind_and_older(archive_factory):
    now = time.time()
    name = "member:acme/m1"

    async def write(store):
        store.archive.configure(100, 86400.0)
        epoch = store.epoch
        for i, (kind, age) in enumerate([("member.notice", 500), ("promo.offer", 500),
                                         ("member.notice", 50), ("member.notice", 500)], 1):
            store.archive.append(name, 3, epoch, stream_entry(i, created=now - age, kind=kind))
        # Appends still queued in the writer are covered too.
        return await store.archive.expire_kind("member.notice", now - 100)

    async def read(store):
        return await store.archive.load(100, 86400.0, now)

    assert run_with(archive_factory, write) == 2
    [state] = run_with(archive_factory, read)
    assert [(e.offset, e.kind) for e in state.history] == [(2, "promo.offer"),
                                                          (3, "member.notice")]
    assert state.offset == 4


def test_forget_deletes_both_lanes_of_one_channel_only(archive_factory):
    mine, other = "member:acme/m1", "member:acme/m2"
    now = T0 + 1000

    async def write(store):
        archive = store.archive
        archive.configure(10, 3600.0)
        epoch = store.epoch
        for i in range(1, 4):
            archive.append(mine, 3, epoch, stream_entry(i, created=now, kind="note"))
            archive.append(other, 3, epoch, stream_entry(i, created=now, kind="note"))
        archive.append(mine, 2, epoch, stream_entry(1, "k", version=1, created=now))
        # Forgotten in the same commit as the appends before it: they go too.
        gone = await archive.forget(mine)
        assert await archive.forget("member:acme/nobody") == 0
        return gone

    async def read(store):
        return await store.archive.load(10, 3600.0, now)

    gone = run_with(archive_factory, write)
    states = run_with(archive_factory, read)
    assert gone == 3 + 1 + 1                   # P3 history, P2 history and its last value
    assert [(s.name, s.lane, [e.offset for e in s.history]) for s in states] == \
        [(other, 3, [1, 2, 3])]

    # The channel starts afresh afterwards.
    async def again(store):
        store.archive.configure(10, 3600.0)
        store.archive.append(mine, 3, store.epoch, stream_entry(7, created=now, kind="note"))

    run_with(archive_factory, again)
    by = {(s.name, s.lane): s for s in run_with(archive_factory, read)}
    assert [e.offset for e in by[(mine, 3)].history] == [7]
