# cython: language_level=3
"""The message-kind check's fast path (native).

``fast_check(kind, lane, payload, key)`` answers for the common case only: a
registered kind whose body is certainly well-formed.  It returns the
``Checked`` the full check (``server/kinds.py``, the reference) would
return, or None whenever it is not certain: an unknown kind, a body that is
not a JSON object, anything the card-number screen flags, any field that is
missing, mistyped, out of range or unusual (a non-ASCII identifier, a
Unicode digit, attachments).  The caller then runs the reference, which
gives the exact error.  So this module never refuses anything and never
words an error; the differential test holds it to: whatever it accepts, the
reference accepts with the same result.

The reference spends most of a payment result's check in Python calls
(one per field helper); here the fields are checked with C loops over the
decoded strings.  ``configure`` hands over the reference's tables (the
``Checked`` class, status and channel sets) so they live in one place.
"""

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object)
    const unsigned char *PyUnicode_1BYTE_DATA(object)

import orjson

cdef object _loads = orjson.loads
cdef object _Checked = None
cdef object _STATUSES = frozenset()
cdef object _CHANNELS = frozenset()
cdef object _EVENTS = frozenset()
cdef Py_ssize_t _MAX_CHAT = 0
cdef object _P2 = 2
cdef object _ABSENT = object()
cdef dict _EXEMPT = {}          # kind -> _Exempt: its paths exempt from the card scan

# Identifier bytes: A-Z a-z 0-9 . _ : / -
cdef unsigned char _ID[256]
# Bytes a card-number run may hold: 0-9, space, dash
cdef unsigned char _RUN[256]


cdef void _tables():
    cdef int b
    for b in range(256):
        _ID[b] = (48 <= b <= 57 or 65 <= b <= 90 or 97 <= b <= 122
                  or b == 46 or b == 95 or b == 58 or b == 47 or b == 45)
        _RUN[b] = 48 <= b <= 57 or b == 32 or b == 45


_tables()


def configure(checked, statuses, channels, events, max_chat_text, p2_lane, exempt_paths):
    """Take the reference's tables (called once by server/kinds.py).
    ``exempt_paths``: kind -> the paths exempt from the card scan."""
    global _Checked, _STATUSES, _CHANNELS, _EVENTS, _MAX_CHAT, _P2
    _Checked = checked
    _STATUSES = frozenset(statuses)
    _CHANNELS = frozenset(channels)
    _EVENTS = frozenset(events)
    _MAX_CHAT = max_chat_text
    _P2 = p2_lane
    _EXEMPT.clear()
    for kind, paths in exempt_paths.items():
        _EXEMPT[kind] = _Exempt(paths)


# -- field checks: True only when the reference certainly accepts ---------------------

cdef inline bint _text(object v, Py_ssize_t max_len, bint ident):
    cdef Py_ssize_t n, i
    cdef const unsigned char *p
    if type(v) is not str:
        return False
    n = len(<str>v)
    if n == 0 or n > max_len:
        return False
    if ident:
        if not PyUnicode_IS_ASCII(v):
            return False          # (never an identifier: left to the reference's error)
        p = PyUnicode_1BYTE_DATA(v)
        for i in range(n):
            if not _ID[p[i]]:
                return False
    return True


cdef inline bint _opt_text(dict b, str field, Py_ssize_t max_len, bint ident):
    v = b.get(field, _ABSENT)
    return v is _ABSENT or _text(v, max_len, ident)


cdef inline bint _decimal(object v):
    # -?[0-9]{1,12}(\.[0-9]{1,4})?  (ASCII digits only: the reference's \d also
    # takes other Unicode digits, and those are left to it)
    cdef str s
    cdef Py_ssize_t n, i = 0, digits = 0, frac = 0
    cdef Py_UCS4 c
    if type(v) is not str:
        return False
    s = <str>v
    n = len(s)
    if n and s[0] == u'-':
        i = 1
    while i < n:
        c = s[i]
        if c < u'0' or c > u'9':
            break
        digits += 1
        i += 1
    if digits < 1 or digits > 12:
        return False
    if i == n:
        return True
    if s[i] != u'.':
        return False
    i += 1
    while i < n:
        c = s[i]
        if c < u'0' or c > u'9':
            return False
        frac += 1
        i += 1
    return 1 <= frac <= 4


