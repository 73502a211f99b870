"""Message kinds (server/kinds.py): the card-number rule (PROTOCOL.md 8.1)
refuses a card number wherever it hides and never a declared id, the
raw-bytes screen never lets through a body the full scan would refuse, the
native scan agrees with the reference on every body, nesting is bounded,
nested fields are named by their path; and every routed kind arrives end
to end through a real server on its lane with its body."""

from __future__ import annotations

import random

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from support import aiotest, connect, start_node
from tillwire.client.connection import SendError
from tillwire.core.codes import Code, Lane
from tillwire.server import kinds

# Digits (ASCII and Arabic-Indic), separators and a few letters, so runs of
# 13-19 digits, grouped or not, come up often.
_TEXT = st.text(alphabet="0123456789 -ab\u0663\u00a0\uff14", max_size=40)
_VALUE = st.one_of(_TEXT, st.integers(0, 2**63 - 1), st.booleans(),
                   st.lists(_TEXT, max_size=3))
_BODY = st.dictionaries(st.one_of(st.sampled_from(["a", "text", "note", "sku", "n", "order"]),
                                  _TEXT), _VALUE, max_size=4)


def _encode(value, escape) -> str:
    """JSON text of ``value``; characters of strings \\u-escaped where ``escape`` says."""
    if isinstance(value, str):
        return '"' + "".join(f"\\u{ord(c):04x}" if escape() else c for c in value) + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_encode(v, escape) for v in value) + "]"
    return "{" + ",".join(f"{_encode(k, escape)}:{_encode(v, escape)}"
                          for k, v in value.items()) + "}"


def _screened(raw: bytes, kind: str = "x.test") -> str | None:
    try:
        kinds.check(kind, Lane.P1, raw)
    except kinds.MessageError as exc:
        if exc.code != Code.CARD_DATA:
            return "not card data: " + str(exc)
        return exc.field
    return None


@settings(max_examples=400, deadline=None)
@given(body=_BODY, escapes=st.lists(st.booleans(), min_size=1, max_size=64))
def test_prefilter_agrees_with_the_full_scan(body, escapes):
    flags = iter(escapes * 200)
    raw = _encode(body, lambda: next(flags, False)).encode()
    assert orjson.loads(raw) == body
    found = kinds.find_card_number("x.test", raw)
    assert _screened(raw) == (found[0] if found else None)


def _luhn_complete(digits: str) -> str:
    """``digits`` with the check digit that makes it pass Luhn."""
    for d in "0123456789":
        if kinds.luhn_ok(digits + d):
            return digits + d
    raise AssertionError


def _card(n: int, rng: random.Random) -> str:
    return _luhn_complete(str(rng.choice("3456")) + "".join(rng.choice("0123456789")
                                                            for _ in range(n - 2)))


_FULLWIDTH = str.maketrans("0123456789", "０１２３４５６７８９")
_ARABIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")


def _hiding_places(card: str) -> list[tuple[bytes, str]]:
    """A card number in every place a body can hide it: (raw JSON, the field named)."""
    grouped = " ".join(card[i:i + 4] for i in range(0, len(card), 4))
    escaped = "".join(f"\\u{ord(c):04x}" for c in card)
    return [
        (b'{"text": "card %s please"}' % card.encode(), "body.text"),
        (b'{"text": "%s"}' % grouped.encode(), "body.text"),
        (b'{"text": "%s"}' % "-".join(card[i:i + 4] for i in range(0, len(card), 4)).encode(),
         "body.text"),
        (('{"text": "%s"}' % "\u00a0".join(card[i:i + 4] for i in range(0, len(card), 4)))
         .encode(), "body.text"),
        (('{"text": "%s"}' % "\u2013".join(card[i:i + 4] for i in range(0, len(card), 4)))
         .encode(), "body.text"),
        (('{"text": "%s"}' % card.translate(_FULLWIDTH)).encode(), "body.text"),
        (('{"text": "%s"}' % card.translate(_ARABIC)).encode(), "body.text"),
        (b'{"text": "%s"}' % escaped.encode(), "body.text"),
        (b'{"%s": 1}' % card.encode(), "body"),                               # an object key
        (b'{"a": {"%s": "x"}}' % grouped.encode(), "body.a"),
        (b'{"n": %s}' % card.encode(), "body.n"),                             # an integer
        (b'{"n": %s.0}' % card.encode(), "body.n"),                           # a float as written
        (b'{"n": %se0}' % card.encode(), "body.n"),
        (b'{"n": -%s}' % card.encode(), "body.n"),
        (b'{"a": [1, {"b": ["x", "%s"]}]}' % card.encode(), "body.a[1].b[1]"),
        (b'{"items": [{"x": {"sku": "%s"}}]}' % card.encode(), "body.items[0].x.sku"),
        (b'{"order": {"id": "%s"}}' % card.encode(), "body.order.id"),
    ]


