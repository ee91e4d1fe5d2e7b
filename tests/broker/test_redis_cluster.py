"""What only the Redis Cluster transport does, against real 3-master clusters: the
cluster URL, hash-tagged presence keys, one SSUBSCRIBE link per master, and a frozen
master that fails only its own rooms.

Everything both transports do is in test_redis_broker.py; failover and slot migration
are in tests/e2e/test_redis_cluster.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.asyncio.cluster import NodesManager
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from roomcast.broker import create_broker
from roomcast.broker._cluster import ClusterTransport, TopologyRefresher
from roomcast.broker._keys import Keys
from roomcast.broker._transport import Listener
from roomcast.broker._urls import parse_cluster_url
from roomcast.shared.envelope import Kind
from roomcast.shared.errors import PublishError
from roomcast.shared.ids import Room
from tests.broker.helpers import CLOSE_BOUND, Backend, envelope, eventually, sync_with
from tests.redis_cluster import LocalRedisCluster

CLUSTER = pytest.mark.parametrize("backend", ["cluster"], indirect=True)
OWN_CLUSTER = pytest.mark.parametrize("own_backend", ["cluster"], indirect=True)
"""The cluster side of conftest's ``backend`` and ``own_backend`` fixtures."""


# -- unit tests: URL, names (no Redis) ---------------------------------------------


def test_cluster_url_gives_startup_nodes_credentials_and_tls() -> None:
    """Several host:port pairs, default port, IPv6, user/password, TLS and options parse."""
    nodes, options = parse_cluster_url(
        "rediss+cluster://app:p%40ss@h1:7000,h2,[::1]:7002/?socket_connect_timeout=3"
        "&ssl_cert_reqs=none&require_full_coverage=no"
    )
    assert nodes == [("h1", 7000), ("h2", 6379), ("::1", 7002)]
    assert options == {
        "username": "app", "password": "p@ss", "socket_connect_timeout": 3.0,
        "ssl_cert_reqs": "none", "require_full_coverage": False, "ssl": True,
    }
    assert parse_cluster_url("redis+cluster://h:1/0") == ([("h", 1)], {})


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://:secret@h:1/2", "only database 0"),
        ("redis+cluster://:secret@h:1/?db=3", "only database 0"),
        ("redis+cluster://:secret@h:1/?protocol=3", "RESP2"),
        ("redis+cluster://:secret@h:1/?decode_responses=yes", "RESP2"),
        ("redis+cluster://:secret@h:1/?colour=blue", "unknown option"),
        ("redis+cluster://:secret@h:port", "invalid port"),
        ("redis+cluster://:secret@:1", "needs a host"),
    ],
)
def test_bad_cluster_urls_are_refused_without_the_password(url: str, message: str) -> None:
    """A wrong URL is a ValueError saying what is wrong, never echoing the password."""
    with pytest.raises(ValueError, match=message) as failure:
        create_broker(url)
    assert "secret" not in str(failure.value)


def test_presence_keys_share_one_slot_and_rooms_spread() -> None:
    """Presence keys are hash-tagged into one slot; channels keep their names and spread."""
    keys = Keys("app1", cluster=True)
    assert keys.presence("lobby") == "{app1}:presence:lobby"
    assert keys.node_rooms("abc") == "{app1}:node-rooms:abc"
    assert keys.nodes == "{app1}:nodes"
    slots = {key_slot(k.encode()) for k in
             (keys.presence("lobby"), keys.presence("x"), keys.node_rooms("n"), keys.nodes)}
    assert slots == {key_slot(b"app1")}
    assert keys.room_channel("lobby") == Keys("app1").room_channel("lobby") == "app1:room:lobby"
    assert keys.all_channel == "app1:all" and keys.node_channel("abc") == "app1:node:abc"
    assert len({key_slot(keys.room_channel(f"r{i}").encode()) for i in range(50)}) > 40


# -- real cluster --------------------------------------------------------------------


@CLUSTER
async def test_rooms_on_different_shards_each_travel_on_their_own_master(
    backend: Backend,
) -> None:
    """Each room's channel is SSUBSCRIBEd on the master of its slot only, and delivered;
    nobody uses classic (non-sharded) pub/sub."""
    assert backend.local_cluster is not None
    a, b, c = await backend.node("a"), await backend.node("b"), await backend.node("c")
    rooms = backend.room_on_each_master()
    for room in rooms:
        await b.broker.subscribe(Room(room))
    masters = backend.local_cluster.master_ports()
    for room in rooms:
        channel = backend.keys.room_channel(room)
        home = backend.port_of(channel)
        for port in masters:
            with backend.local_cluster.client(port) as client:
                count = client.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1]
            assert count == (1 if port == home else 0)
        await a.broker.publish(envelope(Kind.ROOM, room, room.encode(), origin=a.id))
    await b.inbox.wait_until(lambda: len(b.inbox.envelopes) == len(rooms))
    assert sorted(b.inbox.payloads) == sorted(r.encode() for r in rooms)
    assert b.broker.stats.received == len(rooms) and a.broker.stats.published == len(rooms)
    assert set(b.broker._transport.links()) == {f"127.0.0.1:{p}" for p in masters}
    await sync_with(a, c, b"marker")
    assert c.inbox.payloads == [b"marker"]
    for port in masters:
        with backend.local_cluster.client(port) as client:
            assert client.execute_command("PUBSUB", "CHANNELS", f"{backend.prefix}:*") == []


