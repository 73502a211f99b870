"""The one home for Tillwire's wire constants.

Every number here is defined by PROTOCOL.md and used by both codec twins,
the session state machines, the server and the SDK.  Nothing else in the
tree spells a frame type, flag, lane, error code or kind id as a literal.
``tests/test_protocol_doc.py`` checks that PROTOCOL.md's tables and this
module agree.
"""

from __future__ import annotations

import enum

PROTOCOL_VERSION = 1
"""Highest protocol version this implementation speaks."""

MIN_PROTOCOL_VERSION = 1
"""Lowest protocol version this implementation accepts."""

DEFAULT_MAX_FRAME_SIZE = 1 << 20
"""Default limit on a frame's length field (type + flags + body), 1 MiB."""

MAX_FRAME_SIZE_LIMIT = (1 << 28) - 1
"""Largest configurable frame limit: the length prefix is at most 4 bytes."""

MIN_FRAME_SIZE_LIMIT = 64
"""Smallest configurable frame limit."""

DEFAULT_COMPRESS_THRESHOLD = 512
"""Payloads of at least this many bytes are offered to lz4 (0 = never)."""

MAX_CUSTOM_KIND_LEN = 64
"""Longest kind string carried inline (UTF-8 bytes)."""


class FrameType(enum.IntEnum):
    """Frame type byte (PROTOCOL.md, "Frame types")."""

    # 0x01-0x0F: session control
    HELLO = 0x01
    WELCOME = 0x02
    PING = 0x03
    PONG = 0x04
    RESUME = 0x05
    GOAWAY = 0x06
    CLOSE = 0x07
    ERROR = 0x08
    # 0x10-0x1F: messages
    SEND = 0x10
    SENDACK = 0x11
    DELIVER = 0x12
    BROADCAST = 0x13
    ACK = 0x14
    NACK = 0x15
    RECEIPT = 0x16
    # 0x20-0x2F: channels and history
    SUBSCRIBE = 0x20
    UNSUBSCRIBE = 0x21
    SUBSCRIBED = 0x22
    UNSUBSCRIBED = 0x23
    RESYNC = 0x24
    HISTORY = 0x25
    HISTORY_ITEM = 0x26
    HISTORY_END = 0x27


EXTENSION_TYPES = range(0x40, 0x80)
"""Types a peer that does not know them skips; any other unknown type is fatal."""


class Flag(enum.IntFlag):
    """Bits of the flags byte (PROTOCOL.md, "Flags")."""

    LANE_MASK = 0x03
    COMPRESSED = 0x04
    ACK_REQUESTED = 0x08
    RETRANSMIT = 0x10
    RECEIPT_REQUESTED = 0x20


class Lane(enum.IntEnum):
    """Priority lanes, carried in the two low bits of the flags byte."""

    P0 = 0  # payment and transaction results
    P1 = 1  # orders, tickets, chat
    P2 = 2  # price and stock sync
    P3 = 3  # promotions and member offers


# Field kinds of the frame schemas.
U = "u"  # unsigned LEB128 varint, canonical, < 2**64
S = "s"  # uvarint byte length + UTF-8 bytes
K = "k"  # kind: uvarint code; code 0 is followed by an inline S

_LANE = int(Flag.LANE_MASK)
_Z = int(Flag.COMPRESSED)
_A = int(Flag.ACK_REQUESTED)
_R = int(Flag.RETRANSMIT)
_C = int(Flag.RECEIPT_REQUESTED)

# type -> (fields in wire order, allowed flag bits).  Every frame ends with a
# payload: the bytes after the last field (possibly none).
FRAME_SCHEMAS: dict[int, tuple[tuple[tuple[str, str], ...], int]] = {
    FrameType.HELLO: ((("version", U), ("heartbeat", U), ("token", S)), _Z),
    FrameType.WELCOME: (
        (("version", U), ("heartbeat", U), ("time", U), ("max_frame", U), ("epoch", U)),
        _Z,
    ),
    FrameType.PING: ((), _Z),
    FrameType.PONG: ((), _Z),
    FrameType.RESUME: ((("epoch", U), ("p0", U), ("p1", U)), _Z),
    FrameType.GOAWAY: ((("code", U), ("delay", U)), _Z),
    FrameType.CLOSE: ((("code", U),), _Z),
    FrameType.ERROR: ((("code", U), ("ref", U)), _Z),
    FrameType.SEND: (
        (("ref", U), ("ttl", U), ("to", S), ("kind", K), ("key", S)),
        _LANE | _Z | _A | _C,
    ),
    FrameType.SENDACK: ((("ref", U), ("msg_id", U)), _Z | _R),
    FrameType.DELIVER: ((("seq", U), ("msg_id", U), ("kind", K)), _LANE | _Z | _A | _R),
    FrameType.BROADCAST: ((("channel", U), ("offset", U), ("kind", K)), _LANE | _Z | _R),
    FrameType.ACK: ((("seq", U),), _LANE | _Z),
    FrameType.NACK: ((("seq", U), ("code", U)), _LANE | _Z),
    FrameType.RECEIPT: ((("msg_id", U), ("code", U), ("ref", U), ("to", S)), _Z),
    FrameType.SUBSCRIBE: ((("ref", U), ("epoch", U), ("offset", U), ("to", S)), _LANE | _Z),
    FrameType.UNSUBSCRIBE: ((("ref", U), ("to", S)), _LANE | _Z),
    FrameType.SUBSCRIBED: ((("channel", U), ("epoch", U), ("offset", U), ("to", S)), _LANE | _Z),
    FrameType.UNSUBSCRIBED: ((("channel", U), ("code", U)), _Z),
    FrameType.RESYNC: ((("channel", U), ("epoch", U), ("offset", U), ("count", U)), _Z),
    FrameType.HISTORY: (
        (("ref", U), ("epoch", U), ("offset", U), ("count", U), ("to", S)),
        _LANE | _Z,
    ),
    FrameType.HISTORY_ITEM: (
        (("ref", U), ("offset", U), ("msg_id", U), ("kind", K)),
        _LANE | _Z,
    ),
    FrameType.HISTORY_END: ((("ref", U), ("offset", U), ("count", U), ("code", U)), _Z),
}

