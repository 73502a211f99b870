"""Output: one write per dirty connection per loop iteration.

Every part of the node that queues a frame for a connection marks it dirty
(:meth:`Output.mark_dirty`); one flush per loop iteration writes each dirty
connection once with everything it has by then, in slices of
``server.flush_slice_ms`` so a huge fan-out never holds the loop.  The flush
also runs each connection's paced work (resync snapshots, HISTORY answers),
resumes inboxes that drained, and lifts reading holds a write resolved.

State owned here: the dirty list, the connections a sliced flush left, and
the read budget the connections use (never below the last flush's time).
"""

from __future__ import annotations

import time

from ..core.codes import Lane
from ..core.session import CLOSED, OPEN
from .connection import (
    HOLD_BUDGET,
    HOLD_PONG,
    STALL_HOLDS,
    InboxState,
    TerminalConnection,
)

_P0, _P1 = int(Lane.P0), int(Lane.P1)


class Output:
    """The node's write coalescing (one per node)."""

    def __init__(self, node) -> None:
        self.node = node
        self.loop = node.loop
        self.counters = node.counters
        srv = node.cfg.server
        self.write_chunk = srv.write_chunk
        self.inbox_budget = node.inbox_budget
        # Seconds of frames one connection may have handled per turn (see
        # TerminalConnection.data_received); never below the last flush's
        # duration, so a fan-out still coalesces many frames per write.
        self._read_budget = srv.read_budget_ms / 1000.0
        self.read_budget = self._read_budget or float("inf")
        # Seconds of writes one flush does before the loop polls again; the
        # connections left keep their place at the head of the next flush.
        self.flush_slice = srv.flush_slice_ms / 1000.0 or float("inf")
        self.dirty: list[TerminalConnection] = []
        self._held = []          # [(dirty list, position)]: what a flush left (flush slices)
        self._flush_handle = None
        self.channels = self.delivery = self.commands = None    # (set by the node: wire())

    def wire(self, channels, delivery, commands) -> None:
        self.channels, self.delivery, self.commands = channels, delivery, commands

    def wake(self) -> None:
        """Flush at the next iteration (frames were queued without mark_dirty)."""
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self.flush)

    def mark_dirty(self, conn: TerminalConnection) -> None:
        if not conn.dirty:
            conn.dirty = True
            self.dirty.append(conn)
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every dirty connection once (the write coalescing point).

        A flush writes for at most ``flush_slice`` seconds; the connections
        left are held, still marked dirty and in order, for the next
        iteration, after the loop has read what arrived meanwhile (a payment
        result's SEND, a commit's results).  The next flush takes them first,
        then those marked before it began; those marked while it runs wait
        for the one after.  Each gets one write per cycle with everything it
        has by then.  (Held by position, as segments of the dirty lists:
        re-slicing a 10,000-connection list at every slice cost 3-4% of the
        server's time under fan-out probes.)"""
        self._flush_handle = None
        segments = self._held
        self._held = []
        left = None
        if self.dirty:
            segments.append((self.dirty, 0))
            self.dirty = []
        now = self.loop.time()
        chunk = self.write_chunk
        counters = self.counters
        started = time.perf_counter()
        deadline = started + self.flush_slice
        for n, (dirty, start) in enumerate(segments):
            for i in range(start, len(dirty)):
                conn = dirty[i]
                if not i & 15 and i != start and time.perf_counter() > deadline:
                    left = [(dirty, i), *segments[n + 1:]]
                    if self._flush_handle is None:
                        self._flush_handle = self.loop.call_soon(self.flush)
                    counters.flush_yields += 1
                    break
                conn.dirty = False
                transport = conn.transport
                if transport is None or transport.is_closing():
                    continue
                extra = conn.extra
                if extra is not None and conn.state == OPEN:
                    self.channels.jobs(conn, now)
                if not conn.paused:
                    data = conn.data_to_send(chunk, now)
                    if data:
                        transport.write(data)
                        counters.writes += 1
                        counters.bytes_out += len(data)
                    if extra is not None and "holds" in extra:
                        self._after_write(conn)
                if conn.state == CLOSED:
                    if not conn.pending:
                        # (Not while frames it received before closing wait their
                        # turn: the backlog's end marks it dirty again.)
                        if not conn.has_backlog:
                            transport.close()
                    elif not conn.paused:
                        self.mark_dirty(conn)
                    continue
                resync = conn.take_resync()
                if resync:
                    self.channels.queue_resync(conn, resync)
                inbox = conn.inbox
                if inbox.__class__ is InboxState and inbox.blocked and \
                        conn.inbox_bytes < self.inbox_budget // 2:
                    inbox.blocked = False
                    inbox.progress = now
                    for lane in (_P0, _P1):
                        if inbox.cursor[lane] <= inbox.last[lane]:
                            self.delivery.pump(conn, lane)
                if conn.pending and not conn.paused:
                    self.mark_dirty(conn)
            if left is not None:
                self._held = left
                break
        if self._read_budget:
            self.read_budget = max(self._read_budget, time.perf_counter() - started)

    def write_now(self, conns) -> None:
        """Write at once what ``conns`` (a committed batch's senders and online
        recipients) have queued: SENDACKs and DELIVERs.

        (The write below repeats _flush's on purpose: _flush runs it for every
        dirty connection of a fan-out, and a method call there measured about
        7% of fan-out throughput.)"""
        now = self.loop.time()
        chunk = self.write_chunk
        counters = self.counters
        for conn in conns:
            transport = conn.transport
            if transport is None or conn.paused or not conn.dirty or transport.is_closing():
                continue
            data = conn.data_to_send(chunk, now)
            if data:
                transport.write(data)
                counters.writes += 1
                counters.bytes_out += len(data)

    def _after_write(self, conn: TerminalConnection) -> None:
        """A flush wrote to a connection that has reading holds: lift what
        the write resolved (its PONG went out, its control frames drained)."""
        holds = conn.holds
        if holds & HOLD_PONG and not conn.control_bytes and conn.state != CLOSED:
            self.loop.call_soon(conn.resume_input)
        if holds & HOLD_BUDGET:
            self.commands.check_budget(conn)
        if not conn.holds & STALL_HOLDS and conn.extra is not None:
            conn.extra.pop("stall_since", None)     # it reads again: a new stall starts afresh
