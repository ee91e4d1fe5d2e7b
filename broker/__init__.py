"""How nodes reach each other: the Broker interface and its implementations.

``create_broker(url)`` picks one by URL scheme: no URL or ``memory://`` gives the
in-process broker (one node); ``redis://``, ``rediss://`` and ``unix://`` give the
Redis broker; ``redis+cluster://`` and ``rediss+cluster://`` give the Redis Cluster
broker (sharded pub/sub). ``Publisher`` takes the Redis URLs, ``ClusterPublisher``
the cluster ones.
"""

from __future__ import annotations

from roomcast.broker.base import Broker, Deliver
from roomcast.broker.memory import MemoryBroker, MemoryBus
from roomcast.broker.publisher import Publisher
from roomcast.broker.redis_cluster import ClusterPublisher

__all__ = [
    "Broker", "ClusterPublisher", "Deliver", "MemoryBroker", "MemoryBus", "Publisher",
    "create_broker",
]

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def create_broker(
    url: str | None = None,
    *,
    prefix: str = "roomcast",
    heartbeat_interval: float = 1.0,
    presence_ttl: float = 5.0,
) -> Broker:
    """The broker for ``url``; ValueError for a scheme roomcast does not know.

    ``prefix``, ``heartbeat_interval`` and ``presence_ttl`` apply to the Redis brokers.
    """
    if url is None or url == "" or url == "memory://":
        return MemoryBroker()
    if url.lower().startswith(_CLUSTER_SCHEMES):
        from roomcast.broker.redis_cluster import RedisClusterBroker

        return RedisClusterBroker(
            url, prefix=prefix, heartbeat_interval=heartbeat_interval,
            presence_ttl=presence_ttl,
        )
    if url.startswith(_REDIS_SCHEMES):
        from roomcast.broker.redis import RedisBroker

        return RedisBroker(
            url, prefix=prefix, heartbeat_interval=heartbeat_interval,
            presence_ttl=presence_ttl,
        )
    raise ValueError(
        f"unknown broker URL {url!r}: use redis://, rediss://, unix://, "
        "redis+cluster://, rediss+cluster:// or memory://"
    )
