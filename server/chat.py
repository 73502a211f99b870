"""Customer-service chat: conversations between a customer app and agents.

``chat.message`` (P1, body ``{conversation, text and/or attachments}``) is
handed here by ``Node._on_send``.  A customer sends to ``role:<t>/*/service``
(or ``chat:<t>/<conversation>``): the first message creates the
conversation (its member is the token's member id, its customer the sending
terminal) and goes to every service agent; later ones go to the
conversation's agent once it has one.  A service agent sends to
``chat:<t>/<conversation>``: the message goes to the customer, and the
first agent to answer becomes the conversation's agent.  Nobody else may
post (``FORBIDDEN``).

Messages are stored and delivered like every P1 message (acks, receipts,
retransmits); the SENDACK comes once the message and its history record are
both kept.  Records (key-value namespaces, JSON):

* ``conv``, key ``<tenant>/<conversation>``: {conversation, tenant, member,
  customer, agent, created, updated}.  Every conversation is also held in
  memory (one small dict each), so routing a message costs no store read
  and two messages of a conversation are routed in the order they came.
* ``chat``, key ``<tenant>/<conversation>/<13-digit unix ms>-<msg id>``:
  {id, from, kind, body, ts}: the history HISTORY answers.

Retention: every maintenance round deletes records of both namespaces last
written more than ``retention.chat`` seconds ago.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson

from ..core.codes import Code, Flag, FrameType, Lane
from ..core.session import OPEN, Frame
from .address import AddressError, parse_address
from .kinds import MessageError
from .store import NewMessage

log = logging.getLogger("tillwire.chat")

CONV_NS = "conv"
CHAT_NS = "chat"
MAX_HISTORY = 1000          # messages one HISTORY answer carries at most
_RECEIPT_REQUESTED = int(Flag.RECEIPT_REQUESTED)


class Chat:
    """The chat service of one node."""

    def __init__(self, node) -> None:
        self.node = node
        self.retention = node.cfg.retention.chat
        self.convs: dict[str, dict] = {}          # "<tenant>/<conversation>" -> record

    async def load(self) -> None:
        after = ""
        horizon = time.time() - self.retention
        while True:
            rows = await self.node.store.kv_scan(CONV_NS, "", after, 1000)
            for key, value in rows:
                rec = orjson.loads(value)
                if rec.get("updated", 0.0) >= horizon:
                    self.convs[key] = rec
            if len(rows) < 1000:
                return
            after = rows[-1][0]

    def agents(self, tenant: str) -> list[str]:
        return self.node.registry.members(parse_address(f"role:{tenant}/*/service"))

    # -- messages ----------------------------------------------------------------------

    def on_message(self, conn, frame, address, body: dict) -> bool:
        """Route a chat.message (validated, allowed by the ACL); always consumes it."""
        node = self.node
        claims = conn.claims
        tenant = claims.tenant
        conv_id = body["conversation"]
        if address.scope == "chat":
            if address.path[0] != conv_id:
                raise MessageError(Code.BAD_MESSAGE,
                                   f"chat.message: body.conversation: {conv_id!r} is not the "
                                   f"conversation of {address}", "body.conversation")
        elif not (address.scope == "role" and address.path[1] == "service"):
            raise MessageError(Code.BAD_MESSAGE,
                               f"chat.message: to: {address}: chat goes to "
                               f"chat:{tenant}/<conversation> (or role:{tenant}/*/service "
                               "from a customer)", "to")
        key = f"{tenant}/{conv_id}"
        conv = self.convs.get(key)
        sender = conn.address
        roles = claims.roles
        now = time.time()
        if conv is None:
            if "customer" not in roles:
                if "service" in roles:
                    raise MessageError(Code.BAD_MESSAGE,
                                       f"chat.message: body.conversation: no conversation "
                                       f"{conv_id!r}", "body.conversation")
                raise MessageError(Code.FORBIDDEN, "chat.message: only customers start "
                                                   "conversations", "body.conversation")
            conv = {"conversation": conv_id, "tenant": tenant, "member": claims.member,
                    "customer": sender, "agent": "", "created": now, "updated": now}
            self.convs[key] = conv
            recipients = self.agents(tenant)
        elif sender == conv["customer"]:
            recipients = [conv["agent"]] if conv["agent"] else self.agents(tenant)
        elif "service" in roles:
            if not conv["agent"]:
                conv["agent"] = sender
            recipients = [conv["customer"]]
        else:
            raise MessageError(Code.FORBIDDEN, f"chat.message: conversation {conv_id!r} is "
                                               "not yours", "body.conversation")
        conv["updated"] = now
        # Who wrote it, stamped by the server (a "from" the client put in is
        # replaced): recipients and history readers see it in the body.
        body = {**body, "from": sender}
        ttl = frame.ttl / 1000.0 if frame.ttl else node.cfg.delivery.p1_ttl
        msg = NewMessage(tenant, sender, frame.ref, Lane.P1, "chat.message",
                         f"chat:{key}", orjson.dumps(body), now, now + ttl,
                         bool(frame.flags & _RECEIPT_REQUESTED))
        fut = node.loop.create_future()
        node.submit(msg, address, fut, recipients)
        node._spawn(self._keep(conn, frame.ref, key, conv, sender, body, now, fut))
        return True

    async def _keep(self, conn, ref: int, key: str, conv: dict, sender: str, body: dict,
                    now: float, fut) -> None:
        """Once stored: write the history record and the conversation, then SENDACK."""
        node = self.node
        store = node.store
        try:
            accepted = await fut
            if not accepted.duplicate:
                ms = int(now * 1000)
                record = orjson.dumps({"id": accepted.msg_id, "from": sender,
                                       "kind": "chat.message", "body": body, "ts": now})
                await asyncio.gather(
                    store.kv_put(CHAT_NS, f"{key}/{ms:013d}-{accepted.msg_id}", record, now),
                    store.kv_put(CONV_NS, key, orjson.dumps(conv), now))
        except Exception as exc:  # noqa: BLE001 - the store refused: nothing was promised
            log.error("chat message of %s could not be stored: %s", key, exc)
            node.service_error(conn, ref, Code.STORE_UNAVAILABLE,
                               "the message could not be stored; retry")
            return
        if accepted.duplicate:
            node.service_ack(conn, ref, accepted.msg_id, None, retransmit=True)
        else:
            node.service_ack(conn, ref, accepted.msg_id,
                             {"conversation": conv["conversation"],
                              "recipients": len(accepted.seqs)})

    # -- history -----------------------------------------------------------------------

    def on_history(self, conn, frame, address) -> None:
        """HISTORY of ``chat:<t>/<conversation>`` (lane P1): the conversation's customer
        or a service agent gets the newest ``count`` messages, oldest first."""
        claims = conn.claims
        if address.tenant != claims.tenant:
            raise AddressError(Code.BAD_ADDRESS, f"address {address}: another tenant's address")
        if frame.flags & 3 != Lane.P1:
            raise AddressError(Code.BAD_REQUEST, "HISTORY: conversations are read on lane P1")
        key = f"{address.tenant}/{address.path[0]}"
        conv = self.convs.get(key)
        agent = "service" in claims.roles
        if conv is None and agent:     # (others learn nothing about which ids exist)
            raise AddressError(Code.UNKNOWN_CHANNEL, f"HISTORY: no conversation {address}")
        if conv is None or (conn.address != conv["customer"] and not agent):
            raise AddressError(Code.FORBIDDEN,
                               f"HISTORY: {address} is not a conversation of this terminal")
        self.node._spawn(self._history(conn, frame.ref, key, frame.offset, frame.count))

    async def _history(self, conn, ref: int, key: str, offset: int, count: int) -> None:
        node = self.node
        count = min(count or MAX_HISTORY, MAX_HISTORY)
        prefix = key + "/"
        # offset > 0: messages after that time (unix ms), oldest first.
        after = f"{prefix}{offset:013d}-~" if offset else ""
        rows: list = []
        while True:
            page = await node.store.kv_scan(CHAT_NS, prefix, after, 1000)
            rows.extend(page)
            if offset and len(rows) >= count:
                break
            if len(page) < 1000:
                break
            after = page[-1][0]
        rows = rows[:count] if offset else rows[-count:]
        if conn.state != OPEN:
            return
        encode = node.encoder.encode
        last = 0
        for k, value in rows:
            rec = orjson.loads(value)
            last = int(k[len(prefix):].split("-", 1)[0])
            conn.control(encode(Frame(
                FrameType.HISTORY_ITEM, Lane.P1, orjson.dumps(rec["body"]), ref=ref,
                offset=last, msg_id=rec["id"], kind=rec["kind"])))
        conn.control(encode(Frame(
            FrameType.HISTORY_END, ref=ref, offset=last or offset, count=len(rows),
            code=Code.OK)))
        node.mark_dirty(conn)

    # -- personal data and retention ---------------------------------------------------

    async def forget_member(self, tenant: str, member: str) -> tuple[int, int]:
        """Delete a member's conversations and their messages: (conversations, messages)."""
        store = self.node.store
        keys = [k for k, c in self.convs.items()
                if c["tenant"] == tenant and c["member"] == member]
        # Also records not in memory (written by a node sharing the store).
        after = ""
        while True:
            rows = await store.kv_scan(CONV_NS, tenant + "/", after, 1000)
            for k, value in rows:
                if k not in self.convs and orjson.loads(value).get("member") == member:
                    keys.append(k)
            if len(rows) < 1000:
                break
            after = rows[-1][0]
        messages = 0
        for k in keys:
            self.convs.pop(k, None)
            messages += await store.kv_delete_prefix(CHAT_NS, k + "/")
            await store.kv_delete(CONV_NS, k)
        return len(keys), messages

    async def expire(self, now: float) -> tuple[int, int]:
        """Retention: delete what was last written before now - retention.chat."""
        horizon = now - self.retention
        for k in [k for k, c in self.convs.items() if c["updated"] < horizon]:
            del self.convs[k]
        store = self.node.store
        return (await store.kv_expire(CONV_NS, horizon),
                await store.kv_expire(CHAT_NS, horizon))