INT_FIELDS = (
    "version", "heartbeat", "time", "max_frame", "epoch", "p0", "p1", "seq", "code",
    "delay", "ref", "ttl", "msg_id", "channel", "offset", "count",
)
"""Every integer field name a frame can carry (a Frame exposes all of them)."""

STR_FIELDS = ("token", "to", "kind", "key")
"""Every string field name a frame can carry."""


class Code(enum.IntEnum):
    """Error, close and goaway codes (PROTOCOL.md, "Codes").

    0-15 are protocol errors (always fatal), 16-31 authentication (fatal),
    32-47 request errors (an ERROR frame; the session goes on), 48-63 close
    and goaway reasons.
    """

    OK = 0
    MALFORMED = 1
    FRAME_TOO_LARGE = 2
    UNKNOWN_FRAME = 3
    BAD_VARINT = 4
    BAD_FLAGS = 5
    BAD_COMPRESSION = 6
    BAD_UTF8 = 7
    BAD_KIND = 8
    UNEXPECTED_FRAME = 9

    UNSUPPORTED_VERSION = 16
    AUTH_FAILED = 17
    TOKEN_EXPIRED = 18
    AUTH_TIMEOUT = 19
    TOKEN_REVOKED = 20

    FORBIDDEN = 32
    BAD_ADDRESS = 33
    BAD_MESSAGE = 34
    CARD_DATA = 35
    RATE_LIMITED = 36
    UNKNOWN_CHANNEL = 37
    STORE_UNAVAILABLE = 38
    TOO_MANY_UNACKED = 39
    BAD_REQUEST = 40
    TOO_MANY_SUBSCRIPTIONS = 41
    PARTIAL = 42
    UNKNOWN_TERMINAL = 43

    NORMAL = 48
    TAKEOVER = 49
    HEARTBEAT_TIMEOUT = 50
    SLOW_CONSUMER = 51
    DRAINING = 52
    KICKED = 53
    INTERNAL_ERROR = 54
    SHUTDOWN = 55
    CONNECTION_LIMIT = 56


class ReceiptStatus(enum.IntEnum):
    """The ``code`` of a RECEIPT frame."""

    DELIVERED = 1
    ACKED = 2
    READ = 3
    EXPIRED = 4
    REJECTED = 5


class ResyncReason(enum.IntEnum):
    """Why a channel's history could not be replayed (RESYNC is informative)."""

    OUT_OF_WINDOW = 0


# Registered kinds: the kind field carries these codes instead of the string.
# Codes 1-63 are reserved for kinds defined by this specification.
KINDS: dict[int, str] = {
    1: "payment.result",
    2: "order.event",
    3: "ticket.open",
    4: "ticket.assign",
    5: "ticket.reply",
    6: "ticket.resolve",
    7: "chat.message",
    8: "price.update",
    9: "stock.update",
    10: "promo.offer",
    11: "member.notice",
    12: "ticket.escalate",
}
KIND_CODES: dict[str, int] = {name: code for code, name in KINDS.items()}

# Default lane of each registered kind (the retail kinds issue validates these).
KIND_LANES: dict[str, Lane] = {
    "payment.result": Lane.P0,
    "order.event": Lane.P1,
    "ticket.open": Lane.P1,
    "ticket.assign": Lane.P1,
    "ticket.reply": Lane.P1,
    "ticket.resolve": Lane.P1,
    "ticket.escalate": Lane.P1,
    "chat.message": Lane.P1,
    "price.update": Lane.P2,
    "stock.update": Lane.P2,
    "promo.offer": Lane.P3,
    "member.notice": Lane.P3,
}
