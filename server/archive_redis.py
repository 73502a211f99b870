"""Channel history kept in Redis (``RedisStore.archive``).

Per stream (a channel's P2 or P3), under the channel's tenant as hash tag:

* ``<p>:{T}:ar:<lane>:<name>:m`` — hash: ``epoch``, ``offset``;
* ``...:h`` — sorted set, the history entries by offset (member: the
  encoded entry), and ``...:hc``, offset -> created, for the age bound;
* ``...:v`` — P2's last values, key -> encoded entry, and ``...:vm``,
  key -> ``version offset`` for :func:`~tillwire.server.archive.newer`;

and ``<p>:ar:order``, the streams by first append (``<p>:ar:seq`` numbers
them), which :meth:`RedisArchive.load` walks.  Under Cluster the order
would be one sorted set per tenant slot, merged at load.

An entry is encoded ``[offset, kind, key, version, created, expires]``
(JSON) then a newline and the payload.  :meth:`append` is a plain call on
the loop that queues the entry; a task writes the queue with one script
per entry, all in one pipeline (one round trip per loop iteration's
appends).  If Redis fails, that batch of channel history is lost and
logged: channels are not P0/P1, terminals resync.  :meth:`load`,
:meth:`forget` and :meth:`expire_kind` write the queue first.
"""

from __future__ import annotations

import asyncio
import logging

import orjson

from .address import tenant_of
from .archive import StreamEntry, StreamState

log = logging.getLogger("tillwire.store.redis")

_P2 = 2

# ARGV: order key, seq key, order member, epoch, offset, key, version,
# blob, history max, horizon (created - history_age), lane, created.
_APPEND = """
local m, h, hc, v, vm = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local epoch, offset, key, version = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local blob, maxn, horizon = ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10])
local current = redis.call("HGET", m, "epoch")
if not current then
  redis.call("HSET", m, "epoch", epoch, "offset", 0)
  redis.call("ZADD", ARGV[1], "NX", redis.call("INCR", ARGV[2]), ARGV[3])
elseif current ~= epoch then
  -- A new epoch: the old history and last values mean nothing any more.
  redis.call("DEL", h, hc, v, vm)
  redis.call("HSET", m, "epoch", epoch, "offset", 0)
end
local off = tonumber(offset)
local top = tonumber(redis.call("HGET", m, "offset"))
if off > top then
  redis.call("HSET", m, "offset", offset)
  top = off
end
if ARGV[11] == "2" and key ~= "" then
  local kept = redis.call("HGET", vm, key)
  local replace = true
  if kept then
    local _, _, kv, ko = string.find(kept, "^(%S+) (%S+)$")
    kv, ko = tonumber(kv), tonumber(ko)
    if version ~= 0 and kv ~= 0 then
      replace = version > kv or (version == kv and off > ko)
    else
      replace = off > ko
    end
  end
  if replace then
    redis.call("HSET", v, key, blob)
    redis.call("HSET", vm, key, ARGV[7] .. " " .. offset)
  end
end
if maxn <= 0 then return 0 end
redis.call("ZREMRANGEBYSCORE", h, off, off)
redis.call("ZADD", h, off, blob)
redis.call("HSET", hc, offset, ARGV[12])
-- Offsets grow with appends, so the entries to drop are at the front.
local lowest = top - maxn
while true do
  local first = redis.call("ZRANGE", h, 0, 0, "WITHSCORES")
  if #first == 0 then break end
  local o = first[2]
  if tonumber(o) > lowest and tonumber(redis.call("HGET", hc, o)) >= horizon then break end
  redis.call("ZREMRANGEBYSCORE", h, o, o)
  redis.call("HDEL", hc, o)
end
return 1
"""


def _encode(entry: StreamEntry) -> bytes:
    head = orjson.dumps([entry.offset, entry.kind, entry.key, entry.version, entry.created,
                         entry.expires])
    return head + b"\n" + bytes(entry.payload)


def _decode(blob: bytes) -> StreamEntry:
    head, _, payload = blob.partition(b"\n")
    offset, kind, key, version, created, expires = orjson.loads(head)
    return StreamEntry(offset, kind, key, version, payload, float(created), float(expires))


