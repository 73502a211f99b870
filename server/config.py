"""Tillwire's configuration: frozen dataclasses, loaded and validated once.

Sources, each overriding the one before it::

    defaults  <-  TOML file (--config PATH)  <-  environment (TILLWIRE_*)  <-  CLI flags

:func:`load_config` reads them, checks every value's type and range, checks
the relations between keys (``heartbeat.min <= heartbeat.interval``...) and
returns a :class:`Config`.  Every problem is a
:class:`~tillwire.core.errors.ConfigError` whose ``key`` is the dotted name
(``"server.port"``); when the value came from an environment variable the
message names it too::

    server.port (TILLWIRE_SERVER_PORT): must be an integer 1-65535, got 'x'

Unknown sections and keys in the file, and unknown ``TILLWIRE_*`` variables,
are errors as well (a typo must not silently leave a default in place).

Value syntax:

* durations are seconds (a number) or a string with a unit: ``"500ms"``,
  ``"30s"``, ``"5m"``, ``"1h"``, ``"1d"`` (see :func:`parse_duration`);
* sizes are bytes (an integer) or a string with a binary unit: ``"512B"``,
  ``"64KiB"``, ``"1MiB"``, ``"1GiB"`` (see :func:`parse_size`);
* in the environment, booleans are ``1/0``, ``true/false`` or ``yes/no`` and
  lists are comma separated (``TILLWIRE_LANES_WEIGHTS=8,4,1``).

The dataclasses themselves do not validate: :func:`load_config` does.  Code
and tests may build them directly (``dataclasses.replace(cfg.server, port=0)``
for an ephemeral port) and take responsibility for the values.

Every key is declared once, as a dataclass field whose metadata carries its
kind (type, range, parser) and a one-line description; :func:`describe_keys`
turns that into the README's key table and ``tillwire config --keys``.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import socket
import tomllib
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from tillwire.core.codes import (
    DEFAULT_COMPRESS_THRESHOLD,
    DEFAULT_MAX_FRAME_SIZE,
    MAX_FRAME_SIZE_LIMIT,
    MIN_FRAME_SIZE_LIMIT,
)
from tillwire.core.errors import ConfigError

__all__ = [
    "AdminConfig",
    "AdminToken",
    "AuthConfig",
    "AutoReply",
    "Config",
    "DeliveryConfig",
    "DirectoryConfig",
    "ENV_PREFIX",
    "HeartbeatConfig",
    "HistoryConfig",
    "LanesConfig",
    "LimitsConfig",
    "LogConfig",
    "NON_CONFIG_ENV",
    "OffersConfig",
    "RedisConfig",
    "RetentionConfig",
    "ServerConfig",
    "StoreConfig",
    "StoreEntry",
    "TicketsConfig",
    "TlsConfig",
    "audit_log_path",
    "describe_keys",
    "load_config",
    "node_id",
    "parse_clock",
    "parse_duration",
    "parse_size",
    "role_value",
    "zone_ok",
]

ENV_PREFIX = "TILLWIRE_"
"""Every environment variable Tillwire reads starts with this."""

SECRET_ENV = "TILLWIRE_SECRET"
"""Alias of ``TILLWIRE_AUTH_SECRET``."""

ADMIN_TOKEN_ENV = "TILLWIRE_ADMIN_TOKEN"
"""Adds one admin token named ``"env"`` for all tenants to ``admin.tokens``."""

ENV_ADMIN_TOKEN_NAME = "env"
"""Name of the admin token that ``TILLWIRE_ADMIN_TOKEN`` adds."""

NON_CONFIG_ENV: dict[str, str] = {
    "TILLWIRE_NO_EXTENSIONS": "1 = use the pure-Python twins of the core modules (and build none)",
    "TILLWIRE_DEBUG": "1 = compile the core modules with assertions and without optimisation",
    "TILLWIRE_CONFIG": "default config file path for --config",
}
"""``TILLWIRE_*`` variables that are not configuration keys.

The loader ignores them; any other unknown ``TILLWIRE_*`` variable is a
:class:`ConfigError`.  A new switch read elsewhere must be added here.
"""

MASK = "***"
"""What :meth:`Config.to_dict` shows instead of a secret."""

_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ID_TEXT = "1-64 characters of A-Z a-z 0-9 . _ -"


# --------------------------------------------------------------------------
# Durations and sizes


_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE_RE = re.compile(r"(\d+)\s*([a-z]*)")
_SIZE_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_duration(value: str | int | float) -> float:
    """Return a duration in seconds.

    Accepts a non-negative number of seconds, or a string: a number with an
    optional unit ``ms``, ``s``, ``m``, ``h`` or ``d`` (``"500ms"``,
    ``"30s"``, ``"1.5h"``, ``"30"``; case-insensitive, blanks allowed).
    Raises :class:`ValueError` for anything else, including negative and
    non-finite values and booleans.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip().lower())
        if match is None or match.group(2) not in _DURATION_UNITS:
            raise ValueError(
                f"not a duration: {value!r} (use seconds or a number with ms, s, m, h or d)"
            )
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"not a duration: {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {value!r} (must be finite and not negative)")
    return seconds