cdef inline bint _currency(object v):
    cdef str s
    cdef Py_UCS4 c
    if type(v) is not str or len(<str>v) != 3:
        return False
    s = <str>v
    for c in s:
        if c < u'A' or c > u'Z':
            return False
    return True


cdef inline bint _int(object v, object lo, object hi):
    return type(v) is int and lo <= v <= hi


cdef inline bint _opt_time(dict b, str field):
    v = b.get(field, _ABSENT)
    if v is _ABSENT:
        return True
    return (type(v) is int or type(v) is float) and 0 <= v < 1099511627776   # 2**40


cdef inline bint _choice(object v, object choices):
    return type(v) is str and v in choices


# -- the card-number rule (PROTOCOL.md section 8.1) -------------------------------------
#
# Everything below reads the body's raw JSON text, which orjson has already
# parsed (so it is valid UTF-8 and valid JSON); the loops still check every
# bound themselves.  Each is one pass over the bytes with no Python object
# made per byte, so a body costs O(its length) whatever its characters:
# about 1 ns per byte for the screen, a few ns per byte for the full scan.

from libc.string cimport memcmp

cdef extern from "Python.h":
    int Py_UNICODE_TODECIMAL(Py_UCS4 ch)

cdef enum:
    SCREEN_CLEAR = 0        # no card number possible, depth within the limit
    SCREEN_SUSPECT = 1      # a long digit run, a \u escape or non-ASCII: scan in full
    SCREEN_TOO_DEEP = 2     # nested deeper than the limit
    MAX_LEVELS = 256        # deepest nesting the full scan follows (the limit is lower)


cdef int _screen(const unsigned char *p, Py_ssize_t n, int max_depth) noexcept:
    """SCREEN_*: one pass for the nesting depth (containers outside strings)
    and for what could hide a card number: a run of 13+ bytes of digits,
    spaces and dashes, a \\u escape, or a byte >= 0x80."""
    cdef Py_ssize_t i = 0, run = 0
    cdef int depth = 0, result = SCREEN_CLEAR
    cdef bint in_string = False
    cdef unsigned char c
    while i < n:
        c = p[i]
        if c >= 0x80:
            result = SCREEN_SUSPECT
        if _RUN[c]:
            run += 1
            if run >= 13:
                result = SCREEN_SUSPECT
        else:
            run = 0
        if in_string:
            if c == 0x5C:                               # backslash: skip the escaped byte
                if i + 1 < n and p[i + 1] == 0x75:      # \u
                    result = SCREEN_SUSPECT
                i += 2
                run = 0
                continue
            if c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c == 0x5B or c == 0x7B:                    # [ {
            depth += 1
            if depth > max_depth:
                return SCREEN_TOO_DEEP
        elif c == 0x5D or c == 0x7D:                    # ] }
            depth -= 1
        i += 1
    return result


def depth_exceeds(payload, int max_depth):
    """True when the JSON text nests containers deeper than ``max_depth``."""
    cdef const unsigned char[:] view = payload
    if len(payload) == 0:
        return False
    return _screen(&view[0], len(payload), max_depth) == SCREEN_TOO_DEEP


def screen(payload, int max_depth):
    """0 clear, 1 suspect (scan in full), 2 deeper than ``max_depth``."""
    cdef const unsigned char[:] view = payload
    if len(payload) == 0:
        return SCREEN_CLEAR
    return _screen(&view[0], len(payload), max_depth)


