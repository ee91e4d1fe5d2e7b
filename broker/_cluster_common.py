"""Redis Cluster plumbing shared by RedisClusterBroker and ClusterPublisher.

The cluster client is redis-py's ``RedisCluster``: it discovers the nodes, keeps the
slot map, follows MOVED/ASK and routes every command. This module adds what roomcast
needs on top: the ``redis+cluster://`` URL, per-master pipelining of publishes and
presence writes (a dead master delays and fails only its own traffic), SPUBLISH with
PublishError, single-slot presence reads, and rate-limited slot-map refreshes after
failures (redis-py only refreshes on its own when it retries, and roomcast never retries
a publish: it could be delivered twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url, to_bool
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    ClusterError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from roomcast.broker._keys import Keys, redact_url
from roomcast.broker._redis_common import TRANSPORT_ERRORS, Command, describe_failure, filter_alive
from roomcast.shared.errors import BrokerError, PublishError
from roomcast.shared.ids import ConnectionId, Room

log = logging.getLogger("roomcast.broker.redis_cluster")

CLUSTER_SCHEMES: Final = ("redis+cluster://", "rediss+cluster://")

CLUSTER_ERRORS: Final = (*TRANSPORT_ERRORS, RedisClusterException)
"""What a cluster call raises when nodes are down, frozen, moving or refuse the command.

