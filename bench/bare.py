"""The floor under ``python -m bench fanout``'s latency: a bare uvloop fan-out
server, measured with the same terminals in the same run.

``python -m bench.bare PORT`` serves the least of the protocol the
``subscribers`` and ``publisher`` workers need: any HELLO gets a WELCOME, and
each SEND is encoded once as a BROADCAST and written to every other
connection, one ``transport.write`` each, in the loop iteration that read
it.  No auth, lanes, session state, channels or history: what is left is the
kernel's cost of 10,000 loopback writes and the terminals' cost of reading
them, on this machine at this moment.  The fan-out benchmark reports its own
latency against this one (``fanout_p99_vs_bare``), a ratio that the
machine's changing speed affects less than the absolute figures.

Stops by itself when its stdin closes (the orchestrator went away).
"""

from __future__ import annotations

import asyncio
import sys
import time

import uvloop

from tillwire.core.codec import Decoder, Encoder, Frame
from tillwire.core.codes import FrameType

_HELLO = FrameType.HELLO
_SEND = FrameType.SEND


class BareFanout(asyncio.Protocol):
    conns: set = set()
    encoder = Encoder()
    channel_offset = 0

    def __init__(self) -> None:
        self.decoder = Decoder()
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for f in self.decoder.feed(data):
            if f.type == _HELLO:
                self.transport.write(self.encoder.encode(Frame(
                    FrameType.WELCOME, version=1, heartbeat=f.heartbeat,
                    time=int(time.time() * 1000), max_frame=1 << 20, epoch=1)))
                self.conns.add(self)
            elif f.type == _SEND:
                cls = type(self)
                cls.channel_offset += 1
                frame = self.encoder.encode_broadcast(f.flags & 3, 0, 1, cls.channel_offset,
                                                      f.kind, f.payload)
                for conn in self.conns:
                    if conn is not self:
                        conn.transport.write(frame)

    def connection_lost(self, exc) -> None:
        self.conns.discard(self)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(BareFanout, "127.0.0.1", port, backlog=4096)
    print("ready", flush=True)
    # The orchestrator closes our stdin (or dies): stop.
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


def main() -> None:
    uvloop.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
