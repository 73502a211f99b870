"""Retrying backend writes: the backoff, and writes made in order.

A write to a backend that fails is kept and tried again, never dropped: the
first retry after ``RETRY_FIRST`` seconds, each next one twice as late, up
to ``RETRY_MAX``.  :class:`InOrder` makes a queue of such writes one at a
time in the order given (a registry put after the one before it; a release
of a terminal after its claim), so a later write never overtakes an
earlier one that is still being retried.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Awaitable, Callable

log = logging.getLogger("tillwire.retry")

RETRY_FIRST = 0.05           # seconds before a failed backend call is retried...
RETRY_MAX = 5.0              # ...doubling up to this


def backoff(delay: float) -> float:
    """The delay after ``delay`` (0: the first)."""
    return min(delay * 2, RETRY_MAX) if delay else RETRY_FIRST


class InOrder:
    """Writes of ``write(item)`` made by one task in the order of :meth:`add`,
    each retried with backoff until it succeeds; once ``stopping()`` a
    failure drops what is left (logged).  ``label(item)`` names an item in
    the log."""

    def __init__(self, spawn: Callable[[Awaitable[Any]], Any],
                 write: Callable[[Any], Awaitable[Any]], label: Callable[[Any], str],
                 stopping: Callable[[], bool]) -> None:
        self._spawn = spawn
        self._write = write
        self._label = label
        self._stopping = stopping
        self._items: deque = deque()
        self._running = False

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item) -> None:
        self._items.append(item)
        if not self._running:
            self._running = True
            self._spawn(self.drain())

    async def drain(self) -> None:
        """Write everything queued (and what is added meanwhile)."""
        self._running = True
        delay = 0.0
        items = self._items
        try:
            while items:
                try:
                    await self._write(items[0])
                except Exception as exc:     # kept and retried: the backend comes back
                    if self._stopping():
                        log.warning("%s not written at stop (%d left): %s",
                                    self._label(items[0]), len(items), exc)
                        items.clear()
                        return
                    delay = backoff(delay)
                    log.warning("%s failed (%s); retrying in %g s", self._label(items[0]),
                                exc, delay)
                    await asyncio.sleep(delay)
                    continue
                items.popleft()
                delay = 0.0
        finally:
            self._running = False
