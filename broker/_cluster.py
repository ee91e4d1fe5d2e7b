"""The transport to a Redis Cluster: SPUBLISH and SSUBSCRIBE, per shard.

The client is redis-py's ``RedisCluster``: it discovers the nodes, keeps the slot map,
follows MOVED/ASK and makes each master's connections (TLS, credentials, timeouts from
the URL). On top of it this module adds what roomcast needs:

- commands pipelined per master (``ShardPipeliner``): a dead or frozen master delays and
  fails only its own slots' commands, so only its rooms' publishes fail;
- slot-map refreshes after failures, at most every 0.1 s (``TopologyRefresher``):
  redis-py only refreshes by itself when it retries, and roomcast never retries a
  publish (it could be delivered twice);
- sharded subscriptions that follow failovers and slot migrations
  (``broker/_cluster_pubsub.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection
from typing import Any, Final

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from roomcast.broker._cluster_pubsub import ShardSubscriber, master_of
from roomcast.broker._transport import (
    REDIS_ERRORS,
    Command,
    Listener,
    Pipeliner,
    describe_failure,
    stop_tasks,
)
from roomcast.broker._urls import parse_cluster_url, redact_url

log = logging.getLogger("roomcast.broker.redis")

_TOPOLOGY_ERRORS: Final = (
    RedisConnectionError, RedisTimeoutError, ClusterError, AskError, TryAgainError,
    RedisClusterException,
)
"""Errors that say the slot map may be stale (not, say, a wrong-type error)."""

_MIN_REFRESH_INTERVAL: Final = 0.1
"""Seconds between two slot-map refreshes, however many failures ask for one."""

_CLOSED: Final = "the connection to Redis was closed"


def make_cluster_client(url: str, socket_timeout: float) -> RedisCluster:
    """A RedisCluster for ``url``; no I/O until first used. Options in the URL win.

    RESP2, no automatic retry (a retried SPUBLISH could be delivered twice; roomcast's
    callers already handle failure), every call bounded by ``socket_timeout``.
    """
    if not isinstance(socket_timeout, int | float) or not socket_timeout > 0:
        raise ValueError(f"socket_timeout must be a number > 0, got {socket_timeout!r}")
    nodes, options = parse_cluster_url(url)
    settings: dict[str, Any] = {
        "protocol": 2,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    settings.update(options)
    try:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in nodes], **settings
        )
    except (TypeError, RedisClusterException) as exc:
        raise ValueError(f"invalid Redis Cluster URL {redact_url(url)}: {exc}") from None


async def release_connections(client: RedisCluster, bound: float) -> None:
    """Close every connection of ``client`` within ``2 * bound`` s, whatever its state.

    ``aclose()`` alone does nothing while the client counts as not initialized: before
    its first command, and again after an ``aclose()``, even when a slot-map read since
    (``nodes_manager.initialize()``) connected to the nodes.
    """
    manager = client.nodes_manager
    with contextlib.suppress(*REDIS_ERRORS):
        async with asyncio.timeout(2 * bound):
            await client.aclose()
            await manager.aclose()
            await manager.aclose("startup_nodes")


class TopologyRefresher:
    """Refreshes the client's slot map (CLUSTER SLOTS) at most every 0.1 s, bounded in time."""

    def __init__(self, client: RedisCluster, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._lock = asyncio.Lock()
        self._last = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.refreshes = 0

    async def refresh(self) -> None:
        """Re-read the slot map now (or after the minimum interval); raises REDIS_ERRORS,
        RedisConnectionError once closed (the closed client would connect again)."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            wait = self._last + _MIN_REFRESH_INTERVAL - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if self._closed:
                raise RedisConnectionError(_CLOSED)
            try:
                # each startup node is bounded by the socket timeouts; this bounds them all
                async with asyncio.timeout(3 * self._timeout):
                    await self._client.nodes_manager.initialize()
                self.refreshes += 1
            finally:
                self._last = loop.time()
                if self._closed:
                    # closed meanwhile (a refresh that did not let go of a cancel):
                    # what it connected would stay open
                    await release_connections(self._client, self._timeout)
            if self._closed:
                raise RedisConnectionError(_CLOSED)

    def request(self) -> None:
        """Refresh in the background unless one is under way (after a failed command)."""
        if not self._closed and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._background(), name="roomcast-cluster-refresh")

    async def close(self) -> None:
        """Stop a background refresh (bounded); no more are started."""
        self._closed = True
        await stop_tasks([self._task], self._timeout)

    async def _background(self) -> None:
        try:
            await self.refresh()
        except REDIS_ERRORS as exc:
            log.debug("slot map refresh failed: %s", exc)


class ShardPipeliner:
    """Commands for one master go through that master's own ``Pipeliner``.

    One batch in flight per master keeps the order of commands for one slot (a room's
    channel, the presence slot); a frozen or dead master delays and fails only its own
    commands. Every command of one ``execute`` call must hash to ``route``'s slot.

    Once closed it sends nothing more, to any master: redis-py's ``RedisCluster`` is
    not closed for good by ``aclose()``, a command after it opens new connections
    that nobody closes.
    """

    def __init__(
        self, client: RedisCluster, timeout: float, on_failure: Callable[[], None]
    ) -> None:
        self._client = client
        self._timeout = timeout
        self._on_failure = on_failure
        self._queues: dict[str, _MasterQueue] = {}
        self._closed = False

    @property
    def batches(self) -> int:
        """Pipelines sent so far, over every master (tests use it to see batching)."""
        return sum(q.pipeliner.batches for q in self._queues.values())

    async def execute(self, route: str, *commands: Command) -> list[Any]:
        """Queue ``commands`` for the master of ``route``'s slot; their replies.

        A reply may be an exception object. Raises what the whole batch failed with,
        SlotNotCoveredError when no master serves the slot, RedisConnectionError once
        closed (a master without a queue yet included).
        """
        if self._closed:
            raise RedisConnectionError(_CLOSED)
        if not self._client.nodes_manager.slots_cache:  # first use: a Publisher is lazy
            async with asyncio.timeout(3 * self._timeout):
                await self._client.initialize()
            if self._closed:
                # closed while reading the slot map: aclose() did nothing then (the
                # client was not initialized yet); close what the reading opened
                await release_connections(self._client, self._timeout)
                raise RedisConnectionError(_CLOSED)
        node = master_of(self._client, route)
        queue = self._queues.get(node.name)
        if queue is None:
            queue = self._queues[node.name] = _MasterQueue(self)
        queue.node = node  # the slot map may have a new object for the same address
        return await queue.pipeliner.execute(*commands)

    async def close(self, grace: float) -> None:
        """Let queued batches go out for at most ``grace`` seconds, then stop; no new
        master queue is made after this."""
        self._closed = True
        await asyncio.gather(*(q.pipeliner.close(grace) for q in self._queues.values()))


class _MasterQueue:
    """The batching of one master, over redis-py's ClusterPipeline."""

    def __init__(self, owner: ShardPipeliner) -> None:
        self._owner = owner
        self.node: ClusterNode | None = None
        self.pipeliner = Pipeliner(self._send, owner._timeout)

    async def _send(self, commands: list[Command]) -> list[Any]:
        owner = self._owner
        pipe = owner._client.pipeline(transaction=False)
        # routed already: redis-py need not hash every command again; a MOVED reply is
        # still followed, one command at a time
        for command in commands:
            pipe.execute_command(*command, target_nodes=self.node)
        try:
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        except Exception:
            owner._on_failure()
            raise
        if any(isinstance(r, _TOPOLOGY_ERRORS) for r in replies):
            owner._on_failure()
        return replies


class ClusterTransport:
    """A ``Transport`` to the Redis Cluster at ``url`` (any one reachable node finds the rest)."""

    publish_command: Final = "SPUBLISH"

    def __init__(self, url: str, *, socket_timeout: float, health_check_interval: float) -> None:
        self._url = url
        self._client = make_cluster_client(url, socket_timeout)
        self._timeout = float(socket_timeout)
        self._refresher = TopologyRefresher(self._client, self._timeout)
        self._pipeliner = ShardPipeliner(self._client, self._timeout, self._refresher.request)
        self._subscriber = ShardSubscriber(
            self._client, socket_timeout=self._timeout,
            health_check_interval=float(health_check_interval),
        )
        self._closed = False

    def describe(self, exc: BaseException) -> str:
        """What went wrong, and where (no password)."""
        return describe_failure(exc, self._url)

    def failure_domain(self, route: str) -> str:
        """The address of the master serving ``route``'s slot now."""
        try:
            return str(master_of(self._client, route).name)
        except SlotNotCoveredError:
            return f"slot {self._client.keyslot(route)}"

    def links(self) -> dict[str, set[bytes]]:
        """Master address -> channels subscribed there (for tests and diagnostics)."""
        return self._subscriber.links()

    async def execute(self, route: str, *commands: Command) -> list[Any]:
        """Run ``commands`` on the master of ``route``'s slot, pipelined per master."""
        return await self._pipeliner.execute(route, *commands)

    async def execute_now(self, route: str, *commands: Command) -> list[Any]:
        """As ``execute``: pipelined per master (one connection each, from the pool)."""
        return await self._pipeliner.execute(route, *commands)

    async def execute_bound(
        self, route: str, bind: Callable[[str], tuple[Command, ...]]
    ) -> list[Any]:
        """As ``execute_now``; the run id is not known per pooled connection: ""."""
        return await self._pipeliner.execute(route, *bind(""))

    async def publish(self, channel: str, data: bytes) -> None:
        """SPUBLISH on the master of ``channel``'s slot, pipelined per master."""
        (reply,) = await self._pipeliner.execute(channel, (self.publish_command, channel, data))
        if isinstance(reply, Exception):
            raise reply

    async def start(self, listener: Listener, channels: Collection[str]) -> None:
        """Read the slot map and SSUBSCRIBE ``channels``; raises if the cluster is unreachable."""
        async with asyncio.timeout(3 * self._timeout):
            await self._client.initialize()
        await self._subscriber.start(listener, channels)
        log.debug("Redis Cluster at %s: %d masters", redact_url(self._url),
                  len(self._client.get_primaries()))

    async def subscribe(self, channel: str) -> None:
        """SSUBSCRIBE ``channel`` on its master; returns once confirmed, refused or timed out."""
        await self._subscriber.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        """SUNSUBSCRIBE ``channel``."""
        await self._subscriber.remove(channel)

    async def repair(self) -> tuple[frozenset[str], bool]:
        """Re-read the slot map, then place every wanted channel on its master."""
        await self._refresher.refresh()
        return await self._subscriber.reconcile()

    async def close(self) -> None:
        """Stop refreshing, close the links, let queued commands go, close the client."""
        if self._closed:
            return
        self._closed = True
        await self._refresher.close()
        await self._subscriber.close()
        await self._pipeliner.close(self._timeout)
        await release_connections(self._client, self._timeout)
