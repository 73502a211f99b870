"""A failing fake around a real backend: the way the tests make a store fail.

``Failing(store)`` forwards every call to the real backend (memory or
SQLite) unchanged, except the methods a test told it to break:

* ``fail(name, times, when=...)`` — the next ``times`` calls of ``name``
  (``None``: every call until ``heal(name)``) for which ``when(*args)`` holds
  raise :class:`BackendDown`: a coroutine method raises when awaited, the
  callback-style ``accept_many_then`` answers its callback with the error,
  as a backend reports a failed commit;
* ``hold(name, when=...)`` — such calls wait until ``resume(name)``, then go
  to the real backend in arrival order (or fail, ``refuse=True``): a store
  slower than the senders.

The fake's own methods are named so that none shadows a backend's (a
presence has a ``release``).

The backend's parts (``store.terminals``, ``store.records``,
``store.archive``) are wrapped too, their methods named
``"terminals.register"``, ``"records.put"`` and so on.  ``calls`` counts every
call by name, ``refused`` and ``held`` list ``(name, args)`` of the calls that
failed or waited, so a test can see a retry.  Nothing is simulated: what is
not broken is the real backend's answer.
"""

from __future__ import annotations

import asyncio
from collections import Counter

PARTS = ("terminals", "records", "archive")


class BackendDown(ConnectionError):
    """What a broken method raises (a store across a network that went away)."""


def carrying(*kinds: str):
    """``when`` for ``accept_many_then``: the batch holds a message of one of ``kinds``."""
    return lambda items, *_: any(m.kind in kinds for m, _ in items)


def kinds_of(calls) -> list[str]:
    """The message kinds of the ``accept_many_then`` calls among ``calls``."""
    return [m.kind for name, args in calls if name == "accept_many_then" for m, _ in args[0]]


class Failing:
    def __init__(self, backend, *, _parent=None, _prefix: str = "") -> None:
        own = _parent
        object.__setattr__(self, "_backend", backend)
        object.__setattr__(self, "_prefix", _prefix)
        object.__setattr__(self, "_failures", own._failures if own else {})
        object.__setattr__(self, "_holds", own._holds if own else {})
        object.__setattr__(self, "calls", own.calls if own else Counter())
        object.__setattr__(self, "refused", own.refused if own else [])
        object.__setattr__(self, "held", own.held if own else [])

    def fail(self, name: str, times: int | None = 1, *, when=None) -> None:
        self._failures[name] = [times, when]

    def heal(self, name: str) -> None:
        self._failures.pop(name, None)

    def hold(self, name: str, *, when=None) -> None:
        self._holds[name] = [when, []]

    def resume(self, name: str, *, refuse: bool = False) -> None:
        """Let the held calls of ``name`` go on (or fail); later ones are not held."""
        _, waiting = self._holds.pop(name, (None, []))
        for resume in waiting:
            resume(refuse)

    def waiting(self, name: str) -> int:
        """Calls of ``name`` held now."""
        return len(self._holds.get(name, (None, ()))[1])

    def _broken(self, name: str, args) -> bool:
        rule = self._failures.get(name)
        if rule is None or (rule[1] is not None and not rule[1](*args)):
            return False
        if rule[0] is not None:
            rule[0] -= 1
            if rule[0] <= 0:
                del self._failures[name]
        self.refused.append((name, args))
        return True

    def _held(self, name: str, args):
        """The list to wait on when this call is held, else None."""
        hold = self._holds.get(name)
        if hold is None or (hold[0] is not None and not hold[0](*args)):
            return None
        self.held.append((name, args))
        return hold[1]

    def __getattr__(self, name: str):
        real = getattr(self._backend, name)
        if not self._prefix and name in PARTS:
            part = Failing(real, _parent=self, _prefix=name + ".")
            object.__setattr__(self, name, part)        # (one wrapper per part)
            return part
        if not callable(real) or name.startswith("_"):
            return real
        if name == "accept_many_then":
            return self._wrap_then(real)
        if not asyncio.iscoroutinefunction(real):
            return real
        name = self._prefix + name

        async def call(*args, **kwargs):
            self.calls[name] += 1
            if self._broken(name, args):
                raise BackendDown(f"{name}: the store is unreachable (test)")
            waiting = self._held(name, args)
            if waiting is not None:
                resumed = asyncio.get_running_loop().create_future()
                waiting.append(lambda refuse: resumed.done() or resumed.set_result(refuse))
                if await resumed:
                    self.refused.append((name, args))
                    raise BackendDown(f"{name}: the store is unreachable (test)")
            return await real(*args, **kwargs)

        return call

    def _wrap_then(self, real):
        name = "accept_many_then"

        def refuse(items, callback):
            exc = BackendDown("accept_many: the store is unreachable (test)")
            asyncio.get_running_loop().call_soon(callback, None, exc)

        def accept_many_then(items, callback):
            self.calls[name] += 1
            items = list(items)
            if self._broken(name, (items,)):
                refuse(items, callback)
                return
            waiting = self._held(name, (items,))
            if waiting is None:
                real(items, callback)
                return

            def resume(refused: bool) -> None:
                if refused:
                    self.refused.append((name, (items,)))
                    refuse(items, callback)
                else:
                    real(items, callback)

            waiting.append(resume)

        return accept_many_then

    def __setattr__(self, name: str, value) -> None:
        setattr(self._backend, name, value)     # (the node sets on_write_failure)
