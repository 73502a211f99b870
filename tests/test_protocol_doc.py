"""PROTOCOL.md is checked against the code: its examples and its tables.

* every ```example block (line 1: the frame as JSON; then its bytes in hex)
  must encode to exactly those bytes (unless the info string says
  ``decode-only``) and decode to exactly that frame, with both codecs;
* every ```example-error block (line 1: hex; line 2: a Code name) must fail
  to decode with that code under the default frame limit;
* the tables of frame types, flags, codes, kinds, uvarints, type ranges and
  limits must agree with core/codes.py;
* section 8.2's message bodies must be what the server's schemas check,
  section 9's rights and subscriptions what it enforces, and section 11.7's
  answers what a real node sends.
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from support import aiotest, connect, start_node, uvarint
from tillwire.core.codes import (
    DEFAULT_COMPRESS_THRESHOLD,
    DEFAULT_MAX_FRAME_SIZE,
    EXTENSION_TYPES,
    FRAME_SCHEMAS,
    INT_FIELDS,
    KIND_LANES,
    KINDS,
    MAX_CUSTOM_KIND_LEN,
    MAX_FRAME_SIZE_LIMIT,
    MIN_FRAME_SIZE_LIMIT,
    STR_FIELDS,
    Code,
    Flag,
    FrameType,
    K,
    Lane,
    S,
    U,
)
from tillwire.core.errors import ProtocolError

DOC_PATH = pathlib.Path(__file__).resolve().parent.parent / "PROTOCOL.md"
DOC = DOC_PATH.read_text(encoding="utf-8")
DOC_LINES = DOC.splitlines()
DOC_TEXT = " ".join(DOC.split())  # prose with line breaks folded, for sentence searches


# --------------------------------------------------------------------------
# parsing


def fenced_blocks():
    """``(line number, info string, content lines)`` of every fenced block."""
    blocks = []
    lines = iter(enumerate(DOC_LINES, start=1))
    for number, line in lines:
        if not line.startswith("```"):
            continue
        info = line[3:].strip()
        content = []
        for _, inner in lines:
            if inner.startswith("```"):
                break
            content.append(inner)
        else:
            raise AssertionError(f"PROTOCOL.md:{number}: unterminated ``` block")
        blocks.append((number, info, content))
    return blocks


BLOCKS = fenced_blocks()
EXAMPLES = [b for b in BLOCKS if b[1].split()[:1] == ["example"]]
ERROR_EXAMPLES = [b for b in BLOCKS if b[1].split()[:1] == ["example-error"]]


def doc_tables():
    """``(line number, header cells, rows)`` of every markdown table."""
    tables = []
    current = None
    for number, line in enumerate(DOC_LINES, start=1):
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if current is None:
                current = (number, tuple(cells), [])
                tables.append(current)
            elif not all(re.fullmatch(r":?-+:?", cell) for cell in cells):
                current[2].append(cells)
        else:
            current = None
    return tables


TABLES = doc_tables()


def table(*header):
    """The rows of the one table of PROTOCOL.md with this header."""
    found = [t for t in TABLES if t[1] == header]
    assert len(found) == 1, f"PROTOCOL.md: expected one table with header {header}, found {len(found)}"
    return found[0][2]


def code_span(cell):
    """The text of a cell that is one `code span` (None for a dash)."""
    if cell in ("—", "-"):
        return None
    match = re.fullmatch(r"`([^`]*)`", cell)
    assert match, f"PROTOCOL.md: expected a `code` cell, got {cell!r}"
    return match.group(1)


def number(text):
    """'1,048,576', '2^64 − 1', '2^28 - 1', '64' -> int."""
    text = text.replace(",", "").replace("−", "-").replace(" ", "")
    match = re.fullmatch(r"(\d+)(?:\^(\d+))?(?:-(\d+))?", text)
    assert match, f"PROTOCOL.md: not a number: {text!r}"
    base, exponent, minus = match.groups()
    value = int(base) ** int(exponent) if exponent else int(base)
    return value - int(minus or 0)


def hex_bytes(lines, where):
    text = " ".join(lines)
    assert re.fullmatch(r"[0-9a-fA-F\s]*", text), f"{where}: not hex: {text!r}"
    return bytes.fromhex(text)


def frame_from_json(codec, description, where):
    """Build the Frame an example's JSON line describes."""
    spec = json.loads(description)
    assert isinstance(spec, dict) and "type" in spec, f"{where}: JSON needs a 'type'"
    frame_type = spec.pop("type")
    if isinstance(frame_type, str):
        assert frame_type in FrameType.__members__, f"{where}: unknown frame type name {frame_type!r}"
        frame_type = FrameType[frame_type]
    flags = 0
    for name in spec.pop("flags", []):
        assert name in Flag.__members__, f"{where}: unknown flag {name!r}"
        flags |= Flag[name]
    lane = spec.pop("lane", None)
    if lane is not None:
        assert lane in Lane.__members__, f"{where}: unknown lane {lane!r}"
        flags |= Lane[lane]
    assert not ("payload" in spec and "payload_hex" in spec), f"{where}: both payload and payload_hex"
    payload = spec.pop("payload", "").encode("utf-8") + bytes.fromhex(spec.pop("payload_hex", ""))
    unknown = set(spec) - set(INT_FIELDS) - set(STR_FIELDS)
    assert not unknown, f"{where}: unknown field(s) {sorted(unknown)}"
    return codec.Frame(int(frame_type), int(flags), payload, **spec)


