"""Message kinds: what a body must contain, validated at the edge.

Every message body is a JSON object.  Registered kinds (``core.codes.KINDS``)
have a schema here; a bad body is refused with ``BAD_MESSAGE`` and a message
naming the field, before anything is stored or routed.  ``check`` also
derives what routing needs from the body: the P2 conflation key and the
source version ("newest version wins").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

from ..core.codes import Code, Lane

_KIND = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)+\Z")
MAX_KIND_LEN = 64


class MessageError(ValueError):
    """A message refused at the edge; ``code`` goes into the ERROR frame."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = Code(code)


@dataclass(slots=True)
class Checked:
    body: dict
    key: str        # P2 conflation key ("" = none)
    version: int    # source version (0 = none)


def _require(body: dict, field: str, types, kind: str):
    if field not in body:
        raise MessageError(Code.BAD_MESSAGE, f"{kind}: body.{field}: required")
    value = body[field]
    # bool is an int in Python, never in a body schema.
    if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
        raise MessageError(Code.BAD_MESSAGE, f"{kind}: body.{field}: wrong type")
    return value


def _version(body: dict, kind: str) -> int:
    version = _require(body, "version", int, kind)
    if version < 0:
        raise MessageError(Code.BAD_MESSAGE, f"{kind}: body.version: must be >= 0")
    return version


def _sku(body: dict, kind: str) -> str:
    sku = _require(body, "sku", str, kind)
    if not sku or len(sku) > 64:
        raise MessageError(Code.BAD_MESSAGE, f"{kind}: body.sku: 1-64 characters")
    return sku


def _check_p2_keyed(body: dict, kind: str) -> tuple[str, int]:
    return _sku(body, kind), _version(body, kind)


# kind -> validator(body) -> (key, version).  The retail kinds issue adds the
# full schemas; these are the fields routing depends on.
_VALIDATORS = {
    "price.update": _check_p2_keyed,
    "stock.update": _check_p2_keyed,
}


def check(kind: str, lane: int, payload: bytes, key: str = "") -> Checked:
    """Validate a message; raise MessageError naming the problem."""
    if not kind or len(kind) > MAX_KIND_LEN or not _KIND.match(kind):
        raise MessageError(Code.BAD_MESSAGE,
                           f"kind {kind!r}: dotted lower-case name like 'price.update'")
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise MessageError(Code.BAD_MESSAGE, f"{kind}: body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise MessageError(Code.BAD_MESSAGE, f"{kind}: body must be a JSON object")
    version = 0
    validator = _VALIDATORS.get(kind)
    if validator is not None:
        derived_key, version = validator(body, kind)
        if lane == Lane.P2 and not key:
            key = derived_key
    return Checked(body, key if lane == Lane.P2 else "", version)
