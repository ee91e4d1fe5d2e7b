"""RedisClusterBroker and ClusterPublisher against a real 3-master Redis Cluster.

Most tests share one cluster per module, each with its own prefix; tests that kill or
reconfigure Redis start a cluster of their own. Failover and slot migration are in
tests/e2e/test_redis_cluster.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from redis.crc import key_slot

from roomcast.broker import ClusterPublisher, create_broker
from roomcast.broker._cluster_common import parse_cluster_url
from roomcast.broker._keys import Keys
from roomcast.broker.base import Broker
from roomcast.broker.redis_cluster import RedisClusterBroker
from roomcast.shared.envelope import Envelope, Kind
from roomcast.shared.errors import BrokerError, PublishError
from roomcast.shared.ids import ConnectionId, NodeId, Room
from tests.broker.helpers import Inbox, envelope, eventually
from tests.redis_cluster import LocalRedisCluster

ROOT = Path(__file__).resolve().parents[2]
R = Room("lobby")
FAST = {"heartbeat_interval": 0.1, "presence_ttl": 0.5, "reconnect_max_delay": 0.5}


@dataclass
class CNode:
    """A started RedisClusterBroker and the inbox it delivers to."""

    broker: RedisClusterBroker
    inbox: Inbox

    @property
    def id(self) -> NodeId:
        node = self.broker.node_id
        assert node is not None
        return node

    def conn(self, seq: int) -> ConnectionId:
        return ConnectionId(f"{self.id}.{seq:x}")


MakeNode = Callable[..., Awaitable[CNode]]
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def shared_cluster() -> Iterator[LocalRedisCluster]:
    """One 3-master cluster for the tests of this module that do not break it."""
    with LocalRedisCluster(masters=3) as local:
        yield local


@pytest.fixture
def own_cluster() -> Iterator[LocalRedisCluster]:
    """A 3-master cluster for one test that kills or reconfigures it."""
    with LocalRedisCluster(masters=3) as local:
        yield local


@pytest.fixture
def prefix() -> str:
    """A prefix no other test of the module uses."""
    return f"t{next(_prefixes)}"


def node_factory(url: str, prefix: str, nodes: list[CNode]) -> MakeNode:
    async def make(node_id: str, **options: Any) -> CNode:
        settings = {**FAST, **options}
        broker = RedisClusterBroker(url, prefix=prefix, **settings)
        inbox = Inbox()
        await broker.start(NodeId(node_id), inbox)
        node = CNode(broker, inbox)
        nodes.append(node)
        return node

    return make


@pytest.fixture
async def make_node(shared_cluster: LocalRedisCluster, prefix: str) -> AsyncIterator[MakeNode]:
    """Start brokers as nodes on the shared cluster (``make_node("a")``); closed after."""
    nodes: list[CNode] = []
    yield node_factory(shared_cluster.url, prefix, nodes)
    for node in reversed(nodes):
        await node.broker.close()


@pytest.fixture
async def make_own_node(
    own_cluster: LocalRedisCluster, prefix: str
) -> AsyncIterator[MakeNode]:
    """Like make_node, on this test's own cluster."""
    nodes: list[CNode] = []
    yield node_factory(own_cluster.url, prefix, nodes)
    for node in reversed(nodes):
        await node.broker.close()


def room_env(payload: bytes, origin: str, room: str = R) -> Envelope:
    return envelope(Kind.ROOM, room, payload, origin=origin)


async def sync_with(sender: CNode, receiver: CNode, token: bytes) -> None:
    """A marker on the receiver's node channel; once in, earlier sends on it are in too."""
    await sender.broker.publish(
        envelope(Kind.CONNECTION, receiver.conn(0xFFFF), token, origin=sender.id)
    )
    await receiver.inbox.wait_for_payload(token)


def rooms_on_every_master(local: LocalRedisCluster, prefix: str) -> dict[int, str]:
    """Master port -> a room whose channel that master serves."""
    owners = local.slot_owners()
    found: dict[int, str] = {}
    for i in itertools.count():
        room = f"room{i}"
        found.setdefault(owners[key_slot(Keys(prefix).room_channel(room).encode())], room)
        if len(found) == local.masters:
            return found
    raise AssertionError("unreachable")


