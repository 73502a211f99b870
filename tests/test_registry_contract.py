"""One suite of Registry contract tests, run against every backend.

``registry_backend`` opens a fresh, empty registry of each backend in turn:
memory, and Redis against a real ``redis-server`` (tests/redis_server.py; a
fresh key prefix per test).  Every test is a plain
function that runs its coroutine with :func:`run_with`.  The last test feeds
random puts to the backend and compares every group with a walk over the
records (what the registry computed before it kept per-group indexes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import redis.asyncio as aioredis

from redis_server import fresh_prefix, redis_url
from tillwire.server.address import parse_address
from tillwire.server.registry import Registry
from tillwire.server.registry_memory import MemoryRegistry
from tillwire.server.registry_redis import RedisRegistry
from tillwire.server.terminals import TerminalRecord

BACKENDS = ["memory", "redis"]


@contextlib.asynccontextmanager
async def open_registry(kind: str):
    """A fresh, empty registry of backend ``kind``."""
    if kind == "memory":
        yield MemoryRegistry()
        return
    if kind == "redis":
        client = aioredis.from_url(redis_url())
        try:
            yield RedisRegistry(client, prefix=fresh_prefix())
        finally:
            await client.aclose()
        return
    raise ValueError(kind)


@pytest.fixture(params=BACKENDS)
def registry_backend(request) -> str:
    return request.param


def run_with(backend: str, body):
    """Run ``await body(registry)`` on a fresh registry of ``backend``."""
    async def main():
        async with open_registry(backend) as registry:
            return await body(registry)
    return asyncio.run(main())


def rec(terminal: str, store: str, *roles: str, tenant: str = "acme", region: str = "",
        member: str = "", retired: bool = False) -> TerminalRecord:
    return TerminalRecord(f"terminal:{tenant}/{terminal}", tenant, terminal, store, region,
                          roles, member, retired=retired)


async def members(registry, address: str) -> list[str]:
    return await registry.members(parse_address(address))


def ids(*terminals: str, tenant: str = "acme") -> list[str]:
    return [f"terminal:{tenant}/{t}" for t in terminals]


def test_backend_satisfies_protocol(registry_backend):
    async def body(registry):
        assert isinstance(registry, Registry)
    run_with(registry_backend, body)


def test_empty_registry(registry_backend):
    async def body(registry):
        assert len(registry) == 0 and await registry.count() == 0
        assert registry.cached("terminal:acme/t1") is None
        assert await registry.get("terminal:acme/t1") is None
        for group in ("tenant:acme", "store:acme/s1", "role:acme/*/service",
                      "role:acme/s1/pos", "region:acme/north", "member:acme/m1"):
            assert await members(registry, group) == [], group
        # An unregistered terminal is its own member: its message waits for its login.
        assert await members(registry, "terminal:acme/t1") == ["terminal:acme/t1"]
    run_with(registry_backend, body)


def test_put_get_cached_count(registry_backend):
    async def body(registry):
        till = rec("till1", "s1", "pos", region="north")
        await registry.put(till)
        assert await registry.get(till.address) == till
        assert registry.cached(till.address) == till
        assert await registry.count() == 1 and len(registry) == 1
        # Replacing a record keeps one; a second terminal makes two.
        later = dataclasses.replace(till, last_seen=50.0)
        await registry.put(later)
        assert (await registry.get(till.address)).last_seen == 50.0
        assert registry.cached(till.address).last_seen == 50.0
        await registry.put(rec("till2", "s1", "pos"))
        assert await registry.count() == 2 and len(registry) == 2
        assert await registry.get("terminal:acme/nobody") is None
    run_with(registry_backend, body)


def test_load_puts_every_record(registry_backend):
    async def body(registry):
        await registry.load([rec(f"t{i}", f"s{i % 3}", "pos") for i in range(9)]
                            + [rec("old", "s0", "pos", retired=True)])
        assert await registry.count() == 10 and len(registry) == 10
        assert await members(registry, "store:acme/s0") == ids("t0", "t3", "t6")
        assert await members(registry, "tenant:acme") == ids(*sorted(f"t{i}" for i in range(9)))
        assert (await registry.get("terminal:acme/old")).retired
    run_with(registry_backend, body)


def test_every_group_kind(registry_backend):
    async def body(registry):
        await registry.load([
            rec("till1", "s1", "pos", region="north"),
            rec("till2", "s1", "pos", "staff", region="north"),
            rec("mgr", "s2", "manager", "staff", region="south"),
            rec("agent2", "cs", "service"),
            rec("agent1", "cs", "service"),
            rec("app1", "s1", "customer", member="m1"),
            rec("app2", "s2", "customer", member="m1"),
            rec("agent1", "cs", "service", tenant="globex"),
        ])
        assert await members(registry, "tenant:acme") == ids(
            "agent1", "agent2", "app1", "app2", "mgr", "till1", "till2")
        assert await members(registry, "tenant:globex") == ids("agent1", tenant="globex")
        assert await members(registry, "store:acme/s1") == ids("app1", "till1", "till2")
        assert await members(registry, "store:acme/cs") == ids("agent1", "agent2")
        assert await members(registry, "role:acme/s1/pos") == ids("till1", "till2")
        assert await members(registry, "role:acme/s1/staff") == ids("till2")
        assert await members(registry, "role:acme/s2/staff") == ids("mgr")
        assert await members(registry, "role:acme/s3/staff") == []
        # A role across the tenant: every store, this tenant only.
        assert await members(registry, "role:acme/*/staff") == ids("mgr", "till2")
        assert await members(registry, "role:acme/*/service") == ids("agent1", "agent2")
        assert await members(registry, "role:globex/*/service") == ids("agent1", tenant="globex")
        assert await members(registry, "region:acme/north") == ids("till1", "till2")
        assert await members(registry, "region:acme/south") == ids("mgr")
        assert await members(registry, "member:acme/m1") == ids("app1", "app2")
        # A terminal is its own member, registered or not; other scopes have none.
        assert await members(registry, "terminal:acme/till1") == ids("till1")
        assert await members(registry, "topic:acme/prices") == []
        assert await members(registry, "chat:acme/cv1") == []
    run_with(registry_backend, body)


T_REVOKED = 1_700_000_000.0


def test_retired_terminals_are_in_no_group(registry_backend):
    async def body(registry):
        live = rec("till1", "s1", "pos", region="north", member="m1")
        await registry.load([live, rec("till2", "s1", "pos", region="north", member="m1")])
        groups = ("tenant:acme", "store:acme/s1", "role:acme/s1/pos", "role:acme/*/pos",
                  "region:acme/north", "member:acme/m1")
        for group in groups:            # (read first: a backend that keeps answers must drop them)
            assert await members(registry, group) == ids("till1", "till2"), group
        await registry.put(dataclasses.replace(live, retired=True))
        for group in groups:
            assert await members(registry, group) == ids("till2"), group
        assert await members(registry, "terminal:acme/till1") == []
        # Still registered: get finds it, count counts it.
        assert (await registry.get(live.address)).retired
        assert registry.cached(live.address).retired
        assert await registry.count() == 2
        # A record put back unretired is a member again.
        await registry.put(live)
        for group in groups:
            assert await members(registry, group) == ids("till1", "till2"), group
        assert await members(registry, "terminal:acme/till1") == ids("till1")
    run_with(registry_backend, body)


def test_a_login_put_never_undoes_a_retire_or_moves_a_revocation_back(registry_backend):
    # A login builds its record from what its worker cached; in a fleet the
    # cache may not have heard of a retire or revoke on another worker yet.
    async def body(registry):
        stale = rec("till1", "s1", "pos")
        await registry.put(dataclasses.replace(stale, retired=True, revoked_before=T_REVOKED))
        await registry.put_login(dataclasses.replace(stale, last_seen=T_REVOKED + 5))
        got = await registry.get(stale.address)
        assert got.retired and got.revoked_before == T_REVOKED
        assert got.last_seen == T_REVOKED + 5             # (what the login changes, it changes)
        assert await members(registry, "store:acme/s1") == []
        # A later revocation in the login's record is kept; a new terminal is put.
        await registry.put_login(dataclasses.replace(stale, revoked_before=T_REVOKED + 9))
        assert (await registry.get(stale.address)).revoked_before == T_REVOKED + 9
        fresh = rec("till2", "s1", "pos")
        await registry.put_login(fresh)
        assert await registry.get(fresh.address) == fresh
        assert await members(registry, "store:acme/s1") == ids("till2")
    run_with(registry_backend, body)


def test_a_record_that_moves_is_reindexed(registry_backend):
    async def body(registry):
        first = rec("t1", "s1", "pos", "staff", region="north", member="m1")
        await registry.load([first, rec("t2", "s1", "staff")])
        before = ("store:acme/s1", "role:acme/s1/pos", "role:acme/s1/staff",
                  "role:acme/*/pos", "role:acme/*/staff", "region:acme/north",
                  "member:acme/m1", "tenant:acme")
        for group in before:
            assert "terminal:acme/t1" in await members(registry, group), group
        # Another store, other roles, no region, another member.
        await registry.put(rec("t1", "s2", "manager", member="m2"))
        assert await members(registry, "store:acme/s1") == ids("t2")
        assert await members(registry, "role:acme/s1/staff") == ids("t2")
        assert await members(registry, "role:acme/*/staff") == ids("t2")
        for group in ("role:acme/s1/pos", "role:acme/*/pos", "region:acme/north",
                      "member:acme/m1"):
            assert await members(registry, group) == [], group
        for group in ("store:acme/s2", "role:acme/s2/manager", "role:acme/*/manager",
                      "member:acme/m2"):
            assert await members(registry, group) == ids("t1"), group
        assert await members(registry, "tenant:acme") == ids("t1", "t2")
        assert await registry.count() == 2
    run_with(registry_backend, body)


def test_members_answers_are_the_callers(registry_backend):
    async def body(registry):
        await registry.load([rec("t1", "s1", "pos"), rec("t2", "s1", "pos")])
        got = await members(registry, "store:acme/s1")
        got.append("terminal:acme/intruder")
        got.sort(reverse=True)
        assert await members(registry, "store:acme/s1") == ids("t1", "t2")
    run_with(registry_backend, body)


def test_duplicate_roles_count_once(registry_backend):
    async def body(registry):
        twice = rec("t1", "s1", "pos", "pos")
        await registry.put(twice)
        assert await members(registry, "role:acme/s1/pos") == ids("t1")
        await registry.put(rec("t1", "s2", "pos"))
        assert await members(registry, "role:acme/s1/pos") == []
        assert await members(registry, "role:acme/*/pos") == ids("t1")
    run_with(registry_backend, body)


def test_concurrent_puts_of_one_terminal_leave_it_in_its_last_records_groups(
        registry_backend):
    async def body(registry):
        moves = [rec("t1", f"s{i % 4}", "pos" if i % 2 else "staff") for i in range(20)]
        await asyncio.gather(*(registry.put(r) for r in moves))
        final = await registry.get("terminal:acme/t1")
        assert final in moves and await registry.count() == 1
        for store in range(4):
            for role in ("pos", "staff"):
                inside = final.store == f"s{store}" and role in final.roles
                assert (await members(registry, f"role:acme/s{store}/{role}")
                        == (["terminal:acme/t1"] if inside else []))
            assert (await members(registry, f"store:acme/s{store}")
                    == (["terminal:acme/t1"] if final.store == f"s{store}" else []))
    run_with(registry_backend, body)


def test_reads_asked_together_answer_each_its_own(registry_backend):
    # Reads of one moment (a login storm's look-ups): two tenants, the same
    # address asked twice, addresses never put.
    async def body(registry):
        put = [rec(f"t{n}", "s1", "pos", tenant=("acme", "globex")[n % 2]) for n in range(20)]
        for r in put:
            await registry.put(r)
        asked = [r.address for r in put] + [put[3].address, "terminal:acme/nobody",
                                            "terminal:initech/t1"]
        got = await asyncio.gather(*(registry.get(a) for a in asked))
        assert got == put + [put[3], None, None]
    run_with(registry_backend, body)


class _CountedClient:
    """A Redis client that counts its round trips (commands and pipelines)."""

    def __init__(self, client) -> None:
        self._client = client
        self.round_trips = 0

    def __getattr__(self, name):
        return getattr(self._client, name)

    async def hget(self, *args):
        self.round_trips += 1
        return await self._client.hget(*args)

    def pipeline(self, *args, **kwargs):
        self.round_trips += 1
        return self._client.pipeline(*args, **kwargs)


def test_redis_reads_of_one_loop_turn_are_one_round_trip():
    async def main():
        client = aioredis.from_url(redis_url())
        try:
            prefix, counted = fresh_prefix(), _CountedClient(client)
            registry = RedisRegistry(counted, prefix=prefix)
            other = RedisRegistry(client, prefix=prefix)         # (another worker)
            put = [rec(f"t{n}", "s1", "pos", tenant=("acme", "globex")[n % 2])
                   for n in range(50)]
            for r in put:
                await other.put(r)
            got = await asyncio.gather(*(registry.get(r.address) for r in put))
            assert got == put and counted.round_trips == 1
        finally:
            await client.aclose()
    asyncio.run(main())


def test_terminal_members(registry_backend):
    async def body(registry):
        address = "terminal:acme/t1"
        assert registry.terminal_members(address, None) == [address]
        assert registry.terminal_members(address, rec("t1", "s1", "pos")) == [address]
        assert registry.terminal_members(address, rec("t1", "s1", "pos", retired=True)) == []
    run_with(registry_backend, body)


# --------------------------------------------------------------------------
# Differential: the indexes against a walk over the records

STORES = ("s1", "s2", "*")
ROLE_NAMES = ("pos", "staff", "service")
_records = st.builds(
    lambda t, tenant, store, roles, region, member, retired: rec(
        t, store, *roles, tenant=tenant, region=region, member=member, retired=retired),
    st.sampled_from(["t1", "t2", "t3", "t4"]), st.sampled_from(["acme", "globex"]),
    st.sampled_from(STORES[:2]), st.lists(st.sampled_from(ROLE_NAMES), max_size=3),
    st.sampled_from(["", "north", "south"]), st.sampled_from(["", "m1", "m2"]),
    st.booleans())


def _walk(records: dict[str, TerminalRecord], group: str) -> list[str]:
    """The members of ``group`` by looking at every record."""
    address = parse_address(group)
    scope, value = address.scope, address.path

    def belongs(r: TerminalRecord) -> bool:
        if r.tenant != address.tenant or r.retired:
            return False
        if scope == "tenant":
            return True
        if scope == "store":
            return r.store == value[0]
        if scope == "region":
            return r.region == value[0]
        if scope == "member":
            return r.member == value[0]
        return value[1] in r.roles and value[0] in ("*", r.store)
    return sorted(a for a, r in records.items() if belongs(r))


def _groups() -> list[str]:
    names = []
    for tenant in ("acme", "globex"):
        names.append(f"tenant:{tenant}")
        names += [f"store:{tenant}/{s}" for s in STORES[:2]]
        names += [f"role:{tenant}/{s}/{r}" for s in STORES for r in ROLE_NAMES]
        names += [f"region:{tenant}/{r}" for r in ("north", "south")]
        names += [f"member:{tenant}/{m}" for m in ("m1", "m2")]
    return names


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(_records, st.booleans()), min_size=1, max_size=25))
def test_groups_match_a_walk_over_the_records(backend, steps):
    async def body(registry):
        model: dict[str, TerminalRecord] = {}
        for record, read in steps:
            await registry.put(record)
            model[record.address] = record
            if read:       # (reads between puts: answers kept must follow the puts)
                for group in _groups():
                    assert await members(registry, group) == _walk(model, group), group
        for group in _groups():
            assert await members(registry, group) == _walk(model, group), group
        assert await registry.count() == len(model)
        for address, record in model.items():
            assert await registry.get(address) == record
    run_with(backend, body)
