"""Terminal access tokens: HMAC-SHA256 signed claims.

A token says who a terminal is: its tenant (the retail chain), store,
region, terminal id, roles and, for customer apps, loyalty member id, plus
when it was issued and when it expires.  The format is::

    "tw1." + b64url(payload) + "." + b64url(signature)

with base64url without padding; ``payload`` is the JSON object (orjson)
``{"ten", "sto", "reg", "tid", "rol", "mem", "iat", "exp"}`` and
``signature = HMAC-SHA256(secret as UTF-8, "tw1." + b64url(payload))``.

The server holds the secret (``auth.secret``); the back office (or
``tillwire token``) issues tokens with :func:`issue_token`, and the server
checks the token of every HELLO with :func:`verify_token`.  Verification
checks the signature (in constant time) before it parses anything inside
the payload, accepts only the exact canonical encoding, and answers every
bad input with :class:`~tillwire.core.errors.AuthError` and nothing else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from tillwire.core.codes import Code
from tillwire.core.errors import AuthError

__all__ = [
    "Claims",
    "MAX_TOKEN_LENGTH",
    "ROLES",
    "TOKEN_PREFIX",
    "issue_token",
    "verify_token",
]

TOKEN_PREFIX = "tw1."
"""Version tag of the token format; also the start of the signed text."""

ROLES = ("pos", "kiosk", "staff", "manager", "service", "customer", "backend")
"""Roles a token may carry (PROTOCOL.md section 9)."""

MAX_TOKEN_LENGTH = 2048
"""Longer strings are refused before any work (a real token is under 1 KiB)."""

MAX_TIMESTAMP = 2**53
"""Upper bound of ``iat``/``exp``: integers every JSON reader keeps exact."""

_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ID_TEXT = "1-64 characters of A-Z a-z 0-9 . _ -"
_B64_RE = re.compile(r"[A-Za-z0-9_-]*")
_PAYLOAD_KEYS = frozenset({"ten", "sto", "reg", "tid", "rol", "mem", "iat", "exp"})
_ROLE_TUPLES: dict[tuple[str, ...], tuple[str, ...]] = {}
"""One shared tuple per distinct role list (at most a few hundred: roles are 7)."""


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says about the terminal holding it."""

    tenant: str
    """The retail chain; a terminal never sees another tenant's messages."""
    store: str
    """The store the terminal belongs to."""
    region: str
    """The store's region, or ``""``."""
    terminal: str
    """The terminal's id, unique within the tenant."""
    roles: tuple[str, ...]
    """At least one of :data:`ROLES`, no duplicates, in issue order."""
    member: str
    """Loyalty member id of a customer app, or ``""``."""
    issued_at: int
    """Unix seconds."""
    expires_at: int
    """Unix seconds; the token is refused after it (plus the leeway)."""

    @property
    def address(self) -> str:
        """The terminal's own address, ``"terminal:<tenant>/<terminal>"``."""
        return f"terminal:{self.tenant}/{self.terminal}"


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes | None:
    """Strict unpadded base64url: the alphabet only, and canonical (the text
    must be what :func:`_b64encode` makes of the bytes), else ``None``."""
    if _B64_RE.fullmatch(text) is None or len(text) % 4 == 1:
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return data if _b64encode(data) == text else None


def _key(secret: str) -> bytes:
    if not isinstance(secret, str) or not secret:
        raise ValueError("secret: must be a non-empty string")
    return secret.encode("utf-8")


def _sign(key: bytes, signed_text: str) -> bytes:
    return hmac.new(key, signed_text.encode("ascii"), hashlib.sha256).digest()


def _check_id(field: str, value: object, *, optional: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field}: must be a string, got {value!r}")
    if value == "" and optional:
        return value
    if _ID_RE.fullmatch(value) is None:
        empty = "empty or " if optional else ""
        raise ValueError(f"{field}: must be {empty}{_ID_TEXT}, got {value!r}")
    return value


