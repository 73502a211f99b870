"""The Store interface: where P0/P1 messages live until terminals ack them.

The server never delivers a P0/P1 message it has not first handed to the
store, and never acks a sender before the store said the message is kept.
Backends sit beside this file (``store_memory.py``, ``store_sqlite.py``)
and ``tests/test_store_contract.py`` runs one suite of contract tests
against every backend.

The Store is a message's life: inboxes, dedup, its trace and receipts, dead
letters.  A backend also carries the other persistent parts of the node, as
attributes with interfaces of their own: ``records`` (records.py, the
services' key-value records), ``terminals`` (terminals.py, the terminal
records) and ``archive`` (archive.py, P2/P3 channel history).  Operations
that differ per backend are the backend's own, not the protocol's: e.g.
``stats()`` on both, ``backup()`` on SQLite only.

Vocabulary: an *inbox* is (terminal address, lane) for lane P0 or P1; its
messages are numbered by ``seq`` from 1.  A message has one ``msg_id`` for
all its recipients.  A terminal's ``acked`` position is the highest seq it
acknowledged (cumulatively).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

from .archive import ChannelArchive
from .records import Records
from .terminals import Terminals

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
    created: float = 0.0  # when the message was accepted (unix s; 0: not known)


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
class Redriven:
    """A dead letter put back in its terminal's inbox (:meth:`Store.redrive`)."""

    msg_id: int          # the same message
    terminal: str
    lane: int
    dead_seq: int        # the entry that went dead (it stays dead in the trace)
    seq: int             # the new entry: the inbox's next seq
    kind: str
    body: bytes
    created: float       # when the message was first accepted (unix s)
    expires: float       # the message's expiry after the redrive


@dataclass(slots=True)
class ReceiptEvent:
    """A recipient acknowledged a message whose sender asked for receipts."""

    msg_id: int
    terminal: str
    sender: str
    ref: int


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

    Every method is a coroutine except :meth:`accept_many_then`, which hands
    its result to a callback.
    """

    epoch: int
    """Identifies this store's inbox history; a new store has a new epoch."""

    records: Records
    """The services' key-value records kept by the same backend."""

    terminals: Terminals
    """The terminal records kept by the same backend."""

    archive: ChannelArchive
    """The P2/P3 channel history kept by the same backend."""

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

    async def positions_many(self, terminals: Sequence[str]
                             ) -> list[tuple[int, int, int, int]]:
        """:meth:`positions` of each of ``terminals``, in order, in one
        request (a fleet worker reconciles every session it holds with it)."""

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

    async def trace(self, msg_id: int) -> Trace | None:
        """The message and each recipient's state (None: unknown or trimmed)."""

    async def dead_letters(self, tenant: str | None, limit: int) -> list[DeadLetter]:
        """The newest ``limit`` dead letters (of one tenant's terminals, or all)."""

    async def redrive(self, terminal: str, msg_id: int | None, now: float,
                      ttls: tuple[float, float], limit: int) -> list[Redriven]:
        """Put dead letters of ``terminal`` back in its inbox, in one write:
        the one of message ``msg_id``, or (None) its oldest ``limit``.

        Each becomes a new entry of its lane's inbox: the next seq, the same
        ``msg_id``, delivered like any other.  The dead entry stays dead in the
        trace, which lists the new one after it (reason ``"redriven"``); the
        dead letter leaves :meth:`dead_letters`.  The message's expiry becomes
        at least ``now + ttls[lane]`` (for every recipient still waiting for
        it).  A dead letter whose message was trimmed cannot come back and is
        left in the list.  Returns one :class:`Redriven` per entry, oldest
        dead letter first.  Raises: nothing changed.
        """

    async def trim(self, now: float, keep_acked: float) -> int:
        """Delete acked and dead entries older than ``keep_acked`` seconds."""