def difference(decoded, frame):
    """Name what differs between the decoded frames and the example's frame."""
    if len(decoded) != 1:
        return f"expected one frame, got {len(decoded)}"
    got, want = decoded[0].as_tuple(), frame.as_tuple()
    parts = [
        f"{label}: bytes say {g!r}, JSON says {w!r}"
        for label, g, w in (("type", got[0], want[0]), ("flags", got[1], want[1]))
        if g != w
    ]
    if got[2] != want[2]:
        parts.append(f"payload: bytes give {len(got[2])} bytes, JSON gives {len(want[2])} bytes")
    parts.extend(
        f"{name}: bytes say {got[3][name]!r}, JSON says {want[3][name]!r}"
        for name in want[3]
        if got[3][name] != want[3][name]
    )
    return "; ".join(parts)


# --------------------------------------------------------------------------
# examples


def test_the_doc_has_examples():
    assert len(EXAMPLES) >= 10 and len(ERROR_EXAMPLES) >= 5
    for number, info, content in BLOCKS:
        if info.startswith("example"):
            assert info.split()[0] in ("example", "example-error"), f"PROTOCOL.md:{number}: {info!r}"
            assert set(info.split()[1:]) <= {"decode-only"}, f"PROTOCOL.md:{number}: {info!r}"


@pytest.mark.parametrize("block", EXAMPLES, ids=[f"line{b[0]}" for b in EXAMPLES])
def test_example(codec, block):
    number, info, content = block
    where = f"PROTOCOL.md:{number}"
    assert len(content) >= 2, f"{where}: an example is a JSON line and hex lines"
    frame = frame_from_json(codec, content[0], where)
    data = hex_bytes(content[1:], where)
    if "decode-only" not in info.split():
        encoded = codec.Encoder().encode(frame)
        assert encoded == data, (
            f"{where}: {codec.IMPLEMENTATION} encodes {frame!r} as\n  {encoded.hex(' ')}\n"
            f"but the example says\n  {data.hex(' ')}"
        )
    decoder = codec.Decoder()
    decoded = decoder.feed(data)
    assert decoded == [frame], (
        f"{where}: {codec.IMPLEMENTATION} decodes the example's bytes as {decoded!r}; "
        f"{difference(decoded, frame)}"
    )
    assert decoder.buffered == 0
    bytewise = codec.Decoder()
    assert [f for i in range(len(data)) for f in bytewise.feed(data[i : i + 1])] == [frame]


