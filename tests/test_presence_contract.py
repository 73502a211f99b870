"""One suite of Presence contract tests, run against every backend.

``presence_backend`` names each backend in turn: memory, and Redis against
a real ``redis-server`` (tests/redis_server.py; a fresh key prefix per
test).  :func:`open_presence` gives a fresh presence and
``advance(seconds)``, which lets that much time pass for the backend's
leases: both backends take their time from the caller's clock, the test's
own here.
Leases are short (a fraction of a second) so that sleeping stays cheap.
The last test runs random claims, refreshes, releases and the passing of
time against a plain dict of leases and requires the same answers.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import redis.asyncio as aioredis

from redis_server import fresh_prefix, redis_url
from tillwire.server.presence import Presence, SessionInfo
from tillwire.server.presence_memory import MemoryPresence
from tillwire.server.presence_redis import RedisPresence

BACKENDS = ["memory", "redis"]
LEASE = 0.4
W1, W2 = "node-a/1", "node-b/2"
T1, T2, T3 = "terminal:acme/t1", "terminal:acme/t2", "terminal:acme/t3"
TILL = SessionInfo("acme", "s1", ("pos",))


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def open_presence(kind: str):
    """``(presence, advance)``: a fresh, empty presence of backend ``kind``
    and the coroutine function that lets ``seconds`` pass for it."""
    clock = _Clock()

    async def advance(seconds: float) -> None:
        clock.now += seconds

    if kind == "memory":
        yield MemoryPresence(clock), advance
        return
    if kind == "redis":
        client = aioredis.from_url(redis_url())
        try:
            yield RedisPresence(client, prefix=fresh_prefix(), clock=clock), advance
        finally:
            await client.aclose()
        return
    raise ValueError(kind)


@pytest.fixture(params=BACKENDS)
def presence_backend(request) -> str:
    return request.param


def run_with(backend: str, body):
    """Run ``await body(presence, advance)`` on a fresh presence of ``backend``."""
    async def main():
        async with open_presence(backend) as (presence, advance):
            return await body(presence, advance)
    return asyncio.run(main())


def test_backend_satisfies_protocol(presence_backend):
    async def body(presence, advance):
        assert isinstance(presence, Presence)
    run_with(presence_backend, body)


def test_claim_returns_the_previous_owner(presence_backend):
    async def body(presence, advance):
        assert await presence.owner(T1) is None
        assert await presence.claim(T1, W1, LEASE, TILL) is None
        assert await presence.owner(T1) == W1
        # The new owner wins and learns whom to tell to close.
        assert await presence.claim(T1, W2, LEASE, TILL) == W1
        assert await presence.owner(T1) == W2
        # A claim by the owner itself names itself.
        assert await presence.claim(T1, W2, LEASE, TILL) == W2
        assert await presence.owner(T1) == W2
        assert await presence.owner(T2) is None
    run_with(presence_backend, body)


def test_owners_answers_many_terminals_of_several_tenants_at_once(presence_backend):
    other = "terminal:bolt/t1"
    async def body(presence, advance):
        assert await presence.owners([]) == {}
        await presence.claim(T1, W1, LEASE, TILL)
        await presence.claim(T2, W2, 3 * LEASE, TILL)
        await presence.claim(other, W2, LEASE, SessionInfo("bolt", "s9", ("pos",)))
        assert await presence.owners([T1, T2, T3, other]) == {T1: W1, T2: W2, other: W2}
        await advance(2 * LEASE)                 # T1's and other's leases end
        assert await presence.owners([T1, T2, T3, other]) == {T2: W2}
    run_with(presence_backend, body)


def test_release_only_by_the_owner(presence_backend):
    async def body(presence, advance):
        await presence.claim(T1, W1, LEASE, TILL)
        await presence.claim(T1, W2, LEASE, TILL)            # taken over
        # The old owner's session closing must not end the new one's lease.
        assert await presence.release(T1, W1) is False
        assert await presence.owner(T1) == W2
        assert await presence.online("acme") == {T1: W2}
        assert await presence.release(T1, W2) is True
        assert await presence.owner(T1) is None
        assert await presence.online("acme") == {}
        assert await presence.release(T1, W2) is False       # already gone
        assert await presence.release(T3, W1) is False       # never claimed
    run_with(presence_backend, body)


def test_a_lease_not_refreshed_expires(presence_backend):
    async def body(presence, advance):
        await presence.claim(T1, W1, LEASE, TILL)
        await presence.claim(T2, W1, 3 * LEASE, TILL)
        await advance(LEASE / 2)
        assert await presence.owner(T1) == W1
        await advance(LEASE / 2 + 0.1)
        assert await presence.owner(T1) is None
        assert await presence.online("acme") == {T2: W1}
        assert await presence.online("acme", "s1", "pos") == {T2: W1}
        # An expired lease is no previous owner, nor W1's to release or refresh.
        assert await presence.release(T1, W1) is False
        assert await presence.refresh([T1], W1, LEASE) == [T1]
        assert await presence.owner(T1) is None
        assert await presence.claim(T1, W2, LEASE, TILL) is None
        assert await presence.owner(T1) == W2
        # Time enough for every lease: nothing is online.
        await advance(3 * LEASE)
        assert await presence.online("acme") == {}
        assert await presence.owner(T2) is None
    run_with(presence_backend, body)


def test_refresh_renews_many_and_names_the_lost(presence_backend):
    async def body(presence, advance):
        mine = [f"terminal:acme/t{i}" for i in range(1, 6)]
        for terminal in mine:
            await presence.claim(terminal, W1, LEASE, TILL)
        await presence.claim(T1, W2, LEASE, TILL)             # t1 taken over by W2
        await presence.claim("terminal:acme/w2only", W2, LEASE, TILL)
        await advance(LEASE * 0.75)
        lost = await presence.refresh(
            mine + ["terminal:acme/w2only", "terminal:acme/never"], W1, LEASE)
        assert lost == [T1, "terminal:acme/w2only", "terminal:acme/never"]
        # Past the first leases: W1's refreshed ones live on; W2's did not
        # move with W1's refresh and ran out.
        await advance(LEASE * 0.5)
        assert await presence.online("acme") == {t: W1 for t in mine[1:]}
        assert await presence.owner(T1) is None
        assert await presence.owner("terminal:acme/w2only") is None
        assert await presence.refresh([], W1, LEASE) == []
        await advance(LEASE)
        assert await presence.online("acme") == {}
    run_with(presence_backend, body)


def test_refresh_by_a_new_lease_length(presence_backend):
    async def body(presence, advance):
        await presence.claim(T1, W1, LEASE, TILL)
        assert await presence.refresh([T1], W1, 4 * LEASE) == []
        await advance(2 * LEASE)
        assert await presence.owner(T1) == W1
        assert await presence.refresh([T1], W1, LEASE / 2) == []
        await advance(LEASE)
        assert await presence.owner(T1) is None
    run_with(presence_backend, body)


def test_online_by_tenant_store_and_role(presence_backend):
    async def body(presence, advance):
        await presence.claim(T2, W1, LEASE, SessionInfo("acme", "s1", ("pos", "staff")))
        await presence.claim(T1, W2, LEASE, SessionInfo("acme", "s1", ("pos",)))
        await presence.claim(T3, W1, LEASE, SessionInfo("acme", "s2", ("staff",)))
        await presence.claim("terminal:acme/agent", W2, LEASE, SessionInfo("acme", "cs", ("service",)))
        await presence.claim("terminal:globex/t1", W1, LEASE, SessionInfo("globex", "s1", ("pos",)))
        everyone = await presence.online("acme")
        assert everyone == {"terminal:acme/agent": W2, T1: W2, T2: W1, T3: W1}
        assert list(everyone) == sorted(everyone)            # ordered by terminal
        assert await presence.online("acme", "s1") == {T1: W2, T2: W1}
        assert await presence.online("acme", role="staff") == {T2: W1, T3: W1}
        assert await presence.online("acme", "s1", "staff") == {T2: W1}
        assert await presence.online("acme", "s2", "pos") == {}
        assert await presence.online("acme", "s9") == {}
        assert await presence.online("globex") == {"terminal:globex/t1": W1}
        assert await presence.online("nobody") == {}
    run_with(presence_backend, body)


def test_a_claim_with_new_info_moves_the_session(presence_backend):
    async def body(presence, advance):
        await presence.claim(T1, W1, LEASE, SessionInfo("acme", "s1", ("pos", "pos")))
        assert await presence.online("acme", "s1", "pos") == {T1: W1}
        assert await presence.claim(T1, W2, LEASE, SessionInfo("acme", "s2", ("staff",))) == W1
        assert await presence.online("acme", "s1") == {}
        assert await presence.online("acme", role="pos") == {}
        assert await presence.online("acme", "s2", "staff") == {T1: W2}
        assert await presence.online("acme") == {T1: W2}
        # A refresh renews the lease; it leaves the owner and the info alone.
        assert await presence.refresh([T1], W2, LEASE) == []
        assert await presence.online("acme", "s2", "staff") == {T1: W2}
    run_with(presence_backend, body)


# --------------------------------------------------------------------------
# Differential: the backend against a plain dict of leases

_TERMINALS = [T1, T2, T3, "terminal:globex/t1"]
_OWNERS = [W1, W2]
_PLACES = [("s1", ("pos",)), ("s2", ("pos", "staff")), ("s1", ())]     # (store, roles)
_steps = st.lists(st.one_of(
    st.tuples(st.just("claim"), st.sampled_from(_TERMINALS), st.sampled_from(_OWNERS),
              st.sampled_from([LEASE / 2, LEASE, 2 * LEASE]), st.sampled_from(range(3))),
    st.tuples(st.just("refresh"), st.lists(st.sampled_from(_TERMINALS), max_size=4),
              st.sampled_from(_OWNERS), st.sampled_from([LEASE / 2, LEASE, 2 * LEASE])),
    st.tuples(st.just("release"), st.sampled_from(_TERMINALS), st.sampled_from(_OWNERS)),
    st.tuples(st.just("advance"), st.sampled_from([0.15, 0.3, 0.45])),
), min_size=1, max_size=30)
# Leases are multiples of 0.2 s and steps of time of 0.15 s, so no check falls
# within 0.05 s of an expiry: a boundary would test the float rounding of the
# model's clock, or a server's timer, not the backend.


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=_steps)
def test_leases_match_a_plain_model(backend, steps):
    async def body(presence, advance):
        now = 0.0
        model: dict[str, tuple[str, float, SessionInfo]] = {}   # terminal -> owner, expiry, info

        def live(terminal):
            lease = model.get(terminal)
            return lease if lease is not None and lease[1] > now else None

        for step in steps:
            op = step[0]
            if op == "claim":
                _, terminal, owner, lease_s, place = step
                info = SessionInfo(terminal[9:].split("/")[0], *_PLACES[place])
                was = live(terminal)
                assert await presence.claim(terminal, owner, lease_s, info) == \
                    (was[0] if was else None)
                model[terminal] = (owner, now + lease_s, info)
            elif op == "refresh":
                _, terminals, owner, lease_s = step
                lost = []
                for terminal in terminals:
                    lease = live(terminal)
                    if lease is None or lease[0] != owner:
                        lost.append(terminal)
                    else:
                        model[terminal] = (owner, now + lease_s, lease[2])
                assert await presence.refresh(terminals, owner, lease_s) == lost
            elif op == "release":
                _, terminal, owner = step
                lease = live(terminal)
                mine = lease is not None and lease[0] == owner
                assert await presence.release(terminal, owner) is mine
                if mine:
                    del model[terminal]
            else:
                await advance(step[1])
                now += step[1]
            for terminal in _TERMINALS:
                lease = live(terminal)
                assert await presence.owner(terminal) == (lease[0] if lease else None)
            for store, role in ((None, None), ("s1", None), (None, "pos"), ("s2", "staff")):
                expected = {t: live(t)[0] for t in sorted(model) if live(t)
                            and live(t)[2].tenant == "acme"
                            and store in (None, live(t)[2].store)
                            and role in (None, *live(t)[2].roles)}
                assert await presence.online("acme", store, role) == expected
    run_with(backend, body)
