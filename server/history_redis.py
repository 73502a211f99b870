"""The Redis History backend: channel streams every worker shares.

Per stream (a channel's P2 or P3), under the channel's tenant as hash tag
(one tenant's streams share a Cluster slot):

* ``<p>:{<tenant>}:hist:<lane>:<channel>:m`` — hash: ``epoch``, ``offset``;
* ``...:s`` — a Redis Stream, one entry per message (entry id ``<offset>-1``;
  fields kind, key, version, payload, created, deadline), capped at
  ``history_max`` by XADD's MAXLEN and at ``history_age`` by the append
  script (the oldest entries first);
* ``...:v`` — P2's last values: a hash, key -> ``offset\\nkind\\nversion\\n
  created\\n`` then the payload.

An append is one Lua script: the version check against the last value,
the next offset, XADD and the last value, atomically — two workers
publishing the same SKU can never both win.  Reads take what the stream and
the hash hold and leave out what expired (P3 past its deadline, anything
past ``history_age``).  :meth:`forget` deletes the stream and its last
values and keeps the offsets going on.  Times are the callers' clock.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from ..core.codes import Lane
from .address import tenant_of
from .history import HistoryItem, Page, Placed

_P2 = int(Lane.P2)

_APPEND = """
local meta, stream, lvc = KEYS[1], KEYS[2], KEYS[3]
local lane, kind, key, version = tonumber(ARGV[1]), ARGV[2], ARGV[3], tonumber(ARGV[4])
local payload, now, deadline = ARGV[5], ARGV[6], ARGV[7]
local maxn, horizon = tonumber(ARGV[8]), tonumber(ARGV[10])
local epoch = redis.call("HGET", meta, "epoch")
if not epoch then
  epoch = ARGV[9]
  redis.call("HSET", meta, "epoch", epoch)
end
if lane == 2 and key ~= "" and version > 0 then
  local current = redis.call("HGET", lvc, key)
  if current then
    local v = tonumber(string.match(current, "^[^\\n]*\\n[^\\n]*\\n([^\\n]*)\\n"))
    if v and v > 0 and version <= v then return {epoch, 0} end
  end
end
local offset = redis.call("HINCRBY", meta, "offset", 1)
redis.call("XADD", stream, "MAXLEN", maxn, offset .. "-1", "k", kind, "y", key,
           "v", version, "p", payload, "c", now, "d", deadline)
if lane == 2 and key ~= "" then
  redis.call("HSET", lvc, key, offset .. "\\n" .. kind .. "\\n" .. version .. "\\n" .. now ..
             "\\n" .. payload)
end
for _, e in ipairs(redis.call("XRANGE", stream, "-", "+", "COUNT", 64)) do
  local fields = e[2]
  local created
  for i = 1, #fields, 2 do
    if fields[i] == "c" then created = tonumber(fields[i + 1]) end
  end
  if created >= horizon then break end
  redis.call("XDEL", stream, e[1])
end
if ARGV[11] then
  -- (published in the same atomic step: subscribers get a channel's
  -- messages in offset order, whichever workers placed them)
  redis.call("PUBLISH", ARGV[11], ARGV[12] .. struct.pack(">I8I8", tonumber(epoch), offset)
             .. ARGV[13])
