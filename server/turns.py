"""One operation per key at a time, in the order they came.

The services change a record (a ticket, a conversation) only once the
message that changes it is committed.  An operation that reads the record
while an earlier one on the same key is still being committed would read a
state about to change (two staff assigning one ticket would both see it
free): :class:`Turns` makes it wait for its turn instead.  Operations on
different keys never wait for each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable


class Turns:
    """The operations in progress per key (each waits for the one before it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # key -> the future the latest operation resolves when it is done;
        # present only while an operation on the key is in progress.
        self._last: dict[Hashable, asyncio.Future] = {}

    def busy(self, key) -> bool:
        """Whether an operation on ``key`` is in progress."""
        return key in self._last

    def take(self, key) -> tuple[asyncio.Future | None, asyncio.Future]:
        """Queue an operation on ``key``: (what to await before it starts, None
        if nothing; its own turn, to give back with :meth:`done`)."""
        before = self._last.get(key)
        mine = self._last[key] = self._loop.create_future()
        return before, mine

    def done(self, key, mine: asyncio.Future) -> None:
        """The operation of turn ``mine`` is over: the next one on ``key`` starts.
        Call it exactly once per :meth:`take` (in a ``finally``)."""
        if not mine.done():
            mine.set_result(None)
        if self._last.get(key) is mine:
            del self._last[key]