def test_card_numbers_are_refused_wherever_they_hide():
    rng = random.Random(16)
    for n in range(13, 20):
        for _ in range(5):
            card = _card(n, rng)
            for raw, field in _hiding_places(card):
                for kind in ("x.test", "order.event", "payment.result"):
                    assert orjson.loads(raw) is not None
                    assert _screened(raw, kind) == field, (kind, raw)
                    found = kinds.find_card_number(kind, raw)
                    assert found is not None and found[0] == field, (kind, raw)
            # The error never echoes the number.
            with pytest.raises(kinds.MessageError) as info:
                kinds.check("x.test", 1, b'{"%s": 1}' % card.encode())
            assert card not in str(info.value) and "object key" in str(info.value)


# Declared identifier paths, and a body that carries an id there.
_ID_FIELDS = [
    ("payment.result", lambda v: {"order": v, "status": "paid"}),
    ("payment.result", lambda v: {"order": "o1", "status": "paid", "transaction": v}),
    ("order.event", lambda v: {"order": v, "channel": "mall", "event": "paid"}),
    ("order.event", lambda v: {"order": "o1", "channel": "mall", "event": "paid",
                               "items": [{"sku": "S1", "qty": 1}, {"sku": v, "qty": 2}]}),
    ("price.update", lambda v: {"sku": v, "price": "5.00", "version": 7}),
    ("stock.update", lambda v: {"sku": "S1", "quantity": 3, "version": int(v)}),
    ("ticket.reply", lambda v: {"ticket": v, "text": "on my way"}),
    ("promo.offer", lambda v: {"offer": v, "title": "2 for 1"}),
    ("member.notice", lambda v: {"member": v, "text": "points added"}),
]


def test_declared_ids_are_never_refused_whatever_their_digits():
    # At least 100,000 random numeric ids of every length 13-19, about one in
    # ten passing Luhn by chance, in every declared id field: none refused.
    rng = random.Random(1616)
    checked = luhn = 0
    for n in range(13, 20):
        for i in range(15_500):
            digits = str(rng.randrange(1, 10)) + "".join(rng.choice("0123456789")
                                                         for _ in range(n - 1))
            kind, make = _ID_FIELDS[i % len(_ID_FIELDS)]
            if kind == "stock.update" and int(digits) > 2**53:
                continue                     # (the schema's own range for versions)
            body = orjson.dumps(make(digits))
            kinds.check(kind, Lane.P2 if kind in ("price.update", "stock.update") else Lane.P1,
                        body)
            checked += 1
            luhn += kinds.luhn_ok(digits)
    assert checked >= 100_000 and luhn >= 9_000
    # ... and the reference agrees on a sample.
    for n in range(13, 20):
        for kind, make in _ID_FIELDS[:4]:
            digits = _card(n, rng)
            kinds.check_reference(kind, 1, orjson.dumps(make(digits)))


def test_an_exempt_name_is_exempt_only_at_its_declared_path():
    card = "4111111111111111"
    assert _screened(b'{"items": [{"sku": "%s", "qty": 1}]}' % card.encode(),
                     "order.event") == "not card data: " + \
        "order.event: body.order: required"                       # exempt: on to the schema
    assert _screened(b'{"sku": "%s"}' % card.encode(), "order.event") == "body.sku"
    assert _screened(b'{"sku": "%s"}' % card.encode(), "x.test") == "body.sku"
    assert _screened(b'{"items": [{"sku": "%s"}]}' % card.encode(), "x.test") == \
        "body.items[0].sku"
    # Written with an escape the key is not the declared one (compared as written).
    assert _screened(b'{"items": [{"\\u0073ku": "%s"}]}' % card.encode(), "order.event") == \
        "body.items[0].sku"
    # A float at a declared integer path is scanned like any number.
    assert _screened(b'{"sku": "S", "price": "1.00", "version": %s.0}' % card.encode(),
                     "price.update") == "body.version"


