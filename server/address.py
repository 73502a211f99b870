"""Addresses and who may use them (PROTOCOL.md section 9).

Every destination and channel is ``<scope>:<path>``; this module parses
them, derives the channels a token implies, and decides publish and
subscribe rights by role.  Tenant isolation is absolute: an address of
another tenant is refused before anything else is looked at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..core.codes import Code, Lane
from .auth import ROLES
MAX_ADDRESS_LEN = 256
_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")

# scope -> number of path segments after the tenant
_ARITY = {
    "terminal": 1, "store": 1, "role": 2, "region": 1, "tenant": 0, "topic": 1,
    "member": 1, "segment": 1, "chat": 1,
}
GROUP_SCOPES = frozenset({"store", "role", "region", "tenant"})


class AddressError(ValueError):
    """An address that cannot be used; ``code`` is the ERROR code to send."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = Code(code)


@dataclass(frozen=True, slots=True)
class Address:
    scope: str
    tenant: str
    path: tuple[str, ...]
    text: str = field(default="", compare=False, repr=False)
    """The canonical form (what ``parse_address`` read); str() is on hot paths."""

    def __str__(self) -> str:
        if self.text:
            return self.text
        if not self.path:
            return f"{self.scope}:{self.tenant}"
        return f"{self.scope}:{self.tenant}/{'/'.join(self.path)}"

    @property
    def is_group(self) -> bool:
        return self.scope in GROUP_SCOPES


_CACHE: dict[str, Address] = {}
_CACHE_MAX = 65536


def parse_address(text: str) -> Address:
    """Parse and validate an address; raises AddressError(BAD_ADDRESS).

    Valid addresses are cached (they repeat: the same tills, stores and
    groups are addressed over and over); the cache is bounded.
    """
    found = _CACHE.get(text)
    if found is not None:
        return found
    address = _parse(text)
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    _CACHE[text] = address
    return address


def _parse(text: str) -> Address:
    if not isinstance(text, str) or not text:
        raise AddressError(Code.BAD_ADDRESS, "address: empty")
    if len(text.encode()) > MAX_ADDRESS_LEN:
        raise AddressError(Code.BAD_ADDRESS, f"address: longer than {MAX_ADDRESS_LEN} bytes")
    scope, sep, rest = text.partition(":")
    if not sep or scope not in _ARITY:
        raise AddressError(Code.BAD_ADDRESS,
                           f"address {text!r}: scope must be one of {', '.join(_ARITY)}")
    parts = rest.split("/")
    if len(parts) != 1 + _ARITY[scope]:
        raise AddressError(Code.BAD_ADDRESS,
                           f"address {text!r}: {scope} takes {_ARITY[scope] + 1} path segment(s)")
    for i, part in enumerate(parts):
        if scope == "role" and i == 1 and part == "*":
            continue
        if not _SEGMENT.match(part):
            raise AddressError(Code.BAD_ADDRESS,
                               f"address {text!r}: bad segment {part!r} "
                               "(1-64 of A-Z a-z 0-9 . _ -)")
    if scope == "role" and parts[2] not in ROLES:
        raise AddressError(Code.BAD_ADDRESS,
                           f"address {text!r}: role must be one of {', '.join(ROLES)}")
    return Address(scope, parts[0], tuple(parts[1:]), text)


def terminal_address(tenant: str, terminal: str) -> str:
    return f"terminal:{tenant}/{terminal}"


def tenant_of(address: str) -> str:
    """The tenant of an address already checked (``<scope>:<tenant>/...``),
    without parsing it again: what the Redis backends' key hash tags need."""
    return address.partition(":")[2].partition("/")[0]


def implied_channels(claims) -> list[str]:
    """Channels a token subscribes to automatically, most specific first."""
    t = claims.tenant
    names = [terminal_address(t, claims.terminal), f"store:{t}/{claims.store}"]
    for role in claims.roles:
        names.append(f"role:{t}/{claims.store}/{role}")
        names.append(f"role:{t}/*/{role}")
    if claims.region:
        names.append(f"region:{t}/{claims.region}")
    names.append(f"tenant:{t}")
    if claims.member:
        names.append(f"member:{t}/{claims.member}")
    return names


def group_matches(address: Address, claims) -> bool:
    """Is a terminal with these claims a member of this (group) address?"""
    if address.tenant != claims.tenant:
        return False
    scope = address.scope
    if scope == "tenant":
        return True
    if scope == "store":
        return address.path[0] == claims.store
    if scope == "role":
        store, role = address.path
        return role in claims.roles and (store == "*" or store == claims.store)
    if scope == "region":
        return bool(claims.region) and address.path[0] == claims.region
    if scope == "terminal":
        return address.path[0] == claims.terminal
    if scope == "member":
        return bool(claims.member) and address.path[0] == claims.member
    return False


def _own_store(address: Address, claims) -> bool:
    if address.scope == "store":
        return address.path[0] == claims.store
    if address.scope == "role":
        return address.path[0] == claims.store
    return False


def check_publish(claims, address: Address, lane: int, kind: str,
                  recipient_store: str | None = None) -> None:
    """Raise AddressError unless these claims may publish this message.

    ``recipient_store`` is the registered store of a ``terminal:`` address
    (None if unknown).  The rules, by role (the union of a token's roles):

    * backend: anything in its tenant (payment services, HQ pricing, the
      order bus, promotions).
    * P0 (payment results): backend only.
    * P2 (price, stock) and P3 (offers): backend, and managers for their own
      store (``store:`` or ``role:`` of their store).
    * P1: tills, kiosks, staff and managers reach their own store (its store
      and role groups and its terminals) and customer service
      (``role:<t>/*/service``); service agents reach members, terminals,
      service and chat conversations; customers only reach customer service
      (``role:<t>/*/service`` or ``role:<t>/<store>/service``) and chats.
    """
    if address.tenant != claims.tenant:
        raise AddressError(Code.BAD_ADDRESS,
                           f"address {address}: another tenant's address")
    roles = claims.roles
    if "backend" in roles:
        return
    scope = address.scope
    if lane == Lane.P0:
        raise AddressError(Code.FORBIDDEN, "P0 messages are sent by backend systems only")
    if lane >= Lane.P2:
        if "manager" in roles and _own_store(address, claims):
            return
        raise AddressError(Code.FORBIDDEN,
                           f"P{lane} to {address}: only backend, or a manager for their own store")
    # P1
    to_service = scope == "role" and address.path[1] == "service"
    if "customer" in roles and (to_service or scope == "chat"):
        return
    if "service" in roles and (scope in ("member", "terminal", "chat") or to_service):
        return
    if any(r in roles for r in ("pos", "kiosk", "staff", "manager")):
        if _own_store(address, claims) or to_service or scope == "chat":
            return
        if scope == "terminal" and recipient_store == claims.store:
            return
    raise AddressError(Code.FORBIDDEN, f"P1 to {address}: not allowed for roles "
                                       f"{', '.join(sorted(roles))}")


def check_subscribe(claims, address: Address) -> None:
    """Raise AddressError unless these claims may subscribe to this channel."""
    if address.tenant != claims.tenant:
        raise AddressError(Code.BAD_ADDRESS, f"address {address}: another tenant's address")
    if address.scope in ("topic", "segment"):
        return
    if address.scope == "chat":
        raise AddressError(Code.FORBIDDEN, "chat conversations are read with HISTORY")
    if "backend" in claims.roles or group_matches(address, claims):
        return
    raise AddressError(Code.FORBIDDEN, f"subscribe {address}: not a channel of this terminal")
