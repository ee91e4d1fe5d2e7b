"""The Hub's cross-node contract, run against every broker.

Three hubs, each served on its own real socket, share one broker medium: a MemoryBus
(in-process), a real redis-server started for the test, or a real 3-master Redis Cluster
(one per module, a fresh prefix per test). The same test bodies run on all of them, so
the in-process broker and the Redis brokers promise the same behaviour. The last cases
run with rooms with history and roomcast.v1 members (positions, recovery, idempotency).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web

from roomcast.broker import Broker, MemoryBroker, MemoryBus
from roomcast.node import Connection, EventHandler, Hub, HubConfig, Message
from roomcast.node.auth import Auth
from roomcast.shared.history import History, HistoryPolicy
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
                 session: aiohttp.ClientSession, config: HubConfig | None = None,
                 auth: Auth | None = None) -> None:
        self.make_broker = make_broker
        self.config = config
        self.auth = auth
        self.serve = serve
        self.session = session
        self.hubs: list[Hub] = []
        self.urls: list[str] = []
        self.opened: dict[Hub, asyncio.Queue[Connection]] = {}
        self.received: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.closed: asyncio.Queue[str] = asyncio.Queue()
        self.servers: list[RedisServer] = []
        """The Redis servers of the medium (none for memory)."""

    def cut_links(self) -> None:
        """Drop every node's subscription link, as ``CLIENT KILL TYPE pubsub`` does (the
        Redis brokers reconnect on their own; memory ones wait for ``heal_links``)."""
        for server in self.servers:
            with server.client() as client:
                client.client_kill_filter(_type="pubsub")
        for hub in self.hubs:
            if isinstance(hub.broker, MemoryBroker):
                hub.broker.lose_link()

    def heal_links(self) -> None:
        """Memory brokers get their links back (and report their rooms resumed)."""
        for hub in self.hubs:
            if isinstance(hub.broker, MemoryBroker):
                hub.broker.restore_link()

    async def add_node(self) -> Hub:
        hub = Hub(self.config, broker=self.make_broker(), auth=self.auth)
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

    async def member(self, node: int, *rooms: str, query: str = "") -> Member:
        hub = self.hubs[node]
        ws = await self.session.ws_connect(self.urls[node] + query)
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
    async with _cluster(request, serve, None) as made:
        yield made


HISTORY = HistoryPolicy(History(size=100, ttl=60), rooms={"short": History(size=2, ttl=60)})


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def hcluster(request: pytest.FixtureRequest, serve: Serve) -> AsyncIterator[Cluster]:
    """Three nodes with rooms with history, sharing the broker named by the parameter."""
    async with _cluster(request, serve, HubConfig(history=HISTORY)) as made:
        yield made


@contextlib.asynccontextmanager
async def _cluster(request: pytest.FixtureRequest, serve: Serve, config: HubConfig | None,
                   auth: Auth | None = None) -> AsyncIterator[Cluster]:
    redis_server: RedisServer | None = None
    servers: list[RedisServer] = []
    if request.param == "memory":
        bus = MemoryBus()

        def make_broker() -> Broker:
            return MemoryBroker(bus)
    elif request.param == "redis-cluster":
        from roomcast.broker.redis_cluster import RedisClusterBroker

        local: LocalRedisCluster = request.getfixturevalue("redis_cluster")
        cluster_url = local.url
        servers = list(local.servers)
        prefix = f"contract{next(_prefixes)}"

        def make_broker() -> Broker:
            return RedisClusterBroker(cluster_url, prefix=prefix)
    else:
        from roomcast.broker.redis import RedisBroker

        redis_server = RedisServer().start()
        servers = [redis_server]
        url = redis_server.url

        def make_broker() -> Broker:
            return RedisBroker(url, prefix="contract")

    try:
        async with aiohttp.ClientSession() as session:
            c = Cluster(make_broker, serve, session, config, auth)
            c.servers = servers
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


# -- rooms with history, roomcast.v1 members ---------------------------------------------


@dataclass
class V1Member:
    """A roomcast.v1 client socket and its connection."""

    ws: aiohttp.ClientWebSocketResponse
    conn: Connection
    hub: Hub

    async def frame(self, timeout: float = 10.0) -> Any:
        msg = await self.ws.receive(timeout=timeout)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        return json.loads(msg.data)

    async def messages(self, n: int) -> list[tuple[int, str]]:
        out = []
        for _ in range(n):
            frame = await self.frame()
            assert frame["type"] == "message", frame
            out.append((frame["offset"], frame["data"]))
        return out

    async def nothing_more(self) -> None:
        """No frame is pending (echoes included): a marker sent now is the next frame."""
        await self.hub.send_to(self.conn.id, "__marker__")
        assert await self.frame() == {"type": "message", "data": "__marker__"}


async def v1_member(cluster: Cluster, node: int, room: str, query: str = "") -> tuple[
        V1Member, dict[str, Any]]:
    """A v1 member of ``room`` on ``node``: the member and its joined frame."""
    hub = cluster.hubs[node]
    ws = await cluster.session.ws_connect(f"{cluster.urls[node]}?{query}",
                                          protocols=("roomcast.v1",))
    conn = await asyncio.wait_for(cluster.opened[hub].get(), 10)
    member = V1Member(ws, conn, hub)
    assert (await member.frame())["type"] == "welcome"
    await hub.join_room(conn, room)
    joined = await member.frame()
    assert joined["type"] == "joined" and joined["room"] == room, joined
    return member, joined


async def test_positions_count_up_by_one_across_nodes(hcluster: Cluster) -> None:
    """Publishes from every node get offsets 1, 2, 3 ... in one epoch, and every node's
    member sees them in that order, once."""
    members = [(await v1_member(hcluster, i, "h"))[0] for i in range(3)]
    positions = [await hcluster.hubs[i % 3].broadcast_to_room("h", f"m{i + 1}")
                 for i in range(9)]
    assert [p.offset for p in positions if p is not None] == list(range(1, 10))
    assert len({p.epoch for p in positions if p is not None}) == 1
    expected = [(i, f"m{i}") for i in range(1, 10)]
    for member in members:
        assert await member.messages(9) == expected
    await hcluster.hubs[0].broadcast_to_room("h", "last")  # after every echo on the link
    for member in members:
        assert await member.messages(1) == [(10, "last")]
        await member.nothing_more()


async def test_recovery_through_another_node_is_exactly_once(hcluster: Cluster) -> None:
    """A member that left node 0 and declares its position on node 2 gets exactly the
    messages it missed, in order, then joined (recovered), then live ones."""
    first, joined = await v1_member(hcluster, 0, "h")
    epoch = joined["epoch"]
    await hcluster.hubs[1].broadcast_to_room("h", "seen")
    assert await first.messages(1) == [(1, "seen")]
    await first.ws.close()
    for i in range(2, 5):
        await hcluster.hubs[i % 3].broadcast_to_room("h", f"missed{i}")
    declared = quote(json.dumps({"h": [epoch, 1]}), safe="")
    back = await hcluster.session.ws_connect(
        f"{hcluster.urls[2]}?roomcast.since={declared}", protocols=("roomcast.v1",))
    conn = await asyncio.wait_for(hcluster.opened[hcluster.hubs[2]].get(), 10)
    member = V1Member(back, conn, hcluster.hubs[2])
    assert (await member.frame())["type"] == "welcome"
    await hcluster.hubs[2].join_room(conn, "h")
    assert await member.messages(3) == [(2, "missed2"), (3, "missed3"), (4, "missed4")]
    assert await member.frame() == {"type": "joined", "room": "h", "epoch": epoch,
                                    "offset": 4, "recovered": True, "replayed": 3}
    await hcluster.hubs[0].broadcast_to_room("h", "live")
    assert await member.messages(1) == [(5, "live")]
    await member.nothing_more()
    assert hcluster.hubs[2].stats.recoveries == 1


async def test_recovery_past_the_window_is_refused(hcluster: Cluster) -> None:
    """A position older than the room's history window: recovered false, reason window."""
    _, joined = await v1_member(hcluster, 0, "short")
    for i in range(5):
        await hcluster.hubs[1].broadcast_to_room("short", f"m{i}")
    declared = quote(json.dumps({"short": [joined["epoch"], 1]}), safe="")
    member, again = await v1_member(hcluster, 2, "short", f"roomcast.since={declared}")
    assert again == {"type": "joined", "room": "short", "epoch": joined["epoch"],
                     "offset": 5, "recovered": False, "reason": "window", "replayed": 0}
    await member.nothing_more()


