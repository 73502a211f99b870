"""The SQLite store's database: its tables, their migrations, the inbox key
layout, and the reads that the writer and the reader both make.

Writes per single-recipient message: a ``messages`` row and an inbox row
(staged, see below), plus the dedup index entry (when it has a ref).
Delivered and acked are not per-row updates: each inbox has a ``cursors``
row (acked and delivered positions) and ``rangelog`` keeps one row per
delivered/acked range with its time (the trace's ``delivered_at`` and
``acked_at``).  The ``last`` seq of an inbox is *not* written per message:
it is max(cursors.last, highest seq of the inbox's rows) (:func:`top_key`),
and the writer writes ``cursors.last`` whenever it writes the cursor row
(acks, deliveries) and always before trim deletes inbox rows, so a seq is
never handed out twice.

Inbox rows are keyed ``k = tid << 41 | lane << 40 | seq`` (seq < 2**40,
tid < 2**22): an inbox is a contiguous key range, so replay, acks and trim are
range scans of the table's own b-tree and inserts need no secondary index.
Appending to many inboxes at once would dirty one 4 KiB leaf page per inbox
per commit (2.5 KB of WAL per message with 1,000 inboxes, measured), so an
accept puts its rows in ``inbox_staged``, a small table of the same keys, and
the writer moves them to ``inbox`` in bulk (see store_sqlite_writer.py): one
page per inbox per merge instead of per commit.  Readers take an inbox's
``inbox`` rows first, then its staged ones.

The ``terminals`` table is both the durable registry (rows with
``registered = 1``) and the map of inbox addresses to tids (a recipient that
never logged in has a placeholder row).  The services' key-value records
(``kv``) and the P2/P3 channel history (``streams``, ``stream_entries``,
``lvc``) live in the same file and the same transactions.

Schema versions live in ``meta.schema_version``; :data:`MIGRATIONS` are
applied in order at open, each in one transaction, so an upgrade never
loses a stored message.
"""

from __future__ import annotations

import logging
import sqlite3

log = logging.getLogger("tillwire.store.sqlite")

# Inbox keys: k = tid << 41 | lane << 40 | seq.  The cursor key of an inbox is
# k >> 40 == tid << 1 | lane.
SEQ_BITS = 40
SEQ_MASK = (1 << SEQ_BITS) - 1
MAX_TID = (1 << 22) - 1

# inbox.state
ENTRY_PENDING = 0        # delivered/acked are derived from the inbox's cursor
ENTRY_ACKED_KEPT = 2     # acked long ago, row kept because another recipient is not done
ENTRY_EXPIRED = 3
ENTRY_REJECTED = 4
# inbox.flags
F_RECEIPT = 1      # the sender asked for receipts
F_GROUP = 2        # the message has several recipients

# rangelog.what
DELIVERED_RANGE = 1
ACKED_RANGE = 2

P2 = 2             # the lane whose streams keep last values (streams.lane)


_V1 = (
    """CREATE TABLE meta(key TEXT PRIMARY KEY, value)""",
    """CREATE TABLE terminals(
        tid INTEGER PRIMARY KEY,
        address TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL DEFAULT '',
        terminal TEXT NOT NULL DEFAULT '',
        store TEXT NOT NULL DEFAULT '',
        region TEXT NOT NULL DEFAULT '',
        roles TEXT NOT NULL DEFAULT '[]',
        member TEXT NOT NULL DEFAULT '',
        first_seen REAL NOT NULL DEFAULT 0,
        last_seen REAL NOT NULL DEFAULT 0,
        retired INTEGER NOT NULL DEFAULT 0,
        revoked_before REAL NOT NULL DEFAULT 0,
        registered INTEGER NOT NULL DEFAULT 0)""",
    # body IS NULL (and recipients '') marks a tombstone: a trimmed message
    # whose (sender, ref) is still inside the dedup window.
    """CREATE TABLE messages(
        id INTEGER PRIMARY KEY,
        tenant TEXT NOT NULL,
        sender TEXT NOT NULL,
        ref INTEGER NOT NULL,
        lane INTEGER NOT NULL,
        kind TEXT NOT NULL,
        dest TEXT NOT NULL,
        body BLOB,
        created REAL NOT NULL,
        expires REAL NOT NULL,
        receipt INTEGER NOT NULL,
        recipients TEXT NOT NULL)""",
    # Not UNIQUE: a ref older than the dedup window may be used again, and the
    # lookup takes the newest row (the single writer checks before inserting).
    """CREATE INDEX messages_dedup ON messages(sender, ref) WHERE ref != 0""",
    """CREATE TABLE inbox(
        k INTEGER PRIMARY KEY,
        msg_id INTEGER NOT NULL,
        state INTEGER NOT NULL DEFAULT 0,
        ended_at REAL,
        reason TEXT)""",
    """CREATE TABLE cursors(
        k INTEGER PRIMARY KEY,
        last INTEGER NOT NULL DEFAULT 0,
        acked INTEGER NOT NULL DEFAULT 0,
        delivered INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE rangelog(
        tid INTEGER NOT NULL,
        lane INTEGER NOT NULL,
        what INTEGER NOT NULL,
        first INTEGER NOT NULL,
        last INTEGER NOT NULL,
        at REAL NOT NULL)""",
    """CREATE INDEX rangelog_seq ON rangelog(tid, lane, what, last)""",
    """CREATE TABLE dead_letters(
        id INTEGER PRIMARY KEY,
        msg_id INTEGER NOT NULL,
        terminal TEXT NOT NULL,
        lane INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        reason TEXT NOT NULL,
        at REAL NOT NULL,
        sender TEXT NOT NULL,
        ref INTEGER NOT NULL,
        receipt INTEGER NOT NULL)""",
)

