"""A weak network link between terminals and a server, in userspace.

The kernel here has no netem, so the tests that need a store's weak link put
this proxy between a terminal and the server: every connection made to
``Link.address`` is relayed to the target over real loopback sockets, with

* ``rate``: bytes per second from the server to the terminal (0: no limit;
  the terminal's direction, acks and requests, is never limited);
* ``delay``: one-way latency of every byte, both directions;
* ``queue``: bytes the link holds on the way down, counted until they
  arrive (so it also caps the rate at ``queue / delay``); past it the proxy
  stops reading from the server, whose socket then fills as behind a real
  link (the proxy's own receive buffers are kept small for the same reason);
* ``blackhole()``: the path goes silent (a NAT entry timed out, a 4G cell
  dropped): both sockets stay open, nothing more passes either way, new
  connections get nowhere, and nobody is told.  The proxy stops reading, so
  what each side sends piles up in its own socket, as when its segments go
  unacknowledged; each side learns of the loss only from its own timeouts.

An end of stream is passed on as a half-close and a reset as a reset, as
TCP does.  ``close()`` ends every connection and raises the first
unexpected error a relay met.
"""

from __future__ import annotations

import asyncio
import socket
import struct

from tillwire.client.connection import connected_socket

_READ = 4096
_UP_QUEUE = 65536


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (RST), not an orderly end (FIN)."""
    sock = writer.transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class Link:
    def __init__(self, target: tuple[str, int], *, rate: float = 0.0, delay: float = 0.0,
                 queue: int = 16384) -> None:
        self.target = target
        self.rate = rate
        self.delay = delay
        self.queue = queue
        self.silent = False
        self._closed = False
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._errors: list[BaseException] = []

    async def start(self) -> "Link":
        self._server = await asyncio.start_server(
            lambda r, w: self.spawn(self._relay(r, w)), "127.0.0.1", 0, limit=_READ)
        return self

    @property
    def address(self) -> tuple[str, int]:
        return self._server.sockets[0].getsockname()[:2]

    def blackhole(self) -> None:
        """From now on nothing passes, and no connection is closed."""
        self.silent = True
        for w in self._writers:
            w.transport.pause_reading()

    async def close(self) -> None:
        self._closed = True
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._errors:
            raise self._errors[0]

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, OSError):     # (resets are the network's)
            self._errors.append(exc)

    async def _hang(self) -> None:
        """Wait until the link is closed (a silent link never reads again)."""
        await asyncio.get_running_loop().create_future()

    async def _relay(self, t_reader: asyncio.StreamReader, t_writer: asyncio.StreamWriter) -> None:
        self._writers.add(t_writer)
        if self.silent:
            t_writer.transport.pause_reading()
            await self._hang()
        sock = None
        try:
            sock = await connected_socket(*self.target, rcvbuf=_READ)
            s_reader, s_writer = await asyncio.open_connection(sock=sock, limit=_READ)
        except BaseException as exc:
            if sock is not None:
                sock.close()
            t_writer.transport.abort()
            self._writers.discard(t_writer)
            if isinstance(exc, OSError):
                return
            raise
        self._writers.add(s_writer)
        if self._closed or self.silent:
            await self._hang()
        try:
            await asyncio.gather(self._pump(t_reader, s_writer, t_writer, 0.0, _UP_QUEUE),
                                 self._pump(s_reader, t_writer, s_writer, self.rate, self.queue))
        finally:
            for w in (t_writer, s_writer):
                w.close()
                self._writers.discard(w)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    source: asyncio.StreamWriter, rate: float, limit: int) -> None:
        """One direction, from ``reader`` (the transport of ``source``) to
        ``writer``: at most ``limit`` bytes in the link, each chunk sent at
        ``rate`` (0: at once) and arriving ``delay`` after it was sent."""
        loop = asyncio.get_running_loop()
        held: asyncio.Queue = asyncio.Queue()
        room = asyncio.Condition()
        queued = 0

        async def deliver() -> None:
            nonlocal queued
            free_at = loop.time()           # when the link has sent what it holds
            while True:
                due, data = await held.get()
                if data is None or data is ConnectionResetError:
                    break
                if rate:
                    free_at = max(free_at, due - self.delay) + len(data) / rate
                    due = max(due, free_at + self.delay)
                await asyncio.sleep(max(0.0, due - loop.time()))
                async with room:
                    queued -= len(data)
                    room.notify_all()
                if self.silent:
                    await self._hang()
                if writer.transport.is_closing():
                    return                  # the far side is gone (reset)
                writer.write(data)
                await writer.drain()
            if self.silent:
                await self._hang()
            if writer.transport.is_closing():
                return
            if data is None and writer.can_write_eof():
                writer.write_eof()          # the half-close, after what came before it
            else:
                reset(writer)

        sender = self.spawn(deliver())
        end = None
        try:
            while True:
                async with room:
                    await room.wait_for(lambda: queued < limit)
                if self.silent:
                    await self._hang()
                data = await reader.read(min(_READ, limit - queued))
                if not data:
                    break
                queued += len(data)
                held.put_nowait((loop.time() + self.delay, data))
        except ConnectionError:
            end = ConnectionResetError
        finally:
            held.put_nowait((0.0, end))
        try:
            await sender
        except ConnectionError:
            reset(source)                   # the far side is gone: reset this one too
