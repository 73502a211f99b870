"""The SQLite store's reader: a thread with its own read-only connection.

It answers inbox, positions, trace, dead letters, the terminal records, the
key-value records, stats, the channel history and backups, so reads never
wait behind the writer's fsync (WAL readers see the last commit).  Each
read is a short transaction of its own.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
from typing import Callable

import orjson

from .archive import StreamEntry, StreamState
from .store import (
    ACKED, DELIVERED, EXPIRED, REJECTED, STORED, DeadLetter, InboxEntry, Recipient, Trace,
)
from .store_sqlite_backup import copy_database
from .store_sqlite_requests import STOP, post
from .store_sqlite_schema import (
    ACKED_RANGE, DELIVERED_RANGE, ENTRY_ACKED_KEPT, ENTRY_EXPIRED, ENTRY_PENDING, ENTRY_REJECTED,
    P2, SEQ_BITS, SEQ_MASK, connect, is_staged, parse_recipients, range_time, ref_out,
    schema_version, top_key,
)
from .terminals import TerminalRecord


def _tenant_bounds(tenant: str) -> tuple[str, str]:
    """Addresses of one tenant's terminals are exactly the strings in [lo, hi)."""
    return f"terminal:{tenant}/", f"terminal:{tenant}0"      # '0' follows '/'


