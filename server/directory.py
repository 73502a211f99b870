"""The store directory: each store's time zone, duty roster and managers.

The config (``[directory]``) lists stores; the admin API overrides an entry
(``PUT /v1/stores/{tenant}/{store}``), persisted as a key-value record
(namespace ``directory``, key ``<tenant>/<store>``) and loaded at node start,
so an override survives a restart with a persistent store.  A store listed
nowhere has ``directory.default_timezone`` and no roster: tickets go to its
staff role and escalations to its manager role.

Lookups are one dict probe (the quiet-hours filter asks once per store and
broadcast); ``ZoneInfo`` objects are cached by name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from zoneinfo import ZoneInfo

import orjson

from .config import zone_ok
from .records import scan_all

NS = "directory"

log = logging.getLogger("tillwire.directory")


@dataclass(frozen=True, slots=True)
class StoreInfo:
    tenant: str
    store: str
    timezone: str                  # IANA name (never empty)
    on_duty: tuple[str, ...]       # terminal ids that get cashier tickets (empty = staff role)
    managers: tuple[str, ...]      # terminal ids that get escalations (empty = manager role)
    source: str                    # "admin", "config" or "default"

    def to_dict(self) -> dict:
        return {"tenant": self.tenant, "store": self.store, "timezone": self.timezone,
                "on_duty": list(self.on_duty), "managers": list(self.managers),
                "source": self.source}


_ZONES: dict[str, ZoneInfo] = {}


def zone(name: str) -> ZoneInfo:
    """The (cached) ZoneInfo of an IANA name; raises for an unknown one."""
    found = _ZONES.get(name)
    if found is None:
        found = _ZONES[name] = ZoneInfo(name)
    return found


class Directory:
    """Per (tenant, store): time zone, on-duty terminals, managers."""

    def __init__(self, cfg, store) -> None:
        self.store = store
        self.default_timezone = cfg.directory.default_timezone
        self._config: dict[tuple[str, str], StoreInfo] = {}
        for e in cfg.directory.stores:
            self._config[(e.tenant, e.store)] = StoreInfo(
                e.tenant, e.store, e.timezone or self.default_timezone, tuple(e.on_duty),
                tuple(e.managers), "config")
        self._entries: dict[tuple[str, str], StoreInfo] = dict(self._config)
        # PUTs are serialized: each reads the entry in effect, writes, then applies;
        # two at once must not both start from the old entry (a lost field), and
        # memory and the store must end with the same (last) entry.
        self._put_lock = asyncio.Lock()

    async def load(self) -> None:
        """Apply the overrides kept in the store (node start)."""
        async for key, value in scan_all(self.store.records, NS):
            try:
                info = self._parse(value)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                # (one damaged record must not keep the node from starting)
                log.warning("directory record %r skipped: unreadable (%s)", key, exc)
                continue
            if not zone_ok(info.timezone):      # a zone the system no longer knows
                info = StoreInfo(info.tenant, info.store, self.default_timezone,
                                 info.on_duty, info.managers, "admin")
            self._entries[(info.tenant, info.store)] = info

    def _parse(self, value: bytes) -> StoreInfo:
        doc = orjson.loads(value)
        names = (doc["tenant"], doc["store"], doc.get("timezone") or self.default_timezone)
        on_duty, managers = doc.get("on_duty", []), doc.get("managers", [])
        if not (isinstance(on_duty, list) and isinstance(managers, list)):
            raise TypeError("on_duty and managers must be lists")
        on_duty, managers = tuple(on_duty), tuple(managers)
        if not all(isinstance(v, str) for v in (*names, *on_duty, *managers)):
            raise TypeError("tenant, store, timezone and terminal ids must be strings")
        return StoreInfo(*names, on_duty, managers, "admin")

    async def reload(self, tenant: str, store: str) -> None:
        """Read a store's entry again (another worker of the fleet changed it)."""
        raw = await self.store.records.get(NS, f"{tenant}/{store}")
        key = (tenant, store)
        if raw is None:
            self._entries.pop(key, None)
            if key in self._config:
                self._entries[key] = self._config[key]
            return
        try:
            self._entries[key] = self._parse(raw)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("directory record %s/%s skipped: unreadable (%s)", tenant, store, exc)

    def get(self, tenant: str, store: str) -> StoreInfo:
        """The store's entry in effect (admin override, config, else the default)."""
        info = self._entries.get((tenant, store))
        if info is None:
            return StoreInfo(tenant, store, self.default_timezone, (), (), "default")
        return info

    def timezone(self, tenant: str, store: str) -> str:
        """The store's IANA time zone (the default one for a store listed nowhere)."""
        info = self._entries.get((tenant, store))
        return info.timezone if info is not None else self.default_timezone

    async def put(self, tenant: str, store: str, *, timezone: str | None = None,
                  on_duty: tuple[str, ...] | None = None,
                  managers: tuple[str, ...] | None = None) -> StoreInfo:
        """Override (part of) a store's entry; fields left None keep their value."""
        async with self._put_lock:
            return await self._put(tenant, store, timezone, on_duty, managers)

    async def _put(self, tenant: str, store: str, timezone, on_duty, managers) -> StoreInfo:
        # The fields left out are kept from the entry in the store, read now
        # and written over only if unchanged meanwhile (Records.replace): in
        # a fleet, another worker's PUT of other fields may have just
        # landed, and this worker's copy may not have heard of it yet.
        records, key = self.store.records, f"{tenant}/{store}"
        raw = await records.get(NS, key)
        while True:
            old = None
            if raw is not None:
                try:
                    old = self._parse(raw)
                except (ValueError, KeyError, TypeError, AttributeError):
                    pass                     # (unreadable: the config's entry applies)
            if old is None:
                old = self._config.get((tenant, store)) or self.get(tenant, store)
            info = StoreInfo(tenant, store, timezone if timezone is not None else old.timezone,
                             on_duty if on_duty is not None else old.on_duty,
                             managers if managers is not None else old.managers, "admin")
            value = orjson.dumps({
                "tenant": tenant, "store": store, "timezone": info.timezone,
                "on_duty": list(info.on_duty), "managers": list(info.managers)})
            found = await records.replace(NS, key, raw, value, time.time())
            if found == value:
                break
            raw = found                      # (changed meanwhile: merge with that)
        self._entries[(tenant, store)] = info
        return info
