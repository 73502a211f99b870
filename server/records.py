"""The Records interface: the services' key-value records.

Tickets, conversations, offer caps and the store directory keep small JSON
values in namespaces (``ns``), keyed by strings the services choose so that
a prefix selects one tenant, one conversation, ...  Backends sit beside this
file (``records_memory.py``, ``records_sqlite.py``); each store backend
exposes its own as ``store.records`` (the SQLite one writes through the
store's group commit, in the same database file).
``tests/test_records_contract.py`` runs one suite against every backend.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol, runtime_checkable

SCAN_PAGE = 1000
"""Rows per :meth:`Records.scan` round trip when :func:`scan_all` walks a namespace."""


@runtime_checkable
class Records(Protocol):
    """The contract every key-value record backend fulfils (all coroutines)."""

    async def put(self, ns: str, key: str, value: bytes, now: float) -> None:
        """Insert or replace the record ``key`` of ``ns``, written at ``now`` (unix s)."""

    async def put_new(self, ns: str, key: str, value: bytes, now: float) -> bytes:
        """Insert the record ``key`` of ``ns`` unless it exists, atomically
        (a claim: of workers putting the same key at once, one wins); returns
        the value in place afterwards (``value`` when this put won)."""

    async def replace(self, ns: str, key: str, expected: bytes | None, value: bytes,
                      now: float) -> bytes | None:
        """Put ``value`` in place of the record ``key`` of ``ns`` only if it
        holds ``expected`` (None: only if there is no such record),
        atomically (a compare-and-set: a read-modify-write that another
        worker's write overtook is refused, to be read and tried again);
        returns the value in place afterwards (``value`` when this put won;
        None: no record)."""

    async def get(self, ns: str, key: str) -> bytes | None:
        """The value of ``key`` in ``ns`` (None: no such record)."""

    async def scan(self, ns: str, prefix: str = "", after: str = "",
                   limit: int = SCAN_PAGE, *, reverse: bool = False,
                   before: str = "") -> list[tuple[str, bytes]]:
        """At most ``limit`` records of ``ns`` whose key starts with ``prefix``,
        sorts after ``after`` and (when ``before`` is not empty) before
        ``before``; ``""`` leaves a bound open.

        In key order, or with ``reverse`` in descending key order: the
        *highest* keys in range come first, so ``limit`` keeps the newest of
        time-ordered keys.  A reverse scan pages on by passing the last key it
        returned as the next call's ``before``.  A durable backend answers
        either direction with one walk of its key index that stops after
        ``limit`` records (SQLite: the (ns, key) primary key), so a page costs
        the same however many records the prefix holds.
        """

    async def delete(self, ns: str, key: str) -> bool:
        """Delete one record; whether it existed."""

    async def delete_prefix(self, ns: str, prefix: str) -> int:
        """Delete every record of ``ns`` whose key starts with ``prefix``; how many."""

    async def expire(self, ns: str, before: float) -> int:
        """Delete the records of ``ns`` last written before ``before`` (retention)."""


async def scan_all(records: Records, ns: str, prefix: str = "",
                   after: str = "") -> AsyncIterator[tuple[str, bytes]]:
    """Every ``(key, value)`` of namespace ``ns`` under ``prefix`` (keys above
    ``after``), in key order, read a page of SCAN_PAGE at a time; stop early by
    breaking out of the ``async for``."""
    while True:
        rows = await records.scan(ns, prefix, after, SCAN_PAGE)
        for row in rows:
            yield row
        if len(rows) < SCAN_PAGE:
            return
        after = rows[-1][0]
