"""Fuzz target over the card-number scan: ``core/_kinds.pyx`` against
``server/kinds.py``.

The native scan reads raw JSON text that the caller has already parsed
(``orjson.loads``), so only such texts are judged: the input is either
JSON text as is (whatever orjson refuses is skipped) or, more often, a
script that writes a JSON document: nesting, keys at the exempt paths,
digit runs with every kind of separator, Unicode digits, escapes
(surrogate pairs included) and numbers with fractions and exponents.

Checked, for the kinds with exempt paths and one without:

* ``find_card`` = ``find_card_number`` (the same path and key flag, or
  both None); nested deeper than the native scan's 256 levels, the native
  one raises ValueError instead (the caller's depth limit comes first);
* ``depth_exceeds`` and ``screen`` agree with the reference at several
  limits, and a text the screen clears holds no card number, nor does one
  that the reference's own byte pre-screen (in ``_check``) skips;
* ``fast_check``: whatever it accepts, ``check_reference`` accepts with
  the same result.
"""

from __future__ import annotations

import orjson

from tillwire.core import _kinds
from tillwire.server import kinds as reference

from .reader import Script

KINDS = ("x.test", *reference.EXEMPT_PATHS)
_NATIVE_LEVELS = 256        # core/_kinds.pyx MAX_LEVELS

_KEYS = ("order", "transaction", "items", "sku", "qty", "ticket", "assignee", "conversation",
         "version", "offer", "member", "status", "amount", "currency", "method", "channel",
         "event", "code", "text", "price", "quantity", "effective", "title", "valid_until",
         "attachments", "url", "mime", "size", "a", "s\\u006bu", "4111111111111111",
         "4111 1111 1111 1111")
_SEPARATORS = (" ", "-", "\u00a0", "\u2007", "\u2010", "\u2212", "\u3000", "\uff0d", "\u202f",
               "\\u00a0", "\\u0020", "\\u002d", "  ", "--", "\t", "\\n", ".")
_DIGITS = ("\u0664", "\uff11", "\u07c3", "\U0001d7d9", "\\u0034", "\\u0661", "\u00b2")
_WORDS = ("paid", "created", "mall", "CNY", "5.00", "o1", "A-9:/_.", "https://x/y", "image/png",
          "\u00e9", "\\\"", "\\\\", "\\/", "\\b", "\\ud83d\\ude00", "\U0001f600", "\\u00e9",
          "\\ud800", "x" * 70)
_CARDS = ("4111111111111111", "4111 1111 1111 1111", "4111-1111-1111-1111", "378282246310005",
          "6011111111111117", "4000056655665556", "5555555555554444", "4222222222222",
          "1234567812345670", "0000000000000")
_SCALARS = ("true", "false", "null", "0", "-0", "1e400", "0.5", "-1", "9007199254740993",
            "100000", "100001", "1.5e3")


def _digits(s: Script) -> str:
    n = s.byte() % 24
    return "".join(chr(48 + s.byte() % 10) for _ in range(n)) or "7"


def _string_body(s: Script) -> str:
    parts = []
    for _ in range(s.byte() % 6):
        k = s.byte() % 8
        if k == 0:
            parts.append(_digits(s))
        elif k == 1:
            parts.append(s.pick(_SEPARATORS))
        elif k == 2:
            parts.append(s.pick(_DIGITS))
        elif k == 3:
            parts.append(s.pick(_WORDS))
        elif k == 4:
            parts.append(s.pick(_CARDS))
        elif k == 5:
            # A card number with a separator of the input's choice after each group.
            card, sep = s.pick(_CARDS), s.pick(_SEPARATORS)
            step = 1 + s.byte() % 5
            parts.append(sep.join(card[i:i + step] for i in range(0, len(card), step)))
        elif k == 6:
            parts.append(f"\\u{s.u16():04x}")
        else:
            parts.append(chr(0x20 + s.byte() % 0x5f).replace("\\", "\\\\").replace('"', '\\"'))
    return "".join(parts)


