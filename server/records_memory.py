"""Key-value records held in this process's memory (``MemoryStore.records``)."""

from __future__ import annotations

from .records import SCAN_PAGE


class MemoryRecords:
    """The :class:`~tillwire.server.records.Records` of a memory store."""

    def __init__(self) -> None:
        self._kv: dict[str, dict[str, tuple[bytes, float]]] = {}   # ns -> key -> (value, updated)

    async def put(self, ns: str, key: str, value: bytes, now: float) -> None:
        self._kv.setdefault(ns, {})[key] = (bytes(value), now)

    async def put_new(self, ns: str, key: str, value: bytes, now: float) -> bytes:
        found = self._kv.setdefault(ns, {}).setdefault(key, (bytes(value), now))
        return found[0]

    async def replace(self, ns: str, key: str, expected: bytes | None, value: bytes,
                      now: float) -> bytes | None:
        records = self._kv.setdefault(ns, {})
        found = records.get(key)
        if (found[0] if found is not None else None) != expected:
            return None if found is None else found[0]
        records[key] = (bytes(value), now)
        return bytes(value)

    async def get(self, ns: str, key: str) -> bytes | None:
        found = self._kv.get(ns, {}).get(key)
        return None if found is None else found[0]

    async def scan(self, ns: str, prefix: str = "", after: str = "",
                   limit: int = SCAN_PAGE, *, reverse: bool = False,
                   before: str = "") -> list[tuple[str, bytes]]:
        # (Sorts the namespace's matching keys per call: fine for tests and demos.)
        keys = sorted((k for k in self._kv.get(ns, {})
                       if k.startswith(prefix) and k > after and (not before or k < before)),
                      reverse=reverse)
        records = self._kv[ns] if keys else {}
        return [(k, records[k][0]) for k in keys[:limit]]

    async def delete(self, ns: str, key: str) -> bool:
        return self._kv.get(ns, {}).pop(key, None) is not None

    async def delete_prefix(self, ns: str, prefix: str) -> int:
        records = self._kv.get(ns, {})
        doomed = [k for k in records if k.startswith(prefix)]
        for k in doomed:
            del records[k]
        return len(doomed)

    async def expire(self, ns: str, before: float) -> int:
        records = self._kv.get(ns, {})
        doomed = [k for k, (_, updated) in records.items() if updated < before]
        for k in doomed:
            del records[k]
        return len(doomed)