_V2 = (
    # Per-entry flags, so acks find receipt-wanting entries and trim finds
    # group messages without reading every message row; backfilled.
    """ALTER TABLE inbox ADD COLUMN flags INTEGER NOT NULL DEFAULT 0""",
    f"""UPDATE inbox SET flags = (
        SELECT (CASE WHEN m.receipt != 0 THEN {F_RECEIPT} ELSE 0 END)
             | (CASE WHEN instr(m.recipients, ',') > 0 THEN {F_GROUP} ELSE 0 END)
        FROM messages m WHERE m.id = inbox.msg_id)
       WHERE EXISTS (SELECT 1 FROM messages m WHERE m.id = inbox.msg_id)""",
    # Rows trim keeps (their message waits for another recipient) keep their
    # delivery time here once the range log of it is trimmed.
    """ALTER TABLE inbox ADD COLUMN delivered_at REAL""",
    # How far trim went in each inbox.
    """ALTER TABLE cursors ADD COLUMN trimmed INTEGER NOT NULL DEFAULT 0""",
    # Messages trim cannot reach through an inbox: tombstones and messages
    # that had no recipient at all (recipients = '').
    """CREATE INDEX messages_idle ON messages(created) WHERE recipients = ''""",
    """CREATE INDEX inbox_ended ON inbox(ended_at) WHERE state >= 3""",
    """CREATE INDEX rangelog_at ON rangelog(at)""",
    # P2/P3 channel streams: history and the last-value cache.
    """CREATE TABLE streams(
        sid INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        lane INTEGER NOT NULL,
        epoch INTEGER NOT NULL,
        pos INTEGER NOT NULL DEFAULT 0,
        UNIQUE(name, lane))""",
    """CREATE TABLE stream_entries(
        sid INTEGER NOT NULL,
        pos INTEGER NOT NULL,
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        version INTEGER NOT NULL,
        payload BLOB NOT NULL,
        created REAL NOT NULL,
        expires REAL NOT NULL,
        PRIMARY KEY(sid, pos)) WITHOUT ROWID""",
    """CREATE TABLE lvc(
        sid INTEGER NOT NULL,
        key TEXT NOT NULL,
        pos INTEGER NOT NULL,
        kind TEXT NOT NULL,
        version INTEGER NOT NULL,
        payload BLOB NOT NULL,
        created REAL NOT NULL,
        expires REAL NOT NULL,
        PRIMARY KEY(sid, key)) WITHOUT ROWID""",
)

_V3 = (
    """CREATE TABLE kv (
        ns TEXT NOT NULL,
        key TEXT NOT NULL,
        value BLOB NOT NULL,
        updated REAL NOT NULL,
        PRIMARY KEY(ns, key)) WITHOUT ROWID""",
    "CREATE INDEX kv_updated ON kv(ns, updated)",
)

_V4 = (
    "CREATE INDEX stream_entries_kind ON stream_entries(kind, created)",
)

