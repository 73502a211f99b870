"""The weak-link proxy the end-to-end tests rely on (tests/linkem.py) does
what it says: relays both ways, paces the way down, passes ends and resets
on, and goes silent on a black hole."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from linkem import Link, reset
from support import aiotest


class Peer:
    """A server that keeps every connection's reader and writer (a dropped
    StreamWriter closes its connection), and the test's own connections."""

    def __init__(self) -> None:
        self.accepted: asyncio.Queue = asyncio.Queue()
        self.writers: list[asyncio.StreamWriter] = []
        self.server = None

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[:2]

    def _accept(self, reader, writer) -> None:
        self.writers.append(writer)
        self.accepted.put_nowait((reader, writer))

    async def connect(self, link: Link):
        reader, writer = await asyncio.open_connection(*link.address)
        self.writers.append(writer)
        return reader, writer

    def close(self) -> None:
        self.server.close()
        for w in self.writers:
            w.transport.abort()


@contextlib.asynccontextmanager
async def linked(**options):
    """A Link (with ``options``) to a Peer and one connection through it:
    yields the peer, the link, and the (reader, writer) of each end."""
    peer = Peer()
    link = Link(await peer.start(), **options)
    try:
        await link.start()
        near = await peer.connect(link)
        far = await asyncio.wait_for(peer.accepted.get(), 5)
        yield peer, link, near, far
    finally:
        await link.close()
        peer.close()


@aiotest()
async def test_relays_both_ways_and_passes_the_end_on():
    async with linked(delay=0.01) as (_, _, (reader, writer), (s_reader, s_writer)):
        writer.write(b"hello")
        assert await asyncio.wait_for(s_reader.readexactly(5), 5) == b"hello"
        s_writer.write(b"x" * 100_000)
        assert await asyncio.wait_for(reader.readexactly(100_000), 5) == b"x" * 100_000
        writer.write_eof()                  # a half-close reaches the server ...
        assert await asyncio.wait_for(s_reader.read(), 5) == b""
        s_writer.write(b"bye")              # ... which can still answer
        s_writer.close()
        assert await asyncio.wait_for(reader.read(), 5) == b"bye"


@aiotest()
async def test_paces_the_way_down_at_its_rate():
    async with linked(rate=200_000, queue=8192) as (_, _, (reader, _), (_, s_writer)):
        loop = asyncio.get_running_loop()
        started = loop.time()
        s_writer.write(b"y" * 100_000)
        await asyncio.wait_for(reader.readexactly(100_000), 10)
        # 100 kB at 200 kB/s cannot take less than half a second (a lower
        # bound only: a loaded machine may take longer).
        assert loop.time() - started >= 0.45


@aiotest()
async def test_a_reset_is_passed_on():
    async with linked() as (_, _, (_, writer), (s_reader, _)):
        reset(writer)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(s_reader.read(), 5)


@aiotest()
async def test_a_black_hole_passes_nothing_and_closes_nothing():
    async with linked() as (peer, link, (reader, writer), (s_reader, s_writer)):
        link.blackhole()
        writer.write(b"lost")
        s_writer.write(b"lost too")
        for r in (reader, s_reader):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(r.read(1), 0.3)
        assert not writer.transport.is_closing() and not s_writer.transport.is_closing()
        # A new connection through the silent link reaches nobody.
        await peer.connect(link)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(peer.accepted.get(), 0.3)