# Separators allowed between the digits of a card number, one at a time: the
# space, the hyphen-minus and their Unicode look-alikes (no-break and other
# spaces, hyphens and dashes, the minus sign, the full-width hyphen).  The
# reference's set is server/kinds.py CARD_SEPARATORS; a test compares the
# two over every code point.
cdef inline bint _is_separator(Py_UCS4 ch) noexcept:
    if ch < 0x80:
        return ch == 0x20 or ch == 0x2D
    return (ch == 0xA0 or 0x2000 <= ch <= 0x200A or 0x2010 <= ch <= 0x2015 or ch == 0x202F
            or ch == 0x205F or ch == 0x2212 or ch == 0x3000 or ch == 0xFE58 or ch == 0xFE63
            or ch == 0xFF0D)


def card_separators():
    """Every separator code point, as a set of 1-character strings (tests)."""
    return {chr(c) for c in range(0x110000) if _is_separator(c)}


cdef inline int _digit(Py_UCS4 ch) noexcept:
    """The value of a decimal digit (any script), else -1."""
    if ch < 0x80:
        return <int>ch - 48 if 48 <= ch <= 57 else -1
    return Py_UNICODE_TODECIMAL(ch)


cdef struct _Run:
    int digits              # digits in the run so far
    int plain[2]            # sum of the digits at even / odd positions (from the left)
    int doubled[2]          # the same with each digit doubled the Luhn way
    bint pending            # one separator followed the last digit


cdef inline void _run_reset(_Run *r) noexcept:
    r.digits = 0
    r.plain[0] = r.plain[1] = r.doubled[0] = r.doubled[1] = 0
    r.pending = False


cdef inline bint _run_end(_Run *r) noexcept:
    """End the run: True when it was a card number (13-19 digits passing Luhn)."""
    cdef int n = r.digits, total
    if n == 0:
        return False
    # The digit at position i from the left is doubled when n - 1 - i is odd.
    if n & 1:
        total = r.doubled[1] + r.plain[0]
    else:
        total = r.doubled[0] + r.plain[1]
    _run_reset(r)
    return 13 <= n <= 19 and total % 10 == 0


cdef inline bint _run_char(_Run *r, Py_UCS4 ch) noexcept:
    """Feed one character of a string or number; True when it ended a run
    that was a card number.  A run is digits, each pair separated by at most
    one separator; anything else (a second separator too) ends it."""
    cdef int d = _digit(ch), parity, dd
    if d >= 0:
        parity = r.digits & 1
        r.plain[parity] += d
        dd = d * 2
        r.doubled[parity] += dd - 9 if dd > 9 else dd
        r.digits += 1
        r.pending = False
        return False
    if r.digits == 0:
        return False
    if not r.pending and _is_separator(ch):
        r.pending = True
        return False
    return _run_end(r)


cdef enum:
    MAX_PATTERNS = 16       # exempt paths per kind
    MAX_PATH = 4            # components per exempt path

cdef class _Exempt:
    """A kind's declared paths, exempt from the card scan, in C arrays.

    Component ``i`` of pattern ``k`` is ``comp[k * MAX_PATH + i]``: an
    index into ``keys`` (an object key, compared byte for byte with the key
    as written, which must have no escape) or -1 (any array index)."""
    cdef list keys                     # the bytes objects components point at
    cdef int npat
    cdef int ncomp[MAX_PATTERNS]
    cdef int comp[MAX_PATTERNS * MAX_PATH]

    def __init__(self, patterns):
        self.keys = []
        self.npat = 0
        if len(patterns) > MAX_PATTERNS:
            raise ValueError(f"at most {MAX_PATTERNS} exempt paths per kind")
        for pattern in patterns:
            if not 1 <= len(pattern) <= MAX_PATH:
                raise ValueError(f"an exempt path has 1-{MAX_PATH} components: {pattern!r}")
            k = self.npat
            self.ncomp[k] = len(pattern)
            for i, part in enumerate(pattern):
                if part is None:
                    self.comp[k * MAX_PATH + i] = -1
                else:
                    self.comp[k * MAX_PATH + i] = len(self.keys)
                    self.keys.append(part.encode())
            self.npat += 1


