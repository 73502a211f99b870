"""Message kinds: what a body must contain, validated at the edge.

Every message body is a JSON object.  Registered kinds (``core.codes.KINDS``)
have a schema here; a bad body is refused with ``BAD_MESSAGE`` and a message
naming the field, before anything is stored or routed.  Any body of any kind
that looks like it holds a payment card number (13-19 digits passing the
Luhn check, spaces or dashes allowed between digit groups) is refused with
``CARD_DATA``: no card data ever enters the system.

``check`` also derives what routing needs: the P2 conflation key (channel +
SKU for price and stock updates) and the source version ("newest version
wins", in the queues and in the last-value cache).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

from ..core.codes import Code, Lane

_KIND = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)+\Z")
MAX_KIND_LEN = 64
_DECIMAL = re.compile(r"-?\d{1,12}(\.\d{1,4})?\Z")
# Identifier characters (order, ticket, offer ids...): an identifier strips
# to "" (a C loop; a regular expression took 3x longer).
_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:/-"
# A run of digits, possibly grouped by single spaces or dashes ("4111 1111
# 1111 1111"), not touching other digits.
_DIGIT_RUN = re.compile(r"(?<![\d])\d(?:[ -]?\d)*(?![\d])")
# Every card-number run is thirteen or more bytes of digits, spaces and
# dashes, so a body whose raw JSON has no such run, no \u escape and no
# non-ASCII byte cannot hold one and ``check`` skips walking it (most bodies).
# The screen maps those bytes to "0" and the rest to "x" and looks for thirteen
# "0"s: two C loops, about 5x faster than a regular expression's scan.
_CARD_BYTES = bytes(0x30 if 0x30 <= b <= 0x39 or b in (0x20, 0x2D) else 0x78
                    for b in range(256))
_CARD_RUN = b"0" * 13


class MessageError(ValueError):
    """A message refused at the edge; ``code`` goes into the ERROR frame."""

    def __init__(self, code: int, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code = Code(code)
        self.field = field


@dataclass(slots=True)
class Checked:
    body: dict
    key: str        # P2 conflation key ("" = none)
    version: int    # source version (0 = none)


# -- card numbers ----------------------------------------------------------------------


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _has_card_number(text: str) -> bool:
    """A digit run of 13-19 digits passing Luhn (longer runs are not card numbers:
    hashes, ids and timestamps in series are left alone)."""
    for match in _DIGIT_RUN.finditer(text):
        digits = match.group().replace(" ", "").replace("-", "")
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            return True
    return False


# Product barcodes (EAN-13, GTIN-14) are 13-14 digit numbers with their own
# check digit; about one in ten also passes Luhn.  They are what ``sku``
# fields hold, so those are not scanned.
_NOT_CARD_FIELDS = frozenset({"sku", "gtin", "ean", "barcode"})


def find_card_number(value, path: str = "body") -> str | None:
    """The path of the first string or integer that contains a card number."""
    if isinstance(value, str):
        return path if _has_card_number(value) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return path if 13 <= len(str(abs(value))) and _has_card_number(str(abs(value))) else None
    if isinstance(value, dict):
        for k, v in value.items():
            if k in _NOT_CARD_FIELDS:
                continue
            found = find_card_number(v, f"{path}.{k}")
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = find_card_number(v, f"{path}[{i}]")
            if found:
                return found
    return None


# -- field helpers ----------------------------------------------------------------------


def _bad(kind: str, field: str, why: str) -> MessageError:
    return MessageError(Code.BAD_MESSAGE, f"{kind}: body.{field}: {why}", f"body.{field}")


_ABSENT = object()


def _get(body: dict, kind: str, field: str, types, required: bool = True, at: str = ""):
    """``body[field]`` checked against ``types``; ``at`` prefixes the field's path in
    errors when ``body`` is nested (``"items[2]."``)."""
    value = body.get(field, _ABSENT)
    if value.__class__ is types:        # the common case (orjson makes exact types)
        return value
    if value is _ABSENT:
        if required:
            raise _bad(kind, at + field, "required")
        return None
    # bool is an int in Python, never in a body schema.
    if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
        names = " or ".join(_TYPE_NAMES[t] for t in
                            (types if isinstance(types, tuple) else (types,)))
        raise _bad(kind, at + field, f"must be {names}")
    return value


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list",
               dict: "an object", bool: "true or false"}


def _text(body, kind, field, max_len=200, required=True, ident=False, at=""):
    value = _get(body, kind, field, str, required, at)
    if value is None:
        return None
    if not value or len(value) > max_len:
        raise _bad(kind, at + field, f"1-{max_len} characters")
    if ident and value.strip(_ID_CHARS):
        raise _bad(kind, at + field, "not a valid identifier (A-Z a-z 0-9 . _ : / -)")
    return value


def _choice(body, kind, field, choices, required=True):
    value = _get(body, kind, field, str, required)
    if value is not None and value not in choices:
        raise _bad(kind, field, f"one of {', '.join(sorted(choices))}")
    return value


def _decimal(body, kind, field, required=True):
    value = _get(body, kind, field, str, required)
    if value is not None and not _DECIMAL.match(value):
        raise _bad(kind, field, "a decimal string like '5.00'")
    return value


def _currency(body, kind, field="currency", required=True):
    value = _get(body, kind, field, str, required)
    if value is not None and not (len(value) == 3 and value.isascii() and value.isalpha()
                                  and value.isupper()):     # [A-Z]{3}
        raise _bad(kind, field, "an ISO 4217 code like 'CNY'")
    return value


def _int(body, kind, field, lo=0, hi=2**53, required=True, at=""):
    value = _get(body, kind, field, int, required, at)
    if value is not None and not lo <= value <= hi:
        raise _bad(kind, at + field, f"an integer {lo}-{hi}")
    return value


def _time(body, kind, field, required=False):
    """Unix seconds (number) of an effective or expiry time."""
    value = _get(body, kind, field, (int, float), required)
    if value is not None and not 0 <= value < 2**40:
        raise _bad(kind, field, "unix seconds")
    return value


# -- the schemas -------------------------------------------------------------------------

PAYMENT_STATUSES = {"paid", "failed", "pending", "refunded", "cancelled", "voided"}
ORDER_CHANNELS = {"mall", "miniprogram", "store", "app", "marketplace", "phone"}
ORDER_EVENTS = {"created", "paid", "picking", "ready", "shipped", "delivered", "picked_up",
                "cancelled", "refunded", "returned"}
MAX_CHAT_TEXT = 4000
MAX_ATTACHMENTS = 10
MAX_ATTACHMENT_SIZE = 100 * 2**20
_MIME = re.compile(r"(image|audio|video|application)/[a-z0-9.+-]{1,64}\Z")


def _payment_result(b, k):
    _text(b, k, "order", 64, ident=True)
    _choice(b, k, "status", PAYMENT_STATUSES)
    _decimal(b, k, "amount", required=False)
    _currency(b, k, required="amount" in b)
    _text(b, k, "transaction", 64, required=False, ident=True)
    _text(b, k, "method", 32, required=False)
    return "", 0


def _order_event(b, k):
    _text(b, k, "order", 64, ident=True)
    _choice(b, k, "channel", ORDER_CHANNELS)
    _choice(b, k, "event", ORDER_EVENTS)
    items = _get(b, k, "items", list, required=False)
    if items is not None:
        if len(items) > 500:
            raise _bad(k, "items", "at most 500 items")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise _bad(k, f"items[{i}]", "must be an object")
            _text(item, k, "sku", 64, at=f"items[{i}].")
            _int(item, k, "qty", 1, 100_000, at=f"items[{i}].")
    return "", 0


def _ticket(b, k):
    _text(b, k, "ticket", 64, required=k != "ticket.open", ident=True)
    if k == "ticket.open":
        _text(b, k, "code", 64)
        _text(b, k, "text", 2000, required=False)
    elif k == "ticket.assign":
        _text(b, k, "assignee", 64, required=False, ident=True)
    elif k == "ticket.reply":
        _text(b, k, "text", 2000)
    elif k == "ticket.resolve":
        _text(b, k, "resolution", 2000)
    elif k == "ticket.escalate":
        _text(b, k, "reason", 2000, required=False)
    return "", 0


def _chat_message(b, k):
    _text(b, k, "conversation", 64, ident=True)
    text = _text(b, k, "text", MAX_CHAT_TEXT, required=False)
    atts = _get(b, k, "attachments", list, required=False)
    if text is None and not atts:
        raise _bad(k, "text", "required (or attachments)")
    for field in ("data", "blob", "content", "base64"):
        if field in b:
            raise _bad(k, field, "no inline media: send images, voice and video as attachments "
                                 "by reference (url, mime, size)")
    if atts is not None:
        if len(atts) > MAX_ATTACHMENTS:
            raise _bad(k, "attachments", f"at most {MAX_ATTACHMENTS}")
        for i, att in enumerate(atts):
            f = f"attachments[{i}]"
            if not isinstance(att, dict):
                raise _bad(k, f, "must be an object {url, mime, size}")
            url = _get(att, k, "url", str, at=f + ".")
            if not (url.startswith("https://") or url.startswith("http://")) or len(url) > 2048:
                raise _bad(k, f"{f}.url", "an http(s) URL of at most 2048 characters")
            mime = _get(att, k, "mime", str, at=f + ".")
            if not _MIME.match(mime):
                raise _bad(k, f"{f}.mime", "a media type like image/jpeg, audio/aac, video/mp4")
            size = _get(att, k, "size", int, at=f + ".")
            if not 0 < size <= MAX_ATTACHMENT_SIZE:
                raise _bad(k, f"{f}.size", f"bytes, 1-{MAX_ATTACHMENT_SIZE}")
            extra = set(att) - {"url", "mime", "size", "name", "duration"}
            if extra:
                raise _bad(k, f"{f}.{sorted(extra)[0]}", "unknown attachment field")
    return "", 0


def _price_update(b, k):
    sku = _text(b, k, "sku", 64)
    _decimal(b, k, "price")
    _currency(b, k, required=False)
    version = _int(b, k, "version")
    _time(b, k, "effective")
    return sku, version


def _stock_update(b, k):
    sku = _text(b, k, "sku", 64)
    _int(b, k, "quantity", -10**9, 10**9)
    version = _int(b, k, "version")
    _time(b, k, "effective")
    return sku, version


def _promo_offer(b, k):
    _text(b, k, "offer", 64, ident=True)
    _text(b, k, "title", 200)
    _text(b, k, "text", 2000, required=False)
    _time(b, k, "valid_until")
    return "", 0


def _member_notice(b, k):
    _text(b, k, "member", 64, ident=True)
    _text(b, k, "text", 2000)
    return "", 0


SCHEMAS = {
    "payment.result": _payment_result,
    "order.event": _order_event,
    "ticket.open": _ticket, "ticket.assign": _ticket, "ticket.reply": _ticket,
    "ticket.resolve": _ticket, "ticket.escalate": _ticket,
    "chat.message": _chat_message,
    "price.update": _price_update,
    "stock.update": _stock_update,
    "promo.offer": _promo_offer,
    "member.notice": _member_notice,
}


_P2 = int(Lane.P2)      # (an IntEnum member lookup costs 0.2 us on Python 3.11)

# Kinds already seen to be well-formed (the registered ones, then others up
# to a bound, so a sender inventing kinds cannot grow it without end).
_GOOD_KINDS = set(SCHEMAS)
_GOOD_KINDS_MAX = 4096


def check(kind: str, lane: int, payload: bytes, key: str = "") -> Checked:
    """Validate a message; raise MessageError naming the problem.

    The native fast path (``core/_kinds.pyx``) answers for registered kinds
    with certainly valid bodies; anything else, and every refusal, comes
    from ``check_reference`` below."""
    if _fast_check is not None:
        checked = _fast_check(kind, lane, payload, key)
        if checked is not None:
            return checked
    return check_reference(kind, lane, payload, key)


def check_reference(kind: str, lane: int, payload: bytes, key: str = "") -> Checked:
    """The check in plain Python: the specification, and the oracle the
    native fast path is tested against."""
    if kind not in _GOOD_KINDS:
        if not kind or len(kind) > MAX_KIND_LEN or not _KIND.match(kind):
            raise MessageError(Code.BAD_MESSAGE,
                               f"kind {kind!r}: dotted lower-case name like 'price.update'",
                               "kind")
        if len(_GOOD_KINDS) < _GOOD_KINDS_MAX:
            _GOOD_KINDS.add(kind)
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise MessageError(Code.BAD_MESSAGE, f"{kind}: body is not valid JSON ({exc})",
                           "body") from None
    if not isinstance(body, dict):
        raise MessageError(Code.BAD_MESSAGE, f"{kind}: body must be a JSON object", "body")
    raw = payload.encode() if isinstance(payload, str) else bytes(payload)
    where = None
    if _CARD_RUN in raw.translate(_CARD_BYTES) or b"\\u" in raw or not raw.isascii():
        where = find_card_number(body)
    if where is not None:
        raise MessageError(Code.CARD_DATA,
                           f"{kind}: {where} looks like a payment card number; card data is "
                           "never accepted", where)
    version = 0
    schema = SCHEMAS.get(kind)
    if schema is not None:
        derived_key, version = schema(body, kind)
        if lane == _P2 and not key:
            key = derived_key
    return Checked(body, key if lane == _P2 else "", version)


def _native_fast_check():
    """The native fast path with this module's tables, or None (not built, or
    ``TILLWIRE_NO_EXTENSIONS``)."""
    from ..core._impl import NO_EXTENSIONS
    if NO_EXTENSIONS:
        return None
    try:
        from ..core import _kinds
    except ImportError:
        return None
    _kinds.configure(Checked, PAYMENT_STATUSES, ORDER_CHANNELS, ORDER_EVENTS, MAX_CHAT_TEXT, _P2)
    return _kinds.fast_check


_fast_check = _native_fast_check()
