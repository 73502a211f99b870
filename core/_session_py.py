"""Sans-IO session state machines, plain-Python twin.

Two machines, one per side of a connection (PROTOCOL.md sections 10-12):

* ``ServerSession``: what a server needs per terminal connection: frame
  validity per state, PING answered with PONG, ACK/NACK windows per inbox
  lane, heartbeat bookkeeping, an outbound control queue and the lane
  scheduler, and CLOSE on any protocol error.
* ``ClientSession``: what a terminal needs: handshake, inbox positions and
  duplicate suppression, channel ids and positions, batched ACKs, pending
  SENDs and heartbeat timing.

Neither does I/O or reads a clock: drivers feed received bytes with
``receive_data(data, now)``, act on the frames it returns, and write what
``data_to_send`` gives them.  The native module ``core/_session.pyx``
implements the same contract; ``tests/test_session.py`` runs both.
"""

from __future__ import annotations

import orjson

from . import _codec_py, _lanes_py
from .codes import (
    DEFAULT_MAX_FRAME_SIZE,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Code,
    Flag,
    FrameType,
    Lane,
    ReceiptStatus,
)
from .errors import ProtocolError

IMPLEMENTATION = "python"

# States of both machines.
AWAIT_HELLO = 0    # server: nothing received yet        | client: HELLO not sent yet
AWAIT_RESUME = 1   # server: HELLO received, no RESUME    | client: (unused)
AWAIT_WELCOME = 1  # client: HELLO sent, no WELCOME yet
OPEN = 2           # both: the session carries messages
CLOSED = 3         # both: CLOSE sent or received; input is ignored

INBOX_LANES = (Lane.P0, Lane.P1)

# What a server accepts from a terminal once the session is open.
_SERVER_OPEN_TYPES = frozenset({
    FrameType.PING, FrameType.PONG, FrameType.CLOSE, FrameType.SEND, FrameType.ACK,
    FrameType.NACK, FrameType.RECEIPT, FrameType.SUBSCRIBE, FrameType.UNSUBSCRIBE,
    FrameType.HISTORY,
})
# What a terminal accepts from a server once the session is open.
_CLIENT_OPEN_TYPES = frozenset({
    FrameType.PING, FrameType.PONG, FrameType.GOAWAY, FrameType.CLOSE, FrameType.ERROR,
    FrameType.SENDACK, FrameType.DELIVER, FrameType.BROADCAST, FrameType.RECEIPT,
    FrameType.SUBSCRIBED, FrameType.UNSUBSCRIBED, FrameType.RESYNC,
    FrameType.HISTORY_ITEM, FrameType.HISTORY_END,
})
_CLIENT_WELCOME_TYPES = frozenset({
    FrameType.WELCOME, FrameType.PONG, FrameType.GOAWAY, FrameType.CLOSE, FrameType.ERROR,
})


_HOLD = object()       # ServerSession._accept: the frame waits (see receive_data)


def _is_extension(frame_type: int) -> bool:
    return 0x40 <= frame_type <= 0x7F