cdef struct _Level:
    bint is_object
    bint expect_key          # object: the next string is a key
    bint key_plain           # object: the current key has no escape (comparable as bytes)
    Py_ssize_t key_start     # object: the current key's text in the body (without quotes)
    Py_ssize_t key_end
    Py_ssize_t index         # array: index of the current element


cdef bint _exempt(_Exempt ex, const unsigned char *p, _Level *levels, int depth):
    """Is the value at the current position (inside ``depth`` containers) at
    one of the declared paths?"""
    cdef int k, i, c
    cdef _Level *lv
    cdef bytes key
    cdef Py_ssize_t klen
    cdef bint match
    if ex is None:
        return False
    for k in range(ex.npat):
        if ex.ncomp[k] != depth:
            continue
        match = True
        for i in range(depth):
            lv = &levels[i]
            c = ex.comp[k * MAX_PATH + i]
            if c < 0:
                if lv.is_object:
                    match = False
                    break
            else:
                key = <bytes>ex.keys[c]
                klen = len(key)
                if (not lv.is_object or not lv.key_plain or lv.key_end - lv.key_start != klen
                        or memcmp(p + lv.key_start, <const char *>key, <size_t>klen) != 0):
                    match = False
                    break
        if match:
            return True
    return False


cdef str _path(object raw, _Level *levels, int depth):
    """The path of a position inside ``depth`` containers: body.items[2].sku."""
    parts = ["body"]
    cdef int i
    for i in range(depth):
        if levels[i].is_object:
            parts.append("." + _loads(raw[levels[i].key_start - 1:levels[i].key_end + 1]))
        else:
            parts.append(f"[{levels[i].index}]")
    return "".join(parts)


cdef inline Py_ssize_t _utf8(const unsigned char *p, Py_ssize_t i, Py_ssize_t n,
                             Py_UCS4 *out) noexcept:
    """Decode the UTF-8 sequence at p[i] (valid: orjson checked); its length."""
    cdef unsigned char c = p[i]
    if c < 0xE0 and i + 1 < n:
        out[0] = ((c & 0x1F) << 6) | (p[i + 1] & 0x3F)
        return 2
    if c < 0xF0 and i + 2 < n:
        out[0] = ((c & 0x0F) << 12) | ((p[i + 1] & 0x3F) << 6) | (p[i + 2] & 0x3F)
        return 3
    if c >= 0xF0 and i + 3 < n:
        out[0] = ((c & 0x07) << 18) | ((p[i + 1] & 0x3F) << 12) | ((p[i + 2] & 0x3F) << 6) \
            | (p[i + 3] & 0x3F)
        return 4
    out[0] = 0xFFFD
    return 1


cdef inline int _hex4(const unsigned char *p, Py_ssize_t i, Py_ssize_t n) noexcept:
    """The value of the 4 hex digits at p[i], or -1."""
    cdef int v = 0, k, d
    cdef unsigned char c
    if i + 4 > n:
        return -1
    for k in range(4):
        c = p[i + k]
        if 48 <= c <= 57:
            d = c - 48
        elif 65 <= c <= 70:
            d = c - 55
        elif 97 <= c <= 102:
            d = c - 87
        else:
            return -1
        v = v * 16 + d
    return v


