"""The Redis Presence backend: leases every worker and node sees.

Redis 7.0 has no per-field expiry on hashes (HEXPIRE came with 7.4), so a
lease is a hash field plus a sorted-set score, as Centrifugo keeps its
presence: per tenant,

* ``<p>:{<tenant>}:presence:owner`` — hash, terminal -> owner;
* ``<p>:{<tenant>}:presence:exp`` — sorted set, terminal -> lease end;
* ``<p>:{<tenant>}:presence:info`` — hash, terminal -> its store and roles;
* ``<p>:{<tenant>}:presence:idx:<store>\\t<role>`` — sorted sets by lease
  end, one per selection :meth:`online` answers (the tenant, a store, a
  role, a store's role), so a listing costs its selection, not the tenant.

Every key of a tenant carries the tenant as its hash tag: one tenant's keys
share a Cluster slot, and each operation is one Lua script over one tenant
(atomic: a claim and the previous owner it returns cannot interleave with
another claim).  A refresh of many terminals is one script per tenant, all
in one pipeline: one round trip.  Leases past their end are absent from
every answer and are deleted by the next script of their tenant (at most
100 at a time).  Times are the callers' clock (unix seconds by default):
the nodes of a fleet keep their clocks within a fraction of a lease.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from .address import tenant_of
from .presence import Presence, SessionInfo

_COMMON = """
local owners, expiry, info = KEYS[1], KEYS[2], KEYS[3]
local idxp = ARGV[1]
local now = tonumber(ARGV[2])
local function idx_keys(inf)
  local parts = {}
  for p in string.gmatch(inf, "[^\\n]+") do parts[#parts + 1] = p end
  local store = parts[1] or ""
  local keys = {idxp .. "\\t", idxp .. store .. "\\t"}
  for i = 2, #parts do
    keys[#keys + 1] = idxp .. "\\t" .. parts[i]
    keys[#keys + 1] = idxp .. store .. "\\t" .. parts[i]
  end
  return keys
end
local function forget(t)
  local inf = redis.call("HGET", info, t)
  if inf then
    for _, k in ipairs(idx_keys(inf)) do redis.call("ZREM", k, t) end
  end
  redis.call("HDEL", owners, t)
  redis.call("HDEL", info, t)
  redis.call("ZREM", expiry, t)
end
local function live_owner(t)
  local o = redis.call("HGET", owners, t)
  if not o then return false end
  local e = tonumber(redis.call("ZSCORE", expiry, t))
  if not e or e <= now then return false end
  return o
end
for _, t in ipairs(redis.call("ZRANGEBYSCORE", expiry, "-inf", now, "LIMIT", 0, 100)) do
  forget(t)
end
"""

_CLAIM = _COMMON + """
local t, owner, e, inf = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local prev = live_owner(t)
forget(t)
redis.call("HSET", owners, t, owner)
redis.call("HSET", info, t, inf)
redis.call("ZADD", expiry, e, t)
for _, k in ipairs(idx_keys(inf)) do redis.call("ZADD", k, e, t) end
return prev
"""

_REFRESH = _COMMON + """
local owner, e = ARGV[3], tonumber(ARGV[4])
local lost = {}
for i = 5, #ARGV do
  local t = ARGV[i]
  if live_owner(t) ~= owner then
    lost[#lost + 1] = t
  else
    redis.call("ZADD", expiry, e, t)
    for _, k in ipairs(idx_keys(redis.call("HGET", info, t))) do redis.call("ZADD", k, e, t) end
  end
end
return lost
"""

_RELEASE = _COMMON + """
local t, owner = ARGV[3], ARGV[4]
if live_owner(t) ~= owner then return 0 end
forget(t)
return 1
"""

_OWNER = _COMMON + """
return live_owner(ARGV[3])
"""

# (Two commands for all the terminals asked, not two per terminal: this
# runs for every batch of P0/P1 messages stored for other workers' sessions.)
_OWNERS = _COMMON + """
local out = {}
for i = 3, #ARGV, 1000 do
  local some = {unpack(ARGV, i, math.min(i + 999, #ARGV))}
  local os = redis.call("HMGET", owners, unpack(some))
  local es = redis.call("ZMSCORE", expiry, unpack(some))
  for k, t in ipairs(some) do
    local e = tonumber(es[k])
    if os[k] and e and e > now then out[#out + 1] = t; out[#out + 1] = os[k] end
  end
end
return out
"""

_ONLINE = _COMMON + """
local found = redis.call("ZRANGEBYSCORE", idxp .. ARGV[3], "(" .. ARGV[2], "+inf")
local out = {}
for _, t in ipairs(found) do
  local o = redis.call("HGET", owners, t)
  if o then out[#out + 1] = t; out[#out + 1] = o end
end
return out
"""


class RedisPresence(Presence):
    """Presence in Redis, shared by every worker that uses the same ``prefix``."""

    def __init__(self, client, *, prefix: str = "tw",
                 clock: Callable[[], float] = time.time) -> None:
        """``client``: a ``redis.asyncio.Redis`` (its connection pool is the
        caller's); ``clock``: seconds, the same on every node."""
        self._redis = client
        self._prefix = prefix
        self._clock = clock
        self._claim = client.register_script(_CLAIM)
        self._refresh = client.register_script(_REFRESH)
        self._release = client.register_script(_RELEASE)
        self._owner = client.register_script(_OWNER)
        self._owners = client.register_script(_OWNERS)
        self._online = client.register_script(_ONLINE)

    def _keys(self, tenant: str) -> tuple[list[str], str]:
        base = f"{self._prefix}:{{{tenant}}}:presence"
        return [f"{base}:owner", f"{base}:exp", f"{base}:info"], f"{base}:idx:"

    async def claim(self, terminal: str, owner: str, lease_s: float,
                    info: SessionInfo) -> str | None:
        keys, idx = self._keys(info.tenant)
        now = self._clock()
        place = "\n".join((info.store, *dict.fromkeys(info.roles)))
        previous = await self._claim(keys=keys, args=[idx, repr(now), terminal, owner,
                                                      repr(now + lease_s), place])
        return previous.decode() if previous else None

    async def refresh(self, terminals: Iterable[str], owner: str, lease_s: float) -> list[str]:
        terminals = list(terminals)
        if not terminals:
            return []
        by_tenant: dict[str, list[str]] = {}
        for terminal in terminals:
            by_tenant.setdefault(tenant_of(terminal), []).append(terminal)
        now = self._clock()
        async with self._redis.pipeline(transaction=False) as pipe:
            for tenant, mine in by_tenant.items():
                keys, idx = self._keys(tenant)
                await self._refresh(keys=keys, args=[idx, repr(now), owner,
                                                     repr(now + lease_s), *mine], client=pipe)
            answers = await pipe.execute()
        lost = {t.decode() for answer in answers for t in answer}
        return [t for t in terminals if t in lost]

    async def release(self, terminal: str, owner: str) -> bool:
        keys, idx = self._keys(tenant_of(terminal))
        return bool(await self._release(keys=keys, args=[idx, repr(self._clock()), terminal,
                                                         owner]))

    async def owner(self, terminal: str) -> str | None:
        keys, idx = self._keys(tenant_of(terminal))
        found = await self._owner(keys=keys, args=[idx, repr(self._clock()), terminal])
        return found.decode() if found else None

    async def owners(self, terminals: Iterable[str]) -> dict[str, str]:
        by_tenant: dict[str, list[str]] = {}
        for terminal in terminals:
            by_tenant.setdefault(tenant_of(terminal), []).append(terminal)
        found: dict[str, str] = {}
        now = repr(self._clock())
        for tenant, some in by_tenant.items():
            keys, idx = self._keys(tenant)
            flat = await self._owners(keys=keys, args=[idx, now, *some])
            for i in range(0, len(flat), 2):
                found[flat[i].decode()] = flat[i + 1].decode()
        return found

    async def online(self, tenant: str, store: str | None = None,
                     role: str | None = None) -> dict[str, str]:
        keys, idx = self._keys(tenant)
        flat = await self._online(keys=keys, args=[idx, repr(self._clock()),
                                                   f"{store or ''}\t{role or ''}"])
        pairs = sorted((flat[i].decode(), flat[i + 1].decode()) for i in range(0, len(flat), 2))
        return dict(pairs)
