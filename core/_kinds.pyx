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


def configure(checked, statuses, channels, events, max_chat_text, p2_lane):
    """Take the reference's tables (called once by server/kinds.py)."""
    global _Checked, _STATUSES, _CHANNELS, _EVENTS, _MAX_CHAT, _P2
    _Checked = checked
    _STATUSES = frozenset(statuses)
    _CHANNELS = frozenset(channels)
    _EVENTS = frozenset(events)
    _MAX_CHAT = max_chat_text
    _P2 = p2_lane


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


# -- the card-number screen -----------------------------------------------------------

cdef bint _screen_clear(bytes raw):
    """No run of 13+ digit/space/dash bytes, no \\u escape, ASCII only."""
    cdef const unsigned char *p = raw
    cdef Py_ssize_t n = len(raw), i, run = 0
    cdef unsigned char c
    for i in range(n):
        c = p[i]
        if c >= 0x80:
            return False
        if _RUN[c]:
            run += 1
            if run >= 13:
                return False
        else:
            run = 0
            if c == 0x5C and i + 1 < n and p[i + 1] == 0x75:     # \u
                return False
    return True


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


def fast_check(kind, lane, payload, key=""):
    """``Checked`` for a registered kind's certainly valid body, else None
    (for any argument of an unexpected type too: the reference judges it)."""
    cdef dict b
    cdef bint ok
    if (_Checked is None or type(payload) is not bytes or type(kind) is not str
            or type(lane) is not int or type(key) is not str):
        return None
    try:
        body = _loads(payload)
    except Exception:
        return None
    if type(body) is not dict or not _screen_clear(<bytes>payload):
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