@OWN_CLUSTER
async def test_frozen_master_fails_only_its_rooms_and_recovers(own_backend: Backend) -> None:
    """A SIGSTOPped master: its rooms' publishes fail within the bound, then fail fast,
    while other rooms still flow; the link is dropped; after SIGCONT everything is back."""
    backend = own_backend
    timing = {"socket_timeout": 0.5, "health_check_interval": 0.2}
    a, b = await backend.node("a", **timing), await backend.node("b", **timing)
    rooms = backend.room_on_each_master()
    presence_master = backend.port_of(backend.keys.nodes)
    frozen_room = next(r for r in rooms
                       if backend.port_of(backend.keys.room_channel(r)) != presence_master)
    alive_rooms = [r for r in rooms if r != frozen_room]
    for room in rooms:
        await b.broker.subscribe(Room(room))
    frozen = backend.server(backend.keys.room_channel(frozen_room))
    frozen.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(PublishError, match="unreachable"):
            await a.broker.publish(envelope(Kind.ROOM, frozen_room, b"frozen", origin=a.id))
        assert time.monotonic() - started <= 2 * 0.5 + 0.5
        started = time.monotonic()
        with pytest.raises(PublishError, match="failing fast"):
            await a.broker.publish(envelope(Kind.ROOM, frozen_room, b"again", origin=a.id))
        assert time.monotonic() - started < 0.2
        for room in alive_rooms:  # other masters' rooms are not failed fast
            await a.broker.publish(envelope(Kind.ROOM, room, room.encode(), origin=a.id))
        await b.inbox.wait_until(lambda: len(b.inbox.envelopes) == len(alive_rooms))
        assert a.broker.stats.publish_failures == 2
        await eventually(lambda: not b.broker.connected, timeout=0.2 + 0.5 + 1.5)
    finally:
        frozen.thaw()

    await eventually(
        lambda: a.broker.connected and b.broker.connected and not a.broker._failing,
        timeout=15,
    )
    await a.broker.publish(envelope(Kind.ROOM, frozen_room, b"thawed", origin=a.id))
    await b.inbox.wait_for_payload(b"thawed")



