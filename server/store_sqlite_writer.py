"""The SQLite store's writer: the only write connection, and group commit.

The writer (by default in a process of its own, see store_writer.py;
``writer="thread"`` keeps it a thread of the server) owns the only write
connection and runs every write request (accept_many, ack_many,
delivered_many, reject, expire, trim, the terminal records, the services'
key-value records, stream appends) in arrival order.  It takes *every*
request queued at that moment and runs them in ONE transaction with one
commit (one fsync with ``synchronous=FULL``): group commit.  When it was idle
and ``group_commit_ms > 0`` it first waits up to that long for company.  A
request's future resolves only after its commit, so a SENDACK is never sent
for data a power loss could take back.  A request that raises is taken out
and the others run again; a failed COMMIT fails the whole batch.  Stream
(P2/P3 history) appends are the exception to arrival order: they wait until
nothing else is queued and commit in slices of their own without their own
fsync (see :meth:`Writer._run_prioritised`).  A checkpointer thread beside
it (store_sqlite_checkpoint.py) keeps the WAL short.

Rows go in with multi-row INSERTs and all refs of a request are looked up in
one query.  There is no index on expiry: the writer keeps, per inbox, a
lower bound of its pending entries' expiry (see :meth:`Writer.expire`).
Accepts stage their inbox rows and the writer merges them in bulk past
``stage_rows`` of them (:meth:`Writer.merge_staged`; the table layout is in
store_sqlite_schema.py).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import queue
import random
import sqlite3
import threading
import time
from typing import Callable

import orjson

from . import gcpolicy
from .archive import StreamEntry
from .store import Accepted, DeadLetter, ReceiptEvent, Redriven
from .store_sqlite_checkpoint import Checkpointer
from .store_sqlite_requests import STOP
from .store_sqlite_schema import (
    ACKED_RANGE, DELIVERED_RANGE, ENTRY_ACKED_KEPT, ENTRY_EXPIRED, ENTRY_PENDING, ENTRY_REJECTED,
    F_GROUP, F_RECEIPT, MAX_TID, P2, REF_WRAP, SEQ_BITS, SEQ_MASK, connect, is_staged, migrate,
    parse_recipients, range_time, ref_in, ref_out, top_key,
)
from .terminals import TerminalRecord

log = logging.getLogger("tillwire.store.sqlite")

# Box (in-memory inbox state of the writer): a list indexed by these.  _EXP
# is a lower bound of the expiry of the inbox's pending entries (-inf =
# unknown, +inf = none); it is not persisted.  _RCPT is an upper bound of the
# highest seq whose sender asked for receipts (the box's last seq when it was
# loaded, then raised by accepts): only an ack of a range (acked, seq] with
# _RCPT > acked looks receipt entries up; any other ack needs no query.
_LAST, _ACK, _DELIV, _TRIM, _EXP, _RCPT = 0, 1, 2, 3, 4, 5
_UNKNOWN = float("-inf")
_NEVER = float("inf")
_EXPIRE_BUDGET = 50_000      # pending entries one expire() reads in inboxes of unknown expiry

_WRITER_CHECKPOINT_PAGES = 16384   # 64 MiB: the writer's own checkpoint, a backstop
_MAX_BATCH_WEIGHT = 20000     # messages/items per group commit before the writer commits anyway
STAGE_ROWS = 16384            # staged inbox entries that make the writer merge them
_HISTORY_SLICE = 128          # stream appends per history transaction (at least)
_HISTORY_WAIT = 0.1           # seconds history waits for the queue to empty, at most
_HISTORY_WAIT_ITEMS = 4096    # ... and stream appends

# Upper bounds (seconds) of the COMMIT time histogram (+Inf implied): an fsync
# takes from tens of microseconds (a disk cache) to tens of milliseconds.
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                  0.5, 1.0, 2.5)

_DEDUP_ONE = ("SELECT id, created FROM messages WHERE sender = ? AND ref = ? AND ref != 0 "
              "ORDER BY id DESC LIMIT 1")
# A sender's refs of a request in one statement per 512 (one GIL round trip
# instead of one per message): the dedup index's (sender, ref) entries looked
# up with ``ref IN (...)``, the list padded to a power of two by repeating
# its last ref so that ten statements serve every size.  (A JSON array of
# (sender, ref) pairs joined to the index took 0.84 us per new ref, this
# 0.42 us, in a standalone measurement.)
_DEDUP_CHUNK = 512
_DEDUP_IN: dict[int, str] = {}


def _dedup_rows(conn: sqlite3.Connection, keys: list) -> list[tuple]:
    """(sender, ref, msg_id, created) of the stored messages with these (sender, ref) keys."""
    by_sender: dict[str, list[int]] = {}
    for sender, ref in keys:
        refs = by_sender.get(sender)
        if refs is None:
            by_sender[sender] = [ref]
        else:
            refs.append(ref)
    rows = []
    for sender, refs in by_sender.items():
        for start in range(0, len(refs), _DEDUP_CHUNK):
            part = refs[start:start + _DEDUP_CHUNK]
            size = 1
            while size < len(part):
                size <<= 1
            part += [part[-1]] * (size - len(part))
            sql = _DEDUP_IN.get(size)
            if sql is None:
                sql = _DEDUP_IN[size] = (
                    "SELECT sender, ref, id, created FROM messages "
                    f"WHERE sender = ? AND ref != 0 AND ref IN ({','.join('?' * size)})")
            rows += conn.execute(sql, (sender, *part))
    return rows


_INSERT_MESSAGE = ("INSERT INTO messages VALUES ", "(?,?,?,?,?,?,?,?,?,?,?,?)", "")
# Pending entries of an inbox key range (k > ?, k <= ?) whose sender asked for
# receipts: merged ones first (an inbox's staged seqs are above its merged ones).
_RECEIPTS_IN_RANGE = (
    "SELECT m.id, m.sender, m.ref FROM inbox i JOIN messages m ON m.id = i.msg_id "
    f"WHERE i.k > ? AND i.k <= ? AND i.state = 0 AND (i.flags & {F_RECEIPT}) ORDER BY i.k",
    "SELECT m.id, m.sender, m.ref FROM inbox_staged i JOIN messages m ON m.id = i.msg_id "
    f"WHERE i.k > ? AND i.k <= ? AND (i.flags & {F_RECEIPT}) ORDER BY i.k")
_INSERT_INBOX = ("INSERT INTO inbox_staged(k, msg_id, flags) VALUES ", "(?,?,?)", "")
_INSERT_RANGE = ("INSERT INTO rangelog VALUES ", "(?,?,?,?,?,?)", "")
_UPSERT_CURSORS = ("INSERT INTO cursors(k, last, acked, delivered, trimmed) VALUES ", "(?,?,?,?,?)",
                   " ON CONFLICT(k) DO UPDATE SET last = excluded.last, acked = excluded.acked, "
                   "delivered = excluded.delivered, trimmed = excluded.trimmed")


def _insert_rows(conn: sqlite3.Connection, sql: tuple[str, str, str], rows: list,
                 chunk: int) -> None:
    """Insert ``rows`` with multi-row VALUES statements (``sql``: the text
    before the VALUES rows, one row's placeholders, the text after them).

    One sqlite3_step per statement instead of one per row: the GIL is
    released and retaken once per statement, and statement overhead is
    shared.  Statements hold ``chunk`` rows, then halves of it for the rest
    (a handful of cached statements; ``chunk`` x columns stays under 999,
    the oldest SQLite limit of bound parameters).
    """
    chain = itertools.chain.from_iterable
    start = 0
    left = len(rows)
    size = chunk
    while left:
        while size > left:
            size >>= 1
        statement = _MULTI_ROW.get((sql, size))
        if statement is None:
            statement = _MULTI_ROW[(sql, size)] = sql[0] + ",".join([sql[1]] * size) + sql[2]
        while left >= size:
            conn.execute(statement, list(chain(rows[start:start + size])) if size > 1
                         else rows[start])
            start += size
            left -= size


_MULTI_ROW: dict[tuple[tuple[str, str, str], int], str] = {}


def message_rows(items) -> list[tuple]:
    """(NewMessage, recipients) items as the writer takes them: (row,
    recipients) with row = (tenant, sender, ref, lane, kind, to, body,
    created, expires, receipt), plain tuples that also pickle in less than
    half the time of the dataclasses (the writer process's requests)."""
    return [((m.tenant, m.sender, m.ref, m.lane, m.kind, m.to, m.body, m.created, m.expires,
              m.receipt), recipients) for m, recipients in items]


def _receipts_in_range(conn: sqlite3.Connection, low: int, high: int) -> list[tuple]:
    """(msg_id, sender, ref) of the pending entries in (low, high] that want receipts."""
    merged, staged = _RECEIPTS_IN_RANGE
    return conn.execute(merged, (low, high)).fetchall() + \
        conn.execute(staged, (low, high)).fetchall()


class Writer:
    """Owns the write connection and every piece of state derived from it.

    Everything here runs on the writer thread (but for
    :meth:`configure_streams`, which the archive's ``configure`` calls on the
    loop: it only sets ``history_max``/``history_age``).  The caches (tids, boxes,
    streams, next ids) always equal what the database holds plus the
    current transaction's changes; after a rollback they are reloaded.
    """

    def __init__(self, path: str, synchronous: str, group_commit_ms: float,
                 dedup_window: float, stage_rows: int = STAGE_ROWS) -> None:
        self.path = path
        self.stage_rows = stage_rows
        self.history: list = []        # stream appends waiting (see _run_prioritised)
        self.history_since = 0.0       # when the oldest of them began to wait (about)
        self.synchronous = synchronous
        self.wait = group_commit_ms / 1000.0
        self.dedup_window = dedup_window
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        # Hands a list of (future or request id, result, exception) back to
        # whoever waits: the loop (thread mode) or the parent process.
        self.post: Callable[[list], None] = lambda done: None
        self.mode = "thread"       # or "process" (store_writer.main sets it)
        self.gc_frozen = 0         # objects frozen once opened (process mode)
        self.conn: sqlite3.Connection | None = None
        self.checkpointer: Checkpointer | None = None
        self.history_max = 1000
        self.history_age = 3600.0
        self.epoch = 0
        # counters (read by stats(); plain ints, torn reads are harmless)
        self.commits = 0
        self.requests = 0
        self.accepted = 0
        self.failed_commits = 0
        self.commit_seconds = 0.0
        self.commit_counts = [0] * (len(COMMIT_BUCKETS) + 1)   # COMMITs per bucket
        self._reset_caches()

    def _reset_caches(self) -> None:
        self.tids: dict[str, int] = {}          # address -> tid
        self.addresses: dict[int, str] = {}     # tid -> address
        self.boxes: dict[int, list] = {}        # tid << 1 | lane -> [last, acked, delivered, trimmed, exp]
        self.dirty: set[int] = set()            # boxes whose cursor row must be written
        self.new_terminals: list[tuple] = []
        self.streams: dict[tuple[str, int], list] = {}   # (name, lane) -> [sid, epoch, pos]
        self.stream_rows: list[tuple] = []
        self.lvc_rows: list[tuple] = []
        self.touched: dict[int, list] = {}
        self.next_id = 1
        self.next_tid = 1
        self.next_sid = 1
        self.all_boxes = False                  # every inbox with rows has a box (for expire)
        self.staged = 0                         # rows in inbox_staged

    # -- setup -----------------------------------------------------------------------

    def _open(self) -> dict:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        conn = self.conn = connect(self.path)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: cannot use WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute("PRAGMA cache_size = -65536")          # 64 MiB
        # The checkpointer thread keeps the WAL short; the writer checkpoints
        # itself only if that one falls far behind (64 MiB of WAL).
        conn.execute(f"PRAGMA wal_autocheckpoint = {_WRITER_CHECKPOINT_PAGES}")
        conn.execute("PRAGMA journal_size_limit = 67108864")
        migrate(conn)
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            if row is None:
                epoch = random.randrange(1, 1 << 31)
                conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                                 [("epoch", epoch), ("created", time.time())])
            else:
                epoch = int(row[0])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.epoch = epoch
        self._load()
        self._run_merge(1)          # what the last run left staged
        return {"epoch": epoch}

    def _load(self) -> None:
        """(Re)build the caches from the committed database."""
        self._reset_caches()
        conn = self.conn
        for tid, address in conn.execute("SELECT tid, address FROM terminals"):
            self.tids[address] = tid
            self.addresses[tid] = address
        self.next_tid = max(self.addresses, default=0) + 1
        top = conn.execute("SELECT MAX(id) FROM messages").fetchone()[0] or 0
        row = conn.execute("SELECT value FROM meta WHERE key = 'next_msg_id'").fetchone()
        self.next_id = max(top + 1, int(row[0]) if row is not None else 1)
        for sid, name, lane, epoch, pos in conn.execute(
                "SELECT sid, name, lane, epoch, pos FROM streams"):
            self.streams[(name, lane)] = [sid, epoch, pos]
            self.next_sid = max(self.next_sid, sid + 1)
        self.staged = conn.execute("SELECT COUNT(*) FROM inbox_staged").fetchone()[0]

    def _box(self, tid: int, lane: int) -> list[int]:
        """The inbox's [last, acked, delivered, trimmed], loaded on first use (2 lookups)."""
        key = (tid << 1) | lane
        box = self.boxes.get(key)
        if box is None:
            conn = self.conn
            row = conn.execute("SELECT last, acked, delivered, trimmed FROM cursors WHERE k = ?",
                               (key,)).fetchone()
            top = top_key(conn, key << SEQ_BITS)
            last = top & SEQ_MASK if top is not None else 0
            if row is None:
                box = [last, 0, 0, 0, _UNKNOWN, last]
            else:
                top = max(row[0], row[1], last)
                box = [top, row[1], row[2], row[3], _UNKNOWN, top]
            self.boxes[key] = box
        return box

    def _tid(self, address: str) -> int:
        """The tid of a recipient; a never-seen address gets a placeholder row."""
        tid = self.tids.get(address)
        if tid is None:
            tid = self.next_tid
            if tid > MAX_TID:
                raise RuntimeError("sqlite store: more than 2**22 terminal addresses")
            self.next_tid = tid + 1
            self.tids[address] = tid
            self.addresses[tid] = address
            self.new_terminals.append((tid, address))
            self.boxes[tid << 1] = [0, 0, 0, 0, _NEVER, 0]
            self.boxes[(tid << 1) | 1] = [0, 0, 0, 0, _NEVER, 0]
        return tid

    # -- the thread ------------------------------------------------------------------------

    def submit(self, name: str | None, args: tuple, fut, weight: int) -> None:
        """Queue request ``name`` (a method of this class; None = stop)."""
        self.queue.put((STOP if name is None else getattr(self, name), args, fut, weight))

    def configure_streams(self, history_max: int, history_age: float) -> None:
        self.history_max = max(0, int(history_max))
        self.history_age = float(history_age)

    def backlog(self) -> int:
        """Write requests queued and not taken into a transaction yet (any thread)."""
        return self.queue.qsize() + len(self.history)

    def counters(self) -> dict:
        """The writer's side of stats() (plain reads; torn values are harmless)."""
        return {"writer": self.mode, "epoch": self.epoch, "synchronous": self.synchronous,
                "commits": self.commits,
                "write_requests": self.requests, "accepted": self.accepted,
                "failed_commits": self.failed_commits,
                "checkpoints": self.checkpointer.checkpoints if self.checkpointer else 0,
                "commit_seconds": round(self.commit_seconds, 6),
                "commit_counts": list(self.commit_counts),
                "writer_gc_frozen_objects": self.gc_frozen}

    def run(self, ready) -> None:
        """The writer's life: open, serve the queue until a stop, close.

        Starts (and at the stop, stops) the checkpointer thread."""
        try:
            info = self._open()
        except BaseException as exc:
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            self.post([(ready, None, exc)])
            return
        checkpointer = self.checkpointer = Checkpointer(self.path, self.synchronous)
        checkpoints = threading.Thread(target=checkpointer.run, daemon=True,
                                       name="tillwire-store-checkpointer")
        checkpoints.start()
        if self.mode == "process":
            # The process is ours alone: its loaded state goes out of the
            # collector's sight (a thread writer leaves the server's GC be).
            self.gc_frozen = gcpolicy.settle()
        self.post([(ready, info, None)])
        q = self.queue
        history = self.history
        stop = None
        while stop is None:
            if history and (q.empty() or len(history) >= _HISTORY_WAIT_ITEMS
                            or time.monotonic() - self.history_since > _HISTORY_WAIT):
                # Nothing else to do (or history waited long enough): a slice
                # of it, then look at the queue again.
                self._write_history(max(_HISTORY_SLICE, len(history) >> 4))
                continue
            idle = q.empty()
            batch = [q.get()]
            weight = batch[0][3]
            if batch[0][0] is STOP:
                stop = batch.pop()
            elif idle and self.wait > 0:
                # The writer was idle: give this commit company for up to `wait`.
                deadline = time.monotonic() + self.wait
                while weight < _MAX_BATCH_WEIGHT:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        item = q.get(timeout=remaining)
                    except queue.Empty:
                        break
                    if item[0] is STOP:
                        stop = item
                        break
                    batch.append(item)
                    weight += item[3]
            while stop is None and weight < _MAX_BATCH_WEIGHT:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                if item[0] is STOP:
                    stop = item
                    break
                batch.append(item)
                weight += item[3]
            if batch:
                self._run_prioritised(batch)
                self._run_merge(self.stage_rows)
        # Stopping: everything queued before the stop was committed above,
        # but for history still waiting.
        checkpointer.stop()
        checkpoints.join(timeout=5.0)
        exc = None
        try:
            self._write_history()
            self._run_batch(self._drain_after_stop())
            self.conn.execute("PRAGMA optimize")
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except Exception as e:          # pragma: no cover - reported to close()
            exc = e
        finally:
            self.conn.close()
            self.conn = None
        self.post([(stop[2], None, exc)])

    def _run_prioritised(self, batch: list) -> None:
        """Commit the batch's P0/P1 and other requests; its stream appends wait.

        P2/P3 history appends (a promotion flood brings thousands a second)
        join ``self.history``, which the writer commits in slices of its own
        when no other request is queued (see :meth:`run`), so a payment
        result waits for one slice of them at most; under a steady load of
        other requests, a slice goes anyway after _HISTORY_WAIT seconds or
        _HISTORY_WAIT_ITEMS appends.  Nobody waits for those transactions,
        so under synchronous FULL/EXTRA they commit without their own fsync
        (a crash of the process loses what still waits, never what was
        committed; a power loss may also lose the newest committed history,
        which the next commit's fsync would have covered).
        A batch that also deletes history (forget_stream, stream_expire_kind)
        first writes the waiting history, then runs in queue order, so a
        deletion always covers the appends queued before it.
        """
        append = self.stream_append
        ordered = (self.forget_stream, self.stream_expire_kind)
        if any(item[0] in ordered for item in batch):
            self._write_history()
            self._run_batch(batch)
            return
        rest = [item for item in batch if item[0] != append]
        if len(rest) < len(batch):
            if not self.history:
                self.history_since = time.monotonic()
            self.history.extend(item for item in batch if item[0] == append)
        if rest:
            self._run_batch(rest)

    def _write_history(self, n: int | None = None) -> None:
        """Commit the ``n`` oldest stream appends waiting (all by default) in
        a transaction of their own without its own fsync."""
        history = self.history
        if not history:
            return
        if n is None:
            n = len(history)
        batch = history[:n]
        del history[:n]
        self.history_since = time.monotonic()
        self._run_batch(batch, relaxed=True)

    def _run_merge(self, threshold: int) -> None:
        """Merge the staged inbox entries once there are ``threshold`` of them,
        in a transaction of their own without its own fsync: either side of
        it is a complete state (a power loss that takes the merge back leaves
        the entries staged), and the next commit's fsync covers it."""
        if self.staged >= threshold:
            self._run_batch([(self.merge_staged, (), None, 0)], relaxed=True)

    def _drain_after_stop(self) -> list:
        # Requests put after the stop (a stream_append racing close) still go in.
        out = []
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return out
            if item[0] is not STOP:
                out.append(item)

    def _run_batch(self, batch: list, relaxed: bool = False) -> None:
        """Run a batch of requests in one transaction; settle their futures after COMMIT.

        A request that raises is taken out, the transaction rolled back (and
        the caches reloaded) and the rest run again: one bad request never
        fails the others.  An OperationalError (disk full, I/O error) or a
        failed COMMIT fails every request of the batch.  Never raises: the
        writer thread must outlive any error.
        """
        done: list = []
        pending = batch
        try:
            while pending:
                failed, error, results = self._attempt(pending, relaxed)
                if failed < 0:
                    self.commits += 1
                    self.requests += len(pending)
                    if self.checkpointer is not None:
                        self.checkpointer.wake.set()
                    done.extend((fut, result, None)
                                for (_, _, fut, _), result in zip(pending, results))
                    break
                # Failure: undo the transaction and the caches.
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                self._load()
                if failed == len(pending) or isinstance(error, sqlite3.OperationalError):
                    self.failed_commits += 1
                    log.error("store write failed, %d requests fail: %s", len(pending), error)
                    done.extend((fut, None, error) for _, _, fut, _ in pending)
                    break
                op, _, fut, _ = pending[failed]
                if fut is None:
                    log.error("store: dropped a %s that failed: %s",
                              getattr(op, "__name__", op), error)
                done.append((fut, None, error))
                pending = pending[:failed] + pending[failed + 1:]
        except Exception as exc:      # e.g. _load() failing: fail what is left, keep running
            log.exception("store writer error")
            settled = {id(item[0]) for item in done}
            done.extend((fut, None, exc) for _, _, fut, _ in pending if id(fut) not in settled)
        self.post(done)

    def _attempt(self, pending: list, relaxed: bool = False
                 ) -> tuple[int, BaseException | None, list]:
        """One transaction over ``pending``: (-1, None, results) once committed,
        else (index of the request that raised, or len(pending) when BEGIN or
        COMMIT failed, the exception, []).  ``relaxed``: commit without an
        fsync of its own (synchronous NORMAL for this transaction)."""
        conn = self.conn
        if relaxed and self.synchronous.upper() in ("FULL", "EXTRA"):
            conn.execute("PRAGMA synchronous = NORMAL")
            try:
                return self._attempt(pending)
            finally:
                # A failed attempt may leave its transaction open, and SQLite
                # refuses to change the safety level inside one: roll it back
                # first (the caller's rollback then finds nothing to undo).
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        try:
            conn.execute("BEGIN IMMEDIATE")
        except Exception as exc:
            return len(pending), exc, []
        results = []
        for i, (op, args, _, _) in enumerate(pending):
            try:
                results.append(op(*args))
            except Exception as exc:
                return i, exc, []
        try:
            self._flush()
            started = time.perf_counter()
            conn.execute("COMMIT")
            took = time.perf_counter() - started
            self.commit_seconds += took
            self.commit_counts[bisect.bisect_left(COMMIT_BUCKETS, took)] += 1
        except Exception as exc:
            return len(pending), exc, []
        return -1, None, results

    def _flush(self) -> None:
        """Write what the requests of this transaction left in memory."""
        conn = self.conn
        if self.stream_rows or self.lvc_rows or self.touched:
            self._flush_streams()
        if self.dirty:
            boxes = self.boxes
            _insert_rows(conn, _UPSERT_CURSORS, [(k, *boxes[k][:4]) for k in self.dirty], 128)
            self.dirty.clear()

    # -- P0/P1 requests ------------------------------------------------------------------------

    def accept_many(self, items: list) -> list[Accepted]:
        """``accept_rows`` for (NewMessage, recipients) items (the thread writer)."""
        return [Accepted(*a) for a in self.accept_rows(message_rows(items))]

    def accept_rows(self, items: list) -> list[tuple]:
        """Store ``items``, (message row, recipients) pairs (see ``message_rows``);
        one (msg_id, duplicate, {recipient: seq}) per item.  The writer process
        takes its requests this way straight from the pipe and sends the
        results back as they are (no dataclass made and taken apart again).

        Cost per single-recipient message: 2 row inserts (+ the dedup and
        expiry index entries) and, with a ref, one probe of the dedup index,
        all refs of the request in ONE query; nothing else is read."""
        conn = self.conn
        window = self.dedup_window
        # Newest (msg_id, created) per (sender, ref) seen in the window so
        # far, from the database and then from this request.
        seen: dict[tuple[str, int], tuple[int, float]] = {}
        keys = [(m[1], ref_in(m[2])) for m, _ in items if m[2]]
        if len(keys) == 1:
            row = conn.execute(_DEDUP_ONE, keys[0]).fetchone()
            if row is not None:
                seen[keys[0]] = row
        elif keys:
            for sender, ref, msg_id, created in _dedup_rows(conn, keys):
                prev = seen.get((sender, ref))
                if prev is None or msg_id > prev[0]:
                    seen[(sender, ref)] = (msg_id, created)
        tids = self.tids
        boxes = self.boxes
        out: list[tuple] = []
        mrows = []
        irows = []
        next_id = self.next_id
        try:
            for (tenant, sender, ref, lane, kind, to, body, created, expires,
                 receipt), recipients in items:
                if ref:
                    if ref >= REF_WRAP:
                        ref -= 1 << 64
                    hit = seen.get((sender, ref))
                    if hit is not None and created - hit[1] <= window:
                        out.append((hit[0], True, {}))
                        continue
                if lane != 0 and lane != 1:
                    raise ValueError(f"accept_many: lane must be P0 or P1, got {lane!r}")
                msg_id = next_id
                next_id += 1
                flags = F_RECEIPT if receipt else 0
                if len(recipients) == 1:        # the common case, without the loop below
                    address = recipients[0]
                    tid = tids.get(address) or self._tid(address)
                    key = (tid << 1) | lane
                    box = boxes.get(key) or self._box(tid, lane)
                    seq = box[0] = box[0] + 1
                    if expires < box[4]:
                        box[4] = expires
                    if flags & F_RECEIPT:
                        box[_RCPT] = seq
                    irows.append(((key << SEQ_BITS) | seq, msg_id, flags))
                    text = f"{tid}:{seq}"
                    seqs = {address: seq}
                else:
                    recipients = list(dict.fromkeys(recipients))
                    if len(recipients) > 1:
                        flags |= F_GROUP
                    seqs = {}
                    parts = []
                    for address in recipients:
                        tid = tids.get(address) or self._tid(address)
                        key = (tid << 1) | lane
                        box = boxes.get(key) or self._box(tid, lane)
                        seq = box[0] = box[0] + 1
                        if expires < box[4]:
                            box[4] = expires
                        if flags & F_RECEIPT:
                            box[_RCPT] = seq
                        seqs[address] = seq
                        parts.append(f"{tid}:{seq}")
                        irows.append(((key << SEQ_BITS) | seq, msg_id, flags))
                    text = ",".join(parts)
                mrows.append((msg_id, tenant, sender, ref, lane, kind, to,
                              body, created, expires, flags & F_RECEIPT, text))
                if ref:
                    seen[(sender, ref)] = (msg_id, created)
                out.append((msg_id, False, seqs))
        finally:
            self.next_id = next_id
        if self.new_terminals:
            conn.executemany("INSERT INTO terminals(tid, address) VALUES (?, ?)", self.new_terminals)
            self.new_terminals.clear()
        if mrows:
            _insert_rows(conn, _INSERT_MESSAGE, mrows, 64)
            _insert_rows(conn, _INSERT_INBOX, irows, 256)
            self.staged += len(irows)
            self.accepted += len(mrows)
        return out

    def merge_staged(self) -> None:
        """Move the staged inbox entries to ``inbox``.

        An accept appends its inbox rows to ``inbox_staged``, a small table,
        so a commit dirties few pages however many inboxes it reaches;
        ``inbox``, keyed by inbox, would take one page per inbox reached.
        A merge dirties one page of ``inbox`` per inbox with staged entries,
        shared by all of them.  Every staged seq of an inbox is above its
        merged ones, so readers take the merged rows first, then the staged.
        Requests that change or delete entries (reject, expire, trim) merge
        first and work on ``inbox`` alone.
        """
        if self.staged:
            conn = self.conn
            conn.execute("INSERT INTO inbox(k, msg_id, flags) "
                         "SELECT k, msg_id, flags FROM inbox_staged")
            conn.execute("DELETE FROM inbox_staged")
            self.staged = 0

    def ack_many(self, acks: list, now: float) -> list[ReceiptEvent]:
        conn = self.conn
        receipts: list[ReceiptEvent] = []
        ranges = []
        for terminal, lane, seq in acks:
            tid = self.tids.get(terminal)
            if tid is None or lane not in (0, 1):
                continue
            box = self._box(tid, lane)
            acked = box[_ACK]
            if seq > box[_LAST]:
                seq = box[_LAST]
            if seq <= acked:
                continue
            if box[_RCPT] > acked:     # else no entry of (acked, seq] wants a receipt
                base = ((tid << 1) | lane) << SEQ_BITS
                for msg_id, sender, ref in _receipts_in_range(conn, base + acked, base + seq):
                    receipts.append(ReceiptEvent(msg_id, terminal, sender, ref_out(ref)))
            box[_ACK] = seq
            self.dirty.add((tid << 1) | lane)
            ranges.append((tid, lane, ACKED_RANGE, acked + 1, seq, now))
        if ranges:
            _insert_rows(conn, _INSERT_RANGE, ranges, 128)
        return receipts

    def delivered_many(self, ranges_in: list, now: float) -> list[ReceiptEvent]:
        receipts: list[ReceiptEvent] = []
        ranges = []
        for terminal, lane, first, last in ranges_in:
            tid = self.tids.get(terminal)
            if tid is None or lane not in (0, 1):
                continue
            box = self._box(tid, lane)
            first = max(first, box[_ACK] + 1, 1)
            last = min(last, box[_LAST])
            if first > last:
                continue
            if last > box[_DELIV]:
                # First deliveries: seqs past the delivered position (the node
                # delivers in order, so the ones below it went out before).
                new = max(first, box[_DELIV] + 1)
                if box[_RCPT] >= new:
                    base = ((tid << 1) | lane) << SEQ_BITS
                    for msg_id, sender, ref in _receipts_in_range(
                            self.conn, base + new - 1, base + last):
                        receipts.append(ReceiptEvent(msg_id, terminal, sender, ref_out(ref)))
                box[_DELIV] = last
                self.dirty.add((tid << 1) | lane)
            ranges.append((tid, lane, DELIVERED_RANGE, first, last, now))
        if ranges:
            _insert_rows(self.conn, _INSERT_RANGE, ranges, 128)
        return receipts

    def reject(self, terminal: str, lane: int, seq: int, reason: str,
               now: float) -> DeadLetter | None:
        tid = self.tids.get(terminal)
        if tid is None or lane not in (0, 1):
            return None
        box = self._box(tid, lane)
        if seq <= box[_ACK] or seq > box[_LAST]:
            return None
        conn = self.conn
        k = (((tid << 1) | lane) << SEQ_BITS) | seq
        if self.staged and is_staged(conn, k):
            self.merge_staged()          # (the entry changes state: it must be in inbox)
        row = conn.execute("SELECT msg_id, state FROM inbox WHERE k = ?", (k,)).fetchone()
        if row is None or row[1] != ENTRY_PENDING:
            return None
        conn.execute("UPDATE inbox SET state = ?, ended_at = ?, reason = ? WHERE k = ?",
                     (ENTRY_REJECTED, now, reason, k))
        msg = conn.execute("SELECT kind, sender, ref, receipt FROM messages WHERE id = ?",
                           (row[0],)).fetchone()
        kind, sender, ref, receipt = msg if msg is not None else ("", "", 0, 0)
        dead = DeadLetter(row[0], terminal, lane, seq, kind, reason, now, sender, ref_out(ref),
                          bool(receipt))
        self._insert_dead([dead])
        return dead

    def _insert_dead(self, dead: list[DeadLetter]) -> None:
        self.conn.executemany(
            "INSERT INTO dead_letters(msg_id, terminal, lane, seq, kind, reason, at, sender, ref, "
            "receipt) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(d.msg_id, d.terminal, d.lane, d.seq, d.kind, d.reason, d.at, d.sender, ref_in(d.ref),
              1 if d.receipt else 0) for d in dead])

    def redrive(self, terminal: str, msg_id: int | None, now: float,
                ttls: tuple[float, float], limit: int) -> list[Redriven]:
        """Put dead letters of ``terminal`` back in its inbox (Store.redrive).

        The new entries go straight into ``inbox`` (after a merge: every
        staged seq of an inbox must stay above its merged ones), flagged as
        one of several entries of their message (trim then checks them all)
        and with reason 'redriven' (the trace shows it); the message's
        recipients list the new entry, its expiry is extended, and the dead
        letter's row goes.  Cost per entry: one insert, one update, one delete."""
        tid = self.tids.get(terminal)
        if tid is None or limit <= 0:
            return []
        conn = self.conn
        sql = ("SELECT d.id, d.msg_id, d.lane, d.seq, m.kind, m.body, m.created, m.receipt "
               "FROM dead_letters d JOIN messages m ON m.id = d.msg_id "
               "WHERE d.terminal = ? AND m.body IS NOT NULL AND m.recipients != ''")
        args: list = [terminal]
        if msg_id is not None:
            sql += " AND d.msg_id = ?"
            args.append(msg_id)
        rows = conn.execute(sql + " ORDER BY d.id LIMIT ?", (*args, limit)).fetchall()
        if not rows:
            return []
        self.merge_staged()
        out = []
        for dead_id, mid, lane, dead_seq, kind, body, created, receipt in rows:
            key = (tid << 1) | lane
            box = self._box(tid, lane)
            seq = box[_LAST] = box[_LAST] + 1
            flags = F_GROUP
            if receipt:
                flags |= F_RECEIPT
                box[_RCPT] = seq
            conn.execute("INSERT INTO inbox(k, msg_id, flags, reason) VALUES (?, ?, ?, 'redriven')",
                         ((key << SEQ_BITS) | seq, mid, flags))
            conn.execute("UPDATE messages SET expires = MAX(expires, ?), "
                         "recipients = recipients || ? WHERE id = ?",
                         (now + ttls[lane], f",{tid}:{seq}", mid))
            expires = conn.execute("SELECT expires FROM messages WHERE id = ?",
                                   (mid,)).fetchone()[0]
            if expires < box[_EXP]:
                box[_EXP] = expires
            conn.execute("DELETE FROM dead_letters WHERE id = ?", (dead_id,))
            out.append(Redriven(mid, terminal, lane, dead_seq, seq, kind, bytes(body), created,
                                expires))
        return out

    def expire(self, now: float) -> list[DeadLetter]:
        """Dead-letter the pending entries whose message expired by ``now``.

        Reads only inboxes that may hold one: each box keeps a lower bound
        of its pending entries' expiry (accept lowers it; a scan of the
        inbox's pending range sets it exactly).  Steady state: one float
        comparison per inbox plus the pending rows of inboxes where
        something expired.  After open the bounds are unknown: the first
        calls scan pending ranges, at most ``_EXPIRE_BUDGET`` rows each.
        """
        conn = self.conn
        if not self.all_boxes:
            self._load_all_boxes()
        found = []
        budget = _EXPIRE_BUDGET
        for key, box in self.boxes.items():
            if box[_EXP] > now:
                continue
            if box[_LAST] <= box[_ACK]:
                box[_EXP] = _NEVER
                continue
            if box[_EXP] == _UNKNOWN:
                if budget <= 0:
                    continue
                budget -= box[_LAST] - box[_ACK]
            self.merge_staged()
            base = key << SEQ_BITS
            lane = key & 1
            low = _NEVER
            for k, msg_id, expires, kind, sender, ref, receipt, recipients, flags in conn.execute(
                    "SELECT i.k, m.id, m.expires, m.kind, m.sender, m.ref, m.receipt, "
                    "m.recipients, i.flags FROM inbox i JOIN messages m ON m.id = i.msg_id "
                    "WHERE i.k > ? AND i.k <= ? AND i.state = 0",
                    (base + box[_ACK], base + box[_LAST])):
                if expires > now:
                    if expires < low:
                        low = expires
                    continue
                pos = 0
                if flags & F_GROUP:
                    pos = recipients.split(",").index(f"{key >> 1}:{k & SEQ_MASK}")
                found.append((msg_id, pos, k, DeadLetter(
                    msg_id, self.addresses.get(key >> 1, ""), lane, k & SEQ_MASK, kind, "ttl",
                    now, sender, ref_out(ref), bool(receipt))))
            box[_EXP] = low
        if not found:
            return []
        found.sort(key=lambda f: (f[0], f[1]))
        conn.executemany(f"UPDATE inbox SET state = {ENTRY_EXPIRED}, ended_at = ?, reason = 'ttl' "
                         "WHERE k = ?", [(now, f[2]) for f in found])
        out = [f[3] for f in found]
        self._insert_dead(out)
        return out

    def _load_all_boxes(self) -> None:
        """Give every inbox that has rows a box: one index probe per inbox."""
        self.merge_staged()
        conn = self.conn
        start = 0
        while True:
            row = conn.execute("SELECT MIN(k) FROM inbox WHERE k >= ?", (start,)).fetchone()
            if row[0] is None:
                break
            key = row[0] >> SEQ_BITS
            self._box(key >> 1, key & 1)
            start = (key + 1) << SEQ_BITS
        self.all_boxes = True

    def trim(self, now: float, keep_acked: float) -> int:
        """Delete messages whose every recipient acked (or went dead) before
        ``now - keep_acked``.  A message still inside the dedup window with a
        ref becomes a tombstone (no body) until the window passes.

        Work is proportional to what is trimmed: the acked ranges logged
        before the cutoff say which inbox key ranges are done; single-
        recipient messages are deleted by range in SQL, group messages and
        dead entries are checked recipient by recipient.
        """
        conn = self.conn
        cutoff = now - keep_acked
        window_cut = now - self.dedup_window
        removed = 0
        per_box: dict[int, list[tuple[int, int, float]]] = {}
        for tid, lane, first, last, at in conn.execute(
                "SELECT tid, lane, first, last, at FROM rangelog WHERE at <= ? AND what = ?",
                (cutoff, ACKED_RANGE)):
            per_box.setdefault((tid << 1) | lane, []).append((last, first, at))
        self.merge_staged()
        # msg_id -> [(inbox key, acked at or None, dead at or None)]
        cand: dict[int, list[tuple[int, float | None, float | None]]] = {}
        for key, ranges in per_box.items():
            box = self._box(key >> 1, key & 1)
            done_to = max(r[0] for r in ranges)
            lo = box[_TRIM]
            if done_to <= lo:
                continue
            base = key << SEQ_BITS
            span = (base + lo, base + done_to)
            # Single-recipient messages of the span: delete (or tombstone) by range.
            sub = ("SELECT msg_id FROM inbox WHERE k > ? AND k <= ? AND state = 0 "
                   f"AND (flags & {F_GROUP}) = 0")
            removed += conn.execute(
                f"DELETE FROM messages WHERE id IN ({sub}) AND (ref = 0 OR created < ?)",
                (*span, window_cut)).rowcount
            removed += conn.execute(
                f"UPDATE messages SET body = NULL, recipients = '' WHERE id IN ({sub}) "
                "AND body IS NOT NULL", span).rowcount
            group = conn.execute(
                "SELECT k, msg_id FROM inbox WHERE k > ? AND k <= ? AND state = 0 "
                f"AND (flags & {F_GROUP}) != 0", span).fetchall()
            conn.execute("DELETE FROM inbox WHERE k > ? AND k <= ? AND state = 0 "
                         f"AND (flags & {F_GROUP}) = 0", span)
            if group:
                ranges.sort()
                lasts = [r[0] for r in ranges]
                for k, msg_id in group:
                    i = bisect.bisect_left(lasts, k & SEQ_MASK)
                    cand.setdefault(msg_id, []).append(
                        (k, ranges[i][2] if i < len(ranges) else cutoff, None))
            box[_TRIM] = done_to
            self.dirty.add(key)
        for k, msg_id, ended_at in conn.execute(
                "SELECT k, msg_id, ended_at FROM inbox WHERE state >= 3 AND ended_at <= ?",
                (cutoff,)):
            cand.setdefault(msg_id, []).append((k, None, ended_at))
        for msg_id, entries in cand.items():
            removed += self._trim_message(msg_id, entries, window_cut)
        # Messages without recipients are done when created; tombstones go
        # when their dedup window has passed (they were counted when trimmed).
        removed += conn.execute(
            "UPDATE messages SET body = NULL WHERE recipients = '' AND body IS NOT NULL "
            "AND created <= ? AND ref != 0 AND created >= ?", (cutoff, window_cut)).rowcount
        removed += conn.execute(
            "DELETE FROM messages WHERE recipients = '' AND body IS NOT NULL AND created <= ?",
            (cutoff,)).rowcount
        conn.execute("DELETE FROM messages WHERE recipients = '' AND body IS NULL AND created < ?",
                     (window_cut,))
        if removed:
            # msg_ids are never reused, even when the highest ones were deleted.
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('next_msg_id', ?)",
                         (self.next_id,))
        self._flush()   # trimmed positions and `last` must be in cursors before the rangelog goes
        conn.execute(
            "DELETE FROM rangelog WHERE at <= ? AND last <= COALESCE((SELECT c.trimmed FROM "
            "cursors c WHERE c.k = (rangelog.tid << 1) | rangelog.lane), 0)", (cutoff,))
        return removed

    def _trim_message(self, msg_id: int, entries: list, window_cut: float) -> int:
        conn = self.conn
        row = conn.execute("SELECT lane, ref, created, recipients, body IS NULL FROM messages "
                           "WHERE id = ?", (msg_id,)).fetchone()
        if row is None or row[4]:
            conn.executemany("DELETE FROM inbox WHERE k = ?", [(k,) for k, _, _ in entries])
            return 0
        lane, ref, created, recipients, _ = row
        mine = {k for k, _, _ in entries}
        keys = []
        for tid, seq in parse_recipients(recipients):
            key = (tid << 1) | lane
            k = (key << SEQ_BITS) | seq
            keys.append(k)
            if k in mine:
                continue
            if seq <= self._box(tid, lane)[_TRIM]:
                continue          # acked before the cutoff: deleted or kept as ENTRY_ACKED_KEPT
            # Pending, or dead after the cutoff: the message stays.  Its done
            # entries keep their times in the row (the range log goes).
            kept = []
            for k2, acked_at, dead_at in entries:
                key2 = k2 >> SEQ_BITS
                delivered_at = range_time(conn, key2 >> 1, lane, DELIVERED_RANGE,
                                           k2 & SEQ_MASK, dead_at)
                kept.append((acked_at, delivered_at, k2))
            conn.executemany(
                f"UPDATE inbox SET state = CASE WHEN state = 0 THEN {ENTRY_ACKED_KEPT} ELSE state END, "
                "ended_at = CASE WHEN state = 0 THEN ? ELSE ended_at END, "
                "delivered_at = COALESCE(delivered_at, ?) WHERE k = ?", kept)
            return 0
        conn.executemany("DELETE FROM inbox WHERE k = ?", [(k,) for k in keys])
        for k in keys:
            # Deleting dead rows above `acked` may lower the highest seq in
            # `inbox`: make sure `last` is in the cursor row.
            self._box((k >> SEQ_BITS) >> 1, (k >> SEQ_BITS) & 1)
            self.dirty.add(k >> SEQ_BITS)
        if ref and created >= window_cut:
            conn.execute("UPDATE messages SET body = NULL, recipients = '' WHERE id = ?", (msg_id,))
        else:
            conn.execute("DELETE FROM messages WHERE id = ?", (msg_id,))
        return 1

    # -- registry ----------------------------------------------------------------------------

    def register(self, rec: TerminalRecord) -> None:
        conn = self.conn
        roles = orjson.dumps(list(rec.roles)).decode()
        tid = self.tids.get(rec.address)
        if tid is None:
            tid = self._tid(rec.address)
            self.new_terminals.pop()          # inserted right here, complete
            conn.execute(
                "INSERT INTO terminals(tid, address, tenant, terminal, store, region, roles, member, "
                "first_seen, last_seen, retired, revoked_before, registered) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
                (tid, rec.address, rec.tenant, rec.terminal, rec.store, rec.region, roles,
                 rec.member, rec.first_seen, rec.last_seen, 1 if rec.retired else 0,
                 rec.revoked_before))
            return
        # A registered terminal keeps first_seen (unless it had none), retired
        # and revoked_before; a placeholder (a recipient that never logged in)
        # takes everything from the record.
        conn.execute(
            "UPDATE terminals SET tenant = ?, terminal = ?, store = ?, region = ?, roles = ?, "
            "member = ?, last_seen = ?, "
            "first_seen = CASE WHEN registered = 1 AND first_seen != 0 THEN first_seen ELSE ? END, "
            "retired = CASE WHEN registered = 1 THEN retired ELSE ? END, "
            "revoked_before = CASE WHEN registered = 1 THEN revoked_before ELSE ? END, "
            "registered = 1 WHERE tid = ?",
            (rec.tenant, rec.terminal, rec.store, rec.region, roles, rec.member, rec.last_seen,
             rec.first_seen, 1 if rec.retired else 0, rec.revoked_before, tid))

    def retire(self, address: str, retired: bool) -> bool:
        return self.conn.execute(
            "UPDATE terminals SET retired = ? WHERE address = ? AND registered = 1",
            (1 if retired else 0, address)).rowcount == 1

    def revoke(self, address: str, before: float) -> bool:
        return self.conn.execute(
            "UPDATE terminals SET revoked_before = ? WHERE address = ? AND registered = 1",
            (before, address)).rowcount == 1

    # -- key-value records ---------------------------------------------------------------------

    def kv_put(self, ns: str, key: str, value: bytes, now: float) -> None:
        self.conn.execute("INSERT INTO kv(ns, key, value, updated) VALUES (?, ?, ?, ?) "
                          "ON CONFLICT(ns, key) DO UPDATE SET value = excluded.value, "
                          "updated = excluded.updated", (ns, key, value, now))

    def kv_put_new(self, ns: str, key: str, value: bytes, now: float) -> bytes:
        self.conn.execute("INSERT INTO kv(ns, key, value, updated) VALUES (?, ?, ?, ?) "
                          "ON CONFLICT(ns, key) DO NOTHING", (ns, key, value, now))
        return bytes(self.conn.execute("SELECT value FROM kv WHERE ns = ? AND key = ?",
                                       (ns, key)).fetchone()[0])

    def kv_replace(self, ns: str, key: str, expected: bytes | None, value: bytes,
                   now: float) -> bytes | None:
        row = self.conn.execute("SELECT value FROM kv WHERE ns = ? AND key = ?",
                                (ns, key)).fetchone()
        found = bytes(row[0]) if row is not None else None
        if found != expected:
            return found
        self.conn.execute("INSERT INTO kv(ns, key, value, updated) VALUES (?, ?, ?, ?) "
                          "ON CONFLICT(ns, key) DO UPDATE SET value = excluded.value, "
                          "updated = excluded.updated", (ns, key, value, now))
        return value

    def kv_delete(self, ns: str, key: str) -> bool:
        return self.conn.execute("DELETE FROM kv WHERE ns = ? AND key = ?",
                                 (ns, key)).rowcount > 0

    def kv_delete_prefix(self, ns: str, prefix: str) -> int:
        if not prefix:
            return self.conn.execute("DELETE FROM kv WHERE ns = ?", (ns,)).rowcount
        return self.conn.execute("DELETE FROM kv WHERE ns = ? AND key >= ? AND key < ?",
                                 (ns, prefix, prefix + "\U0010ffff")).rowcount

    def kv_expire(self, ns: str, before: float) -> int:
        return self.conn.execute("DELETE FROM kv WHERE ns = ? AND updated < ?",
                                 (ns, before)).rowcount

    # -- streams -------------------------------------------------------------------------------

    def stream_append(self, name: str, lane: int, epoch: int, entry: StreamEntry) -> None:
        st = self.streams.get((name, lane))
        if st is None:
            sid = self.next_sid
            self.next_sid += 1
            st = self.streams[(name, lane)] = [sid, epoch, 0]
            self.conn.execute("INSERT INTO streams(sid, name, lane, epoch, pos) VALUES (?, ?, ?, ?, 0)",
                              (sid, name, lane, epoch))
        elif st[1] != epoch:
            # A new epoch: the old history and last values mean nothing any more.
            self._flush_streams()
            self.conn.execute("DELETE FROM stream_entries WHERE sid = ?", (st[0],))
            self.conn.execute("DELETE FROM lvc WHERE sid = ?", (st[0],))
            st[1] = epoch
            st[2] = 0
        sid = st[0]
        pos = entry.offset
        if pos > st[2]:
            st[2] = pos
        row = (sid, pos, entry.kind, entry.key, entry.version, bytes(entry.payload),
               entry.created, entry.expires)
        if self.history_max > 0:
            self.stream_rows.append(row)
        if lane == P2 and entry.key:
            self.lvc_rows.append(row)
        self.touched[sid] = st

    def forget_stream(self, name: str) -> int:
        """Delete both lanes of channel ``name``: rows, last values, position."""
        self._flush_streams()           # appends still in memory go too
        conn = self.conn
        gone = 0
        for lane in (2, 3):
            st = self.streams.pop((name, lane), None)
            if st is None:
                continue
            sid = st[0]
            self.touched.pop(sid, None)
            gone += conn.execute("DELETE FROM stream_entries WHERE sid = ?", (sid,)).rowcount
            gone += conn.execute("DELETE FROM lvc WHERE sid = ?", (sid,)).rowcount
            conn.execute("DELETE FROM streams WHERE sid = ?", (sid,))
        return gone

    def stream_expire_kind(self, kind: str, before: float) -> int:
        """Delete history entries of ``kind`` created before ``before`` (unix s)."""
        self._flush_streams()
        return self.conn.execute("DELETE FROM stream_entries WHERE kind = ? AND created < ?",
                                 (kind, before)).rowcount

    def _flush_streams(self) -> None:
        conn = self.conn
        if self.stream_rows:
            conn.executemany("INSERT OR REPLACE INTO stream_entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             self.stream_rows)
            self.stream_rows = []
        if self.lvc_rows:
            # Newest wins: a higher version; without versions on both sides, the higher offset.
            conn.executemany(
                "INSERT INTO lvc(sid, pos, kind, key, version, payload, created, expires) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(sid, key) DO UPDATE SET "
                "pos = excluded.pos, kind = excluded.kind, version = excluded.version, "
                "payload = excluded.payload, created = excluded.created, expires = excluded.expires "
                "WHERE CASE WHEN excluded.version != 0 AND lvc.version != 0 "
                "THEN excluded.version > lvc.version "
                "OR (excluded.version = lvc.version AND excluded.pos > lvc.pos) "
                "ELSE excluded.pos > lvc.pos END",
                self.lvc_rows)
            self.lvc_rows = []
        if self.touched:
            keep = self.history_max
            conn.executemany("UPDATE streams SET epoch = ?, pos = ? WHERE sid = ?",
                             [(st[1], st[2], sid) for sid, st in self.touched.items()])
            conn.executemany("DELETE FROM stream_entries WHERE sid = ? AND pos <= ?",
                             [(sid, st[2] - keep) for sid, st in self.touched.items()])
            self.touched = {}