async def test_idempotent_publish_is_stored_once(hcluster: Cluster) -> None:
    """The same idempotency key from two nodes: one position, one stored message, one
    delivery to each member."""
    members = [(await v1_member(hcluster, i, "h"))[0] for i in range(2)]
    first = await hcluster.hubs[0].broadcast_to_room("h", "pay", idempotency_key="order-7")
    retry = await hcluster.hubs[1].broadcast_to_room("h", "pay", idempotency_key="order-7")
    assert first == retry and first is not None and first.offset == 1
    page = await hcluster.hubs[2].room_history("h")
    assert [(e.offset, e.payload) for e in page.envelopes] == [(1, b"pay")]
    await hcluster.hubs[2].broadcast_to_room("h", "next")
    for member in members:
        assert await member.messages(2) == [(1, "pay"), (2, "next")]
        await member.nothing_more()


async def test_every_member_gets_every_message_once_across_a_lost_link(
        hcluster: Cluster) -> None:
    """Subscription links dropped during a publish burst: once they are back, each node
    reads what it missed, and every member gets every message exactly once, in order."""
    members = [(await v1_member(hcluster, i, "h"))[0] for i in range(3)]
    total = 60
    for i in range(1, total + 1):
        await hcluster.hubs[i % 2].broadcast_to_room("h", f"m{i}")
        if i == 20:
            hcluster.cut_links()
        elif i == 40:
            hcluster.heal_links()
    expected = [(i, f"m{i}") for i in range(1, total + 1)]
    for member in members:
        assert await member.messages(total) == expected
    await hcluster.hubs[2].broadcast_to_room("h", "after")
    for member in members:
        assert await member.messages(1) == [(total + 1, "after")]
        await member.nothing_more()
    assert sum(hub.stats.catchup_gaps_lost for hub in hcluster.hubs) == 0
    assert all(hub.broker.stats.resumed_rooms >= 1 for hub in hcluster.hubs)


