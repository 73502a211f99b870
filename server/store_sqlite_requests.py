"""How the event loop and the SQLite store's workers hand each other work.

A request is a tuple ``(op, args, future, weight)`` put on a worker's
``queue.SimpleQueue`` (never blocks; the writer process's handle takes the
same call, see store_writer.py); results come back to the loop as a list of
``(future, result, exception)`` in ONE ``loop.call_soon_threadsafe`` per
batch.  :class:`Requests` is the loop's side, shared by the store and its
records, terminals and archive, so all four queue on the same writer (one
transaction order, one group commit) and the same reader.
"""

from __future__ import annotations

import asyncio

STOP = object()
"""The ``op`` of the request that stops a worker (after what was queued before it)."""


def post(loop: asyncio.AbstractEventLoop | None, done: list) -> None:
    """Hand a batch of (future, result, exception) to the loop in one call."""
    if not done or loop is None:
        return
    try:
        loop.call_soon_threadsafe(settle, done)
    except RuntimeError:           # the loop is closed: nobody is waiting any more
        pass


def settle(done: list) -> None:
    """Resolve each (future, result, exception) of ``done`` (on the loop)."""
    for fut, result, exc in done:
        if fut is None or fut.done():
            continue
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)


class Requests:
    """The loop's way into one SQLite store's writer and reader (all on the loop).

    ``writer`` is a :class:`~tillwire.server.store_sqlite_writer.Writer` (a
    thread) or a :class:`~tillwire.server.store_writer.WriterProcess`; both
    take ``submit(name, args, future, weight)``.  ``reader`` is a
    :class:`~tillwire.server.store_sqlite_reader.Reader`.  ``state`` is the
    store's: new -> open -> closing -> closed (the store sets it).
    Arguments cross to another thread or process: callers must not mutate
    them after the call.
    """

    __slots__ = ("writer", "reader", "loop", "state")

    def __init__(self, writer, reader) -> None:
        self.writer = writer
        self.reader = reader
        self.loop: asyncio.AbstractEventLoop | None = None
        self.state = "new"

    def check_open(self) -> asyncio.AbstractEventLoop:
        """The loop, or RuntimeError when the store is not open."""
        if self.state != "open":
            raise RuntimeError(f"SQLiteStore: the store is {self.state}, not open")
        return self.loop

    def write(self, op: str, args: tuple, weight: int = 1, fut=None):
        """Queue the writer's request ``op`` (a Writer method name) with
        ``args``; ``fut`` (a new future unless a Completion is given) is
        settled on the loop after COMMIT.  ``weight``: how many items it
        carries (the writer commits past a total weight)."""
        loop = self.check_open()
        if fut is None:
            fut = loop.create_future()
        self.writer.submit(op, args, fut, weight)
        return fut

    def send(self, op: str, args: tuple) -> None:
        """Queue a write nobody waits for (a stream append): queued also before
        the store opens, dropped once it is closing (best effort by design)."""
        if self.state in ("closed", "closing"):
            return
        self.writer.submit(op, args, None, 1)

    def read(self, op: str, args: tuple) -> asyncio.Future:
        """Queue the reader's query ``op`` (a Reader method name) with ``args``."""
        fut = self.check_open().create_future()
        self.reader.queue.put((getattr(self.reader, op), args, fut, 1))
        return fut