``RedisClusterException`` (no node reachable, slot not covered) is not a RedisError.
"""

_DEFAULT_PORT: Final = 6379
_URL_OPTIONS: Final = frozenset({
    "socket_timeout", "socket_connect_timeout", "socket_keepalive", "max_connections",
    "client_name", "require_full_coverage", "ssl_cert_reqs", "ssl_ca_certs",
    "ssl_certfile", "ssl_keyfile", "ssl_check_hostname", "ssl_ciphers", "ssl_min_version",
})
"""Query options a cluster URL may carry; anything else is refused rather than ignored."""

_TOPOLOGY_ERRORS: Final = (
    RedisConnectionError, RedisTimeoutError, ClusterError, AskError, TryAgainError,
    RedisClusterException,
)
"""Error replies that say the slot map may be stale (not, say, a wrong-type error)."""

_MIN_REFRESH_INTERVAL: Final = 0.1
"""Seconds between two slot-map refreshes, however many failures ask for one."""

# Members of one room, the node scores and the server time, atomically: every key is in
# the prefix's hash-tag slot.
_READ_MEMBERS_LUA: Final = """
local t = redis.call('TIME')
return {t[1], t[2], redis.call('HGETALL', KEYS[1]),
        redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')}
"""


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The startup nodes and client options of a ``redis+cluster://`` URL.

    Form: ``redis+cluster://[[user]:password@]host[:port][,host[:port]...][/[0]][?opts]``
    (``rediss+cluster://`` for TLS). Port defaults to 6379. ValueError says what is wrong.
    """
    if not isinstance(url, str):
        raise TypeError(f"Redis Cluster URL must be a str, got {type(url).__name__}")
    safe = redact_url(url)
    scheme = url.partition("://")[0].lower()
    if scheme not in ("redis+cluster", "rediss+cluster"):
        raise ValueError(f"{safe}: a Redis Cluster URL starts with redis+cluster:// or "
                         "rediss+cluster://")
    parts = urlsplit(url)
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    nodes = [_host_port(item, safe) for item in hostlist.split(",")]
    if parts.path not in ("", "/", "/0"):
        raise ValueError(f"{safe}: a Redis Cluster has only database 0; drop {parts.path!r}")
    # redis-py parses credentials and options; one host stands in for all of them
    plain = "rediss" if scheme == "rediss+cluster" else "redis"
    host = hostlist.split(",")[0]
    options: dict[str, Any] = dict(
        parse_url(f"{plain}://{userinfo}{at}{host}/?{parts.query}")
    )
    tls = options.pop("connection_class", None) is not None
    if options.pop("db", 0) != 0:
        raise ValueError(f"{safe}: a Redis Cluster has only database 0")
    options.pop("host", None)
    options.pop("port", None)
    if "protocol" in options or "decode_responses" in options:
        raise ValueError(f"Redis URL {safe}: roomcast speaks RESP2 with raw bytes; "
                         "remove protocol= and decode_responses= from the URL")
    unknown = set(options) - _URL_OPTIONS - {"username", "password"}
    if unknown:
        raise ValueError(f"{safe}: unknown option(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(_URL_OPTIONS))}")
    if "require_full_coverage" in options:
        options["require_full_coverage"] = bool(to_bool(options["require_full_coverage"]))
    if tls:
        options["ssl"] = True
    return nodes, options


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


def describe_cluster_failure(exc: BaseException, url: str) -> str:
    """Like ``describe_failure``, and says when the cluster, not the network, is at fault."""
    where = redact_url(url)
    cause = exc.__cause__
    if isinstance(exc, RedisClusterException) and isinstance(
        cause, AuthenticationError | AuthorizationError
    ):
        return describe_failure(cause, url)  # no node would take the credentials
    if isinstance(exc, SlotNotCoveredError):
        return f"Redis Cluster at {where} has no master for a slot now ({exc})"
    if isinstance(exc, ClusterDownError):
        return f"Redis Cluster at {where} is down ({exc}); a shard lost its master"
    if isinstance(exc, RedisClusterException):
        return f"Redis Cluster is unreachable at {where} ({exc})"
    return describe_failure(exc, url)


class TopologyRefresher:
    """Refreshes the client's slot map (CLUSTER SLOTS) at most every 0.1 s, bounded in time."""

    def __init__(self, client: RedisCluster, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._lock = asyncio.Lock()
        self._last = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self.refreshes = 0

    async def refresh(self) -> None:
        """Re-read the slot map now (or after the minimum interval); raises CLUSTER_ERRORS."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            wait = self._last + _MIN_REFRESH_INTERVAL - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                # each startup node is bounded by the socket timeouts; this bounds them all
                async with asyncio.timeout(3 * self._timeout):
                    await self._client.nodes_manager.initialize()
                self.refreshes += 1
            finally:
                self._last = loop.time()

    def request(self) -> None:
        """Refresh in the background unless one is under way (after a failed command)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._background(), name="roomcast-cluster-refresh")

    async def close(self) -> None:
        """Stop a background refresh."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, *CLUSTER_ERRORS):
                await self._task

    async def _background(self) -> None:
        try:
            await self.refresh()
        except CLUSTER_ERRORS as exc:
            log.debug("slot map refresh failed: %s", exc)


class ShardPipeliner:
    """Commands for one master queued in one loop turn, or while its batch is in flight, go
    as one pipeline.

    One batch in flight per master keeps the order of commands for one slot (a room's
    channel, the presence slot); a frozen or dead master delays and fails only its own
    commands. Every command of one ``execute`` call must hash to ``route``'s slot.
    """

    def __init__(
        self, client: RedisCluster, timeout: float, on_failure: Callable[[], None]
    ) -> None:
        self._client = client
        self._timeout = timeout
        self._on_failure = on_failure
        self._queues: dict[str, _MasterQueue] = {}
        self.batches = 0
        """Pipelines sent so far (tests use it to see that commands were batched)."""

    async def execute(self, route: str, *commands: Command) -> list[Any]:
        """Queue ``commands`` for the master of ``route``'s slot; their replies.

        A reply may be an exception object. Raises what the whole batch failed with, or
        SlotNotCoveredError when no master serves the slot.
        """
        manager = self._client.nodes_manager
        if not manager.slots_cache:  # first use (a ClusterPublisher connects lazily)
            async with asyncio.timeout(3 * self._timeout):
                await self._client.initialize()
        slot = self._client.keyslot(route)
        try:
            node = manager.get_node_from_slot(slot)
        except KeyError:
            raise SlotNotCoveredError(f"slot {slot} is not covered by the cluster") from None
        queue = self._queues.get(node.name)
        if queue is None:
            queue = self._queues[node.name] = _MasterQueue(self)
        queue.node = node  # the slot map may have a new object for the same address
        return await queue.execute(commands)

    async def drain(self) -> None:
        """Wait until every queued batch has been sent or has failed."""
        for queue in list(self._queues.values()):
            await queue.drain()


class _MasterQueue:
    """The batching of one master: like ``Pipeliner``, over redis-py's ClusterPipeline."""

    def __init__(self, owner: ShardPipeliner) -> None:
        self._owner = owner
        self.node: ClusterNode | None = None
        self._commands: list[Command] = []
        self._waiters: list[tuple[asyncio.Future[list[Any]], int, int]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def execute(self, commands: tuple[Command, ...]) -> list[Any]:
        reply: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append((reply, len(self._commands), len(commands)))
        self._commands.extend(commands)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="roomcast-cluster-pipeline")
        return await reply

    async def drain(self) -> None:
        while self._flusher is not None and not self._flusher.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._flusher)

    async def _flush(self) -> None:
        owner = self._owner
        while self._commands:
            commands, self._commands = self._commands, []
            waiters, self._waiters = self._waiters, []
            try:
                async with asyncio.timeout(2 * owner._timeout):
                    pipe = owner._client.pipeline(transaction=False)
                    # routed already: redis-py need not hash every command again; a
                    # MOVED reply is still followed, one command at a time
                    for command in commands:
                        pipe.execute_command(*command, target_nodes=self.node)
                    replies = await pipe.execute(raise_on_error=False)
                owner.batches += 1
            except asyncio.CancelledError:
                for reply, _, _ in waiters:
                    reply.cancel()
                raise
            except Exception as exc:
                owner._on_failure()
                for reply, _, _ in waiters:
                    if not reply.done():
                        reply.set_exception(exc)
            else:
                if any(isinstance(r, _TOPOLOGY_ERRORS) for r in replies):
                    owner._on_failure()
                for reply, start, count in waiters:
                    if not reply.done():  # done means its caller was cancelled
                        reply.set_result(replies[start : start + count])


