"""``tillwire term``: an interactive terminal simulator for people trying Tillwire.

It connects with a token through the SDK (reconnects, resume state), prints
every incoming message with its lane in colour, says when the session drops
and comes back, and reads commands from stdin (one per line; TEXT is the
rest of the line, taken as typed)::

    ack                        acknowledge every message shown (unless --auto-ack)
    ticket CODE [TEXT]         open a cashier ticket for this store's staff
    assign TICKET [TERMINAL]   take a ticket shown here (staff), or hand it to TERMINAL
    reply TICKET TEXT          answer a ticket (staff; or the till that opened it)
    resolve TICKET TEXT        resolve a ticket with TEXT as its resolution (staff)
    tickets                    the tickets this terminal has seen or opened
    chat CONV TEXT             a customer-service chat message (customers start one)
    send KIND ADDRESS JSON     any message; JSON is the rest of the line, spaces and all:
                               send order.event store:acme/s1 {"order": "o-1", "channel": "app", "event": "ready"}
    history NAME [P2|P3|P1]    a channel's history or snapshot (P1: a chat)
    read ID                    send a read receipt for message ID
    help | quit
"""

from __future__ import annotations

import asyncio
import sys

import orjson

from ..core.codes import Lane
from .connection import SendError
from .sdk import FATAL_CODES, ClientClosed, ConnectFailed, Message, Refused, connect

COLOURS = {Lane.P0: "\033[1;31m", Lane.P1: "\033[33m", Lane.P2: "\033[36m",
           Lane.P3: "\033[35m"}
RESET = "\033[0m"

CONNECT_TIMEOUT = 5.0
"""Seconds term waits for a WELCOME after connecting (a person is watching)."""

TICKET_KINDS = ("ticket.open", "ticket.escalate", "ticket.assign", "ticket.reply",
                "ticket.resolve")


