"""Which channels this worker's sessions need from the fleet, and the broker
subscriptions that bring them (a fleet over Redis only).

Channel messages are placed in the shared History (the offset assigned
with the version check, in Redis) and published on the broker; each worker
subscribes to a channel while at least one of its sessions needs it: the
channels its token implies (store, roles, region, tenant, member) and those
it subscribed to.  One subscription per channel per worker, counted here,
never one per connection; a terminal's own channel is not subscribed at
all (its P2/P3 messages go to the worker that holds it, on its control
channel: ``ownership.py``).

A worker holds a mirror of each such stream in its hub (epoch, offset, the
P2 last values, the P3 messages still alive) for catch-up and fan-out.  A
channel new to the worker is *primed*: subscribed first, then its streams
read from the History; messages that arrive meanwhile are held and placed
after, those the read already had are dropped (by offset), so none is lost
or placed twice.  Sessions that wait for a priming are caught up once it is
done (:meth:`wait`).  A message that comes after a gap in a mirror (lost on
the way: a broker reconnect, a terminal's claim naming another worker for
a moment) is held the same way while the missing ones are read from the
History (:meth:`repair`).
"""

from __future__ import annotations

import asyncio
import logging

from ..core.codes import Lane

log = logging.getLogger("tillwire.interest")

_LANES = (int(Lane.P2), int(Lane.P3))


def subscribable(name: str) -> bool:
    """Channels reached by a broker subscription (a terminal's own is not)."""
    return not name.startswith("terminal:")


class Interest:
    """This worker's channel subscriptions, counted by the sessions that need them."""

    def __init__(self, node, broker, history) -> None:
        self.node = node
        self.broker = broker
        self.history = history
        self.counts: dict[str, int] = {}
        # name -> messages (lane, data) held while it is primed; absent once primed
        self.priming: dict[str, list] = {}
        self._ready: dict[str, asyncio.Future] = {}

    def add(self, names) -> None:
        """Sessions need ``names`` (one count each)."""
        new = []
        counts = self.counts
        for name in names:
            n = counts.get(name, 0)
            counts[name] = n + 1
            if n == 0 and name not in self.priming:
                new.append(name)
        if new:
            for name in new:
                self.priming[name] = []
                self._ready[name] = self.node.loop.create_future()
            self.node.spawn(self._prime(new))

    def remove(self, names) -> None:
        """Sessions no longer need ``names``; the last one gone ends the subscription."""
        gone = []
        counts = self.counts
        for name in names:
            n = counts.get(name)
            if n is None:
                continue
            if n > 1:
                counts[name] = n - 1
            else:
                del counts[name]
                if name not in self.priming:     # (else the priming ends it when done)
                    gone.append(name)
        if gone and not self.node.stopping:
            self.node.spawn(self._unsubscribe(gone))

    def primed(self, names) -> bool:
        """True when none of ``names`` is being primed."""
        priming = self.priming
        return not any(name in priming for name in names)

    async def wait(self, names) -> None:
        """Return once none of ``names`` is being primed."""
        for name in names:
            fut = self._ready.get(name)
            if fut is not None and name in self.priming:
                await asyncio.shield(fut)

    async def _prime(self, names: list[str]) -> None:
        channels = self.node.channels
        try:
            await self.broker.subscribe([n for n in names if subscribable(n)])
        except Exception as exc:
            # The broker subscribes its channels again once it reconnects.
            log.warning("broker: subscribing to %d channels failed (%s); they follow when "
                        "the broker reconnects", len(names), exc)
        for name in names:
            try:
                for lane in _LANES:
                    page = await self.history.tail(name, lane, 0)
                    # The read may already hold messages that came live
                    # meanwhile (held): the mirror stops short of the first of
                    # them, which are then placed and fanned out as live.
                    below = min((channels.placed_offset(data) for held_lane, data
                                 in self.priming.get(name, ()) if held_lane == lane),
                                default=0)
                    channels.prime(name, lane, page, below)
            except Exception as exc:
                # (live messages still come; catch-up serves what arrived since)
                log.warning("history: reading %s to prime this worker failed: %s", name, exc)
            fut = self._ready.pop(name, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            # (the sessions that waited for the priming catch up first, up to
            # the mirror; then the held messages reach every session live)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            held = self.priming.pop(name, ())
            for lane, data in held:
                try:
                    channels.receive(name, lane, data)
                except Exception:      # (its own message only)
                    log.exception("channel %s: a held message could not be placed", name)
        left = [name for name in names if name not in self.counts]
        if left and not self.node.stopping:
            # (every session that needed them left while they were primed)
            await self._unsubscribe(left)

    async def _unsubscribe(self, names: list[str]) -> None:
        names = [n for n in names if n not in self.counts]     # (not needed again since)
        if not names:
            return
        try:
            await self.broker.unsubscribe([n for n in names if subscribable(n)])
        except Exception as exc:
            log.warning("broker: unsubscribing from %d channels failed: %s", len(names), exc)
        hub = self.node.hub
        for stream in hub.streams_of(names):
            if stream.name not in self.counts:
                # The mirror goes with the subscription: a later session primes afresh.
                hub.drop(stream)

    def repair(self, name: str, lanes, epoch: int = 0, data: bytes | None = None) -> None:
        """Read what the History holds of ``name``'s ``lanes`` past this
        worker's mirror, holding what comes live meanwhile, then place it all
        in offset order (see Channels.place).  ``data``: the message that
        came after a gap in the mirror, held first (``epoch`` is its
        stream's).  Nothing to do while the channel is primed (its read has
        it) or repaired (the message waits with the held ones)."""
        held = self.priming.get(name)
        if held is not None:
            if data is not None:
                held.append((lanes[0], data))
            return
        self.priming[name] = [] if data is None else [(lanes[0], data)]
        self.node.spawn(self._repair(name, lanes, epoch))

    async def _repair(self, name: str, lanes, epoch: int) -> None:
        channels = self.node.channels
        try:
            for lane in lanes:
                stream = channels.hub.stream(name, lane, create=False)
                since = (stream.epoch, stream.offset) if stream is not None else (epoch, 0)
                page = await self.history.since(name, lane, *since)
                ttl = self.node.cfg.lanes.p3_ttl if lane == int(Lane.P3) else 0.0
                for item in page.items:
                    stream = channels.hub.stream(name, lane, create=False)
                    if lane == int(Lane.P3) and stream is not None \
                            and stream.epoch == page.epoch and item.offset > stream.offset + 1:
                        stream.offset = item.offset - 1          # (the ones between expired)
                    channels.place(name, lane, channels.pack(page.epoch, item, ttl))
        except Exception as exc:
            # (the held messages are placed as they are: the mirror starts
            # again at the first of them, terminals resync)
            log.warning("history: reading %s past this worker's mirror failed: %s", name, exc)
        finally:
            held = self.priming.pop(name, ())
        for held_lane, data in held:
            if name in self.counts:
                try:
                    channels.place(name, held_lane, data)
                except Exception:      # (its own message only)
                    log.exception("channel %s: a held message could not be placed", name)
        if name not in self.counts and not self.node.stopping:
            await self._unsubscribe([name])      # (its sessions left meanwhile)

    def hold(self, name: str, lane: int, data: bytes) -> bool:
        """Hold a message of a channel being primed; False when it is not."""
        held = self.priming.get(name)
        if held is None:
            return False
        held.append((lane, data))
        return True