def issue_token(
    secret: str,
    *,
    tenant: str,
    store: str,
    terminal: str,
    roles: Iterable[str],
    region: str = "",
    member: str = "",
    ttl: float = 86400,
    now: float | None = None,
) -> str:
    """Return a signed token for a terminal.

    ``roles``: one or more of :data:`ROLES` (repeats are dropped, order is
    kept).  ``ttl``: lifetime in seconds (> 0).  ``now``: the issue time in
    Unix seconds (default: the clock).  ``iat`` is ``now`` rounded down and
    ``exp`` is ``now + ttl`` rounded up, so the token lives at least ``ttl``.

    Raises :class:`ValueError` naming the offending argument (``"tenant: ..."``).
    """
    key = _key(secret)
    _check_id("tenant", tenant)
    _check_id("store", store)
    _check_id("region", region, optional=True)
    _check_id("terminal", terminal)
    _check_id("member", member, optional=True)
    if isinstance(roles, str):
        raise ValueError(f"roles: must be a list of roles, not the string {roles!r}")
    role_list: list[str] = []
    for role in roles:
        if role not in ROLES:
            raise ValueError(f"roles: unknown role {role!r} (roles: {', '.join(ROLES)})")
        if role not in role_list:
            role_list.append(role)
    if not role_list:
        raise ValueError("roles: at least one role is required")
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl <= 0:
        raise ValueError(f"ttl: must be a number of seconds > 0, got {ttl!r}")
    if now is None:
        now = time.time()
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not 0 <= now < MAX_TIMESTAMP:
        raise ValueError(f"now: must be Unix seconds, got {now!r}")
    issued_at = math.floor(now)
    expires_at = math.ceil(now + ttl)
    if expires_at > MAX_TIMESTAMP:
        raise ValueError(f"ttl: too large, the token would expire after {MAX_TIMESTAMP}")

    payload = orjson.dumps({
        "ten": tenant,
        "sto": store,
        "reg": region,
        "tid": terminal,
        "rol": role_list,
        "mem": member,
        "iat": issued_at,
        "exp": expires_at,
    })
    signed_text = TOKEN_PREFIX + _b64encode(payload)
    return signed_text + "." + _b64encode(_sign(key, signed_text))


def _claims(payload: bytes) -> Claims | None:
    """The claims of a (signed) payload, or ``None`` if it is not exactly the
    object :func:`issue_token` describes."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.keys() != _PAYLOAD_KEYS:
        return None
    try:
        for field in ("ten", "sto", "tid"):
            _check_id(field, obj[field])
        for field in ("reg", "mem"):
            _check_id(field, obj[field], optional=True)
    except ValueError:
        return None
    roles = obj["rol"]
    if not isinstance(roles, list) or not roles or not all(isinstance(r, str) and r in ROLES for r in roles):
        return None
    if len(set(roles)) != len(roles):
        return None
    iat, exp = obj["iat"], obj["exp"]
    for stamp in (iat, exp):
        if isinstance(stamp, bool) or not isinstance(stamp, int) or not 0 <= stamp <= MAX_TIMESTAMP:
            return None
    if exp < iat:
        return None
    # Tenant, store, region, member and role strings repeat across thousands
    # of connections: intern them so every connection shares one copy.
    intern = sys.intern
    role_tuple = tuple(intern(r) for r in roles)
    return Claims(
        tenant=intern(obj["ten"]),
        store=intern(obj["sto"]),
        region=intern(obj["reg"]),
        terminal=obj["tid"],
        roles=_ROLE_TUPLES.setdefault(role_tuple, role_tuple),
        member=intern(obj["mem"]),
        issued_at=iat,
        expires_at=exp,
    )


def verify_token(secret: str, token: str, *, now: float | None = None, leeway: float = 300.0) -> Claims:
    """Check ``token`` and return its claims.

    ``now``: Unix seconds (default: the clock).  ``leeway``: tolerated clock
    difference in seconds (``auth.clock_skew``).  Raises
    :class:`AuthError` with

    * ``Code.TOKEN_EXPIRED`` when ``now > exp + leeway``;
    * ``Code.AUTH_FAILED`` for anything else wrong: not a string, too long,
      not the ``tw1`` format, non-canonical base64url, a bad signature (a
      constant-time comparison), a payload that is not exactly the documented
      object, or ``iat > now + leeway`` (issued in the future).

    For any ``token`` value nothing but :class:`AuthError` is raised.  An
    empty ``secret`` or a negative ``leeway`` is the caller's bug:
    :class:`ValueError`.
    """
    key = _key(secret)
    if isinstance(leeway, bool) or not isinstance(leeway, (int, float)) or not leeway >= 0:
        raise ValueError(f"leeway: must be a number of seconds >= 0, got {leeway!r}")

    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX) or len(token) > MAX_TOKEN_LENGTH:
        raise AuthError(Code.AUTH_FAILED, "malformed token")
    payload_b64, dot, signature_b64 = token[len(TOKEN_PREFIX):].partition(".")
    payload = _b64decode(payload_b64) if dot else None
    signature = _b64decode(signature_b64) if dot else None
    if payload is None or signature is None:
        raise AuthError(Code.AUTH_FAILED, "malformed token")
    # The signed text is ASCII: the prefix and a checked base64url segment.
    if not hmac.compare_digest(_sign(key, TOKEN_PREFIX + payload_b64), signature):
        raise AuthError(Code.AUTH_FAILED, "bad token signature")

    claims = _claims(payload)
    if claims is None:
        raise AuthError(Code.AUTH_FAILED, "malformed token claims")
    if now is None:
        now = time.time()
    if claims.issued_at > now + leeway:
        raise AuthError(Code.AUTH_FAILED, "token issued in the future (check the clocks)")
    if now > claims.expires_at + leeway:
        raise AuthError(Code.TOKEN_EXPIRED, "token expired")
    return claims