class ServerSession:
    """The server's side of one terminal connection.

    Outbound bytes come from two places, drained in this order by
    ``data_to_send``: the control queue (WELCOME, PONG, SENDACK, ERROR,
    SUBSCRIBED, GOAWAY, CLOSE: small and always sent first) and the lane
    scheduler (DELIVER, BROADCAST, RESYNC), created on the first push so an
    idle connection does not pay for it.
    """

    def __init__(self, encoder, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 max_queued_bytes: int = 1 << 20, lane_weights=(8, 4, 1), now: float = 0.0,
                 handshake_frame_size: int | None = None):
        self.encoder = encoder
        self.state = AWAIT_HELLO
        self.started = now
        self.last_seen = now
        self.heartbeat_ms = 0
        self.close_code = 0
        self.dirty = False
        self.max_queued_bytes = max_queued_bytes
        self.lane_weights = tuple(lane_weights)
        # Until a HELLO arrives the frame limit is the handshake limit: a
        # stranger can make the server buffer only what a HELLO needs.
        self._decoder = _codec_py.Decoder(max_frame_size)
        self._frame_limit = self._decoder._limit
        if handshake_frame_size is not None:
            self._decoder._limit = min(self._frame_limit,
                                       _codec_py.Decoder(handshake_frame_size)._limit)
        self._control: list[bytes] = []
        self._pong_pending = False   # a PONG is queued: a further PING waits for it to go out
        self._held = None            # (frames, error) received but not handled yet
        self._lanes: _lanes_py.LaneScheduler | None = None
        self._sent = [0, 0]    # highest inbox seq handed to the lanes, per inbox lane
        self._acked = [0, 0]   # highest inbox seq acknowledged, per inbox lane

    # -- input ------------------------------------------------------------

    def receive_data(self, data, now: float) -> list:
        """Decode ``data``; return the frames the application must act on.

        Returned: HELLO, RESUME, SEND, ACK (only ones that advance the
        window), NACK, RECEIPT, SUBSCRIBE, UNSUBSCRIBE, HISTORY and a peer's
        CLOSE.  PING is answered here; PONG and extension frames are dropped.
        A protocol error queues CLOSE with its code (the frames before the
        bad one are still returned).

        One PONG at a time: a PING that arrives while a PONG is still queued
        waits, with everything received after it (``input_held``), until
        ``data_to_send`` has drained the queue; ``receive_data(b"", now)``
        then goes on with it.
        """
        if self.state == CLOSED:
            return []
        self.last_seen = now
        if self._held is not None:
            frames, error = self._held
            if data and error is None:
                more, error = self._decode(data)
                frames = frames + more
            if self._pong_pending:
                self._held = (frames, error)
                return []
            self._held = None
        else:
            frames, error = self._decode(data)
        events = []
        for i, frame in enumerate(frames):
            accepted = self._accept(frame, events)
            if accepted is _HOLD:
                self._held = (frames[i:], error)
                return events
            if not accepted:
                return events
        if error is not None:
            self.close(error.code, error.message)
        return events

    def _decode(self, data) -> tuple[list, ProtocolError | None]:
        """Frames of ``data`` and the error that ended them (or None).  Before
        HELLO, bytes go in one at a time until the first frame is complete,
        so the frames after it are judged by the full frame limit."""
        frames: list = []
        try:
            if self.state == AWAIT_HELLO and self._decoder._limit != self._frame_limit:
                data = bytes(data)
                for i in range(len(data)):
                    frames += self._decoder.feed(data[i:i + 1])
                    if frames:
                        if frames[0].type == FrameType.HELLO:
                            self._decoder._limit = self._frame_limit
                        frames += self._decoder.feed(data[i + 1:])
                        break
            else:
                frames = self._decoder.feed(data)
        except ProtocolError as exc:
            return frames + exc.frames, exc
        return frames, None

    def _accept(self, frame, events: list):
        """Validate one frame against the state; False once the session
        ended, _HOLD when the frame must wait for the queued PONG."""
        ftype = frame.type
        state = self.state
        if state == AWAIT_HELLO:
            if ftype == FrameType.HELLO:
                self.state = AWAIT_RESUME
                events.append(frame)
                return True
            return self._unexpected(frame, "the first frame must be HELLO")
        if _is_extension(ftype):
            return True
        if ftype == FrameType.PING:
            if self._pong_pending:
                return _HOLD
            self._control.append(self.encoder.encode(
                _codec_py.Frame(FrameType.PONG, payload=frame.payload)))
            self._pong_pending = True
            return True
        if ftype == FrameType.CLOSE:
            self.state = CLOSED
            self.close_code = frame.code
            self._drop_lanes()
            events.append(frame)
            return False
        if state == AWAIT_RESUME:
            if ftype == FrameType.RESUME:
                self.state = OPEN
                events.append(frame)
                return True
            return self._unexpected(frame, "only RESUME, PING or CLOSE may follow HELLO")
        if ftype not in _SERVER_OPEN_TYPES:
            return self._unexpected(frame, "not allowed in an open session")
        if ftype == FrameType.PONG:
            return True
        if ftype == FrameType.ACK:
            lane = frame.flags & Flag.LANE_MASK
            if lane > Lane.P1:
                self.error(Code.BAD_REQUEST, 0, "ACK: lane must be P0 or P1")
            elif frame.seq > self._sent[lane]:
                self.error(Code.BAD_REQUEST, 0,
                           f"ACK: P{lane} seq {frame.seq} was never delivered")
            elif frame.seq > self._acked[lane]:
                self._acked[lane] = frame.seq
                events.append(frame)
            return True
        if ftype == FrameType.NACK:
            lane = frame.flags & Flag.LANE_MASK
            if lane > Lane.P1:
                self.error(Code.BAD_REQUEST, 0, "NACK: lane must be P0 or P1")
            elif not self._acked[lane] < frame.seq <= self._sent[lane]:
                self.error(Code.BAD_REQUEST, 0,
                           f"NACK: P{lane} seq {frame.seq} is not awaiting an ack")
            else:
                events.append(frame)
            return True
        if ftype == FrameType.RECEIPT and frame.code != ReceiptStatus.READ:
            self.error(Code.BAD_REQUEST, 0, "RECEIPT: a terminal may only send READ")
            return True
        events.append(frame)
        return True

    def _unexpected(self, frame, why: str) -> bool:
        name = FrameType(frame.type).name if frame.type in FrameType._value2member_map_ \
            else f"0x{frame.type:02x}"
        self.close(Code.UNEXPECTED_FRAME, f"{name}: {why}")
        return False

    # -- output -------------------------------------------------------------

    def accept(self, version: int, heartbeat_ms: int, time_ms: int, max_frame: int,
               epoch: int, payload: bytes = b"") -> None:
        """Queue WELCOME for the HELLO the application has verified (ignored
        after CLOSE: CLOSE is always the last frame)."""
        frame = self.encoder.encode(_codec_py.Frame(
            FrameType.WELCOME, version=version, heartbeat=heartbeat_ms, time=time_ms,
            max_frame=max_frame, epoch=epoch, payload=payload))
        if self.state == CLOSED:
            return
        self.heartbeat_ms = heartbeat_ms
        self._control.append(frame)

    def set_inbox(self, lane: int, acked: int) -> None:
        """Set the inbox window after RESUME: ``acked`` is the position both
        sides agree on; delivery continues after it."""
        self._acked[lane] = acked
        self._sent[lane] = acked

    def inbox_window(self, lane: int) -> tuple[int, int]:
        """(acked, sent) of an inbox lane."""
        return self._acked[lane], self._sent[lane]

    def deliver(self, lane: int, seq: int, msg_id: int, kind: str, payload: bytes,
                retransmit: bool = False) -> int:
        """Queue an inbox message; returns the lane scheduler's push result."""
        if lane > Lane.P1:
            raise ValueError("deliver: inbox lanes are P0 and P1")
        if self.state == CLOSED:
            return _lanes_py.DROPPED     # after CLOSE nothing more is queued
        flags = Flag.ACK_REQUESTED | (Flag.RETRANSMIT if retransmit else 0)
        frame = self.encoder.encode_deliver(lane, flags, seq, msg_id, kind, payload)
        if seq > self._sent[lane]:
            self._sent[lane] = seq
        return self.push(lane, frame)

    def push(self, lane: int, frame: bytes, key=None, deadline: float = 0.0,
             channel=None) -> int:
        """Queue an encoded frame (a BROADCAST shared by many sessions).

        After CLOSE nothing is queued and DROPPED is returned."""
        if not isinstance(frame, bytes):
            raise TypeError("push: frame must be bytes")
        if self.state == CLOSED:
            return _lanes_py.DROPPED
        lanes = self._lanes
        if lanes is None:
            lanes = self._lanes = _lanes_py.LaneScheduler(self.max_queued_bytes,
                                                          self.lane_weights)
        return lanes.push(lane, frame, key, deadline, channel)

    def control(self, frame: bytes) -> None:
        """Queue an encoded control frame; control frames go before any lane.
        Ignored after CLOSE (CLOSE is always the last frame)."""
        if not isinstance(frame, bytes):
            raise TypeError("control: frame must be bytes")
        if self.state != CLOSED:
            self._control.append(frame)

    def error(self, code: int, ref: int, message: str) -> None:
        """Queue ERROR (the session goes on); ignored after CLOSE."""
        if self.state == CLOSED:
            return
        self._control.append(self.encoder.encode(_codec_py.Frame(
            FrameType.ERROR, code=code, ref=ref, payload=message.encode())))

    def goaway(self, code: int, delay_ms: int, reason: str = "") -> None:
        """Queue GOAWAY: the terminal should reconnect after ``delay_ms``."""
        frame = self.encoder.encode(_codec_py.Frame(
            FrameType.GOAWAY, code=code, delay=delay_ms, payload=reason.encode()))
        if self.state != CLOSED:
            self._control.append(frame)

    def close(self, code: int, reason: str = "") -> None:
        """Queue CLOSE as the last frame and end the session.

        Queued lane frames are discarded (P0/P1 stay in the store); control
        frames queued before the CLOSE are still sent.
        """
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self.close_code = code
        self._held = None
        self._drop_lanes()
        self._control.append(self.encoder.encode(_codec_py.Frame(
            FrameType.CLOSE, code=code, payload=reason.encode())))

    def _drop_lanes(self) -> None:
        if self._lanes is not None:
            self._lanes.clear()

    def data_to_send(self, max_bytes: int, now: float) -> bytes:
        """The control queue, then the lanes: up to ``max_bytes`` in all, but
        at least one whole frame (control frames are never split; the
        control frames left wait for the next call, ahead of any lane)."""
        control = self._control
        taken = 0
        size = 0
        for frame in control:
            if taken and size + len(frame) > max_bytes:
                break
            size += len(frame)
            taken += 1
        out = b"".join(control[:taken])
        del control[:taken]
        if control:
            return out
        self._pong_pending = False      # every PONG queued went with it
        lanes = self._lanes
        if lanes is not None and len(out) < max_bytes:
            out += lanes.drain(max_bytes - len(out), now)
        return out

    @property
    def control_bytes(self) -> int:
        """Bytes waiting in the control queue (answers to the terminal's own
        requests, receipts, announcements)."""
        return sum(len(c) for c in self._control)

    @property
    def input_held(self) -> bool:
        """True while received input waits for the queued PONG to go out."""
        return self._held is not None

    @property
    def pending(self) -> bool:
        return bool(self._control) or (self._lanes is not None and len(self._lanes) > 0)

    @property
    def queued_bytes(self) -> int:
        lanes = 0 if self._lanes is None else self._lanes.queued_bytes
        return lanes + self.control_bytes

    @property
    def inbox_bytes(self) -> int:
        """Bytes of P0 and P1 frames queued in the lanes."""
        lanes = self._lanes
        return 0 if lanes is None else lanes.lane_bytes(0) + lanes.lane_bytes(1)

    def take_resync(self) -> list:
        return [] if self._lanes is None else self._lanes.take_resync()

    def lane_counters(self) -> tuple[int, int, int]:
        """(conflated, p2_dropped, p3_dropped) of this connection so far."""
        lanes = self._lanes
        if lanes is None:
            return (0, 0, 0)
        return (lanes.conflated, lanes.p2_dropped, lanes.p3_dropped)

    def release_lanes(self):
        """Free an empty scheduler (idle connections keep no queue memory).

        Returns its (conflated, p2_dropped, p3_dropped) counters, for the
        caller to keep, or None when there was nothing to release (no
        scheduler, or frames still queued).
        """
        lanes = self._lanes
        if lanes is None or len(lanes) != 0:
            return None
        self._lanes = None
        return (lanes.conflated, lanes.p2_dropped, lanes.p3_dropped)

    def deadline(self, auth_timeout: float) -> float:
        """When the connection must have shown life again (or be closed)."""
        if self.heartbeat_ms == 0:
            return self.started + auth_timeout
        return self.last_seen + 1.5 * self.heartbeat_ms / 1000.0


