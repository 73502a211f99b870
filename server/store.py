"""The Store interface: where P0/P1 messages live until terminals ack them.

The server never delivers a P0/P1 message it has not first handed to the
store, and never acks a sender before the store said the message is kept.
Backends sit beside this file (``store_memory.py``; the SQLite and Redis
backends follow the same contract) and ``tests/test_store_contract.py``
runs one suite of contract tests against every backend.

Vocabulary: an *inbox* is (terminal address, lane) for lane P0 or P1; its
messages are numbered by ``seq`` from 1.  A message has one ``msg_id`` for
all its recipients.  A terminal's ``acked`` position is the highest seq it
acknowledged (cumulatively).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

log = logging.getLogger("tillwire.store")

# Life of one message at one recipient (trace states).
STORED = "stored"
DELIVERED = "delivered"
ACKED = "acked"
EXPIRED = "expired"
REJECTED = "rejected"


@dataclass(slots=True)
class NewMessage:
    """A P0/P1 message the server accepted and wants stored."""

    tenant: str
    sender: str          # terminal address, or "admin:<token name>"
    ref: int             # the sender's idempotency key (0 = none)
    lane: int
    kind: str
    to: str              # the address it was sent to
    body: bytes          # UTF-8 JSON object
    created: float       # unix seconds
    expires: float       # unix seconds; undelivered by then -> dead letter
    receipt: bool = False


@dataclass(slots=True)
class Accepted:
    msg_id: int
    duplicate: bool                  # the (sender, ref) was seen in the dedup window
    seqs: dict[str, int] = field(default_factory=dict)   # recipient -> inbox seq


@dataclass(slots=True)
class InboxEntry:
    seq: int
    msg_id: int
    kind: str
    body: bytes
    delivered: bool      # written to the terminal at least once before
    expires: float


@dataclass(slots=True)
class Recipient:
    terminal: str
    seq: int
    state: str
    stored_at: float
    delivered_at: float | None = None
    acked_at: float | None = None
    ended_at: float | None = None        # expired or rejected
    reason: str = ""


@dataclass(slots=True)
class Trace:
    """Everything support needs to answer "did till 7 get payment result X?"."""

    msg_id: int
    tenant: str
    sender: str
    ref: int
    lane: int
    kind: str
    to: str
    created: float
    expires: float
    receipt: bool
    recipients: list[Recipient]

    def to_dict(self) -> dict:
        return {
            "id": str(self.msg_id), "tenant": self.tenant, "sender": self.sender,
            "ref": self.ref, "lane": f"P{self.lane}", "kind": self.kind, "to": self.to,
            "created": self.created, "expires": self.expires,
            "recipients": [
                {"terminal": r.terminal, "seq": r.seq, "state": r.state,
                 "stored_at": r.stored_at, "delivered_at": r.delivered_at,
                 "acked_at": r.acked_at, "ended_at": r.ended_at, "reason": r.reason}
                for r in self.recipients
            ],
        }


@dataclass(slots=True)
class DeadLetter:
    msg_id: int
    terminal: str
    lane: int
    seq: int
    kind: str
    reason: str
    at: float
    sender: str = ""
    ref: int = 0
    receipt: bool = False


@dataclass(slots=True)
class ReceiptEvent:
    """A recipient acknowledged a message whose sender asked for receipts."""

    msg_id: int
    terminal: str
    sender: str
    ref: int


@dataclass(slots=True)
class TerminalRecord:
    """One terminal the system knows, connected or not (the registry)."""

    address: str          # terminal:<tenant>/<terminal>
    tenant: str
    terminal: str
    store: str
    region: str
    roles: tuple[str, ...]
    member: str = ""
    first_seen: float = 0.0
    last_seen: float = 0.0
    retired: bool = False
    revoked_before: float = 0.0   # tokens issued before this are refused


@dataclass(slots=True)
class StreamEntry:
    """One persisted message of a P2/P3 channel stream (history or last value)."""

    offset: int
    kind: str
    key: str             # P2 conflation key ("" = none)
    version: int         # source version for P2 ("newest wins"); 0 = none
    payload: bytes
    created: float       # unix seconds
    expires: float       # unix seconds; 0.0 = never


@dataclass(slots=True)
class StreamState:
    """What a store kept of one stream, as :meth:`Store.load_streams` returns it."""

    name: str
    lane: int
    epoch: int
    offset: int                      # highest offset persisted; the next one is offset + 1
    history: list[StreamEntry]       # oldest first, within history_max and history_age
    lvc: list[StreamEntry]           # P2 only: the newest entry of every key (by offset)


KV_PAGE = 1000
"""Rows per ``kv_scan`` round trip when :func:`kv_records` walks a namespace."""


async def kv_records(store, ns: str, prefix: str = "", after: str = ""):
    """Every ``(key, value)`` of namespace ``ns`` under ``prefix`` (keys above
    ``after``), in key order, read a page of KV_PAGE at a time; stop early by
    breaking out of the ``async for``."""
    while True:
        rows = await store.kv_scan(ns, prefix, after, KV_PAGE)
        for row in rows:
            yield row
        if len(rows) < KV_PAGE:
            return
        after = rows[-1][0]


class Completion:
    """A callback in a future's place, for backends that settle futures on the
    loop (``done``, ``set_result``, ``set_exception``): ``accept_many_then``
    hands one to the same machinery.  A callback that raises is logged, never
    propagated into the store's settling of other requests."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable) -> None:
        self.callback = callback

    def done(self) -> bool:
        return False

    def set_result(self, result) -> None:
        self._call(result, None)

    def set_exception(self, exc: BaseException) -> None:
        self._call(None, exc)

    def _call(self, result, exc) -> None:
        try:
            self.callback(result, exc)
        except Exception:
            log.exception("store completion callback failed")