cdef object _find_card(object raw, const unsigned char *p, Py_ssize_t n, _Exempt ex):
    """The first card number in document order: None, or (path, is_key).

    Scanned: every object key and every string (after unescaping), the
    integer part of every number as written.  Exempt: strings and integers
    at the kind's declared paths.  For a key, the path is that of its
    object."""
    cdef _Level levels[MAX_LEVELS]
    cdef int depth = 0
    cdef Py_ssize_t i = 0, start
    cdef unsigned char c
    cdef Py_UCS4 ch = 0
    cdef int u, lo
    cdef _Run run
    cdef bint is_key, found, plain, integer
    cdef _Level *top
    _run_reset(&run)
    while i < n:
        c = p[i]
        if c == 0x7B or c == 0x5B:                          # { [
            if depth >= MAX_LEVELS:
                raise ValueError(f"nested deeper than {MAX_LEVELS} levels")
            top = &levels[depth]
            top.is_object = c == 0x7B
            top.expect_key = top.is_object
            top.key_plain = True
            top.key_start = top.key_end = 0
            top.index = 0
            depth += 1
            i += 1
        elif c == 0x7D or c == 0x5D:                        # } ]
            if depth > 0:
                depth -= 1
            i += 1
        elif c == 0x2C:                                     # ,
            if depth > 0:
                top = &levels[depth - 1]
                if top.is_object:
                    top.expect_key = True
                else:
                    top.index += 1
            i += 1
        elif c == 0x22:                                     # a string: a key or a value
            is_key = depth > 0 and levels[depth - 1].is_object and levels[depth - 1].expect_key
            i += 1
            start = i
            found = False
            plain = True
            while i < n:
                c = p[i]
                if c == 0x22:
                    break
                if c == 0x5C and i + 1 < n:                 # an escape
                    plain = False
                    c = p[i + 1]
                    if c == 0x75:                           # \\uXXXX, maybe a surrogate pair
                        u = _hex4(p, i + 2, n)
                        i += 6
                        if 0xD800 <= u < 0xDC00 and i + 1 < n and p[i] == 0x5C \
                                and p[i + 1] == 0x75:
                            lo = _hex4(p, i + 2, n)
                            if 0xDC00 <= lo < 0xE000:
                                u = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00)
                                i += 6
                        ch = <Py_UCS4>u if u >= 0 else 0xFFFD
                    else:                                   # \\" \\\\ \\/ \\b \\f \\n \\r \\t
                        ch = c if c == 0x22 or c == 0x5C or c == 0x2F else 0x0A
                        i += 2
                elif c >= 0x80:
                    i += _utf8(p, i, n, &ch)
                else:
                    ch = c
                    i += 1
                if _run_char(&run, ch):
                    found = True
            if _run_end(&run):
                found = True
            i += 1                                          # the closing quote
            if is_key:
                if found:
                    return (_path(raw, levels, depth - 1), True)
                top = &levels[depth - 1]
                top.key_start = start
                top.key_end = i - 1
                top.key_plain = plain
                top.expect_key = False
            elif found and not _exempt(ex, p, levels, depth):
                return (_path(raw, levels, depth), False)
        elif c == 0x2D or 48 <= c <= 57:                    # a number: its integer part
            integer = True                                  # as written is scanned
            found = False
            while i < n:
                c = p[i]
                if c == 0x2E or c == 0x45 or c == 0x65:     # . e E: the fraction and the
                    integer = False                         # exponent are not scanned
                elif not (c == 0x2D or c == 0x2B or 48 <= c <= 57):
                    break
                if integer and _run_char(&run, c):
                    found = True
                i += 1
            if _run_end(&run):
                found = True
            if found and not (integer and _exempt(ex, p, levels, depth)):
                return (_path(raw, levels, depth), False)
        else:                                               # : blanks true false null
            i += 1
    return None


def find_card(kind, payload):
    """None, or (path, is_key) of the first card number in the body's JSON
    text, by the rule of PROTOCOL.md section 8.1 (``kind`` selects the
    exempt paths).  The body must be valid JSON (orjson parsed it)."""
    cdef const unsigned char[:] view = payload
    if len(payload) == 0:
        return None
    return _find_card(payload, &view[0], len(payload), _EXEMPT.get(kind))


# -- the schemas' common shapes ------------------------------------------------------

cdef bint _payment_result(dict b):
    if not _text(b.get("order", _ABSENT), 64, True):
        return False
    if not _choice(b.get("status", _ABSENT), _STATUSES):
        return False
    amount = b.get("amount", _ABSENT)
    currency = b.get("currency", _ABSENT)
    if amount is not _ABSENT:
        if not _decimal(amount) or not _currency(currency):
            return False
    elif currency is not _ABSENT and not _currency(currency):
        return False
    return _opt_text(b, "transaction", 64, True) and _opt_text(b, "method", 32, False)