def shard_subscribers(local: LocalRedisCluster, port: int, channel: str) -> int:
    with local.client(port) as client:
        reply = client.execute_command("PUBSUB", "SHARDNUMSUB", channel)
    return int(reply[1])


# -- unit tests: URL, names, arguments (no Redis) ----------------------------------


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


def test_create_broker_picks_the_cluster_broker_by_scheme() -> None:
    """redis+cluster:// and rediss+cluster:// give a RedisClusterBroker satisfying Broker."""
    for url in ("redis+cluster://u:p@h1:1,h2:2", "rediss+cluster://h:1/"):
        broker = create_broker(url, prefix="p", heartbeat_interval=0.5, presence_ttl=2)
        assert isinstance(broker, RedisClusterBroker)
        assert isinstance(broker, Broker)
        assert broker.has_peers and not broker.connected
    with pytest.raises(ValueError, match="redis\\+cluster://"):
        create_broker("cluster://h:1")


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


def test_invalid_timing_is_refused() -> None:
    """presence_ttl must exceed heartbeat_interval, as for RedisBroker."""
    with pytest.raises(ValueError, match="presence_ttl"):
        RedisClusterBroker("redis+cluster://h:1", heartbeat_interval=2.0, presence_ttl=2.0)
    with pytest.raises(TypeError, match="reconnect_max_delay"):
        RedisClusterBroker("redis+cluster://h:1", reconnect_max_delay="1")  # type: ignore[arg-type]


# -- real cluster: routing ----------------------------------------------------------


async def test_rooms_on_different_shards_each_travel_on_their_own_master(
    make_node: MakeNode, shared_cluster: LocalRedisCluster, prefix: str
) -> None:
    """Each room's channel is SSUBSCRIBEd on the master of its slot only, and delivered."""
    a, b, c = await make_node("a"), await make_node("b"), await make_node("c")
    rooms = rooms_on_every_master(shared_cluster, prefix)
    for room in rooms.values():
        await b.broker.subscribe(Room(room))
    for port, room in rooms.items():
        channel = Keys(prefix).room_channel(room)
        assert shard_subscribers(shared_cluster, port, channel) == 1
        for other in set(rooms) - {port}:
            assert shard_subscribers(shared_cluster, other, channel) == 0
        await a.broker.publish(room_env(room.encode(), a.id, room))
    await b.inbox.wait_until(lambda: len(b.inbox.envelopes) == len(rooms))
    assert sorted(b.inbox.payloads) == sorted(r.encode() for r in rooms.values())
    assert b.broker.received == len(rooms) and a.broker.published == len(rooms)
    # c, not subscribed, got none of it; nobody used classic (non-sharded) pub/sub
    await sync_with(a, c, b"marker")
    assert c.inbox.payloads == [b"marker"]
    for port in shared_cluster.master_ports():
        with shared_cluster.client(port) as client:
            assert client.execute_command("PUBSUB", "CHANNELS", f"{prefix}:*") == []


async def test_node_channel_everyone_channel_and_own_echo(make_node: MakeNode) -> None:
    """A send to b.7 reaches b only; a broadcast reaches the others; a ignores its echo."""
    a, b, c = await make_node("a"), await make_node("b"), await make_node("c")
    await a.broker.publish(envelope(Kind.CONNECTION, b.conn(7), b"for-b", origin=a.id))
    await b.inbox.wait_for_payload(b"for-b")
    await a.broker.publish(envelope(Kind.ALL, "", b"everyone", origin=a.id, exclude="b.1"))
    await b.inbox.wait_for_payload(b"everyone")
    await c.inbox.wait_for_payload(b"everyone")
    assert c.inbox.payloads == [b"everyone"]
    assert b.inbox.envelopes[1].exclude == "b.1"
    await sync_with(b, a, b"marker")
    assert a.inbox.payloads == [b"marker"]