async def test_members_joining_during_a_burst_miss_nothing_and_get_nothing_twice(
        hcluster: Cluster) -> None:
    """v1 members join on other nodes while a burst is published (some declaring the
    start of the room, some nothing): each gets one contiguous run of offsets, the
    replayed ones before its joined frame and the live ones after, up to the end."""
    _, joined = await v1_member(hcluster, 0, "h")
    epoch = joined["epoch"]
    total = 90  # within the history window (100)

    started = asyncio.Event()

    async def burst() -> None:
        for i in range(1, total + 1):
            await hcluster.hubs[i % 2].broadcast_to_room("h", f"m{i}")
            if i == 5:
                started.set()
            await asyncio.sleep(0)  # one message per loop turn: the joins interleave

    declared = quote(json.dumps({"h": [epoch, 0]}), safe="")

    async def join(n: int) -> tuple[V1Member, bool]:
        recovering = n % 2 == 0
        query = f"roomcast.since={declared}" if recovering else ""
        hub = hcluster.hubs[1 + n % 2]
        ws = await hcluster.session.ws_connect(f"{hcluster.urls[1 + n % 2]}?{query}",
                                               protocols=("roomcast.v1",))
        welcome = json.loads((await ws.receive(timeout=10)).data)
        assert welcome["type"] == "welcome"
        conn = hub.get_connection(welcome["connection"])
        assert conn is not None
        await hub.join_room(conn, "h")
        return V1Member(ws, conn, hub), recovering

    publishing = asyncio.create_task(burst())
    await asyncio.wait_for(started.wait(), 10)
    joiners = await asyncio.gather(*(join(n) for n in range(6)))
    await asyncio.wait_for(publishing, 60)
    await hcluster.hubs[2].broadcast_to_room("h", "end")
    for member, recovering in joiners:
        offsets: list[int] = []
        joined_at: int | None = None
        while True:
            frame = await member.frame()
            if frame["type"] == "joined":
                assert frame.get("recovered", True) is True, frame
                assert frame["offset"] == (offsets[-1] if offsets else frame["offset"])
                joined_at = frame["offset"]
                continue
            assert frame["type"] == "message", frame
            offsets.append(frame["offset"])
            if frame["data"] == "end":
                break
        assert joined_at is not None
        first = 1 if recovering else joined_at + 1
        assert offsets == list(range(first, total + 2)), (recovering, joined_at, offsets)
        await member.nothing_more()
