"""The Redis Broker backend: pub/sub between the workers of a fleet.

Each worker holds one pub/sub connection, however many channels and
sessions it has: a channel ``store:acme/s1`` is the Redis channel
``<p>:ch:store:acme/s1``, subscribed once per worker (the hub counts its
sessions), many per SUBSCRIBE command (up to ``SUBSCRIBE_BATCH``).  A
message is the lane byte then the payload.  Each worker's control inbox is
the channel ``<p>:ctl:<worker id>``: ``send_control`` publishes there and
learns from PUBLISH's answer whether anyone listens (False: no such worker,
or it stopped or died: its connection went with it).

One task per worker reads the pub/sub connection and calls the handlers on
the loop, in the order Redis delivered: one sender's publishes and control
messages (made one after another on its connection) arrive in the order it
made them.  :meth:`RedisBroker.subscribe` and :meth:`unsubscribe` return
once Redis confirmed them, so a publish made afterwards by anyone is heard
(or not).  Redis keeps no history of pub/sub: what is published while a
worker is not subscribed is not delivered to it, as the contract says.
When the connection fails (a Redis restart), the worker opens a new one with
backoff and subscribes it to everything again by itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from redis.exceptions import RedisError

from .broker import Broker, ControlHandler, MessageHandler
from .retry import backoff

log = logging.getLogger("tillwire.broker")

SUBSCRIBE_BATCH = 512        # channels per SUBSCRIBE / UNSUBSCRIBE command
PING_EVERY = 15.0            # seconds of quiet before the pub/sub connection is pinged


class RedisBroker(Broker):
    """Worker ``worker_id``'s broker over ``client`` (a ``redis.asyncio.Redis``)."""

    def __init__(self, worker_id: str, client, *, prefix: str = "tw") -> None:
        self.worker_id = worker_id
        self._redis = client
        self._prefix = prefix
        self._channel_prefix = f"{prefix}:ch:".encode()
        self._control = f"{prefix}:ctl:{worker_id}".encode()
        self._pubsub = None
        self._reader = None
        self._channels: set[str] = set()
        self._confirm: dict[tuple[str, bytes], asyncio.Future] = {}
        self._on_message: MessageHandler | None = None
        self._on_control: ControlHandler | None = None
        self.ping_every = PING_EVERY
        self.on_resubscribed: Callable[[], None] | None = None
        """Called after a lost pub/sub connection was replaced (what was
        published to this worker meanwhile is lost: the caller repairs)."""

    @property
    def connected(self) -> bool:
        """True while the pub/sub connection is up (started and not reconnecting)."""
        return self._pubsub is not None and self._on_message is not None

    def _name(self, channel: str) -> bytes:
        return self._channel_prefix + channel.encode()

    def topic(self, channel: str) -> bytes:
        """The Redis pub/sub channel carrying ``channel`` (for a History that
        publishes in its append: ``RedisHistory.append_published``)."""
        return self._name(channel)

    def control_topic(self, worker_id: str) -> bytes:
        """The Redis pub/sub channel of ``worker_id``'s control inbox (for a
        History that publishes a terminal's channel message to its owner in
        its append)."""
        return f"{self._prefix}:ctl:{worker_id}".encode()

    async def start(self, on_message: MessageHandler, on_control: ControlHandler) -> None:
        (_, listening), = await self._redis.pubsub_numsub(self._control)
        if listening:
            raise ValueError(f"broker: worker {self.worker_id!r} is started already")
        self._pubsub = self._redis.pubsub()
        self._on_message, self._on_control = on_message, on_control
        confirmed = self._expect("subscribe", [self._control])
        await self._pubsub.subscribe(self._control)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await asyncio.gather(*confirmed)

    async def stop(self) -> None:
        if self._on_message is None:
            return
        self._on_message = self._on_control = None      # nothing is handed on from now
        self._reader.cancel()
        try:
            await self._reader
        except asyncio.CancelledError:
            pass
        for fut in self._confirm.values():
            fut.cancel()
        self._confirm.clear()
        self._channels.clear()
        if self._pubsub is not None:
            await self._pubsub.aclose()      # (its connection, and every subscription)
        self._pubsub = self._reader = None

    async def publish(self, channel: str, lane: int, payload: bytes) -> None:
        self._check()
        await self._redis.publish(self._name(channel), bytes((lane,)) + payload)

    async def subscribe(self, channels: Iterable[str]) -> None:
        self._check()
        new = [c for c in dict.fromkeys(channels) if c not in self._channels]
        self._channels.update(new)
        await self._command("subscribe", [self._name(c) for c in new])

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        self._check()
        gone = [c for c in dict.fromkeys(channels) if c in self._channels]
        self._channels.difference_update(gone)
        await self._command("unsubscribe", [self._name(c) for c in gone])

    async def send_control(self, worker_id: str, message: bytes) -> bool:
        self._check()
        return bool(await self._redis.publish(f"{self._prefix}:ctl:{worker_id}", message))

    # -- the pub/sub connection ---------------------------------------------------------

    async def _command(self, kind: str, names: list[bytes]) -> None:
        """SUBSCRIBE or UNSUBSCRIBE ``names`` in batches; return once Redis
        confirmed (while the connection is being opened again: at once, as
        the new one subscribes to ``_channels``)."""
        for i in range(0, len(names), SUBSCRIBE_BATCH):
            if self._pubsub is None:
                return
            batch = names[i:i + SUBSCRIBE_BATCH]
            confirmed = self._expect(kind, batch)
            await getattr(self._pubsub, kind)(*batch)
            await asyncio.gather(*confirmed)

    def _expect(self, kind: str, names: list[bytes]) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        futures = []
        for name in names:
            fut = self._confirm.get((kind, name))
            if fut is None:
                fut = self._confirm[(kind, name)] = loop.create_future()
            futures.append(fut)
        return futures

    async def _read(self) -> None:
        """Read the pub/sub connection for as long as the worker is started;
        when it fails (Redis restarted, the network went), open a new one
        with backoff and subscribe it to the control channel and every
        channel again.  What was published meanwhile is not delivered (pub/sub
        keeps nothing; P0/P1 live in the store, P2/P3 in the streams)."""
        delay = 0.0
        while True:
            try:
                if self._pubsub is None:
                    await self._resubscribe()
                    delay = 0.0
                    log.info("broker: worker %s subscribed again (%d channels)",
                             self.worker_id, len(self._channels))
                    if self.on_resubscribed is not None:
                        self.on_resubscribed()
                await self._read_messages()
            except (OSError, RedisError) as exc:
                await self._drop(exc)
                delay = backoff(delay)
                log.warning("broker: worker %s lost its pub/sub connection (%s); again in %g s",
                            self.worker_id, exc, delay)
                await asyncio.sleep(delay)

    async def _resubscribe(self) -> None:
        pubsub = self._redis.pubsub()
        names = [self._control, *(self._name(c) for c in self._channels)]
        try:
            for i in range(0, len(names), SUBSCRIBE_BATCH):
                await pubsub.subscribe(*names[i:i + SUBSCRIBE_BATCH])
        except BaseException:
            await pubsub.aclose()
            raise
        self._pubsub = pubsub

    async def _drop(self, exc: Exception) -> None:
        """Forget a failed pub/sub connection; the commands waiting for its
        confirmations fail (their channels are subscribed again with the rest)."""
        pubsub, self._pubsub = self._pubsub, None
        for fut in self._confirm.values():
            if not fut.done():
                fut.set_exception(exc)
        self._confirm.clear()
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except (OSError, RedisError):
                pass

    async def _read_messages(self) -> None:
        """Read until the connection fails.  A connection that goes quiet is
        pinged every ``ping_every`` seconds, and one that answers nothing
        for twice that counts as failed: a half-open TCP connection (a
        partition, a NAT's idle timeout) would otherwise leave the worker
        deaf while it believes it is subscribed."""
        pubsub = self._pubsub
        loop = asyncio.get_running_loop()
        heard = loop.time()
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=False,
                                           timeout=self.ping_every)
            now = loop.time()
            if msg is None:
                if now - heard > 2 * self.ping_every:
                    raise ConnectionError(f"no answer from Redis for {now - heard:.1f} s")
                if now - heard >= self.ping_every:
                    await pubsub.ping()
                continue
            heard = now
            kind, name, data = msg["type"], msg["channel"], msg["data"]
            if kind == "message":
                self._dispatch(loop, name, data)
            elif kind in ("subscribe", "unsubscribe"):
                fut = self._confirm.pop((kind, name), None)
                if fut is not None and not fut.done():
                    fut.set_result(None)

    def _dispatch(self, loop, name: bytes, data: bytes) -> None:
        try:
            if name == self._control:
                if self._on_control is not None:
                    self._on_control(data)
                return
            channel = name[len(self._channel_prefix):].decode()
            if self._on_message is not None and channel in self._channels:
                self._on_message(channel, data[0], data[1:])
        except Exception as exc:        # the handler's bug costs its own message only
            loop.call_exception_handler({"message": "broker: a handler failed",
                                         "exception": exc})

    def _check(self) -> None:
        if self._on_message is None:
            raise RuntimeError(f"broker: worker {self.worker_id!r} is not started")