@OWN_CLUSTER
async def test_close_is_bounded_while_a_slot_map_refresh_never_lets_go(
    own_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-subscription stuck in a slot-map refresh that ignores cancellation (a library
    call that does not let go) does not hold close(): the broker gives its tasks the
    socket timeout to stop and goes on. (Before issue 11, close() awaited the cluster
    subscriber's supervisor without a bound and did not return.)"""
    release = asyncio.Event()
    entered = asyncio.Event()

    async def stuck(self: TopologyRefresher) -> None:
        entered.set()
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    a = await own_backend.node("a", socket_timeout=0.5)
    monkeypatch.setattr(TopologyRefresher, "refresh", stuck)
    own_backend.kill_pubsub_clients()  # the link is lost: the broker repairs, and sticks
    try:
        async with asyncio.timeout(5):
            await entered.wait()
        async with asyncio.timeout(CLOSE_BOUND):
            await a.broker.close()
    finally:
        release.set()
    assert a.broker._supervisor is not None
    await asyncio.wait([a.broker._supervisor], timeout=5)
    assert a.broker._supervisor.done()  # once let go, it saw the broker closed and ended


# -- nothing after close: redis-py's RedisCluster reconnects after aclose() -------------


def _named_connections(cluster: LocalRedisCluster, name: str) -> int:
    """Connections named ``name`` (CLIENT SETNAME) open on any master now."""
    count = 0
    for port in cluster.master_ports():
        with cluster.client(port) as client:
            count += sum(1 for c in client.client_list() if c["name"] == name)
    return count


def _routes_on_every_master(transport: ClusterTransport) -> list[str]:
    """One route per master of the cluster (by the transport's slot map)."""
    found: dict[str, str] = {}
    for i in range(10_000):
        found.setdefault(transport.failure_domain(f"r{i}"), f"r{i}")
        if len(found) == 3:
            return list(found.values())
    raise AssertionError("no route found for some master")


@CLUSTER
async def test_a_closed_cluster_transport_sends_nothing_and_leaves_no_connection(
    backend: Backend,
) -> None:
    """After close(), a command for any master (one never used before too) and a repair
    raise "closed" and open nothing: the closed RedisCluster would re-read the slot map
    and connect again on the next command (redis-py's aclose() is not final), leaving
    connections nobody closes. (Before the fix a master without a queue yet got a new
    one and the command went out: the leaked connection CI's ResourceWarning caught.)"""
    assert backend.local_cluster is not None
    name = f"leak-{backend.prefix}"
    transport = ClusterTransport(f"{backend.url}/?client_name={name}", socket_timeout=1.0,
                                 health_check_interval=1.0)
    try:
        assert await transport.execute("r0", ("PING",)) == [True]  # one master's queue
        routes = _routes_on_every_master(transport)
        assert _named_connections(backend.local_cluster, name) >= 1
    finally:
        await transport.close()
    for route in routes:
        with pytest.raises(RedisConnectionError, match="closed"):
            await transport.execute(route, ("PING",))
    with pytest.raises(RedisConnectionError, match="closed"):
        await transport.repair()
    await eventually(lambda: _named_connections(backend.local_cluster, name) == 0)
    nodes = transport._client.nodes_manager
    for node in (*nodes.nodes_cache.values(), *nodes.startup_nodes.values()):
        assert not any(c.is_connected for c in node._connections), node.name


@CLUSTER
async def test_a_publisher_closed_while_its_first_publish_reads_the_slot_map_leaks_nothing(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Publisher connects on first use. Closed while that first publish still reads
    the slot map (when redis-py's aclose() does nothing: the client is not initialized
    yet), the publish fails with PublishError, nothing is sent, and every connection the
    reading opened is closed."""
    assert backend.local_cluster is not None
    name = f"leak-{backend.prefix}"
    entered, proceed = asyncio.Event(), asyncio.Event()
    read_slot_map = NodesManager.initialize

    async def held(self: NodesManager, *args: Any, **kwargs: Any) -> None:
        entered.set()
        await proceed.wait()
        await read_slot_map(self, *args, **kwargs)

    monkeypatch.setattr(NodesManager, "initialize", held)
    publisher = backend.publisher(url=f"{backend.url}/?client_name={name}")
    publishing = asyncio.create_task(publisher.publish_to_room("lobby", "never"))
    async with asyncio.timeout(CLOSE_BOUND):
        await entered.wait()
        await publisher.close()
    proceed.set()  # the slot map is read now, after close()
    with pytest.raises(PublishError, match="closed"):
        async with asyncio.timeout(CLOSE_BOUND):
            await publishing
    assert publisher.published == 0
    await eventually(lambda: _named_connections(backend.local_cluster, name) == 0)


@OWN_CLUSTER
async def test_a_slot_map_read_that_outlives_close_leaves_no_connection(
    own_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-subscription's slot-map read that ignores the cancel of close() and reads the
    map once close() returned (the client closed) closes what it connected, and the
    repair ends there. (Before the fix those connections stayed open: nobody closes a
    client twice.)"""
    assert own_backend.local_cluster is not None
    name = f"leak-{own_backend.prefix}"
    entered, release = asyncio.Event(), asyncio.Event()
    read_slot_map = NodesManager.initialize

    async def stuck(self: NodesManager, *args: Any, **kwargs: Any) -> None:
        entered.set()
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue
        await read_slot_map(self, *args, **kwargs)

    a = await own_backend.node("a", socket_timeout=0.5,
                               url=f"{own_backend.url}/?client_name={name}")
    monkeypatch.setattr(NodesManager, "initialize", stuck)
    own_backend.kill_pubsub_clients()  # the link is lost: the broker repairs, and sticks
    try:
        async with asyncio.timeout(5):
            await entered.wait()
        async with asyncio.timeout(CLOSE_BOUND):
            await a.broker.close()
    finally:
        release.set()
    assert a.broker._supervisor is not None
    await asyncio.wait([a.broker._supervisor], timeout=5)
    assert a.broker._supervisor.done()
    await eventually(lambda: _named_connections(own_backend.local_cluster, name) == 0)


@CLUSTER
async def test_a_link_close_cancelled_while_its_reader_stops_still_closes_the_link(
    backend: Backend,
) -> None:
    """A repair that closes a link it no longer needs can be cancelled by close() while
    it waits for the link's reader to stop; the link's connection is closed all the
    same (it is out of the subscriber's links by then: close() would not see it).
    (Before the fix it stayed open until the garbage collector found it, loop closed.)"""
    assert backend.local_cluster is not None
    name = f"leak-{backend.prefix}"
    transport = ClusterTransport(f"{backend.url}/?client_name={name}", socket_timeout=1.0,
                                 health_check_interval=1.0)
    subscriber = transport._subscriber
    try:
        await transport.start(Listener(lambda data: None, lambda channels, lost: None),
                              [backend.keys.all_channel])
        (link,) = subscriber._links.values()
        closing = asyncio.create_task(subscriber._close_link(link))
        await asyncio.sleep(0)  # one loop turn: it cancelled the reader and waits for it
        assert not closing.done() and link.reader is not None
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(CLOSE_BOUND):
                await closing
        assert not link.conn.is_connected
    finally:
        await transport.close()
    await eventually(lambda: _named_connections(backend.local_cluster, name) == 0)
