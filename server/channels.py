"""P2/P3 channels: streams, SUBSCRIBE, UNSUBSCRIBE, HISTORY, resync and fan-out.

A channel message is appended to its stream in the hub (offset, version
check, last-value cache, history), then fanned out with one encode to the
sessions the hub groups by address and to the stream's explicit
subscribers.  Catch-up after RESUME or SUBSCRIBE replays from the stream,
or sends RESYNC and the last-value snapshot, paced to the connection's
queue; HISTORY answers are paged and paced the same way (PROTOCOL.md
sections 9 and 10).

State owned here is per connection only (in ``conn.extra``: explicit
subscriptions, pending snapshots and answers, the request bucket); the
streams themselves are the hub's.
"""

from __future__ import annotations

import logging
import struct
import time

from ..core.codes import Code, Flag, FrameType, Lane
from ..core.session import CLOSED, OPEN, OVERFLOW, Frame, fanout
from .address import AddressError, check_subscribe, implied_channels, parse_address
from .connection import HOLD_ANSWERS, STOP_AFTER, TerminalConnection
from .limits import Bucket
from .offers import POLICY_KINDS
from .archive import StreamEntry

_LANE_MASK = int(Flag.LANE_MASK)
_P3 = int(Lane.P3)
SNAPSHOT_SLICE = 256         # snapshot entries pushed per flush while resyncing

log = logging.getLogger("tillwire.channels")

# A channel message between the workers of a fleet: epoch, offset, version,
# ttl (s), the kind's and key's lengths, then kind, key and payload.  The
# part after epoch and offset is the *tail* (a History that publishes in its
# append puts epoch and offset in front of it itself).
_PLACED = struct.Struct(">QQqdHH")
_TAIL = struct.Struct(">qdHH")


def placed_tail(kind: str, key: str, version: int, ttl: float, payload: bytes) -> bytes:
    k, c = kind.encode(), key.encode()
    return _TAIL.pack(version, ttl, len(k), len(c)) + k + c + payload


def pack_placed(epoch: int, offset: int, kind: str, key: str, version: int, ttl: float,
                payload: bytes) -> bytes:
    return struct.pack(">QQ", epoch, offset) + placed_tail(kind, key, version, ttl, payload)


def unpack_placed(data: bytes):
    """(epoch, offset, kind, key, version, ttl, payload) of :func:`pack_placed`."""
    epoch, offset, version, ttl, nk, nc = _PLACED.unpack_from(data)
    at = _PLACED.size
    kind = data[at:at + nk].decode()
    key = data[at + nk:at + nk + nc].decode()
    return epoch, offset, kind, key, version, ttl, data[at + nk + nc:]


