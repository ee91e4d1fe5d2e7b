"""The Hub's cross-node contract, run against every broker.

Three hubs, each served on its own real socket, share one broker medium: a MemoryBus
(in-process), a real redis-server started for the test, or a real 3-master Redis Cluster
(one per module, a fresh prefix per test). The same test bodies run on all of them, so
the in-process broker and the Redis brokers promise the same behaviour.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from roomcast.broker import Broker, MemoryBroker, MemoryBus
from roomcast.node import Connection, EventHandler, Hub, Message
from tests.redis_cluster import LocalRedisCluster
from tests.redis_server import RedisServer

Serve = Callable[[web.Application], Awaitable[str]]


@dataclass
class Member:
    """A real client socket and the hub-side connection it maps to."""

    ws: aiohttp.ClientWebSocketResponse
    conn: Connection
    hub: Hub

    async def recv(self, timeout: float = 5.0) -> Any:
        msg = await self.ws.receive(timeout=timeout)
        assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), msg
        return msg.data

    async def nothing_more(self, marker_from: Hub) -> None:
        """Prove no message is pending: a marker sent now is the next thing received."""
        await marker_from.send_to(self.conn.id, "__marker__")
        assert await self.recv() == "__marker__"


class Cluster:
    """N hubs on one broker medium, with helpers to connect members."""

    def __init__(self, make_broker: Callable[[], Broker], serve: Serve,
                 session: aiohttp.ClientSession) -> None:
        self.make_broker = make_broker
        self.serve = serve
        self.session = session
        self.hubs: list[Hub] = []
        self.urls: list[str] = []
        self.opened: dict[Hub, asyncio.Queue[Connection]] = {}
        self.received: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.closed: asyncio.Queue[str] = asyncio.Queue()

    async def add_node(self) -> Hub:
        hub = Hub(broker=self.make_broker())
        queue: asyncio.Queue[Connection] = asyncio.Queue()
        self.opened[hub] = queue

        async def on_message(conn: Connection, msg: Message) -> None:
            await self.received.put((conn.id, msg.data))

        async def on_close(conn: Connection, code: int, reason: str) -> None:
            await self.closed.put(conn.id)  # after the hub withdrew its presence

        app = web.Application()
        hub.attach(app)
        app.router.add_get(
            "/ws", hub.route(
                EventHandler(on_open=queue.put, on_message=on_message, on_close=on_close)
            )
        )
        self.urls.append((await self.serve(app)).replace("http", "ws") + "/ws")
        self.hubs.append(hub)
        return hub

    async def member(self, node: int, *rooms: str) -> Member:
        hub = self.hubs[node]
        ws = await self.session.ws_connect(self.urls[node])
        conn = await asyncio.wait_for(self.opened[hub].get(), 5)
        for room in rooms:
            await hub.join_room(conn, room)
        return Member(ws, conn, hub)


_prefixes = itertools.count()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """A 3-master Redis Cluster shared by this module's tests (each uses its own prefix)."""
    with LocalRedisCluster(masters=3) as local:
        yield local


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def cluster(request: pytest.FixtureRequest, serve: Serve) -> AsyncIterator[Cluster]:
    """Three nodes sharing the broker named by the parameter."""
    redis_server: RedisServer | None = None
    if request.param == "memory":
        bus = MemoryBus()

        def make_broker() -> Broker:
            return MemoryBroker(bus)
    elif request.param == "redis-cluster":
        from roomcast.broker.redis_cluster import RedisClusterBroker

        cluster_url = request.getfixturevalue("redis_cluster").url
        prefix = f"contract{next(_prefixes)}"

        def make_broker() -> Broker:
            return RedisClusterBroker(cluster_url, prefix=prefix)
    else:
        from roomcast.broker.redis import RedisBroker

        redis_server = RedisServer().start()
        url = redis_server.url

        def make_broker() -> Broker:
            return RedisBroker(url, prefix="contract")

    try:
        async with aiohttp.ClientSession() as session:
            c = Cluster(make_broker, serve, session)
            try:
                for _ in range(3):
                    await c.add_node()
                yield c
            finally:
                for hub in c.hubs:  # before Redis goes away
                    await hub.close()
    finally:
        if redis_server is not None:
            redis_server.cleanup()


