"""The Terminals interface: the durable records of every terminal the system knows.

A terminal is registered when it logs in (or an operator provisions it),
and stays known, connected or not, until it is retired.  This is only the
persistent table: the node loads it into the in-memory, indexed registry
(``registry.py``) at start and writes changes through.  Backends sit beside
this file (``terminals_memory.py``, ``terminals_sqlite.py``); each store
backend exposes its own as ``store.terminals`` (the SQLite one shares the
store's ``terminals`` table, where recipients that never logged in have
placeholder rows that are no registered terminal).
``tests/test_terminals_contract.py`` runs one suite against every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(slots=True)
class TerminalRecord:
    """One terminal the system knows, connected or not (the registry)."""

    address: str          # terminal:<tenant>/<terminal>
    tenant: str
    terminal: str
    store: str
    region: str
    roles: tuple[str, ...]
    member: str = ""
    first_seen: float = 0.0
    last_seen: float = 0.0
    retired: bool = False
    revoked_before: float = 0.0   # tokens issued before this are refused


@runtime_checkable
class Terminals(Protocol):
    """The contract every terminal-record backend fulfils (all coroutines).

    Records are values: a caller mutating a record it passed or got back
    never changes what the backend holds.
    """

    async def register(self, record: TerminalRecord) -> None:
        """Insert or update a terminal (keeps first_seen, retired, revoked_before)."""

    async def get(self, address: str) -> TerminalRecord | None:
        """The registered terminal at ``address`` (None: not registered)."""

    async def all(self, tenant: str | None = None) -> list[TerminalRecord]:
        """Every registered terminal (of one tenant, or all)."""

    async def retire(self, address: str, retired: bool) -> bool:
        """Set or clear ``retired``; False when no such terminal is registered."""

    async def revoke(self, address: str, before: float) -> bool:
        """Refuse its tokens issued before ``before``; False when not registered."""