@pytest.mark.parametrize("block", ERROR_EXAMPLES, ids=[f"line{b[0]}" for b in ERROR_EXAMPLES])
def test_error_example(codec, block):
    number, _, content = block
    where = f"PROTOCOL.md:{number}"
    assert len(content) == 2, f"{where}: an error example is a hex line and a Code name"
    data = hex_bytes(content[:1], where)
    name = content[1].strip()
    assert name in Code.__members__, f"{where}: {name!r} is not a Code name"
    decoder = codec.Decoder()
    with pytest.raises(ProtocolError) as info:
        decoder.feed(data)
    assert info.value.code == Code[name], (
        f"{where}: {codec.IMPLEMENTATION} reports {info.value.code.name} for {data.hex(' ')}, "
        f"the example says {name}"
    )


# --------------------------------------------------------------------------
# tables against core/codes.py


def flag_letters():
    """The legend under the frame type table: letter -> mask."""
    legend = re.search(r"Flags: (`[A-Z]` [^.]*)\.", DOC_TEXT)
    assert legend, "PROTOCOL.md: the flag letter legend ('Flags: `L` the lane bits, ...') is missing"
    letters = {}
    for letter, meaning in re.findall(r"`([A-Z])` ([A-Za-z_ ]+?)(?:,|$)", legend.group(1)):
        if meaning == "the lane bits":
            letters[letter] = int(Flag.LANE_MASK)
        else:
            assert meaning in Flag.__members__, f"PROTOCOL.md: flag letter {letter} names unknown {meaning!r}"
            letters[letter] = int(Flag[meaning])
    return letters


def test_field_kind_legend():
    legend = re.search(r"Field kinds: `u` (\w+), `s` (\w+), `k` (\w+)", DOC_TEXT)
    assert legend and legend.groups() == ("uvarint", "string", "kind"), "PROTOCOL.md: field kind legend"
    assert (U, S, K) == ("u", "s", "k")


def test_frame_type_table():
    letters = flag_letters()
    assert set(letters) == {"L", "Z", "A", "R", "C"}
    rows = table("type", "name", "direction", "fields", "allowed flags")
    seen = set()
    for type_cell, name, _direction, fields_cell, flags_cell in rows:
        frame_type = int(code_span(type_cell), 16)
        assert frame_type in FRAME_SCHEMAS, f"PROTOCOL.md lists type {frame_type:#04x} ({name}), codes.py does not"
        assert FrameType(frame_type).name == name, (
            f"type {frame_type:#04x}: PROTOCOL.md says {name}, codes.py says {FrameType(frame_type).name}"
        )
        fields = () if fields_cell in ("—", "-") else tuple(
            tuple(field.split()) for field in fields_cell.split(",")
        )
        schema, allowed = FRAME_SCHEMAS[frame_type]
        assert fields == schema, f"{name}: PROTOCOL.md fields {fields} != codes.py {schema}"
        mask = 0
        for letter in flags_cell.split():
            assert letter in letters, f"{name}: unknown flag letter {letter!r}"
            mask |= letters[letter]
        assert mask == allowed, f"{name}: PROTOCOL.md allows flags {mask:#04x}, codes.py {allowed:#04x}"
        assert frame_type not in seen, f"PROTOCOL.md lists {name} twice"
        seen.add(frame_type)
    assert seen == set(FRAME_SCHEMAS) == set(FrameType), (
        f"types missing from PROTOCOL.md: {sorted(set(FRAME_SCHEMAS) - seen)}"
    )


def test_flags_table():
    rows = table("bit", "mask", "name", "meaning")
    covered = 0
    named = set()
    for bits, mask_cell, name_cell, _meaning in rows:
        mask = int(code_span(mask_cell), 16)
        low, _, high = bits.replace("–", "-").partition("-")
        expected = sum(1 << bit for bit in range(int(low), int(high or low) + 1))
        assert mask == expected, f"flags table: bits {bits} do not make mask {mask:#04x}"
        assert not covered & mask, f"flags table: mask {mask:#04x} overlaps another row"
        covered |= mask
        name = code_span(name_cell)
        if name is None:  # reserved bits: no Flag may use them
            assert not mask & sum(int(f) for f in Flag), f"reserved bits {mask:#04x} are used by codes.Flag"
            continue
        member = Flag.__members__.get(name) or Flag.__members__.get(f"{name}_MASK")
        assert member is not None, f"flags table: {name} is not in codes.Flag"
        assert int(member) == mask, f"flag {name}: PROTOCOL.md mask {mask:#04x}, codes.py {int(member):#04x}"
        named.add(member.name)
    assert covered == 0xFF, f"flags table covers {covered:#04x}, not every bit"
    assert named == set(Flag.__members__), f"flags missing from PROTOCOL.md: {set(Flag.__members__) - named}"


