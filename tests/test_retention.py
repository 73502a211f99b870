"""retention.member_notice reaches the disk: the SQLite store's copies of old
member notices go in each maintenance round and are not loaded at start."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time

from support import aiotest, connect, start_node

from tillwire.core.codes import Lane
from tillwire.server.store_sqlite import DB_FILENAME

SQLITE = {"store.backend": "sqlite", "retention.member_notice": 1.0,
          "history.max_age": 3600.0}


def notice_rows(data_dir: str) -> int:
    with sqlite3.connect(os.path.join(data_dir, DB_FILENAME)) as db:
        return db.execute("SELECT COUNT(*) FROM stream_entries WHERE kind = 'member.notice'"
                          ).fetchone()[0]


async def publish(node) -> None:
    be = await connect(node, "hq", store="hq", roles=("backend",))
    await be.send("member.notice", {"member": "m1", "text": "Points expire"},
                  "member:acme/m1", ttl=600)
    await be.send("promo.offer", {"offer": "o1", "title": "Deal"}, "member:acme/m1", ttl=600)
    await be.close()


@aiotest()
async def test_maintenance_deletes_old_member_notices_from_the_store(tmp_path):
    node = await start_node(**SQLITE, **{"server.data_dir": str(tmp_path)})
    try:
        await publish(node)
        await asyncio.sleep(0.1)
        await node.store.archive.expire_kind("none", 0)       # a write barrier
        assert notice_rows(str(tmp_path)) == 1
        await node._expire_services(time.time())
        assert notice_rows(str(tmp_path)) == 1                # not old yet
        await asyncio.sleep(1.1)
        await node._expire_services(time.time())
        assert notice_rows(str(tmp_path)) == 0
    finally:
        await node.stop()


@aiotest()
async def test_old_member_notices_are_not_loaded_at_start(tmp_path):
    node = await start_node(**SQLITE, **{"server.data_dir": str(tmp_path)})
    try:
        await publish(node)
    finally:
        await node.stop()
    await asyncio.sleep(1.1)
    node = await start_node(**SQLITE, **{"server.data_dir": str(tmp_path)})
    try:
        stream = node.hub.stream("member:acme/m1", Lane.P3, create=False)
        assert [e.kind for e in stream.history] == ["promo.offer"]
        assert stream.offset == 2                              # offsets go on
        assert notice_rows(str(tmp_path)) == 0
    finally:
        await node.stop()
