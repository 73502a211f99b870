"""The memory broker: workers of one process talking through a shared bus.

A :class:`MemoryBus` stands for the cluster's Redis: every
:class:`MemoryBroker` attached to it is one worker, so a test can run two
nodes in one process on one bus.  The bus owns who is started
(``_workers``: worker id -> broker) and who listens to what (``_channels``:
channel -> the brokers subscribed, in subscription order); each broker
owns its own set of channels (for :meth:`MemoryBroker.stop`) and its
handlers.

Delivery goes through ``loop.call_soon``, one callback per receiving
worker: never inside the sender's call, in the sender's order (the loop's
ready queue is FIFO), and an exception in one worker's handler reaches the
loop's exception handler without touching the other deliveries.  A worker
that is stopped when a scheduled delivery runs does not get it.

Costs: publish O(workers subscribed to the channel); subscribe and
unsubscribe O(channels given); send_control O(1); stop O(its channels).
"""

from __future__ import annotations

import asyncio
from typing import Iterable

from .broker import Broker, ControlHandler, MessageHandler


class MemoryBus:
    """The shared state of the memory brokers of one process."""

    def __init__(self) -> None:
        self._workers: dict[str, MemoryBroker] = {}
        self._channels: dict[str, dict[MemoryBroker, None]] = {}


class MemoryBroker(Broker):
    """Worker ``worker_id``'s broker on ``bus``."""

    def __init__(self, worker_id: str, bus: MemoryBus) -> None:
        self.worker_id = worker_id
        self._bus = bus
        self._channels: set[str] = set()
        self._on_message: MessageHandler | None = None
        self._on_control: ControlHandler | None = None

    @property
    def connected(self) -> bool:
        return self._on_message is not None

    async def start(self, on_message: MessageHandler, on_control: ControlHandler) -> None:
        workers = self._bus._workers
        if self.worker_id in workers:
            raise ValueError(f"broker: worker {self.worker_id!r} is started already")
        workers[self.worker_id] = self
        self._on_message, self._on_control = on_message, on_control

    async def stop(self) -> None:
        if self._on_message is None:
            return
        await self.unsubscribe(list(self._channels))
        del self._bus._workers[self.worker_id]
        self._on_message = self._on_control = None

    async def publish(self, channel: str, lane: int, payload: bytes) -> None:
        self._check()
        call_soon = asyncio.get_running_loop().call_soon
        for broker in self._bus._channels.get(channel, ()):
            call_soon(broker._deliver, channel, lane, payload)

    async def subscribe(self, channels: Iterable[str]) -> None:
        self._check()
        by_channel = self._bus._channels
        for channel in channels:
            by_channel.setdefault(channel, {})[self] = None
            self._channels.add(channel)

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        self._check()
        by_channel = self._bus._channels
        for channel in channels:
            if channel not in self._channels:
                continue
            self._channels.discard(channel)
            brokers = by_channel[channel]
            del brokers[self]
            if not brokers:
                del by_channel[channel]

    async def send_control(self, worker_id: str, message: bytes) -> bool:
        self._check()
        broker = self._bus._workers.get(worker_id)
        if broker is None:
            return False
        asyncio.get_running_loop().call_soon(broker._control, message)
        return True

    # -- on the loop -----------------------------------------------------------------

    def _deliver(self, channel: str, lane: int, payload: bytes) -> None:
        if self._on_message is not None:
            self._on_message(channel, lane, payload)

    def _control(self, message: bytes) -> None:
        if self._on_control is not None:
            self._on_control(message)

    def _check(self) -> None:
        if self._on_message is None:
            raise RuntimeError(f"broker: worker {self.worker_id!r} is not started")