def test_codes_table():
    rows = table("code", "name", "meaning", "what the terminal does")
    documented = {}
    for code_cell, name_cell, _meaning, _todo in rows:
        value, name = int(code_cell), code_span(name_cell)
        assert value not in documented, f"codes table lists {value} twice"
        documented[value] = name
        assert value in Code._value2member_map_, f"code {value} ({name}) is not in codes.Code"
        assert Code(value).name == name, f"code {value}: PROTOCOL.md says {name}, codes.py {Code(value).name}"
    assert set(documented) == {int(c) for c in Code}, (
        f"codes missing from PROTOCOL.md: {sorted({int(c) for c in Code} - set(documented))}"
    )


def test_kinds_table():
    rows = table("code", "kind", "default lane")
    documented = {}
    for code_cell, kind_cell, lane in rows:
        value, kind = int(code_cell), code_span(kind_cell)
        documented[value] = kind
        assert KINDS.get(value) == kind, f"kind code {value}: PROTOCOL.md says {kind}, codes.py {KINDS.get(value)}"
        assert lane in Lane.__members__ and KIND_LANES.get(kind) == Lane[lane], (
            f"kind {kind}: PROTOCOL.md lane {lane}, codes.py {KIND_LANES.get(kind)!r}"
        )
    assert documented == KINDS, f"kinds missing from PROTOCOL.md: {set(KINDS) - set(documented)}"
    assert set(KIND_LANES) == set(KINDS.values())


def test_uvarint_table(codec):
    rows = table("value", "bytes")
    assert len(rows) >= 5
    encoder = codec.Encoder()
    for value_cell, bytes_cell in rows:
        value = number(value_cell)
        data = bytes.fromhex(code_span(bytes_cell))
        assert uvarint(value) == data, f"uvarint table: {value_cell} is {uvarint(value).hex(' ')}, not {data.hex(' ')}"
        # Through the codec: an ACK whose seq is the value.
        frame_bytes = bytes((2 + len(data), 0x14, 0x00)) + data
        assert encoder.encode(codec.Frame(FrameType.ACK, seq=value)) == frame_bytes, value_cell
        assert codec.Decoder().feed(frame_bytes) == [codec.Frame(FrameType.ACK, seq=value)], value_cell


def test_type_ranges_table():
    rows = table("range", "use", "a receiver that does not know the type")
    ranges = {}
    for range_cell, use, _ in rows:
        bounds = [int(code_span(part.strip()), 16) for part in range_cell.split("–")]
        ranges[use.split()[0]] = range(bounds[0], bounds[-1] + 1)
    assert ranges["extensions"] == EXTENSION_TYPES, (
        f"PROTOCOL.md extension range {ranges['extensions']} != codes.EXTENSION_TYPES {EXTENSION_TYPES}"
    )
    assert set(FRAME_SCHEMAS) <= set(ranges["this"]), "a core frame type lies outside PROTOCOL.md's core range"