def parse_size(value: str | int) -> int:
    """Return a size in bytes.

    Accepts a non-negative integer, or a string: an integer with an optional
    binary unit ``B``, ``KiB``, ``MiB``, ``GiB`` or ``TiB`` (``"512B"``,
    ``"64KiB"``, ``"1MiB"``; case-insensitive, blanks allowed).  Decimal
    units (``KB``, ``MB``) are refused because they are ambiguous.  Raises
    :class:`ValueError` for anything else, including floats and booleans.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"not a size: {value!r} (must not be negative)")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip().lower())
        if match is not None and match.group(2) in _SIZE_UNITS:
            return int(match.group(1)) * _SIZE_UNITS[match.group(2)]
        raise ValueError(
            f"not a size: {value!r} (use bytes or an integer with B, KiB, MiB, GiB or TiB)"
        )
    raise ValueError(f"not a size: {value!r}")


# --------------------------------------------------------------------------
# Kinds of values.  Each turns a file/override value (``from_value``) or an
# environment string (``from_text``) into the stored value, or raises
# ValueError; ``expect`` completes the sentence "must be ...".


class _Kind:
    expect = "a value"

    def from_value(self, value: Any) -> Any:
        raise NotImplementedError

    def from_text(self, text: str) -> Any:
        return self.from_value(text)

    def plain(self, value: Any) -> Any:
        """The JSON/TOML-friendly form of a stored value."""
        return value


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range_text(lo: float | None, hi: float | None, strict: bool = False) -> str:
    """``"1-65535"``, ``">= 1"``, ``"> 0"`` or ``""``."""
    if lo is not None and hi is not None:
        return f"{_num(lo)}-{_num(hi)}"
    if lo is not None:
        return f"{'>' if strict else '>='} {_num(lo)}"
    return ""


class _Int(_Kind):
    def __init__(self, lo: int | None = None, hi: int | None = None) -> None:
        self.lo, self.hi = lo, hi
        self.expect = f"an integer {_range_text(lo, hi)}".rstrip()

    def check(self, number: int) -> int:
        if (self.lo is not None and number < self.lo) or (self.hi is not None and number > self.hi):
            raise ValueError("out of range")
        return number

    def from_value(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("not an integer")
        return self.check(value)

    def from_text(self, text: str) -> int:
        if re.fullmatch(r"[+-]?\d+", text.strip()) is None:
            raise ValueError("not an integer")
        return self.check(int(text))


class _Size(_Int):
    def __init__(self, lo: int, hi: int | None = None) -> None:
        super().__init__(lo, hi)
        rng = f"of {lo}-{hi}" if hi is not None else f">= {lo}"
        self.expect = f"a size {rng} bytes (an integer, or a string like '64KiB')"

    def from_value(self, value: Any) -> int:
        return self.check(parse_size(value))

    from_text = from_value


class _Duration(_Kind):
    def __init__(self, lo: float = 0.0, strict: bool = True) -> None:
        self.lo, self.strict = lo, strict
        self.expect = (
            f"a duration {_range_text(lo, None, strict)} seconds "
            "(a number, or a string like '30s', '500ms', '5m')"
        )

    def from_value(self, value: Any) -> float:
        seconds = parse_duration(value)
        if seconds < self.lo or (self.strict and seconds == self.lo):
            raise ValueError("out of range")
        return seconds

    from_text = from_value


class _Number(_Kind):
    """A plain float (milliseconds keys); accepts ints, refuses nan/inf."""

    def __init__(self, lo: float = 0.0) -> None:
        self.lo = lo
        self.expect = f"a number >= {lo:g}"

    def from_value(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("not a number")
        number = float(value)
        if not math.isfinite(number) or number < self.lo:
            raise ValueError("out of range")
        return number

    def from_text(self, text: str) -> float:
        if re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)", text.strip()) is None:
            raise ValueError("not a number")
        return self.from_value(float(text))


class _Bool(_Kind):
    expect = "a boolean (true/false; in the environment also 1/0, yes/no)"
    _TEXT = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}

    def from_value(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError("not a boolean")
        return value

    def from_text(self, text: str) -> bool:
        try:
            return self._TEXT[text.strip().lower()]
        except KeyError:
            raise ValueError("not a boolean") from None


class _Str(_Kind):
    def __init__(self, pattern: re.Pattern[str] | None = None, expect: str = "a string",
                 nonempty: bool = False, allow_empty_pattern: bool = False) -> None:
        self.pattern = pattern
        self.nonempty = nonempty
        self.allow_empty_pattern = allow_empty_pattern
        self.expect = expect

    def from_value(self, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError("not a string")
        if self.nonempty and not value:
            raise ValueError("empty")
        if self.pattern is not None and not (value == "" and self.allow_empty_pattern):
            if self.pattern.fullmatch(value) is None:
                raise ValueError("bad format")
        return value


class _Choice(_Kind):
    """One of a few words; matched case-insensitively, stored in canonical case."""

    def __init__(self, *choices: str) -> None:
        self.choices = {c.lower(): c for c in choices}
        self.expect = "one of " + ", ".join(repr(c) for c in choices)

    def from_value(self, value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in self.choices:
            raise ValueError("not a choice")
        return self.choices[value.strip().lower()]


class _IntTuple(_Kind):
    """A fixed-length list of integers; stored as a tuple."""

    def __init__(self, length: int, lo: int, hi: int) -> None:
        self.length, self.lo, self.hi = length, lo, hi
        self.expect = (f"a list of {length} integers {lo}-{hi}, e.g. [8, 4, 1] "
                       "(in the environment 8,4,1)")

    def from_value(self, value: Any) -> tuple[int, ...]:
        if not isinstance(value, (list, tuple)) or len(value) != self.length:
            raise ValueError("bad list")
        for item in value:
            if (isinstance(item, bool) or not isinstance(item, int)
                    or not self.lo <= item <= self.hi):
                raise ValueError("bad item")
        return tuple(value)

    def from_text(self, text: str) -> tuple[int, ...]:
        body = text.strip()
        if body.startswith("[") and body.endswith("]"):
            body = body[1:-1]
        parts = [p.strip() for p in body.split(",")]
        if not all(re.fullmatch(r"\d+", p) for p in parts):
            raise ValueError("bad list")
        return self.from_value([int(p) for p in parts])

    def plain(self, value: tuple[int, ...]) -> list[int]:
        return list(value)


class _Tables(_Kind):
    """A list of TOML tables (``[[section.key]]``), checked item by item by
    :meth:`tables`; settable from the file and overrides, never from the
    environment."""

    def tables(self, raw: Any, where: str) -> tuple:
        raise NotImplementedError


class _AdminTokens(_Tables):
    """``admin.tokens``: checked item by item in :func:`_admin_tokens`."""

    expect = "a list of tables {name, token, tenants}"

    def tables(self, raw: Any, where: str) -> tuple:
        return tuple(_admin_tokens(raw, where))

    def plain(self, value: tuple[AdminToken, ...]) -> list[dict[str, Any]]:
        return [{"name": t.name, "token": t.token, "tenants": list(t.tenants)} for t in value]


def zone_ok(name: Any) -> bool:
    """Is ``name`` an IANA time zone this machine knows (``Asia/Shanghai``)?"""
    if not isinstance(name, str) or not name or len(name) > 64:
        return False
    try:
        zoneinfo.ZoneInfo(name)
    except Exception:  # noqa: BLE001 - ZoneInfoNotFoundError, ValueError, OSError for odd names
        return False
    return True


class _Timezone(_Kind):
    expect = "an IANA time zone name like 'UTC' or 'Asia/Shanghai'"

    def from_value(self, value: Any) -> str:
        if not zone_ok(value):
            raise ValueError("unknown time zone")
        return value


_CLOCK_RE = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")


def parse_clock(text: str) -> int:
    """``"HH:MM"`` (24-hour, 00:00-23:59) -> minutes after midnight; ValueError otherwise."""
    match = _CLOCK_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"not a time of day: {text!r} (use HH:MM, 00:00-23:59)")
    return int(match.group(1)) * 60 + int(match.group(2))


class _Clock(_Kind):
    expect = "a time of day HH:MM (00:00-23:59)"

    def from_value(self, value: Any) -> str:
        parse_clock(value)
        return value


ROLE_NAMES = ("pos", "kiosk", "staff", "manager", "service", "customer", "backend")
"""The token roles (server/auth.py ROLES; a test keeps the two equal)."""


class _RoleMap(_Kind):
    """Integers by token role, ``"*"`` for every role not named: a TOML table
    ``{backend = 16384, "*" = 256}``, in the environment ``backend=16384,*=256``.
    A value names overrides the default's entry of the same role; the rest of
    the default stays."""

    def __init__(self, default: dict[str, int], lo: int = 0, hi: int = 10**9) -> None:
        self.default, self.lo, self.hi = dict(default), lo, hi
        self.expect = (f'a table of integers {lo}-{hi} by role (pos, kiosk, staff, manager, '
                       'service, customer, backend, "*" for the rest), e.g. '
                       '{backend = 16384, "*" = 256} (in the environment backend=16384,*=256)')

    def from_value(self, value: Any) -> tuple[tuple[str, int], ...]:
        if not isinstance(value, Mapping):
            raise ValueError("not a table")
        merged = dict(self.default)
        for role, number in value.items():
            if role != "*" and role not in ROLE_NAMES:
                raise ValueError("unknown role")
            if isinstance(number, bool) or not isinstance(number, int) \
                    or not self.lo <= number <= self.hi:
                raise ValueError("bad number")
            merged[role] = number
        return tuple(sorted(merged.items()))

    def from_text(self, text: str) -> tuple[tuple[str, int], ...]:
        table = {}
        for part in text.split(","):
            role, sep, number = part.strip().partition("=")
            if not sep or re.fullmatch(r"\d+", number.strip()) is None:
                raise ValueError("bad entry")
            table[role.strip()] = int(number)
        return self.from_value(table)

    def plain(self, value) -> dict[str, int]:
        return dict(value)


class _TenantChoice(_Kind):
    """One of a few words by tenant, ``"*"`` for every tenant not named: a
    word alone (every tenant), a TOML table ``{"*" = "refuse", legacy =
    "accept"}``, in the environment ``accept`` or ``*=refuse,legacy=accept``.
    Stored as sorted (tenant, word) pairs, ``"*"`` always among them."""

    def __init__(self, *choices: str) -> None:
        self.choices = choices
        words = ", ".join(choices)
        self.expect = (f"one of {words}, or a table of them by tenant id with \"*\" for the "
                       f'rest, e.g. {{"*" = "{choices[0]}", legacy = "{choices[-1]}"}} (in the '
                       f"environment *={choices[0]},legacy={choices[-1]})")

    def from_value(self, value: Any) -> tuple[tuple[str, str], ...]:
        if isinstance(value, str):
            value = {"*": value}
        if not isinstance(value, Mapping) or not value:
            raise ValueError("not a table")
        table = {"*": self.choices[0]}
        for tenant, word in value.items():
            if not isinstance(tenant, str) or (tenant != "*" and _ID_RE.fullmatch(tenant) is None):
                raise ValueError("bad tenant")
            if not isinstance(word, str) or word.strip().lower() not in self.choices:
                raise ValueError("bad word")
            table[tenant] = word.strip().lower()
        return tuple(sorted(table.items()))

    def from_text(self, text: str) -> tuple[tuple[str, str], ...]:
        if "=" not in text:
            return self.from_value(text)
        table = {}
        for part in text.split(","):
            tenant, _, word = part.strip().partition("=")
            table[tenant.strip()] = word.strip()
        return self.from_value(table)

    def plain(self, value) -> dict[str, str]:
        return dict(value)


def tenant_value(table, tenant: str) -> str:
    """The word a per-tenant table gives ``tenant`` (its own entry, else ``"*"``'s)."""
    entries = dict(table)
    return entries.get(tenant, entries["*"])


def role_value(table, roles) -> int:
    """The most generous value a token with ``roles`` gets from a role table
    (0 = no limit beats any number): each role's entry, or ``"*"``'s."""
    entries = dict(table)
    other = entries.get("*", 0)
    values = [entries.get(r, other) for r in roles] or [other]
    return 0 if 0 in values else max(values)


class _Roles(_Kind):
    """A list of token roles (in the environment comma separated)."""

    expect = ("a list of roles (pos, kiosk, staff, manager, service, customer, backend), "
              'e.g. ["customer", "backend"]')

    def from_value(self, value: Any) -> tuple[str, ...]:
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(r, str) and r in ROLE_NAMES for r in value):
            raise ValueError("bad roles")
        return tuple(dict.fromkeys(value))

    def from_text(self, text: str) -> tuple[str, ...]:
        return self.from_value([r.strip() for r in text.split(",") if r.strip()])

    def plain(self, value: tuple[str, ...]) -> list[str]:
        return list(value)


