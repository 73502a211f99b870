"""Retrying backend writes: the backoff, and writes made in order.

A write to a backend that fails is kept and tried again, never dropped: the
first retry after ``RETRY_FIRST`` seconds, each next one twice as late, up
to ``RETRY_MAX``.  :class:`InOrder` makes a queue of such writes in the
order given, one at a time or, per key, several keys at once (a
terminal's registry put after its one before; its release after its
claim), so a later write never overtakes an earlier one that is still
being retried.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Awaitable, Callable

log = logging.getLogger("tillwire.retry")

RETRY_FIRST = 0.05           # seconds before a failed backend call is retried...
RETRY_MAX = 5.0              # ...doubling up to this
AT_ONCE = 32                 # writes of different keys an InOrder runs at once (with a key)


def backoff(delay: float) -> float:
    """The delay after ``delay`` (0: the first)."""
    return min(delay * 2, RETRY_MAX) if delay else RETRY_FIRST


class InOrder:
    """Writes of ``write(item)`` in the order of :meth:`add`, each retried
    with backoff until it succeeds; once ``stopping()`` a failure drops
    what is left (logged).  ``label(item)`` names an item in the log.

    With ``key`` (a function of an item) and ``parallel`` > 1, the order
    holds per key: up to ``parallel`` writes of different keys are under
    way at once (a login storm's claims, one round trip at a time, fell
    seconds behind the logins), never two of one key, and a later write of
    a key starts only once the one before it succeeded; a write being
    retried holds back its key only."""

    def __init__(self, spawn: Callable[[Awaitable[Any]], Any],
                 write: Callable[[Any], Awaitable[Any]], label: Callable[[Any], str],
                 stopping: Callable[[], bool], *, key: Callable[[Any], Any] | None = None,
                 parallel: int = 1) -> None:
        self._spawn = spawn
        self._write = write
        self._label = label
        self._stopping = stopping
        self._key = key if key is not None else (lambda item: None)
        self._parallel = parallel if key is not None else 1
        self._items: deque = deque()
        self._busy: set = set()                # keys with a write under way
        self._tasks: set[asyncio.Task] = set()  # (held: the loop keeps only weak ones)
        # While a drain runs: set when a write ends or one is added.
        self._ended: asyncio.Event | None = None
        self._idle = asyncio.Event()           # no drain running
        self._idle.set()
        self._running = False                  # a drain is running or spawned

    def __len__(self) -> int:
        return len(self._items) + len(self._busy)

    def add(self, item) -> None:
        self._items.append(item)
        if self._ended is not None:
            self._ended.set()                  # (the drain under way starts it)
        elif not self._running:
            self._running = True
            self._spawn(self.drain())

    async def drain(self) -> None:
        """Write everything queued (and what is added meanwhile); with a
        drain already under way, wait for that one to end."""
        while self._ended is not None:
            await self._idle.wait()
        self._running = True
        self._idle.clear()
        ended = self._ended = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            while self._items or self._busy:
                self._start(loop)
                ended.clear()
                if self._items or self._busy:
                    await ended.wait()
        finally:
            self._running = False
            self._ended = None
            self._idle.set()

    def _start(self, loop) -> None:
        """Start the queued writes whose keys are free, from the front, up to
        ``parallel`` under way (a write passed over holds its key's later
        ones back: its key is busy)."""
        items, busy, key = self._items, self._busy, self._key
        if not items or len(busy) >= self._parallel:
            return
        passed = []
        while items and len(busy) < self._parallel and len(passed) < 4 * self._parallel:
            item = items.popleft()
            k = key(item)
            if k in busy:
                passed.append(item)
            else:
                busy.add(k)
                task = loop.create_task(self._one(item, k))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        items.extendleft(reversed(passed))

    async def _one(self, item, k) -> None:
        """Write ``item``, again with backoff until it succeeds."""
        delay = 0.0
        try:
            while True:
                try:
                    await self._write(item)
                    return
                except Exception as exc:     # kept and retried: the backend comes back
                    if self._stopping():
                        log.warning("%s not written at stop (%d left): %s",
                                    self._label(item), len(self._items) + 1, exc)
                        self._items.clear()
                        return
                    delay = backoff(delay)
                    log.warning("%s failed (%s); retrying in %g s", self._label(item), exc,
                                delay)
                    await asyncio.sleep(delay)
        finally:
            self._busy.discard(k)
            if self._ended is not None:
                self._ended.set()
