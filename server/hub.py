"""Local routing: the live sessions of this process and the channel streams.

Who receives a broadcast is derived from tokens, not stored per
subscription: a terminal's token implies its channels (its terminal, store,
store roles, tenant roles, region, tenant and member channels), so the hub
keeps a few indexes of live sessions (by terminal, store, region, tenant
role, member and tenant) and resolves an address to the lists to fan out
to.  Only explicit subscriptions (topics, segments, channels a backend
watches) are kept per stream.  This keeps an idle connection's routing
state to about five dictionary entries.

A channel carries two streams, P2 and P3 (PROTOCOL.md 12), each a
``Stream`` with a process-wide id, an epoch, offsets, a bounded history and,
for P2, a last-value cache (kept in offset order: an update moves its key to
the end, so the snapshot is the cache's order).  Everything here runs on the
event loop.

Streams exist because something was published to them (or the store kept
them).  A SUBSCRIBE to a channel nobody published to yet does not make one:
its subscribers wait on a *pending* stream (an id and an epoch, no history,
not listed), which the first publish turns into the stream.  A stream with
no subscriber and nothing retained (history or last values) is freed; if
it comes back it has a new epoch, so no terminal mistakes its new offsets
for old ones.
"""

from __future__ import annotations

import bisect
import collections
import time
from dataclasses import dataclass
from typing import Iterable

from ..core.codes import Flag, FrameType, Lane
from ..core.session import OPEN
from .address import Address, parse_address


@dataclass(slots=True)
class Entry:
    """One broadcast message in a stream's history."""

    offset: int
    kind: str
    key: str            # P2 conflation key ("" = none)
    version: int        # source version for P2 ("newest wins"); 0 = none
    payload: bytes
    created: float      # loop time
    deadline: float     # P3 expiry in loop time (0.0 = none)
    frame: bytes | None  # the live BROADCAST frame, shared by every subscriber
                         # (None for entries restored from the store)
    replay: bytes | None = None   # the same with RETRANSMIT, built on first replay


class Stream:
    """One lane of one channel: id, epoch, offsets, history, last values."""

    __slots__ = ("name", "lane", "id", "epoch", "offset", "history", "lvc", "explicit",
                 "_explicit_list", "snapshot", "__weakref__")

    def __init__(self, name: str, lane: int, stream_id: int, epoch: int) -> None:
        self.name = name
        self.lane = lane
        self.id = stream_id
        self.epoch = epoch
        self.offset = 0
        self.history: collections.deque[Entry] = collections.deque()
        self.lvc: dict[str, Entry] = {}
        self.explicit: dict = {}            # sessions subscribed explicitly
        self._explicit_list: list | None = None
        self.snapshot = None                # (offset, [last values]) for HISTORY, while current

    def explicit_list(self) -> list:
        lst = self._explicit_list
        if lst is None:
            lst = self._explicit_list = list(self.explicit)
        return lst

    def add_explicit(self, session) -> None:
        self.explicit[session] = None
        self._explicit_list = None

    def remove_explicit(self, session) -> None:
        if self.explicit.pop(session, 1) is None:
            self._explicit_list = None

    @property
    def first_offset(self) -> int:
        """Oldest offset still in history (offset + 1 when history is empty)."""
        return self.history[0].offset if self.history else self.offset + 1