class Reader:
    """Owns the read connection; every read is a short transaction of its own."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.conn: sqlite3.Connection | None = None
        self.tids: dict[str, int] = {}       # positive answers only: a tid never changes
        self.addresses: dict[int, str] = {}

    def run(self, ready: asyncio.Future) -> None:
        try:
            self.conn = connect(self.path, readonly=True)
        except BaseException as exc:
            post(self.loop, [(ready, None, exc)])
            return
        post(self.loop, [(ready, None, None)])
        q = self.queue
        stop = None
        while stop is None:
            batch = [q.get()]
            while True:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            done = []
            for item in batch:
                op, args, fut, _ = item
                if op is STOP:
                    stop = item
                    continue
                try:
                    done.append((fut, op(*args), None))
                except Exception as exc:
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    done.append((fut, None, exc))
            post(self.loop, done)
            # Drop this batch before blocking for the next: its requests,
            # futures and results would otherwise stay alive as locals.
            batch = done = item = fut = args = None
        self.conn.close()
        self.conn = None
        post(self.loop, [(stop[2], None, None)])

    def _tid(self, address: str) -> int | None:
        tid = self.tids.get(address)
        if tid is None:
            row = self.conn.execute("SELECT tid FROM terminals WHERE address = ?",
                                    (address,)).fetchone()
            if row is None:
                return None
            tid = self.tids[address] = row[0]
            self.addresses[tid] = address
        return tid

    def _address(self, tid: int) -> str:
        address = self.addresses.get(tid)
        if address is None:
            row = self.conn.execute("SELECT address FROM terminals WHERE tid = ?", (tid,)).fetchone()
            address = row[0] if row is not None else f"?{tid}"
            if row is not None:
                self.addresses[tid] = address
                self.tids[address] = tid
        return address

    def _cursor(self, key: int) -> tuple[int, int, int]:
        """(last, acked, delivered) of an inbox, as committed."""
        conn = self.conn
        row = conn.execute("SELECT last, acked, delivered FROM cursors WHERE k = ?",
                           (key,)).fetchone()
        top = top_key(conn, key << SEQ_BITS)
        last = top & SEQ_MASK if top is not None else 0
        if row is None:
            return last, 0, 0
        return max(row[0], row[1], last), row[1], row[2]

    def inbox(self, terminal: str, lane: int, after: int, limit: int) -> list[InboxEntry]:
        tid = self._tid(terminal)
        if tid is None or lane not in (0, 1) or limit <= 0:
            return []
        conn = self.conn
        key = (tid << 1) | lane
        conn.execute("BEGIN")
        try:
            row = conn.execute("SELECT acked, delivered FROM cursors WHERE k = ?", (key,)).fetchone()
            acked, delivered = row if row is not None else (0, 0)
            base = key << SEQ_BITS
            span = (base + max(after, acked, 0), base | SEQ_MASK)
            # Merged entries first: every staged seq of an inbox is above them.
            rows = conn.execute(
                "SELECT i.k, i.msg_id, m.kind, m.body, m.expires, m.created FROM inbox i "
                "JOIN messages m ON m.id = i.msg_id "
                "WHERE i.k > ? AND i.k <= ? AND i.state = 0 ORDER BY i.k LIMIT ?",
                (*span, limit)).fetchall()
            if len(rows) < limit:
                rows += conn.execute(
                    "SELECT i.k, i.msg_id, m.kind, m.body, m.expires, m.created FROM inbox_staged i "
                    "JOIN messages m ON m.id = i.msg_id "
                    "WHERE i.k > ? AND i.k <= ? ORDER BY i.k LIMIT ?",
                    (*span, limit - len(rows))).fetchall()
        finally:
            conn.execute("COMMIT")
        return [InboxEntry(k & SEQ_MASK, msg_id, kind, body, (k & SEQ_MASK) <= delivered, expires,
                           created)
                for k, msg_id, kind, body, expires, created in rows]

    def positions(self, terminal: str) -> tuple[int, int, int, int]:
        tid = self._tid(terminal)
        if tid is None:
            return (0, 0, 0, 0)
        conn = self.conn
        conn.execute("BEGIN")
        try:
            last0, acked0, _ = self._cursor(tid << 1)
            last1, acked1, _ = self._cursor((tid << 1) | 1)
        finally:
            conn.execute("COMMIT")
        return (acked0, last0, acked1, last1)

    def positions_many(self, terminals: list[str]) -> list[tuple[int, int, int, int]]:
        return [self.positions(t) for t in terminals]

    def trace(self, msg_id: int) -> Trace | None:
        conn = self.conn
        conn.execute("BEGIN")
        try:
            row = conn.execute(
                "SELECT tenant, sender, ref, lane, kind, dest, created, expires, receipt, "
                "recipients FROM messages WHERE id = ? AND body IS NOT NULL", (msg_id,)).fetchone()
            if row is None:
                return None
            tenant, sender, ref, lane, kind, dest, created, expires, receipt, text = row
            recipients = []
            for tid, seq in parse_recipients(text):
                key = (tid << 1) | lane
                _, acked, delivered = self._cursor(key)
                k = (key << SEQ_BITS) | seq
                entry = conn.execute("SELECT state, ended_at, reason, delivered_at FROM inbox "
                                     "WHERE k = ?", (k,)).fetchone()
                if entry is None and is_staged(conn, k):
                    entry = (ENTRY_PENDING, None, None, None)
                state, ended_at, reason, delivered_at = \
                    entry if entry is not None else (ENTRY_ACKED_KEPT, None, None, None)
                if delivered_at is None:
                    delivered_at = range_time(conn, tid, lane, DELIVERED_RANGE, seq,
                                               ended_at if state >= ENTRY_EXPIRED else None)
                rec = Recipient(self._address(tid), seq, STORED, created)
                if state in (ENTRY_EXPIRED, ENTRY_REJECTED):
                    rec.state = EXPIRED if state == ENTRY_EXPIRED else REJECTED
                    rec.ended_at = ended_at
                    rec.reason = reason or ""
                    rec.delivered_at = delivered_at
                elif state == ENTRY_ACKED_KEPT or seq <= acked:
                    rec.state = ACKED
                    rec.acked_at = ended_at if state == ENTRY_ACKED_KEPT else \
                        range_time(conn, tid, lane, ACKED_RANGE, seq, None)
                    rec.delivered_at = delivered_at
                elif seq <= delivered:
                    rec.state = DELIVERED
                    rec.delivered_at = delivered_at
                if reason and not rec.reason:
                    rec.reason = reason          # (a pending entry's: "redriven")
                recipients.append(rec)
        finally:
            conn.execute("COMMIT")
        return Trace(msg_id, tenant, sender, ref_out(ref), lane, kind, dest, created, expires,
                     bool(receipt), recipients)

    def kv_get(self, ns: str, key: str) -> bytes | None:
        row = self.conn.execute("SELECT value FROM kv WHERE ns = ? AND key = ?",
                                (ns, key)).fetchone()
        return None if row is None else bytes(row[0])

    # A kv scan is one range of the primary key (ns, key), walked from either
    # end: SQLite seeks to the first key of the range and stops after LIMIT
    # rows, so a page costs O(log n + limit) however many keys the prefix
    # holds (no sort step, no full scan).  Both bounds are folded in Python so
    # the statement has one lower and one upper bound to seek with (Python's
    # str order is SQLite's BINARY order of UTF-8 text).  Lower bound: ``key >
    # after`` when after >= prefix (it implies key >= prefix), else ``key >=
    # prefix``.  Indexed by (reverse, lower bound inclusive).
    _KV_SCAN = {
        (False, False): "SELECT key, value FROM kv WHERE ns = ? AND key > ? AND key < ? "
                        "ORDER BY key LIMIT ?",
        (False, True): "SELECT key, value FROM kv WHERE ns = ? AND key >= ? AND key < ? "
                       "ORDER BY key LIMIT ?",
        (True, False): "SELECT key, value FROM kv WHERE ns = ? AND key > ? AND key < ? "
                       "ORDER BY key DESC LIMIT ?",
        (True, True): "SELECT key, value FROM kv WHERE ns = ? AND key >= ? AND key < ? "
                      "ORDER BY key DESC LIMIT ?",
    }

    def kv_scan(self, ns: str, prefix: str, after: str, limit: int, reverse: bool,
                before: str) -> list[tuple[str, bytes]]:
        high = prefix + "\U0010ffff"
        if before and before < high:
            high = before
        if after >= prefix:
            sql, low = self._KV_SCAN[(reverse, False)], after
        else:
            sql, low = self._KV_SCAN[(reverse, True)], prefix
        rows = self.conn.execute(sql, (ns, low, high, limit))
        return [(k, bytes(v)) for k, v in rows]

    def dead_letters(self, tenant: str | None, limit: int) -> list[DeadLetter]:
        sql = ("SELECT msg_id, terminal, lane, seq, kind, reason, at, sender, ref, receipt "
               "FROM dead_letters")
        if tenant is None:
            rows = self.conn.execute(sql + " ORDER BY id DESC LIMIT ?", (limit,))
        else:
            lo, hi = _tenant_bounds(tenant)
            rows = self.conn.execute(sql + " WHERE terminal >= ? AND terminal < ? "
                                     "ORDER BY id DESC LIMIT ?", (lo, hi, limit))
        return [DeadLetter(m, t, lane, seq, kind, reason, at, sender, ref_out(ref), bool(receipt))
                for m, t, lane, seq, kind, reason, at, sender, ref, receipt in rows]

    _TERMINAL_COLUMNS = ("address, tenant, terminal, store, region, roles, member, first_seen, "
                         "last_seen, retired, revoked_before")

    @staticmethod
    def _record(row) -> TerminalRecord:
        (address, tenant, terminal, store, region, roles, member, first_seen, last_seen,
         retired, revoked_before) = row
        return TerminalRecord(address, tenant, terminal, store, region, tuple(orjson.loads(roles)),
                              member, first_seen, last_seen, bool(retired), revoked_before)

    def terminal(self, address: str) -> TerminalRecord | None:
        row = self.conn.execute(f"SELECT {self._TERMINAL_COLUMNS} FROM terminals "
                                "WHERE address = ? AND registered = 1", (address,)).fetchone()
        return self._record(row) if row is not None else None

    def terminals(self, tenant: str | None) -> list[TerminalRecord]:
        sql = f"SELECT {self._TERMINAL_COLUMNS} FROM terminals WHERE registered = 1"
        if tenant is None:
            rows = self.conn.execute(sql + " ORDER BY tid")
        else:
            rows = self.conn.execute(sql + " AND tenant = ? ORDER BY tid", (tenant,))
        return [self._record(row) for row in rows]

    def stats(self, writer_counters: Callable[[], dict]) -> dict:
        conn = self.conn
        conn.execute("BEGIN")
        try:
            messages = conn.execute("SELECT COUNT(*) FROM messages WHERE body IS NOT NULL").fetchone()[0]
            unacked = sum(conn.execute(
                f"SELECT COUNT(*) FROM {table} i WHERE {state} (i.k & ?) > "
                "COALESCE((SELECT c.acked FROM cursors c WHERE c.k = i.k >> ?), 0)",
                (SEQ_MASK, SEQ_BITS)).fetchone()[0]
                for table, state in (("inbox", "i.state = 0 AND"), ("inbox_staged", "")))
            dead = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
            terminals = conn.execute(
                "SELECT COUNT(*) FROM terminals WHERE registered = 1").fetchone()[0]
            streams = conn.execute("SELECT COUNT(*) FROM streams").fetchone()[0]
            page_count = conn.execute("PRAGMA page_count").fetchone()[0]
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            version = schema_version(conn)
        finally:
            conn.execute("COMMIT")
        try:
            wal = os.path.getsize(self.path + "-wal")
        except OSError:
            wal = 0
        return {
            "backend": "sqlite", "messages": messages, "unacked": unacked,
            "dead_letters": dead, "terminals": terminals, "bytes": page_count * page_size + wal,
            "streams": streams, "schema_version": version, **writer_counters(),
        }

    def load_streams(self, history_max: int, history_age: float, now: float) -> list[StreamState]:
        conn = self.conn
        horizon = now - history_age
        out = []
        conn.execute("BEGIN")
        try:
            for sid, name, lane, epoch, pos in conn.execute(
                    "SELECT sid, name, lane, epoch, pos FROM streams ORDER BY sid").fetchall():
                history = []
                if history_max > 0:
                    for row in conn.execute(
                            "SELECT pos, kind, key, version, payload, created, expires "
                            "FROM stream_entries WHERE sid = ? AND pos > ? AND created >= ? "
                            "ORDER BY pos", (sid, pos - history_max, horizon)):
                        if not row[6] or row[6] > now:
                            history.append(StreamEntry(*row))
                lvc = []
                if lane == P2:
                    for row in conn.execute(
                            "SELECT pos, kind, key, version, payload, created, expires "
                            "FROM lvc WHERE sid = ? ORDER BY pos", (sid,)):
                        if not row[6] or row[6] > now:
                            lvc.append(StreamEntry(*row))
                out.append(StreamState(name, lane, epoch, pos, history, lvc))
        finally:
            conn.execute("COMMIT")
        return out

    def backup(self, dest_path: str) -> None:
        copy_database(self.conn, dest_path)
