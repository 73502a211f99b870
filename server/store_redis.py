"""The Redis Store backend: P0/P1 inboxes every worker and node shares.

Every operation is one Lua script (``store_redis_scripts.py``), so one
batch of accepts, acks or deliveries is one round trip and atomic on the
Redis instance.  Writes go to Redis in the order they were asked for, one
round trip at a time (a pool's connections would otherwise let a later
batch overtake an earlier one, and a sender's messages could get their
seqs out of order); what queued behind a round trip in flight goes in the
next, as one transaction (MULTI/EXEC) of scripts, and accept batches queued
one after the other share one script (up to :data:`GROUP_MAX` messages): the
group commit of this backend (one AOF fsync for the round trip).
Reads go at once, concurrently.  Its parts sit beside it:
``records_redis.py``, ``terminals_redis.py``, ``archive_redis.py``.

Keys (``<p>`` the prefix; ``{<tenant>}`` the hash tag).  The tag is the
*tenant*, not the terminal: a group message writes the inboxes of all its
recipients and its own record in one atomic script, and every recipient of
a message is of the message's tenant (the node expands addresses within
one tenant), so one tenant's keys share a Cluster slot:

* ``<p>:{T}:s:m:<msg_id>`` — string, the message as the node made it: its
  header (a JSON array: tenant, sender, ref, lane, kind, to, created,
  receipt, [recipients], expires), a newline, its body.  Written once; a
  redrive rewrites it;
* ``<p>:{T}:s:x:<msg_id>`` — hash, what positions do not say about a
  recipient ``i`` (1-based): ``s<i>`` its state when it ended (expired,
  rejected) or was kept acked by a trim, with ``e<i>``/``a<i>``/``d<i>``
  its times and ``w<i>`` the reason ("redriven" too); the seqs, ``q``
  (every recipient's, for a group) or ``q<i>`` (one that ended or was
  redriven).  A message to one terminal that is pending or acked has none:
  its seq is where its entry is in the entries list;
* ``<p>:{T}:s:p:<terminal>`` — hash, the terminal's positions per lane
  (``0``/``1``): ``l`` last seq, ``a`` acked, ``d`` delivered, ``r``
  the highest seq whose message asked for receipts, ``z`` trimmed (the
  entries list starts after it), ``x`` how many entries above ``a`` ended; and
  ``w``, the time of its oldest ack not yet trimmed;
* ``<p>:{T}:s:e<lane>:<terminal>`` — list, the inbox's entries from seq
  ``z + 1`` on (seq ``s`` at index ``s - z - 1``), each
  ``<msg_id>:<i>:<tenant>:<flags>`` (flags ``r`` the message asked for
  receipts, ``1`` it has one recipient, ``x`` the entry ended);
* ``<p>:{T}:s:g:<terminal>`` — list, the range log: ``<lane><d|a><first>
  <last> <at>`` per delivered (new part) or acked range, whence the
  trace's times;
* ``<p>:{T}:s:exp`` — sorted set, terminals by a lower bound of their
  pending entries' expiry (expire reads only those past it);
  ``<p>:{T}:s:acked`` — terminals by their oldest ack not yet trimmed
  (trim's work list); ``<p>:{T}:s:ended`` — ``<msg_id> <i>`` of ended
  entries by their end; ``<p>:{T}:s:done`` — messages without recipients;
* ``<p>:{T}:s:dd:<bucket>`` — hash, ``sender\\nref`` -> ``<msg_id>
  <created>`` for messages created in that window-long bucket (dedup;
  per tenant: an admin token's ref is deduplicated within the tenant it
  sent to), and ``:ddb``, the buckets, which trim drops whole;
* ``<p>:{T}:s:dead`` — sorted set of dead letters (JSON) by a global
  sequence; ``<p>:{T}:s:n`` — counters for :meth:`RedisStore.stats`;

and the global ``<p>:epoch``, ``<p>:layout`` (this layout's version,
"2"; a store in another is refused at open), ``<p>:msgid`` (msg_id
counter), ``<p>:dlseq`` (dead-letter order) and ``<p>:tenants`` (tenants
with messages).

Under Redis Cluster (not supported yet) the scripts would split by slot:
accept and progress per tenant of the batch (one script per tenant,
all pipelined); expire, trim, stats, trace and dead_letters(None) once per
tenant, merged by the caller.  The global keys would move into each
tenant's slot: a per-slot msg_id counter with the slot in the id's high
bits, the epoch marker copied into every slot (a lost shard then renews the
epoch of its own tenants' terminals only), dead letters ordered by time.

Epoch: ``<p>:epoch`` is set with SET-if-absent by whichever worker opens
first, so every worker agrees.  Every script checks it (no extra round trip)
and, when it is gone (a flushed or lost instance), sets the candidate the
caller sent; the store then adopts the epoch it is told and calls
``on_new_epoch(old, new)`` (PROTOCOL.md section 11.4).  Inbox numbering
restarts with the data that went.  The instance must not evict keys
(``maxmemory-policy noeviction``): an evicted key is data lost without the
epoch telling.

Errors: a connection failure or timeout raises from the call (the node
answers STORE_UNAVAILABLE).  A script runs whole or not at all; when its
reply is lost after Redis ran it, the sender's retry with the same ref is
answered as a duplicate with the original msg_id.  The client must not
retry by itself (a retried accept without a ref would store the message
twice): a URL given here gets a client without retries.

Durability: what an ack means depends on the instance's AOF policy, read at
:meth:`RedisStore.open` (``docs/redis.md``, "What an ack means").
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from typing import Callable, Sequence

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import store_redis_scripts as scripts
from .archive_redis import RedisArchive
from .records_redis import RedisRecords
from .store import (
    ACKED, DELIVERED, EXPIRED, REJECTED, STORED, Accepted, Completion, DeadLetter, InboxEntry,
    NewMessage, ReceiptEvent, Recipient, Redriven, Trace,
)
from .terminals_redis import RedisTerminals

log = logging.getLogger("tillwire.store.redis")

TIMEOUT = 5.0
"""Seconds a call waits for Redis (connect or reply) before it raises."""

_LANES = {0: "0", 1: "1"}
"""A lane's text in the scripts' arguments (a Lane enum too: it hashes as its int)."""

ACK_MEANS = {
    "always": "an ack means the message is fsynced to Redis's AOF before the reply "
              "(survives a power loss)",
    "everysec": "an ack means the message is in Redis's memory and AOF, fsynced about once "
                "a second: a power loss or a kernel crash can lose the last second of acked "
                "messages",
    "no": "an ack means the message is in Redis's memory and AOF, fsynced when the OS "
          "chooses (about 30 s on Linux): a power loss can lose the last half minute of "
          "acked messages",
    "off": "an ack means the message is in Redis's memory only (appendonly no): a Redis "
           "restart loses acked messages unless an RDB snapshot caught them",
    "unknown": "CONFIG GET is refused, so what an ack means is unknown: run Redis with "
               "appendonly yes and appendfsync always for acks that survive a power loss",
}

GROUP_MAX = 4096
"""Messages one accept script takes at most when queued batches are joined."""

PIPELINE_MAX = 64
"""Scripts one round trip of the ordered writes carries at most."""

CONNECTIONS = 32
"""Connections a store's own client opens at most (more callers wait for one)."""


