"""How nodes reach each other: the Broker interface and its implementations.

``create_broker(url)`` picks one by URL scheme: no URL or ``memory://`` gives the
in-process broker (one node); ``redis://``, ``rediss://`` and ``unix://`` give the
Redis broker.
"""

from __future__ import annotations

from broker.base import Broker, Deliver
from broker.memory import MemoryBroker, MemoryBus
from broker.publisher import Publisher

__all__ = ["Broker", "Deliver", "MemoryBroker", "MemoryBus", "Publisher", "create_broker"]

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


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
    if url.startswith(_REDIS_SCHEMES):
        from broker.redis import RedisBroker

        return RedisBroker(
            url, prefix=prefix, heartbeat_interval=heartbeat_interval,
            presence_ttl=presence_ttl,
        )
    raise ValueError(
        f"unknown broker URL {url!r}: use redis://, rediss://, unix:// or memory://"
    )
