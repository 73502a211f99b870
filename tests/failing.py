"""A failing fake around a real backend: the way the tests make a store fail.

``Failing(store)`` forwards every call to the real backend (memory or
SQLite) unchanged, except the methods a test told it to break:

* ``fail(name, times)`` — the next ``times`` calls of ``name`` raise
  :class:`BackendDown` (a coroutine method raises when awaited; the
  callback-style ``accept_many_then`` answers its callback with the error);
* ``hold(name)`` — calls of ``name`` wait until ``release(name)`` (a store
  slower than the senders), then go to the real backend in arrival order.

``calls[name]`` counts every call, failed or not, so a test can see a retry.
The backend's parts (``store.terminals``, ``store.records``,
``store.archive``) are wrapped too, their methods named ``"terminals.register"``
and so on.  Nothing is simulated: what is not broken is the real backend's
answer.
"""

from __future__ import annotations

import asyncio
from collections import Counter


class BackendDown(ConnectionError):
    """What a broken method raises (a store across a network that went away)."""


PARTS = ("terminals", "records", "archive")


class Failing:
    def __init__(self, backend, *, _parent=None, _prefix: str = "") -> None:
        object.__setattr__(self, "_backend", backend)
        object.__setattr__(self, "_prefix", _prefix)
        object.__setattr__(self, "_failures", _parent._failures if _parent else {})
        object.__setattr__(self, "_held", _parent._held if _parent else {})
        object.__setattr__(self, "calls", _parent.calls if _parent else Counter())

    def fail(self, name: str, times: int = 1) -> None:
        self._failures[name] = times

    def hold(self, name: str) -> None:
        self._held.setdefault(name, [])

    def release(self, name: str) -> None:
        for resume in self._held.pop(name, []):
            resume()

    def held(self, name: str) -> int:
        """Calls of ``name`` waiting for :meth:`release`."""
        return len(self._held.get(name, ()))

    def _broken(self, name: str) -> bool:
        left = self._failures.get(name, 0)
        if left:
            self._failures[name] = left - 1
        return bool(left)

    def __getattr__(self, name: str):
        real = getattr(self._backend, name)
        if not self._prefix and name in PARTS:
            part = Failing(real, _parent=self, _prefix=name + ".")
            object.__setattr__(self, name, part)        # (one wrapper per part)
            return part
        if not callable(real) or name.startswith("_"):
            return real
        name = self._prefix + name
        if name == "accept_many_then":
            return self._wrap_then(real)
        if not asyncio.iscoroutinefunction(real):
            return real

        async def call(*args, **kwargs):
            self.calls[name] += 1
            if self._broken(name):
                raise BackendDown(f"{name}: the store is unreachable (test)")
            if name in self._held:
                resumed = asyncio.get_running_loop().create_future()
                self._held[name].append(lambda: resumed.done() or resumed.set_result(None))
                await resumed
            return await real(*args, **kwargs)

        return call

    def _wrap_then(self, real):
        def accept_many_then(items, callback):
            self.calls["accept_many_then"] += 1
            if self._broken("accept_many_then"):
                exc = BackendDown("accept_many: the store is unreachable (test)")
                asyncio.get_running_loop().call_soon(callback, None, exc)
                return
            held = self._held.get("accept_many_then")
            if held is not None:
                held.append(lambda: real(items, callback))
                return
            real(items, callback)

        return accept_many_then

    def __setattr__(self, name: str, value) -> None:
        setattr(self._backend, name, value)     # (the node sets on_write_failure)