def connect(url: str, *, timeout: float = TIMEOUT,
            connections: int = CONNECTIONS) -> aioredis.Redis:
    """A client for the store: bounded waits, a bounded pool that makes
    callers wait rather than fail, and no retries of its own (a retried
    script whose reply was lost would apply twice)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=connections, timeout=timeout, socket_timeout=timeout,
        socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0), retry_on_error=[])
    client = aioredis.Redis.from_pool(pool)
    client.set_retry(Retry(NoBackoff(), 0))
    return client


class RedisStore:
    """Store backend in Redis, shared by every worker with the same ``prefix``.

    ``client`` is a ``redis.asyncio`` client that does not retry (see
    :func:`connect`) or a URL, for which the store makes and closes its
    own.  Besides the Store protocol: :meth:`stats` (with the AOF policy as
    ``aof``) and ``on_new_epoch``, a callable ``(old, new)`` called when the
    store finds its data lost and takes a new epoch.
    """

    def __init__(self, client, *, prefix: str = "tw", dedup_window: float = 86400.0,
                 on_new_epoch: Callable[[int, int], None] | None = None) -> None:
        self._owned = isinstance(client, str)
        self._redis = connect(client) if self._owned else client
        self._prefix = prefix
        self.dedup_window = dedup_window
        self.on_new_epoch = on_new_epoch
        self.epoch = 0
        self.aof = "unknown"           # always / everysec / no / off / unknown (read at open)
        self._open = False
        # Writes not yet answered, in the order asked: (script, arguments,
        # messages for an accept, future or Completion).  One task sends them.
        self._writes: deque = deque()
        self._writer: asyncio.Task | None = None
        self._scripts = {name: self._redis.register_script(getattr(scripts, name.upper()))
                         for name in ("accept", "inbox", "positions_many", "progress",
                                      "reject", "expire", "trace", "dead_letters", "trim",
                                      "stats", "epoch", "redrive")}
        self.records = RedisRecords(self._redis, prefix=prefix)
        self.terminals = RedisTerminals(self._redis, prefix=prefix)
        self.archive = RedisArchive(self._redis, prefix=prefix)

    # -- life ------------------------------------------------------------

    async def open(self) -> None:
        # Loaded up front, so the first call of each is one EVALSHA that runs
        # (not NOSCRIPT, then a load and a second send).
        await self._load_scripts()
        layout = _text(await self._run("epoch", scripts.LAYOUT))
        if layout != scripts.LAYOUT:
            raise RuntimeError(
                f"the Redis store under prefix {self._prefix!r} holds messages in key layout "
                f"{layout}, and this Tillwire reads layout {scripts.LAYOUT}: give this Tillwire "
                f"another prefix, or delete the old keys once every inbox is acked")
        self.aof = await self._durability()
        if self.aof != "always":
            log.warning("Redis store (appendfsync %s): %s", self.aof, ACK_MEANS[self.aof])
        self._open = True

    async def close(self) -> None:
        self._open = False
        while self._writer is not None:
            await asyncio.shield(self._writer)
        try:
            await self.archive.drain()
        finally:
            if self._owned:
                await self._redis.aclose()

    async def _load_scripts(self) -> None:
        """Load every script of the store, in one round trip and one
        transaction: another worker's round trip (a transaction too, see
        _send_writes) finds all of them or none, never some."""
        async with self._redis.pipeline(transaction=True) as pipe:
            for script in self._scripts.values():
                pipe.script_load(script.script)
            await pipe.execute()

    async def _durability(self) -> str:
        """The instance's AOF policy (``off`` without AOF, ``unknown`` when
        CONFIG is refused); warns about a policy that evicts keys."""
        try:
            got = await self._redis.config_get("appendonly", "appendfsync", "maxmemory-policy")
        except ResponseError:
            return "unknown"
        got = {_text(k): _text(v) for k, v in got.items()}
        evicting = got.get("maxmemory-policy", "noeviction")
        if evicting != "noeviction":
            log.warning("Redis store: maxmemory-policy is %s: Redis may evict inbox keys under "
                        "memory pressure and lose messages; use noeviction", evicting)
        if got.get("appendonly") != "yes":
            return "off"
        return got.get("appendfsync", "unknown")

    async def _run(self, name: str, *args):
        """Run one script; adopt the epoch it reports; return its answer."""
        candidate = random.randrange(1, 1 << 31)
        return self._answer(name, await self._scripts[name](
            args=[self._prefix, candidate, *args]))

    def _answer(self, name: str, reply):
        """A script's answer; the epoch it reports is adopted."""
        epoch, answer = reply
        epoch = int(epoch)
        if epoch != self.epoch:
            self._new_epoch(epoch)
        return answer

    def _new_epoch(self, epoch: int) -> None:
        old, self.epoch = self.epoch, epoch
        if not old:
            return                                   # (the first answer, at open)
        log.warning("Redis store: the store's data is gone (flushed or lost instance): "
                     "epoch %d -> %d, terminals start their inboxes afresh", old, epoch)
        if self.on_new_epoch is not None:
            try:
                self.on_new_epoch(old, epoch)
            except Exception:
                log.exception("on_new_epoch callback failed")

    # -- ordered writes ----------------------------------------------------

    def _write(self, name: str, args: list, done, count: int = 0) -> None:
        """Queue one write; ``done`` (a future or a Completion) gets its answer."""
        self._writes.append((name, args, count, done))
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._send_writes())

    async def _ordered(self, name: str, *args):
        # (Encoded here: a value Redis cannot be sent fails its own call, not
        # the round trip it would share with other writes.)
        encode = self._redis.get_encoder().encode
        args = [encode(arg) for arg in args]
        done = asyncio.get_running_loop().create_future()
        self._write(name, args, done)
        return await done

    def _next_write(self) -> tuple[str, list, list, list[int]]:
        """The next script to send from the queue: (name, arguments, its
        waiters, how many answers each takes), consecutive accept batches
        joined into one (up to GROUP_MAX messages); the arguments are the
        exception when they cannot be made."""
        writes = self._writes
        name, args, count, done = writes.popleft()
        group, counts = [done], [count]
        if (name == "progress" and writes and writes[0][0] == "progress"
                and args[2] == b"[]" and writes[0][1][1] == b"[]"
                and writes[0][1][0] == args[0]):
            # Deliveries followed by acks of the same moment (what the node's
            # batch sends): one script, each inbox's positions read once.
            _, more, _, other = writes.popleft()
            args = [args[0], args[1], more[2]]
            group.append(other)
            counts.append(0)
        if name == "accept":
            # (counts: each waiter's messages' recipients, to split the
            # script's flat answer)
            entries, bodies, counts = list(args[0]), list(args[1]), [args[2]]
            while writes and writes[0][0] == "accept" and count < GROUP_MAX:
                _, more, n, other = writes.popleft()
                entries += more[0]
                bodies += more[1]
                count += n
                group.append(other)
                counts.append(more[2])
            # (Two arguments for the whole batch, not a dozen per message:
            # redis-py packs each argument in Python.)
            try:
                args = [repr(float(self.dedup_window)), orjson.dumps(entries), b"".join(bodies)]
            except Exception as exc:       # (not JSON: its batches fail, not the writer)
                args = exc
        return name, args, group, counts

    async def _send_writes(self) -> None:
        """Send the queued writes, in order, as one transaction of scripts
        per round trip (up to PIPELINE_MAX scripts): Redis runs them one
        after the other at EXEC, with one AOF write and fsync for them all,
        where a round trip per script cost an fsync each (the accepts,
        deliveries and acks of a batch took three)."""
        writes = self._writes
        try:
            while writes:
                sent = []
                while writes and len(sent) < PIPELINE_MAX:
                    name, args, group, counts = self._next_write()
                    if isinstance(args, Exception):
                        self._settle(name, args, group, counts)
                    else:
                        sent.append((name, args, group, counts))
                if not sent:
                    continue
                candidate = random.randrange(1, 1 << 31)
                try:
                    # One transaction (MULTI/EXEC): its scripts run together,
                    # with the scripts Redis has at EXEC.  After Redis lost its
                    # scripts, a plain pipeline read in parts could meet another
                    # worker's reload half way: its first scripts refused
                    # (NOSCRIPT), the later ones run, and the first run again
                    # after them: a sender's messages stored out of order.
                    async with self._redis.pipeline(transaction=True) as pipe:
                        for name, args, _, _ in sent:
                            pipe.evalsha(self._scripts[name].sha, 0, self._prefix, candidate,
                                         *args)
                        replies = await pipe.execute(raise_on_error=False)
                except Exception as exc:
                    # Redis ran the transaction's scripts or none of them
                    # (each script whole; MULTI/EXEC rolls nothing back, so a
                    # script that failed at EXEC left the others run), and
                    # which is unknown when its reply was lost: every waiter
                    # learns its write failed (a retry of an accept meets the
                    # dedup window, acks and deliveries are idempotent).
                    # After a timeout Redis is not answering: the writes
                    # queued behind fail now too, rather than one timeout
                    # after another.
                    _fail([waiter for _, _, group, _ in sent for waiter in group], exc)
                    if isinstance(exc, RedisTimeoutError):
                        self._fail_queued(exc)
                    continue
                if any(isinstance(reply, NoScriptError) for reply in replies):
                    # Redis lost its scripts (restarted, or SCRIPT FLUSH): all
                    # are loaded again at once.  One script loaded alone would
                    # let a later round trip run it before an earlier write
                    # whose script Redis still lacks: out of order.
                    try:
                        await self._load_scripts()
                    except Exception:
                        pass                  # (the runs below load and fail their own)
                timed_out = None
                for (name, args, group, counts), reply in zip(sent, replies):
                    if isinstance(reply, NoScriptError):
                        # (The script did not run; it runs now, loaded again,
                        # unless one such run timed out: then it fails too.)
                        if timed_out is not None:
                            reply = timed_out
                        else:
                            try:
                                reply = await self._run(name, *args)
                            except Exception as exc:
                                reply = exc
                                if isinstance(exc, RedisTimeoutError):
                                    timed_out = exc
                    elif not isinstance(reply, Exception):
                        reply = self._answer(name, reply)
                    self._settle(name, reply, group, counts)
                if timed_out is not None:       # (the writes queued behind: as above)
                    self._fail_queued(timed_out)
        finally:
            self._writer = None

    def _fail_queued(self, exc: Exception) -> None:
        """Fail every write still queued (none of them was sent)."""
        waiters = [queued[3] for queued in self._writes]
        self._writes.clear()
        _fail(waiters, exc)

    @staticmethod
    def _settle(name: str, answer, group: list, counts: list) -> None:
        """Give each waiter of a script its part of ``answer`` (an accept's
        answers are per message, in the order of its batches), or the error."""
        if isinstance(answer, Exception):
            _fail(group, answer)
            return
        if name != "accept":
            for waiter in group:       # (progress: deliveries and acks joined)
                if not waiter.done():
                    waiter.set_result(answer)
            return
        # The flat answer, per message: msg_id, 1 (a duplicate), or msg_id,
        # 0, a seq per recipient.  counts: each waiter's recipient lists.
        k = 0
        for waiter, unique in zip(group, counts):
            part = []
            for rcpts in unique:
                if answer[k + 1]:
                    part.append(Accepted(answer[k], True))
                    k += 2
                elif len(rcpts) == 1:
                    part.append(Accepted(answer[k], False, {rcpts[0]: answer[k + 2]}))
                    k += 3
                else:
                    n = len(rcpts)
                    part.append(Accepted(answer[k], False, dict(zip(rcpts, answer[k + 2:k + 2 + n]))))
                    k += 2 + n
            if not waiter.done():
                waiter.set_result(part)

    # -- accept ----------------------------------------------------------

    @staticmethod
    def _accept_args(items) -> tuple[list, list[bytes], list[list[str]]]:
        """The accept script's arguments of ``items``: eight values per
        message in one flat list; the payloads apart (bodies need not be
        text), in parts; and each one's recipients."""
        entries: list = []
        payloads: list[bytes] = []
        unique = []
        dumps = orjson.dumps
        for msg, recipients in items:
            rcpts = list(recipients) if len(recipients) == 1 else list(dict.fromkeys(recipients))
            unique.append(rcpts)
            tenant, ref = msg.tenant, msg.ref
            lane = _LANES.get(msg.lane)
            if lane is None:
                raise ValueError(f"accept_many: lane must be P0 or P1, got {msg.lane!r}")
            # (orjson writes a float as the shortest text that reads back
            # exactly, as repr() does, in a fifth of repr's time: two per
            # message were a third of this loop)
            sref = str(int(ref))
            created = dumps(float(msg.created)).decode()
            expires = dumps(float(msg.expires)).decode()
            if created == "null" or expires == "null":       # (orjson's word for inf, nan)
                raise ValueError(f"accept_many: created and expires must be finite, got "
                                 f"{msg.created!r} and {msg.expires!r}")
            head = dumps((tenant, msg.sender, sref, lane, msg.kind, msg.to, created,
                          "1" if msg.receipt else "0", rcpts, expires))
            body = bytes(msg.body)
            payloads += (head, b"\n", body)
            # (flags: 1 receipts, 2 every recipient is of the message's tenant)
            flags = 1 if msg.receipt else 0
            prefix = f"terminal:{tenant}/"
            if len(rcpts) == 1:
                to = rcpts[0]
                if to.startswith(prefix) or _tenant_of(to) == tenant:
                    flags += 2
            elif all(r.startswith(prefix) or _tenant_of(r) == tenant for r in rcpts):
                flags += 2
            entries += (tenant, f"{msg.sender}\n{sref}" if ref else "", created, expires, lane,
                        flags, rcpts, len(head) + 1 + len(body))
        return entries, payloads, unique

    async def accept_many(self, items: Sequence[tuple[NewMessage, Sequence[str]]]
                          ) -> list[Accepted]:
        if not items:
            return []
        args = self._accept_args(items)
        done = asyncio.get_running_loop().create_future()
        self._write("accept", args, done, len(args[2]))
        return await done

    def accept_many_then(self, items, callback) -> None:
        if not self._open:
            raise RuntimeError("the Redis store is not open")
        args = self._accept_args(items)
        done = Completion(callback)
        if not args[2]:
            asyncio.get_running_loop().call_soon(done.set_result, [])
            return
        self._write("accept", args, done, len(args[2]))

    # (Every number goes to Redis as int(): redis-py encodes an int subclass
    # by repr(), so a Lane would arrive as "<Lane.P0: 0>".)

    # -- inboxes ---------------------------------------------------------

    async def inbox(self, terminal: str, lane: int, after: int, limit: int) -> list[InboxEntry]:
        rows = await self._run("inbox", terminal, int(lane), int(after), max(0, int(limit)))
        out = []
        for seq, msg_id, value, delivered in rows:
            head, body = _value(value)
            out.append(InboxEntry(int(seq), int(msg_id), head[4], body, bool(delivered),
                                  float(head[9]), float(head[6])))
        return out

    async def positions(self, terminal: str) -> tuple[int, int, int, int]:
        return (await self.positions_many([terminal]))[0]

    async def positions_many(self, terminals) -> list[tuple[int, int, int, int]]:
        found = await self._run("positions_many", *terminals) if terminals else []
        return [tuple(int(v) for v in row) for row in found]

    async def ack_many(self, acks, now: float) -> list[ReceiptEvent]:
        if not acks:
            return []
        flat = _json([v for terminal, lane, seq in acks for v in (terminal, int(lane), int(seq))])
        return _receipts((await self._ordered("progress", repr(float(now)), b"[]", flat))[1])

    async def delivered_many(self, ranges, now: float) -> list[ReceiptEvent]:
        if not ranges:
            return []
        flat = _json([v for terminal, lane, first, last in ranges
                      for v in (terminal, int(lane), int(first), int(last))])
        return _receipts((await self._ordered("progress", repr(float(now)), flat, b"[]"))[0])

    async def reject(self, terminal: str, lane: int, seq: int, reason: str,
                     now: float) -> DeadLetter | None:
        found = await self._ordered("reject", terminal, int(lane), int(seq), reason,
                                   repr(float(now)))
        return _dead_letter(found) if found else None

    async def expire(self, now: float) -> list[DeadLetter]:
        return [_dead_letter(d) for d in await self._ordered("expire", repr(float(now)))]

    async def trace(self, msg_id: int) -> Trace | None:
        found = await self._run("trace", int(msg_id))
        if not found:
            return None
        value, flat, per = found
        head, _ = _value(value)
        tenant, sender, ref, lane, kind, to, created, receipt, rcpts, expires = head
        x = {_text(flat[k]): _text(flat[k + 1]) for k in range(0, len(flat), 2)}
        created = float(created)
        recipients = []
        for r, (terminal, (acked, delivered, log, seq)) in enumerate(zip(rcpts, per), 1):
            ranges: dict[str, list[tuple[int, int, float]]] = {"d": [], "a": []}
            for rec in log:                  # ("<lane><d|a><first> <last> <at>")
                name, last, at = _text(rec).split(" ")
                ranges[name[1]].append((int(name[2:]), int(last), float(at)))
            state, ended = x.get(f"s{r}"), _time(x.get(f"e{r}"))
            rec = Recipient(terminal, seq, STORED, created, reason=x.get(f"w{r}", ""))
            if state in (EXPIRED, REJECTED):
                rec.state, rec.ended_at = state, ended
                rec.delivered_at = _time(x.get(f"d{r}")) or _range_time(ranges["d"], seq, ended)
            elif state == ACKED:                 # (kept by a trim: its times are its own)
                rec.state, rec.acked_at = ACKED, _time(x.get(f"a{r}"))
                rec.delivered_at = _time(x.get(f"d{r}"))
            elif seq <= int(acked):
                rec.state = ACKED
                rec.acked_at = _range_time(ranges["a"], seq)
                rec.delivered_at = _range_time(ranges["d"], seq)
            elif seq <= int(delivered):
                rec.state = DELIVERED
                rec.delivered_at = _range_time(ranges["d"], seq)
            recipients.append(rec)
        return Trace(int(msg_id), tenant, sender, int(ref), int(lane), kind, to, created,
                     float(expires), receipt == "1", recipients)

    async def dead_letters(self, tenant: str | None, limit: int) -> list[DeadLetter]:
        return [_dead_letter(d) for d in await self._run("dead_letters", tenant or "", int(limit))]

    async def redrive(self, terminal: str, msg_id: int | None, now: float,
                      ttls: tuple[float, float], limit: int) -> list[Redriven]:
        rows = await self._ordered("redrive", terminal,
                                   "" if msg_id is None else str(int(msg_id)),
                                   repr(float(now + ttls[0])), repr(float(now + ttls[1])),
                                   max(0, int(limit)))
        return [Redriven(int(msg_id), terminal, int(lane), int(dead_seq), int(seq), _text(kind),
                         bytes(body), float(created), float(expires))
                for msg_id, lane, dead_seq, seq, kind, body, created, expires in rows]

    async def trim(self, now: float, keep_acked: float) -> int:
        return int(await self._ordered("trim", repr(float(now)), repr(float(now - keep_acked)),
                                   repr(float(self.dedup_window))))

    async def stats(self) -> dict:
        """Sizes (messages, unacked entries, dead letters, registered
        terminals, message bytes) and ``aof``, the instance's AOF policy as
        read at open (always, everysec, no, off or unknown)."""
        messages, unacked, dead, size = await self._run("stats")
        return {"backend": "redis", "messages": int(messages), "unacked": int(unacked),
                "dead_letters": int(dead), "terminals": await self.terminals.count(),
                "bytes": int(size), "aof": self.aof, "epoch": self.epoch}