def test_limits():
    rows = {row[0]: row for row in table("limit", "default", "notes")}
    frame_limit = rows["frame limit (`length`)"]
    assert number(frame_limit[1].split()[0]) == DEFAULT_MAX_FRAME_SIZE
    low, high = re.search(r"from (\S+) to (.+?);", frame_limit[2]).groups()
    assert (number(low), number(high)) == (MIN_FRAME_SIZE_LIMIT, MAX_FRAME_SIZE_LIMIT), (
        f"PROTOCOL.md frame limit range {low}..{high} != codes.py "
        f"{MIN_FRAME_SIZE_LIMIT}..{MAX_FRAME_SIZE_LIMIT}"
    )
    kind_name = number(rows["kind name"][1].split()[0])
    assert kind_name == MAX_CUSTOM_KIND_LEN, f"PROTOCOL.md kind name limit {kind_name} != {MAX_CUSTOM_KIND_LEN}"
    threshold = re.search(r"threshold \(default (\d+) bytes\)", DOC_TEXT)
    assert threshold, "PROTOCOL.md section 13: '(default N bytes)' threshold sentence missing"
    assert int(threshold.group(1)) == DEFAULT_COMPRESS_THRESHOLD, (
        f"PROTOCOL.md compression threshold {threshold.group(1)} != {DEFAULT_COMPRESS_THRESHOLD}"
    )
    default_limit = re.search(r"frame limit \(default ([\d,]+) bytes", DOC_TEXT)
    assert default_limit, "PROTOCOL.md section 3: 'frame limit (default N bytes' sentence missing"
    assert number(default_limit.group(1)) == DEFAULT_MAX_FRAME_SIZE, (
        f"PROTOCOL.md section 3 default frame limit {default_limit.group(1)} != {DEFAULT_MAX_FRAME_SIZE}"
    )


def test_the_retry_hint_of_the_example_is_what_the_sdk_reads():
    # PROTOCOL.md section 7 (ERROR) and its example: "retry_ms=100 too many SENDs".
    from tillwire.client.connection import retry_hint
    from tillwire.server.commands import retry_hint as server_hint
    assert "`retry_ms=`" in DOC and '"retry_ms=100 too many SENDs"' in DOC
    assert retry_hint(Code.TOO_MANY_UNACKED, "retry_ms=100 too many SENDs") == 0.1
    assert retry_hint(Code.RATE_LIMITED, server_hint(0.0123, "over the rate")) == 0.013
    assert retry_hint(Code.BAD_MESSAGE, "retry_ms=100 x") is None       # only those two codes
    assert retry_hint(Code.RATE_LIMITED, "retry_ms=x1 y") is None


# --------------------------------------------------------------------------
# section 8.2: the message bodies, against the server's schemas


def kind_sections():
    """``kind -> (field rows, example body)`` of every ``#### `kind` `` section of 8.2."""
    sections = {}
    for number, line in enumerate(DOC_LINES, start=1):
        match = re.fullmatch(r"#### `([a-z.]+)`", line)
        if not match:
            continue
        kind = match.group(1)
        rows = next(t[2] for t in TABLES if t[0] > number)
        header = next(t[1] for t in TABLES if t[0] > number)
        assert header == ("field", "required", "value"), f"PROTOCOL.md:{number}: {kind}: {header}"
        body = next(content for n, info, content in BLOCKS
                    if n > number and info.split()[:1] == ["json"])
        info = next(info for n, info, _ in BLOCKS if n > number and info.split()[:1] == ["json"])
        assert info.split() == ["json", "body", kind], f"PROTOCOL.md:{number}: example {info!r}"
        assert kind not in sections, f"PROTOCOL.md documents {kind} twice"
        sections[kind] = ({code_span(r[0]): r[1] for r in rows}, json.loads("\n".join(body)))
    return sections


SECTIONS = kind_sections()


class _Reading(dict):
    """A body that records which fields a schema reads (``get``), with their
    paths (``items[].sku``); nested objects in lists record under the list."""

    def __init__(self, value, path, read):
        super().__init__({k: (
            [_Reading(v, f"{path}{k}[].", read) if isinstance(v, dict) else v for v in item]
            if isinstance(item, list) else item) for k, item in value.items()})
        self._path, self._read = path, read

    def get(self, key, default=None):
        self._read.add(self._path + key)
        return super().get(key, default)


def _without(body, field):
    """A copy of ``body`` without ``field`` (``items[].sku``: in every item)."""
    body = json.loads(json.dumps(body))
    head, _, rest = field.partition("[].")
    if rest:
        for item in body[head]:
            item.pop(rest, None)
    else:
        body.pop(field, None)
    return body


