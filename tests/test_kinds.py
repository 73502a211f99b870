"""Message kinds (server/kinds.py): the card-number screen's raw-bytes
prefilter never lets through a body the full walk (``find_card_number``)
would refuse; nested fields are named by their path; and every routed kind
arrives end to end through a real server on its lane with its body."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from support import aiotest, connect, start_node
from tillwire.core.codes import Code, Lane
from tillwire.server import kinds

# Digits (ASCII and Arabic-Indic), separators and a few letters, so runs of
# 13-19 digits, grouped or not, come up often.
_TEXT = st.text(alphabet="0123456789 -ab\u0663", max_size=40)
_VALUE = st.one_of(_TEXT, st.integers(0, 2**63 - 1), st.booleans(),
                   st.lists(_TEXT, max_size=3))
_BODY = st.dictionaries(st.sampled_from(["a", "text", "note", "sku", "n"]), _VALUE, max_size=4)


def _encode(value, escape) -> str:
    """JSON text of ``value``; characters of strings \\u-escaped where ``escape`` says."""
    if isinstance(value, str):
        return '"' + "".join(f"\\u{ord(c):04x}" if escape() else c for c in value) + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ",".join(_encode(v, escape) for v in value) + "]"
    return "{" + ",".join(f'"{k}":{_encode(v, escape)}' for k, v in value.items()) + "}"


def _screened(raw: bytes) -> str | None:
    try:
        kinds.check("x.test", Lane.P1, raw)
    except kinds.MessageError as exc:
        assert exc.code == Code.CARD_DATA
        return exc.field
    return None


@settings(max_examples=400, deadline=None)
@given(body=_BODY, escapes=st.lists(st.booleans(), min_size=1, max_size=64))
def test_prefilter_agrees_with_the_full_walk(body, escapes):
    flags = iter(escapes * 200)
    raw = _encode(body, lambda: next(flags, False)).encode()
    assert orjson.loads(raw) == body
    assert _screened(raw) == kinds.find_card_number(body)


@pytest.mark.parametrize("raw, field", [
    (b'{"text": "card 4111 1111 1111 1111 please"}', "body.text"),
    (b'{"n": 4111111111111111}', "body.n"),
    (b'{"text": "\\u0034111111111111111"}', "body.text"),        # escaped first digit
    (b'{"sku": "4111111111111111"}', None),                         # barcodes are exempt
    (b'{"text": "order 1234567890123"}', None),                     # fails Luhn
    (b'{"t": 1795612214.903, "order": "o12"}', None),
])
def test_known_bodies(raw, field):
    assert _screened(raw) == field


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
    if kinds._fast_check is None:
        from support import NO_EXTENSIONS
        if NO_EXTENSIONS:
            pytest.skip("TILLWIRE_NO_EXTENSIONS=1: the native fast path is deliberately not tested")
        pytest.fail("tillwire.core._kinds is not built (make compile)")
    return kinds._fast_check


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