@pytest.mark.parametrize("raw, field", [
    (b'{"text": "order 1234567890123"}', None),                     # fails Luhn
    (b'{"t": 1795612214.903, "order": "o12"}', None),
    (b'{"text": "4111 1111  1111 1111"}', None),                     # two blanks: two runs
    (b'{"text": "41111111111111111111"}', None),                     # 20 digits: no card
    (b'{"n": 1.4111111111111111}', None),                            # a fraction's digits...
    (b'{"n": 4111111111111111.5}', "body.n"),                        # ... an integer part's
    (b'{"lat": 31.230416483725734, "x": 0.30000000000000004}', None),  # float noise
])
def test_known_bodies(raw, field):
    assert _screened(raw) == field


@st.composite
def _json_text(draw):
    """A JSON text with keys, strings (digits of several scripts, separators,
    escapes), numbers as written (floats, exponents) and nesting."""
    chars = st.sampled_from(list("0123456789 -x.\u00a0\u2013\uff11\u0663") + ["\\u0034",
                                                                                "\\n", "\\\""])

    def string(d):
        return '"' + "".join(d(st.lists(chars, max_size=24))) + '"'

    def number(d):
        text = d(st.text("0123456789", min_size=1, max_size=20)).lstrip("0") or "0"
        return d(st.sampled_from(["", "-"])) + text + d(st.sampled_from(["", ".0", ".5", "e3",
                                                                          "E-2"]))

    def value(d, depth):
        pick = d(st.integers(0, 5 if depth < 4 else 2))
        if pick == 0:
            return string(d)
        if pick == 1:
            return number(d)
        if pick == 2:
            return d(st.sampled_from(["true", "null", "0"]))
        if pick == 3:
            return "[" + ",".join(value(d, depth + 1) for _ in range(d(st.integers(0, 3)))) + "]"
        keys = st.one_of(st.sampled_from(['"sku"', '"order"', '"items"', '"version"',
                                          '"transaction"']), st.builds(lambda: string(d)))
        return "{" + ",".join(f"{d(keys)}:{value(d, depth + 1)}"
                              for _ in range(d(st.integers(0, 3)))) + "}"

    keys = st.sampled_from(['"sku"', '"order"', '"items"', '"version"', '"text"'])
    return ("{" + ",".join(f"{draw(keys)}:{value(draw, 1)}"
                           for _ in range(draw(st.integers(1, 4)))) + "}").encode()


def _native():
    if kinds._native is None:
        from support import NO_EXTENSIONS
        if NO_EXTENSIONS:
            pytest.skip("TILLWIRE_NO_EXTENSIONS=1: the native module is deliberately not tested")
        pytest.fail("tillwire.core._kinds is not built (make compile)")
    return kinds._native


@settings(max_examples=1500, deadline=None)
@given(raw=_json_text(), kind=st.sampled_from(["x.test", "order.event", "price.update",
                                               "payment.result"]))
def test_the_native_card_scan_agrees_with_the_reference(raw, kind):
    native = _native()
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        return                    # (duplicate-free JSON only: the scan reads parsed bodies)
    assert native.find_card(kind, raw) == kinds.find_card_number(kind, raw)
    for limit in (1, 2, 3, 32):
        assert native.depth_exceeds(raw, limit) == kinds.depth_exceeds(raw, limit)


def test_the_native_separators_are_the_references():
    assert _native().card_separators() == set(kinds.CARD_SEPARATORS)


def test_nesting_beyond_the_limit_is_a_bad_message_naming_the_depth():
    for depth in (33, 300, 1000, 5000):
        raw = b'{"a":' * depth + b'"\xc3\xa9 4111 1111 1111 1111"' + b"}" * depth
        for check in (kinds.check, kinds.check_reference):
            with pytest.raises(kinds.MessageError) as info:
                check("x.test", 1, raw)
            assert info.value.code == Code.BAD_MESSAGE and info.value.field == "body"
            assert "nested more than 32 levels" in str(info.value)
    # At the limit the body is read (and its card refused), at any limit asked for.
    raw = b'{"a":' * 32 + b'"4111 1111 1111 1111"' + b"}" * 32
    assert _screened(raw) == "body" + ".a" * 32
    with pytest.raises(kinds.MessageError) as info:
        kinds.check("x.test", 1, raw, max_depth=8)
    assert "nested more than 8 levels" in str(info.value)


