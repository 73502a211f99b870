"""Message kinds: what a body must contain, validated at the edge.

Every message body is a JSON object.  Registered kinds (``core.codes.KINDS``)
have a schema here; a bad body is refused with ``BAD_MESSAGE`` and a message
naming the field, before anything is stored or routed.  A body nested deeper
than the depth limit is refused with ``BAD_MESSAGE`` naming the depth.  Any
body of any kind that holds something that looks like a payment card number
is refused with ``CARD_DATA``: no card data ever enters the system.

The card-number rule (PROTOCOL.md section 8.1), applied to the body's JSON
text: every object key, every string (after unescaping) and the integer
part of every number as written is scanned; a *run* is a maximal sequence of decimal digits (of
any script) in which each pair of digits is separated by at most one
separator (``CARD_SEPARATORS``: spaces and dashes); a run of 13-19 digits
that passes the Luhn check is a card number.  Strings and integers at the
paths a registered kind declares as identifiers or barcodes
(``EXEMPT_PATHS``: an order id, a transaction id, a product's ``sku``...)
are exempt, because such ids are often long numbers that pass Luhn by
chance; nothing else is (a key named ``sku`` elsewhere is scanned).

Kind names: the namespaces of the registered kinds (``payment.``,
``order.``, ``ticket.``, ``chat.``, ``price.``, ``stock.``, ``promo.``,
``member.``) are reserved, so an unregistered kind there is ``BAD_MESSAGE``;
so is a kind a slip of the keyboard away from a registered one (``paymnt.result``:
"did you mean payment.result?", see :func:`near_kind`).  Any other
well-formed kind is a custom kind (PROTOCOL.md section 8) and travels inline.

``check`` also derives what routing needs: the P2 conflation key (channel +
SKU for price and stock updates) and the source version ("newest version
wins", in the queues and in the last-value cache).

This module is the specification in Python (``check_reference``, the
oracle of the differential tests).  ``core/_kinds.pyx`` does the same work
natively: the screen, the depth limit and the card scan in one pass over
the bytes each (so a body at the size limit is checked in well under 2 ms
whatever its characters), and the schemas of the common bodies.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import orjson

from ..core.codes import Code, Lane
from ..core.kinds import NATIVE

_KIND = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)+\Z")
MAX_KIND_LEN = 64
MAX_DEPTH = 32
"""Default nesting limit of a body (``limits.max_body_depth``)."""
_DECIMAL = re.compile(r"-?\d{1,12}(\.\d{1,4})?\Z")
# Identifier characters (order, ticket, offer ids...): an identifier strips
# to "" (a C loop; a regular expression took 3x longer).
_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:/-"


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

CARD_SEPARATORS = frozenset(
    " -\u00a0\u202f\u205f\u2212\u3000\ufe58\ufe63\uff0d"
    + "".join(map(chr, range(0x2000, 0x200B)))      # en quad .. hair space
    + "".join(map(chr, range(0x2010, 0x2016))))     # hyphen .. horizontal bar
"""What may stand (alone) between two digits of a card number."""

# Paths exempt from the card scan, per registered kind: identifiers and
# barcodes (a path is keys and None for "any array index").  A product
# barcode (EAN-13, GTIN-14) or a numeric order id passes Luhn one time in
# ten; a source version is often a 13-digit millisecond time.
EXEMPT_PATHS: dict[str, tuple[tuple, ...]] = {
    "payment.result": (("order",), ("transaction",)),
    "order.event": (("order",), ("items", None, "sku")),
    "ticket.open": (("ticket",),),
    "ticket.assign": (("ticket",), ("assignee",)),
    "ticket.reply": (("ticket",),),
    "ticket.resolve": (("ticket",),),
    "ticket.escalate": (("ticket",),),
    "chat.message": (("conversation",),),
    "price.update": (("sku",), ("version",)),
    "stock.update": (("sku",), ("version",)),
    "promo.offer": (("offer",),),
    "member.notice": (("member",),),
}

# Every card number is thirteen or more bytes of digits, spaces and dashes,
# so a body whose raw JSON has no such run, no \u escape and no non-ASCII
# byte cannot hold one and the scan is skipped (most bodies).  The screen
# maps those bytes to "0" and the rest to "x" and looks for thirteen "0"s:
# two C loops.
_CARD_BYTES = bytes(0x30 if 0x30 <= b <= 0x39 or b in (0x20, 0x2D) else 0x78
                    for b in range(256))
_CARD_RUN = b"0" * 13
_SEP = "[" + "".join(sorted(CARD_SEPARATORS)).replace("-", r"\-") + "]"
# A run of at least 13 digits (shorter ones cannot be card numbers); the
# lookarounds and the greedy repeat make it a maximal run.
_LONG_RUN = re.compile(rf"(?<!\d)\d(?:{_SEP}?\d){{12,}}(?!\d)")
# A number's integer part (before its fraction or exponent).
_INTEGER_PART = re.compile(rb"-?[0-9]*")
# The JSON text's tokens, in document order (the body is valid JSON).
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|-?[0-9][0-9.eE+-]*|[{}\[\],:]|true|false|null')


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


def has_card_number(text: str) -> bool:
    """Does ``text`` hold a run of 13-19 digits passing Luhn?"""
    for match in _LONG_RUN.finditer(text):
        digits = "".join(str(unicodedata.decimal(c)) for c in match.group() if c.isdecimal())
        if len(digits) <= 19 and luhn_ok(digits):
            return True
    return False


def _exempt(paths, path: list) -> bool:
    for pattern in paths:
        if len(pattern) == len(path) and all(
                (p is None and isinstance(c, int)) or (isinstance(c, str) and p == c)
                for p, c in zip(pattern, path)):
            return True
    return False


def _path_text(path: list) -> str:
    return "body" + "".join(f"[{c}]" if isinstance(c, int) else f".{c}" for c in path)


def find_card_number(kind: str, raw: bytes) -> tuple[str, bool] | None:
    """Where the first card number sits in the body's JSON text, in document
    order: None, or (path, is_key) (for a key, the path of its object).
    ``raw`` must be valid JSON (the caller parsed it)."""
    paths = EXEMPT_PATHS.get(kind, ())
    # stack: one [is_object, component] per open container; component is the
    # current key (object; None until read) or index (array).
    stack: list[list] = []
    expect_key = False
    for token in _TOKEN.findall(raw):
        first = token[:1]
        if first in b"{[":
            stack.append([first == b"{", None if first == b"{" else 0])
            expect_key = first == b"{"
        elif first in b"}]":
            stack.pop()
            expect_key = False
        elif first == b",":
            top = stack[-1]
            if top[0]:
                expect_key = True
            else:
                top[1] += 1
        elif first == b":":
            expect_key = False
        elif first == b'"':
            text = orjson.loads(token)
            if expect_key:
                if has_card_number(text):
                    return _path_text(_plain([c for _, c in stack[:-1]])), True
                stack[-1][1] = text if token.find(b"\\") < 0 else (text, "escaped")
            elif has_card_number(text):
                path = [c for _, c in stack]
                if not _exempt(paths, path):
                    return _path_text(_plain(path)), False
        elif first not in b"tfn":                       # a number: its integer part
            whole = _INTEGER_PART.match(token).group()  # as written
            if has_card_number(whole.decode()):
                path = [c for _, c in stack]
                if not (len(whole) == len(token) and _exempt(paths, path)):
                    return _path_text(_plain(path)), False
    return None


def _plain(path: list) -> list:
    """Keys that were written with escapes, as their text (for messages)."""
    return [c[0] if isinstance(c, tuple) else c for c in path]


def depth_exceeds(raw: bytes, limit: int) -> bool:
    """Does the JSON text nest containers deeper than ``limit``?"""
    depth = 0
    for token in _TOKEN.findall(raw):
        first = token[:1]
        if first in b"{[":
            depth += 1
            if depth > limit:
                return True
        elif first in b"}]":
            depth -= 1
    return False


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


RESERVED_NAMESPACES = tuple(sorted({name.split(".", 1)[0] + "." for name in SCHEMAS}))
"""Kind prefixes only registered kinds use (``payment.``, ``ticket.``...)."""


def edit_distance(a: str, b: str, bound: int) -> int:
    """The optimal string alignment distance of ``a`` and ``b`` (insertions,
    deletions, substitutions and swaps of two neighbours each cost 1), or
    ``bound + 1`` once it is certainly more than ``bound``.  O(len(a) * len(b))."""
    if abs(len(a) - len(b)) > bound:
        return bound + 1
    before, row = None, list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cost = ca != cb
            best = min(row[j] + 1, current[j - 1] + 1, row[j - 1] + cost)
            if before is not None and i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                best = min(best, before[j - 2] + 1)
            current[j] = best
        if min(current) > bound:
            return bound + 1
        before, row = row, current
    return row[-1]


def near_kind(kind: str) -> str | None:
    """The registered kind ``kind`` is probably a misspelling of: the one within
    edit distance 1 (2 for names of 13 characters or more), the nearest if
    several; None when none is that near.  Case is ignored (kinds are lower
    case).  O(registered kinds)."""
    lowered = kind.lower()
    bound = 1 if len(kind) < 13 else 2
    best, best_distance = None, bound + 1
    for name in SCHEMAS:
        distance = edit_distance(lowered, name, bound)
        if distance < best_distance:
            best, best_distance = name, distance
    return best


def check_kind_name(kind) -> None:
    """Raise MessageError (BAD_MESSAGE, field ``kind``) unless ``kind`` is a
    registered kind or a well-formed custom one: a dotted lower-case name,
    outside the reserved namespaces and not a near miss of a registered kind."""
    if kind in SCHEMAS:
        return
    if not isinstance(kind, str) or not kind or len(kind) > MAX_KIND_LEN \
            or not _KIND.match(kind):
        near = near_kind(kind) if isinstance(kind, str) and len(kind) <= MAX_KIND_LEN else None
        raise MessageError(Code.BAD_MESSAGE,
                           f"kind {kind!r}: dotted lower-case name like 'price.update'"
                           + (f"; did you mean {near}?" if near else ""), "kind")
    near = near_kind(kind)
    if kind.startswith(RESERVED_NAMESPACES):
        namespace = kind.split(".", 1)[0]
        registered = ", ".join(sorted(n for n in SCHEMAS if n.startswith(namespace + ".")))
        raise MessageError(Code.BAD_MESSAGE,
                           f"kind {kind!r}: not a registered kind, and the {namespace}. "
                           f"namespace is reserved for them ({registered})"
                           + (f"; did you mean {near}?" if near else ""), "kind")
    if near is not None:
        raise MessageError(Code.BAD_MESSAGE,
                           f"kind {kind!r}: not a registered kind; did you mean {near}? (a "
                           "custom kind must not be a near miss of a registered one)", "kind")


_P2 = int(Lane.P2)      # (an IntEnum member lookup costs 0.2 us on Python 3.11)

# Kinds already seen to be well-formed (the registered ones, then others up
# to a bound, so a sender inventing kinds cannot grow it without end).
_GOOD_KINDS = set(SCHEMAS)
_GOOD_KINDS_MAX = 4096


def check(kind: str, lane: int, payload: bytes, key: str = "", *,
          max_depth: int = MAX_DEPTH) -> Checked:
    """Validate a message; raise MessageError naming the problem.

    The native fast path (``core/_kinds.pyx``) answers for registered kinds
    with certainly valid bodies; anything else, and every refusal, comes
    from the same steps as ``check_reference`` with the native depth limit
    and card scan (bounded in time whatever the body holds) and the Python
    schemas."""
    if _native is not None:
        checked = _native.fast_check(kind, lane, payload, key, max_depth)
        if checked is not None:
            return checked
        return _check(kind, lane, payload, key, max_depth, _native.depth_exceeds,
                      _native.find_card)
    return _check(kind, lane, payload, key, max_depth, depth_exceeds, find_card_number)


def check_reference(kind: str, lane: int, payload: bytes, key: str = "", *,
                    max_depth: int = MAX_DEPTH) -> Checked:
    """The check in plain Python: the specification, and the oracle the
    native module is tested against."""
    return _check(kind, lane, payload, key, max_depth, depth_exceeds, find_card_number)


def _check(kind, lane, payload, key, max_depth, too_deep, find_card) -> Checked:
    if kind not in _GOOD_KINDS:
        check_kind_name(kind)
        if len(_GOOD_KINDS) < _GOOD_KINDS_MAX:
            _GOOD_KINDS.add(kind)
    raw = payload.encode() if isinstance(payload, str) else bytes(payload)
    if too_deep(raw, max_depth):
        raise MessageError(Code.BAD_MESSAGE, f"{kind}: body: nested more than {max_depth} "
                                             "levels deep", "body")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MessageError(Code.BAD_MESSAGE, f"{kind}: body is not valid JSON ({exc})",
                           "body") from None
    if not isinstance(body, dict):
        raise MessageError(Code.BAD_MESSAGE, f"{kind}: body must be a JSON object", "body")
    if _CARD_RUN in raw.translate(_CARD_BYTES) or b"\\u" in raw or not raw.isascii():
        found = find_card(kind, raw)
        if found is not None:
            where, is_key = found
            what = f"{where} has an object key that looks" if is_key else f"{where} looks"
            raise MessageError(Code.CARD_DATA, f"{kind}: {what} like a payment card number; "
                                               "card data is never accepted", where)
    version = 0
    schema = SCHEMAS.get(kind)
    if schema is not None:
        derived_key, version = schema(body, kind)
        if lane == _P2 and not key:
            key = derived_key
    return Checked(body, key if lane == _P2 else "", version)


def _native_module():
    """The native module configured with this module's tables, or None (not
    built, or ``TILLWIRE_NO_EXTENSIONS``)."""
    if NATIVE is not None:
        NATIVE.configure(Checked, PAYMENT_STATUSES, ORDER_CHANNELS, ORDER_EVENTS, MAX_CHAT_TEXT,
                         _P2, EXEMPT_PATHS)
    return NATIVE


_native = _native_module()
_fast_check = _native.fast_check if _native is not None else None


def nested_deeper(raw: bytes, limit: int) -> bool:
    """Does a JSON text nest containers deeper than ``limit``?  (Native when built.)"""
    return (_native.depth_exceeds if _native is not None else depth_exceeds)(raw, limit)