class RedisArchive:
    """The :class:`~tillwire.server.archive.ChannelArchive` of a Redis store."""

    def __init__(self, client, *, prefix: str = "tw") -> None:
        self._redis = client
        self._prefix = prefix
        self._order = f"{prefix}:ar:order"
        self._seq = f"{prefix}:ar:seq"
        self._append = client.register_script(_APPEND)
        self.history_max = 1000
        self.history_age = 3600.0
        self._queue: list[list] = []          # script arguments not written yet
        self._task: asyncio.Task | None = None

    def _keys(self, name: str, lane: int) -> list[str]:
        base = f"{self._prefix}:{{{tenant_of(name)}}}:ar:{int(lane)}:{name}"
        return [f"{base}:m", f"{base}:h", f"{base}:hc", f"{base}:v", f"{base}:vm"]

    def configure(self, history_max: int, history_age: float) -> None:
        self.history_max = max(0, int(history_max))
        self.history_age = float(history_age)

    def append(self, name: str, lane: int, epoch: int, entry: StreamEntry) -> None:
        lane = int(lane)          # (redis-py would send an IntEnum as its repr())
        self._queue.append([
            self._keys(name, lane),
            [self._order, self._seq, f"{lane}\n{name}", int(epoch), int(entry.offset),
             entry.key, int(entry.version), _encode(entry), self.history_max,
             repr(float(entry.created) - self.history_age), lane, repr(float(entry.created))]])
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        """Write the queue, one pipeline per batch, until it is empty."""
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for keys, args in batch:
                            await self._append(keys=keys, args=args, client=pipe)
                        await pipe.execute()
                except Exception:
                    log.exception("Redis archive: %d channel history entries not kept",
                                  len(batch))
        finally:
            self._task = None

    async def drain(self) -> None:
        """Return once every entry appended so far is written (or given up)."""
        while self._task is not None:
            await asyncio.shield(self._task)

    async def _streams(self) -> list[tuple[str, int]]:
        out = []
        for member in await self._redis.zrange(self._order, 0, -1):
            lane, _, name = member.decode().partition("\n")
            out.append((name, int(lane)))
        return out

    async def load(self, history_max: int, history_age: float,
                   now: float) -> list[StreamState]:
        await self.drain()
        streams = await self._streams()
        if not streams:
            return []
        async with self._redis.pipeline(transaction=True) as pipe:
            for name, lane in streams:
                m, h, _, v, _ = self._keys(name, lane)
                pipe.hmget(m, "epoch", "offset").zrange(h, 0, -1).hvals(v)
            raw = await pipe.execute()
        horizon = now - history_age
        out = []
        for k, (name, lane) in enumerate(streams):
            (epoch, offset), history, values = raw[3 * k:3 * k + 3]
            if epoch is None:
                continue
            offset = int(offset)
            entries = []
            if history_max > 0:
                lowest = offset - history_max
                entries = [e for e in map(_decode, history)
                           if e.offset > lowest and e.created >= horizon
                           and (not e.expires or e.expires > now)]
            lvc = []
            if lane == _P2:
                lvc = sorted((e for e in map(_decode, values) if not e.expires or e.expires > now),
                             key=lambda e: e.offset)
            out.append(StreamState(name, lane, int(epoch), offset, entries, lvc))
        return out

    async def forget(self, name: str) -> int:
        await self.drain()
        async with self._redis.pipeline(transaction=True) as pipe:
            for lane in (2, 3):
                m, h, hc, v, vm = self._keys(name, lane)
                pipe.zcard(h).hlen(v).delete(m, h, hc, v, vm).zrem(self._order, f"{lane}\n{name}")
            got = await pipe.execute()
        return got[0] + got[1] + got[4] + got[5]

    async def expire_kind(self, kind: str, before: float) -> int:
        await self.drain()
        streams = await self._streams()
        gone = 0
        for name, lane in streams:
            _, h, hc, _, _ = self._keys(name, lane)
            doomed = [(blob, e.offset) for blob, e in
                      ((blob, _decode(blob)) for blob in await self._redis.zrange(h, 0, -1))
                      if e.kind == kind and e.created < before]
            if doomed:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.zrem(h, *(blob for blob, _ in doomed))
                    pipe.hdel(hc, *(str(offset) for _, offset in doomed))
                    removed, _ = await pipe.execute()
                gone += removed
        return gone