@pytest.mark.parametrize("kind, body, field", [
    ("chat.message", {"conversation": "c1", "attachments": [{"mime": "image/png", "size": 1}]},
     "body.attachments[0].url"),
    ("chat.message", {"conversation": "c1", "attachments": [
        {"url": "https://x/a.png", "mime": "image/png", "size": 1},
        {"url": "https://x/b.png", "mime": "image/png", "size": "big"}]},
     "body.attachments[1].size"),
    ("order.event", {"order": "o1", "channel": "mall", "event": "paid",
                     "items": [{"sku": "A", "qty": 1}, {"qty": 2}]}, "body.items[1].sku"),
    ("order.event", {"order": "o1", "channel": "mall", "event": "paid",
                     "items": [{"sku": "A", "qty": 0}]}, "body.items[0].qty"),
])
def test_nested_fields_are_named_by_their_path(kind, body, field):
    with pytest.raises(kinds.MessageError) as info:
        kinds.check(kind, Lane.P1, orjson.dumps(body))
    assert info.value.code == Code.BAD_MESSAGE and info.value.field == field


# -- every routed kind end to end through a real server -----------------------------------

GOOD = [
    ("payment.result", {"order": "o1", "status": "paid", "amount": "12.50", "currency": "CNY",
                        "transaction": "tx-9", "method": "card"}, "terminal:acme/t1", Lane.P0),
    ("order.event", {"order": "o2", "channel": "miniprogram", "event": "ready",
                     "items": [{"sku": "6901234567890", "qty": 2}]}, "store:acme/s1", Lane.P1),
    ("price.update", {"sku": "6901234567890", "price": "5.00", "currency": "CNY",
                      "version": 3, "effective": 1795612214}, "store:acme/s1", Lane.P2),
    ("stock.update", {"sku": "6901234567890", "quantity": 17, "version": 8},
     "store:acme/s1", Lane.P2),
    ("promo.offer", {"offer": "xmas-1", "title": "2 for 1", "valid_until": 1795612214},
     "tenant:acme", Lane.P3),
    ("member.notice", {"member": "m1", "text": "Your points expire soon"},
     "member:acme/m1", Lane.P3),
]


@pytest.mark.parametrize("kind, body, to, lane", GOOD, ids=[g[0] for g in GOOD])
@aiotest()
async def test_each_routed_kind_arrives_on_its_lane_with_its_body(kind, body, to, lane):
    node = await start_node()
    try:
        be = await connect(node, "hq", store="hq", roles=("backend",))
        till = await connect(node, "t1", store="s1", roles=("customer",), member="m1")
        await be.send(kind, body, to)
        msg = await till.receive(timeout=5)
        assert (msg.kind, msg.lane, msg.body) == (kind, lane, body)
        if lane <= Lane.P1:
            await msg.ack()
    finally:
        await node.stop()


# -- kind names: reserved namespaces and near misses (issue 19) ----------------------------

NEAR_MISSES = [             # (kind, the registered kind it is refused as a slip of)
    ("paymnt.result", "payment.result"), ("payment.reslut", "payment.result"),
    ("prices.update", "price.update"), ("ticket.opn", "ticket.open"),
    ("chat.mesage", "chat.message"), ("Payment.Result", "payment.result"),
]
RESERVED = ["payment.refund", "order.created", "ticket.note", "chat.typing", "price.notice",
            "stock.count", "promo.banner", "member.points"]
CUSTOM = ["bench.probe", "x.test", "custom.note", "store.update", "acme.payment.result",
          "loyalty.stamp"]


@pytest.mark.parametrize("check", [kinds.check, kinds.check_reference])
def test_reserved_namespaces_and_near_misses_are_bad_messages_custom_kinds_are_not(check):
    for kind, meant in NEAR_MISSES:
        with pytest.raises(kinds.MessageError) as err:
            check(kind, Lane.P1, b'{"a": 1}')
        assert err.value.code == Code.BAD_MESSAGE and err.value.field == "kind", kind
        assert f"did you mean {meant}?" in str(err.value), (kind, str(err.value))
    for kind in RESERVED:
        with pytest.raises(kinds.MessageError) as err:
            check(kind, Lane.P1, b'{"a": 1}')
        namespace = kind.split(".")[0]
        assert err.value.code == Code.BAD_MESSAGE and err.value.field == "kind", kind
        assert f"the {namespace}. namespace is reserved" in str(err.value), str(err.value)
    for kind in CUSTOM:
        assert check(kind, Lane.P1, b'{"a": 1}').body == {"a": 1}, kind


