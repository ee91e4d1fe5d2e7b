"""Test helpers: an inbox that can be awaited, a bounded poll, envelope builders, and the
Redis a test's brokers meet on (one redis-server or a 3-master cluster)."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.crc import key_slot

from roomcast.broker._keys import Keys
from roomcast.broker.publisher import Publisher
from roomcast.broker.redis import RedisBroker
from roomcast.shared.envelope import Envelope, Kind
from roomcast.shared.ids import ConnectionId, NodeId
from tests.redis_cluster import LocalRedisCluster
from tests.redis_server import RedisServer

DEFAULT_TIMEOUT = 10.0
FAST = {"heartbeat_interval": 0.1, "presence_ttl": 0.5, "reconnect_max_delay": 0.5}
"""Broker timing for tests: failures are noticed and repaired within a second."""
CLOSE_TIMING = {"socket_timeout": 0.5, "health_check_interval": 0.2}
CLOSE_BOUND = 10.0
"""Seconds within which close() must return with CLOSE_TIMING: each of its steps gives
up after the socket timeout or twice it, whatever Redis does (about 2 s in practice);
what this catches is a close that does not return."""

_prefixes = itertools.count()


class Inbox:
    """A ``deliver`` callback that records envelopes and lets a test await them."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        self._changed = asyncio.Event()

    def __call__(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)
        self._changed.set()

    @property
    def payloads(self) -> list[bytes]:
        """The payloads received so far, in order."""
        return [e.payload for e in self.envelopes]

    async def wait_for_payload(self, payload: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Return once ``payload`` was received; TimeoutError after ``timeout``."""
        await self.wait_until(lambda: payload in self.payloads, timeout)

    async def wait_until(self, check: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT) -> None:
        """Return once ``check()`` holds, re-checked at every delivery."""
        async with asyncio.timeout(timeout):
            while not check():
                self._changed.clear()
                await self._changed.wait()


@dataclass
class Node:
    """A started broker and the inbox it delivers to."""

    broker: RedisBroker
    inbox: Inbox

    @property
    def id(self) -> NodeId:
        """This node's id."""
        node = self.broker.node_id
        assert node is not None
        return node

    def conn(self, seq: int) -> ConnectionId:
        """The id of this node's ``seq``-th connection."""
        return ConnectionId(f"{self.id}.{seq:x}")


@dataclass
class Backend:
    """The Redis one test's brokers meet on: a redis-server, or a Redis Cluster.

    Brokers and publishers made through it are closed when the test ends.
    """

    kind: str
    """``redis`` or ``cluster``: the transport under test."""
    servers: list[RedisServer]
    local_cluster: LocalRedisCluster | None = None
    prefix: str = field(default_factory=lambda: f"t{next(_prefixes)}")
    brokers: list[RedisBroker] = field(default_factory=list)
    publishers: list[Publisher] = field(default_factory=list)

    @property
    def cluster(self) -> bool:
        """True on a Redis Cluster."""
        return self.local_cluster is not None

    @property
    def url(self) -> str:
        """The URL the brokers are given."""
        return self.local_cluster.url if self.local_cluster else self.servers[0].url

    @property
    def keys(self) -> Keys:
        """The channel and key names of this test's prefix."""
        return Keys(self.prefix, cluster=self.cluster)

    def broker(self, **options: Any) -> RedisBroker:
        """An unstarted broker with test timing (``options`` win)."""
        options.setdefault("prefix", self.prefix)
        broker = RedisBroker(options.pop("url", self.url), **{**FAST, **options})
        self.brokers.append(broker)
        return broker

    async def node(self, node_id: str, **options: Any) -> Node:
        """A started broker as node ``node_id``."""
        inbox = Inbox()
        broker = self.broker(**options)
        await broker.start(NodeId(node_id), inbox)
        return Node(broker, inbox)

    def publisher(self, **options: Any) -> Publisher:
        """A Publisher for this test's prefix."""
        options.setdefault("prefix", self.prefix)
        publisher = Publisher(options.pop("url", self.url), **options)
        self.publishers.append(publisher)
        return publisher

    async def close(self) -> None:
        """Close every broker and publisher made here, newest first."""
        for broker in reversed(self.brokers):
            await broker.close()
        for publisher in self.publishers:
            await publisher.close()

    # -- looking at and breaking Redis ---------------------------------------------

    def port_of(self, key: str) -> int:
        """The port of the server (or master) that serves ``key``."""
        if self.local_cluster is None:
            return self.servers[0].port
        return self.local_cluster.master_of(key)

    def client(self, key: str) -> redis.Redis:
        """A synchronous client of the server (or master) that serves ``key``."""
        if self.local_cluster is None:
            return self.servers[0].client()
        return self.local_cluster.client(self.port_of(key))

    def subscribers(self, channel: str) -> int:
        """How many links subscribe ``channel`` where it is served."""
        command = ("PUBSUB", "SHARDNUMSUB") if self.cluster else ("PUBSUB", "NUMSUB")
        with self.client(channel) as client:
            return int(client.execute_command(*command, channel)[1])

    def raw_publish(self, channel: str, data: bytes) -> int:
        """Publish ``data`` as any Redis client could (PUBLISH, or SPUBLISH on a cluster)."""
        command = "SPUBLISH" if self.cluster else "PUBLISH"
        with self.client(channel) as client:
            return int(client.execute_command(command, channel, data))

    def channels(self) -> set[bytes]:
        """Every channel of this prefix that some link subscribes, on every server."""
        command = ("PUBSUB", "SHARDCHANNELS") if self.cluster else ("PUBSUB", "CHANNELS")
        found: set[bytes] = set()
        for server in self.servers:
            with server.client() as client:
                found.update(client.execute_command(*command, f"{self.prefix}:*"))
        return found

    def url_with(self, credentials: str) -> str:
        """The URL with ``credentials`` (``user:password`` or ``:password``) in it."""
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{credentials}@{rest}"

    def server(self, key: str) -> RedisServer:
        """The process that serves ``key``."""
        if self.local_cluster is None:
            return self.servers[0]
        return self.local_cluster.server(self.port_of(key))

    def kill(self) -> None:
        """SIGKILL every Redis process."""
        for server in self.servers:
            server.kill()

    def restart(self) -> None:
        """Start every process again, on the same ports, empty (no persistence)."""
        for server in self.servers:
            server.start()
        if self.local_cluster is not None:
            self.local_cluster.wait_until_ok()

    def freeze(self) -> None:
        """SIGSTOP every Redis process."""
        for server in self.servers:
            server.freeze()

    def thaw(self) -> None:
        """SIGCONT every Redis process frozen by ``freeze``."""
        for server in self.servers:
            if server.running:
                server.thaw()

    def kill_pubsub_clients(self) -> None:
        """CLIENT KILL TYPE pubsub on every server (sharded links are pub/sub clients too)."""
        for server in self.servers:
            with server.client() as client:
                client.client_kill_filter(_type="pubsub")

    def config_set(self, name: str, value: str) -> None:
        """CONFIG SET on every server."""
        for server in self.servers:
            server.config_set(name, value)

    def room_on_each_master(self) -> list[str]:
        """One room per master whose channel that master serves (one room on one server)."""
        if self.local_cluster is None:
            return ["lobby"]
        owners = self.local_cluster.slot_owners()
        found: dict[int, str] = {}
        for i in itertools.count():
            room = f"room{i}"
            found.setdefault(owners[key_slot(self.keys.room_channel(room).encode())], room)
            if len(found) == self.local_cluster.masters:
                return [found[port] for port in sorted(found)]
        raise AssertionError("unreachable")


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = DEFAULT_TIMEOUT
) -> float:
    """Poll ``check`` until it holds; return the seconds it took, fail after ``timeout``."""
    start = time.monotonic()
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)  # polling interval, bounded by the deadline above


def envelope(
    kind: Kind, target: str, payload: bytes, *, origin: str = "", exclude: str = ""
) -> Envelope:
    """A text envelope (binary when the payload is not UTF-8)."""
    try:
        payload.decode()
        binary = False
    except UnicodeDecodeError:
        binary = True
    return Envelope(kind, target, payload, binary, origin=origin, exclude=exclude)


async def sync_with(sender: Node, receiver: Node, token: bytes) -> None:
    """Send ``receiver`` a marker from ``sender`` and wait for it.

    Redis hands messages on one channel to a subscriber in the order it processed the
    publishes, so once the marker is in, everything ``sender`` published before it to
    ``receiver``'s node channel (and, on one server, to any channel) has arrived too.
    """
    await sender.broker.publish(
        envelope(Kind.CONNECTION, receiver.conn(0xFFFF), token, origin=sender.id)
    )
    await receiver.inbox.wait_for_payload(token)