cdef bint _order_event(dict b):
    if not (_text(b.get("order", _ABSENT), 64, True)
            and _choice(b.get("channel", _ABSENT), _CHANNELS)
            and _choice(b.get("event", _ABSENT), _EVENTS)):
        return False
    items = b.get("items", _ABSENT)
    if items is _ABSENT:
        return True
    if type(items) is not list or len(<list>items) > 500:
        return False
    for item in <list>items:
        if type(item) is not dict:
            return False
        if not (_text((<dict>item).get("sku", _ABSENT), 64, False)
                and _int((<dict>item).get("qty", _ABSENT), 1, 100_000)):
            return False
    return True


cdef bint _ticket(dict b, str kind):
    if kind == "ticket.open":
        return (_opt_text(b, "ticket", 64, True) and _text(b.get("code", _ABSENT), 64, False)
                and _opt_text(b, "text", 2000, False))
    if not _text(b.get("ticket", _ABSENT), 64, True):
        return False
    if kind == "ticket.assign":
        return _opt_text(b, "assignee", 64, True)
    if kind == "ticket.reply":
        return _text(b.get("text", _ABSENT), 2000, False)
    if kind == "ticket.resolve":
        return _text(b.get("resolution", _ABSENT), 2000, False)
    if kind == "ticket.escalate":
        return _opt_text(b, "reason", 2000, False)
    return False


cdef bint _chat_message(dict b):
    # Text only; attachments (and the inline-media refusals) go to the reference.
    for field in ("attachments", "data", "blob", "content", "base64"):
        if field in b:
            return False
    return (_text(b.get("conversation", _ABSENT), 64, True)
            and _text(b.get("text", _ABSENT), _MAX_CHAT, False))


cdef bint _item_update(dict b, bint price):
    if not _text(b.get("sku", _ABSENT), 64, False):
        return False
    if price:
        if not _decimal(b.get("price", _ABSENT)):
            return False
        currency = b.get("currency", _ABSENT)
        if currency is not _ABSENT and not _currency(currency):
            return False
    elif not _int(b.get("quantity", _ABSENT), -10**9, 10**9):
        return False
    return _int(b.get("version", _ABSENT), 0, 2**53) and _opt_time(b, "effective")


cdef bint _promo_offer(dict b):
    return (_text(b.get("offer", _ABSENT), 64, True) and _text(b.get("title", _ABSENT), 200, False)
            and _opt_text(b, "text", 2000, False) and _opt_time(b, "valid_until"))


cdef bint _member_notice(dict b):
    return _text(b.get("member", _ABSENT), 64, True) and _text(b.get("text", _ABSENT), 2000, False)


def fast_check(kind, lane, payload, key="", int max_depth=32):
    """``Checked`` for a registered kind's certainly valid body, else None
    (for any argument of an unexpected type too: the reference judges it)."""
    cdef dict b
    cdef bint ok
    if (_Checked is None or type(payload) is not bytes or type(kind) is not str
            or type(lane) is not int or type(key) is not str):
        return None
    if _screen(<const unsigned char *><bytes>payload, len(<bytes>payload), max_depth) \
            != SCREEN_CLEAR:
        return None
    try:
        body = _loads(payload)
    except Exception:
        return None
    if type(body) is not dict:
        return None
    b = <dict>body
    derived = ""
    version = 0
    if kind == "payment.result":
        ok = _payment_result(b)
    elif kind == "price.update" or kind == "stock.update":
        ok = _item_update(b, kind == "price.update")
        if ok:
            derived = b["sku"]
            version = b["version"]
    elif kind == "order.event":
        ok = _order_event(b)
    elif kind.startswith("ticket."):
        ok = _ticket(b, kind)
    elif kind == "chat.message":
        ok = _chat_message(b)
    elif kind == "promo.offer":
        ok = _promo_offer(b)
    elif kind == "member.notice":
        ok = _member_notice(b)
    else:
        return None
    if not ok:
        return None
    if lane != _P2:
        return _Checked(body, "", version)
    return _Checked(body, key or derived, version)