class Term:
    def __init__(self, out=sys.stdout, colour: bool = True) -> None:
        self.out = out
        self.colour = colour
        self.pending: list[Message] = []
        self.client = None
        self.sessions = 0
        # ticket id -> the address its updates go to (the opener's for staff,
        # the store's staff for the opener); filled from what arrives and
        # from this terminal's own ticket.open answers.
        self.tickets: dict[str, str] = {}

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
        if msg.kind in TICKET_KINDS:
            self._note_ticket(msg)

    def _note_ticket(self, msg: Message) -> None:
        try:
            body = msg.body
        except orjson.JSONDecodeError:
            return
        tid, opener = body.get("ticket"), body.get("from")
        if isinstance(tid, str) and isinstance(opener, str) and tid not in self.tickets:
            self.tickets[tid] = opener

    # -- the session's life (SDK callbacks) ------------------------------------------

    def on_connected(self, info: dict) -> None:
        self.sessions += 1
        if self.sessions == 1:
            self.say(f"-- connected as {info.get('terminal')} roles "
                     f"{','.join(info.get('roles', []))} (node {info.get('node')}); type help")
        else:
            self.say(f"-- reconnected (node {info.get('node')})")

    def on_disconnected(self, code, reason: str) -> None:
        then = "" if code in FATAL_CODES else "; reconnecting"
        self.say(f"-- disconnected: {code.name}: {reason}{then}")

    async def receiver(self, auto_ack: bool) -> int:
        """Show what arrives until the session ends for good; the exit code."""
        client = self.client
        try:
            while True:
                msg = await client.receive()
                self.show(msg)
                if msg.channel is None and not auto_ack:
                    self.pending.append(msg)
        except ClientClosed as exc:
            if type(exc) is ClientClosed:
                return 0
            self.say(f"!! the session ended for good: {exc}")
            return 1

    # -- commands ---------------------------------------------------------------------

    def _ticket_address(self, tid: str) -> str:
        try:
            return self.tickets[tid]
        except KeyError:
            raise ValueError(f"ticket {tid} has not been shown here (tickets lists them)") from None

    async def command(self, line: str) -> bool:
        """Run one command; False to quit."""
        cmd, _, rest = line.strip().partition(" ")
        cmd, rest = cmd.lower(), rest.strip()
        args = rest.split()
        if not cmd:
            return True
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
                self._say_ticket_opened(ack, f"role:{tenant}/{store}/staff")
            elif cmd == "assign" and 1 <= len(args) <= 2:
                body = {"ticket": args[0], **({"assignee": args[1]} if len(args) == 2 else {})}
                ack = await self.client.send("ticket.assign", body, self._ticket_address(args[0]))
                self.say(f"-- ticket {args[0]} assigned to {body.get('assignee', 'me')} "
                         f"(message {ack.msg_id})")
            elif cmd in ("reply", "resolve") and len(args) >= 2:
                key = "text" if cmd == "reply" else "resolution"
                ack = await self.client.send(f"ticket.{cmd}",
                                             {"ticket": args[0], key: " ".join(args[1:])},
                                             self._ticket_address(args[0]))
                done = "resolved" if cmd == "resolve" else "reply sent"
                self.say(f"-- ticket {args[0]} {done} (message {ack.msg_id})")
            elif cmd == "tickets":
                for tid, to in self.tickets.items():
                    self.say(f"   {tid}  updates go to {to}")
                self.say(f"-- {len(self.tickets)} tickets")
            elif cmd == "chat" and len(args) >= 2:
                ack = await self.client.send(
                    "chat.message", {"conversation": args[0], "text": " ".join(args[1:])},
                    f"role:{tenant}/*/service", receipt=True)
                self.say(f"-- chat sent as message {ack.msg_id}")
            elif cmd == "send" and len(rest.split(None, 2)) == 3:
                kind, to, text = rest.split(None, 2)
                if len(text) >= 2 and text[0] == text[-1] == "'":
                    text = text[1:-1]        # pasted as in a shell: '{"a": 1}'
                try:
                    body = orjson.loads(text)
                except orjson.JSONDecodeError as exc:
                    raise ValueError(f"send: the body is not JSON ({exc})") from None
                ack = await self.client.send(kind, body, to)
                self.say(f"-- accepted: id {ack.msg_id} {ack.payload.decode() or ''}")
            elif cmd == "history" and 1 <= len(args) <= 2:
                if len(args) == 2 and args[1].upper() not in ("P1", "P2", "P3"):
                    raise ValueError("history: the lane is P1, P2 or P3")
                lane = int(args[1][1]) if len(args) > 1 else Lane.P2
                items, end = await self.client.history(args[0], lane)
                for item in items:
                    self.say(f"   #{item.offset} {item.kind}: {item.payload.decode()}")
                self.say(f"-- {end.count} items")
            elif cmd == "read" and len(args) == 1 and args[0].isdigit():
                conn = self.client.conn
                if conn is None or not conn.is_open:
                    raise ValueError("read: not connected just now")
                conn.read(int(args[0]))
                self.say("-- read receipt sent")
            else:
                self.say(f"!! unknown command or wrong arguments: {line.strip()!r} "
                         "(help lists them)")
        except SendError as exc:
            self.say(f"!! refused: {exc}")
        except ClientClosed as exc:
            self.say(f"!! not sent: {exc}")
        except ValueError as exc:
            self.say(f"!! {exc}")
        except asyncio.TimeoutError:
            self.say("!! no answer from the server in time")
        return True

    def _say_ticket_opened(self, ack, staff: str) -> None:
        try:
            answer = orjson.loads(ack.payload) if ack.payload else {}
        except orjson.JSONDecodeError:
            answer = {}
        tid = answer.get("ticket")
        if not tid:
            self.say(f"-- ticket sent as message {ack.msg_id}")
            return
        self.tickets[tid] = staff
        if answer.get("auto_reply"):
            self.say(f"-- ticket {tid} answered at once (auto reply follows)")
        else:
            self.say(f"-- ticket {tid} opened: sent to {answer.get('recipients', '?')} staff "
                     f"(message {ack.msg_id})")


async def run(host: str, port: int, token: str, *, state_path: str | None, auto_ack: bool,
              colour: bool, ssl=None, err=sys.stderr) -> int:
    """Run the simulator until quit, end of input or the session ending for good.

    A first connection that fails (nothing listening, TLS trouble, a refused
    token) is one line on ``err`` and exit code 1, within ``CONNECT_TIMEOUT``."""
    term = Term(colour=colour)
    try:
        term.client = await connect(host, port, token=token, state_path=state_path,
                                    auto_ack=auto_ack, ssl=ssl, connect_timeout=CONNECT_TIMEOUT,
                                    first_attempts=1, on_connected=term.on_connected,
                                    on_disconnected=term.on_disconnected,
                                    backoff_base=0.25, backoff_max=5.0)
    except Refused as exc:
        print(f"tillwire term: refused by {host}:{port}: {exc}", file=err)
        return 1
    except ConnectFailed as exc:
        # (no WELCOME in time is what a TLS port spoken to in plaintext looks like)
        hint = "; give --tls-ca FILE for a TLS port" if ssl is None and "WELCOME" in exc.reason else ""
        print(f"tillwire term: {exc}{hint}", file=err)
        return 1
    receiver = asyncio.ensure_future(term.receiver(auto_ack))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands() -> int:
        while True:
            line = await reader.readline()
            if not line or not await term.command(line.decode("utf-8", "replace")):
                return 0

    typing = asyncio.ensure_future(commands())
    try:
        done, _ = await asyncio.wait([receiver, typing], return_when=asyncio.FIRST_COMPLETED)
        code = receiver.result() if receiver in done else typing.result()
    finally:
        typing.cancel()
        receiver.cancel()
        await term.client.close()
    return code
