"""A worker of a fleet over Redis: the backends it shares with every other
worker and node (``redis.url``).

One ``redis.asyncio`` connection pool per worker serves the store, presence,
the registry, the channel history and the offer caps; the broker keeps one more connection
for its pub/sub (one per worker, never one per terminal or per channel).
Every key and channel starts with ``redis.prefix``, so fleets may share an
instance.

A worker is named ``<node id>.w<index>`` (``index`` from 0): presence
records the terminals it holds under that name and its control channel
carries it, so a worker restarted by its supervisor answers for the
sessions its predecessor held (they were closed with it and expire or are
taken over).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from .broker_redis import RedisBroker
from .caps_redis import RedisCaps
from .config import Config
from .history_redis import RedisHistory
from .presence_redis import RedisPresence
from .registry_redis import RedisRegistry


POOL_SIZE = 64               # Redis connections a worker's backends use at most at once


def worker_name(node_id: str, index: int) -> str:
    """The fleet-wide name of worker ``index`` of node ``node_id``."""
    return f"{node_id}.w{index}"


@dataclass
class Shared:
    """What one worker opened on the fleet's Redis."""

    client: aioredis.Redis
    listener: aioredis.Redis
    store: object
    presence: RedisPresence
    broker: RedisBroker
    registry: RedisRegistry
    history: RedisHistory
    caps: RedisCaps

    async def close(self) -> None:
        """Close the connection pools (the node closed the store and the broker)."""
        await self.client.aclose()
        await self.listener.aclose()


def connect(cfg: Config, worker: str) -> Shared:
    """The Redis backends of worker ``worker`` (nothing is connected until used)."""
    from .store_redis import RedisStore

    # (health checks keep an idle pool's connections honest across a Redis
    # restart; the timeouts turn an unreachable Redis into errors the node
    # answers with STORE_UNAVAILABLE rather than a hang)
    # A blocking pool: past POOL_SIZE connections in use a call waits for one
    # (up to the timeout) rather than failing at once under a burst.
    client = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
        cfg.redis.url, max_connections=POOL_SIZE, timeout=5.0, health_check_interval=10,
        socket_connect_timeout=2.0, socket_timeout=5.0))
    # (the broker's pub/sub connection waits for messages without a timeout)
    listener = aioredis.Redis.from_url(cfg.redis.url, socket_connect_timeout=2.0,
                                       socket_keepalive=True)
    prefix = cfg.redis.prefix
    return Shared(
        client=client,
        listener=listener,
        store=RedisStore(client, prefix=prefix, dedup_window=cfg.delivery.dedup_window),
        presence=RedisPresence(client, prefix=prefix),
        broker=RedisBroker(worker, listener, prefix=prefix),
        registry=RedisRegistry(client, prefix=prefix),
        history=RedisHistory(client, prefix=prefix, history_max=cfg.history.max_messages,
                             history_age=cfg.history.max_age),
        caps=RedisCaps(client, prefix=prefix),
    )