class _StoreTables(_Tables):
    """``directory.stores``: checked item by item in :func:`_store_entries`."""

    expect = "a list of tables {tenant, store, timezone, on_duty, managers}"

    def tables(self, raw: Any, where: str) -> tuple:
        return tuple(_store_entries(raw, where))

    def plain(self, value: tuple[StoreEntry, ...]) -> list[dict[str, Any]]:
        out = []
        for e in value:
            doc: dict[str, Any] = {"tenant": e.tenant, "store": e.store}
            if e.timezone:
                doc["timezone"] = e.timezone
            doc["on_duty"] = list(e.on_duty)
            doc["managers"] = list(e.managers)
            out.append(doc)
        return out


class _AutoReplyTables(_Tables):
    """``tickets.auto_replies``: checked item by item in :func:`_auto_replies`."""

    expect = "a list of tables {code, reply, tenant}"

    def tables(self, raw: Any, where: str) -> tuple:
        return tuple(_auto_replies(raw, where))

    def plain(self, value: tuple[AutoReply, ...]) -> list[dict[str, Any]]:
        return [{"code": r.code, "reply": r.reply, "tenant": r.tenant} for r in value]


def _key(default: Any, kind: _Kind, doc: str) -> Any:
    """Declare a config key: its default, its kind and a one-line description."""
    return field(default=default, metadata={"kind": kind, "doc": doc})


# --------------------------------------------------------------------------
# The sections