@aiotest()
async def test_a_misspelled_kind_is_refused_on_the_wire_naming_the_kind_it_meant():
    node = await start_node()
    try:
        be = await connect(node, "hq", store="hq", roles=("backend",))
        till = await connect(node, "t1", store="s1")
        for kind, text in (("paymnt.result", "did you mean payment.result?"),
                           ("payment.refund", "payment. namespace is reserved")):
            with pytest.raises(SendError) as err:
                await be.send(kind, {"order": "o1", "status": "paid"}, "terminal:acme/t1",
                              lane=Lane.P0)
            assert err.value.code == Code.BAD_MESSAGE and text in err.value.message
        assert node.counters.accepted == 0
        # Custom kinds (PROTOCOL.md section 8) travel inline as before.
        await be.send("bench.probe", {"n": 1}, "store:acme/s1", lane=Lane.P2)
        await be.send("custom.note", {"n": 2}, "terminal:acme/t1", lane=Lane.P1)
        got = [await till.receive(timeout=3) for _ in range(2)]
        assert sorted((m.kind, m.body["n"]) for m in got) == [("bench.probe", 1),
                                                              ("custom.note", 2)]
    finally:
        await node.stop()


# -- the native fast path against the reference ------------------------------------------

# A valid body per registered kind, and the values mutations draw from: the
# limits' edges, wrong types, Unicode digits, card-like runs, nulls.
_VALID = {
    "payment.result": {"order": "o-1", "status": "paid", "amount": "12.50", "currency": "CNY",
                       "transaction": "tx:9/a", "method": "card"},
    "order.event": {"order": "o.2", "channel": "mall", "event": "paid",
                    "items": [{"sku": "S1", "qty": 2}, {"sku": "690123456789", "qty": 1}]},
    "ticket.open": {"code": "scale.error", "text": "the scale shows 0"},
    "ticket.assign": {"ticket": "tk-1", "assignee": "staff_7"},
    "ticket.reply": {"ticket": "tk-1", "text": "on my way"},
    "ticket.resolve": {"ticket": "tk-1", "resolution": "recalibrated"},
    "ticket.escalate": {"ticket": "tk-1"},
    "chat.message": {"conversation": "c-1", "text": "hello"},
    "price.update": {"sku": "S1", "price": "1.00", "currency": "CNY", "version": 3,
                     "effective": 1700000000.5},
    "stock.update": {"sku": "S1", "quantity": -4, "version": 9},
    "promo.offer": {"offer": "o1", "title": "Deal", "text": "2 for 1", "valid_until": 1800000000},
    "member.notice": {"member": "m-1", "text": "points added"},
}
_FIELDS = sorted({f for body in _VALID.values() for f in body}
                 | {"amount", "currency", "transaction", "method", "items", "assignee", "reason",
                    "attachments", "data", "effective", "valid_until", "qty"})
_EDGES = ["", "x" * 32, "x" * 33, "x" * 64, "x" * 65, "y" * 200, "y" * 201, "z" * 2000,
          "z" * 2001, "w" * 4000, "w" * 4001, "paid", "PAID", "mall", "paid ", "12.50", "12.",
          ".5", "-0.0001", "-", "1.2.3", "123456789012", "1234567890123", "12.34567",
          "\u0661\u0662", "CNY", "cny", "CN", "CNYY", "C\u00d1Y", "o 1", "o\u00e91", "o!",
          "4111 1111 1111 1111", "4222222222222", "4222 2222 22222", "tx:9/a", "a\\u0041",
          0, 1, -1, 100_000, 100_001, 10**9, 10**9 + 1, -10**9, -10**9 - 1, 2**40, 2**40 - 1,
          0.5, -0.5, True, False, None, [], {}, ["S"], [{"qty": 1}],
          *([{"sku": sku, "qty": qty}] for sku in ("S", "s" * 64, "s" * 65, "", 7)
            for qty in (0, 1, 100_000, 100_001, True, "1"))]
