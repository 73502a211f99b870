"""Abuse resistance: what one connection, source address or tenant may cost.

The node asks this module three things (PROTOCOL.md section 14, README
"Limits"):

* may this SEND go ahead now (``SendLimits``): the connection's window of
  P0/P1 SENDs awaiting SENDACK (``limits.unacked_sends``) and a token bucket
  per lane (``limits.send_rate`` / ``send_burst``), both by the token's
  roles.  Over the rate the connection waits (the node stops reading it),
  it is not answered with an error;
* may this request go ahead now (``Bucket``): SUBSCRIBE, UNSUBSCRIBE and
  HISTORY share one bucket per connection (``limits.request_rate``);
* how long to hold back an AUTH_FAILED (``Sources``): a source address that
  keeps failing waits longer and longer for its answer, so guessing tokens
  gets slow, while a valid token is never delayed; and how many
  connections a source address holds, when ``limits.max_connections_per_source``
  caps it.

Nothing here does I/O; everything runs on the event loop and costs a few
attribute reads per call.  Limits are resolved per distinct set of roles
once (``Policy.for_roles``), not per connection.
"""

from __future__ import annotations

import resource

from .config import role_value

FD_RESERVE = 256
"""File descriptors kept back from ``server.max_connections = 0``: the store
(database, WAL, the writer's pipe), logs, the admin API and its clients."""

AUTH_FREE_FAILURES = 3          # failures per source within the window before any delay
AUTH_FIRST_DELAY = 0.05         # seconds; doubled with every further failure
AUTH_WINDOW = 60.0              # seconds without a failure that clear a source's count
MAX_SOURCES = 65536             # source addresses tracked at once (the oldest go first)


def default_max_connections() -> int:
    """``server.max_connections = 0``: the open-file limit less ``FD_RESERVE``.

    The soft limit is raised to the hard one first (a server's job: the
    default soft limit of 1,024 would cap a node far below what it holds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, soft - FD_RESERVE)


class Bucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst``."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there is."""
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate


class RoleLimits:
    """The limits of one set of roles (shared by every connection with them)."""

    __slots__ = ("window", "rate", "burst")

    def __init__(self, window: int, rate: int, burst: int) -> None:
        self.window = window        # P0/P1 SENDs awaiting SENDACK (0 = no limit)
        self.rate = rate            # SENDs per second per lane (0 = no limit)
        self.burst = burst or rate  # bucket size


class SendLimits:
    """One connection's SEND flow control (kept in ``conn.extra["limits"]``)."""

    __slots__ = ("role", "unacked", "buckets")

    def __init__(self, role: RoleLimits) -> None:
        self.role = role
        self.unacked = 0                  # P0/P1 SENDs awaiting SENDACK
        self.buckets = None               # per lane, made on the lane's first SEND

    def take(self, lane: int, now: float) -> float:
        """0.0: go ahead; else seconds to wait for the lane's next token."""
        role = self.role
        if not role.rate:
            return 0.0
        buckets = self.buckets
        if buckets is None:
            buckets = self.buckets = [None, None, None, None]
        bucket = buckets[lane]
        if bucket is None:
            bucket = buckets[lane] = Bucket(role.rate, role.burst, now)
        return bucket.take(now)


class Policy:
    """The configured limits, resolved per set of roles on first use."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg.limits
        self._by_roles: dict[tuple, RoleLimits] = {}

    def for_roles(self, roles) -> RoleLimits:
        key = tuple(roles)
        found = self._by_roles.get(key)
        if found is None:
            c = self.cfg
            found = self._by_roles[key] = RoleLimits(role_value(c.unacked_sends, key),
                                                     role_value(c.send_rate, key),
                                                     role_value(c.send_burst, key))
        return found


class Sources:
    """Per source address: open connections (when capped) and recent auth
    failures.  Bounded: at most ``MAX_SOURCES`` addresses, idle ones dropped."""

    def __init__(self, per_source: int, delay_max: float) -> None:
        self.per_source = per_source
        self.delay_max = delay_max
        self.connections: dict[str, int] = {}
        self.failures: dict[str, list] = {}      # address -> [count, loop time of the last]

    def connect(self, address: str) -> bool:
        """A connection from ``address`` arrived; False when it is over the cap
        (then it is not counted)."""
        if not self.per_source:
            return True
        n = self.connections.get(address, 0)
        if n >= self.per_source:
            return False
        self.connections[address] = n + 1
        return True

    def disconnect(self, address: str) -> None:
        if not self.per_source:
            return
        n = self.connections.get(address, 0) - 1
        if n > 0:
            self.connections[address] = n
        else:
            self.connections.pop(address, None)

    def auth_failed(self, address: str, now: float) -> float:
        """Count a failed login; returns the seconds to hold its AUTH_FAILED back."""
        if not self.delay_max or not address:
            return 0.0
        failures = self.failures
        record = failures.get(address)
        if record is None or now - record[1] > AUTH_WINDOW:
            if record is None and len(failures) >= MAX_SOURCES:
                self.sweep(now)
                if len(failures) >= MAX_SOURCES:
                    failures.pop(next(iter(failures)))    # the oldest entry
            record = failures[address] = [0, now]
        record[0] += 1
        record[1] = now
        over = record[0] - AUTH_FREE_FAILURES
        if over <= 0:
            return 0.0
        return min(self.delay_max, AUTH_FIRST_DELAY * 2.0 ** min(over - 1, 30))

    def sweep(self, now: float) -> None:
        """Forget sources whose last failure is older than the window."""
        stale = [a for a, (_, last) in self.failures.items() if now - last > AUTH_WINDOW]
        for address in stale:
            del self.failures[address]