async def spublish_bytes(pipeliner: ShardPipeliner, url: str, channel: str, data: bytes) -> None:
    """SPUBLISH ``data`` on ``channel`` (on the master of its slot); PublishError if not made."""
    try:
        (reply,) = await pipeliner.execute(channel, ("SPUBLISH", channel, data))
    except CLUSTER_ERRORS as exc:
        raise PublishError(describe_cluster_failure(exc, url)) from exc
    if isinstance(reply, Exception):
        raise PublishError(describe_cluster_failure(reply, url)) from reply


async def read_cluster_room_members(
    client: RedisCluster, keys: Keys, room: Room, presence_ttl: float, url: str
) -> set[ConnectionId]:
    """Members of ``room`` whose node heartbeated within ``presence_ttl`` (Redis clock).

    One script on the presence slot reads the hash, the node scores and the time together.
    """
    try:
        seconds, micros, flat_members, flat_scores = await client.execute_command(
            "EVAL", _READ_MEMBERS_LUA, 2, keys.presence(room), keys.nodes
        )
    except CLUSTER_ERRORS as exc:
        raise BrokerError(describe_cluster_failure(exc, url)) from exc
    members = dict(_pairs(flat_members))
    scores = [(node, float(score)) for node, score in _pairs(flat_scores)]
    return filter_alive(members, scores, float(seconds) + float(micros) / 1e6, presence_ttl)


def _pairs(flat: Sequence[Any]) -> list[tuple[Any, Any]]:
    return list(zip(flat[::2], flat[1::2], strict=True))


def _host_port(item: str, safe_url: str) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` of one startup node."""
    item = item.strip()
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
    else:
        host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError(f"{safe_url}: every node needs a host, as host:port")
    try:
        port = int(port_text) if port_text else _DEFAULT_PORT
    except ValueError:
        raise ValueError(f"{safe_url}: invalid port {port_text!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"{safe_url}: invalid port {port}")
    return host, port