_HOST = _Str(nonempty=True, expect="a non-empty host name or address")
_POSITIVE = _Duration(0.0)  # a duration > 0


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server]``: the terminal listener and connection limits."""

    host: str = _key(
        "127.0.0.1", _HOST,
        "Address the terminal listener binds (0.0.0.0 or :: for all interfaces).")
    port: int = _key(
        7070, _Int(0, 65535),
        "TCP port of the terminal listener (0 = any free port, logged at start).")
    data_dir: str = _key(
        "./data", _Str(nonempty=True, expect="a non-empty path"),
        "Directory of the store, the audit log and other state (relative to the working directory).")
    node_id: str = _key(
        "", _Str(_ID_RE, f"empty or {_ID_TEXT}", allow_empty_pattern=True),
        "This node's id in a cluster; empty = derive '<hostname>-<pid>' at start.")
    max_frame_size: int = _key(
        DEFAULT_MAX_FRAME_SIZE, _Size(MIN_FRAME_SIZE_LIMIT, MAX_FRAME_SIZE_LIMIT),
        "Largest frame the server sends, and the largest admin publish body (bytes); what "
        "terminals may send, announced in WELCOME, is the smaller of this and "
        "limits.max_send_body + 1024.")
    compress_threshold: int = _key(
        DEFAULT_COMPRESS_THRESHOLD, _Size(0),
        "Payloads of at least this many bytes are lz4-compressed when it helps (0 = never).")
    auth_timeout: float = _key(
        10.0, _POSITIVE,
        "Time a new connection has to complete HELLO before CLOSE AUTH_TIMEOUT.")
    backlog: int = _key(
        4096, _Int(1),
        "Listen backlog of the terminal socket.")
    send_buffer: int = _key(
        65536, _Size(4096),
        "SO_SNDBUF of each terminal socket (bytes).")
    notsent_lowat: int = _key(
        24576, _Size(0),
        "TCP_NOTSENT_LOWAT of each terminal socket: unsent bytes the kernel holds for a slow "
        "terminal before it takes no more, so a P0 waits behind little P3 already written "
        "(0 = the system's default, net.ipv4.tcp_notsent_lowat).")
    write_high_water: int = _key(
        8192, _Size(1024),
        "Transport write buffer high-water mark: above it the connection stops draining its lanes.")
    write_chunk: int = _key(
        24576, _Size(1024),
        "Most bytes drained from the lanes into one transport write.")
    read_budget_ms: float = _key(
        2.0, _Number(0.0),
        "Milliseconds of one connection's received frames handled in one go; the rest waits "
        "(its reading paused) until commits, other connections and writes had their turn. "
        "Raised to the last write flush's duration when that is longer (0 = no limit).")
    flush_slice_ms: float = _key(
        2.0, _Number(0.0),
        "Milliseconds of writing to connections in one go: past it the rest of a flush waits "
        "until received frames and commits had their turn (a payment result is not held "
        "behind a promotion flood's writes to every terminal; 0 = no limit).")
    workers: int = _key(
        1, _Int(1, 64),
        "Worker processes of this node, sharing server.port (SO_REUSEPORT) and admin.port; "
        "a supervisor restarts one that dies. More than 1 needs redis.url.")
    max_connections: int = _key(
        0, _Int(0),
        "Most concurrent terminal connections; more are refused at once with CLOSE "
        "CONNECTION_LIMIT (0 = the process's open-file limit less 256 for the store, logs and "
        "admin connections).")


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """``[auth]``: terminal access tokens."""

    secret: str = _key(
        "", _Str(),
        "HMAC-SHA256 secret that signs terminal tokens (alias TILLWIRE_SECRET); required to serve.")
    clock_skew: float = _key(
        300.0, _Duration(0.0, strict=False),
        "Leeway for token expiry and issued-at checks against this server's clock.")
    default_ttl: float = _key(
        86400.0, _POSITIVE,
        "Lifetime of tokens made by 'tillwire token' without --ttl.")


@dataclass(frozen=True, slots=True)
class HeartbeatConfig:
    """``[heartbeat]``: the heartbeat interval terminals get, and the timer wheel."""

    interval: float = _key(
        30.0, _POSITIVE,
        "Heartbeat granted to a terminal that asks for none (HELLO heartbeat 0).")
    min: float = _key(
        5.0, _POSITIVE,
        "Shortest heartbeat a terminal may ask for (requests are clamped).")
    max: float = _key(
        600.0, _POSITIVE,
        "Longest heartbeat a terminal may ask for (requests are clamped).")
    tick: float = _key(
        0.5, _POSITIVE,
        "Resolution of the timing wheel behind heartbeats, timeouts and retransmits.")
    wheel_size: int = _key(
        512, _Int(8),
        "Buckets of the timing wheel (rounded up to a power of two).")


@dataclass(frozen=True, slots=True)
class LanesConfig:
    """``[lanes]``: the per-connection outbound lane scheduler."""

    max_queued_bytes: int = _key(
        2097152, _Size(4096),
        "Outbound bytes queued per connection before P3 then P2 are shed (P0/P1 overflow = slow "
        "consumer); at least server.max_frame_size + 64.")
    weights: tuple[int, int, int] = _key(
        (8, 4, 1), _IntTuple(3, 1, 65535),
        "Weighted round-robin frame credits of P1, P2, P3 (P0 always goes first).")
    p3_ttl: float = _key(
        300.0, _POSITIVE,
        "Default time to live of P3 (promotion) messages.")


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """``[delivery]``: inboxes, acknowledgements and retransmits (P0/P1)."""

    retransmit_initial: float = _key(
        5.0, _POSITIVE,
        "First retransmit timeout of an unacknowledged P0/P1 message.")
    retransmit_max: float = _key(
        60.0, _POSITIVE,
        "Cap of the retransmit backoff (>= retransmit_initial).")
    p0_ttl: float = _key(
        604800.0, _POSITIVE,
        "Default time to live of P0 messages before they go to the dead letters.")
    p1_ttl: float = _key(
        604800.0, _POSITIVE,
        "Default time to live of P1 messages before they go to the dead letters.")
    dedup_window: float = _key(
        86400.0, _POSITIVE,
        "How long a SEND ref is remembered for idempotency.")
    ack_batch_ms: float = _key(
        2.0, _Number(0.0),
        "Milliseconds the server gathers terminals' ACKs (and delivery traces) before writing them "
        "to the store in one batch (0 = next loop iteration).")
    inflight: int = _key(
        256, _Int(1),
        "Most unacknowledged P0 (and P1) messages in flight to one terminal.")
    max_uncommitted: int = _key(
        20000, _Int(1),
        "Most P0/P1 messages waiting for the store at once: past it the server stops reading "
        "terminals' P0/P1 SENDs until the store catches up (a slow store costs senders latency, "
        "not server memory).")
    slow_consumer_timeout: float = _key(
        30.0, _POSITIVE,
        "A terminal whose P0/P1 backlog cannot be written for this long is closed with "
        "SLOW_CONSUMER (its messages stay in the store).")
    unknown_terminals: tuple = _key(
        (("*", "refuse"),), _TenantChoice("refuse", "accept"),
        "A P0/P1 message to a terminal that never logged in and was not provisioned (POST "
        "/v1/terminals), by tenant: refuse (ERROR UNKNOWN_TERMINAL, HTTP 404; nothing stored) or "
        "accept (stored until its first login, for chains that mint tokens offline).")


_UNACKED = {"*": 256, "backend": 16384}
_SEND_RATE = {"*": 50, "customer": 5, "backend": 0}
_SEND_BURST = {"*": 100, "customer": 20, "backend": 0}


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """``[limits]``: what one connection, source address or tenant may cost the server."""

    handshake_frame: int = _key(
        8192, _Size(MIN_FRAME_SIZE_LIMIT, MAX_FRAME_SIZE_LIMIT),
        "Largest frame a connection may send before its HELLO (bytes): all a stranger can make "
        "the server buffer; longer is CLOSE FRAME_TOO_LARGE.")
    max_send_body: int = _key(
        65536, _Size(64, MAX_FRAME_SIZE_LIMIT),
        "Largest SEND body a terminal may send (bytes, after decompression); larger is "
        "BAD_MESSAGE, and a frame more than 1 KiB larger (or a payload decompressing to more) is "
        "CLOSE FRAME_TOO_LARGE before it is buffered. Admin publishes are limited by "
        "server.max_frame_size.")
    max_body_depth: int = _key(
        32, _Int(1, 128),
        "Deepest nesting of a message body's JSON (terminal SENDs and admin publishes); deeper "
        "is BAD_MESSAGE (HTTP 400).")
    unacked_sends: tuple = _key(
        tuple(sorted(_UNACKED.items())), _RoleMap(_UNACKED),
        "P0/P1 SENDs a connection may have awaiting their SENDACK, by role (a token's most "
        "generous role counts; 0 = no limit); one more is refused with ERROR TOO_MANY_UNACKED "
        "and a retry hint.")
    send_rate: tuple = _key(
        tuple(sorted(_SEND_RATE.items())), _RoleMap(_SEND_RATE),
        "SENDs per second per lane of one connection, by role (0 = no limit): over it the "
        "server stops reading the connection until the lane's token bucket refills.")
    send_burst: tuple = _key(
        tuple(sorted(_SEND_BURST.items())), _RoleMap(_SEND_BURST),
        "Size of each lane's token bucket of send_rate, by role (0 = the rate's one second).")
    send_wait_max: float = _key(
        5.0, _POSITIVE,
        "Longest a SEND may wait behind its connection's rate; one that would wait longer is "
        "refused with ERROR RATE_LIMITED and a retry hint.")
    request_rate: int = _key(
        20, _Int(0),
        "SUBSCRIBE, UNSUBSCRIBE and HISTORY requests per second of one connection (0 = no "
        "limit): over it the server stops reading the connection until its bucket refills.")
    request_burst: int = _key(
        100, _Int(1),
        "Size of the request_rate token bucket.")
    max_subscriptions: int = _key(
        64, _Int(0),
        "Channels one connection may SUBSCRIBE to (besides those its token implies); one more "
        "is refused with ERROR TOO_MANY_SUBSCRIPTIONS.")
    topic_roles: tuple = _key(
        ("pos", "kiosk", "staff", "manager", "service", "backend"), _Roles(),
        "Roles that may SUBSCRIBE to topic: channels.")
    segment_roles: tuple = _key(
        ("customer", "backend"), _Roles(),
        "Roles that may SUBSCRIBE to segment: channels (member segments' offers).")
    history_page: int = _key(
        256, _Int(1, 100000),
        "Most items one HISTORY answer carries; a longer history is paged (HISTORY_END code "
        "PARTIAL: ask again from its offset).")
    max_connections_per_source: int = _key(
        0, _Int(0),
        "Most concurrent connections from one IP address to one worker (0 = no cap: stores "
        "sit behind NAT and phones behind carrier NAT); more are refused with CLOSE "
        "CONNECTION_LIMIT.")
    max_connections_per_tenant: int = _key(
        0, _Int(0),
        "Most concurrent sessions of one tenant on one worker (0 = no cap); more are refused "
        "after HELLO with CLOSE CONNECTION_LIMIT.")
    auth_fail_delay_max: float = _key(
        5.0, _Duration(0.0, strict=False),
        "Longest delay before CLOSE AUTH_FAILED for a source address that keeps failing: the "
        "delay doubles from 50 ms after its third failure within a minute (0 = no delay). A "
        "valid token is never delayed.")


@dataclass(frozen=True, slots=True)
class HistoryConfig:
    """``[history]``: the bounded history of each channel."""

    max_messages: int = _key(
        1000, _Int(0),
        "Messages kept per channel for replay and HISTORY (0 = none).")
    max_age: float = _key(
        3600.0, _POSITIVE,
        "Oldest message kept in a channel's history.")


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """``[store]``: where inboxes and dedup state live."""

    backend: str = _key(
        "sqlite", _Choice("memory", "sqlite", "redis"),
        "Message store: sqlite (durable, <data_dir>/tillwire.db; the embedded default), "
        "memory (everything is lost when the process ends) or redis (shared by every worker "
        "and node of a fleet; the default when redis.url is set).")
    synchronous: str = _key(
        "FULL", _Choice("OFF", "NORMAL", "FULL", "EXTRA"),
        "SQLite PRAGMA synchronous of the sqlite store.")
    group_commit_ms: float = _key(
        2.0, _Number(0.0),
        "Milliseconds the sqlite store gathers writes into one commit (0 = commit each).")
    writer: str = _key(
        "process", _Choice("process", "thread"),
        "Where the sqlite store's writer runs: process (its own process, in parallel with the "
        "event loop; the default) or thread (a thread of the server, sharing its GIL).")


@dataclass(frozen=True, slots=True)
class AdminToken:
    """One bearer token of the admin API and the tenants it may act on."""

    name: str
    """Who holds it (unique; written to the audit log)."""
    token: str
    """The bearer token itself (secret)."""
    tenants: tuple[str, ...] = ("*",)
    """``("*",)`` for every tenant, or the tenant ids it may act on."""

    def allows(self, tenant: str) -> bool:
        """True if this token may act on ``tenant``."""
        return self.tenants == ("*",) or tenant in self.tenants


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """``[admin]``: the HTTP admin API and metrics listener."""

    host: str = _key(
        "127.0.0.1", _HOST,
        "Address the admin API binds.")
    port: int = _key(
        7071, _Int(0, 65535),
        "TCP port of the admin API (0 = disabled).")
    tokens: tuple[AdminToken, ...] = _key(
        (), _AdminTokens(),
        'Admin API bearer tokens: [[admin.tokens]] name, token, tenants (["*"] or ids); '
        'TILLWIRE_ADMIN_TOKEN adds one named "env" for all tenants.')


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``[log]``: the process log and the audit log."""

    level: str = _key(
        "info", _Choice("debug", "info", "warning", "error"),
        "Lowest level logged.")
    format: str = _key(
        "kv", _Choice("kv", "json"),
        "Log line format: key=value text or one JSON object per line.")
    audit_path: str = _key(
        "", _Str(),
        "Audit log file; empty = <data_dir>/audit.log.")
    audit_max_bytes: int = _key(
        10485760, _Size(4096),
        "Size at which the audit log is rotated.")
    audit_backups: int = _key(
        5, _Int(0),
        "Rotated audit log files kept.")


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """``[redis]``: the cluster bus and shared store (empty url = one embedded node)."""

    url: str = _key(
        "", _Str(re.compile(r"(redis|rediss|unix)://\S+"), "empty or a redis://, rediss:// or unix:// URL",
                 allow_empty_pattern=True),
        "Redis URL of the fleet: presence, routing, channel history, the registry and the "
        "store live there, and server.workers may be more than 1; empty = the embedded "
        "single-process default.")
    prefix: str = _key(
        "tw", _Str(re.compile(r"[A-Za-z0-9._:-]{1,64}"), "1-64 characters of A-Z a-z 0-9 . _ : -"),
        "Prefix of every Redis key and channel this cluster uses.")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """``[tls]``: TLS on the terminal listener (off while cert and key are empty)."""

    cert: str = _key(
        "", _Str(),
        "PEM certificate chain file; with key, enables TLS.")
    key: str = _key(
        "", _Str(),
        "PEM private key file of cert.")
    client_ca: str = _key(
        "", _Str(),
        "PEM CA bundle to verify terminal certificates (mutual TLS when set).")
    require_client_cert: bool = _key(
        False, _Bool(),
        "Refuse terminals without a certificate signed by client_ca.")


