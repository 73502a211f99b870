"""The admin HTTP API, metrics and health checks (``[admin]``, its own port).

An aiohttp application that runs in the node's event loop, so handlers read
the node's state directly (no locks, no copies) and publish through the same
``Node.submit`` / ``Node.publish`` paths as terminals.  ``make_app`` does
not start anything: ``server/main.py`` serves it on ``admin.host:admin.port``
(:func:`start_admin`) and tests run it on a loopback port.

Under ``/v1`` every call needs ``Authorization: Bearer <token>`` with a token
of ``admin.tokens`` (compared in constant time), may only act on the
tenants the token lists (``*`` = all), and is written to the audit log
(who, method, path, target, status, from where).  JSON in and out; every
refusal is ``{"error": "<message naming the field>", "field": "<field>"}``
with 400 (malformed or invalid), 401 (no or bad token), 403 (tenant not
allowed), 404 (unknown terminal, message or route), 409 (conflict), 413
(body larger than ``server.max_frame_size``) or 415 (not JSON).

``/metrics``, ``/healthz`` and ``/readyz`` need no token.  The full contract
is ``server/openapi.json`` (also served as ``/v1/openapi.json``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import importlib.resources
import logging
import math
import re
import time

import orjson
from aiohttp import web

from ..core.codes import KIND_LANES, Code, Lane
from ..core.errors import UnknownTerminal
from . import kinds
from .address import AddressError, parse_address, terminal_address
from .auth import ROLES
from .config import zone_ok
from .metrics import make_registry, render
from .offers import POLICY_KINDS
from .store import NewMessage
from .terminals import TerminalRecord

log = logging.getLogger("tillwire.admin")

MAX_TTL = 366 * 86400.0            # longest ttl a publish may ask for (seconds)
MAX_REF = 2**63 - 1
MAX_REASON = 200
MAX_DEAD_LETTERS = 1000
MAX_CHANNELS = 1000                # channels in one page of GET /v1/channels
MAX_KEY = 128
_LANE_NAMES = {"P0": 0, "P1": 1, "P2": 2, "P3": 3}
_STATE_NAMES = {0: "handshake", 1: "handshake", 2: "open", 3: "closing"}
_DIGITS = re.compile(r"[1-9][0-9]{0,18}\Z")
_TICKET = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")
MAX_ROSTER = 1000                  # terminal ids in a store's on_duty or managers
MAX_TICKETS = 1000                 # tickets in one page of GET /v1/tickets
MAX_REDRIVE = 10000                # dead letters one redrive of a terminal puts back
# Methods counted by name in tillwire_admin_requests_total (others: "other").
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})



class Call:
    """What the audit line of one admin call says besides the request itself."""

    __slots__ = ("token", "target", "tenant", "terminal", "detail", "inbound")

    def __init__(self) -> None:
        self.token = None        # the AdminToken that authenticated the call
        self.target = ""         # the terminal, address, message or node acted on
        self.tenant = ""
        self.terminal = ""
        self.detail: dict = {}   # extra audit fields (never a body or a token)
        self.inbound = False     # a message counted in (a refusal is then counted too)


# Typed keys where aiohttp has them (3.9+ AppKey, newer RequestKey); plain strings otherwise.
_CALL = web.RequestKey("tillwire_call", Call) if hasattr(web, "RequestKey") else "tillwire_call"
_MAX_BODY = web.AppKey("tillwire_max_body", int) if hasattr(web, "AppKey") else "tillwire_max_body"


def _call(request: web.Request) -> Call:
    return request[_CALL]


class ApiError(Exception):
    """A refused request: HTTP status, message (naming the field) and field."""

    def __init__(self, status: int, message: str, field: str = "", code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.code = code


def _json(doc, status: int = 200, headers=None) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, headers=headers,
                        content_type="application/json")


def _error_doc(message: str, field: str = "", code: str = "") -> dict:
    doc = {"error": message}
    if field:
        doc["field"] = field
    if code:
        doc["code"] = code
    return doc


# -- request helpers -----------------------------------------------------------------------


async def _body(request: web.Request, *, required: bool, allowed: tuple[str, ...],
                max_depth: int = 0) -> dict:
    """The JSON object of the request (``{}`` when optional and absent);
    ``max_depth``: how deep its fields may nest (0: not checked)."""
    limit = request.app[_MAX_BODY]
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"request body: larger than {limit} bytes (server.max_frame_size)",
                       "body")
    if not request.body_exists or request.content_length == 0:
        if required:
            raise ApiError(400, "request body: a JSON object is required", "body")
        return {}
    ctype = request.content_type
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise ApiError(415, f"Content-Type: must be application/json, got {ctype!r}",
                       "Content-Type")
    raw = await request.read()      # aiohttp enforces client_max_size (413) while reading
    if not raw.strip():
        if required:
            raise ApiError(400, "request body: a JSON object is required", "body")
        return {}
    if max_depth and kinds.nested_deeper(raw, max_depth + 1):    # (+1: the request object)
        raise ApiError(400, f"body: nested more than {max_depth} levels deep "
                            "(limits.max_body_depth)", "body", Code.BAD_MESSAGE.name)
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"request body: not valid JSON ({exc})", "body") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "request body: must be a JSON object", "body")
    for name in doc:
        if name not in allowed:
            raise ApiError(400, f"{name}: unknown field (expected {', '.join(allowed)})", name)
    return doc


def _segment(scope: str, field: str, value) -> str:
    """Validate one identifier through the address parser; returns it."""
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{field}: required, a non-empty string", field)
    try:
        parse_address(f"{scope}:{value}" if scope == "tenant" else f"{scope}:x/{value}")
    except AddressError:
        raise ApiError(400, f"{field}: {value!r} is not a valid id (1-64 of A-Z a-z 0-9 . _ -)",
                       field) from None
    return value


def _text(doc: dict, field: str, default: str = "", max_len: int = MAX_REASON) -> str:
    value = doc.get(field, default)
    if not isinstance(value, str) or len(value) > max_len:
        raise ApiError(400, f"{field}: must be a string of at most {max_len} characters", field)
    return value


def _int_param(request: web.Request, field: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(field)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{field}: must be an integer {lo}-{hi}", field) from None
    if not lo <= value <= hi:
        raise ApiError(400, f"{field}: must be an integer {lo}-{hi}", field)
    return value


def _allow(request: web.Request, tenant: str) -> None:
    token = _call(request).token
    if not token.allows(tenant):
        raise ApiError(403, f"tenant: token {token.name!r} may not act on tenant {tenant!r}",
                       "tenant")


def _terminal_target(request: web.Request) -> tuple[str, str, str]:
    tenant = _segment("tenant", "tenant", request.match_info["tenant"])
    terminal = _segment("terminal", "terminal", request.match_info["terminal"])
    _allow(request, tenant)
    address = terminal_address(tenant, terminal)
    call = _call(request)
    call.target, call.tenant, call.terminal = address, tenant, terminal
    return tenant, terminal, address


def _who(request: web.Request) -> str:
    call = request.get(_CALL)
    token = call.token if call is not None else None
    return f"admin:{token.name}" if token is not None else ""


def _record_doc(rec: TerminalRecord) -> dict:
    return {
        "terminal": rec.address, "tenant": rec.tenant, "id": rec.terminal, "store": rec.store,
        "region": rec.region, "roles": list(rec.roles), "member": rec.member,
        "first_seen": rec.first_seen, "last_seen": rec.last_seen, "retired": rec.retired,
        "revoked_before": rec.revoked_before,
    }


def _unix(node, loop_time: float) -> float:
    """A loop-clock time as unix seconds."""
    return round(time.time() - (node.loop.time() - loop_time), 3)


# -- the handlers ------------------------------------------------------------------------------


class Handlers:
    def __init__(self, node, cfg, audit) -> None:
        self.node = node
        self.cfg = cfg
        self.audit = audit
        self.registry = make_registry(node)
        ref = importlib.resources.files("tillwire.server").joinpath("openapi.json")
        self.openapi = ref.read_bytes()

    # -- unauthenticated ---------------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = render(self.registry, request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok", "node": self.node.node_id})

    async def readyz(self, request: web.Request) -> web.Response:
        node = self.node
        reason = ""
        if node.draining:
            reason = "draining"
        elif not node.listening:
            reason = "not listening"
        else:
            try:
                # A point read: cheap on every backend, and it fails when the store is down.
                await asyncio.wait_for(node.store.terminals.get("terminal:readyz/probe"), 2.0)
            except Exception as exc:  # noqa: BLE001 - any store failure means not ready
                reason = f"store: {exc.__class__.__name__}: {exc}".rstrip(": ")
            else:
                # Reads can still answer when writes cannot (the SQLite writer process died).
                down = getattr(node.store, "write_failure", "")
                if down:
                    reason = f"store: {down}"
                elif node.broker is not None and not node.broker.connected:
                    # (notices and channel messages for this worker are lost meanwhile)
                    reason = "broker: its pub/sub connection to Redis is being opened again"
        if reason:
            return _json({"ready": False, "reason": reason, "node": node.node_id}, 503)
        return _json({"ready": True, "node": node.node_id})

    # -- /v1 ----------------------------------------------------------------------------

    async def openapi_doc(self, request: web.Request) -> web.Response:
        return web.Response(body=self.openapi, content_type="application/json")

    async def publish(self, request: web.Request) -> web.Response:
        node = self.node
        doc = await _body(request, required=True,
                          allowed=("to", "kind", "body", "lane", "ttl", "key", "ref", "receipt"),
                          max_depth=self.cfg.limits.max_body_depth)
        to = doc.get("to")
        if not isinstance(to, str) or not to:
            raise ApiError(400, "to: required, an address like terminal:acme/till7", "to")
        try:
            address = parse_address(to)
        except AddressError as exc:
            raise ApiError(400, f"to: {exc}", "to", Code(exc.code).name) from None
        call = _call(request)
        call.target, call.tenant = str(address), address.tenant
        _allow(request, address.tenant)
        kind = doc.get("kind")
        if not isinstance(kind, str) or not kind:
            raise ApiError(400, "kind: required, a dotted name like payment.result", "kind")
        body = doc.get("body")
        if not isinstance(body, dict):
            raise ApiError(400, "body: required, a JSON object", "body")
        lane = doc.get("lane")
        if lane is None:
            lane = int(KIND_LANES.get(kind, Lane.P1))
        elif isinstance(lane, str) and lane.upper() in _LANE_NAMES:
            lane = _LANE_NAMES[lane.upper()]
        elif isinstance(lane, int) and not isinstance(lane, bool) and 0 <= lane <= 3:
            pass
        else:
            raise ApiError(400, "lane: one of P0, P1, P2, P3 (or 0-3)", "lane")
        ttl = doc.get("ttl", 0)
        if (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl)
                or ttl < 0 or ttl > MAX_TTL):
            raise ApiError(400, f"ttl: seconds, a number 0-{MAX_TTL:g} (0 = the lane's default)",
                           "ttl")
        key = doc.get("key", "")
        if not isinstance(key, str) or len(key) > MAX_KEY:
            raise ApiError(400, f"key: a string of at most {MAX_KEY} characters", "key")
        if key and lane != Lane.P2:
            raise ApiError(400, "key: only P2 messages have a conflation key", "key")
        ref = doc.get("ref", 0)
        if isinstance(ref, bool) or not isinstance(ref, int) or not 0 <= ref <= MAX_REF:
            raise ApiError(400, f"ref: an integer 1-{MAX_REF}", "ref")
        receipt = doc.get("receipt", False)
        if not isinstance(receipt, bool):
            raise ApiError(400, "receipt: true or false", "receipt")
        payload = orjson.dumps(body)
        node.counters.admin_frames_in[lane] += 1
        node.counters.admin_bytes_in[lane] += len(payload)
        call.inbound = True
        if kind in node.service_kinds:
            # Tickets and conversations have state a bare publish would bypass.
            raise ApiError(400, f"kind: {kind} is sent by terminals, through the ticket and "
                                "chat services; it cannot be published here", "kind")
        try:
            checked = kinds.check(kind, lane, payload, key,
                                  max_depth=self.cfg.limits.max_body_depth)
        except kinds.MessageError as exc:
            field = exc.field or "body"
            raise ApiError(400, str(exc), field, exc.code.name) from None
        call.detail = {"to": str(address), "kind": kind, "lane": f"P{lane}"}
        if lane <= Lane.P1:
            now = time.time()
            if not ttl:
                ttl = self.cfg.delivery.p0_ttl if lane == Lane.P0 else self.cfg.delivery.p1_ttl
            msg = NewMessage(address.tenant, _who(request), ref, lane, kind, str(address),
                             payload, now, now + ttl, receipt)
            reply = node.loop.create_future()
            node.submit(msg, address, reply)
            try:
                accepted = await reply
            except UnknownTerminal as exc:
                raise ApiError(404, str(exc), "to", Code.UNKNOWN_TERMINAL.name) from None
            except Exception as exc:  # noqa: BLE001 - the store refused the batch
                raise ApiError(503, f"store: the message could not be stored ({exc}); retry "
                                    "with the same ref", "", "STORE_UNAVAILABLE") from None
            call.detail["id"] = str(accepted.msg_id)
            call.detail["duplicate"] = accepted.duplicate
            return _json({"id": str(accepted.msg_id), "duplicate": accepted.duplicate,
                          "recipients": len(accepted.seqs)})
        report = {} if lane == Lane.P3 and kind in POLICY_KINDS else None
        offset = await node.publish(address, lane, kind, checked.key, checked.version, payload,
                                    float(ttl), report)
        if offset is None:
            raise ApiError(503, "history: the channel message could not be placed or carried; "
                                "retry", "", "STORE_UNAVAILABLE")
        call.detail["offset"] = offset
        if not offset:
            return _json({"stale": True})
        return _json({"channel": str(address), "offset": offset, **(report or {})})

    async def get_terminal(self, request: web.Request) -> web.Response:
        node = self.node
        _, _, address = _terminal_target(request)
        rec = await node.registry.get(address)
        conn = node.hub.sessions.get(address)
        if rec is None and conn is None:
            raise ApiError(404, f"terminal: {address} is not registered", "terminal")
        try:
            acked0, last0, acked1, last1 = await node.store.positions(address)
        except Exception as exc:  # noqa: BLE001 - the store is unreachable: nothing to say
            raise ApiError(503, f"store: the inbox positions could not be read ({exc}); "
                                "retry") from None
        doc = _record_doc(rec) if rec is not None else {
            "terminal": address, "tenant": _call(request).tenant, "id": _call(request).terminal}
        here = conn is not None and conn.transport is not None
        holder = (node.node_id, node.worker) if here else None
        if not here and node.ownership is not None:
            # Held by another worker of the fleet: presence says which (the
            # connection's own details are that worker's to know).
            try:
                owner = await node.ownership.presence.owner(address)
            except Exception as exc:  # noqa: BLE001 - presence is unreachable
                raise ApiError(503, f"presence: which worker holds {address} could not be "
                                    f"read ({exc}); retry") from None
            if owner is not None and owner != node.ownership.owner:
                held, _, index = owner.rpartition(".w")
                holder = (held or owner, int(index) if index.isdigit() else None)
        doc.update({
            "connected": holder is not None,
            "node": holder[0] if holder else None,
            "worker": holder[1] if holder else None,
            "since": _unix(node, conn.started) if here else None,
            "heartbeat": conn.heartbeat_ms if here else None,
            "last_frame": _unix(node, conn.last_seen) if here else None,
            "queued_bytes": conn.queued_bytes if here else 0,
            "inbox": {"P0": {"acked": acked0, "last": last0},
                      "P1": {"acked": acked1, "last": last1}},
            "state": ("retired" if rec is not None and rec.retired else
                      _STATE_NAMES.get(conn.state, "open") if here else
                      "open" if holder else "offline"),
        })
        return _json(doc)

    async def put_terminal(self, request: web.Request) -> web.Response:
        tenant, terminal, address = _terminal_target(request)
        doc = await _body(request, required=True, allowed=("store", "roles", "region", "member"))
        return await self._provision(request, tenant, terminal, address, doc)

    async def post_terminal(self, request: web.Request) -> web.Response:
        """Provision a terminal (``tenant`` and ``id`` in the body): from then on
        it is known, and P0/P1 messages to it wait for its first login."""
        doc = await _body(request, required=True,
                          allowed=("tenant", "id", "store", "roles", "region", "member"))
        tenant = _segment("tenant", "tenant", doc.get("tenant"))
        terminal = _segment("terminal", "id", doc.get("id"))
        _allow(request, tenant)
        address = terminal_address(tenant, terminal)
        call = _call(request)
        call.target, call.tenant, call.terminal = address, tenant, terminal
        return await self._provision(request, tenant, terminal, address,
                                     {k: v for k, v in doc.items() if k not in ("tenant", "id")})

    async def _provision(self, request: web.Request, tenant: str, terminal: str, address: str,
                         doc: dict) -> web.Response:
        """Register (or update) terminal ``address`` with the record ``doc`` describes."""
        node = self.node
        store = _segment("store", "store", doc.get("store"))
        roles = doc.get("roles")
        if (not isinstance(roles, list) or not roles
                or any(not isinstance(r, str) or r not in ROLES for r in roles)):
            raise ApiError(400, f"roles: a non-empty list of {', '.join(ROLES)}", "roles")
        roles = tuple(dict.fromkeys(roles))
        region = doc.get("region", "")
        if region != "":
            _segment("region", "region", region)
        member = doc.get("member", "")
        if member != "":
            _segment("member", "member", member)
        old = await node.registry.get(address)
        if old is not None and old.retired:
            raise ApiError(409, f"terminal: {address} is retired; ids of retired terminals are "
                                "not reused", "terminal")
        now = time.time()
        rec = TerminalRecord(address, tenant, terminal, store, region, roles, member,
                             old.first_seen if old is not None and old.first_seen else now,
                             old.last_seen if old is not None else 0.0, False,
                             old.revoked_before if old is not None else 0.0)
        await node.store.terminals.register(rec)
        await node.registry.put(rec)
        node.terminal_changed(address)
        _call(request).detail = {"store": store, "roles": list(roles)}
        return _json(_record_doc(rec), 200 if old is not None else 201)

    async def _known(self, address: str) -> TerminalRecord:
        rec = await self.node.registry.get(address)
        if rec is None:
            raise ApiError(404, f"terminal: {address} is not registered", "terminal")
        # The node writes login registrations in batches: make sure the store has
        # this one before it is flagged (register keeps retired and revoked_before).
        await self.node.store.terminals.register(rec)
        return rec

    async def _kick(self, request: web.Request, address: str, reason: str, event: str,
                    **detail) -> bool:
        kicked = await self.node.kick_anywhere(address, reason)
        if self.audit is not None:
            call = _call(request)
            self.audit.write(event, _who(request), tenant=call.tenant,
                             terminal=call.terminal, peer=request.remote or "",
                             detail={"target": address, "reason": reason, "kicked": kicked,
                                     **detail})
        return kicked

    async def kick(self, request: web.Request) -> web.Response:
        _, _, address = _terminal_target(request)
        doc = await _body(request, required=False, allowed=("reason",))
        reason = _text(doc, "reason", "disconnected by an operator")
        if await self.node.registry.get(address) is None and address not in self.node.hub.sessions:
            raise ApiError(404, f"terminal: {address} is not registered", "terminal")
        kicked = await self._kick(request, address, reason, "kick")
        if not kicked:
            raise ApiError(409, f"terminal: {address} is not connected", "terminal")
        return _json({"terminal": address, "kicked": kicked})

    async def retire(self, request: web.Request) -> web.Response:
        node = self.node
        _, _, address = _terminal_target(request)
        doc = await _body(request, required=False, allowed=("reason",))
        reason = _text(doc, "reason", "terminal retired")
        rec = await self._known(address)
        await node.store.terminals.retire(address, True)
        await node.registry.put(dataclasses.replace(rec, retired=True))
        node.terminal_changed(address)
        kicked = await self._kick(request, address, reason, "retire")
        return _json({"terminal": address, "retired": True, "kicked": kicked})

    async def revoke(self, request: web.Request) -> web.Response:
        node = self.node
        _, _, address = _terminal_target(request)
        doc = await _body(request, required=False, allowed=("reason",))
        reason = _text(doc, "reason", "tokens revoked")
        rec = await self._known(address)
        before = time.time()
        await node.store.terminals.revoke(address, before)
        await node.registry.put(dataclasses.replace(rec, revoked_before=before))
        node.terminal_changed(address)
        kicked = await self._kick(request, address, reason, "revoke", revoked_before=before)
        return _json({"terminal": address, "revoked_before": before, "kicked": kicked})

    async def presence(self, request: web.Request) -> web.Response:
        node = self.node
        tenant = _segment("tenant", "tenant", request.query.get("tenant", ""))
        _allow(request, tenant)
        store = request.query.get("store")
        if store is not None:
            _segment("store", "store", store)
        call = _call(request)
        call.tenant = tenant
        call.target = f"store:{tenant}/{store}" if store else f"tenant:{tenant}"
        groups = [node.hub.store_sessions(tenant, store)] if store else \
            node.hub.tenant_groups(tenant)
        terminals = []
        for group in groups:
            for conn in list(group):
                claims = conn.claims
                terminals.append({
                    "terminal": conn.address, "store": claims.store, "roles": list(claims.roles),
                    "since": _unix(node, conn.started), "queued_bytes": conn.queued_bytes,
                })
        terminals.sort(key=lambda t: t["terminal"])
        return _json({"tenant": tenant, "store": store, "node": node.node_id,
                      "count": len(terminals), "terminals": terminals})

    async def channels(self, request: web.Request) -> web.Response:
        """A tenant's channel streams, a page at a time in (name, lane) order:
        ``limit`` (1-1000, default 100) and ``after`` (the ``next`` of the
        page before)."""
        hub = self.node.hub
        tenant = _segment("tenant", "tenant", request.query.get("tenant", ""))
        _allow(request, tenant)
        call = _call(request)
        call.tenant, call.target = tenant, f"tenant:{tenant}"
        limit = _int_param(request, "limit", 100, 1, MAX_CHANNELS)
        after = request.query.get("after")
        cursor = None
        if after is not None:
            name, sep, lane = after.rpartition("#")
            if not sep or lane not in ("P2", "P3") or not name or len(name) > 256:
                raise ApiError(400, f"after: {after[:300]!r} is not a cursor (the next of a "
                                    "page, like store:acme/s1#P2)", "after")
            cursor = (name, int(lane[1]))
        streams = hub.page(tenant, cursor, limit + 1)
        more = len(streams) > limit
        streams = streams[:limit]
        out = [{"name": s.name, "lane": f"P{s.lane}", "offset": s.offset, "epoch": s.epoch,
                "history": len(s.history), "lvc": len(s.lvc), "explicit": len(s.explicit)}
               for s in streams]
        doc = {"tenant": tenant, "channels": out, "total": hub.tenant_stream_count(tenant)}
        if more:
            doc["next"] = f"{streams[-1].name}#P{streams[-1].lane}"
        return _json(doc)

    async def message(self, request: web.Request) -> web.Response:
        raw = request.match_info["id"]
        call = _call(request)
        call.target = raw
        if not _DIGITS.match(raw) or int(raw) > MAX_REF:
            raise ApiError(400, f"id: {raw!r} is not a message id (a positive integer)", "id")
        trace = await self.node.store.trace(int(raw))
        # Another tenant's message is answered exactly like a missing one: a
        # token must not learn which ids exist.
        if trace is None or not call.token.allows(trace.tenant):
            raise ApiError(404, f"id: no message {raw}", "id")
        call.tenant = trace.tenant
        return _json(trace.to_dict())

    async def dead_letters(self, request: web.Request) -> web.Response:
        tenant = _segment("tenant", "tenant", request.query.get("tenant", ""))
        _allow(request, tenant)
        call = _call(request)
        call.tenant, call.target = tenant, f"tenant:{tenant}"
        limit = _int_param(request, "limit", 100, 1, MAX_DEAD_LETTERS)
        dead = await self.node.store.dead_letters(tenant, limit)
        return _json({"tenant": tenant, "dead_letters": [
            {"id": str(d.msg_id), "terminal": d.terminal, "lane": f"P{d.lane}", "seq": d.seq,
             "kind": d.kind, "reason": d.reason, "at": d.at, "sender": d.sender, "ref": d.ref}
            for d in dead]})

    async def redrive(self, request: web.Request) -> web.Response:
        """Put a terminal's dead letter (``/dead-letters/{id}/redrive``) or its
        oldest ``limit`` ones (``/dead-letters/redrive``) back in its inbox."""
        node = self.node
        _, _, address = _terminal_target(request)
        raw = request.match_info.get("id")
        msg_id = None
        if raw is not None:
            if not _DIGITS.match(raw) or int(raw) > MAX_REF:
                raise ApiError(400, f"id: {raw!r} is not a message id (a positive integer)",
                               "id")
            msg_id = int(raw)
        limit = _int_param(request, "limit", MAX_DEAD_LETTERS, 1, MAX_REDRIVE)
        try:
            redriven = await node.redrive(address, msg_id, 1 if msg_id is not None else limit)
        except Exception as exc:  # noqa: BLE001 - the store refused: nothing changed
            raise ApiError(503, f"store: the dead letters could not be redriven ({exc}); "
                                "nothing changed, retry", "", "STORE_UNAVAILABLE") from None
        if msg_id is not None and not redriven:
            raise ApiError(404, f"id: {address} has no dead letter of message {raw}", "id")
        entries = [{"id": str(r.msg_id), "lane": f"P{r.lane}", "kind": r.kind,
                    "dead_seq": r.dead_seq, "seq": r.seq} for r in redriven]
        call = _call(request)
        call.detail = {"redriven": len(entries)}
        if self.audit is not None:
            self.audit.write("redrive", _who(request), tenant=call.tenant,
                             terminal=call.terminal, peer=request.remote or "",
                             detail={"target": address, "entries": [
                                 {k: e[k] for k in ("id", "lane", "dead_seq", "seq")}
                                 for e in entries]})
        log.info("dead letters redriven terminal=%s count=%d by=%s", address, len(entries),
                 _who(request))
        return _json({"terminal": address, "redriven": entries})

    # -- retail services ------------------------------------------------------------------

    def _store_target(self, request: web.Request) -> tuple[str, str]:
        tenant = _segment("tenant", "tenant", request.match_info["tenant"])
        store = _segment("store", "store", request.match_info["store"])
        _allow(request, tenant)
        call = _call(request)
        call.tenant, call.target = tenant, f"store:{tenant}/{store}"
        return tenant, store

    async def get_store(self, request: web.Request) -> web.Response:
        tenant, store = self._store_target(request)
        return _json(self.node.directory.get(tenant, store).to_dict())

    async def put_store(self, request: web.Request) -> web.Response:
        tenant, store = self._store_target(request)
        doc = await _body(request, required=True, allowed=("timezone", "on_duty", "managers"))
        timezone = doc.get("timezone")
        if timezone is not None and (not isinstance(timezone, str) or not zone_ok(timezone)):
            raise ApiError(400, f"timezone: {timezone!r} is not an IANA time zone like "
                                "Asia/Shanghai", "timezone")
        rosters = {}
        for field in ("on_duty", "managers"):
            value = doc.get(field)
            if value is None:
                continue
            if not isinstance(value, list) or len(value) > MAX_ROSTER:
                raise ApiError(400, f"{field}: a list of at most {MAX_ROSTER} terminal ids",
                               field)
            for i, item in enumerate(value):
                _segment("terminal", f"{field}[{i}]", item)
            rosters[field] = tuple(dict.fromkeys(value))
        info = await self.node.directory.put(tenant, store, timezone=timezone,
                                             on_duty=rosters.get("on_duty"),
                                             managers=rosters.get("managers"))
        self.node.directory_changed(tenant, store)
        _call(request).detail = {"fields": sorted(doc)}
        if rosters.get("on_duty"):
            await self.node.tickets.on_roster(tenant, store)    # (tickets waiting for staff)
        return _json(info.to_dict())

    async def list_tickets(self, request: web.Request) -> web.Response:
        """A tenant's open tickets (of one ``store``; only the ``unattended``
        ones), a page at a time in id order: ``limit`` (1-1000, default 100)
        and ``after`` (the ``next`` of the page before)."""
        tickets = self.node.tickets
        tenant = _segment("tenant", "tenant", request.query.get("tenant", ""))
        _allow(request, tenant)
        store = request.query.get("store")
        if store is not None:
            _segment("store", "store", store)
        flag = request.query.get("unattended", "false")
        if flag not in ("true", "false"):
            raise ApiError(400, f"unattended: true or false, got {flag[:50]!r}", "unattended")
        after = request.query.get("after")
        if after is not None and not _TICKET.match(after):
            raise ApiError(400, f"after: {after[:100]!r} is not a ticket id (the next of a "
                                "page)", "after")
        limit = _int_param(request, "limit", 100, 1, MAX_TICKETS)
        call = _call(request)
        call.tenant = tenant
        call.target = f"store:{tenant}/{store}" if store else f"tenant:{tenant}"
        found = tickets.list_open(tenant, store, flag == "true")
        total = len(found)
        if after is not None:
            found = [t for t in found if t["ticket"] > after]
        page = found[:limit]
        doc = {"tenant": tenant, "store": store, "tickets": page, "total": total,
               "unattended": sum(1 for key in tickets.unattended
                                 if key.startswith(f"{tenant}/") and
                                 (not store or tickets.open[key]["store"] == store))}
        if len(found) > limit:
            doc["next"] = page[-1]["ticket"]
        return _json(doc)

    async def get_ticket(self, request: web.Request) -> web.Response:
        tenant = _segment("tenant", "tenant", request.match_info["tenant"])
        ticket = request.match_info["ticket"]
        _allow(request, tenant)
        call = _call(request)
        call.tenant, call.target = tenant, f"ticket:{tenant}/{ticket}"
        if not _TICKET.match(ticket):
            raise ApiError(400, f"ticket: {ticket!r} is not a ticket id like T-lx2k9c3a-1f0e",
                           "ticket")
        rec = await self.node.tickets.get(tenant, ticket)
        if rec is None:
            raise ApiError(404, f"ticket: no ticket {ticket} in tenant {tenant}", "ticket")
        return _json({k: v for k, v in rec.items() if k != "ref"})

    async def forget_member(self, request: web.Request) -> web.Response:
        """Personal data: delete a member's conversations, chat history, offer cap
        and the history of their member channel."""
        node = self.node
        tenant = _segment("tenant", "tenant", request.match_info["tenant"])
        member = _segment("member", "member", request.match_info["member"])
        _allow(request, tenant)
        call = _call(request)
        channel = f"member:{tenant}/{member}"
        call.tenant, call.target = tenant, channel
        conversations, messages = await node.chat.forget_member(tenant, member)
        caps = await node.offers.forget_member(tenant, member)
        entries = await node.history.forget(channel)
        stored = await node.store.archive.forget(channel)
        node.member_forgotten(tenant, member)
        result = {"tenant": tenant, "member": member, "conversations": conversations,
                  "chat_messages": messages, "caps": caps,
                  "channel_entries": max(entries, stored)}
        # (the admin.call audit line carries these counts)
        call.detail = {k: v for k, v in result.items() if k not in ("tenant", "member")}
        log.warning("member data deleted tenant=%s member=%s by=%s conversations=%d "
                    "chat_messages=%d", tenant, member, _who(request), conversations, messages)
        return _json(result)

    async def drain(self, request: web.Request) -> web.Response:
        node = self.node
        call = _call(request)
        call.target = f"node:{node.node_id}"
        token = call.token
        if token.tenants != ("*",):
            raise ApiError(403, f"tenant: token {token.name!r} is limited to tenants "
                                f"{', '.join(token.tenants)}; draining the node needs \"*\"",
                           "tenant")
        doc = await _body(request, required=False, allowed=("delay_ms", "spread_ms", "timeout_s"))
        values = {}
        for field, lo, hi in (("delay_ms", 0, 600_000), ("spread_ms", 0, 600_000),
                              ("timeout_s", 0, 3600)):
            value = doc.get(field)
            if value is None:
                continue
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or not lo <= value <= hi):
                raise ApiError(400, f"{field}: a number {lo}-{hi}", field)
            values[field] = value
        if node.draining:
            raise ApiError(409, "drain: the node is already draining", "drain")
        delay = int(values["delay_ms"]) if "delay_ms" in values else None
        spread = int(values["spread_ms"]) if "spread_ms" in values else None
        connections = len(node.all_connections())
        node.drain(delay, spread, float(values.get("timeout_s", 10.0)))
        detail = {"node": node.node_id, "connections": connections, **values}
        call.detail = detail
        if self.audit is not None:
            self.audit.write("drain", _who(request), peer=request.remote or "", detail=detail)
        log.warning("drain requested through the admin API by=%s", _who(request))
        return _json({"draining": True, "node": node.node_id, "connections": connections}, 202)


# -- authentication, errors and the audit trail ---------------------------------------------


def _authenticate(request: web.Request, tokens) -> tuple[object | None, str]:
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if not header:
        return None, "missing Authorization header (Bearer token)"
    if scheme.lower() != "bearer" or not presented.strip():
        return None, "Authorization: expected 'Bearer <token>'"
    presented_b = presented.strip().encode()
    found = None
    for tok in tokens:               # every token is compared: no early exit
        if hmac.compare_digest(tok.token.encode(), presented_b) and found is None:
            found = tok
    if found is None:
        return None, "unknown or invalid bearer token"
    return found, ""


def _route(request: web.Request) -> str:
    """The route pattern of a request ("unmatched" for an unknown path): a
    label of a closed set, never the path itself."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _middleware(node, cfg, audit):
    tokens = tuple(cfg.admin.tokens)
    counters = node.counters

    @web.middleware
    async def middleware(request: web.Request, handler):
        api = request.path.startswith("/v1/") or request.path == "/v1"
        call = request[_CALL] = Call()
        status = 500
        started = time.perf_counter()
        try:
            if api:
                token, why = _authenticate(request, tokens)
                if token is None:
                    status = 401
                    # Repeats from one address are summed (audit.write_repeated):
                    # a flood of bad tokens cannot rotate the trail away.
                    first = True
                    if audit is not None:
                        first = audit.write_repeated(
                            "admin.unauthorized", request.remote or "", why,
                            detail={"method": request.method, "path": request.path,
                                    "reason": why})
                    if first:
                        log.warning("admin: unauthorized method=%s path=%s from=%s reason=%s",
                                    request.method, request.path, request.remote, why)
                    return _json(_error_doc(why, "Authorization"), 401,
                                 headers={"WWW-Authenticate": 'Bearer realm="tillwire"'})
                call.token = token
            try:
                response = await handler(request)
            except ApiError as exc:
                status = exc.status
                if call.inbound:
                    counters.refuse("admin", exc.code or f"HTTP_{exc.status}")
                return _json(_error_doc(exc.message, exc.field, exc.code), exc.status)
            except web.HTTPException as exc:
                status = exc.status
                if exc.status == 413:
                    doc = _error_doc(f"request body: larger than {request.app[_MAX_BODY]} "
                                     "bytes (server.max_frame_size)", "body")
                elif exc.status == 405:
                    doc = _error_doc(f"method: {request.method} is not allowed on "
                                     f"{request.path}", "method")
                elif exc.status == 404:
                    doc = _error_doc(f"path: no such endpoint {request.path}", "path")
                else:
                    doc = _error_doc(exc.reason or "request refused", "")
                headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
                return _json(doc, exc.status, headers=headers or None)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("admin: %s %s failed", request.method, request.path)
                return _json(_error_doc("internal error"), 500)
            status = response.status
            return response
        finally:
            key = (_route(request), request.method if request.method in _METHODS else "other",
                   status)
            counters.admin_requests[key] = counters.admin_requests.get(key, 0) + 1
            if api and status != 401 and audit is not None:
                detail = {"method": request.method, "path": request.path,
                          "target": call.target, "status": status, **call.detail}
                audit.write("admin.call", _who(request), tenant=call.tenant,
                            terminal=call.terminal, peer=request.remote or "", detail=detail)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("admin: method=%s path=%s status=%s who=%s from=%s ms=%.2f",
                          request.method, request.path, status, _who(request), request.remote,
                          (time.perf_counter() - started) * 1000)

    return middleware