async def test_unsubscribe_and_call_order(
    make_node: MakeNode, shared_cluster: LocalRedisCluster, prefix: str
) -> None:
    """After unsubscribe no more traffic; racing calls end in the state of the last one."""
    a, b = await make_node("a"), await make_node("b")
    channel = Keys(prefix).room_channel(R)
    master = shared_cluster.master_of(channel)
    await b.broker.subscribe(R)
    await a.broker.publish(room_env(b"one", a.id))
    await b.inbox.wait_for_payload(b"one")
    await b.broker.unsubscribe(R)
    await a.broker.publish(room_env(b"two", a.id))
    await sync_with(a, b, b"marker")
    assert b.inbox.payloads == [b"one", b"marker"]
    await asyncio.gather(b.broker.subscribe(R), b.broker.unsubscribe(R), b.broker.subscribe(R))
    assert shard_subscribers(shared_cluster, master, channel) == 1
    await asyncio.gather(b.broker.unsubscribe(R), b.broker.subscribe(R), b.broker.unsubscribe(R))
    await eventually(lambda: shard_subscribers(shared_cluster, master, channel) == 0)


async def test_concurrent_publishes_keep_order_per_room(make_node: MakeNode) -> None:
    """Hundreds of concurrent publishes over two rooms arrive in order, in few pipelines."""
    a, b = await make_node("a"), await make_node("b")
    await b.broker.subscribe(Room("x"))
    await b.broker.subscribe(Room("y"))
    batches = a.broker._pipeliner.batches
    await asyncio.gather(*(
        a.broker.publish(room_env(f"{room}{i}".encode(), a.id, room))
        for i in range(300) for room in ("x", "y")
    ))
    await b.inbox.wait_until(lambda: len(b.inbox.envelopes) >= 600)
    for room in ("x", "y"):
        got = [e.payload for e in b.inbox.envelopes if e.target == room]
        assert got == [f"{room}{i}".encode() for i in range(300)]
    assert a.broker._pipeliner.batches - batches <= 10