class Channels:
    """The node's P2/P3 channels (one per node)."""

    def __init__(self, node) -> None:
        self.node = node
        self.cfg = node.cfg
        self.loop = node.loop
        self.hub = node.hub
        self.store = node.store
        self.encoder = node.encoder
        self.counters = node.counters
        self.control_budget = node.control_budget
        self.output = node.output
        self.mark_dirty = node.mark_dirty
        self.slow_consumer = node.slow_consumer
        self.offers = node.offers
        self.chat = node.chat
        self.interest = None         # interest.Interest in a fleet over Redis (node.py sets it)

    def _request_wait(self, conn: TerminalConnection) -> float:
        """0.0 when a SUBSCRIBE/UNSUBSCRIBE/HISTORY may go now, else seconds to wait."""
        rate = self.cfg.limits.request_rate
        if not rate:
            return 0.0
        extra = conn.extras()
        bucket = extra.get("requests")
        now = self.loop.time()
        if bucket is None:
            bucket = extra["requests"] = Bucket(rate, self.cfg.limits.request_burst, now)
        wait = bucket.take(now)
        if wait:
            self.counters.rate_waits += 1
        return wait


    def join(self, conn: TerminalConnection, stream, position, now: float) -> None:
        """Announce a stream to a connection and catch it up from ``position``."""
        conn.control(self.hub.announce_frame(stream))
        if position is None:
            return
        how, entries = self.hub.catch_up(stream, position, now)
        if how == "live":
            return
        if how == "resync":
            conn.push(stream.lane, self.hub.resync_frame(stream, len(entries)))
        elif stream.lane == Lane.P3 and entries:
            # (skipped, never bypassed; a fleet's offers go out once decided)
            entries = self.offers.filter_replay(
                conn, stream, entries, lambda entry: self._replay(conn, stream, entry))
        for entry in entries:
            if not self._replay(conn, stream, entry):
                break

    def _replay(self, conn: TerminalConnection, stream, entry) -> bool:
        """Push a catch-up entry to ``conn``; False when its queue is full."""
        if conn.push(stream.lane, self.hub.replay_frame(stream, entry), None, entry.deadline,
                     stream) == OVERFLOW:
            return False
        self.mark_dirty(conn)
        return True

    def _stream(self, name: str, lane: int, address, epoch: int = 0, offset: int = 0):
        """The stream of a channel, created (and announced to the implied
        subscribers of its name) on first use; a fleet's mirror is made with
        the shared history's ``epoch`` and ``offset``."""
        hub = self.hub
        stream = hub.stream(name, lane, create=False)
        if stream is None:
            stream = hub.stream(name, lane)
            if epoch:
                stream.epoch, stream.offset = epoch, offset
            frame = hub.announce_frame(stream)
            for group in hub.groups(address):
                for conn in group:
                    if conn.state == OPEN:
                        conn.control(frame)
                        self.mark_dirty(conn)
        return stream

    def on_subscribe(self, conn: TerminalConnection, frame):
        wait = self._request_wait(conn)
        if wait:
            return wait
        lane = frame.flags & _LANE_MASK
        limits = self.cfg.limits
        try:
            if lane < Lane.P2:
                raise AddressError(Code.BAD_REQUEST, "SUBSCRIBE: lane must be P2 or P3")
            address = parse_address(frame.to)
            check_subscribe(conn.claims, address)
            allowed = {"topic": limits.topic_roles, "segment": limits.segment_roles}.get(
                address.scope)
            if allowed is not None and not set(allowed).intersection(conn.claims.roles):
                raise AddressError(Code.FORBIDDEN,
                                   f"subscribe {address}: {address.scope} channels are for "
                                   f"roles {', '.join(allowed)} (limits.{address.scope}_roles)")
        except AddressError as exc:
            if exc.code == Code.FORBIDDEN:
                self.counters.acl_denials += 1
                if self.node.audit is not None:
                    self.node.commands.audit_conn("acl.deny", conn, None, op="subscribe",
                                                  to=frame.to, lane=f"P{lane}", reason=str(exc))
            conn.error(exc.code, frame.ref, str(exc))
            self.mark_dirty(conn)
            return None
        name = str(address)
        hub = self.hub
        now = self.loop.time()
        position = (frame.epoch, frame.offset) if frame.epoch or frame.offset else None
        if name in implied_channels(conn.claims):
            # The token subscribes it already: catch up, or (no message yet)
            # confirm with channel 0 until its first message announces its id.
            stream = hub.stream(name, lane, create=False)
            if stream is not None:
                self.join(conn, stream, position, now)
            else:
                conn.control(self.encoder.encode(Frame(FrameType.SUBSCRIBED, lane, channel=0,
                                                       to=name)))
            self.mark_dirty(conn)
            return None
        extra = conn.extras()
        subs = extra.setdefault("explicit", set())
        stream = self._subscribed(conn, name, lane)
        if stream is None:
            if len(subs) >= limits.max_subscriptions:
                self.counters.subscription_refusals += 1
                conn.error(Code.TOO_MANY_SUBSCRIPTIONS, frame.ref,
                           f"SUBSCRIBE {name}: this connection holds {len(subs)} subscriptions, "
                           f"the most it may (limits.max_subscriptions)")
                self.mark_dirty(conn)
                return None
            stream = hub.subscribe(name, lane, conn)       # (never makes a stream)
            subs.add(stream)
            if self.interest is not None:
                self.interest.add([name])
                if not self.interest.primed([name]):
                    self.node.spawn(self._join_primed(conn, name, lane, position))
                    return None
        self.join(conn, stream, position, now)
        self.mark_dirty(conn)
        return None

    async def _join_primed(self, conn: TerminalConnection, name: str, lane: int,
                           position) -> None:
        """Join an explicit subscription once this worker primed its channel."""
        await self.interest.wait([name])
        stream = self._subscribed(conn, name, lane)
        if conn.state == OPEN and stream is not None:
            # (the priming made the pending stream the channel's, or left it pending)
            self.join(conn, self.hub.stream(name, lane, create=False) or stream, position,
                      self.loop.time())
            self.mark_dirty(conn)

    @staticmethod
    def _subscribed(conn: TerminalConnection, name: str, lane: int):
        """The stream (or pending stream) ``conn`` explicitly subscribed to, or None."""
        subs = conn.extra.get("explicit") if conn.extra else None
        for stream in subs or ():
            if stream.lane == lane and stream.name == name:
                return stream
        return None

    def on_unsubscribe(self, conn: TerminalConnection, frame):
        wait = self._request_wait(conn)
        if wait:
            return wait
        lane = frame.flags & _LANE_MASK
        stream = self._subscribed(conn, frame.to, lane)
        if stream is None:
            conn.error(Code.UNKNOWN_CHANNEL, frame.ref,
                       f"UNSUBSCRIBE: not subscribed to P{lane} of {frame.to!r} "
                       "(channels implied by the token cannot be left)")
        else:
            conn.extra["explicit"].discard(stream)
            self.hub.unsubscribe(stream, conn, self.loop.time())
            if self.interest is not None:
                self.interest.remove([stream.name])
            conn.control(self.encoder.encode(Frame(
                FrameType.UNSUBSCRIBED, channel=stream.id, code=Code.OK)))
        self.mark_dirty(conn)
        return None

    def on_history(self, conn: TerminalConnection, frame):
        wait = self._request_wait(conn)
        if wait:
            return wait
        lane = frame.flags & _LANE_MASK
        ref = frame.ref
        try:
            address = parse_address(frame.to)
            if address.scope == "chat":
                self.chat.on_history(conn, frame, address)     # answers asynchronously
                return None
            if lane < Lane.P2:
                raise AddressError(Code.BAD_REQUEST,
                                   "HISTORY: lane must be P2 or P3 (P1: conversations, chat:)")
            check_subscribe(conn.claims, address)
        except AddressError as exc:
            conn.error(exc.code, ref, str(exc))
            self.mark_dirty(conn)
            return None
        # One request at a time: nothing more is read from the connection
        # until this answer is queued (answer() releases the hold).
        conn.hold(HOLD_ANSWERS)
        self.node.spawn(self._history(conn, ref, str(address), lane, frame.epoch,
                                      frame.offset, frame.count))
        return STOP_AFTER

    async def _history(self, conn: TerminalConnection, ref: int, name: str, lane: int,
                       epoch: int, offset: int, want: int) -> None:
        """Read a HISTORY request's page from the history and answer it: P2
        reads the last values, P3 the unexpired messages; offset 0 reads the
        last ``want`` (0: all), else those after ``offset`` in ``epoch``."""
        page_size = self.cfg.limits.history_page
        history = self.node.history
        try:
            if offset == 0:
                page = await history.tail(name, lane, want)
                items, more = page.items[:page_size], len(page.items) > page_size
            else:
                limit = min(want, page_size + 1) if want else page_size + 1
                page = await history.snapshot(name, lane, epoch, offset, limit)
                items = page.items[:page_size]
                more = len(page.items) > page_size
        except Exception as exc:
            conn.release(HOLD_ANSWERS)
            self.node.request_error(conn, ref, Code.STORE_UNAVAILABLE,
                                    f"HISTORY {name}: the history could not be read ({exc}); "
                                    "retry")
            return
        encode = self.encoder.encode

        def item(e) -> bytes:
            return encode(Frame(FrameType.HISTORY_ITEM, lane, e.payload, ref=ref,
                                offset=e.offset, kind=e.kind))

        self.answer(conn, ref, items, item, items[-1].offset if items else page.offset,
                    Code.PARTIAL if more else Code.OK)

    def answer(self, conn: TerminalConnection, ref: int, items: list, encode, next_offset: int,
               code: int) -> None:
        """Answer a HISTORY request: HISTORY_ITEM ``encode(item)`` for each of
        ``items``, then HISTORY_END.  Paced like a resync: items are queued
        only while the connection's control frames take less than half their
        budget, the rest at the next flushes as the terminal reads; until
        the answer is all queued the connection is not read (a terminal
        that asks and does not read holds one answer, not a pile of them)."""
        if conn.state == CLOSED:
            return
        extra = conn.extras()
        extra.setdefault("answers", []).append([ref, items, 0, encode, next_offset, code])
        self._answer_jobs(conn)
        if "answers" in extra:
            conn.hold(HOLD_ANSWERS)     # no further request is read until this one is out
            self.node.commands.watch_stall(conn)
        self.mark_dirty(conn)

    def _answer_jobs(self, conn: TerminalConnection) -> None:
        jobs = conn.extra.get("answers")
        room = self.control_budget // 2
        while jobs and conn.control_bytes < room:
            job = jobs[0]
            ref, items, i, encode, next_offset, code = job
            while i < len(items) and conn.control_bytes < room:
                conn.control(encode(items[i]))
                i += 1
            job[2] = i
            if i < len(items):
                break
            conn.control(self.encoder.encode(Frame(
                FrameType.HISTORY_END, ref=ref, offset=next_offset, count=len(items), code=code)))
            jobs.pop(0)
        if not jobs:
            conn.extra.pop("answers", None)
            conn.release(HOLD_ANSWERS)

    def queue_resync(self, conn: TerminalConnection, streams) -> None:
        extra = conn.extras()
        pending = extra.setdefault("resync", {})
        for stream in streams:
            pending[stream] = None

    def jobs(self, conn: TerminalConnection, now: float) -> None:
        """Paced work of a connection (resync snapshots, HISTORY answers)."""
        extra = conn.extra
        if "resync" in extra or "jobs" in extra:
            self._resync_jobs(conn, now)
        if "answers" in extra:
            self._answer_jobs(conn)

    def _resync_jobs(self, conn: TerminalConnection, now: float) -> None:
        """Send pending RESYNC snapshots, paced so they fit the connection's queue."""
        extra = conn.extra
        pending = extra.get("resync")
        jobs = extra.get("jobs")
        room = conn.max_queued_bytes // 2
        if pending and conn.queued_bytes < room // 2:
            jobs = extra.setdefault("jobs", [])
            for stream in list(pending):
                # (P2: the last values, one list shared by every connection until
                # the next append; never copied or sorted per connection)
                entries = self.hub.history(stream, now) if stream.lane == Lane.P2 else []
                conn.push(stream.lane, self.hub.resync_frame(stream, len(entries)))
                jobs.append([stream, entries, 0])
            pending.clear()
        while jobs and conn.queued_bytes < room:
            job = jobs[0]
            stream, entries, i = job
            for entry in entries[i:i + SNAPSHOT_SLICE]:
                # A newer value for the key may have replaced this one: send the newest.
                current = stream.lvc.get(entry.key, entry)
                conn.push(stream.lane, self.hub.replay_frame(stream, current), None, 0.0, stream)
            job[2] = i + SNAPSHOT_SLICE
            if job[2] >= len(entries):
                jobs.pop(0)
        if not jobs and not pending:
            extra.pop("jobs", None)
            extra.pop("resync", None)

    def broadcast(self, address, lane: int, kind: str, key: str, version: int,
                  payload: bytes, ttl: float, report: dict | None, then) -> None:
        """Publish a P2/P3 message to the stream of ``address``; ``then(offset)``
        is called once it has its place in the stream (offset 0: a newer
        version of ``key`` made it stale).  Callers are written for a
        stream that lives across a network: ``then`` may come later (the
        in-process hub calls it at once).

        P3 offers (``offers.POLICY_KINDS``) go only to the sessions that pass
        the offer policy; ``report`` (a dict) then gets {delivered, quiet, capped}.

        In a fleet the shared History places it and the broker carries it to
        every worker that needs the channel (their own fan-out fills no
        ``report``); ``then(None)`` says the history or the broker failed."""
        if self.interest is not None:
            self.node.spawn(self._publish(address, lane, kind, key, version, payload, ttl, then))
            return
        then(self._append(address, lane, kind, key, version, payload, ttl, report))

    async def _publish(self, address, lane: int, kind: str, key: str, version: int,
                       payload: bytes, ttl: float, then) -> None:
        name = str(address)
        if lane == _P3:
            ttl = ttl or self.cfg.lanes.p3_ttl
        else:
            ttl = 0.0
        history, broker = self.node.history, self.node.broker
        try:
            published = getattr(history, "append_published", None)
            topic = getattr(broker, "topic", None)
            ownership = self.node.ownership
            # A terminal's own channel goes to the worker holding the terminal
            # (its control channel), any other channel to its subscribers.
            owner = await ownership.owner_of(name) if address.scope == "terminal" else None
            if published is not None and topic is not None and (
                    owner is not None or address.scope != "terminal"):
                # Placed and published in one step: offset order on the wire,
                # from any number of publishers (that worker's own too).
                to, header = (topic(name), bytes((lane,))) if owner is None else (
                    broker.control_topic(owner),
                    ownership.channel_header(name, lane))
                placed = await published(name, lane, kind, key, version, payload, ttl, to,
                                         header, placed_tail(kind, key, version, ttl, payload))
            else:
                placed = await history.append(name, lane, kind, key, version, payload, ttl)
                if placed is not None:
                    data = pack_placed(placed.epoch, placed.offset, kind, key, version, ttl,
                                       payload)
                    if address.scope == "terminal":
                        await ownership.send_channel(owner, name, lane, data)
                    else:
                        await broker.publish(name, lane, data)
        except Exception as exc:
            # (placed but not carried: the history has it for catch-up)
            log.warning("history/broker: publishing to %s failed: %s", name, exc)
            then(None)
            return
        then(placed.offset if placed is not None else 0)

    def receive(self, name: str, lane: int, data: bytes) -> None:
        """A channel message from the fleet (placed by a History): fan it out
        here, through this worker's mirror of the stream."""
        interest = self.interest
        if interest.hold(name, lane, data):
            return                          # (placed once the channel is primed)
        if name not in interest.counts:
            return                          # (in flight while this worker left it)
        self.place(name, lane, data, repair=True)

    def place(self, name: str, lane: int, data: bytes, repair: bool = False) -> None:
        """Place a channel message from the fleet in this worker's mirror and
        fan it out.  With ``repair``, one that comes after a gap (messages
        placed before it never reached this worker: the broker reconnected,
        or a terminal's claim named another worker for a moment) waits while
        the missing ones are read from the History (``Interest.repair``)."""
        address = parse_address(name)
        epoch, offset, kind, key, version, ttl, payload = unpack_placed(data)
        if repair and offset > 1:
            stream = self.hub.stream(name, lane, create=False)
            if stream is None or (stream.epoch == epoch and offset > stream.offset + 1):
                self.interest.repair(name, (lane,), epoch, data)
                return
        now = self.loop.time()
        stream = self._stream(name, lane, address, epoch, offset - 1)
        if stream.epoch != epoch or offset > stream.offset + 1:
            # A new history (the stream was freed or lost in Redis), or a gap
            # the History could not fill: the mirror starts again here;
            # terminals at older positions resync.
            if stream.offset:
                stream.history.clear()
                stream.lvc = {}
            stream.epoch = epoch
        elif offset <= stream.offset:
            return                          # (the priming read had it)
        entry = self.hub.append(stream, kind, key, version, payload, now,
                                now + ttl if ttl else 0.0, placed=offset)
        self._fanout(address, stream, entry, lane, kind, payload, None)

    def top_up(self, name: str) -> None:
        """Read what the History holds of stream ``name`` past this worker's
        mirror and place it as if it had come live (a fleet only): for a
        terminal's own channel once its claim names this worker, as what
        publishers placed while they saw no owner, or the previous one, went
        to nobody.  A priming under way reads it anyway."""
        interest = self.interest
        if interest is not None and name in interest.counts:
            interest.repair(name, (int(Lane.P2), _P3))

    @staticmethod
    def pack(epoch: int, item, ttl: float) -> bytes:
        """A History item as the fleet carries a placed message."""
        return pack_placed(epoch, item.offset, item.kind, item.key, item.version, ttl,
                           item.payload)

    @staticmethod
    def placed_offset(data: bytes) -> int:
        """The offset of a fleet's channel message (see :func:`pack_placed`)."""
        return _PLACED.unpack_from(data)[1]

    def prime(self, name: str, lane: int, page, below: int = 0) -> None:
        """Set this worker's mirror of a stream from a History read (only
        what is before offset ``below``, when given: the rest comes live)."""
        if not page.epoch:
            return                          # (nothing was ever published to it)
        if below:
            items = [item for item in page.items if item.offset < below]
            page = type(page)(page.epoch, min(page.offset, below - 1), items, page.more)
        now = self.loop.time()
        stream = self._stream(name, lane, parse_address(name), page.epoch, page.offset)
        stream.epoch = page.epoch
        stream.history.clear()
        stream.lvc = {}
        deadline = now + self.cfg.lanes.p3_ttl if lane == _P3 else 0.0
        for item in page.items:
            self.hub.append(stream, item.kind, item.key, item.version, item.payload, now,
                            deadline, placed=item.offset)
        # (the offset and the entries are two reads: never below what was read)
        stream.offset = max(page.offset, page.items[-1].offset if page.items else 0)

    def _append(self, address, lane: int, kind: str, key: str, version: int,
                payload: bytes, ttl: float, report: dict | None) -> int:
        now = self.loop.time()
        name = str(address)
        stream = self._stream(name, lane, address)
        if lane == _P3:
            ttl = ttl or self.cfg.lanes.p3_ttl
        deadline = now + ttl if lane == _P3 else 0.0
        entry = self.hub.append(stream, kind, key, version, payload, now, deadline)
        if entry is None:
            return 0
        unix = time.time()
        self.store.archive.append(name, lane, stream.epoch, StreamEntry(
            entry.offset, kind, key, version, payload, unix,
            unix + (deadline - now) if deadline else 0.0))
        self._fanout(address, stream, entry, lane, kind, payload, report)
        return entry.offset

    def _fanout(self, address, stream, entry, lane: int, kind: str, payload: bytes,
                report: dict | None) -> None:
        """Write a stream's new entry to its subscribers here (encoded once)."""
        key = entry.key
        deadline = entry.deadline
        ckey = (stream.id, key) if key else None
        dirty = self.output.dirty
        overflow = []
        reached = 0
        policy = lane == _P3 and kind in POLICY_KINDS
        if policy or (lane == _P3 and self.offers.waiting(stream)):
            groups = self.hub.groups(address)
            if stream.explicit:
                groups = [*groups, stream.explicit_list()]
            if policy:
                reached, overflow = self.offers.fanout(address.tenant, groups, lane,
                                                       entry.frame, deadline, stream, dirty,
                                                       report)
            else:
                reached, overflow = self.offers.fanout_behind(groups, lane, entry.frame, ckey,
                                                              deadline, stream, dirty)
        else:
            for group in self.hub.groups(address):
                reached += len(group)
                overflow += fanout(group, lane, entry.frame, ckey, deadline, stream, dirty)
            if stream.explicit:
                explicit = stream.explicit_list()
                reached += len(explicit)
                overflow += fanout(explicit, lane, entry.frame, ckey, deadline, stream, dirty)
        if dirty:
            self.output.wake()
        counters = self.counters
        counters.broadcasts += 1
        counters.lane_frames_out[lane] += reached
        counters.lane_bytes_out[lane] += reached * len(payload)
        for conn in overflow:       # only P0/P1 overflow; kept for symmetry
            self.slow_consumer(conn)