def _check(kind, body):
    from tillwire.server import kinds
    lane = KIND_LANES[kind]
    payload = json.dumps(body).encode()
    # Both the native check (what the server runs) and the reference.
    results = []
    for check in (kinds.check, kinds.check_reference):
        try:
            check(kind, lane, payload)
            results.append(None)
        except kinds.MessageError as exc:
            assert exc.code == Code.BAD_MESSAGE, f"{kind}: {exc}"
            results.append(exc.field)
    assert results[0] == results[1], f"{kind}: native and reference disagree: {results}"
    return results[0]


def test_every_registered_kind_has_its_body_documented():
    assert set(SECTIONS) == set(KINDS.values()), (
        f"PROTOCOL.md 8.2 lacks {set(KINDS.values()) - set(SECTIONS)}, "
        f"or documents unregistered {set(SECTIONS) - set(KINDS.values())}")


@pytest.mark.parametrize("kind", sorted(KINDS.values()))
def test_body_fields_match_the_schema(kind):
    from tillwire.server.kinds import SCHEMAS
    fields, example = SECTIONS[kind]
    # Every field the server's schema reads is documented.
    read = set()
    SCHEMAS[kind](_Reading(example, "", read), kind)
    assert read <= set(fields), f"{kind}: the schema reads {sorted(read - set(fields))}, undocumented"
    # The example holds every documented field and is valid.
    present = set(example) | {f"{k}[].{n}" for k, v in example.items() if isinstance(v, list)
                              for item in v if isinstance(item, dict) for n in item}
    sent = {f for f, required in fields.items() if required != "server"}
    assert sent <= present <= set(fields), (
        f"{kind}: the example's fields {sorted(present)}, the documented ones {sorted(fields)}")
    assert _check(kind, example) is None
    # Each field's "required" is what the server does when it is left out.
    for field, required in fields.items():
        refused = _check(kind, _without(example, field))
        if required in ("yes",) or required.startswith("with "):
            expected = "body." + field.replace("[].", "[0].")
            assert refused == expected, f"{kind}: without {field}: refused {refused!r}, doc says required"
        elif required.startswith("unless "):
            other = required.split(" ", 1)[1]
            assert refused is None, f"{kind}: without {field} (with {other}): refused {refused!r}"
            assert _check(kind, _without(_without(example, field), other)) == f"body.{field}"
        else:
            assert required in ("no", "server"), f"{kind}.{field}: required {required!r}"
            assert refused is None, f"{kind}: without optional {field}: refused {refused!r}"
    # Fields not listed travel unchanged.
    assert _check(kind, {**example, "note_for_the_till": "x"}) is None


# --------------------------------------------------------------------------
# section 9: who may send what where, and the subscriptions, against the code

ROLE_COLUMNS = ("pos", "kiosk", "staff", "manager", "service", "customer", "backend")
# Where the rights tables' example terminals are registered (their cells say so).
SENDER = dict(tenant="acme", store="s1", region="north", terminal="till7",
              member="", issued_at=0, expires_at=2**40)


def _claims(roles, **changes):
    from tillwire.server.auth import Claims
    return Claims(**{**SENDER, "roles": tuple(roles), **changes})


def rights_rows(first_header):
    rows = table(first_header, "example", *ROLE_COLUMNS)
    assert rows, f"PROTOCOL.md: the {first_header!r} table is empty"
    for label, example, *cells in rows:
        text, _, store = example.partition(" in ")
        yield label, code_span(text), store.strip() or None, cells


@pytest.mark.parametrize("first_header,lanes", [("P1 to", (Lane.P1,)),
                                                ("P2, P3 to", (Lane.P2, Lane.P3))])
