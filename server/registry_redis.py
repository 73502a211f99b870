"""The Redis Registry backend: terminal records and their groups, in Redis.

Per tenant (the tenant is every key's hash tag: one tenant's keys share a
Cluster slot):

* ``<p>:{<tenant>}:reg:rec`` — hash, terminal address -> its record (JSON);
* ``<p>:{<tenant>}:reg:g:<group address>`` — a set per group the record is
  in (``registry.record_groups``: tenant, store, roles within the store and
  across the tenant, region, member), so expanding a group costs the group's
  size in Redis and nothing in any worker's memory;

and ``<p>:reg:count``, the number of records.  A put is one Lua script that
replaces the record and moves it between groups only if the record is still
the one the caller read (compare and set; retried otherwise), so two
workers registering the same terminal never leave it in a group it left.

Each worker keeps a bounded cache of the records it read or wrote
(``cache_size``, least recently put first out) for the node's hot paths
(:meth:`cached`); another worker's put shows there only after this worker
reads the record again.  The reads asked in one turn of the event loop go
to Redis together, one HMGET per tenant in one round trip (a login storm
asks for thousands of records at once).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Iterable

import orjson

from .address import Address, tenant_of
from .registry import Registry, kept_flags, record_groups
from .terminals import TerminalRecord

CACHE_SIZE = 100_000         # records a worker keeps for cached()

_PUT = """
local recs, gp = KEYS[1], ARGV[1]
local addr, expected, new = ARGV[2], ARGV[3], ARGV[4]
local current = redis.call("HGET", recs, addr)
if (current or "") ~= expected then return -1 end
local n_out = tonumber(ARGV[5])
for i = 6, 5 + n_out do redis.call("SREM", gp .. ARGV[i], addr) end
for i = 6 + n_out, #ARGV do redis.call("SADD", gp .. ARGV[i], addr) end
redis.call("HSET", recs, addr, new)
if current then return 0 end
return 1
"""


def _encode(rec: TerminalRecord) -> bytes:
    return orjson.dumps([rec.address, rec.tenant, rec.terminal, rec.store, rec.region,
                         list(rec.roles), rec.member, rec.first_seen, rec.last_seen,
                         rec.retired, rec.revoked_before])


def _decode(raw: bytes) -> TerminalRecord:
    (address, tenant, terminal, store, region, roles, member, first_seen, last_seen, retired,
     revoked_before) = orjson.loads(raw)
    return TerminalRecord(address, tenant, terminal, store, region, tuple(roles), member,
                          first_seen, last_seen, retired, revoked_before)


class RedisRegistry(Registry):
    """Records in Redis, shared by every worker with the same ``prefix``."""

    def __init__(self, client, *, prefix: str = "tw", cache_size: int = CACHE_SIZE) -> None:
        self._redis = client
        self._prefix = prefix
        self._cache: OrderedDict[str, TerminalRecord] = OrderedDict()
        self._cache_size = cache_size
        # Reads in flight per address, and those of them whose record was
        # announced changed meanwhile: their answers may predate the change.
        self._reading: dict[str, int] = {}
        self._changed: set[str] = set()
        self._asked: dict[str, asyncio.Future] = {}    # reads of this loop turn
        self._reads: set[asyncio.Task] = set()     # (held: the loop keeps only weak ones)
        self._put = client.register_script(_PUT)

    def _keys(self, tenant: str) -> tuple[str, str]:
        base = f"{self._prefix}:{{{tenant}}}:reg"
        return f"{base}:rec", f"{base}:g:"

    def _remember(self, rec: TerminalRecord) -> None:
        cache = self._cache
        cache[rec.address] = rec
        cache.move_to_end(rec.address)
        if len(cache) > self._cache_size:
            cache.popitem(last=False)

    def __len__(self) -> int:
        return len(self._cache)

    def drop_cache(self) -> None:
        """Forget every cached record (changes announced while this worker
        could not hear them): each is read again when next needed."""
        self._cache.clear()
        self._changed.update(self._reading)

    def cached(self, address: str) -> TerminalRecord | None:
        return self._cache.get(address)

    def forget_cached(self, address: str) -> None:
        """Forget ``address``'s cached record (another worker changed it):
        until it is read again, whoever needs it reads it from Redis.  A
        read in flight is not cached either: Redis may have answered it
        before the change."""
        self._cache.pop(address, None)
        if address in self._reading:
            self._changed.add(address)

    async def get(self, address: str) -> TerminalRecord | None:
        reading = self._reading
        reading[address] = reading.get(address, 0) + 1
        try:
            raw = await asyncio.shield(self._read(address))
        finally:
            stale = address in self._changed
            left = reading.pop(address) - 1
            if left:
                reading[address] = left
            else:
                self._changed.discard(address)
        if raw is None:
            return None
        rec = _decode(raw)
        if not stale:
            self._remember(rec)
        return rec

    def _read(self, address: str) -> asyncio.Future:
        """The raw record of ``address`` (None if absent), read together with
        the others asked in this turn of the loop."""
        fut = self._asked.get(address)
        if fut is None:
            loop = asyncio.get_running_loop()
            if not self._asked:
                loop.call_soon(self._read_asked)
            fut = self._asked[address] = loop.create_future()
        return fut

    def _read_asked(self) -> None:
        asked, self._asked = self._asked, {}
        task = asyncio.ensure_future(self._read_many(asked))
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)

    async def _read_many(self, asked: dict[str, asyncio.Future]) -> None:
        by_tenant: dict[str, list[str]] = {}
        for address in asked:
            by_tenant.setdefault(tenant_of(address), []).append(address)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for tenant, addresses in by_tenant.items():
                    pipe.hmget(self._keys(tenant)[0], addresses)
                replies = await pipe.execute()
        except Exception as exc:
            for fut in asked.values():
                if not fut.done():
                    fut.set_exception(exc)
            return
        for addresses, raws in zip(by_tenant.values(), replies):
            for address, raw in zip(addresses, raws):
                fut = asked[address]
                if not fut.done():
                    fut.set_result(raw)

    async def put(self, rec: TerminalRecord) -> None:
        await self._put_record(rec, keep=False)

    async def put_login(self, rec: TerminalRecord) -> None:
        # (the flags kept from the record this very put replaces: atomic
        # with it, the script refusing a record that changed meanwhile)
        await self._put_record(rec, keep=True)

    async def _put_record(self, rec: TerminalRecord, keep: bool) -> None:
        recs, groups = self._keys(rec.tenant)
        given = rec
        while True:
            raw = await self._redis.hget(recs, rec.address)
            if keep:
                rec = kept_flags(given, _decode(raw) if raw is not None else None)
            new = _encode(rec)
            old = record_groups(_decode(raw)) if raw is not None else []
            after = record_groups(rec)
            leave = [g for g in old if g not in after]
            join = [g for g in after if g not in old]
            done = await self._put(keys=[recs], args=[groups, rec.address, raw or b"", new,
                                                      len(leave), *leave, *join])
            if done >= 0:
                break                # (-1: another worker's put came between: again)
        if done == 1:
            await self._redis.incr(f"{self._prefix}:reg:count")
        self._remember(rec)

    async def load(self, records: Iterable[TerminalRecord]) -> None:
        for rec in records:
            await self.put(rec)

    async def count(self) -> int:
        return int(await self._redis.get(f"{self._prefix}:reg:count") or 0)

    async def members(self, address: Address) -> list[str]:
        name = str(address)
        if address.scope == "terminal":
            rec = self._cache.get(name)
            if rec is None:
                rec = await self.get(name)
            return self.terminal_members(name, rec)
        found = await self._redis.smembers(self._keys(address.tenant)[1] + name)
        return sorted(m.decode() for m in found)