def _fail(waiters, exc: Exception) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(exc)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _value(raw: bytes) -> tuple[list, bytes]:
    """A message's value (``m:<id>``): its header fields (tenant, sender,
    ref, lane, kind, to, created, receipt, recipients, expires) and its
    body."""
    head, _, body = raw.partition(b"\n")
    return orjson.loads(head), bytes(body)


def _range_time(ranges: list[tuple[int, int, float]], seq: int,
                before: float | None = None) -> float | None:
    """The earliest time a logged range covered ``seq`` (before ``before``,
    the time an entry went dead: later deliveries of it do not count)."""
    times = [at for first, last, at in ranges
             if first <= seq <= last and (before is None or at < before)]
    return min(times) if times else None


def _json(values: list) -> bytes:
    """``values`` as a JSON argument; a value that cannot be sent (a string
    that is not UTF-8) fails its own call with ValueError."""
    try:
        return orjson.dumps(values)
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"cannot send to Redis: {exc}") from None


def _tenant_of(address: str) -> str:
    """The tenant in an address (``terminal:<tenant>/<name>``), as the
    scripts read it."""
    return address.partition(":")[2].partition("/")[0]


def _time(value) -> float | None:
    return float(value) if value is not None else None


def _receipts(rows) -> list[ReceiptEvent]:
    return [ReceiptEvent(int(msg_id), _text(terminal), _text(sender), int(ref))
            for msg_id, terminal, sender, ref in rows]


def _dead_letter(raw) -> DeadLetter:
    (msg_id, terminal, lane, seq, kind, reason, at, sender, ref,
     receipt) = orjson.loads(raw)
    return DeadLetter(int(msg_id), terminal, int(lane), int(seq), kind, reason, float(at),
                      sender, int(ref), receipt == "1")