def make_app(node, cfg, audit=None) -> web.Application:
    """The admin application of ``node`` (not started)."""
    limit = cfg.server.max_frame_size
    app = web.Application(middlewares=[_middleware(node, cfg, audit)], client_max_size=limit)
    app[_MAX_BODY] = limit
    h = Handlers(node, cfg, audit)
    app.router.add_get("/metrics", h.metrics)
    app.router.add_get("/healthz", h.healthz)
    app.router.add_get("/readyz", h.readyz)
    app.router.add_get("/v1/openapi.json", h.openapi_doc)
    app.router.add_post("/v1/publish", h.publish)
    app.router.add_post("/v1/terminals", h.post_terminal)
    app.router.add_get("/v1/terminals/{tenant}/{terminal}", h.get_terminal)
    app.router.add_put("/v1/terminals/{tenant}/{terminal}", h.put_terminal)
    app.router.add_delete("/v1/terminals/{tenant}/{terminal}", h.retire)
    app.router.add_post("/v1/terminals/{tenant}/{terminal}/kick", h.kick)
    app.router.add_post("/v1/terminals/{tenant}/{terminal}/revoke", h.revoke)
    app.router.add_get("/v1/presence", h.presence)
    app.router.add_get("/v1/channels", h.channels)
    app.router.add_get("/v1/messages/{id}", h.message)
    app.router.add_get("/v1/dead-letters", h.dead_letters)
    app.router.add_post("/v1/terminals/{tenant}/{terminal}/dead-letters/redrive", h.redrive)
    app.router.add_post("/v1/terminals/{tenant}/{terminal}/dead-letters/{id}/redrive",
                        h.redrive)
    app.router.add_post("/v1/drain", h.drain)
    app.router.add_get("/v1/stores/{tenant}/{store}", h.get_store)
    app.router.add_put("/v1/stores/{tenant}/{store}", h.put_store)
    app.router.add_get("/v1/tickets", h.list_tickets)
    app.router.add_get("/v1/tickets/{tenant}/{ticket}", h.get_ticket)
    app.router.add_delete("/v1/members/{tenant}/{member}", h.forget_member)
    return app


async def start_admin(node, cfg, audit=None, host: str | None = None,
                      port: int | None = None, reuse_port: bool = False) -> web.AppRunner:
    """Serve the admin app on ``host:port`` (default: ``[admin]``); returns the runner
    (``await runner.cleanup()`` stops it; ``runner.addresses`` are the bound ones).
    ``reuse_port``: the workers of a node share the port (SO_REUSEPORT); any
    of them answers, over the state they share in Redis."""
    runner = web.AppRunner(make_app(node, cfg, audit), access_log=None,
                           handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host or cfg.admin.host,
                       cfg.admin.port if port is None else port, reuse_port=reuse_port or None)
    await site.start()
    for addr in runner.addresses:
        log.info("admin API listening host=%s port=%s", addr[0], addr[1])
    return runner