_ODD = st.one_of(
    st.sampled_from(_EDGES),
    st.text(max_size=12),
    st.integers(-2**60, 2**60),
    st.floats(-1e12, 1e12, allow_nan=False),
    st.lists(st.dictionaries(st.sampled_from(["sku", "qty", "x"]),
                             st.one_of(st.integers(-3, 200_000), st.text(max_size=70)),
                             max_size=3), max_size=3),
    st.dictionaries(st.sampled_from(["url", "mime", "size"]), st.text(max_size=8), max_size=3),
)


@st.composite
def _near_valid(draw):
    kind = draw(st.sampled_from(sorted(_VALID) + ["custom.kind"]))
    body = dict(_VALID.get(kind, {"a": 1}))
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(_FIELDS))
        if draw(st.booleans()) and field in body:
            del body[field]
        else:
            body[field] = draw(_ODD)
    return kind, body


def _native_fast_check():
    return _native().fast_check


@settings(max_examples=1500, deadline=None)
@given(case=_near_valid(), lane=st.sampled_from([0, 1, 2, 3]), key=st.sampled_from(["", "k"]))
def test_the_native_fast_path_accepts_only_what_the_reference_accepts_alike(case, lane, key):
    fast = _native_fast_check()
    kind, body = case
    payload = orjson.dumps(body)
    got = fast(kind, lane, payload, key)
    if got is None:
        return          # not certain: check() asks the reference
    assert got == kinds.check_reference(kind, lane, payload, key)


def test_the_native_fast_path_agrees_on_every_field_edge_of_every_kind():
    # Each field of each kind's valid body set to each edge value (or removed).
    fast = _native_fast_check()
    accepted = 0
    for kind, valid in _VALID.items():
        for field in _FIELDS:
            for value in [*_EDGES, _VALID]:
                body = dict(valid)
                if value is _VALID:
                    body.pop(field, None)
                else:
                    body[field] = value
                payload = orjson.dumps(body)
                for lane in (1, 2):
                    got = fast(kind, lane, payload, "")
                    if got is not None:
                        accepted += 1
                        assert got == kinds.check_reference(kind, lane, payload, ""), (kind, body)
    assert accepted > 1000          # (the fast path answered, so the comparison means something)


@pytest.mark.parametrize("kind", sorted(_VALID))
@pytest.mark.parametrize("lane", [0, 1, 2, 3])
def test_the_native_fast_path_answers_for_every_registered_kinds_common_body(kind, lane):
    fast = _native_fast_check()
    payload = orjson.dumps(_VALID[kind])
    got = fast(kind, lane, payload, "")
    assert got is not None and got == kinds.check_reference(kind, lane, payload, "")
    assert kinds.check(kind, lane, payload) == got


@pytest.mark.parametrize("kind, payload", [
    ("payment.result", b'{"order": "o1", "status": "paid", "note": "4111 1111 1111 1111"}'),
    ("payment.result", b'{"order": "o\\u0031", "status": "paid"}'),           # an escape
    ("payment.result", '{"order": "o1", "status": "paid", "n": "\u00e9"}'.encode()),  # non-ASCII
    ("payment.result", b'["order"]'),
    ("payment.result", b'{"order": '),
    ("custom.kind", b'{"a": 1}'),
    ("chat.message", b'{"conversation": "c1", "attachments": []}'),
])
def test_the_native_fast_path_leaves_the_uncommon_to_the_reference(kind, payload):
    assert _native_fast_check()(kind, 1, payload, "") is None


def test_the_native_fast_path_leaves_unexpected_argument_types_to_the_reference():
    fast = _native_fast_check()
    body = b'{"order": "o1", "status": "paid"}'
    assert fast("payment.result", 1, body, "") is not None
    for args in [(None, 1, body, ""), ("payment.result", None, body, ""),
                 ("payment.result", Lane.P1, body, ""), ("payment.result", 1, bytearray(body), ""),
                 ("payment.result", 1, body.decode(), ""), ("payment.result", 1, body, None)]:
        assert fast(*args) is None, args
    # ... which still answers them (an enum lane, a str body) or refuses them by name.
    assert kinds.check("payment.result", Lane.P1, body.decode()).body["order"] == "o1"
    with pytest.raises(kinds.MessageError):
        kinds.check("Bad Kind", 1, body)