end
return {epoch, offset}
"""


class RedisHistory:
    """Channel streams in Redis, shared by every worker with the same ``prefix``."""

    def __init__(self, client, *, prefix: str = "tw", history_max: int = 1000,
                 history_age: float = 3600.0, clock: Callable[[], float] = time.time) -> None:
        self._redis = client
        self._prefix = prefix
        self._max = history_max
        self._age = history_age
        self._clock = clock
        self._append = client.register_script(_APPEND)

    def _keys(self, channel: str, lane: int) -> list[str]:
        base = f"{self._prefix}:{{{tenant_of(channel)}}}:hist:{lane}:{channel}"
        return [f"{base}:m", f"{base}:s", f"{base}:v"]

    async def append(self, channel: str, lane: int, kind: str, key: str, version: int,
                     payload: bytes, ttl: float = 0.0) -> Placed | None:
        return await self._place(channel, lane, kind, key, version, payload, ttl)

    async def append_published(self, channel: str, lane: int, kind: str, key: str,
                               version: int, payload: bytes, ttl: float, topic: bytes,
                               header: bytes, tail: bytes) -> Placed | None:
        """:meth:`append`, and when placed, PUBLISH ``header`` + epoch +
        offset (8 bytes each, big-endian) + ``tail`` on the pub/sub channel
        ``topic`` in the same script: the fleet's channel messages reach every
        worker in offset order (two PUBLISHes after two appends may cross)."""
        return await self._place(channel, lane, kind, key, version, payload, ttl,
                                 topic, header, tail)

    async def _place(self, channel: str, lane: int, kind: str, key: str, version: int,
                     payload: bytes, ttl: float, *publish) -> Placed | None:
        now = self._clock()
        epoch = (int(now) << 16) | random.getrandbits(16)     # (used if the stream is new)
        got_epoch, offset = await self._append(
            keys=self._keys(channel, lane),
            # (int(): redis-py sends an int subclass, e.g. a Lane, by its repr)
            args=[int(lane), kind, key, int(version), payload, repr(now),
                  repr(now + ttl if ttl else 0.0), self._max, epoch, repr(now - self._age),
                  *publish])
        return Placed(int(got_epoch), offset) if offset else None

    async def _meta(self, channel: str, lane: int) -> tuple[int, int]:
        epoch, offset = await self._redis.hmget(self._keys(channel, lane)[0], "epoch", "offset")
        return (int(epoch), int(offset or 0)) if epoch is not None else (0, 0)

    async def _entries(self, channel: str, lane: int, after: int) -> list[HistoryItem]:
        """The stream's messages after ``after`` that are still to be read."""
        now = self._clock()
        horizon = now - self._age
        raw = await self._redis.xrange(self._keys(channel, lane)[1], f"{after + 1}-0", "+")
        items = []
        for entry_id, f in raw:
            deadline = float(f[b"d"])
            if float(f[b"c"]) < horizon or (deadline and deadline <= now):
                continue
            items.append(HistoryItem(int(entry_id.split(b"-")[0]), f[b"k"].decode(),
                                     f[b"y"].decode(), int(f[b"v"]), f[b"p"]))
        return items

    async def _last_values(self, channel: str) -> list[HistoryItem]:
        raw = await self._redis.hgetall(self._keys(channel, _P2)[2])
        items = []
        for key, value in raw.items():
            offset, kind, version, _, payload = value.split(b"\n", 4)
            items.append(HistoryItem(int(offset), kind.decode(), key.decode(), int(version),
                                     payload))
        items.sort(key=lambda item: item.offset)
        return items

    @staticmethod
    def _page(epoch: int, offset: int, items: list, after: int, limit: int) -> Page:
        items = [item for item in items if item.offset > after] if after else items
        if limit and len(items) > limit:
            return Page(epoch, offset, items[:limit], True)
        return Page(epoch, offset, items)

    async def since(self, channel: str, lane: int, epoch: int, offset: int,
                    limit: int = 0) -> Page:
        current, last = await self._meta(channel, lane)
        if not current or epoch not in (0, current):
            return Page(current, last, [])
        return self._page(current, last, await self._entries(channel, lane, offset), 0, limit)

    async def snapshot(self, channel: str, lane: int, epoch: int = 0, after: int = 0,
                       limit: int = 0) -> Page:
        if lane != _P2:
            return await self.since(channel, lane, epoch, after, limit)
        current, last = await self._meta(channel, lane)
        if not current or epoch not in (0, current):
            return Page(current, last, [])
        return self._page(current, last, await self._last_values(channel), after, limit)

    async def tail(self, channel: str, lane: int, count: int = 0) -> Page:
        page = await self.snapshot(channel, lane)
        if count and len(page.items) > count:
            return Page(page.epoch, page.offset, page.items[-count:])
        return page

    async def trim(self, channel: str, lane: int) -> int:
        """Drop what is past ``history_age`` (the count bound is XADD's)."""
        stream = self._keys(channel, lane)[1]
        horizon = self._clock() - self._age
        gone = [entry_id for entry_id, f in await self._redis.xrange(stream, "-", "+")
                if float(f[b"c"]) < horizon]
        if gone:
            await self._redis.xdel(stream, *gone)
        return len(gone)

    async def forget(self, channel: str) -> int:
        gone = 0
        for lane in (_P2, int(Lane.P3)):
            _, stream, lvc = self._keys(channel, lane)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xlen(stream).hlen(lvc).delete(stream, lvc)
                entries, values, _ = await pipe.execute()
            gone += entries + values
        return gone