async def test_room_broadcast_reaches_members_on_every_node(cluster: Cluster) -> None:
    """One broadcast reaches the room's members on all nodes, and no one else."""
    a, b, c = [await cluster.member(i, "r") for i in range(3)]
    outsider = await cluster.member(1, "elsewhere")
    await cluster.hubs[0].broadcast_to_room("r", "hello")
    assert [await m.recv() for m in (a, b, c)] == ["hello"] * 3
    await outsider.nothing_more(cluster.hubs[0])


async def test_binary_stays_binary_and_order_is_kept(cluster: Cluster) -> None:
    """Across nodes, text stays text, bytes stay bytes, in publish order."""
    a = await cluster.member(0, "r")
    b = await cluster.member(2, "r")
    for i in range(20):
        await cluster.hubs[0].broadcast_to_room("r", f"t{i}" if i % 2 else f"b{i}".encode())
    expected = [f"t{i}" if i % 2 else f"b{i}".encode() for i in range(20)]
    assert [await b.recv() for _ in range(20)] == expected
    assert [await a.recv() for _ in range(20)] == expected


async def test_room_except_skips_one_connection_on_any_node(cluster: Cluster) -> None:
    """broadcast_to_room_except excludes a member of another node, only that one."""
    a, b, c = [await cluster.member(i, "r") for i in range(3)]
    await cluster.hubs[0].broadcast_to_room_except("r", "not for b", b.conn.id)
    assert await a.recv() == "not for b"
    assert await c.recv() == "not for b"
    await b.nothing_more(cluster.hubs[1])


async def test_broadcast_to_everyone_and_except(cluster: Cluster) -> None:
    """broadcast and broadcast_except reach every connection on every node."""
    members = [await cluster.member(i) for i in range(3)]
    await cluster.hubs[1].broadcast("all")
    assert [await m.recv() for m in members] == ["all"] * 3
    await cluster.hubs[1].broadcast_except(b"all-but-c", members[2].conn.id)
    assert [await m.recv() for m in members[:2]] == [b"all-but-c"] * 2
    await members[2].nothing_more(cluster.hubs[2])


async def test_send_to_connection_on_another_node(cluster: Cluster) -> None:
    """send_to reaches a connection owned by another node, and only it."""
    a = await cluster.member(0)
    b = await cluster.member(2)
    assert await cluster.hubs[0].send_to(b.conn.id, "psst")
    assert await b.recv() == "psst"
    await a.nothing_more(cluster.hubs[0])


async def test_room_size_and_members_across_nodes(cluster: Cluster) -> None:
    """room_size and room_members count members on every node; closing removes them."""
    a, b, c = [await cluster.member(i, "r") for i in range(3)]
    for hub in cluster.hubs:
        assert await hub.room_size("r") == 3
        assert await hub.room_members("r") == {a.conn.id, b.conn.id, c.conn.id}
    await cluster.hubs[1].leave_room(b.conn, "r")
    assert await cluster.hubs[0].room_size("r") == 2
    await c.ws.close()
    assert await asyncio.wait_for(cluster.closed.get(), 5) == c.conn.id
    assert await cluster.hubs[0].room_members("r") == {a.conn.id}


async def test_member_that_left_gets_no_more_room_traffic(cluster: Cluster) -> None:
    """After its last local member leaves, a node no longer delivers the room."""
    a = await cluster.member(0, "r")
    b = await cluster.member(1, "r")
    await cluster.hubs[1].leave_room(b.conn, "r")
    await cluster.hubs[0].broadcast_to_room("r", "after leave")
    assert await a.recv() == "after leave"
    await b.nothing_more(cluster.hubs[0])
    await cluster.hubs[1].join_room(b.conn, "r")
    await cluster.hubs[0].broadcast_to_room("r", "rejoined")
    assert await b.recv() == "rejoined"


async def test_messages_from_members_flow_across_nodes(cluster: Cluster) -> None:
    """A member's message relayed by its node's handler reaches a member elsewhere."""
    a = await cluster.member(0, "r")
    b = await cluster.member(2, "r")
    await a.ws.send_str("from a")
    conn_id, data = await asyncio.wait_for(cluster.received.get(), 5)
    assert (conn_id, data) == (a.conn.id, "from a")
    await cluster.hubs[0].broadcast_to_room_except("r", data, conn_id)
    assert await b.recv() == "from a"