class Hub:
    """Live sessions and streams of one server process."""

    def __init__(self, encoder, frame_cls, *, history_max: int = 1000,
                 history_age: float = 3600.0) -> None:
        self.encoder = encoder
        self._frame = frame_cls
        self.history_max = history_max
        self.history_age = history_age
        self.sessions: dict[str, object] = {}          # terminal address -> session
        # Live sessions that are open (after RESUME), indexed the few ways
        # addresses select them.  A session sits in its store's dict, and in
        # its region's and member's when it has them; tenants and cross-store
        # role groups are unions of stores, so they cost no entry per session.
        self._by_store: dict[tuple[str, str], dict] = {}
        self._by_region: dict[tuple[str, str], dict] = {}
        self._by_member: dict[tuple[str, str], dict] = {}
        self._stores_of: dict[str, dict[tuple[str, str], None]] = {}   # tenant -> store keys
        # Per tenant, the open sessions the offer policy can hold an offer back
        # from (customers: quiet hours; members: frequency caps).  A tenant
        # without any skips the policy's per-session loop.
        self._policy: dict[str, dict] = {}
        # Shorter history age of some kinds (retention of personal data, e.g.
        # member.notice): kind -> seconds; and per stream id holding such
        # entries, the loop time its oldest one expires (a stream is scanned
        # only then, never on every append).
        self.kind_ages: dict[str, float] = {}
        self._aged_due: dict[int, float] = {}
        self._streams: dict[tuple[str, int], Stream] = {}
        self._pending: dict[tuple[str, int], Stream] = {}    # subscribed, never published
        self._by_id: dict[int, Stream] = {}
        self._next_id = 1
        self._last_epoch = 0
        # Per tenant, its streams' (name, lane), sorted: the admin API pages them.
        self._names: dict[str, list[tuple[str, int]]] = {}

    # -- sessions -------------------------------------------------------------

    def attach(self, session, claims) -> None:
        """Make an open session reachable by group addresses."""
        t = claims.tenant
        key = (t, claims.store)
        group = self._by_store.get(key)
        if group is None:
            group = self._by_store[key] = {}
            self._stores_of.setdefault(t, {})[key] = None
        group[session] = None
        if claims.region:
            self._by_region.setdefault((t, claims.region), {})[session] = None
        if claims.member:
            self._by_member.setdefault((t, claims.member), {})[session] = None
        if claims.member or "customer" in claims.roles:
            self._policy.setdefault(t, {})[session] = None

    def has_policy_sessions(self, tenant: str) -> bool:
        """Whether an open session of ``tenant`` is a customer's or a member's."""
        return tenant in self._policy

    def detach(self, session, claims) -> None:
        """Forget a session (closed, lost or taken over)."""
        if self.sessions.get(session.address) is session:
            del self.sessions[session.address]
        t = claims.tenant
        key = (t, claims.store)
        group = self._by_store.get(key)
        if group is not None:
            group.pop(session, None)
            if not group:
                del self._by_store[key]
                stores = self._stores_of[t]
                del stores[key]
                if not stores:
                    del self._stores_of[t]
        for index, k in ((self._by_region, (t, claims.region)),
                         (self._by_member, (t, claims.member)),
                         (self._policy, t)):
            group = index.get(k)
            if group is not None:
                group.pop(session, None)
                if not group:
                    del index[k]

    def session(self, terminal_address: str):
        return self.sessions.get(terminal_address)

    def store_sessions(self, tenant: str, store: str) -> dict:
        return self._by_store.get((tenant, store), {})

    def tenant_groups(self, tenant: str) -> list[dict]:
        """The open sessions of a tenant, as one dict per store."""
        by_store = self._by_store
        return [by_store[key] for key in self._stores_of.get(tenant, ())]

    def groups(self, address: Address) -> list:
        """The session collections that together are the implied subscribers.

        A collection is a dict (sessions as keys) or a list; no session is in
        two of them.  Role groups filter the store (or, for ``role:<t>/*/r``,
        every store of the tenant): a store holds tens of terminals.
        """
        scope = address.scope
        t = address.tenant
        if scope == "tenant":
            return self.tenant_groups(t)
        if scope == "store":
            return [self._by_store.get((t, address.path[0]), {})]
        if scope == "region":
            return [self._by_region.get((t, address.path[0]), {})]
        if scope == "terminal":
            s = self.sessions.get(str(address))
            return [[s]] if s is not None and s.state == OPEN else []
        if scope == "member":
            return [self._by_member.get((t, address.path[0]), {})]
        if scope == "role":
            store, role = address.path
            stores = self.tenant_groups(t) if store == "*" else \
                [self._by_store.get((t, store), {})]
            return [[s for group in stores for s in group if role in s.claims.roles]]
        return []

    # -- streams ---------------------------------------------------------------

    def new_epoch(self) -> int:
        """An epoch for a stream made now: above every one made before (a
        freed stream that comes back is a new history, and terminals holding
        positions in the old one must resync)."""
        self._last_epoch = max(self._last_epoch + 1, int(time.time()) << 16)
        return self._last_epoch

    def stream(self, name: str, lane: int, create: bool = True) -> Stream | None:
        """The stream of a channel; with ``create``, made on first use (a
        pending stream subscribers wait on becomes it)."""
        key = (name, lane)
        s = self._streams.get(key)
        if s is None and create:
            s = self._pending.pop(key, None) or self._new_stream(name, lane)
            self._streams[key] = s
            tenant = _tenant_of(name)
            if tenant is not None:
                bisect.insort(self._names.setdefault(tenant, []), key)
        return s

    def _new_stream(self, name: str, lane: int) -> Stream:
        """A stream with a new id and a new epoch (listed by the caller)."""
        s = Stream(name, lane, self._next_id, self.new_epoch())
        self._next_id += 1
        self._by_id[s.id] = s
        return s

    def _unindex(self, key: tuple[str, int]) -> None:
        tenant = _tenant_of(key[0])
        names = self._names.get(tenant)
        if names is None:
            return
        i = bisect.bisect_left(names, key)
        if i < len(names) and names[i] == key:
            del names[i]
            if not names:
                del self._names[tenant]

    def subscribe(self, name: str, lane: int, session) -> Stream:
        """Add an explicit subscriber; the stream, or a pending one if nothing
        was published to the channel yet."""
        key = (name, lane)
        s = self._streams.get(key)
        if s is None:
            s = self._pending.get(key)
            if s is None:
                s = self._pending[key] = self._new_stream(name, lane)
        s.add_explicit(session)
        return s

    def unsubscribe(self, stream: Stream, session, now: float) -> None:
        """Remove an explicit subscriber; a stream left with nobody and
        nothing retained (at loop time ``now``) is freed."""
        stream.remove_explicit(session)
        if stream.explicit:
            return
        key = (stream.name, stream.lane)
        if self._pending.get(key) is stream:
            del self._pending[key]
            self._by_id.pop(stream.id, None)
        else:
            self.free_if_idle(stream, now)

    def free_if_idle(self, stream: Stream, now: float) -> bool:
        """Free a stream nobody subscribes to (explicitly or by their token)
        that retains nothing (after trimming its history at ``now``)."""
        if stream.explicit:
            return False
        self.trim(stream, now)
        if stream.history or stream.lvc:
            return False
        address = _address_of(stream.name)
        if address is not None and any(self.groups(address)):
            return False
        key = (stream.name, stream.lane)
        if self._streams.get(key) is not stream:
            return False
        del self._streams[key]
        self._by_id.pop(stream.id, None)
        self._aged_due.pop(stream.id, None)
        self._unindex(key)
        return True

    def drop(self, stream: Stream) -> None:
        """Forget a stream whatever it holds (a fleet worker's mirror of a
        channel none of its sessions needs any more)."""
        key = (stream.name, stream.lane)
        if self._streams.get(key) is stream:
            del self._streams[key]
            self._unindex(key)
        elif self._pending.get(key) is stream:
            del self._pending[key]
        self._by_id.pop(stream.id, None)
        self._aged_due.pop(stream.id, None)

    def stream_keys(self) -> list[tuple[str, int]]:
        """Every stream's (name, lane), a snapshot (for a sweep in slices)."""
        return list(self._streams)

    def sweep(self, keys, now: float) -> int:
        """Free the idle streams among ``keys``; returns how many went."""
        freed = 0
        for key in keys:
            s = self._streams.get(key)
            if s is not None and self.free_if_idle(s, now):
                freed += 1
        return freed

    def page(self, tenant: str, after: tuple[str, int] | None, limit: int) -> list[Stream]:
        """Up to ``limit`` streams of a tenant in (name, lane) order, after ``after``."""
        names = self._names.get(tenant, [])
        i = 0 if after is None else bisect.bisect_right(names, after)
        return [self._streams[key] for key in names[i:i + limit]]

    def tenant_stream_count(self, tenant: str) -> int:
        return len(self._names.get(tenant, ()))

    def streams_of(self, names: Iterable[str]) -> list[Stream]:
        """Existing streams (both lanes) of these channel names."""
        out = []
        for name in names:
            for lane in (Lane.P2, Lane.P3):
                s = self._streams.get((name, lane))
                if s is not None:
                    out.append(s)
        return out

    def announce_frame(self, stream: Stream) -> bytes:
        """SUBSCRIBED for a stream (the same bytes for every subscriber)."""
        return self.encoder.encode(self._frame(
            FrameType.SUBSCRIBED, stream.lane, channel=stream.id, epoch=stream.epoch,
            offset=stream.offset, to=stream.name))

    def restore(self, state, loop_now: float, unix_now: float) -> Stream:
        """Rebuild a stream from what the store kept (times converted to loop time)."""
        stream = self.stream(state.name, state.lane)
        stream.epoch = state.epoch
        self._last_epoch = max(self._last_epoch, state.epoch)
        stream.offset = state.offset

        def entry(e) -> Entry:
            created = loop_now - (unix_now - e.created)
            deadline = loop_now - (unix_now - e.expires) if e.expires else 0.0
            return Entry(e.offset, e.kind, e.key, e.version, e.payload, created, deadline, None)

        stream.history.extend(entry(e) for e in state.history)
        for e in stream.history:
            self._note_aged(stream, e)
        by_offset = {e.offset: e for e in stream.history}
        for e in sorted(state.lvc, key=lambda e: e.offset):     # (the cache's order)
            stream.lvc[e.key] = by_offset.get(e.offset) or entry(e)
        return stream

    def stream_count(self) -> int:
        return len(self._streams)

    def pending_count(self) -> int:
        """Channels subscribed to that nothing was published to yet."""
        return len(self._pending)

    def append(self, stream: Stream, kind: str, key: str, version: int, payload: bytes,
               now: float, deadline: float, placed: int = 0) -> Entry | None:
        """Add a message to a stream; None if a newer version of ``key`` exists.

        ``placed``: the offset a shared history gave it (which made the
        version check): the mirror takes it as is."""
        if placed:
            stream.offset = placed - 1
        elif stream.lane == Lane.P2 and key:
            newest = stream.lvc.get(key)
            if newest is not None and version and newest.version and version <= newest.version:
                return None
        stream.offset += 1
        frame = self.encoder.encode_broadcast(stream.lane, 0, stream.id, stream.offset,
                                              kind, payload)
        entry = Entry(stream.offset, kind, key, version, payload, now, deadline, frame)
        history = stream.history
        history.append(entry)
        if stream.lane == Lane.P2 and key:
            lvc = stream.lvc
            lvc.pop(key, None)              # to the end: the cache stays in offset order
            lvc[key] = entry
        if self.kind_ages:
            self._note_aged(stream, entry)
        self.trim(stream, now)
        return entry

    def set_kind_ages(self, ages: dict[str, float]) -> None:
        """History ages of particular kinds, shorter than ``history_age``."""
        self.kind_ages = dict(ages)

    def _note_aged(self, stream: Stream, entry: Entry) -> None:
        age = self.kind_ages.get(entry.kind)
        if age is not None:
            due = entry.created + age
            current = self._aged_due.get(stream.id)
            if current is None or due < current:
                self._aged_due[stream.id] = due

    def trim(self, stream: Stream, now: float) -> None:
        """Drop history beyond the count and age bounds (and the kinds' own ages)."""
        history = stream.history
        horizon = now - self.history_age
        while history and (len(history) > self.history_max or history[0].created < horizon):
            history.popleft()
        due = self._aged_due.get(stream.id) if self._aged_due else None
        if due is not None and now >= due:
            # The oldest entry of an aged kind expired: one pass, then the next due.
            ages = self.kind_ages
            kept = [e for e in history
                    if e.kind not in ages or e.created >= now - ages[e.kind]]
            if len(kept) != len(history):
                history.clear()
                history.extend(kept)
                if stream.lvc:
                    stream.lvc = {k: e for k, e in stream.lvc.items()
                                  if e.kind not in ages or e.created >= now - ages[e.kind]}
            dues = [e.created + ages[e.kind] for e in history if e.kind in ages]
            if dues:
                self._aged_due[stream.id] = min(dues)
            else:
                del self._aged_due[stream.id]

    def forget(self, stream: Stream) -> int:
        """Drop a stream's history and last values (personal data deletion);
        its offsets go on.  Returns how many entries went."""
        count = len(stream.history) + len(stream.lvc)
        stream.history.clear()
        stream.lvc.clear()
        stream.snapshot = None
        self._aged_due.pop(stream.id, None)
        return count

    def history(self, stream: Stream, now: float) -> list[Entry]:
        """What HISTORY reads, in offset order: a P2 stream's last values (the
        list is kept until the next append), a P3 stream's unexpired history."""
        self.trim(stream, now)
        if stream.lane == Lane.P2:
            snap = stream.snapshot
            if snap is None or snap[0] != stream.offset or len(snap[1]) != len(stream.lvc):
                snap = stream.snapshot = (stream.offset, list(stream.lvc.values()))
            return snap[1]
        return [e for e in stream.history if not e.deadline or e.deadline > now]

    def replay_frame(self, stream: Stream, entry: Entry) -> bytes:
        if entry.replay is None:
            entry.replay = self.encoder.encode_broadcast(
                stream.lane, Flag.RETRANSMIT, stream.id, entry.offset, entry.kind, entry.payload)
        return entry.replay

    def catch_up(self, stream: Stream, position: tuple[int, int], now: float):
        """What a terminal at ``position`` needs: ("live" | "replay" | "resync", entries).

        Inside the history window: the entries after the position (P2
        conflated to the newest per key, P3 without the expired).  Outside:
        a resync with the P2 last-value snapshot (P3: nothing).
        """
        epoch, offset = position
        self.trim(stream, now)
        if epoch == stream.epoch and offset == stream.offset:
            return "live", []
        in_window = (epoch == stream.epoch and offset <= stream.offset
                     and offset + 1 >= stream.first_offset)
        if not in_window:
            if stream.lane == Lane.P2:
                return "resync", self.history(stream, now)   # (shared, in offset order)
            return "resync", []
        entries = [e for e in stream.history if e.offset > offset]
        if stream.lane == Lane.P2:
            newest: dict[str, Entry] = {}
            for e in entries:
                if e.key:
                    newest[e.key] = e
            entries = [e for e in entries if not e.key or newest[e.key] is e]
        else:
            entries = [e for e in entries if not e.deadline or e.deadline > now]
        return "replay", entries

    def resync_frame(self, stream: Stream, count: int) -> bytes:
        return self.encoder.encode(self._frame(
            FrameType.RESYNC, channel=stream.id, epoch=stream.epoch, offset=stream.offset,
            count=count))