@dataclass(frozen=True, slots=True)
class StoreEntry:
    """One store of ``directory.stores``: its time zone and who works there."""

    tenant: str
    store: str
    timezone: str = ""
    """IANA name; empty = ``directory.default_timezone``."""
    on_duty: tuple[str, ...] = ()
    """Terminal ids that get the store's cashier tickets (empty = the store's staff role)."""
    managers: tuple[str, ...] = ()
    """Terminal ids that get escalations (empty = the store's manager role)."""


@dataclass(frozen=True, slots=True)
class DirectoryConfig:
    """``[directory]``: the stores' time zones, duty rosters and managers."""

    default_timezone: str = _key(
        "UTC", _Timezone(),
        "IANA time zone of a store the directory does not list (quiet hours are store local "
        "time).")
    stores: tuple[StoreEntry, ...] = _key(
        (), _StoreTables(),
        "Stores: [[directory.stores]] tenant, store, timezone (default default_timezone), "
        "on_duty and managers (terminal ids); file only, the admin API overrides them.")


@dataclass(frozen=True, slots=True)
class AutoReply:
    """One rule of ``tickets.auto_replies``: a ticket with ``code`` is resolved at once."""

    code: str
    reply: str
    tenant: str = "*"
    """A tenant id, or ``"*"`` for every tenant (a tenant's own rule wins)."""


@dataclass(frozen=True, slots=True)
class TicketsConfig:
    """``[tickets]``: cashier exception tickets."""

    escalate_after: float = _key(
        300.0, _POSITIVE,
        "A ticket nobody assigned or resolved within this time is escalated: to the store's "
        "managers, else its region's, else escalate_role across the tenant.")
    escalate_role: str = _key(
        "manager", _Choice("", *ROLE_NAMES),
        "The role across the tenant (role:<tenant>/*/<role>) a ticket is escalated to when its "
        "store and region have no manager; empty = none (the ticket stays open, unattended).")
    auto_replies: tuple[AutoReply, ...] = _key(
        (), _AutoReplyTables(),
        'Tickets answered at once: [[tickets.auto_replies]] code, reply, tenant (default "*" = '
        "every tenant); file only.")


@dataclass(frozen=True, slots=True)
class OffersConfig:
    """``[offers]``: member offers that don't spam (P3 promo.offer and member.notice)."""

    quiet_start: str = _key(
        "22:00", _Clock(),
        "Start of the quiet hours (store local time, HH:MM): no offers are pushed from then.")
    quiet_end: str = _key(
        "08:00", _Clock(),
        "End of the quiet hours (HH:MM; equal to quiet_start = no quiet hours).")
    cap_count: int = _key(
        3, _Int(0),
        "Most offers one member gets per cap_window (0 = no cap).")
    cap_window: float = _key(
        86400.0, _POSITIVE,
        "The frequency cap's sliding window.")


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """``[retention]``: how long personal data is kept."""

    chat: float = _key(
        7776000.0, _POSITIVE,
        "Customer-service conversations and their messages are deleted this long after their "
        "last write.")
    member_notice: float = _key(
        2592000.0, _POSITIVE,
        "Oldest member.notice kept in a channel's history.")
    tickets: float = _key(
        7776000.0, _POSITIVE,
        "Tickets are deleted this long after their last change (resolved or not).")


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "auth": AuthConfig,
    "heartbeat": HeartbeatConfig,
    "lanes": LanesConfig,
    "delivery": DeliveryConfig,
    "limits": LimitsConfig,
    "history": HistoryConfig,
    "store": StoreConfig,
    "admin": AdminConfig,
    "log": LogConfig,
    "redis": RedisConfig,
    "tls": TlsConfig,
    "directory": DirectoryConfig,
    "tickets": TicketsConfig,
    "offers": OffersConfig,
    "retention": RetentionConfig,
}