async def test_garbage_on_a_room_channel_is_dropped_and_counted(
    make_node: MakeNode, shared_cluster: LocalRedisCluster, prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Raw garbage SPUBLISHed on the room's shard is dropped, counted, logged; no reconnect."""
    a, b = await make_node("a"), await make_node("b")
    await b.broker.subscribe(R)
    channel = Keys(prefix).room_channel(R)
    garbage = [
        b"\xc1not msgpack",
        msgpack.packb({"kind": 1}),
        msgpack.packb([1, 1, "a", "lobby", "", False, b"\xff", 0.0]),  # text, not UTF-8
    ]
    with caplog.at_level(logging.WARNING, logger="roomcast.broker.redis_cluster"):
        with shared_cluster.client(shared_cluster.master_of(channel)) as raw:
            for data in garbage:
                assert raw.execute_command("SPUBLISH", channel, data) == 1
        await a.broker.publish(room_env(b"valid", a.id))
        await b.inbox.wait_for_payload(b"valid")
    assert b.broker.dropped == len(garbage)
    assert b.inbox.payloads == [b"valid"]
    assert b.broker.connected and b.broker.reconnects == 0
    assert any("invalid envelope" in r.getMessage() for r in caplog.records)


# -- real cluster: presence ---------------------------------------------------------


async def test_presence_is_shared_across_nodes_in_one_slot(
    make_node: MakeNode, shared_cluster: LocalRedisCluster, prefix: str
) -> None:
    """Members added on two nodes are seen by both; every presence key is on one master."""
    a, b = await make_node("a"), await make_node("b")
    await a.broker.add_presence(R, a.conn(1))
    await b.broker.add_presence(R, b.conn(1))
    await b.broker.add_presence(Room("other"), b.conn(1))
    assert await a.broker.room_members(R) == {"a.1", "b.1"}
    assert await b.broker.room_members(R) == {"a.1", "b.1"}
    keys = Keys(prefix, cluster=True)
    with shared_cluster.client(shared_cluster.master_of(keys.nodes)) as client:
        assert client.hgetall(keys.presence(R)) == {b"a.1": b"a", b"b.1": b"b"}
        assert client.smembers(keys.node_rooms("b")) == {b"lobby", b"other"}
        assert client.zscore(keys.nodes, "a") is not None
    await b.broker.remove_presence(b.conn(1), [R, Room("other")])
    assert await a.broker.room_members(R) == {"a.1"}
    assert await a.broker.room_members(Room("other")) == set()
    await b.broker.close()
    with shared_cluster.client(shared_cluster.master_of(keys.nodes)) as client:
        assert client.zscore(keys.nodes, "b") is None
        assert not client.exists(keys.node_rooms("b"))


_CRASHING_NODE = """
import asyncio, sys
from roomcast.broker.redis_cluster import RedisClusterBroker
from roomcast.shared.ids import ConnectionId, NodeId, Room

async def main() -> None:
    broker = RedisClusterBroker(sys.argv[1], prefix=sys.argv[2], heartbeat_interval=0.1,
                                presence_ttl=0.5)
    await broker.start(NodeId("doomed"), lambda envelope: None)
    await broker.add_presence(Room("lobby"), ConnectionId("doomed.1"))
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_killed_node_is_swept_within_ttl_plus_interval(
    make_node: MakeNode, shared_cluster: LocalRedisCluster, prefix: str
) -> None:
    """A node process killed with SIGKILL leaves room_members and Redis within ttl+interval."""
    ttl, interval = 0.5, 0.1
    a = await make_node("a", heartbeat_interval=interval, presence_ttl=ttl)
    await a.broker.add_presence(R, a.conn(1))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CRASHING_NODE, shared_cluster.url, prefix, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            assert (await proc.stdout.readline()).strip() == b"ready"
        assert await a.broker.room_members(R) == {"a.1", "doomed.1"}
        proc.kill()
        await proc.wait()
        killed_at = time.monotonic()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    keys = Keys(prefix, cluster=True)

    async def only_a() -> bool:
        return await a.broker.room_members(R) == {"a.1"}

    def swept() -> bool:
        with shared_cluster.client(shared_cluster.master_of(keys.nodes)) as client:
            return client.zscore(keys.nodes, "doomed") is None and not client.hexists(
                keys.presence(R), "doomed.1"
            )

    await eventually(only_a, timeout=5)
    left_members = time.monotonic() - killed_at
    await eventually(swept, timeout=5)
    swept_after = time.monotonic() - killed_at
    slack = 0.5  # scheduling on a busy test machine
    assert left_members <= ttl + slack
    assert swept_after <= ttl + interval + slack


async def test_node_swept_while_alive_re_registers_itself(
    make_node: MakeNode, shared_cluster: LocalRedisCluster, prefix: str
) -> None:
    """If peers swept a live node (e.g. after a pause), its next heartbeat restores it."""
    a, b = await make_node("a"), await make_node("b")
    await b.broker.add_presence(R, b.conn(1))
    keys = Keys(prefix, cluster=True)
    with shared_cluster.client(shared_cluster.master_of(keys.nodes)) as client:
        client.zrem(keys.nodes, "b")
        client.hdel(keys.presence(R), "b.1")

    async def restored() -> bool:
        return await a.broker.room_members(R) == {"b.1"}

    await eventually(restored, timeout=5)


# -- ClusterPublisher ---------------------------------------------------------------


async def test_cluster_publisher_reaches_rooms_connections_everyone_and_reads_presence(
    make_node: MakeNode, shared_cluster: LocalRedisCluster, prefix: str
) -> None:
    """ClusterPublisher does what Publisher does, on the cluster."""
    a, b = await make_node("a"), await make_node("b")
    await a.broker.subscribe(R)
    await b.broker.add_presence(R, b.conn(1))
    async with ClusterPublisher(shared_cluster.url, prefix=prefix, presence_ttl=0.5) as pub:
        await pub.publish_to_room(R, "héllo", exclude="a.1")
        await pub.send_to_connection("b.2a", b"\x00\x01")
        await pub.broadcast("to all")
        assert await pub.room_members(R) == {"b.1"} and await pub.room_size("none") == 0
        assert pub.published == 3
        with pytest.raises(TypeError, match="str or bytes"):
            await pub.broadcast(42)  # type: ignore[arg-type]
    await a.inbox.wait_until(lambda: len(a.inbox.envelopes) == 2)
    room, everyone = a.inbox.envelopes
    assert (room.kind, room.payload, room.exclude, room.origin) == (
        Kind.ROOM, "héllo".encode(), "a.1", ""
    )
    assert everyone.payload == b"to all"
    await b.inbox.wait_until(lambda: len(b.inbox.envelopes) == 2)
    assert [e.payload for e in b.inbox.envelopes] == [b"\x00\x01", b"to all"]
    with pytest.raises(BrokerError, match="closed"):
        await pub.broadcast("x")


# -- own cluster: failures and recovery ---------------------------------------------


async def test_cluster_down_fails_publishes_then_everything_recovers(
    make_own_node: MakeNode, own_cluster: LocalRedisCluster, prefix: str
) -> None:
    """Every node killed: publish raises PublishError (counted), presence reads BrokerError,
    presence calls do not raise; restarted: subscriptions and presence come back."""
    a, b = await make_own_node("a"), await make_own_node("b")
    rooms = list(rooms_on_every_master(own_cluster, prefix).values())
    for room in rooms:
        await b.broker.subscribe(Room(room))
    await a.broker.add_presence(R, a.conn(1))
    for server in own_cluster.servers:
        server.kill()
    with pytest.raises(PublishError, match="unreachable"):
        await a.broker.publish(room_env(b"lost", a.id, rooms[0]))
    assert a.broker.publish_failures == 1
    with pytest.raises(BrokerError, match="unreachable"):
        await a.broker.room_members(R)
    await eventually(lambda: not a.broker.connected and not b.broker.connected)
    await a.broker.add_presence(R, a.conn(2))
    await a.broker.remove_presence(a.conn(1), [R])
    async with ClusterPublisher(own_cluster.url, prefix=prefix) as pub:
        with pytest.raises(PublishError, match="unreachable"):
            await pub.broadcast("x")
        assert pub.publish_failures == 1

    for server in own_cluster.servers:
        server.start()  # same ports and nodes.conf: the same cluster, empty
    own_cluster.wait_until_ok()
    await eventually(lambda: a.broker.connected and b.broker.connected, timeout=20)
    assert a.broker.reconnects >= 1 and b.broker.reconnects >= 1

    async def presence_back() -> bool:
        return await b.broker.room_members(R) == {"a.2"}

    await eventually(presence_back, timeout=10)
    for room in rooms:
        await a.broker.publish(room_env(room.encode(), a.id, room))
    await b.inbox.wait_until(lambda: len(b.inbox.envelopes) == len(rooms))


async def test_pubsub_client_kill_resubscribes_everything(
    make_own_node: MakeNode, own_cluster: LocalRedisCluster, prefix: str
) -> None:
    """CLIENT KILL TYPE pubsub on every master: links rebuilt, counted, channels re-joined."""
    a, b = await make_own_node("a"), await make_own_node("b")
    rooms = list(rooms_on_every_master(own_cluster, prefix).values())
    for room in rooms:
        await b.broker.subscribe(Room(room))
    for port in own_cluster.master_ports():
        with own_cluster.client(port) as client:
            client.client_kill_filter(_type="pubsub")
    await eventually(lambda: b.broker.reconnects >= 1 and b.broker.connected)
    for room in rooms:
        await a.broker.publish(room_env(room.encode(), a.id, room))
    await a.broker.publish(envelope(Kind.CONNECTION, b.conn(1), b"direct", origin=a.id))
    await a.broker.publish(envelope(Kind.ALL, "", b"all", origin=a.id))
    await b.inbox.wait_until(lambda: len(b.inbox.envelopes) == len(rooms) + 2)


async def test_frozen_master_fails_only_its_rooms_and_recovers(
    make_own_node: MakeNode, own_cluster: LocalRedisCluster, prefix: str
) -> None:
    """A SIGSTOPped master: its rooms' publishes fail within the bound, other rooms still
    flow, the link is dropped; after SIGCONT everything is back."""
    timing = {"socket_timeout": 0.5, "health_check_interval": 0.2}
    a, b = await make_own_node("a", **timing), await make_own_node("b", **timing)
    rooms = rooms_on_every_master(own_cluster, prefix)
    presence_master = own_cluster.master_of(Keys(prefix, cluster=True).nodes)
    frozen_port = next(p for p in rooms if p != presence_master)
    for room in rooms.values():
        await b.broker.subscribe(Room(room))
    frozen = own_cluster.server(frozen_port)
    frozen.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(PublishError, match="unreachable"):
            await a.broker.publish(room_env(b"frozen", a.id, rooms[frozen_port]))
        assert time.monotonic() - started <= 2 * 0.5 + 0.5
        alive = next(p for p in rooms if p != frozen_port)
        await a.broker.publish(room_env(b"alive", a.id, rooms[alive]))
        await b.inbox.wait_for_payload(b"alive")
        await eventually(lambda: not b.broker.connected, timeout=0.2 + 0.5 + 1.5)
    finally:
        frozen.thaw()
    await eventually(lambda: a.broker.connected and b.broker.connected, timeout=15)
    await a.broker.publish(room_env(b"thawed", a.id, rooms[frozen_port]))
    await b.inbox.wait_for_payload(b"thawed")


async def test_password_cluster_works_and_a_wrong_one_fails_start(
    own_cluster: LocalRedisCluster, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """user/password in the URL authenticate on every master; a wrong password is a clear
    BrokerError at start; the password appears in no error and no log line."""
    for port in own_cluster.ports:
        with own_cluster.client(port) as client:
            client.config_set("requirepass", "pw-secret")
    hosts = ",".join(f"127.0.0.1:{p}" for p in own_cluster.ports)
    good = RedisClusterBroker(f"redis+cluster://:pw-secret@{hosts}", prefix=prefix, **FAST)
    other = RedisClusterBroker(f"redis+cluster://default:pw-secret@{hosts}", prefix=prefix,
                               **FAST)
    bad = RedisClusterBroker(f"redis+cluster://:wrong-one@{hosts}", prefix=prefix, **FAST)
    inbox = Inbox()
    with caplog.at_level(logging.DEBUG, logger="roomcast"):
        try:
            await good.start(NodeId("a"), Inbox())
            await other.start(NodeId("b"), inbox)
            await other.subscribe(R)
            await good.publish(room_env(b"authed", "a"))
            await inbox.wait_for_payload(b"authed")
            with pytest.raises(BrokerError, match="credentials") as failure:
                await bad.start(NodeId("c"), Inbox())
        finally:
            for broker in (good, other, bad):
                await broker.close()
    assert "wrong-one" not in str(failure.value)
    assert not any("pw-secret" in r.getMessage() or "wrong-one" in r.getMessage()
                   for r in caplog.records)


async def test_start_fails_fast_when_the_cluster_is_unreachable(
    own_cluster: LocalRedisCluster,
) -> None:
    """start() raises BrokerError naming the nodes (no password) when none answers."""
    url = own_cluster.url.replace("redis+cluster://", "redis+cluster://:pw-secret@")
    for server in own_cluster.servers:
        server.kill()
    broker = RedisClusterBroker(url)
    started = time.monotonic()
    with pytest.raises(BrokerError, match="unreachable") as failure:
        await broker.start(NodeId("a"), Inbox())
    assert time.monotonic() - started < 5
    assert "pw-secret" not in str(failure.value)
    assert f"127.0.0.1:{own_cluster.ports[0]}" in str(failure.value)
    await broker.close()
