"""One suite of Terminals contract tests (the durable terminal records), run
against every backend: ``store.terminals`` of each store backend in turn
(``store_factory``, conftest.py), then SQLite-only tests (records across
reopen, beside the inbox addresses of the same table).
"""

from __future__ import annotations

from backends import T0, make_backend, run_with
from tillwire.server.store import NewMessage
from tillwire.server.store_sqlite import DB_FILENAME
from tillwire.server.terminals import TerminalRecord, Terminals

TILL = "terminal:acme/till1"
TILL2 = "terminal:acme/till2"


def _message_to(address: str) -> NewMessage:
    return NewMessage("acme", "terminal:acme/pay1", 0, 0, "payment.result", address, b"{}",
                      T0, T0 + 3600.0)


# --------------------------------------------------------------------------
# The contract, on every backend


def test_backend_satisfies_protocol(store_factory):
    assert isinstance(store_factory().terminals, Terminals)


def test_registry(store_factory):
    rec = TerminalRecord(TILL, "acme", "till1", "s1", "north", ("till", "pos"), member="",
                         first_seen=T0, last_seen=T0)

    async def body(store):
        terminals = store.terminals
        assert await terminals.get(TILL) is None
        await terminals.register(rec)
        assert await terminals.get(TILL) == rec
        rec.store = "mutated by the caller"                   # the store holds its own copy
        assert (await terminals.get(TILL)).store == "s1"
        got = await terminals.get(TILL)
        got.retired = True
        assert not (await terminals.get(TILL)).retired
        assert await terminals.retire(TILL, True) is True
        assert await terminals.revoke(TILL, T0 + 50) is True
        # Re-registering keeps first_seen, retired and revoked_before.
        await terminals.register(TerminalRecord(TILL, "acme", "till1", "s2", "south", ("till",),
                                                first_seen=T0 + 100, last_seen=T0 + 100))
        now = await terminals.get(TILL)
        assert (now.store, now.region, now.roles, now.first_seen, now.last_seen, now.retired,
                now.revoked_before) == ("s2", "south", ("till",), T0, T0 + 100, True, T0 + 50)
        assert await terminals.retire(TILL, False) is True and not (await terminals.get(TILL)).retired
        assert await terminals.retire("terminal:acme/nobody", True) is False
        assert await terminals.revoke("terminal:acme/nobody", T0) is False
        # A recipient that never logged in is no registered terminal...
        await store.accept_many([(_message_to(TILL2), [TILL2])])
        assert await terminals.get(TILL2) is None
        assert await terminals.retire(TILL2, True) is False
        await terminals.register(TerminalRecord("terminal:zeta/t9", "zeta", "t9", "z1", "", ("kiosk",)))
        assert [r.address for r in await terminals.all()] == [TILL, "terminal:zeta/t9"]
        # ...until it does: then it is one like any other, with its own values.
        await terminals.register(TerminalRecord(TILL2, "acme", "till2", "s1", "", ("till",),
                                                first_seen=T0 + 7, last_seen=T0 + 7))
        t2 = await terminals.get(TILL2)
        assert (t2.first_seen, t2.retired, t2.revoked_before) == (T0 + 7, False, 0.0)
        assert sorted(r.address for r in await terminals.all("acme")) == [TILL, TILL2]
        assert [r.terminal for r in await terminals.all("zeta")] == ["t9"]
        assert await terminals.all("nobody") == []
    run_with(store_factory, body)


def test_all_of_a_tenant_whose_name_extends_another(store_factory):
    async def body(store):
        for address, tenant in (("terminal:acme/t1", "acme"), ("terminal:acme2/t1", "acme2"),
                                ("terminal:acme/t2", "acme")):
            await store.terminals.register(TerminalRecord(address, tenant, "t", "s1", "", ()))
        assert sorted(r.address for r in await store.terminals.all("acme")) == \
            ["terminal:acme/t1", "terminal:acme/t2"]
        assert [r.address for r in await store.terminals.all("acme2")] == ["terminal:acme2/t1"]
        assert len(await store.terminals.all()) == 3
    run_with(store_factory, body)


# --------------------------------------------------------------------------
# SQLite only


def test_sqlite_terminal_records_survive_reopen(tmp_path):
    path = str(tmp_path / DB_FILENAME)

    def make(**kw):
        return make_backend("sqlite", path, **kw)

    rec = TerminalRecord(TILL, "acme", "till1", "s1", "north", ("till",), member="m1",
                         first_seen=T0, last_seen=T0 + 1)

    async def write(store):
        await store.accept_many([(_message_to(TILL2), [TILL2])])   # a placeholder row first
        await store.terminals.register(rec)
        await store.terminals.revoke(TILL, T0 + 5)

    async def read(store):
        return await store.terminals.all(), await store.terminals.get(TILL2)

    run_with(make, write)
    records, placeholder = run_with(make, read)
    assert records == [TerminalRecord(TILL, "acme", "till1", "s1", "north", ("till",), "m1",
                                      T0, T0 + 1, False, T0 + 5)]
    assert placeholder is None
