"""Customer-service chat: conversations between a customer app and agents.

``chat.message`` (P1, body ``{conversation, text and/or attachments}``) is
handed here by ``Node._on_send``.  A customer sends to ``role:<t>/*/service``
(or ``chat:<t>/<conversation>``): the first message creates the
conversation (its member is the token's member id, its customer the sending
terminal) and goes to every service agent; later ones go to the
conversation's agent once it has one.  A service agent sends to
``chat:<t>/<conversation>``: the message goes to the customer, and the
first agent to answer becomes the conversation's agent.  Another customer
naming the conversation is told its id is taken (``BAD_MESSAGE`` on
``body.conversation``: ids are chosen by the apps, which must choose random
ones); nobody else may post (``FORBIDDEN``).

Messages are stored and delivered like every P1 message (acks, receipts,
retransmits); the SENDACK comes once the message and its history record are
both kept.  Records (key-value namespaces, JSON):

* ``conv``, key ``<tenant>/<conversation>``: {conversation, tenant, member,
  customer, agent, created, updated, last_ms (the newest message's history
  time, unix ms)}.  Every conversation is also held in memory (one small dict
  each), so routing a message costs no store read and two messages of a
  conversation are routed in the order they came.
* ``chat``, key ``<tenant>/<conversation>/<13-digit unix ms>-<msg id>``:
  {id, from, kind, body, ts}: the history HISTORY answers.  The ms are
  strictly increasing within a conversation (one ms later than the previous
  message when two come in the same millisecond), so keys sort in sending
  order and a HISTORY offset names exactly one message.

Retention: every maintenance round deletes records of both namespaces last
written more than ``retention.chat`` seconds ago.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import orjson

from ..core.codes import Code, Flag, FrameType, Lane
from ..core.session import OPEN, Frame
from .address import AddressError, parse_address
from .kinds import MessageError
from .store import NewMessage, kv_records

log = logging.getLogger("tillwire.chat")

CONV_NS = "conv"
CHAT_NS = "chat"
MAX_HISTORY = 1000          # messages one HISTORY answer carries at most
# What a conversation record needs to route a message.
_CONV_KEYS = frozenset({"conversation", "tenant", "member", "customer", "agent", "updated"})
RETRY_DELAY = 1.0           # seconds before records the store refused are written again
# A conversation id is one address segment (``chat:<t>/<id>`` must name it), so
# no id is a key prefix of another's history records ("cv1" vs "cv1/x").
_CONVERSATION = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_RECEIPT_REQUESTED = int(Flag.RECEIPT_REQUESTED)
_ACK_REQUESTED = int(Flag.ACK_REQUESTED)
_LANE_MASK = int(Flag.LANE_MASK)


class Chat:
    """The chat service of one node."""

    def __init__(self, node) -> None:
        self.node = node
        self.retention = node.cfg.retention.chat
        self.convs: dict[str, dict] = {}          # "<tenant>/<conversation>" -> record
        # Records of accepted messages the store refused, written again later:
        # (ns, key) -> (value, time); a conv record's value is None (its current
        # in-memory state is written, if the conversation still exists).
        self._pending: dict[tuple[str, str], tuple[bytes | None, float]] = {}
        self._retry_handle = None

    async def load(self) -> None:
        """Load the conversations updated within the retention (node start)."""
        horizon = time.time() - self.retention
        async for key, value in kv_records(self.node.store, CONV_NS):
            try:
                rec = orjson.loads(value)
                if not isinstance(rec, dict) or not _CONV_KEYS.issubset(rec) or \
                        not isinstance(rec["updated"], (int, float)):
                    raise ValueError("not a conversation record")
            except ValueError as exc:
                # (one damaged record must not keep the node from starting)
                log.warning("conversation record %r skipped: unreadable (%s)", key, exc)
                continue
            if rec["updated"] >= horizon:
                self.convs[key] = rec

    def agents(self, tenant: str) -> list[str]:
        """The service agents of a tenant (members of ``role:<t>/*/service``)."""
        return self.node.members_now(parse_address(f"role:{tenant}/*/service"))

    # -- messages ----------------------------------------------------------------------

    def on_message(self, conn, frame, address, body: dict) -> bool:
        """Route a chat.message (validated, allowed by the ACL); always consumes it."""
        node = self.node
        claims = conn.claims
        tenant = claims.tenant
        conv_id = body["conversation"]
        if not _CONVERSATION.match(conv_id):
            raise MessageError(Code.BAD_MESSAGE,
                               f"chat.message: body.conversation: {conv_id!r} is not a "
                               "conversation id (1-64 of A-Z a-z 0-9 . _ -)",
                               "body.conversation")
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
        elif sender == conv["customer"] and claims.member == conv["member"]:
            recipients = [conv["agent"]] if conv["agent"] else self.agents(tenant)
        elif "service" in roles:
            if not conv["agent"]:
                conv["agent"] = sender
            recipients = [conv["customer"]]
        elif "customer" in roles:
            # Another customer chose an id already in use (ids are the client's
            # choice): the id is taken, not forbidden; whose it is is not said.
            raise MessageError(Code.BAD_MESSAGE,
                               f"chat.message: body.conversation: {conv_id!r} is taken; "
                               "choose a new random id (e.g. a UUID)", "body.conversation")
        else:
            raise MessageError(Code.FORBIDDEN, f"chat.message: conversation {conv_id!r} is "
                                               "not yours", "body.conversation")
        conv["updated"] = now
        # The message's history key (and HISTORY offset) is its time in unix ms,
        # made strictly increasing per conversation: two messages of one
        # millisecond keep their order and paging by offset skips neither.
        ms = max(int(now * 1000), conv.get("last_ms", 0) + 1)
        conv["last_ms"] = ms
        # Who wrote it, stamped by the server (a "from" the client put in is
        # replaced): recipients and history readers see it in the body.
        body = {**body, "from": sender}
        ttl = frame.ttl / 1000.0 if frame.ttl else node.cfg.delivery.p1_ttl
        msg = NewMessage(tenant, sender, frame.ref, Lane.P1, "chat.message",
                         f"chat:{key}", orjson.dumps(body), now, now + ttl,
                         bool(frame.flags & _RECEIPT_REQUESTED))
        fut = node.loop.create_future()
        node.submit(msg, address, fut, recipients)
        node.spawn(self._keep(conn, frame.ref, key, conv, sender, body, now, ms, fut,
                               bool(frame.flags & _ACK_REQUESTED)))
        return True

    async def _keep(self, conn, ref: int, key: str, conv: dict, sender: str, body: dict,
                    now: float, ms: int, fut, asked: bool = True) -> None:
        """Once stored: write the history record and the conversation, then SENDACK."""
        node = self.node
        store = node.store
        try:
            accepted = await fut
        except Exception as exc:  # noqa: BLE001 - the store refused: nothing was promised
            log.error("chat message of %s could not be stored: %s", key, exc)
            node.service_error(conn, ref, Code.STORE_UNAVAILABLE,
                               "the message could not be stored; retry")
            return
        # (A conversation deleted meanwhile, by a member's data request or
        # retention, is not written back.)
        if not accepted.duplicate and self.convs.get(key) is conv:
            record = orjson.dumps({"id": accepted.msg_id, "from": sender,
                                   "kind": "chat.message", "body": body, "ts": now})
            hkey = f"{key}/{ms:013d}-{accepted.msg_id}"
            try:
                await asyncio.gather(store.kv_put(CHAT_NS, hkey, record, now),
                                     store.kv_put(CONV_NS, key, orjson.dumps(conv), now))
            except Exception as exc:  # noqa: BLE001
                # The message itself is stored and delivered: it is acknowledged
                # (a resend would only be a duplicate), and its records are
                # written again until the store takes them.
                log.error("chat records of %s could not be written (will retry): %s", key, exc)
                self._pending[(CHAT_NS, hkey)] = (record, now)
                self._pending[(CONV_NS, key)] = (None, now)
                self._retry_soon()
        if accepted.duplicate:
            node.service_ack(conn, ref, accepted.msg_id, None, retransmit=True, asked=asked)
        else:
            node.service_ack(conn, ref, accepted.msg_id,
                             {"conversation": conv["conversation"],
                              "recipients": len(accepted.seqs)}, asked=asked)

    def _retry_soon(self) -> None:
        if self._retry_handle is None and not self.node.stopping:
            self._retry_handle = self.node.loop.call_later(RETRY_DELAY, self._retry)

    def _retry(self) -> None:
        self._retry_handle = None
        if not self.node.stopping:
            self.node.spawn(self._write_pending())

    async def flush(self) -> None:
        """Stopping: write the records still due once more (before the store closes)."""
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        if self._pending:
            await self._write_pending()

    async def _write_pending(self) -> None:
        """Write the records still due; what the store refuses again waits for the
        next try (also each maintenance round)."""
        store = self.node.store
        for item in list(self._pending):
            found = self._pending.pop(item, None)
            if found is None:
                continue
            ns, key = item
            value, now = found
            if ns == CONV_NS:
                conv = self.convs.get(key)
                if conv is None:                    # deleted meanwhile
                    continue
                value = orjson.dumps(conv)
            elif self.convs.get(key.rsplit("/", 1)[0]) is None:
                continue
            try:
                await store.kv_put(ns, key, value, now)
            except Exception as exc:  # noqa: BLE001
                self._pending.setdefault(item, found)
                log.error("chat records still not written (%d due): %s", len(self._pending),
                          exc)
                self._retry_soon()
                return

    # -- history -----------------------------------------------------------------------

    def on_history(self, conn, frame, address) -> None:
        """HISTORY of ``chat:<t>/<conversation>`` (lane P1): the conversation's customer
        or a service agent gets the newest ``count`` messages, oldest first."""
        claims = conn.claims
        if address.tenant != claims.tenant:
            raise AddressError(Code.BAD_ADDRESS, f"address {address}: another tenant's address")
        if frame.flags & _LANE_MASK != Lane.P1:
            raise AddressError(Code.BAD_REQUEST, "HISTORY: conversations are read on lane P1")
        key = f"{address.tenant}/{address.path[0]}"
        conv = self.convs.get(key)
        agent = "service" in claims.roles
        if conv is None and agent:     # (others learn nothing about which ids exist)
            raise AddressError(Code.UNKNOWN_CHANNEL, f"HISTORY: no conversation {address}")
        if conv is None or (not agent and (conn.address != conv["customer"] or
                                           claims.member != conv["member"])):
            raise AddressError(Code.FORBIDDEN,
                               f"HISTORY: {address} is not a conversation of this terminal")
        self.node.spawn(self._history(conn, frame.ref, key, frame.offset, frame.count))

    async def _history(self, conn, ref: int, key: str, offset: int, count: int) -> None:
        try:
            await self._answer_history(conn, ref, key, offset, count)
        except Exception as exc:  # noqa: BLE001 - the store failed: say so, never hang
            log.error("history of %s could not be read: %s", key, exc)
            self.node.request_error(conn, ref, Code.STORE_UNAVAILABLE,
                                    "HISTORY: the conversation could not be read; retry")

    async def _answer_history(self, conn, ref: int, key: str, offset: int, count: int) -> None:
        """Answer a conversation's HISTORY: a page of at most ``limits.history_page``
        messages (HISTORY_END ``PARTIAL`` when the window goes on: the terminal
        asks again from its offset)."""
        node = self.node
        count = min(count or MAX_HISTORY, MAX_HISTORY)
        page = min(count, node.cfg.limits.history_page)
        prefix = key + "/"
        if offset:
            # offset > 0: messages after that time (unix ms), oldest first; one
            # more than the page tells whether the window goes on.
            rows: list = []
            async for row in kv_records(node.store, CHAT_NS, prefix, f"{prefix}{offset:013d}-~"):
                rows.append(row)
                if len(rows) > page:
                    break
        else:
            # No offset: the newest ``count`` (<= MAX_HISTORY) in one bounded
            # newest-first read, answered oldest first; the cost does not grow
            # with the conversation.
            rows = await node.store.kv_scan(CHAT_NS, prefix, "", count, reverse=True)
            rows.reverse()
        if conn.state != OPEN:
            return
        more = len(rows) > page
        rows = rows[:page]
        items = []
        last = 0
        for k, value in rows:
            last = int(k[len(prefix):].split("-", 1)[0])
            items.append((last, value))
        encode = node.encoder.encode

        def item(entry) -> bytes:
            at, value = entry
            rec = orjson.loads(value)
            return encode(Frame(FrameType.HISTORY_ITEM, Lane.P1, orjson.dumps(rec["body"]),
                                ref=ref, offset=at, msg_id=rec["id"], kind=rec["kind"]))

        node.answer(conn, ref, items, item, last or offset, Code.PARTIAL if more else Code.OK)

    # -- personal data and retention ---------------------------------------------------

    async def forget_member(self, tenant: str, member: str) -> tuple[int, int]:
        """Delete a member's conversations and their messages: (conversations, messages)."""
        store = self.node.store
        keys = [k for k, c in self.convs.items()
                if c["tenant"] == tenant and c["member"] == member]
        # Also records not in memory (written by a node sharing the store).
        async for k, value in kv_records(store, CONV_NS, tenant + "/"):
            if k not in self.convs and orjson.loads(value).get("member") == member:
                keys.append(k)
        messages = 0
        for k in keys:
            self.convs.pop(k, None)
            for item in [i for i in self._pending if i[1] == k or i[1].startswith(k + "/")]:
                del self._pending[item]
            messages += await store.kv_delete_prefix(CHAT_NS, k + "/")
            await store.kv_delete(CONV_NS, k)
        return len(keys), messages

    async def expire(self, now: float) -> tuple[int, int]:
        """Retention: delete what was last written before now - retention.chat."""
        horizon = now - self.retention
        for k in [k for k, c in self.convs.items() if c["updated"] < horizon]:
            del self.convs[k]
        if self._pending:
            await self._write_pending()
        store = self.node.store
        return (await store.kv_expire(CONV_NS, horizon),
                await store.kv_expire(CHAT_NS, horizon))