def _address_of(name: str) -> Address | None:
    try:
        return parse_address(name)
    except ValueError:          # (AddressError: a name the store kept from long ago)
        return None


def _tenant_of(name: str) -> str | None:
    address = _address_of(name)
    return address.tenant if address is not None else None


def parse_positions(payload: bytes) -> dict[tuple[str, int], tuple[int, int]]:
    """RESUME payload -> {(channel name, lane): (epoch, offset)}; ValueError if malformed."""
    import orjson

    if not payload:
        return {}
    doc = orjson.loads(payload)
    if not isinstance(doc, dict):
        raise ValueError("RESUME payload: must be a JSON object")
    channels = doc.get("channels", {})
    if not isinstance(channels, dict):
        raise ValueError("RESUME payload: channels must be an object")
    out = {}
    for name, lanes in channels.items():
        parse_address(name)
        if not isinstance(lanes, dict):
            raise ValueError(f"RESUME payload: channels.{name} must be an object")
        for lane_name, pos in lanes.items():
            if lane_name not in ("P2", "P3"):
                raise ValueError(f"RESUME payload: channels.{name}.{lane_name}: lane must be P2 or P3")
            if (not isinstance(pos, list) or len(pos) != 2
                    or not all(isinstance(x, int) and 0 <= x < 1 << 63 for x in pos)):
                raise ValueError(f"RESUME payload: channels.{name}.{lane_name} must be [epoch, offset]")
            out[(name, int(lane_name[1]))] = (pos[0], pos[1])
    return out