def test_rights_tables_are_what_the_server_enforces(first_header, lanes):
    from tillwire.server.address import AddressError, check_publish, parse_address
    from tillwire.server.auth import ROLES
    assert set(ROLE_COLUMNS) == set(ROLES)
    for label, text, recipient_store, cells in rights_rows(first_header):
        address = parse_address(text)
        for role, cell in zip(ROLE_COLUMNS, cells):
            assert cell in ("yes", "—"), f"{first_header} {label}: cell {cell!r}"
            for lane in lanes:
                try:
                    check_publish(_claims([role]), address, lane, "order.event", recipient_store)
                    allowed = True
                except AddressError as exc:
                    assert exc.code == Code.FORBIDDEN, f"{text}: {exc}"
                    allowed = False
                assert allowed == (cell == "yes"), (
                    f"PROTOCOL.md 9.1: {role} sending P{int(lane)} to {text} ({label}): the table says "
                    f"{cell}, the server {'allows' if allowed else 'refuses'} it")


def test_p0_and_other_tenants_as_the_text_says():
    from tillwire.server.address import AddressError, check_publish, parse_address
    assert "no other role may send on P0" in DOC_TEXT and "another tenant is `BAD_ADDRESS`" in DOC_TEXT
    for role in ROLE_COLUMNS:
        for text in ("terminal:acme/till8", "store:acme/s1", "tenant:acme", "role:acme/*/service"):
            try:
                check_publish(_claims([role]), parse_address(text), Lane.P0, "payment.result", "s1")
                allowed = True
            except AddressError as exc:
                assert exc.code == Code.FORBIDDEN
                allowed = False
            assert allowed == (role == "backend"), f"P0 to {text} by {role}"
        with pytest.raises(AddressError) as info:
            check_publish(_claims([role]), parse_address("store:globex/s1"), Lane.P1, "order.event")
        assert info.value.code == Code.BAD_ADDRESS


def test_kind_rights_table_names_the_services_roles():
    from tillwire.server.tickets import OPENER_ROLES, STAFF_ROLES
    rows = {cell: who for cell, who, _ in table("kind", "sent by", "refused for others with")}

    def roles(cell):
        return set(re.findall(r"`([a-z]+)`", cell))

    assert roles(rows["`ticket.open`"]) == OPENER_ROLES
    assert roles(rows["`ticket.assign`, `ticket.resolve`"]) == STAFF_ROLES
    assert roles(rows["`ticket.reply`"]) == STAFF_ROLES and "the ticket's opener" in rows["`ticket.reply`"]
    assert roles(rows["`chat.message`"]) == {"customer", "service"}


def test_automatic_subscriptions_are_the_implied_channels():
    from tillwire.server.address import implied_channels
    rows = table("channel", "when")
    claims = _claims(["pos", "staff"], member="m-1001", terminal="till7")
    expected = []
    for channel_cell, when in rows:
        pattern = code_span(channel_cell).replace("<t>", "acme").replace("<s>", "s1") \
            .replace("<id>", "till7").replace("<g>", "north").replace("<m>", "m-1001")
        if "<r>" in pattern:
            assert "for each role" in when
            expected.extend(pattern.replace("<r>", role) for role in claims.roles)
        else:
            expected.append(pattern)
    assert sorted(expected) == sorted(implied_channels(claims))
    # The conditional rows: no region and no member, no such channels.
    bare = _claims(["pos"], region="")
    for channel_cell, when in rows:
        if when in ("the token names a region", "the token names a member"):
            scope = code_span(channel_cell).split(":")[0]
            assert not any(c.startswith(scope + ":") for c in implied_channels(bare))


# --------------------------------------------------------------------------
# section 11.7: the answer to every SEND, against a real node


def answers_table():
    """``label -> payload cell`` of the SENDACK table (indented in 11.7's list)."""
    start = next(i for i, line in enumerate(DOC_LINES)
                 if line.strip() == "| SEND | SENDACK payload |")
    rows = {}
    for line in DOC_LINES[start + 2:]:
        if not line.strip().startswith("|"):
            break
        label, payload = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[label] = payload
    return rows


def documented_answers(cell):
    """The answers a cell allows: the key sets of its ``{...}`` spans, and
    ``None`` for "an empty payload"."""
    shapes = [frozenset(re.findall(r'"(\w+)"', span)) for span in re.findall(r"`(\{[^`]*\})`", cell)]
    if "an empty payload" in cell:
        shapes.append(None)
    return shapes


