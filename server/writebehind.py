"""Records written to the store behind the services' back, kept until written.

Tickets, chat and offers change their state in memory and write records of
it later: :class:`WriteBehind` is that "later" for all three.  A service
says *what* is due (``put(key, value)``) and *how* one record is written
(its ``write(key, value)`` coroutine); this class owns *when*:

* a key is due from its ``put`` until a write of it succeeded with no
  ``put`` of the same key since (a write that raised, or was cancelled,
  keeps it due: nothing is dropped unwritten);
* one writer task at a time (``host.spawn``), started ``delay`` seconds
  after a put; a pass writes its keys concurrently (the store's group
  commit gathers them), and one pass runs at a time (the writer's, a
  maintenance round's :meth:`write_due`, stop's :meth:`flush`), so writes
  of one key never overlap and an older value never lands after a newer one;
* a pass that failed sets a retry with capped exponential backoff
  (``retry``, doubled per failed pass, at most ``retry_max``); keys put in
  the meantime are still written after ``delay`` (each is tried once, so a
  caller waiting in :meth:`written` is answered promptly), the failed ones
  wait for the backoff; a pass with no failure retries the rest at once
  (the store works again);
* once ``host.stopping`` nothing is scheduled; :meth:`flush` (at stop)
  writes everything due and raises if the store refuses any.

Cost: a put is a dict store and a set add (the offer policy puts on its
hot path); a pass holds one task and one future per write.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from .host import ServiceHost

log = logging.getLogger("tillwire.writebehind")


class WriteBehind:
    """Keys due to be written to the store, and the one task that writes them."""

    def __init__(self, host: ServiceHost, write: Callable[[Any, Any], Awaitable[None]], *,
                 delay: float = 0.0, retry: float = 1.0, retry_max: float = 30.0,
                 what: str = "records") -> None:
        """``write(key, value)`` stores one record (raises: it stays due);
        ``value`` is what :meth:`put` was given.  ``what`` names the records
        in the log."""
        self._host = host
        self._write_one = write
        self._delay = delay
        self._retry = retry
        self._retry_max = retry_max
        self._what = what
        self._generation = 0      # bumped by every put: a write clears only its own
        self._due: dict[Hashable, tuple[int, Any]] = {}   # key -> (generation, value)
        # Keys put since their last attempt (a subset of _due): written after
        # ``delay`` even while the others wait for their backoff.
        self._fresh: set = set()
        self._failures = 0         # consecutive passes with a refused write
        self._retry_at = 0.0       # loop time the refused keys are tried again
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at = 0.0
        self._soon = False         # the armed pass comes within ``delay``: a put arms nothing
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()       # one pass at a time (writer, write_due, flush)
        self._waiters: dict[Hashable, list[tuple[int, asyncio.Future]]] = {}

    def __contains__(self, key) -> bool:
        return key in self._due

    def __len__(self) -> int:
        return len(self._due)

    def get(self, key, default=None):
        """The value due for ``key`` (not written yet), else ``default``."""
        entry = self._due.get(key)
        return default if entry is None else entry[1]

    def items(self) -> list[tuple[Any, Any]]:
        """The (key, value) pairs due, a snapshot."""
        return [(key, value) for key, (_, value) in self._due.items()]

    def put(self, key, value=None) -> None:
        """Make ``key`` due with ``value`` (None for writers that write the
        key's current state); replaces what was due for it."""
        self._generation += 1
        self._due[key] = (self._generation, value)
        self._fresh.add(key)
        if self._task is None and not self._soon:
            self._schedule()

    def discard(self, key) -> None:
        """``key`` is no longer due (its data was deleted); a write in progress
        finishes, and whoever waits for it is answered."""
        self._due.pop(key, None)
        self._fresh.discard(key)
        self._wake(key, self._generation)

    async def written(self, key) -> None:
        """Return once the writer tried ``key`` as it is now (whatever came of
        it: a refused write stays due and is retried).  Returns at once if
        nothing is due for it, or the host is stopping (then :meth:`flush`
        writes it)."""
        entry = self._due.get(key)
        if entry is None or self._host.stopping:
            return
        fut = self._host.loop.create_future()
        self._waiters.setdefault(key, []).append((entry[0], fut))
        await fut

    async def write_due(self) -> None:
        """Try every due key now (a maintenance round); a refusal is logged and
        the key stays due."""
        await self._pass(list(self._due))
        self._schedule()

    async def flush(self) -> None:
        """Write everything due now (at stop: the store is still open);
        raises the store's exception if it refused any (they stay due)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._soon = False
        failed = await self._pass(list(self._due))
        self._schedule()
        if failed is not None:
            raise failed

    # -- the writer --------------------------------------------------------------------

    def _schedule(self) -> None:
        """Arm the next pass: ``delay`` after now for fresh keys, else at the
        retry time; nothing while a pass runs (it arms the next as it ends)
        or once the host stops."""
        if self._task is not None or not self._due or self._host.stopping:
            return
        loop = self._host.loop
        at = loop.time() + self._delay if self._fresh else self._retry_at
        self._soon = bool(self._fresh)
        if self._handle is not None:
            if self._handle_at <= at:
                return
            self._handle.cancel()
        self._handle_at = at
        self._handle = loop.call_at(at, self._on_due)

    def _on_due(self) -> None:
        self._handle = None
        self._soon = False
        if self._host.stopping:
            # (stop's flush writes them; nobody is left waiting till then)
            for key in list(self._waiters):
                self._wake(key, self._generation)
            return
        self._task = self._host.spawn(self._run())

    async def _run(self) -> None:
        try:
            # Fresh keys alone until the refused ones' retry is due (a pass armed
            # for the retry has no fresh keys: timers may fire a little early).
            if self._fresh and self._host.loop.time() < self._retry_at:
                keys = list(self._fresh)
            else:
                keys = list(self._due)
            await self._pass(keys)
        finally:
            self._task = None
            self._schedule()

    async def _pass(self, keys: list) -> BaseException | None:
        """Write ``keys`` concurrently; returns the first refusal (None: all written)."""
        async with self._lock:
            batch = [(key, self._due[key]) for key in keys if key in self._due]
            if not batch:
                return None
            self._fresh.difference_update(key for key, _ in batch)
            results = await asyncio.gather(
                *(self._write_one(key, value) for key, (_, value) in batch),
                return_exceptions=True)
            failed = None
            for (key, (generation, _)), result in zip(batch, results):
                if isinstance(result, BaseException):
                    failed = failed or result
                else:
                    entry = self._due.get(key)
                    if entry is not None and entry[0] == generation:
                        del self._due[key]
                self._wake(key, generation)
            if failed is None:
                # The store works (again): whatever a refusal left due is tried now.
                self._failures = 0
                self._retry_at = 0.0
                return None
            self._failures += 1
            backoff = min(self._retry * 2 ** (self._failures - 1), self._retry_max)
            self._retry_at = self._host.loop.time() + backoff
            log.error("%s not written (%d due, tried again in %.1f s): %s", self._what,
                      len(self._due), backoff, failed)
            return failed

    def _wake(self, key, generation: int) -> None:
        """Answer the waiters for ``key`` whose value was tried (generation up to
        ``generation``)."""
        waiters = self._waiters.get(key)
        if not waiters:
            return
        later = []
        for wanted, fut in waiters:
            if wanted > generation:
                later.append((wanted, fut))
            elif not fut.done():
                fut.set_result(None)
        if later:
            self._waiters[key] = later
        else:
            del self._waiters[key]
