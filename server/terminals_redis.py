"""Terminal records in Redis (``RedisStore.terminals``).

Per tenant, under the tenant as hash tag (as the Registry's keys):

* ``<p>:{<tenant>}:term:<address>`` — hash, one terminal's fields (times as
  Python wrote them, roles as JSON);
* ``<p>:{<tenant>}:terms`` — set of the tenant's registered addresses;

and ``<p>:term:tenants``, the tenants with registered terminals.  A
register is one script, so keeping ``first_seen``, ``retired`` and
``revoked_before`` across re-registration cannot interleave with another
worker's register, retire or revoke.  Only registered terminals have keys
here (inbox recipients that never logged in have none).
"""

from __future__ import annotations

import orjson

from .address import tenant_of
from .terminals import TerminalRecord

_REGISTER = """
local k = KEYS[1]
local first = redis.call("HGET", k, "first_seen")
redis.call("HSET", k, "address", ARGV[1], "tenant", ARGV[2], "terminal", ARGV[3],
           "store", ARGV[4], "region", ARGV[5], "roles", ARGV[6], "member", ARGV[7],
           "last_seen", ARGV[9])
if not first or tonumber(first) == 0 then redis.call("HSET", k, "first_seen", ARGV[8]) end
redis.call("HSETNX", k, "retired", ARGV[10])
redis.call("HSETNX", k, "revoked_before", ARGV[11])
redis.call("SADD", KEYS[2], ARGV[1])
redis.call("SADD", KEYS[3], ARGV[2])
return 1
"""

_SET_IF_REGISTERED = """
if redis.call("EXISTS", KEYS[1]) == 0 then return 0 end
redis.call("HSET", KEYS[1], ARGV[1], ARGV[2])
return 1
"""

_ALL = """
local out = {}
for _, address in ipairs(redis.call("SMEMBERS", KEYS[1])) do
  out[#out + 1] = redis.call("HGETALL", ARGV[1] .. address)
end
return out
"""

def _decode(raw: dict) -> TerminalRecord:
    f = {k.decode(): v for k, v in raw.items()}
    return TerminalRecord(f["address"].decode(), f["tenant"].decode(), f["terminal"].decode(),
                          f["store"].decode(), f["region"].decode(),
                          tuple(orjson.loads(f["roles"])), f["member"].decode(),
                          float(f["first_seen"]), float(f["last_seen"]), f["retired"] == b"1",
                          float(f["revoked_before"]))


class RedisTerminals:
    """The :class:`~tillwire.server.terminals.Terminals` of a Redis store."""

    def __init__(self, client, *, prefix: str = "tw") -> None:
        self._redis = client
        self._prefix = prefix
        self._register = client.register_script(_REGISTER)
        self._set = client.register_script(_SET_IF_REGISTERED)
        self._all = client.register_script(_ALL)

    def _base(self, tenant: str) -> str:
        return f"{self._prefix}:{{{tenant}}}:term"

    def _key(self, address: str) -> str:
        return f"{self._base(tenant_of(address))}:{address}"

    async def register(self, record: TerminalRecord) -> None:
        base = self._base(record.tenant)
        await self._register(
            keys=[f"{base}:{record.address}", f"{base}s", f"{self._prefix}:term:tenants"],
            args=[record.address, record.tenant, record.terminal, record.store, record.region,
                  orjson.dumps(list(record.roles)), record.member, repr(float(record.first_seen)),
                  repr(float(record.last_seen)), 1 if record.retired else 0,
                  repr(float(record.revoked_before))])

    async def get(self, address: str) -> TerminalRecord | None:
        raw = await self._redis.hgetall(self._key(address))
        return _decode(raw) if raw else None

    async def all(self, tenant: str | None = None) -> list[TerminalRecord]:
        if tenant is None:
            tenants = sorted(t.decode() for t in
                             await self._redis.smembers(f"{self._prefix}:term:tenants"))
        else:
            tenants = [tenant]
        out = []
        for name in tenants:
            base = self._base(name)
            out += [_decode(dict(zip(flat[::2], flat[1::2]))) for flat in
                    await self._all(keys=[f"{base}s"], args=[f"{base}:"]) if flat]
        out.sort(key=lambda r: r.address)
        return out

    async def retire(self, address: str, retired: bool) -> bool:
        return bool(await self._set(keys=[self._key(address)],
                                    args=["retired", 1 if retired else 0]))

    async def revoke(self, address: str, before: float) -> bool:
        return bool(await self._set(keys=[self._key(address)],
                                    args=["revoked_before", repr(float(before))]))

    async def count(self) -> int:
        """How many terminals are registered (the store's stats)."""
        tenants = await self._redis.smembers(f"{self._prefix}:term:tenants")
        if not tenants:
            return 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for t in tenants:
                pipe.scard(f"{self._base(t.decode())}s")
            return sum(await pipe.execute())
