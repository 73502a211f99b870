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
