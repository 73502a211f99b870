"""What the retail services (tickets, chat, offers) may use of their node.

The services see the node only through :class:`ServiceHost`; ``Node``
satisfies it structurally (nothing here is imported by node.py).  Where a
service needs more of the node, this interface grows, documented, instead
of the service reaching into the node's privates.

Contracts every member keeps:

* everything runs on ``loop``; no member blocks;
* :meth:`ServiceHost.spawn` tasks are waited for at stop (up to the node's
  grace), then cancelled; a failure is logged;
* once :attr:`ServiceHost.stopping` is true a service starts no new
  background work (timers, retries): what is still due is written by its
  ``flush()``, which the node calls at stop before the store closes;
* every message a service took over (its handler returned True) is answered
  exactly once, with :meth:`ServiceHost.service_ack` or
  :meth:`ServiceHost.service_error`: that is what takes it out of the
  connection's window of unanswered SENDs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..core.session import Encoder
    from .address import Address
    from .config import Config
    from .connection import TerminalConnection
    from .directory import Directory
    from .metrics import Counters
    from .store import Accepted, NewMessage, Store


class PolicySessions(Protocol):
    """The part of the hub the offer policy reads."""

    def has_policy_sessions(self, tenant: str) -> bool:
        """Whether an open session of ``tenant`` is a customer's or a member's."""


class ServiceHost(Protocol):
    """The node as its services see it."""

    loop: asyncio.AbstractEventLoop
    cfg: Config
    store: Store            # services use its ``records`` only
    encoder: Encoder        # encodes the frames of a service's answer (HISTORY items)
    hub: PolicySessions
    directory: Directory
    shared_registry: bool   # True in a fleet: other workers change the same records
    worker_name: str        # this worker's name in the fleet (node id and index)
    counters: Counters      # the node's metrics counters (plain integers: count, never read)

    @property
    def stopping(self) -> bool:
        """True once stop() began: start no new background work."""

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Run ``coro`` as a task the node waits for at stop (a failure is logged)."""

    async def members(self, address: Address) -> list[str]:
        """The terminal addresses a message to (group) ``address`` is stored for.

        A coroutine: expanding a group may cross the network."""

    def mark_dirty(self, conn: TerminalConnection) -> None:
        """``conn`` has frames queued: write them at the next flush."""

    def ticket_changed(self, key: str) -> None:
        """(A fleet) ticket ``key``'s record was written: the other workers
        read it again (``Tickets.refresh``).  Nothing without a fleet."""

    def submit(self, msg: NewMessage, address: Address, reply, recipients=None) -> None:
        """Queue a P0/P1 message for the next group commit.

        ``reply``: an asyncio Future, resolved with the store's ``Accepted``
        (``duplicate`` set for a (sender, ref) stored before) or failed with
        the store's exception (then nothing was stored: a retry is safe).
        ``recipients`` (terminal addresses) replaces the members of
        ``address``."""

    def service_ack(self, conn: TerminalConnection, ref: int, msg_id: int, doc,
                    retransmit: bool = False, asked: bool = True) -> None:
        """SENDACK a message a service took, with JSON ``doc`` (None: empty
        payload); ``retransmit`` for a duplicate; nothing is sent unless
        ``asked`` (the SEND set ACK_REQUESTED)."""

    def service_error(self, conn: TerminalConnection, ref: int, code: int,
                      message: str) -> None:
        """Answer a message a service took with an ERROR frame."""

    def request_error(self, conn: TerminalConnection, ref: int, code: int,
                      message: str) -> None:
        """Answer a request that is not a SEND (HISTORY) with an ERROR frame."""

    def answer(self, conn: TerminalConnection, ref: int, items: list,
               encode: Callable[[Any], bytes], next_offset: int, code: int) -> None:
        """Send a HISTORY answer: ``encode(item)`` frames, then HISTORY_END
        with ``next_offset`` and ``code``, paced by the connection's budget."""


async def commit(host: ServiceHost, msg: NewMessage, address: Address,
                 recipients=None) -> Accepted:
    """Submit ``msg`` and wait for its group commit: the store's ``Accepted``,
    or the store's exception (then nothing was stored)."""
    fut = host.loop.create_future()
    host.submit(msg, address, fut, recipients)
    return await fut