async def _every_send(node):
    backend = await connect(node, "pay", roles=("backend",))
    till = await connect(node, "t1", store="s1", roles=("pos",))
    staff = await connect(node, "h1", store="s1", roles=("staff",))
    app = await connect(node, "app-1", store="s1", roles=("customer",), member="m-1")
    await connect(node, "agent-1", store="hq", roles=("service",))
    lone = await connect(node, "t9", store="s9", roles=("pos",))     # (s9: no one on duty)
    paid = {"order": "o-1", "status": "paid"}
    price = {"sku": "6901234567890", "price": "5.00", "version": 2}
    first = await backend.send("payment.result", paid, "terminal:acme/t1", ref=77)
    opened = await till.send("ticket.open", {"code": "E42"}, "role:acme/s1/staff", ref=5)
    ticket = json.loads(opened.payload)["ticket"]
    answers = {
        "P0/P1, routed": [first],
        "P2/P3": [await backend.send("price.update", price, "store:acme/s1"),
                  await backend.send("price.update", {**price, "version": 1}, "store:acme/s1")],
        "P3 `promo.offer`, `member.notice`": [
            await backend.send("promo.offer", {"offer": "tea-10", "title": "10% off"},
                               "store:acme/s1"),
            await backend.send("member.notice", {"member": "m-1", "text": "ready"},
                               "member:acme/m-1")],
        "`ticket.open`": [opened, await till.send("ticket.open", {"code": "E10"},
                                                  "role:acme/s1/staff"),
                          await lone.send("ticket.open", {"code": "E42"}, "role:acme/s9/staff")],
        "`ticket.assign`, `ticket.reply`, `ticket.resolve`": [
            await staff.send("ticket.assign", {"ticket": ticket}, "terminal:acme/t1"),
            await staff.send("ticket.reply", {"ticket": ticket, "text": "on my way"},
                             "terminal:acme/t1"),
            await staff.send("ticket.resolve", {"ticket": ticket, "resolution": "done"},
                             "terminal:acme/t1")],
        "`chat.message`": [await app.send(
            "chat.message", {"conversation": "0b5e2f4c-5d0a-4f7e-9b61-3c2d1e0f9a8b", "text": "hi"},
            "role:acme/*/service")],
    }
    again = await backend.send("payment.result", paid, "terminal:acme/t1", ref=77)
    opened_again = await till.send("ticket.open", {"code": "E42"}, "role:acme/s1/staff", ref=5)
    for resend, original in ((again, first), (opened_again, opened)):
        assert resend.flags & Flag.RETRANSMIT and resend.msg_id == original.msg_id
    # (A ticket.open's resend gets its first answer again: checked apart.)
    assert opened_again.payload == opened.payload
    answers["a resend of a P0/P1 `ref` already accepted"] = [again]
    return answers


@aiotest()
async def test_the_answer_to_every_send_is_what_the_server_sends():
    node = await start_node(**{"tickets.auto_replies": [{"code": "E10", "reply": "reboot"}]})
    try:
        answers = await _every_send(node)
    finally:
        await node.stop()
    rows = answers_table()
    assert set(rows) == set(answers), (
        f"PROTOCOL.md 11.7 rows {sorted(rows)} != the sends this test makes {sorted(answers)}")
    resend = "a resend of a P0/P1 `ref` already accepted"
    assert "for `ticket.open` its first answer again" in rows[resend]
    for label, frames in answers.items():
        allowed = documented_answers(rows[label])
        if label == resend:         # (the ticket id alone comes only after a restart)
            allowed.remove(frozenset({"ticket"}))
        seen = set()
        for frame in frames:
            assert frame.type == FrameType.SENDACK
            shape = frozenset(json.loads(frame.payload)) if frame.payload else None
            assert shape in allowed, (
                f"PROTOCOL.md 11.7 {label}: the server answered {frame.payload!r}, "
                f"the table allows {rows[label]}")
            seen.add(shape)
        assert seen == set(allowed), f"PROTOCOL.md 11.7 {label}: {set(allowed) - seen} never answered"
