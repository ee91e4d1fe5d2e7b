"""How nodes reach each other: the Broker interface and its implementations.

``create_broker(url)`` picks one by URL scheme: no URL or ``memory://`` gives the
in-process broker (one node); ``redis://``, ``rediss://`` and ``unix://`` (one Redis
server) and ``redis+cluster://`` and ``rediss+cluster://`` (a Redis Cluster, sharded
pub/sub) give ``RedisBroker`` over the matching transport. ``Publisher`` takes the same
Redis URLs. ``RedisClusterBroker`` and ``ClusterPublisher`` are former names of
``RedisBroker`` and ``Publisher``.
"""

from __future__ import annotations

from roomcast.broker._urls import is_redis_url
from roomcast.broker.base import Broker, BrokerStats, Deliver
from roomcast.broker.memory import MemoryBroker, MemoryBus
from roomcast.broker.publisher import Publisher
from roomcast.broker.redis import RedisBroker
from roomcast.broker.redis_cluster import ClusterPublisher, RedisClusterBroker

__all__ = [
    "Broker", "BrokerStats", "ClusterPublisher", "Deliver", "MemoryBroker", "MemoryBus",
    "Publisher", "RedisBroker", "RedisClusterBroker", "create_broker",
]


def create_broker(
    url: str | None = None,
    *,
    prefix: str = "roomcast",
    heartbeat_interval: float = 1.0,
    presence_ttl: float = 5.0,
) -> Broker:
    """The broker for ``url``; ValueError for a scheme roomcast does not know.

    ``prefix``, ``heartbeat_interval`` and ``presence_ttl`` apply to the Redis broker.
    """
    if url is None or url == "" or url == "memory://":
        return MemoryBroker()
    if is_redis_url(url):
        return RedisBroker(
            url, prefix=prefix, heartbeat_interval=heartbeat_interval,
            presence_ttl=presence_ttl,
        )
    raise ValueError(
        f"unknown broker URL {url!r}: use redis://, rediss://, unix://, "
        "redis+cluster://, rediss+cluster:// or memory://"
    )
