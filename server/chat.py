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
retransmits).  A conversation changes (is created, gets its agent, its
``updated`` and ``last_ms``) only once the message is committed: refused
by the store, nothing changed, the sender gets ``STORE_UNAVAILABLE`` and may
resend the same SEND.  The messages of one conversation take turns
(:mod:`.turns`): each is routed by what the ones before it committed, in
the order they came.  Records are written behind (:mod:`.writebehind`,
retried until the store takes them); the SENDACK comes once the message is
stored and its records were tried.  Records (key-value namespaces, JSON):

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

* ``chatagent``, key ``<tenant>/<conversation>``: the agent's address,
  claimed once (``Records.put_new``): of agents answering at once on any
  workers, one becomes the conversation's agent.
* ``chatclock`` (a fleet), key ``<tenant>/<conversation>``: the newest
  message's history time and the worker that took it (``<ms> <worker>``),
  taken with ``Records.replace``: messages written at once on two workers
  get two times, in the order they took them.

In a fleet (workers sharing the records) the conversation is read from the
records at the start of each message's turn, and its agent from the claim,
so a conversation started on one worker is answered from another and its
customer's next message reaches the agent wherever either is connected.

Retention: every maintenance round deletes records of the namespaces last
written more than ``retention.chat`` seconds ago.
"""

from __future__ import annotations

import logging
import re
import time

import orjson

from ..core.codes import Code, Flag, FrameType, Lane
from ..core.session import OPEN, Frame
from .address import AddressError, parse_address
from .host import ServiceHost, commit
from .kinds import MessageError
from .records import scan_all
from .store import NewMessage
from .turns import Turns
from .writebehind import WriteBehind

log = logging.getLogger("tillwire.chat")

CONV_NS = "conv"
CHAT_NS = "chat"
AGENT_NS = "chatagent"
CLOCK_NS = "chatclock"           # (a fleet) a conversation's newest message time (unix ms)
MAX_HISTORY = 1000          # messages one HISTORY answer carries at most
# What a conversation record needs to route a message.
_CONV_KEYS = frozenset({"conversation", "tenant", "member", "customer", "agent", "updated"})
RETRY_DELAY = 1.0           # seconds before records the store refused are written again
RETRY_MAX = 30.0            # the longest wait between retries of refused records
# What a sender is to a conversation (Chat._role).
STARTER, CUSTOMER, AGENT = "starter", "customer", "agent"
# A conversation id is one address segment (``chat:<t>/<id>`` must name it), so
# no id is a key prefix of another's history records ("cv1" vs "cv1/x").
_CONVERSATION = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_RECEIPT_REQUESTED = int(Flag.RECEIPT_REQUESTED)
_ACK_REQUESTED = int(Flag.ACK_REQUESTED)
_LANE_MASK = int(Flag.LANE_MASK)


class Chat:
    """The chat service of one node."""

    def __init__(self, host: ServiceHost) -> None:
        self.host = host
        self.retention = host.cfg.retention.chat
        self.convs: dict[str, dict] = {}          # "<tenant>/<conversation>" -> record
        # Conversations whose first message is being stored -> the record it
        # creates once committed (a member's data request drops it meanwhile).
        self._starting: dict[str, dict] = {}
        # The messages of one conversation take turns: each is routed by what
        # the ones before it committed (its agent, its last history time).
        self._turns = Turns(host.loop)
        # Records of accepted messages not written yet: (ns, key) -> value.  A
        # history record's value is (record, time); a conv record's is None (its
        # current in-memory state is written, if the conversation still exists).
        self.unsaved = WriteBehind(host, self._write, retry=RETRY_DELAY, retry_max=RETRY_MAX,
                                   what="chat records")

    async def load(self) -> None:
        """Load the conversations updated within the retention (node start)."""
        horizon = time.time() - self.retention
        async for key, value in scan_all(self.host.store.records, CONV_NS):
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

    async def flush(self) -> None:
        """Stopping: write the records still due (before the store closes);
        raises if the store refuses one."""
        await self.unsaved.flush()

    async def agents(self, tenant: str) -> list[str]:
        """The service agents of a tenant (members of ``role:<t>/*/service``)."""
        return await self.host.members(parse_address(f"role:{tenant}/*/service"))

    # -- messages ----------------------------------------------------------------------

    def on_message(self, conn, frame, address, body: dict) -> bool:
        """Take a chat.message (validated, allowed by the ACL); always consumes it."""
        tenant = conn.claims.tenant
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
        before, mine = self._turns.take(key)
        if before is None and (key in self.convs or not self.host.shared_registry):
            # Nothing in progress in the conversation: a sender who may not post
            # is refused now, by the node (ACL denials are counted and audited).
            try:
                self._role(conn, key, conv_id)
            except BaseException:
                self._turns.done(key, mine)
                raise
        flags = frame.flags
        ttl = frame.ttl / 1000.0 if frame.ttl else self.host.cfg.delivery.p1_ttl
        self.host.spawn(self._send(conn, frame.ref, address, body, key, ttl,
                                   bool(flags & _RECEIPT_REQUESTED), bool(flags & _ACK_REQUESTED),
                                   before, mine))
        return True

    def _role(self, conn, key: str, conv_id: str) -> str:
        """What the sender is to the conversation as committed: STARTER (a
        customer's first message), CUSTOMER or AGENT; raises MessageError if
        they may not post to it."""
        conv = self.convs.get(key)
        claims = conn.claims
        roles = claims.roles
        if conv is None:
            if "customer" in roles:
                return STARTER
            if "service" in roles:
                raise MessageError(Code.BAD_MESSAGE,
                                   f"chat.message: body.conversation: no conversation "
                                   f"{conv_id!r}", "body.conversation")
            raise MessageError(Code.FORBIDDEN, "chat.message: only customers start "
                                               "conversations", "body.conversation")
        if conn.address == conv["customer"] and claims.member == conv["member"]:
            return CUSTOMER
        if "service" in roles:
            return AGENT
        if "customer" in roles:
            # Another customer chose an id already in use (ids are the client's
            # choice): the id is taken, not forbidden; whose it is is not said.
            raise MessageError(Code.BAD_MESSAGE,
                               f"chat.message: body.conversation: {conv_id!r} is taken; "
                               "choose a new random id (e.g. a UUID)", "body.conversation")
        raise MessageError(Code.FORBIDDEN, f"chat.message: conversation {conv_id!r} is "
                                           "not yours", "body.conversation")

    async def _send(self, conn, ref: int, address, body: dict, key: str, ttl: float,
                    receipt: bool, asked: bool, before, mine) -> None:
        """In the conversation's turn: route the message by what the messages
        before it committed and store it; only once it is committed does the
        conversation change (created, its agent, updated, last_ms) and its
        records become due; the SENDACK comes once they were tried.  Refused
        by the store: nothing changed, the sender is told to retry."""
        host = self.host
        claims = conn.claims
        sender = conn.address
        conv_id = body["conversation"]
        try:
            if before is not None:
                await before
            try:
                if host.shared_registry:
                    await self._read(key)       # (another worker may have changed it)
            except Exception as exc:  # noqa: BLE001 - not read: nothing changed
                log.error("conversation %s could not be read: %s", key, exc)
                host.service_error(conn, ref, Code.STORE_UNAVAILABLE,
                                   "the conversation could not be read; retry")
                return
            try:
                # (routed again: the conversation may have changed since on_message)
                role = self._role(conn, key, conv_id)
            except MessageError as exc:
                host.service_error(conn, ref, exc.code, str(exc))
                return
            now = time.time()
            # The message's history key (and HISTORY offset) is its time in unix
            # ms, made strictly increasing per conversation: two messages of one
            # millisecond keep their order and paging by offset skips neither.
            known = None if role == STARTER else self.convs[key]
            ms = max(int(now * 1000), (known or {}).get("last_ms", 0) + 1)
            clock = None
            if host.shared_registry:
                try:
                    ms, clock = await self._stamp(key, ms, now, (known or {}).get("clock"))
                except Exception as exc:  # noqa: BLE001 - no time taken: nothing changed
                    log.error("conversation %s: the message's time could not be taken: %s",
                              key, exc)
                    host.service_error(conn, ref, Code.STORE_UNAVAILABLE,
                                       "the conversation could not be written; retry")
                    return
            if role == STARTER:
                conv = self._starting[key] = {
                    "conversation": conv_id, "tenant": claims.tenant, "member": claims.member,
                    "customer": sender, "agent": "", "created": now, "updated": now}
            else:
                conv = self.convs[key]
            if clock is not None:
                conv["clock"] = clock
            # Who wrote it, stamped by the server (a "from" the client put in is
            # replaced): recipients and history readers see it in the body.
            body = {**body, "from": sender}
            msg = NewMessage(claims.tenant, sender, ref, Lane.P1, "chat.message",
                             f"chat:{key}", orjson.dumps(body), now, now + ttl, receipt)
            try:
                if role == AGENT:
                    recipients = [conv["customer"]]
                elif role == CUSTOMER and conv["agent"]:
                    recipients = [conv["agent"]]
                else:
                    recipients = await self.agents(claims.tenant)
                accepted = await commit(host, msg, address, recipients)
            except Exception as exc:  # noqa: BLE001 - not stored: nothing changed
                log.error("chat message of %s could not be stored: %s", key, exc)
                accepted = None
            # (A conversation being created exists from now on, or not at all.)
            started = role == STARTER and self._starting.pop(key, None) is conv
            if accepted is None:
                host.service_error(conn, ref, Code.STORE_UNAVAILABLE,
                                   "the message could not be stored; retry")
                return
            # A conversation deleted meanwhile (a member's data request, retention)
            # is not brought back, nor is a resend applied twice.
            kept = not accepted.duplicate and (started or self.convs.get(key) is conv)
            if kept and role == AGENT and not conv["agent"] and host.shared_registry:
                try:
                    conv["agent"] = (await host.store.records.put_new(
                        AGENT_NS, key, sender.encode(), now)).decode()
                except Exception as exc:  # noqa: BLE001 - the next answer claims it
                    log.error("the agent of %s could not be claimed: %s", key, exc)
            if kept:
                host.counters.chat_messages += 1
                if started:
                    host.counters.chat_conversations += 1
                    self.convs[key] = conv
                if role == AGENT and not conv["agent"]:
                    conv["agent"] = sender        # the first agent to answer
                conv["updated"] = now
                conv["last_ms"] = ms
        finally:
            self._turns.done(key, mine)
        if accepted.duplicate:
            host.service_ack(conn, ref, accepted.msg_id, None, retransmit=True, asked=asked)
            return
        if kept:
            # The message is stored and delivered whatever comes of these writes:
            # it is acknowledged (a resend would only be a duplicate), and a
            # refused record is written again until the store takes it.
            history = (CHAT_NS, f"{key}/{ms:013d}-{accepted.msg_id}")
            record = orjson.dumps({"id": accepted.msg_id, "from": sender,
                                   "kind": "chat.message", "body": body, "ts": now})
            self.unsaved.put(history, (record, now))
            self.unsaved.put((CONV_NS, key))
            await self.unsaved.written(history)
            await self.unsaved.written((CONV_NS, key))
        host.service_ack(conn, ref, accepted.msg_id,
                         {"conversation": conv_id, "recipients": len(accepted.seqs)},
                         asked=asked)

    async def _stamp(self, key: str, ms: int, now: float, clock: str | None
                     ) -> tuple[int, str]:
        """(A fleet) take the message's time in the conversation's clock
        record, after every time another worker took: messages written at
        once on two workers get two times (``ms``: the time this worker
        would take; ``clock``: the record as this worker last saw it, kept
        in the conversation: one round trip unless another worker took a
        time since).  Returns the time and the record's new value."""
        records = self.host.store.records
        mark = self.host.worker_name
        expected = clock.encode() if clock else None
        while True:
            # ("<ms> <worker>": a replace that finds this very value took it)
            value = f"{ms} {mark}".encode()
            found = await records.replace(CLOCK_NS, key, expected, value, now)
            if found == value:
                return ms, value.decode()
            expected = found
            try:
                ms = max(ms, int(found.split(b" ", 1)[0]) + 1)
            except (ValueError, AttributeError):
                pass                    # (not a time: written over)

    async def _read(self, key: str) -> None:
        """Take a conversation's record and agent claim from the shared records."""
        records = self.host.store.records
        raw = await records.get(CONV_NS, key)
        if raw is None:
            if key not in self._starting:
                self.convs.pop(key, None)      # (deleted by another worker, or never was)
            return
        conv = orjson.loads(raw)
        mine = self.convs.get(key)
        if mine is not None:
            # (this worker's newer message times are kept: history keys grow)
            conv["last_ms"] = max(conv.get("last_ms", 0), mine.get("last_ms", 0))
        agent = await records.get(AGENT_NS, key)
        if agent is not None:
            conv["agent"] = agent.decode()
        if mine is not None:
            mine.update(conv)                # (in place: a turn in progress holds it)
        else:
            self.convs[key] = conv

    async def _write(self, item: tuple[str, str], value) -> None:
        """Write one record, unless its conversation was deleted meanwhile."""
        ns, key = item
        if ns == CONV_NS:
            conv = self.convs.get(key)
            if conv is not None:
                await self.host.store.records.put(CONV_NS, key, orjson.dumps(conv),
                                                  conv["updated"])
        elif key.rsplit("/", 1)[0] in self.convs:
            record, at = value
            await self.host.store.records.put(CHAT_NS, key, record, at)

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
        if key not in self.convs and self.host.shared_registry:
            # (started on another worker of the fleet, perhaps)
            self.host.spawn(self._history_read_first(conn, frame, address, key))
            return
        self._check_history(conn, frame, address, key)

    async def _history_read_first(self, conn, frame, address, key: str) -> None:
        try:
            await self._read(key)
        except Exception as exc:  # noqa: BLE001 - the store failed: say so, never hang
            log.error("conversation %s could not be read: %s", key, exc)
            self.host.request_error(conn, frame.ref, Code.STORE_UNAVAILABLE,
                                    "HISTORY: the conversation could not be read; retry")
            return
        try:
            self._check_history(conn, frame, address, key)
        except AddressError as exc:
            self.host.request_error(conn, frame.ref, exc.code, str(exc))

    def _check_history(self, conn, frame, address, key: str) -> None:
        claims = conn.claims
        conv = self.convs.get(key)
        agent = "service" in claims.roles
        if conv is None and agent:     # (others learn nothing about which ids exist)
            raise AddressError(Code.UNKNOWN_CHANNEL, f"HISTORY: no conversation {address}")
        if conv is None or (not agent and (conn.address != conv["customer"] or
                                           claims.member != conv["member"])):
            raise AddressError(Code.FORBIDDEN,
                               f"HISTORY: {address} is not a conversation of this terminal")
        self.host.spawn(self._history(conn, frame.ref, key, frame.offset, frame.count))

    async def _history(self, conn, ref: int, key: str, offset: int, count: int) -> None:
        try:
            await self._answer_history(conn, ref, key, offset, count)
        except Exception as exc:  # noqa: BLE001 - the store failed: say so, never hang
            log.error("history of %s could not be read: %s", key, exc)
            self.host.request_error(conn, ref, Code.STORE_UNAVAILABLE,
                                    "HISTORY: the conversation could not be read; retry")

    async def _answer_history(self, conn, ref: int, key: str, offset: int, count: int) -> None:
        """Answer a conversation's HISTORY: a page of at most ``limits.history_page``
        messages (HISTORY_END ``PARTIAL`` when the window goes on: the terminal
        asks again from its offset)."""
        host = self.host
        count = min(count or MAX_HISTORY, MAX_HISTORY)
        page = min(count, host.cfg.limits.history_page)
        prefix = key + "/"
        if offset:
            # offset > 0: messages after that time (unix ms), oldest first; one
            # more than the page tells whether the window goes on.
            rows: list = []
            after = f"{prefix}{offset:013d}-~"
            async for row in scan_all(host.store.records, CHAT_NS, prefix, after):
                rows.append(row)
                if len(rows) > page:
                    break
        else:
            # No offset: the newest ``count`` (<= MAX_HISTORY) in one bounded
            # newest-first read, answered oldest first; the cost does not grow
            # with the conversation.
            rows = await host.store.records.scan(CHAT_NS, prefix, "", count, reverse=True)
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
        encode = host.encoder.encode

        def item(entry) -> bytes:
            at, value = entry
            rec = orjson.loads(value)
            return encode(Frame(FrameType.HISTORY_ITEM, Lane.P1, orjson.dumps(rec["body"]),
                                ref=ref, offset=at, msg_id=rec["id"], kind=rec["kind"]))

        host.answer(conn, ref, items, item, last or offset, Code.PARTIAL if more else Code.OK)

    # -- personal data and retention ---------------------------------------------------

    def forget_member_here(self, tenant: str, member: str) -> list[str]:
        """Drop what this worker holds in memory of a member's conversations
        (and their records not written yet); returns their keys."""
        for k in [k for k, c in self._starting.items()
                  if c["tenant"] == tenant and c["member"] == member]:
            del self._starting[k]         # (its first message, being stored, creates nothing)
        keys = [k for k, c in self.convs.items()
                if c["tenant"] == tenant and c["member"] == member]
        for k in keys:
            self._drop(k)
        return keys

    def _drop(self, k: str) -> None:
        self.convs.pop(k, None)
        for item, _ in self.unsaved.items():
            if item[1] == k or item[1].startswith(k + "/"):
                self.unsaved.discard(item)

    async def forget_member(self, tenant: str, member: str) -> tuple[int, int]:
        """Delete a member's conversations and their messages: (conversations, messages)."""
        store = self.host.store
        keys = self.forget_member_here(tenant, member)
        # Also records not in memory (written by a node sharing the store).
        async for k, value in scan_all(store.records, CONV_NS, tenant + "/"):
            if k not in keys and orjson.loads(value).get("member") == member:
                keys.append(k)
        messages = 0
        for k in keys:
            self._drop(k)
            messages += await store.records.delete_prefix(CHAT_NS, k + "/")
            await store.records.delete(AGENT_NS, k)
            await store.records.delete(CLOCK_NS, k)
            await store.records.delete(CONV_NS, k)
        return len(keys), messages

    async def expire(self, now: float) -> tuple[int, int]:
        """Retention: delete what was last written before now - retention.chat."""
        horizon = now - self.retention
        for k in [k for k, c in self.convs.items() if c["updated"] < horizon]:
            del self.convs[k]
        await self.unsaved.write_due()        # (the records a refused write left due)
        store = self.host.store
        await store.records.expire(AGENT_NS, horizon)
        await store.records.expire(CLOCK_NS, horizon)
        return (await store.records.expire(CONV_NS, horizon),
                await store.records.expire(CHAT_NS, horizon))
