"""The Broker interface: messages between the worker processes of a cluster.

Each worker process has one broker.  A worker subscribes its broker to a
channel (``store:acme/s1``, ``terminal:acme/t1`` ...) once, however many of
its sessions want it: the hub reference-counts its sessions and subscribes
on the first, unsubscribes after the last.  :meth:`Broker.publish` reaches
every worker subscribed to the channel, the publisher's own included, each
once; the worker's hub then delivers to its sessions.  Besides channels,
each worker has a control inbox: :meth:`Broker.send_control` reaches one
worker by id (inbox notify, takeover, kick, directory change).

Delivery is asynchronous: handlers run on the receiving worker's event loop,
never inside the sender's call, and a sender's publishes and control
messages arrive in the order it made them (no order across senders).  A
message published while no worker is subscribed goes nowhere: the broker
keeps no history (P0/P1 messages live in the store, P2/P3 in the streams).
A handler that raises loses that message for its worker only; the
exception goes to the loop's exception handler.

Backends sit beside this file (``broker_memory.py``; a Redis one over
pub/sub) and ``tests/test_broker_contract.py`` runs one suite against every
backend.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol, runtime_checkable

MessageHandler = Callable[[str, int, bytes], None]
"""``(channel, lane, payload)``: called on the loop for each message of a
channel the worker is subscribed to."""

ControlHandler = Callable[[bytes], None]
"""``(message)``: called on the loop for each control message to the worker."""


@runtime_checkable
class Broker(Protocol):
    """The contract every broker backend fulfils.  The other methods may be
    called only between :meth:`start` and :meth:`stop` (RuntimeError)."""

    worker_id: str
    """This worker's address for :meth:`send_control` (node id and worker)."""

    @property
    def connected(self) -> bool:
        """True while started and able to receive (a backend that lost its
        connection says False until it has subscribed again)."""

    async def start(self, on_message: MessageHandler, on_control: ControlHandler) -> None:
        """Connect and take this worker's control inbox; the handlers receive
        from now on.  ValueError if a started worker already has this id."""

    async def stop(self) -> None:
        """Drop every subscription and the control inbox; no handler is called
        afterwards.  Calling it again, or before start, does nothing."""

    async def publish(self, channel: str, lane: int, payload: bytes) -> None:
        """Send ``payload`` on ``channel`` to every worker subscribed to it.
        O(workers subscribed)."""

    async def subscribe(self, channels: Iterable[str]) -> None:
        """Receive the messages of ``channels`` from now on (one round trip;
        a channel subscribed already stays subscribed once).  O(len(channels))."""

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        """Stop receiving ``channels`` (channels not subscribed are ignored).
        O(len(channels))."""

    async def send_control(self, worker_id: str, message: bytes) -> bool:
        """Send ``message`` to the control handler of worker ``worker_id``;
        False, delivering nothing, when no started worker has that id.  O(1)."""
