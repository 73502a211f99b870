"""Key-value records in Redis (``RedisStore.records``).

Per namespace, under the namespace as hash tag (one namespace shares a
Cluster slot):

* ``<p>:{r:<ns>}:k`` — sorted set, every key at score 0, so ZRANGEBYLEX
  walks keys in byte order (UTF-8 byte order is code point order, Python's
  ``str`` order) and a page costs ``limit`` records, not the namespace;
* ``<p>:{r:<ns>}:v`` — hash, key -> value;
* ``<p>:{r:<ns>}:t`` — sorted set, key -> last written (unix s), for
  :meth:`RedisRecords.expire`.

Writes are one MULTI/EXEC (or one script) each, so a key is never in one
structure without the others.
"""

from __future__ import annotations

from .records import SCAN_PAGE

_SCAN = """
local keys
if ARGV[4] == "1" then
  keys = redis.call("ZREVRANGEBYLEX", KEYS[1], ARGV[2], ARGV[1], "LIMIT", 0, tonumber(ARGV[3]))
else
  keys = redis.call("ZRANGEBYLEX", KEYS[1], ARGV[1], ARGV[2], "LIMIT", 0, tonumber(ARGV[3]))
end
if #keys == 0 then return {} end
local out = {}
local values = redis.call("HMGET", KEYS[2], unpack(keys))
for i, key in ipairs(keys) do
  out[#out + 1] = key
  out[#out + 1] = values[i]
end
return out
"""

_DELETE_WHERE = """
local doomed
if ARGV[1] == "lex" then
  doomed = redis.call("ZRANGEBYLEX", KEYS[1], ARGV[2], ARGV[3])
else
  doomed = redis.call("ZRANGEBYSCORE", KEYS[3], "-inf", ARGV[2])
end
for i = 1, #doomed, 1000 do
  local chunk = {unpack(doomed, i, math.min(i + 999, #doomed))}
  redis.call("ZREM", KEYS[1], unpack(chunk))
  redis.call("HDEL", KEYS[2], unpack(chunk))
  redis.call("ZREM", KEYS[3], unpack(chunk))
end
return #doomed
"""


def _upper(prefix: bytes) -> bytes:
    """The exclusive lex bound just past every key that starts with ``prefix``
    (UTF-8 never holds the byte 0xFF)."""
    return b"(" + prefix + b"\xff"


_PUT_NEW = """
local found = redis.call("HGET", KEYS[2], ARGV[1])
if found then return found end
redis.call("ZADD", KEYS[1], 0, ARGV[1])
redis.call("HSET", KEYS[2], ARGV[1], ARGV[2])
redis.call("ZADD", KEYS[3], ARGV[3], ARGV[1])
return ARGV[2]
"""


# ARGV: key, "1" and the expected value (or "0": none expected), the value, now.
_REPLACE = """
local found = redis.call("HGET", KEYS[2], ARGV[1])
if ARGV[2] == "1" then
  if found ~= ARGV[3] then return found end
elseif found then
  return found
end
redis.call("ZADD", KEYS[1], 0, ARGV[1])
redis.call("HSET", KEYS[2], ARGV[1], ARGV[4])
redis.call("ZADD", KEYS[3], ARGV[5], ARGV[1])
return ARGV[4]
"""


class RedisRecords:
    """The :class:`~tillwire.server.records.Records` of a Redis store."""

    def __init__(self, client, *, prefix: str = "tw") -> None:
        self._redis = client
        self._prefix = prefix
        self._put_new = client.register_script(_PUT_NEW)
        self._replace = client.register_script(_REPLACE)
        self._scan = client.register_script(_SCAN)
        self._delete_where = client.register_script(_DELETE_WHERE)

    def _keys(self, ns: str) -> list[str]:
        base = f"{self._prefix}:{{r:{ns}}}"
        return [f"{base}:k", f"{base}:v", f"{base}:t"]

    async def put(self, ns: str, key: str, value: bytes, now: float) -> None:
        k, v, t = self._keys(ns)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zadd(k, {key: 0}).hset(v, key, bytes(value)).zadd(t, {key: now})
            await pipe.execute()

    async def put_new(self, ns: str, key: str, value: bytes, now: float) -> bytes:
        return await self._put_new(keys=self._keys(ns), args=[key, bytes(value), repr(now)])

    async def replace(self, ns: str, key: str, expected: bytes | None, value: bytes,
                      now: float) -> bytes | None:
        return await self._replace(keys=self._keys(ns), args=[
            key, "0" if expected is None else "1", b"" if expected is None else bytes(expected),
            bytes(value), repr(now)])

    async def get(self, ns: str, key: str) -> bytes | None:
        return await self._redis.hget(self._keys(ns)[1], key)

    async def scan(self, ns: str, prefix: str = "", after: str = "",
                   limit: int = SCAN_PAGE, *, reverse: bool = False,
                   before: str = "") -> list[tuple[str, bytes]]:
        if limit <= 0:
            return []
        p, a, b = prefix.encode(), after.encode(), before.encode()
        # Lower bound: above after (exclusive, "" included: the memory store
        # answers keys > after) and from the prefix on; upper: below before
        # and below every key past the prefix.
        low = b"(" + a if a >= p else b"[" + p
        uppers = []
        if p:
            uppers.append(_upper(p))
        if b:
            uppers.append(b"(" + b)
        high = min(uppers, key=lambda u: u[1:]) if uppers else b"+"
        flat = await self._scan(keys=self._keys(ns)[:2],
                                args=[low, high, limit, "1" if reverse else "0"])
        return [(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2)]

    async def delete(self, ns: str, key: str) -> bool:
        k, v, t = self._keys(ns)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(k, key).hdel(v, key).zrem(t, key)
            gone, _, _ = await pipe.execute()
        return bool(gone)

    async def delete_prefix(self, ns: str, prefix: str) -> int:
        p = prefix.encode()
        low, high = (b"[" + p, _upper(p)) if p else (b"-", b"+")
        return int(await self._delete_where(keys=self._keys(ns), args=["lex", low, high]))

    async def expire(self, ns: str, before: float) -> int:
        # Exclusive: records written *before* ``before`` go.
        return int(await self._delete_where(keys=self._keys(ns),
                                            args=["time", f"({before!r}", ""]))