@runtime_checkable
class Store(Protocol):
    """The contract every store backend fulfils.

    Every method is a coroutine except :meth:`configure_streams` and
    :meth:`stream_append`, which are plain calls made on the event loop.
    """

    epoch: int
    """Identifies this store's inbox history; a new store has a new epoch."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def accept_many(self, items: Sequence[tuple[NewMessage, Sequence[str]]]
                          ) -> list[Accepted]:
        """Store each message for every one of its recipients, durably.

        For each (message, recipients): a non-zero ``msg.ref`` already
        accepted from ``msg.sender`` within the dedup window (including
        earlier in the same batch) returns the original ``msg_id`` with
        ``duplicate`` set and stores nothing.  Otherwise the message gets the
        next ``msg_id`` and, in each recipient's inbox of ``msg.lane``, the
        next seq.  Returns only once the whole batch survives what the
        backend promises (power loss, for SQLite with synchronous=FULL), in
        the order given.  Batches are the unit of group commit.
        """

    def accept_many_then(self, items: Sequence[tuple[NewMessage, Sequence[str]]],
                         callback: Callable[[list[Accepted] | None, BaseException | None], None]
                         ) -> None:
        """:meth:`accept_many` with a completion callback instead of an awaitable.

        ``callback(results, None)`` or ``callback(None, exception)`` is called
        once, later, on the event loop.  Raises at once if the store is not
        open.  The hot path uses it: a callback run where the store settles
        its work costs one loop iteration less than waking an awaiting task.
        """

    async def inbox(self, terminal: str, lane: int, after: int, limit: int) -> list[InboxEntry]:
        """Unacked, unexpired entries with seq > ``after``, in seq order."""

    async def positions(self, terminal: str) -> tuple[int, int, int, int]:
        """(acked P0, last seq P0, acked P1, last seq P1) of a terminal."""

    async def ack_many(self, acks: Sequence[tuple[str, int, int]], now: float
                       ) -> list[ReceiptEvent]:
        """Apply cumulative acks (terminal, lane, seq); returns a ReceiptEvent
        for each newly acked message whose sender asked for receipts."""

    async def delivered_many(self, ranges: Sequence[tuple[str, int, int, int]],
                             now: float) -> list[ReceiptEvent]:
        """Seqs ``first..last`` of (terminal, lane, first, last) were written
        to the terminal (the trace's "delivered"); returns a ReceiptEvent for
        each message delivered for the first time whose sender asked for
        receipts.

        The node delivers each inbox in seq order, so a backend may keep a
        delivered *position* per inbox: after a range, every unacked seq up
        to ``last`` may count as delivered.
        """

    async def reject(self, terminal: str, lane: int, seq: int, reason: str,
                     now: float) -> DeadLetter | None:
        """The terminal refused one message for good: dead-letter it."""

    async def expire(self, now: float) -> list[DeadLetter]:
        """Dead-letter every unacked entry whose message expired by ``now``."""

    async def trace(self, msg_id: int) -> Trace | None: ...
    async def dead_letters(self, tenant: str | None, limit: int) -> list[DeadLetter]: ...

    async def register(self, record: TerminalRecord) -> None:
        """Insert or update a terminal (keeps first_seen, retired, revoked_before)."""

    async def terminal(self, address: str) -> TerminalRecord | None: ...
    async def terminals(self, tenant: str | None = None) -> list[TerminalRecord]:
        """Every registered terminal (of one tenant, or all)."""
    async def retire(self, address: str, retired: bool) -> bool: ...
    async def revoke(self, address: str, before: float) -> bool: ...

    async def trim(self, now: float, keep_acked: float) -> int:
        """Delete acked and dead entries older than ``keep_acked`` seconds."""

    # Key-value records for the services on top of delivery (tickets,
    # conversations, offer caps, the store directory): small JSON values in
    # namespaces, written through the same group commit as messages.

    async def kv_put(self, ns: str, key: str, value: bytes, now: float) -> None: ...
    async def kv_get(self, ns: str, key: str) -> bytes | None: ...

    async def kv_scan(self, ns: str, prefix: str = "", after: str = "",
                      limit: int = 1000, *, reverse: bool = False,
                      before: str = "") -> list[tuple[str, bytes]]:
        """At most ``limit`` records of ``ns`` whose key starts with ``prefix``,
        sorts after ``after`` and (when ``before`` is not empty) before
        ``before``; ``""`` leaves a bound open.

        In key order, or with ``reverse`` in descending key order: the
        *highest* keys in range come first, so ``limit`` keeps the newest of
        time-ordered keys.  A reverse scan pages on by passing the last key it
        returned as the next call's ``before``.  A durable backend answers
        either direction with one walk of its key index that stops after
        ``limit`` records (SQLite: the (ns, key) primary key), so a page costs
        the same however many records the prefix holds.
        """

    async def kv_delete(self, ns: str, key: str) -> bool: ...
    async def kv_delete_prefix(self, ns: str, prefix: str) -> int: ...

    async def kv_expire(self, ns: str, before: float) -> int:
        """Delete the records of ``ns`` last written before ``before`` (retention)."""

    async def stats(self) -> dict:
        """Sizes: messages, unacked entries, dead letters, terminals, bytes."""

    # -- P2/P3 stream persistence (channel history and the last-value cache) --

    def configure_streams(self, history_max: int, history_age: float) -> None:
        """Bounds of the kept history (``[history]``); the node calls it before
        :meth:`open`.  A backend that keeps no streams ignores it."""

    def stream_append(self, name: str, lane: int, epoch: int, entry: StreamEntry) -> None:
        """Keep one appended stream entry (NOT a coroutine: fire and forget).

        Called on the event loop for every P2/P3 broadcast; it never blocks
        and never raises for a store that is open.  The entry is written
        with the next group commit, so a crash may lose the last few
        milliseconds of channel history (channels are not P0/P1: terminals
        resync).  The stream keeps at most ``history_max`` entries; for P2,
        the last-value cache keeps one entry per key, the newest (a higher
        version wins; equal or absent versions: the higher offset).  An
        ``epoch`` different from the stream's stored one resets its history.
        """

    async def forget_stream(self, name: str) -> int:
        """Delete everything kept of channel ``name`` (both lanes: history, last
        values, position), e.g. a member's personal channel on a deletion
        request; returns how many entries went.  A later append starts the
        stream afresh.  A store that keeps no streams returns 0."""

    async def stream_expire_kind(self, kind: str, before: float) -> int:
        """Delete kept history entries of ``kind`` created before ``before``
        (unix s) in every stream: a kind's own retention, shorter than the
        history's age (``retention.member_notice``).  Returns how many went."""

    async def load_streams(self, history_max: int, history_age: float,
                           now: float) -> list[StreamState]:
        """Every kept stream: its epoch and highest offset, the history
        entries within ``history_max`` and ``history_age`` of ``now`` that
        have not expired, and (P2) the unexpired last values.  Offsets of a
        loaded stream continue after ``offset``.  A store that keeps no
        streams returns ``[]`` (and has a new epoch every process)."""
