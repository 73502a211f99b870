"""Floors under the benchmarks: bare uvloop servers, measured with the same
load generators in the same run.

``python -m bench.bare PORT`` (or ``PORT fanout``) is the floor under
``python -m bench fanout``'s latency.  It serves the least of the protocol
the ``subscribers`` and ``publisher`` workers need: any HELLO gets a
WELCOME, and each SEND is encoded once as a BROADCAST and written to every
other connection, one ``transport.write`` each, in the loop iteration that
read it.  No auth, lanes, session state, channels or history: what is left
is the kernel's cost of 10,000 loopback writes and the terminals' cost of
reading them, on this machine at this moment.  The fan-out benchmark
reports its own latency against this one (``fanout_p99_vs_bare``), a ratio
that the machine's changing speed affects less than the absolute figures.

``python -m bench.bare PORT relay`` is the floor under ``python -m bench
reliability``'s steady phase with the tills connected.  It moves the same
frames over the same sockets as Tillwire does for a payment result, and
nothing else: the payer's SEND is written to its till as a DELIVER (the
till is found by the terminal id of the token in its HELLO, read but not
verified), a SENDACK goes back to the payer at once, and the till's ACK is
read and dropped.  No store, no commit, no ack bookkeeping, no retransmit
timer.  What is left is the sockets' cost (one write to a till and one ACK
read back per result) and the load generators' own.

Both stop by themselves when their stdin closes (the orchestrator went away).
"""

from __future__ import annotations

import asyncio
import base64
import sys
import time

import orjson
import uvloop

from tillwire.core.codec import Decoder, Encoder, Frame
from tillwire.core.codes import Flag, FrameType

_HELLO = FrameType.HELLO
_SEND = FrameType.SEND
_ACK_REQUESTED = int(Flag.ACK_REQUESTED)
_SENDACK_PAYLOAD = b'{"recipients":1}'


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


def _terminal_address(token: str) -> str:
    """``terminal:<tenant>/<terminal>`` of a tillwire token, read without
    checking its signature (a floor, not a server)."""
    payload = token.split(".")[1]
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return f"terminal:{claims['ten']}/{claims['tid']}"


class BareRelay(asyncio.Protocol):
    terminals: dict = {}       # terminal address -> its connection
    encoder = Encoder()

    def __init__(self) -> None:
        self.decoder = Decoder()
        self.transport = None
        self.address = None
        self.seq = [0, 0]        # the last inbox seq written, per lane

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        encoder = self.encoder
        acks = []
        for f in self.decoder.feed(data):
            t = f.type
            if t == _SEND:
                till = self.terminals.get(f.to)
                lane = f.flags & 3       # (the payer sends P0: inbox lanes only)
                if lane <= 1 and till is not None and till.transport is not None:
                    seq = till.seq[lane] = till.seq[lane] + 1
                    till.transport.write(encoder.encode_deliver(lane, 0, seq, seq, f.kind,
                                                                f.payload))
                if f.flags & _ACK_REQUESTED:
                    acks.append(encoder.encode_sendack(0, f.ref, f.ref, _SENDACK_PAYLOAD))
            elif t == _HELLO:
                try:
                    self.address = _terminal_address(f.token)
                except (ValueError, KeyError, IndexError):
                    self.transport.close()      # not a tillwire token
                    return
                self.terminals[self.address] = self
                self.transport.write(encoder.encode(Frame(
                    FrameType.WELCOME, version=1, heartbeat=f.heartbeat,
                    time=int(time.time() * 1000), max_frame=1 << 20, epoch=1)))
        if acks:
            self.transport.write(b"".join(acks))

    def connection_lost(self, exc) -> None:
        if self.terminals.get(self.address) is self:
            del self.terminals[self.address]
        self.transport = None


async def serve(port: int, mode: str = "fanout") -> None:
    loop = asyncio.get_running_loop()
    protocol = {"fanout": BareFanout, "relay": BareRelay}[mode]
    server = await loop.create_server(protocol, "127.0.0.1", port, backlog=4096)
    print("ready", flush=True)
    # The orchestrator closes our stdin (or dies): stop.
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


def main() -> None:
    uvloop.run(serve(int(sys.argv[1]), *sys.argv[2:3]))


if __name__ == "__main__":
    main()
