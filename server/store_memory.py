"""In-memory Store backend: everything in dicts, nothing survives the process.

Used when durability is not wanted (tests, demos, ``store.backend =
"memory"``).  It honours the whole Store contract, so a message is still
never lost while the process lives: slow consumers, reconnects and takeovers
all replay from here.  Its records, terminals and archive
(``records_memory.py``, ``terminals_memory.py``, ``archive_memory.py``)
share nothing with it or each other.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from typing import Sequence

from .archive_memory import MemoryArchive
from .records_memory import MemoryRecords
from .store import (
    ACKED, DELIVERED, EXPIRED, REJECTED, STORED, Accepted, Completion, DeadLetter, InboxEntry,
    NewMessage, ReceiptEvent, Recipient, Redriven, Trace,
)
from .terminals_memory import MemoryTerminals


class _Inbox:
    __slots__ = ("last", "acked", "entries")

    def __init__(self) -> None:
        self.last = 0          # highest seq assigned
        self.acked = 0         # highest seq acknowledged
        self.entries: dict[int, Recipient] = {}   # seq -> recipient state (unacked + history)


class MemoryStore:
    """Store backend held in this process's memory.

    Besides the Store protocol, the backend's own operation :meth:`stats`.
    """

    def __init__(self, *, dedup_window: float = 86400.0, epoch: int | None = None) -> None:
        self.epoch = epoch if epoch is not None else random.randrange(1, 1 << 31)
        self.dedup_window = dedup_window
        self._next_id = 1
        self._messages: dict[int, Trace] = {}
        self._dedup: dict[tuple[str, int], tuple[int, float]] = {}
        self._inboxes: dict[tuple[str, int], _Inbox] = {}
        self._dead: list[DeadLetter] = []
        self._bodies: dict[int, bytes] = {}
        # (terminal, lane, seq) -> msg_id, for every entry still held.
        self._index: dict[tuple[str, int, int], int] = {}
        self.records = MemoryRecords()
        self.terminals = MemoryTerminals()
        self.archive = MemoryArchive()

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _inbox(self, terminal: str, lane: int) -> _Inbox:
        key = (terminal, lane)
        box = self._inboxes.get(key)
        if box is None:
            box = self._inboxes[key] = _Inbox()
        return box

    async def accept_many(self, items) -> list[Accepted]:
        _check_lanes(items)
        return [self._accept(msg, recipients) for msg, recipients in items]

    def accept_many_then(self, items, callback) -> None:
        _check_lanes(items)
        results = [self._accept(msg, recipients) for msg, recipients in items]
        asyncio.get_running_loop().call_soon(Completion(callback).set_result, results)

    def _accept(self, msg: NewMessage, recipients: Sequence[str]) -> Accepted:
        if msg.ref:
            seen = self._dedup.get((msg.sender, msg.ref))
            if seen is not None and msg.created - seen[1] <= self.dedup_window:
                return Accepted(seen[0], True)
        msg_id = self._next_id
        self._next_id += 1
        seqs = {}
        recs = []
        for terminal in dict.fromkeys(recipients):
            box = self._inbox(terminal, msg.lane)
            box.last += 1
            rec = Recipient(terminal, box.last, STORED, msg.created)
            box.entries[box.last] = rec
            recs.append(rec)
            seqs[terminal] = box.last
            self._index[(terminal, msg.lane, box.last)] = msg_id
        self._messages[msg_id] = Trace(
            msg_id, msg.tenant, msg.sender, msg.ref, msg.lane, msg.kind, msg.to,
            msg.created, msg.expires, msg.receipt, recs)
        self._bodies[msg_id] = msg.body
        if msg.ref:
            self._dedup[(msg.sender, msg.ref)] = (msg_id, msg.created)
        return Accepted(msg_id, False, seqs)

    async def inbox(self, terminal: str, lane: int, after: int, limit: int) -> list[InboxEntry]:
        box = self._inboxes.get((terminal, lane))
        if box is None:
            return []
        out = []
        start = max(after, box.acked) + 1
        for seq in range(start, box.last + 1):
            rec = box.entries.get(seq)
            if rec is None or rec.state not in (STORED, DELIVERED):
                continue
            msg = self._find(terminal, lane, seq)
            out.append(InboxEntry(seq, msg.msg_id, msg.kind, self._bodies[msg.msg_id],
                                  rec.state == DELIVERED, msg.expires, msg.created))
            if len(out) >= limit:
                break
        return out

    def _find(self, terminal: str, lane: int, seq: int) -> Trace:
        return self._messages[self._index[(terminal, lane, seq)]]

    async def positions(self, terminal: str) -> tuple[int, int, int, int]:
        p0 = self._inboxes.get((terminal, 0))
        p1 = self._inboxes.get((terminal, 1))
        return (p0.acked if p0 else 0, p0.last if p0 else 0,
                p1.acked if p1 else 0, p1.last if p1 else 0)

    async def positions_many(self, terminals) -> list[tuple[int, int, int, int]]:
        return [await self.positions(t) for t in terminals]

    async def ack_many(self, acks, now: float) -> list[ReceiptEvent]:
        receipts: list[ReceiptEvent] = []
        for terminal, lane, seq in acks:
            receipts.extend(self._ack(terminal, lane, seq, now))
        return receipts

    def _ack(self, terminal: str, lane: int, seq: int, now: float) -> list[ReceiptEvent]:
        box = self._inboxes.get((terminal, lane))
        if box is None or seq <= box.acked:
            return []
        seq = min(seq, box.last)
        receipts = []
        for s in range(box.acked + 1, seq + 1):
            rec = box.entries.get(s)
            if rec is None or rec.state in (ACKED, EXPIRED, REJECTED):
                continue
            rec.state = ACKED
            rec.acked_at = now
            msg = self._find(terminal, lane, s)
            if msg.receipt:
                receipts.append(ReceiptEvent(msg.msg_id, terminal, msg.sender, msg.ref))
        box.acked = seq
        return receipts

    async def delivered_many(self, ranges, now: float) -> list[ReceiptEvent]:
        receipts: list[ReceiptEvent] = []
        for terminal, lane, first, last in ranges:
            box = self._inboxes.get((terminal, lane))
            if box is None:
                continue
            for s in range(first, last + 1):
                rec = box.entries.get(s)
                if rec is not None and rec.state == STORED:
                    rec.state = DELIVERED
                    rec.delivered_at = now
                    msg = self._find(terminal, lane, s)
                    if msg.receipt:
                        receipts.append(ReceiptEvent(msg.msg_id, terminal, msg.sender, msg.ref))
        return receipts

    def _dead_letter(self, terminal: str, lane: int, seq: int, state: str, reason: str,
                     now: float) -> DeadLetter | None:
        box = self._inboxes.get((terminal, lane))
        rec = box.entries.get(seq) if box else None
        if rec is None or rec.state not in (STORED, DELIVERED):
            return None
        rec.state = state
        rec.ended_at = now
        rec.reason = reason
        msg = self._find(terminal, lane, seq)
        dead = DeadLetter(msg.msg_id, terminal, lane, seq, msg.kind, reason, now,
                          msg.sender, msg.ref, msg.receipt)
        self._dead.append(dead)
        return dead

    async def reject(self, terminal: str, lane: int, seq: int, reason: str,
                     now: float) -> DeadLetter | None:
        return self._dead_letter(terminal, lane, seq, REJECTED, reason, now)

    async def expire(self, now: float) -> list[DeadLetter]:
        out = []
        for msg in self._messages.values():
            if msg.expires > now:
                continue
            for rec in msg.recipients:
                if rec.state in (STORED, DELIVERED):
                    dead = self._dead_letter(rec.terminal, msg.lane, rec.seq, EXPIRED,
                                             "ttl", now)
                    if dead is not None:
                        out.append(dead)
        return out

    async def trace(self, msg_id: int) -> Trace | None:
        msg = self._messages.get(msg_id)
        if msg is None:
            return None
        return replace(msg, recipients=[replace(r) for r in msg.recipients])

    async def dead_letters(self, tenant: str | None, limit: int) -> list[DeadLetter]:
        out = [d for d in reversed(self._dead)
               if tenant is None or d.terminal.startswith(f"terminal:{tenant}/")]
        return out[:limit]

    async def redrive(self, terminal: str, msg_id: int | None, now: float,
                      ttls: tuple[float, float], limit: int) -> list[Redriven]:
        out: list[Redriven] = []
        kept = []
        for dead in self._dead:              # oldest first
            msg = self._messages.get(dead.msg_id)
            if (len(out) >= limit or dead.terminal != terminal or msg is None
                    or (msg_id is not None and dead.msg_id != msg_id)):
                kept.append(dead)
                continue
            box = self._inbox(terminal, dead.lane)
            box.last += 1
            rec = Recipient(terminal, box.last, STORED, msg.created, reason="redriven")
            box.entries[box.last] = rec
            msg.recipients.append(rec)
            self._index[(terminal, dead.lane, box.last)] = msg.msg_id
            msg.expires = max(msg.expires, now + ttls[dead.lane])
            out.append(Redriven(msg.msg_id, terminal, dead.lane, dead.seq, box.last, msg.kind,
                                self._bodies[msg.msg_id], msg.created, msg.expires))
        self._dead = kept
        return out

    async def trim(self, now: float, keep_acked: float) -> int:
        removed = 0
        for msg_id in list(self._messages):
            msg = self._messages[msg_id]
            if all(r.state not in (STORED, DELIVERED) and (r.acked_at or r.ended_at or 0)
                   <= now - keep_acked for r in msg.recipients):
                for r in msg.recipients:
                    box = self._inboxes.get((r.terminal, msg.lane))
                    if box is not None:
                        box.entries.pop(r.seq, None)
                    self._index.pop((r.terminal, msg.lane, r.seq), None)
                del self._messages[msg_id]
                self._bodies.pop(msg_id, None)
                removed += 1
        for key, (_, created) in list(self._dedup.items()):
            if now - created > self.dedup_window:
                del self._dedup[key]
        return removed

    async def stats(self) -> dict:
        """Sizes: messages, unacked entries, dead letters, registered terminals, bytes."""
        unacked = sum(1 for box in self._inboxes.values() for r in box.entries.values()
                      if r.state in (STORED, DELIVERED))
        return {
            "backend": "memory", "messages": len(self._messages), "unacked": unacked,
            "dead_letters": len(self._dead), "terminals": len(self.terminals),
            "bytes": sum(len(b) for b in self._bodies.values()),
        }


def _check_lanes(items) -> None:
    """A batch with a lane other than P0 or P1 is refused whole."""
    for msg, _ in items:
        if msg.lane not in (0, 1):
            raise ValueError(f"accept_many: lane must be P0 or P1, got {msg.lane!r}")