def fanout(sessions, lane: int, frame: bytes, key=None, deadline: float = 0.0,
           channel=None, dirty: list | None = None) -> list:
    """Push one encoded frame to many sessions (encode once, write many).

    Sessions that were not ``dirty`` are marked and appended to ``dirty``;
    returns the sessions whose push OVERFLOWed (slow consumers).
    """
    overflow = []
    for session in sessions:
        if isinstance(session, ServerSession) and session.state == CLOSED:
            continue                     # closed: nothing more is queued
        if session.push(lane, frame, key, deadline, channel) == _lanes_py.OVERFLOW:
            overflow.append(session)
        if dirty is not None and not session.dirty:
            session.dirty = True
            dirty.append(session)
    return overflow


class ClientSession:
    """The terminal's side of a connection.

    Positions (what a terminal must persist to process each message exactly
    once, PROTOCOL.md 11.4 and 12): ``epoch``, ``processed`` (P0, P1) and
    ``channel_positions`` ((name, lane) -> (epoch, offset)) of the P2 and P3
    streams.
    """

    def __init__(self, encoder, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 now: float = 0.0):
        self.encoder = encoder
        self.state = AWAIT_HELLO
        self.version = 0
        self.heartbeat_ms = 0
        self.server_time = 0
        self.peer_max_frame = 0
        self.epoch = 0
        self.close_code = 0
        self.close_reason = ""
        self.last_received = now
        self.last_sent = now
        self.duplicates = 0
        self.processed = [0, 0]
        self.received = [0, 0]
        self.channel_positions: dict[tuple[str, int], tuple[int, int]] = {}
        self._decoder = _codec_py.Decoder(max_frame_size)
        self._out: list[bytes] = []
        self._pending_ack = [0, 0]
        self._channel_names: dict[int, tuple[str, int]] = {}   # id -> (name, lane)
        self._channel_epochs: dict[int, int] = {}
        self._resync_left: dict[int, int] = {}
        self.outstanding: set[int] = set()

    # -- output -------------------------------------------------------------

    def hello(self, token: str, heartbeat_ms: int = 0, client_info: bytes = b"",
              version: int = PROTOCOL_VERSION) -> None:
        if self.state != AWAIT_HELLO:
            raise RuntimeError("hello: already sent")
        self.state = AWAIT_WELCOME
        self._out.append(self.encoder.encode(_codec_py.Frame(
            FrameType.HELLO, version=version, heartbeat=heartbeat_ms, token=token,
            payload=client_info)))

    def resume(self, epoch: int = 0, p0: int = 0, p1: int = 0,
               channels: dict | None = None) -> None:
        """Queue RESUME with the positions the terminal kept (may follow HELLO at once).

        ``channels`` maps (name, lane) to (epoch, offset).
        """
        self.epoch = epoch
        self.processed = [p0, p1]
        self.received = [p0, p1]
        self.channel_positions = {(name, int(lane)): (int(e), int(o))
                                  for (name, lane), (e, o) in (channels or {}).items()}
        nested: dict[str, dict[str, list[int]]] = {}
        for (name, lane), (e, o) in self.channel_positions.items():
            nested.setdefault(name, {})[f"P{lane}"] = [e, o]
        payload = orjson.dumps({"channels": nested}) if nested else b""
        self._out.append(self.encoder.encode(_codec_py.Frame(
            FrameType.RESUME, epoch=epoch, p0=p0, p1=p1, payload=payload)))

    def send(self, lane: int, to: str, kind: str, payload: bytes, *, ref: int,
             ttl_ms: int = 0, key: str = "", ack: bool = True,
             receipt: bool = False) -> None:
        if ack and ref == 0:
            raise ValueError("send: a SEND that wants a SENDACK needs a non-zero ref")
        flags = lane | (Flag.ACK_REQUESTED if ack else 0) | \
            (Flag.RECEIPT_REQUESTED if receipt else 0)
        self._out.append(self.encoder.encode(_codec_py.Frame(
            FrameType.SEND, flags, payload, ref=ref, ttl=ttl_ms, to=to, kind=kind,
            key=key)))
        if ack:
            self.outstanding.add(ref)

    def ack(self, lane: int, seq: int) -> None:
        """The application processed inbox message ``seq``; ACK it (batched)."""
        if lane > Lane.P1:
            raise ValueError("ack: inbox lanes are P0 and P1")
        if seq > self.received[lane]:
            raise ValueError(f"ack: P{lane} seq {seq} was not received")
        if seq > self.processed[lane]:
            self.processed[lane] = seq
            self._pending_ack[lane] = seq

    def nack(self, lane: int, seq: int, code: int = 0, reason: str = "") -> None:
        self._out.append(self.encoder.encode(_codec_py.Frame(
            FrameType.NACK, lane, reason.encode(), seq=seq, code=code)))

    def subscribe(self, ref: int, name: str, lane: int, epoch: int = 0,
                  offset: int = 0) -> None:
        """Subscribe to the ``lane`` stream of channel ``name`` from a position."""
        self._out.append(self.encoder.encode(_codec_py.Frame(
            FrameType.SUBSCRIBE, lane, ref=ref, epoch=epoch, offset=offset, to=name)))

    def unsubscribe(self, ref: int, name: str, lane: int) -> None:
        self._out.append(self.encoder.encode(_codec_py.Frame(
            FrameType.UNSUBSCRIBE, lane, ref=ref, to=name)))

    def history(self, ref: int, name: str, lane: int, epoch: int = 0, offset: int = 0,
                count: int = 100) -> None:
        self._out.append(self.encoder.encode(_codec_py.Frame(
            FrameType.HISTORY, lane, ref=ref, epoch=epoch, offset=offset, count=count,
            to=name)))

    def read(self, msg_id: int) -> None:
        """Queue a read receipt for a received message."""
        self._out.append(self.encoder.encode(_codec_py.Frame(
            FrameType.RECEIPT, msg_id=msg_id, code=ReceiptStatus.READ)))

    def ping(self, payload: bytes = b"") -> None:
        self._out.append(self.encoder.encode(_codec_py.Frame(FrameType.PING, payload=payload)))

    def close(self, code: int = Code.NORMAL, reason: str = "") -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self.close_code = code
        self.close_reason = reason
        self._out.append(self.encoder.encode(_codec_py.Frame(
            FrameType.CLOSE, code=code, payload=reason.encode())))

    def data_to_send(self, now: float) -> bytes:
        """Pending ACKs (one per inbox lane) then every queued frame."""
        parts = []
        for lane in INBOX_LANES:
            if self._pending_ack[lane]:
                parts.append(self.encoder.encode(_codec_py.Frame(
                    FrameType.ACK, lane, seq=self._pending_ack[lane])))
                self._pending_ack[lane] = 0
        parts.extend(self._out)
        self._out.clear()
        out = b"".join(parts)
        if out:
            self.last_sent = now
        return out

    @property
    def pending(self) -> bool:
        return bool(self._out) or any(self._pending_ack)

    def ping_due(self, now: float) -> bool:
        """True when nothing was sent for a heartbeat interval."""
        return self.state == OPEN and self.heartbeat_ms > 0 and \
            now - self.last_sent >= self.heartbeat_ms / 1000.0

    def dead(self, now: float) -> bool:
        """True when nothing was received for two heartbeat intervals."""
        return self.heartbeat_ms > 0 and \
            now - self.last_received > 2.0 * self.heartbeat_ms / 1000.0

    def channel_name(self, channel_id: int) -> tuple[str, int]:
        """(name, lane) of a channel id announced by SUBSCRIBED."""
        return self._channel_names[channel_id]

    # -- input --------------------------------------------------------------

    def receive_data(self, data, now: float) -> list:
        """Decode ``data``; return the frames the application must see.

        Dropped here: duplicates (a DELIVER at or below the received inbox
        position, a BROADCAST at or below the channel position), PING
        (answered), PONG and extension frames.
        """
        if self.state == CLOSED:
            return []
        self.last_received = now
        try:
            frames = self._decoder.feed(data)
            error = None
        except ProtocolError as exc:
            frames = exc.frames
            error = exc
        events = []
        for frame in frames:
            if not self._accept(frame, events):
                return events
        if error is not None:
            self.close(error.code, error.message)
        return events

    def _accept(self, frame, events: list) -> bool:
        ftype = frame.type
        if _is_extension(ftype):
            return True
        allowed = _CLIENT_WELCOME_TYPES if self.state == AWAIT_WELCOME else _CLIENT_OPEN_TYPES
        if (self.state == AWAIT_HELLO and ftype != FrameType.CLOSE) or ftype not in allowed:
            # (A CLOSE may come first: a server refusing a connection at once.)
            name = FrameType(ftype).name if ftype in FrameType._value2member_map_ \
                else f"0x{ftype:02x}"
            self.close(Code.UNEXPECTED_FRAME, f"{name}: unexpected from the server now")
            return False
        if ftype == FrameType.DELIVER:
            lane = frame.flags & Flag.LANE_MASK
            if lane > Lane.P1:
                self.close(Code.UNEXPECTED_FRAME, "DELIVER: lane must be P0 or P1")
                return False
            if frame.seq <= self.received[lane]:
                self.duplicates += 1
                if self.processed[lane]:
                    # Tell the server again: our earlier ACK may have been lost.
                    self._pending_ack[lane] = self.processed[lane]
                return True
            self.received[lane] = frame.seq
            events.append(frame)
            return True
        if ftype == FrameType.BROADCAST:
            channel = frame.channel
            stream = self._channel_names.get(channel)
            if stream is None or stream[1] != frame.flags & Flag.LANE_MASK:
                self.close(Code.UNEXPECTED_FRAME,
                           f"BROADCAST: channel id {channel} unknown in this lane")
                return False
            epoch = self._channel_epochs[channel]
            left = self._resync_left.get(channel, 0)
            if left and frame.flags & Flag.RETRANSMIT:
                if left == 1:
                    del self._resync_left[channel]
                else:
                    self._resync_left[channel] = left - 1
                events.append(frame)
                return True
            position = self.channel_positions.get(stream)
            if position is not None and position[0] == epoch and frame.offset <= position[1]:
                self.duplicates += 1
                return True
            self.channel_positions[stream] = (epoch, frame.offset)
            events.append(frame)
            return True
        if ftype == FrameType.PING:
            self._out.append(self.encoder.encode(
                _codec_py.Frame(FrameType.PONG, payload=frame.payload)))
            return True
        if ftype == FrameType.PONG:
            return True
        if ftype == FrameType.WELCOME:
            if not MIN_PROTOCOL_VERSION <= frame.version <= PROTOCOL_VERSION:
                self.close(Code.UNSUPPORTED_VERSION,
                           f"server chose version {frame.version}; this terminal speaks "
                           f"{MIN_PROTOCOL_VERSION}-{PROTOCOL_VERSION}")
                return False
            self.state = OPEN
            self.version = frame.version
            self.heartbeat_ms = frame.heartbeat
            self.server_time = frame.time
            self.peer_max_frame = frame.max_frame
            if frame.epoch != self.epoch:
                # The server's inbox history was reset: our positions mean nothing.
                self.epoch = frame.epoch
                self.processed = [0, 0]
                self.received = [0, 0]
                self._pending_ack = [0, 0]
            events.append(frame)
            return True
        if ftype == FrameType.SUBSCRIBED:
            stream = (frame.to, frame.flags & Flag.LANE_MASK)
            self._channel_names[frame.channel] = stream
            self._channel_epochs[frame.channel] = frame.epoch
            position = self.channel_positions.get(stream)
            if position is not None and position[0] != frame.epoch:
                self.channel_positions[stream] = (frame.epoch, 0)
            events.append(frame)
            return True
        if ftype == FrameType.UNSUBSCRIBED:
            self._channel_names.pop(frame.channel, None)
            self._channel_epochs.pop(frame.channel, None)
            self._resync_left.pop(frame.channel, None)
            events.append(frame)
            return True
        if ftype == FrameType.RESYNC:
            stream = self._channel_names.get(frame.channel)
            if stream is None:
                self.close(Code.UNEXPECTED_FRAME, f"RESYNC: unknown channel id {frame.channel}")
                return False
            self._channel_epochs[frame.channel] = frame.epoch
            self.channel_positions[stream] = (frame.epoch, frame.offset)
            if frame.count:
                self._resync_left[frame.channel] = frame.count
            else:
                self._resync_left.pop(frame.channel, None)
            events.append(frame)
            return True
        if ftype in (FrameType.SENDACK, FrameType.ERROR):
            self.outstanding.discard(frame.ref)
        elif ftype == FrameType.CLOSE:
            self.state = CLOSED
            self.close_code = frame.code
            self.close_reason = frame.payload.decode("utf-8", "replace")
            events.append(frame)
            return False
        events.append(frame)
        return True