@dataclass(frozen=True, slots=True)
class Config:
    """Tillwire's whole configuration: one frozen dataclass per section."""

    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    lanes: LanesConfig = field(default_factory=LanesConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    log: LogConfig = field(default_factory=LogConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    tickets: TicketsConfig = field(default_factory=TicketsConfig)
    offers: OffersConfig = field(default_factory=OffersConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)

    def to_dict(self, mask_secrets: bool = True) -> dict[str, dict[str, Any]]:
        """``{section: {key: value}}`` with JSON-friendly values (lists, not tuples).

        With ``mask_secrets`` (the default) a non-empty ``auth.secret`` and
        every admin token value read ``"***"``, and a password in
        ``redis.url`` is replaced by ``***``.
        """
        out: dict[str, dict[str, Any]] = {}
        for spec in _KEYS.values():
            value = spec.kind.plain(getattr(getattr(self, spec.section), spec.name))
            out.setdefault(spec.section, {})[spec.name] = value
        if mask_secrets:
            if out["auth"]["secret"]:
                out["auth"]["secret"] = MASK
            for token in out["admin"]["tokens"]:
                if token["token"]:
                    token["token"] = MASK
            out["redis"]["url"] = _mask_url_password(out["redis"]["url"])
        return out

    def require_secret(self) -> str:
        """Return ``auth.secret``; raise :class:`ConfigError` if it is empty.

        Serving and issuing tokens need it; loading and printing do not.
        """
        if not self.auth.secret:
            raise ConfigError(
                "auth.secret",
                f"is required: set secret in the [auth] section of the config file, or {SECRET_ENV}",
            )
        return self.auth.secret


def _mask_url_password(url: str) -> str:
    # scheme://user:password@host -> scheme://user:***@host
    return re.sub(r"^([a-z]+://[^:/@]*):[^@/]*@", rf"\1:{MASK}@", url)


# --------------------------------------------------------------------------
# The key table, built once from the dataclass fields


@dataclass(frozen=True, slots=True)
class _Spec:
    section: str
    name: str
    dotted: str
    env: str
    default: Any
    kind: _Kind
    doc: str


def _build_key_table() -> dict[str, _Spec]:
    table: dict[str, _Spec] = {}
    for section, cls in _SECTIONS.items():
        for f in fields(cls):
            table[f"{section}.{f.name}"] = _Spec(
                section=section,
                name=f.name,
                dotted=f"{section}.{f.name}",
                env=f"{ENV_PREFIX}{section.upper()}_{f.name.upper()}",
                default=f.default,
                kind=f.metadata["kind"],
                doc=f.metadata["doc"],
            )
    return table


_KEYS = _build_key_table()
_BY_ENV = {spec.env: spec for spec in _KEYS.values()}
assert len(_BY_ENV) == len(_KEYS)
assert not ({SECRET_ENV, ADMIN_TOKEN_ENV} | set(NON_CONFIG_ENV)) & set(_BY_ENV)


def describe_keys() -> list[tuple[str, str, Any, str]]:
    """Every key as ``(dotted key, env var, default, description)``, in file order.

    The default is in its JSON/TOML form (lists, not tuples).  ``auth.secret``
    also reads ``TILLWIRE_SECRET``; ``admin.tokens`` cannot be set from the
    environment as a whole, so its env column names the one-token alias
    ``TILLWIRE_ADMIN_TOKEN``.
    """
    rows = []
    for spec in _KEYS.values():
        env = ADMIN_TOKEN_ENV if spec.dotted == "admin.tokens" else spec.env
        rows.append((spec.dotted, env, spec.kind.plain(spec.default), spec.doc))
    return rows


# --------------------------------------------------------------------------
# Loading


def _error(key: str, message: str, env_var: str | None = None) -> ConfigError:
    """A ConfigError for ``key``; when an env var supplied the value, name it.

    ``str(err)`` then reads ``"server.port (TILLWIRE_SERVER_PORT): ..."``
    while ``err.key`` stays the dotted name.
    """
    if env_var is None:
        return ConfigError(key, message)
    err = ConfigError(f"{key} ({env_var})", message)
    err.key = key
    return err


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _convert(spec: _Spec, raw: Any, *, text: bool, env_var: str | None = None) -> Any:
    try:
        return spec.kind.from_text(raw) if text else spec.kind.from_value(raw)
    except ValueError:
        # A URL may carry a password: never echo it.
        shown = _mask_url_password(raw) if spec.dotted == "redis.url" and isinstance(raw, str) else raw
        raise _error(spec.dotted, f"must be {spec.kind.expect}, got {shown!r}", env_var) from None


def _admin_tokens(raw: Any, where: str) -> list[AdminToken]:
    """Check ``admin.tokens`` items (tables from the file or overrides).

    Messages name the offending entry but never echo a token value.
    """
    if not isinstance(raw, (list, tuple)):
        shape = type(raw).__name__
        if isinstance(raw, Mapping):
            shape = "a table ([admin.tokens] instead of [[admin.tokens]]?)"
        raise ConfigError("admin.tokens", f"must be {_AdminTokens.expect}, got {shape}")
    tokens = []
    for i, item in enumerate(raw):
        key = f"admin.tokens[{i}]"
        if isinstance(item, AdminToken):
            item = {"name": item.name, "token": item.token, "tenants": list(item.tenants)}
        if not isinstance(item, Mapping):
            raise ConfigError(key, f"must be a table with name, token and tenants, got {type(item).__name__}")
        extras = sorted(set(item) - {"name", "token", "tenants"})
        if extras:
            raise ConfigError(f"{key}.{extras[0]}", "unknown key (an admin token has name, token and tenants)"
                              + _suggest(extras[0], ["name", "token", "tenants"]))
        for required in ("name", "token", "tenants"):
            if required not in item:
                raise ConfigError(f"{key}.{required}", f"is required ({where})")
        name, token, tenants = item["name"], item["token"], item["tenants"]
        if not isinstance(name, str) or _ID_RE.fullmatch(name) is None:
            raise ConfigError(f"{key}.name", f"must be {_ID_TEXT}, got {name!r}")
        if not isinstance(token, str) or not token or re.search(r"\s", token):
            # never echo the value: it may be a real secret with a typo
            raise ConfigError(f"{key}.token", "must be a non-empty string without blanks")
        if (not isinstance(tenants, (list, tuple)) or not tenants
                or not all(isinstance(t, str) for t in tenants)):
            raise ConfigError(f"{key}.tenants",
                              f'must be ["*"] or a non-empty list of tenant ids, got {tenants!r}')
        if "*" in tenants:
            if len(tenants) != 1:
                raise ConfigError(f"{key}.tenants", f'"*" (all tenants) must be alone, got {tenants!r}')
        else:
            for tenant in tenants:
                if _ID_RE.fullmatch(tenant) is None:
                    raise ConfigError(f"{key}.tenants", f"tenant ids are {_ID_TEXT}, got {tenant!r}")
            if len(set(tenants)) != len(tenants):
                raise ConfigError(f"{key}.tenants", f"lists a tenant twice: {tenants!r}")
        tokens.append(AdminToken(name=name, token=token, tenants=tuple(tenants)))
    return tokens


def _table_list(raw: Any, dotted: str, expect: str) -> list:
    if not isinstance(raw, (list, tuple)):
        shape = type(raw).__name__
        if isinstance(raw, Mapping):
            shape = f"a table ([{dotted}] instead of [[{dotted}]]?)"
        raise ConfigError(dotted, f"must be {expect}, got {shape}")
    return list(raw)


def _table_item(item: Any, key: str, allowed: tuple[str, ...], required: tuple[str, ...],
                where: str) -> Mapping:
    if not isinstance(item, Mapping):
        raise ConfigError(key, f"must be a table with {', '.join(allowed)}, got "
                          f"{type(item).__name__}")
    extras = sorted(set(item) - set(allowed))
    if extras:
        raise ConfigError(f"{key}.{extras[0]}", f"unknown key (expected {', '.join(allowed)})"
                          + _suggest(extras[0], list(allowed)))
    for name in required:
        if name not in item:
            raise ConfigError(f"{key}.{name}", f"is required ({where})")
    return item


def _id_list(value: Any, key: str) -> tuple[str, ...]:
    if (not isinstance(value, (list, tuple))
            or not all(isinstance(v, str) and _ID_RE.fullmatch(v) for v in value)):
        raise ConfigError(key, f"must be a list of terminal ids ({_ID_TEXT}), got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(key, f"lists a terminal twice: {list(value)!r}")
    return tuple(value)


def _store_entries(raw: Any, where: str) -> list[StoreEntry]:
    """Check ``directory.stores`` items; errors name the entry and field
    (``directory.stores[2].timezone``)."""
    allowed = ("tenant", "store", "timezone", "on_duty", "managers")
    entries = []
    seen: set[tuple[str, str]] = set()
    for i, item in enumerate(_table_list(raw, "directory.stores", _StoreTables.expect)):
        key = f"directory.stores[{i}]"
        if isinstance(item, StoreEntry):
            item = {"tenant": item.tenant, "store": item.store, "timezone": item.timezone,
                    "on_duty": list(item.on_duty), "managers": list(item.managers)}
        item = _table_item(item, key, allowed, ("tenant", "store"), where)
        for name in ("tenant", "store"):
            value = item[name]
            if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
                raise ConfigError(f"{key}.{name}", f"must be {_ID_TEXT}, got {value!r}")
        tz = item.get("timezone", "")
        if tz != "" and not zone_ok(tz):
            raise ConfigError(f"{key}.timezone", f"must be {_Timezone.expect}, got {tz!r}")
        pair = (item["tenant"], item["store"])
        if pair in seen:
            raise ConfigError(f"{key}.store", f"store {pair[1]!r} of tenant {pair[0]!r} is "
                                              "listed twice")
        seen.add(pair)
        entries.append(StoreEntry(item["tenant"], item["store"], tz,
                                  _id_list(item.get("on_duty", []), f"{key}.on_duty"),
                                  _id_list(item.get("managers", []), f"{key}.managers")))
    return entries


def _auto_replies(raw: Any, where: str) -> list[AutoReply]:
    """Check ``tickets.auto_replies`` items (``tickets.auto_replies[0].code``...)."""
    allowed = ("code", "reply", "tenant")
    rules = []
    seen: set[tuple[str, str]] = set()
    for i, item in enumerate(_table_list(raw, "tickets.auto_replies", _AutoReplyTables.expect)):
        key = f"tickets.auto_replies[{i}]"
        if isinstance(item, AutoReply):
            item = {"code": item.code, "reply": item.reply, "tenant": item.tenant}
        item = _table_item(item, key, allowed, ("code", "reply"), where)
        code, reply, tenant = item["code"], item["reply"], item.get("tenant", "*")
        if not isinstance(code, str) or not 1 <= len(code) <= 64:
            raise ConfigError(f"{key}.code", f"must be a ticket code of 1-64 characters, got {code!r}")
        if not isinstance(reply, str) or not 1 <= len(reply) <= 2000:
            raise ConfigError(f"{key}.reply", "must be a text of 1-2000 characters")
        if not isinstance(tenant, str) or (tenant != "*" and _ID_RE.fullmatch(tenant) is None):
            raise ConfigError(f"{key}.tenant", f'must be "*" or a tenant id ({_ID_TEXT}), got {tenant!r}')
        if (tenant, code) in seen:
            raise ConfigError(f"{key}.code", f"code {code!r} has two rules for tenant {tenant!r}")
        seen.add((tenant, code))
        rules.append(AutoReply(code, reply, tenant))
    return rules


def _read_file(path: str, values: dict[str, Any], sources: dict[str, str]) -> None:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(path, f"cannot read config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "config file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"invalid TOML: {exc}") from None
    for section, table in data.items():
        cls = _SECTIONS.get(section)
        if cls is None and not isinstance(table, dict):
            raise ConfigError(section,
                              f"unknown top-level key in {path}; keys belong in a section such as [server]")
        if cls is None:
            raise ConfigError(section, f"unknown section in {path}" + _suggest(section, list(_SECTIONS)))
        if not isinstance(table, dict):
            raise ConfigError(section, f"must be a table ([{section}]), got {table!r}")
        names = [f.name for f in fields(cls)]
        for name, raw in table.items():
            dotted = f"{section}.{name}"
            spec = _KEYS.get(dotted)
            if spec is None:
                raise ConfigError(dotted, f"unknown key in {path}" + _suggest(name, names))
            if isinstance(spec.kind, _Tables):
                values[dotted] = spec.kind.tables(raw, f"in {path}")
            else:
                values[dotted] = _convert(spec, raw, text=False)
            sources[dotted] = path


def _read_env(env: Mapping[str, str], values: dict[str, Any], sources: dict[str, str]) -> AdminToken | None:
    """Apply ``TILLWIRE_*`` variables; return the TILLWIRE_ADMIN_TOKEN token if set."""
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in NON_CONFIG_ENV or var in (SECRET_ENV, ADMIN_TOKEN_ENV):
            continue
        spec = _BY_ENV.get(var)
        if spec is None:
            known = list(_BY_ENV) + [SECRET_ENV, ADMIN_TOKEN_ENV] + list(NON_CONFIG_ENV)
            raise ConfigError(var, "unknown Tillwire environment variable" + _suggest(var, known))
        if spec.dotted == "admin.tokens":
            raise _error(
                "admin.tokens",
                "cannot be set from the environment: list the tokens as [[admin.tokens]] tables in the "
                f"config file, or set {ADMIN_TOKEN_ENV} for one token named {ENV_ADMIN_TOKEN_NAME!r}",
                var,
            )
        if isinstance(spec.kind, _Tables):
            raise _error(spec.dotted, f"cannot be set from the environment: list them as "
                         f"[[{spec.dotted}]] tables in the config file", var)
        values[spec.dotted] = _convert(spec, env[var], text=True, env_var=var)
        sources[spec.dotted] = var

    if SECRET_ENV in env:
        canonical = _KEYS["auth.secret"].env
        if canonical in env and env[canonical] != env[SECRET_ENV]:
            raise _error("auth.secret", f"{SECRET_ENV} and {canonical} are both set and differ; set one",
                         SECRET_ENV)
        values["auth.secret"] = env[SECRET_ENV]
        sources["auth.secret"] = SECRET_ENV

    token = env.get(ADMIN_TOKEN_ENV, "")
    if not token:  # unset or empty (e.g. an unset variable passed through by compose): no token
        return None
    if re.search(r"\s", token):
        raise _error("admin.tokens", "the token must not contain blanks", ADMIN_TOKEN_ENV)
    return AdminToken(name=ENV_ADMIN_TOKEN_NAME, token=token, tenants=("*",))


def _read_overrides(overrides: Mapping[str, object], values: dict[str, Any], sources: dict[str, str]) -> None:
    for dotted, raw in overrides.items():
        if raw is None:  # a CLI flag that was not given
            continue
        spec = _KEYS.get(dotted)
        if spec is None:
            raise ConfigError(dotted, "unknown key" + _suggest(dotted, list(_KEYS)))
        if isinstance(spec.kind, _Tables):
            values[dotted] = spec.kind.tables(raw, "in overrides")
        else:
            # Flags may arrive as text (parsed like the environment) or typed.
            values[dotted] = _convert(spec, raw, text=isinstance(raw, str))
        sources[dotted] = "override"


def _check_relations(cfg: Config, sources: dict[str, str]) -> None:
    """Checks that involve more than one key.  The key blamed is the one that
    was set explicitly, preferring the one named first in the rule."""

    def env_of(key: str) -> str | None:
        src = sources.get(key)
        return src if src is not None and src.startswith(ENV_PREFIX) else None

    def blame(first: str, second: str) -> str:
        return second if second in sources and first not in sources else first

    hb = cfg.heartbeat
    if hb.min > hb.interval:
        key = blame("heartbeat.interval", "heartbeat.min")
        raise _error(key, "needs heartbeat.min <= heartbeat.interval, "
                     f"got min {hb.min:g} > interval {hb.interval:g}", env_of(key))
    if hb.interval > hb.max:
        key = blame("heartbeat.interval", "heartbeat.max")
        raise _error(key, "needs heartbeat.interval <= heartbeat.max, "
                     f"got interval {hb.interval:g} > max {hb.max:g}", env_of(key))

    if cfg.lanes.max_queued_bytes < cfg.server.max_frame_size + 64:
        key = blame("lanes.max_queued_bytes", "server.max_frame_size")
        raise _error(key, "needs lanes.max_queued_bytes >= server.max_frame_size + 64 (room for "
                     f"one largest frame), got {cfg.lanes.max_queued_bytes} < "
                     f"{cfg.server.max_frame_size} + 64", env_of(key))

    dl = cfg.delivery
    if dl.retransmit_max < dl.retransmit_initial:
        key = blame("delivery.retransmit_max", "delivery.retransmit_initial")
        raise _error(key, "needs delivery.retransmit_initial <= delivery.retransmit_max, got "
                     f"{dl.retransmit_initial:g} > {dl.retransmit_max:g}", env_of(key))

    adm, srv = cfg.admin, cfg.server
    wildcard = {"0.0.0.0", "::", ""}
    if adm.port and srv.port and adm.port == srv.port and (adm.host == srv.host or {adm.host, srv.host} & wildcard):
        key = blame("admin.port", "server.port")
        raise _error(key, f"admin.port and server.port are both {adm.port} on overlapping hosts", env_of(key))
    seen_names: set[str] = set()
    seen_tokens: set[str] = set()
    for i, token in enumerate(adm.tokens):
        where = f"admin.tokens[{i}]"
        if token.name in seen_names:
            hint = ""
            if token.name == ENV_ADMIN_TOKEN_NAME:
                hint = f" ({ADMIN_TOKEN_ENV} adds one named {ENV_ADMIN_TOKEN_NAME!r})"
            raise ConfigError(f"{where}.name", f"duplicate admin token name {token.name!r}{hint}")
        if token.token in seen_tokens:
            raise ConfigError(f"{where}.token", f"token of {token.name!r} is the same as an earlier one's")
        seen_names.add(token.name)
        seen_tokens.add(token.token)

    red = cfg.redis
    if srv.workers > 1 and not red.url:
        raise _error("server.workers", f"is {srv.workers}: more than 1 worker needs redis.url "
                     "(workers share their terminals' state only through Redis)",
                     env_of("server.workers"))
    if red.url and cfg.store.backend != "redis":
        raise _error("store.backend", f"is {cfg.store.backend} but redis.url is set: a fleet "
                     "over Redis keeps its store there (store.backend = redis)",
                     env_of("store.backend"))
    if cfg.store.backend == "redis" and not red.url:
        raise _error("redis.url", "is empty but store.backend is redis: set the Redis URL "
                     "(redis.url, TILLWIRE_REDIS_URL or --redis)", env_of("redis.url"))

    tls = cfg.tls
    if bool(tls.cert) != bool(tls.key):
        key = "tls.key" if tls.cert else "tls.cert"
        other = "tls.cert" if tls.cert else "tls.key"
        raise _error(key, f"must be set together with {other} (both or neither)", env_of(key))
    for name in ("cert", "key", "client_ca"):
        path = getattr(tls, name)
        if path and not os.path.isfile(path):
            raise _error(f"tls.{name}", f"file not found: {path!r}", env_of(f"tls.{name}"))
    if tls.client_ca and not tls.cert:
        raise _error("tls.client_ca", "needs tls.cert and tls.key (TLS is off without them)",
                     env_of("tls.client_ca"))
    if tls.require_client_cert and not tls.client_ca:
        raise _error("tls.require_client_cert", "needs tls.client_ca to verify client certificates",
                     env_of("tls.require_client_cert"))


def load_config(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Load, validate and return the configuration.

    ``path``: a TOML file (``None`` = none; the CLI defaults it to
    ``TILLWIRE_CONFIG``, the loader does not).  ``env``: the environment
    (``None`` = ``os.environ``); ``TILLWIRE_<SECTION>_<KEY>`` sets a key,
    ``TILLWIRE_SECRET`` is ``auth.secret`` and ``TILLWIRE_ADMIN_TOKEN``
    appends an admin token named ``"env"`` for all tenants.
    ``overrides``: dotted keys from CLI flags (``{"server.port": 7071}``);
    values may be typed or text (text is parsed like the environment), and
    ``None`` values are skipped.

    Raises :class:`ConfigError` naming the key of the first problem.  Does not
    require ``auth.secret`` (see :meth:`Config.require_secret`).
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {dotted: spec.default for dotted, spec in _KEYS.items()}
    sources: dict[str, str] = {}
    if path is not None:
        _read_file(os.fspath(path), values, sources)
    env_token = _read_env(env, values, sources)
    if overrides:
        _read_overrides(overrides, values, sources)
    values["admin.tokens"] = tuple(values["admin.tokens"]) + ((env_token,) if env_token else ())
    if values["redis.url"] and "store.backend" not in sources:
        values["store.backend"] = "redis"       # a fleet shares its store

    sections = {
        section: cls(**{f.name: values[f"{section}.{f.name}"] for f in fields(cls)})
        for section, cls in _SECTIONS.items()
    }
    cfg = Config(**sections)
    _check_relations(cfg, sources)
    return cfg


# --------------------------------------------------------------------------
# Derived values


def node_id(cfg: Config) -> str:
    """``server.node_id``, or ``"<hostname>-<pid>"`` when it is empty.

    The derived id keeps to the same alphabet as a configured one (characters
    outside ``A-Z a-z 0-9 . _ -`` become ``-``) and to 64 characters (the
    host name is shortened, the pid kept).
    """
    if cfg.server.node_id:
        return cfg.server.node_id
    pid = str(os.getpid())
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "node"
    return f"{host[: 64 - len(pid) - 1]}-{pid}"


def audit_log_path(cfg: Config) -> str:
    """``log.audit_path``, or ``<server.data_dir>/audit.log`` when it is empty."""
    return cfg.log.audit_path or os.path.join(cfg.server.data_dir, "audit.log")
