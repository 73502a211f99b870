"""The Redis Caps backend: offer frequency caps in Redis, shared by a fleet.

Per member (the tenant is the hash tag: one tenant's keys share a Cluster
slot): ``<p>:{<tenant>}:cap:t:<member>``, a sorted set of the times offers
were counted (members ``<time>:<offer>``, scored by time), and
``<p>:{<tenant>}:cap:o:<member>``, a sorted set of the offers counted,
scored by when.  One Lua call per offer and tenant trims both to the
window, passes the members that had the offer, caps those at their count
and counts the rest; keys expire a window after their last count.
"""

from __future__ import annotations

from typing import Iterable

_TAKE = """
local now, horizon, count, offer = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local ttl = math.ceil(tonumber(ARGV[5]))
local out = {}
for i = 1, #KEYS, 2 do
  local t, o = KEYS[i], KEYS[i + 1]
  redis.call("ZREMRANGEBYSCORE", t, "-inf", horizon)
  redis.call("ZREMRANGEBYSCORE", o, "-inf", horizon)
  if redis.call("ZSCORE", o, offer) then
    out[#out + 1] = 0
  elseif redis.call("ZCARD", t) >= count then
    out[#out + 1] = 1
  else
    redis.call("ZADD", t, now, ARGV[1] .. ":" .. offer)
    redis.call("ZADD", o, now, offer)
    redis.call("EXPIRE", t, ttl)
    redis.call("EXPIRE", o, ttl)
    out[#out + 1] = 0
  end
end
return out
"""


class RedisCaps:
    """Offer caps in Redis, shared by every worker with the same ``prefix``."""

    def __init__(self, client, *, prefix: str = "tw") -> None:
        self._redis = client
        self._prefix = prefix
        self._take = client.register_script(_TAKE)

    def _keys(self, tenant: str) -> list[str]:
        base = f"{self._prefix}:{{{tenant}}}:cap"
        return [f"{base}:t:", f"{base}:o:"]

    async def take(self, tenant: str, members: Iterable[str], offer: str, now: float,
                   count: int, window: float) -> dict[str, bool]:
        members = list(dict.fromkeys(members))
        if not members:
            return {}
        t, o = self._keys(tenant)
        keys = [k for m in members for k in (t + m, o + m)]
        flags = await self._take(keys=keys, args=[repr(now), repr(now - window), count, offer,
                                                  repr(window + 1)])
        return {m: bool(f) for m, f in zip(members, flags)}

    async def forget(self, tenant: str, member: str) -> None:
        t, o = self._keys(tenant)
        await self._redis.delete(t + member, o + member)
