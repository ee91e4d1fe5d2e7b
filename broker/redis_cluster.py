"""Old names of the Redis Cluster broker and publisher, kept so that existing imports work.

``RedisBroker`` and ``Publisher`` take ``redis+cluster://`` and ``rediss+cluster://``
URLs themselves (the transport is chosen by the URL's scheme), so these are the very
same classes under their former names.
"""

from __future__ import annotations

from roomcast.broker.publisher import Publisher
from roomcast.broker.redis import RedisBroker

__all__ = ["ClusterPublisher", "RedisClusterBroker"]

RedisClusterBroker = RedisBroker
"""Former name of ``RedisBroker`` for ``redis+cluster://`` URLs; the same class."""
ClusterPublisher = Publisher
"""Former name of ``Publisher`` for ``redis+cluster://`` URLs; the same class."""