_V5 = (
    # The newest inbox entries, moved to `inbox` in bulk (see Writer.merge_staged in store_sqlite_writer.py).
    """CREATE TABLE inbox_staged(
        k INTEGER PRIMARY KEY,
        msg_id INTEGER NOT NULL,
        flags INTEGER NOT NULL DEFAULT 0)""",
)

MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "inboxes, messages, registry, dead letters", _V1),
    (2, "inbox flags and kept-entry times, trim positions, channel streams", _V2),
    (3, "key-value records of the services (tickets, conversations, offer caps, directory)",
     _V3),
    (4, "history entries by kind and age (retention of member notices)", _V4),
    (5, "staged inbox entries (accepts append to a small table, merged in bulk)", _V5),
)
"""(version, description, statements), applied in order; never edit a shipped one."""

SCHEMA_VERSION = MIGRATIONS[-1][0]


def schema_version(conn: sqlite3.Connection) -> int:
    """The schema version of an open database (0 = empty)."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
    if exists is None:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row is not None else 0


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Bring the database of ``conn`` (autocommit mode) to schema ``target``.

    Each migration runs in its own IMMEDIATE transaction together with the
    version bump, so a crash mid-way leaves the previous version intact.
    Returns the version reached; raises RuntimeError for a database newer
    than this code.
    """
    current = schema_version(conn)
    if current > SCHEMA_VERSION:
        raise RuntimeError(f"database schema version {current} is newer than this "
                           f"Tillwire's ({SCHEMA_VERSION}); upgrade Tillwire")
    for version, description, statements in MIGRATIONS:
        if version <= current or version > target:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql in statements:
                conn.execute(sql)
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
                         (version,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("store schema migrated to v%d (%s)", version, description)
        current = version
    return current


def connect(path: str, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection to the database at ``path`` as every worker of the store
    opens it; ``readonly`` for the reader."""
    # Autocommit mode (isolation_level=None): transactions are explicit.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True,
                           cached_statements=256)
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA temp_store = MEMORY")
    if readonly:
        conn.execute("PRAGMA cache_size = -32768")       # 32 MiB
        conn.execute("PRAGMA query_only = ON")
    return conn


# Refs are unsigned 64-bit on the wire, SQLite integers are signed: refs of
# 2**63 and above are stored as ref - 2**64.
REF_WRAP = 1 << 63


def ref_in(ref: int) -> int:
    return ref - (1 << 64) if ref >= REF_WRAP else ref


def ref_out(ref: int) -> int:
    return ref + (1 << 64) if ref < 0 else ref


# Highest key of an inbox range (k BETWEEN ? AND ?): a staged one, else a merged one.
_TOP_KEY = ("SELECT MAX(k) FROM inbox_staged WHERE k BETWEEN ? AND ?",
            "SELECT MAX(k) FROM inbox WHERE k BETWEEN ? AND ?")


def is_staged(conn: sqlite3.Connection, k: int) -> bool:
    """Whether inbox entry ``k`` is still in ``inbox_staged``."""
    return conn.execute("SELECT 1 FROM inbox_staged WHERE k = ?", (k,)).fetchone() is not None


def top_key(conn: sqlite3.Connection, base: int) -> int | None:
    """Highest inbox key of the inbox whose keys start at ``base`` (None: no rows)."""
    for sql in _TOP_KEY:
        top = conn.execute(sql, (base, base | SEQ_MASK)).fetchone()[0]
        if top is not None:
            return top
    return None


def parse_recipients(text: str):
    """Parse ``messages.recipients`` ("tid:seq,tid:seq") into (tid, seq) pairs."""
    for part in text.split(","):
        if part:
            tid, _, seq = part.partition(":")
            yield int(tid), int(seq)


def range_time(conn: sqlite3.Connection, tid: int, lane: int, what: int, seq: int,
               before: float | None) -> float | None:
    """Earliest time a logged range of ``what`` covered ``seq`` (and came
    before ``before``, the time an entry went dead: later deliveries of a
    dead entry do not count).  Reads at most 64 index entries of that inbox."""
    row = conn.execute(
        "SELECT MIN(at) FROM (SELECT first, at FROM rangelog WHERE tid = ? AND lane = ? "
        "AND what = ? AND last >= ? ORDER BY last LIMIT 64) WHERE first <= ? AND at < ?",
        (tid, lane, what, seq, seq, before if before is not None else float("inf"))).fetchone()
    return row[0] if row is not None else None