def _number(s: Script) -> str:
    k = s.byte() % 4
    if k == 0:
        return s.pick(_SCALARS)
    sign = "-" if s.flag() else ""
    whole = _digits(s).lstrip("0") or "0"
    if k == 1:
        whole = s.pick(_CARDS).replace(" ", "").replace("-", "").lstrip("0") or "0"
    frac = "." + _digits(s) if s.flag() else ""
    exp = "e" + s.pick(("", "+", "-")) + str(s.byte() % 20) if k == 3 else ""
    return sign + whole + frac + exp


def _value(s: Script, depth: int) -> str:
    k = s.byte() % 11
    if depth > 300 or not s.more():
        k = 5
    if k in (0, 1):
        items = [f'"{s.pick(_KEYS) if s.byte() & 3 else _string_body(s)}":{_value(s, depth + 1)}'
                 for _ in range(s.byte() % 5)]
        return "{" + ",".join(items) + "}"
    if k == 2:
        return "[" + ",".join(_value(s, depth + 1) for _ in range(s.byte() % 5)) + "]"
    if k == 3:
        # Deep nesting in one step: past the depth limits (32, the scan's 256).
        n = s.pick((30, 32, 33, 255, 256, 257, 300))
        key = s.flag()
        opener = '{"a":' if key else "["
        closer = "}" if key else "]"
        return opener * n + _value(s, 301) + closer * n
    if k in (4, 5, 6):
        return f'"{_string_body(s)}"'
    if k in (7, 8):
        return _number(s)
    if k == 9:
        return s.pick(_SCALARS)
    return f'"{s.pick(_CARDS)}"'


def _body(s: Script) -> str:
    """An object with registered kinds' field names (for the fast path), values from the input."""
    fields = []
    for _ in range(1 + s.byte() % 6):
        fields.append(f'"{s.pick(_KEYS)}":{_value(s, 1)}')
    return "{" + ",".join(fields) + "}"


def _cards_possible(raw: bytes) -> bool:
    # server/kinds.py _check's byte pre-screen, spelled out again: only a
    # body with a 13-byte run of digits/space/dash, a \u escape or a
    # non-ASCII byte is scanned at all.
    run = 0
    for b in raw:
        run = run + 1 if 0x30 <= b <= 0x39 or b in (0x20, 0x2D) else 0
        if run >= 13:
            return True
    return b"\\u" in raw or not raw.isascii()


def card_scan(data: bytes) -> None:
    """Target: the card scan, the depth limit and the fast path on JSON text."""
    s = Script(data)
    mode = s.byte()
    kind = s.pick(KINDS)
    if mode & 3 == 0:
        raw = s.rest()
    elif mode & 3 == 1:
        raw = _body(s).encode()
    else:
        raw = _value(s, 0).encode()
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        return
    for limit in (1, 32, 256):
        deep = reference.depth_exceeds(raw, limit)
        assert _kinds.depth_exceeds(raw, limit) == deep, ("depth_exceeds", limit)
        assert (_kinds.screen(raw, limit) == 2) == deep, ("screen", limit)
    want = reference.find_card_number(kind, raw)
    try:
        got = _kinds.find_card(kind, raw)
    except ValueError:
        # Only past the native scan's nesting limit, and only when no card
        # number comes before that point (the scan stops at the first).
        assert reference.depth_exceeds(raw, _NATIVE_LEVELS), "find_card raised ValueError"
        return
    assert got == want, ("find_card", kind, got, want)
    if want is not None:
        assert _kinds.screen(raw, 1 << 20) == 1, "the screen cleared a card number"
        assert _cards_possible(raw), "the reference's pre-screen skips a card number"
    lane = s.byte() & 3
    key = s.pick(("", "k"))
    fast = _kinds.fast_check(kind, lane, raw, key, 32)
    if fast is not None:
        try:
            slow = reference.check_reference(kind, lane, raw, key)
        except reference.MessageError as exc:
            raise AssertionError(f"fast_check accepted what the reference refuses: {exc}") from None
        assert fast == slow, ("fast_check", fast, slow)
