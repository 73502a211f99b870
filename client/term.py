"""``tillwire term``: an interactive terminal simulator for people trying Tillwire.

It connects with a token through the SDK (reconnects, resume state), prints
every incoming message with its lane in colour, and reads commands from
stdin::

    ack                      acknowledge everything shown (unless --auto-ack)
    ticket CODE [TEXT]       open a cashier ticket for this store's staff
    reply TICKET TILL TEXT   answer a ticket (staff)
    chat CONV TEXT           a customer-service chat message (to service)
    send KIND ADDRESS JSON   any message, e.g. send order.event store:acme/s1 {...}
    history NAME [P2|P3|P1]  a channel's history or snapshot (P1: a chat)
    read ID                  send a read receipt for message ID
    help | quit
"""

from __future__ import annotations

import asyncio
import shlex
import sys

import orjson

from ..core.codes import Lane
from .connection import SendError
from .sdk import ClientClosed, Message, connect

COLOURS = {Lane.P0: "\033[1;31m", Lane.P1: "\033[33m", Lane.P2: "\033[36m",
           Lane.P3: "\033[35m"}
RESET = "\033[0m"


class Term:
    def __init__(self, out=sys.stdout, colour: bool = True) -> None:
        self.out = out
        self.colour = colour
        self.pending: list[Message] = []
        self.client = None

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def show(self, msg: Message) -> None:
        lane = f"P{msg.lane}"
        where = msg.channel or "inbox"
        flags = " (retransmitted: maybe seen before)" if msg.duplicate else ""
        body = msg.payload.decode("utf-8", "replace")
        line = f"[{lane}] {msg.kind} via {where} seq={msg.seq} id={msg.id}{flags}: {body}"
        if self.colour:
            line = COLOURS.get(msg.lane, "") + line + RESET
        self.say(line)

    async def receiver(self, auto_ack: bool) -> None:
        client = self.client
        try:
            while True:
                msg = await client.receive()
                self.show(msg)
                if msg.channel is None and not auto_ack:
                    self.pending.append(msg)
        except ClientClosed as exc:
            self.say(f"-- disconnected: {exc}")

    async def command(self, line: str) -> bool:
        """Run one command; False to quit."""
        try:
            words = shlex.split(line)
        except ValueError as exc:
            self.say(f"!! {exc}")
            return True
        if not words:
            return True
        cmd, args = words[0].lower(), words[1:]
        info = self.client.info
        tenant, store = info.get("tenant", ""), info.get("store", "")
        try:
            if cmd in ("quit", "exit"):
                return False
            if cmd == "help":
                self.say(__doc__.split("::", 1)[1].rstrip())
            elif cmd == "ack":
                for msg in self.pending:
                    await msg.ack()
                self.say(f"-- acked {len(self.pending)}")
                self.pending.clear()
            elif cmd == "ticket" and args:
                body = {"code": args[0], **({"text": " ".join(args[1:])} if args[1:] else {})}
                ack = await self.client.send("ticket.open", body, f"role:{tenant}/{store}/staff")
                self.say(f"-- ticket sent as message {ack.msg_id}")
            elif cmd == "reply" and len(args) >= 3:
                ack = await self.client.send(
                    "ticket.reply", {"ticket": args[0], "text": " ".join(args[2:])},
                    f"terminal:{tenant}/{args[1]}")
                self.say(f"-- reply sent as message {ack.msg_id}")
            elif cmd == "chat" and len(args) >= 2:
                ack = await self.client.send(
                    "chat.message", {"conversation": args[0], "text": " ".join(args[1:])},
                    f"role:{tenant}/*/service", receipt=True)
                self.say(f"-- chat sent as message {ack.msg_id}")
            elif cmd == "send" and len(args) == 3:
                ack = await self.client.send(args[0], orjson.loads(args[2]), args[1])
                self.say(f"-- accepted: id {ack.msg_id} {ack.payload.decode() or ''}")
            elif cmd == "history" and args:
                lane = int(args[1][1]) if len(args) > 1 else Lane.P2
                items, end = await self.client.history(args[0], lane)
                for item in items:
                    self.say(f"   #{item.offset} {item.kind}: {item.payload.decode()}")
                self.say(f"-- {end.count} items")
            elif cmd == "read" and args:
                self.client.conn.read(int(args[0]))
                self.say("-- read receipt sent")
            else:
                self.say("!! unknown command (help lists them)")
        except SendError as exc:
            self.say(f"!! refused: {exc}")
        except (orjson.JSONDecodeError, ValueError) as exc:
            self.say(f"!! {exc}")
        except asyncio.TimeoutError:
            self.say("!! no answer from the server in time")
        return True


async def run(host: str, port: int, token: str, *, state_path: str | None, auto_ack: bool,
              colour: bool, ssl=None) -> int:
    term = Term(colour=colour)
    try:
        term.client = await connect(host, port, token=token, state_path=state_path,
                                    auto_ack=auto_ack, ssl=ssl)
    except ClientClosed as exc:
        term.say(f"!! refused: {exc}")
        return 1
    info = term.client.info
    term.say(f"-- connected as {info.get('terminal')} roles {','.join(info.get('roles', []))} "
             f"(node {info.get('node')}); type help")
    receiver = asyncio.ensure_future(term.receiver(auto_ack))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while True:
            line = await reader.readline()
            if not line or not await term.command(line.decode().strip()):
                break
    finally:
        receiver.cancel()
        await term.client.close()
    return 0
