"""InOrder: backend writes in order, retried until they succeed; with a key,
in order per key and several keys at once."""

from __future__ import annotations

import asyncio

from support import aiotest, eventually
from tillwire.server import retry
from tillwire.server.retry import InOrder


class Writes:
    """A backend whose writes wait until the test lets each one end (or fail)."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.ended: list[str] = []
        self._ends: dict[str, asyncio.Future] = {}
        self.tasks: list[asyncio.Task] = []

    async def write(self, item: str) -> None:
        self.started.append(item)
        end = self._ends[item] = asyncio.get_running_loop().create_future()
        try:
            await end
        finally:
            del self._ends[item]
        self.ended.append(item)

    def end(self, item: str, exc: Exception | None = None) -> None:
        fut = self._ends[item]
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)

    def running(self) -> set[str]:
        return set(self._ends)

    def queue(self, **kwargs) -> InOrder:
        return InOrder(lambda coro: self.tasks.append(asyncio.ensure_future(coro)), self.write,
                       str, lambda: False, **kwargs)


@aiotest()
async def test_with_a_key_writes_of_different_keys_run_together_and_one_keys_in_order():
    w = Writes()
    queue = w.queue(key=lambda item: item[0], parallel=8)
    for item in ("a1", "b1", "a2", "c1", "b2"):
        queue.add(item)
    await eventually(lambda: w.running() == {"a1", "b1", "c1"})
    w.end("b1")
    await eventually(lambda: w.running() == {"a1", "c1", "b2"})   # (b's next, a1 or not)
    w.end("c1")
    w.end("b2")
    await asyncio.sleep(0.05)
    assert w.running() == {"a1"}            # (a2 waits for a1)
    w.end("a1")
    await eventually(lambda: w.running() == {"a2"})
    w.end("a2")
    await eventually(lambda: len(w.ended) == 5)
    assert w.started == ["a1", "b1", "c1", "b2", "a2"]
    assert w.ended == ["b1", "c1", "b2", "a1", "a2"]
    assert len(queue) == 0


@aiotest()
async def test_a_failed_write_is_retried_before_the_later_ones_of_its_key(monkeypatch):
    monkeypatch.setattr(retry, "RETRY_FIRST", 0.01)
    w = Writes()
    queue = w.queue(key=lambda item: item[0], parallel=8)
    for item in ("a1", "b1", "a2"):
        queue.add(item)
    await eventually(lambda: w.running() == {"a1", "b1"})
    w.end("a1", ConnectionError("down"))
    w.end("b1")
    await eventually(lambda: w.running() == {"a1"})     # (again, and a2 still waits)
    assert w.started == ["a1", "b1", "a1"]
    w.end("a1")
    await eventually(lambda: w.running() == {"a2"})
    w.end("a2")
    await eventually(lambda: w.ended == ["b1", "a1", "a2"])


@aiotest()
async def test_without_a_key_one_write_at_a_time_in_the_order_given():
    w = Writes()
    queue = w.queue()
    for item in ("a1", "b1", "c1"):
        queue.add(item)
    for item in ("a1", "b1", "c1"):
        await eventually(lambda: w.running() == {item})
        w.end(item)
    await eventually(lambda: w.ended == ["a1", "b1", "c1"])


@aiotest()
async def test_at_most_parallel_writes_run_at_once_and_an_ended_one_is_replaced_at_once():
    w = Writes()
    queue = w.queue(key=lambda item: item, parallel=3)
    for n in range(7):
        queue.add(f"t{n}")
    await eventually(lambda: len(w.running()) == 3)
    assert w.running() == {"t0", "t1", "t2"}
    w.end("t1")
    await eventually(lambda: w.running() == {"t0", "t2", "t3"})   # (the next one, at once)
    for item in ("t0", "t2", "t3"):
        w.end(item)
    await eventually(lambda: w.running() == {"t4", "t5", "t6"})
    for item in ("t4", "t5", "t6"):
        w.end(item)
    await eventually(lambda: len(w.ended) == 7)
    assert len(queue) == 0


@aiotest()
async def test_a_drain_asked_while_one_runs_waits_for_it_and_writes_nothing_twice():
    # (A node's stop drains the queue whose own drain may be under way.)
    w = Writes()
    queue = w.queue(key=lambda item: item, parallel=4)
    for item in ("a1", "b1"):
        queue.add(item)
    await eventually(lambda: w.running() == {"a1", "b1"})
    second = asyncio.ensure_future(queue.drain())
    queue.add("c1")
    await eventually(lambda: w.running() == {"a1", "b1", "c1"})
    assert not second.done()
    for item in ("a1", "b1", "c1"):
        w.end(item)
    await asyncio.wait_for(second, 5)
    assert sorted(w.started) == ["a1", "b1", "c1"] and len(queue) == 0
