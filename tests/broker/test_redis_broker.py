"""RedisBroker on both transports: a real redis-server ``[redis]`` and a real 3-master
Redis Cluster ``[cluster]`` run the same test bodies; unit tests of names and settings.

Behaviour only one transport has lives in test_single_server.py and test_redis_cluster.py;
failover and slot migration in tests/e2e/test_redis_cluster.py.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

import msgpack
import pytest

from roomcast.broker import RedisClusterBroker, create_broker
from roomcast.broker._cluster import ClusterTransport
from roomcast.broker._keys import Keys
from roomcast.broker._scripts import filter_alive
from roomcast.broker._single import SingleTransport
from roomcast.broker._urls import redact_url
from roomcast.broker.base import Broker
from roomcast.broker.redis import RedisBroker
from roomcast.shared.envelope import Envelope, Kind
from roomcast.shared.errors import BrokerError, PublishError
from roomcast.shared.ids import ConnectionId, NodeId, Room
from tests.broker.helpers import (
    CLOSE_BOUND,
    CLOSE_TIMING,
    Backend,
    Inbox,
    envelope,
    eventually,
    sync_with,
)

ROOT = Path(__file__).resolve().parents[2]
R = Room("lobby")


def room_env(payload: bytes, origin: str, room: str = R) -> Envelope:
    return envelope(Kind.ROOM, room, payload, origin=origin)


# -- unit tests: names, URLs, settings, presence filtering (no Redis) ------------------


def test_channel_and_key_names_carry_the_prefix() -> None:
    """Every channel and key is spelled {prefix}:...; each kind routes to one channel."""
    keys = Keys("app1")
    assert keys.room_channel("lobby") == "app1:room:lobby"
    assert keys.node_channel("abc") == "app1:node:abc"
    assert keys.all_channel == "app1:all"
    assert keys.presence("lobby") == "app1:presence:lobby"
    assert keys.node_rooms("abc") == "app1:node-rooms:abc"
    assert keys.nodes == "app1:nodes"
    assert keys.channel_for(envelope(Kind.ROOM, "lobby", b"x")) == "app1:room:lobby"
    assert keys.channel_for(envelope(Kind.CONNECTION, "abc.1f", b"x")) == "app1:node:abc"
    assert keys.channel_for(envelope(Kind.ALL, "", b"x")) == "app1:all"


@pytest.mark.parametrize("prefix", ["", "a:b", "with space", "x" * 65])
def test_prefix_that_could_collide_is_refused(prefix: str) -> None:
    """A prefix with ':' (or empty, or odd characters) is a ValueError, not a silent clash."""
    with pytest.raises(ValueError, match="prefix"):
        Keys(prefix)


def test_urls_are_redacted_for_logs() -> None:
    """Passwords in the user info or the query never reach a log line or an error."""
    assert redact_url("redis://user:s3cret@h:6379/2") == "redis://user:***@h:6379/2"
    assert redact_url("rediss://:s3cret@h:6380/0") == "rediss://:***@h:6380/0"
    assert "s3cret" not in redact_url("unix:///run/redis.sock?db=1&password=s3cret")
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url("redis+cluster://:s3cret@h1:1,h2:2") == "redis+cluster://:***@h1:1,h2:2"


@pytest.mark.parametrize(
    ("url", "transport"),
    [
        ("redis://u:p@h:1/3", SingleTransport),
        ("rediss://h:1/0", SingleTransport),
        ("unix:///tmp/r.sock?db=2", SingleTransport),
        ("redis+cluster://u:p@h1:1,h2:2", ClusterTransport),
        ("rediss+cluster://h:1/", ClusterTransport),
        ("REDIS+CLUSTER://h:1", ClusterTransport),
    ],
)
def test_create_broker_picks_the_transport_by_scheme(url: str, transport: type) -> None:
    """Every Redis scheme gives a RedisBroker satisfying Broker, over the transport its
    scheme names; the old cluster name is the same class."""
    broker = create_broker(url, prefix="p", heartbeat_interval=0.5, presence_ttl=2)
    assert isinstance(broker, RedisBroker) and isinstance(broker, RedisClusterBroker)
    assert isinstance(broker, Broker)
    assert isinstance(broker._transport, transport)
    assert broker.has_peers and not broker.connected
    assert broker.stats.published == broker.stats.reconnects == 0


def test_create_broker_refuses_an_unknown_scheme() -> None:
    """A scheme roomcast does not know is a ValueError listing the ones it does."""
    with pytest.raises(ValueError, match="redis\\+cluster://"):
        create_broker("cluster://h:1")


@pytest.mark.parametrize("url", ["redis://h:1/0", "redis+cluster://h:1"])
def test_invalid_timing_is_refused(url: str) -> None:
    """presence_ttl must exceed heartbeat_interval, else live nodes would be swept; every
    timing must be a positive number."""
    with pytest.raises(ValueError, match="presence_ttl"):
        RedisBroker(url, heartbeat_interval=2.0, presence_ttl=2.0)
    with pytest.raises(ValueError, match="reconnect_max_delay"):
        RedisBroker(url, reconnect_max_delay=0)
    with pytest.raises(TypeError, match="reconnect_max_delay"):
        RedisBroker(url, reconnect_max_delay="1")  # type: ignore[arg-type]


def test_backoff_is_jittered_and_capped() -> None:
    """Reconnect delays start near 0.1 s, grow, vary, and never exceed the cap."""
    broker = RedisBroker("redis://h:1/0", reconnect_max_delay=2.0)
    first = [broker._backoff(0) for _ in range(50)]
    assert all(0.05 <= d <= 0.1 for d in first) and len(set(first)) > 1
    assert all(d <= 2.0 for d in (broker._backoff(n) for n in range(2000)))
    assert min(broker._backoff(40) for _ in range(50)) >= 1.0


def test_presence_filter_keeps_only_fresh_nodes() -> None:
    """Members whose node's heartbeat is older than the ttl are left out."""
    members = {b"a.1": b"a", b"a.2": b"a", b"b.1": b"b", b"c.1": b"c"}
    scores = [(b"a", 99.5), (b"b", 90.0)]  # c has no entry at all
    assert filter_alive(members, scores, now=100.0, presence_ttl=5.0) == {"a.1", "a.2"}


# -- routing -------------------------------------------------------------------------


async def test_room_envelope_reaches_only_subscribed_nodes(backend: Backend) -> None:
    """A room publish reaches a node subscribed to the room and not one that is not."""
    a, b, c = await backend.node("a"), await backend.node("b"), await backend.node("c")
    await b.broker.subscribe(R)
    await a.broker.publish(room_env(b"hello", a.id))
    await b.inbox.wait_for_payload(b"hello")
    await sync_with(a, c, b"marker")
    assert c.inbox.payloads == [b"marker"]
    got = b.inbox.envelopes[0]
    assert (got.kind, got.target, got.origin, got.binary) == (Kind.ROOM, R, "a", False)
    assert a.broker.stats.published == 2 and b.broker.stats.received == 1


async def test_room_not_received_after_unsubscribe(backend: Backend) -> None:
    """After unsubscribe, the room's envelopes no longer reach the node."""
    a, b = await backend.node("a"), await backend.node("b")
    await b.broker.subscribe(R)
    await a.broker.publish(room_env(b"one", a.id))
    await b.inbox.wait_for_payload(b"one")
    await b.broker.unsubscribe(R)
    await a.broker.publish(room_env(b"two", a.id))
    await sync_with(a, b, b"marker")
    assert b.inbox.payloads == [b"one", b"marker"]


async def test_connection_envelope_reaches_owning_node_only(backend: Backend) -> None:
    """A send to connection b.7 goes to node b's channel and nowhere else."""
    a, b, c = await backend.node("a"), await backend.node("b"), await backend.node("c")
    await a.broker.publish(envelope(Kind.CONNECTION, b.conn(7), b"for-b", origin=a.id))
    await b.inbox.wait_for_payload(b"for-b")
    assert b.inbox.envelopes[0].target == "b.7"
    await sync_with(a, c, b"marker")
    assert c.inbox.payloads == [b"marker"]


async def test_all_reaches_every_other_node_and_own_echo_is_ignored(backend: Backend) -> None:
    """A broadcast to everyone reaches every other node; the publisher ignores its echo."""
    a, b, c = await backend.node("a"), await backend.node("b"), await backend.node("c")
    await a.broker.publish(envelope(Kind.ALL, "", b"everyone", origin=a.id, exclude="b.1"))
    await b.inbox.wait_for_payload(b"everyone")
    await c.inbox.wait_for_payload(b"everyone")
    assert b.inbox.envelopes[0].exclude == "b.1"
    await sync_with(b, a, b"marker")  # a's echo was queued to a before this marker
    assert a.inbox.payloads == [b"marker"]
    assert a.broker.stats.received == 1


async def test_concurrent_publishes_arrive_in_order_per_room(backend: Backend) -> None:
    """Hundreds of concurrent publishes over two rooms all arrive, each room in publish
    order; on a cluster they go in few pipelines (the single server's publish link is
    proved in test_publish_link.py)."""
    a, b = await backend.node("a"), await backend.node("b")
    await b.broker.subscribe(Room("x"))
    await b.broker.subscribe(Room("y"))
    transport = a.broker._transport
    batches = transport._pipeliner.batches if isinstance(transport, ClusterTransport) else 0
    count = 300
    await asyncio.gather(*(
        a.broker.publish(room_env(f"{room}{i}".encode(), a.id, room))
        for i in range(count) for room in ("x", "y")
    ))
    await b.inbox.wait_until(lambda: len(b.inbox.envelopes) >= 2 * count)
    for room in ("x", "y"):
        got = [e.payload for e in b.inbox.envelopes if e.target == room]
        assert got == [f"{room}{i}".encode() for i in range(count)]
    assert a.broker.stats.published == 2 * count
    if isinstance(transport, ClusterTransport):
        assert transport._pipeliner.batches - batches <= 10


async def test_sequential_publishes_from_tasks_keep_order_per_publisher(
    backend: Backend,
) -> None:
    """Two tasks publishing in turn to two rooms: each room's order is the publish order."""
    a, b = await backend.node("a"), await backend.node("b")
    await b.broker.subscribe(Room("x"))
    await b.broker.subscribe(Room("y"))

    async def run(room: str) -> None:
        for i in range(100):
            await a.broker.publish(room_env(f"{room}{i}".encode(), a.id, room))

    await asyncio.gather(run("x"), run("y"))
    await b.inbox.wait_until(lambda: len(b.inbox.envelopes) >= 200)
    for room in ("x", "y"):
        got = [e.payload for e in b.inbox.envelopes if e.target == room]
        assert got == [f"{room}{i}".encode() for i in range(100)]


async def test_garbage_on_a_room_channel_is_dropped_and_counted(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """Raw garbage on the channel is dropped, counted and logged; the next envelope arrives."""
    a, b = await backend.node("a"), await backend.node("b")
    await b.broker.subscribe(R)
    garbage = [
        b"\xc1not msgpack",
        msgpack.packb({"kind": 1}),
        msgpack.packb([1, [1], "a", "lobby", "", False, b"x", 0.0]),
        msgpack.packb([1, 1, "a", "lobby", "", False, b"\xff", 0.0]),  # text, not UTF-8
    ]
    with caplog.at_level(logging.WARNING, logger="roomcast.broker.redis"):
        for data in garbage:
            assert backend.raw_publish(backend.keys.room_channel(R), data) == 1
        await a.broker.publish(room_env(b"valid", a.id))
        await b.inbox.wait_for_payload(b"valid")
    assert b.broker.stats.dropped == len(garbage)
    assert b.inbox.payloads == [b"valid"]
    assert b.broker.connected and b.broker.stats.reconnects == 0
    # warnings are rate-limited to one a second, each saying how many were dropped so far
    assert any("invalid envelope" in r.getMessage() for r in caplog.records)


async def test_deliver_that_raises_does_not_stop_the_listener(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception from the deliver callback is logged; later envelopes still arrive."""
    a, b = await backend.node("a"), await backend.node("b")
    await b.broker.subscribe(R)
    seen: list[bytes] = []
    done = asyncio.Event()

    def fragile(env: Envelope) -> None:
        seen.append(env.payload)
        if env.payload == b"boom":
            raise RuntimeError("deliver bug")
        done.set()

    b.broker._deliver = fragile
    with caplog.at_level(logging.ERROR, logger="roomcast.broker.redis"):
        await a.broker.publish(room_env(b"boom", a.id))
        await a.broker.publish(room_env(b"after", a.id))
        async with asyncio.timeout(10):
            await done.wait()
    assert seen == [b"boom", b"after"]
    assert any("deliver callback raised" in r.getMessage() for r in caplog.records)
    assert b.broker.connected and b.broker.stats.reconnects == 0


async def test_subscription_calls_are_applied_in_call_order(backend: Backend) -> None:
    """Unawaited subscribe/unsubscribe calls for one room end in the state of the last call."""
    b = await backend.node("b")
    channel = backend.keys.room_channel(R)
    await asyncio.gather(b.broker.subscribe(R), b.broker.unsubscribe(R), b.broker.subscribe(R))
    assert backend.subscribers(channel) == 1
    await asyncio.gather(b.broker.unsubscribe(R), b.broker.subscribe(R), b.broker.unsubscribe(R))
    await eventually(lambda: backend.subscribers(channel) == 0)
    keys = backend.keys
    assert backend.channels() == {keys.node_channel("b").encode(), keys.all_channel.encode()}


async def test_prefixes_isolate_clusters_on_one_redis(backend: Backend) -> None:
    """Two prefixes on one Redis see neither each other's messages nor presence."""
    one, two = f"{backend.prefix}one", f"{backend.prefix}two"
    a1, c1 = await backend.node("a", prefix=one), await backend.node("c", prefix=one)
    b2, d2 = await backend.node("b", prefix=two), await backend.node("d", prefix=two)
    for node in (c1, b2):
        await node.broker.subscribe(R)
    await a1.broker.add_presence(R, a1.conn(1))
    await b2.broker.add_presence(R, b2.conn(1))
    await a1.broker.publish(room_env(b"one-room", a1.id))
    await a1.broker.publish(envelope(Kind.ALL, "", b"one-all", origin=a1.id))
    await c1.inbox.wait_until(lambda: len(c1.inbox.envelopes) == 2)
    await sync_with(d2, b2, b"two-marker")
    assert b2.inbox.payloads == [b"two-marker"]
    assert await a1.broker.room_members(R) == {"a.1"}
    assert await b2.broker.room_members(R) == {"b.1"}


# -- presence ------------------------------------------------------------------------


async def test_presence_is_shared_across_nodes(backend: Backend) -> None:
    """Members added on two nodes are seen by both, and stored where the keys say (on a
    cluster: every presence key on the one master of the prefix's slot)."""
    a, b = await backend.node("a"), await backend.node("b")
    await a.broker.add_presence(R, a.conn(1))
    await b.broker.add_presence(R, b.conn(1))
    await b.broker.add_presence(Room("other"), b.conn(1))
    assert await a.broker.room_members(R) == {"a.1", "b.1"}
    assert await b.broker.room_members(R) == {"a.1", "b.1"}
    keys = backend.keys
    with backend.client(keys.nodes) as client:
        assert client.hgetall(keys.presence(R)) == {b"a.1": b"a", b"b.1": b"b"}
        assert client.smembers(keys.node_rooms("b")) == {b"lobby", b"other"}
        assert client.zscore(keys.nodes, "a") is not None
    await b.broker.remove_presence(b.conn(1), [R, Room("other")])
    assert await a.broker.room_members(R) == {"a.1"}
    assert await a.broker.room_members(Room("other")) == set()


async def test_presence_read_leaves_out_members_of_dead_nodes(backend: Backend) -> None:
    """room_members reads members and node scores together: a member whose node is
    stale or unknown is left out even before a peer sweeps it."""
    a = await backend.node("a", heartbeat_interval=5.0, presence_ttl=30.0)
    keys = backend.keys
    with backend.client(keys.nodes) as client:
        seconds, micros = client.time()
        now = seconds + micros / 1e6
        client.zadd(keys.nodes, {"alive": now - 1, "stale": now - 60})
        client.hset(keys.presence("r"),
                    mapping={"alive.1": "alive", "stale.1": "stale", "gone.1": "gone"})
    assert await a.broker.room_members(Room("r")) == {"alive.1"}
    assert await a.broker.room_members(Room("empty")) == set()


async def test_presence_refuses_a_connection_of_another_node(backend: Backend) -> None:
    """A node can only register its own connections (the id names the owner)."""
    a = await backend.node("a")
    with pytest.raises(ValueError, match="belongs to node b"):
        await a.broker.add_presence(R, ConnectionId("b.1"))


async def test_close_removes_presence_and_node_entry(backend: Backend) -> None:
    """close() withdraws all of the node's presence and its heartbeat entry; twice is fine."""
    a, b = await backend.node("a"), await backend.node("b")
    await a.broker.add_presence(R, a.conn(1))
    await b.broker.add_presence(R, b.conn(1))
    await b.broker.add_presence(Room("two"), b.conn(2))
    await b.broker.close()
    await b.broker.close()
    assert await a.broker.room_members(R) == {"a.1"}
    keys = backend.keys
    with backend.client(keys.nodes) as client:
        assert client.zscore(keys.nodes, "b") is None
        assert client.hgetall(keys.presence(R)) == {b"a.1": b"a"}
        assert not client.exists(keys.presence("two"), keys.node_rooms("b"))
    assert not b.broker.connected
    with pytest.raises(BrokerError, match="closed"):
        await b.broker.publish(room_env(b"x", "b"))


_CRASHING_NODE = """
import asyncio, sys
from roomcast.broker import RedisBroker
from roomcast.shared.ids import ConnectionId, NodeId, Room

async def main() -> None:
    broker = RedisBroker(sys.argv[1], prefix=sys.argv[2], heartbeat_interval=0.1,
                         presence_ttl=0.5)
    await broker.start(NodeId("doomed"), lambda envelope: None)
    await broker.add_presence(Room("lobby"), ConnectionId("doomed.1"))
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_killed_node_vanishes_within_ttl_plus_interval(backend: Backend) -> None:
    """A node process killed with SIGKILL leaves room_members and Redis within ttl+interval."""
    ttl, interval = 0.5, 0.1
    a = await backend.node("a", heartbeat_interval=interval, presence_ttl=ttl)
    await a.broker.add_presence(R, a.conn(1))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CRASHING_NODE, backend.url, backend.prefix, cwd=ROOT,
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
    keys = backend.keys

    async def only_a() -> bool:
        return await a.broker.room_members(R) == {"a.1"}

    def swept() -> bool:
        with backend.client(keys.nodes) as client:
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


async def test_node_swept_while_alive_re_registers_itself(backend: Backend) -> None:
    """If peers swept a live node (e.g. after a pause), its next heartbeat restores it."""
    a, b = await backend.node("a"), await backend.node("b")
    await b.broker.add_presence(R, b.conn(1))
    keys = backend.keys
    with backend.client(keys.nodes) as client:
        client.zrem(keys.nodes, "b")
        client.hdel(keys.presence(R), "b.1")

    async def restored() -> bool:
        return await a.broker.room_members(R) == {"b.1"}

    await eventually(restored, timeout=5)


# -- failures and recovery -----------------------------------------------------------


async def test_redis_down_fails_publishes_then_everything_recovers(own_backend: Backend) -> None:
    """Redis (every master) killed: publish raises PublishError naming where (counted), then
    fails fast; presence reads raise BrokerError; presence and subscription calls do not
    raise. Restarted empty: every channel re-subscribed and presence re-registered before
    the broker reports itself connected; delivery resumes by itself."""
    backend = own_backend
    a, b = await backend.node("a"), await backend.node("b")
    rooms = [Room(r) for r in backend.room_on_each_master()]
    for room in rooms:
        await b.broker.subscribe(room)
    await a.broker.add_presence(R, a.conn(1))
    await b.broker.add_presence(R, b.conn(1))

    backend.kill()
    with pytest.raises(PublishError, match="unreachable") as failure:
        await a.broker.publish(room_env(b"lost", a.id, rooms[0]))
    assert f"127.0.0.1:{backend.servers[0].port}" in str(failure.value)
    assert a.broker.stats.publish_failures == 1
    started = time.monotonic()
    with pytest.raises(PublishError, match="failing fast"):
        await a.broker.publish(room_env(b"lost", a.id, rooms[0]))
    assert time.monotonic() - started < 0.5  # no wait for a timeout this time
    assert a.broker.stats.publish_failures == 2
    await eventually(lambda: not a.broker.connected and not b.broker.connected)
    with pytest.raises(BrokerError, match="unreachable"):
        await a.broker.room_members(R)
    # none of these raise while Redis is away; they are applied on reconnect
    await a.broker.add_presence(R, a.conn(2))
    await a.broker.remove_presence(a.conn(1), [R])
    await b.broker.subscribe(Room("late"))
    async with backend.publisher() as pub:
        with pytest.raises(PublishError, match="unreachable"):
            await pub.broadcast("x")
        assert pub.publish_failures == 1

    backend.restart()  # same ports, empty: no persistence
    await eventually(lambda: a.broker.connected and b.broker.connected, timeout=20)
    assert a.broker.stats.reconnects >= 1 and b.broker.stats.reconnects >= 1
    assert b.broker.stats.resubscribes >= len(rooms) + 3  # node, everyone, rooms, late
    # presence is re-registered before a broker reports itself connected
    assert await b.broker.room_members(R) == {"a.2", "b.1"}
    for room in [*rooms, Room("late")]:
        await a.broker.publish(room_env(room.encode(), a.id, room))
    await b.inbox.wait_until(lambda: len(b.inbox.envelopes) == len(rooms) + 1)
    expected = [r.encode() for r in [*rooms, "late"]]
    if backend.cluster:  # channels on different masters: no order between them
        assert sorted(b.inbox.payloads) == sorted(expected)
    else:
        assert b.inbox.payloads == expected


async def test_pubsub_client_kill_triggers_reconnect_and_resubscribe(
    own_backend: Backend,
) -> None:
    """CLIENT KILL TYPE pubsub on every server: the links are rebuilt, counted, and every
    channel (rooms, node, everyone) re-joined."""
    backend = own_backend
    a, b = await backend.node("a"), await backend.node("b")
    rooms = backend.room_on_each_master()
    for room in rooms:
        await b.broker.subscribe(Room(room))
    backend.kill_pubsub_clients()
    await eventually(lambda: b.broker.stats.reconnects >= 1 and b.broker.connected)
    if not backend.cluster:
        assert b.broker.stats.reconnects == 1  # one link, one reconnect
    for room in rooms:
        await a.broker.publish(room_env(room.encode(), a.id, room))
    await a.broker.publish(envelope(Kind.CONNECTION, b.conn(1), b"direct", origin=a.id))
    await a.broker.publish(envelope(Kind.ALL, "", b"all", origin=a.id))
    await b.inbox.wait_until(lambda: len(b.inbox.envelopes) >= len(rooms) + 2)
    expected = [r.encode() for r in rooms] + [b"direct", b"all"]
    if backend.cluster:  # channels on different masters: no order between them
        assert sorted(b.inbox.payloads) == sorted(expected)
    else:
        assert b.inbox.payloads == expected


async def test_output_buffer_limit_disconnect_is_survived(own_backend: Backend) -> None:
    """Redis closing a slow subscriber (pubsub output buffer limit) leads to a reconnect."""
    backend = own_backend
    a, b = await backend.node("a"), await backend.node("b")
    await b.broker.subscribe(R)
    backend.config_set("client-output-buffer-limit", "pubsub 1kb 0 0")
    await a.broker.publish(room_env(b"x" * 200_000, a.id))
    backend.config_set("client-output-buffer-limit", "pubsub 32mb 8mb 60")
    await eventually(lambda: b.broker.stats.reconnects >= 1 and b.broker.connected)
    await a.broker.publish(room_env(b"small", a.id))
    await b.inbox.wait_for_payload(b"small")


async def test_frozen_redis_is_detected_and_survived(own_backend: Backend) -> None:
    """SIGSTOPped Redis: publish fails within its bound, the link drops, then recovers."""
    backend = own_backend
    timing = {"socket_timeout": 0.5, "health_check_interval": 0.2}
    a, b = await backend.node("a", **timing), await backend.node("b", **timing)
    await b.broker.subscribe(R)
    backend.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(PublishError, match="unreachable"):
            await a.broker.publish(room_env(b"frozen", a.id))
        assert time.monotonic() - started <= 2 * 0.5 + 0.5
        await eventually(lambda: not b.broker.connected, timeout=0.2 + 0.5 + 1.5)
    finally:
        backend.thaw()
    await eventually(lambda: a.broker.connected and b.broker.connected, timeout=15)
    assert b.broker.stats.reconnects >= 1
    if backend.cluster:  # the room's master may not be the one a's heartbeat reached
        await eventually(lambda: not a.broker._failing)  # a PING with the next heartbeat
    else:
        assert not a.broker._failing  # a's reconnect ran a heartbeat before "connected"
    await a.broker.publish(room_env(b"thawed", a.id))
    await b.inbox.wait_for_payload(b"thawed")


# -- closing is bounded whatever Redis does (issue 11) --------------------------------

async def test_close_is_bounded_while_redis_is_frozen(own_backend: Backend) -> None:
    """close() gives up on a frozen Redis (every master SIGSTOPped) within its timeouts
    instead of hanging, with presence to withdraw and publishes in flight."""
    backend = own_backend
    a = await backend.node("a", **CLOSE_TIMING)
    await a.broker.add_presence(R, a.conn(1))
    await a.broker.subscribe(R)
    backend.freeze()
    try:
        in_flight = asyncio.ensure_future(a.broker.publish(room_env(b"stuck", a.id)))
        await asyncio.sleep(0)  # the publish is written, its reply will never come
        async with asyncio.timeout(3 * 0.5 + 1.0):  # three socket timeouts and slack
            await a.broker.close()
        with pytest.raises(PublishError):
            await in_flight
    finally:
        backend.thaw()


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.4, 0.8])
async def test_close_is_bounded_while_redis_is_dead_and_links_recover(
    own_backend: Backend, delay: float
) -> None:
    """Redis (every master) SIGKILLed: close() returns within its bound at any moment of
    the re-subscribing (backoff, repair attempts, re-registration) and leaves no task."""
    backend = own_backend
    a = await backend.node("a", **CLOSE_TIMING)
    await a.broker.add_presence(R, a.conn(1))
    await a.broker.subscribe(R)
    backend.kill()
    await eventually(lambda: not a.broker.connected)
    await asyncio.sleep(delay)  # a moment of the repair loop, not a synchronisation
    async with asyncio.timeout(CLOSE_BOUND):
        await a.broker.close()
    assert a.broker._supervisor is not None and a.broker._supervisor.done()
    assert a.broker._heartbeat_task is not None and a.broker._heartbeat_task.done()


async def test_close_is_bounded_while_redis_comes_back(own_backend: Backend) -> None:
    """Redis restarted while the broker re-subscribes and re-registers: close() in the
    middle of the recovery still returns within its bound, and the node stays gone."""
    backend = own_backend
    a = await backend.node("a", **CLOSE_TIMING)
    b = await backend.node("b", **CLOSE_TIMING)
    await a.broker.add_presence(R, a.conn(1))
    await a.broker.subscribe(R)
    backend.kill()
    await eventually(lambda: not a.broker.connected)
    backend.restart()
    async with asyncio.timeout(CLOSE_BOUND):
        await a.broker.close()
    assert a.broker._supervisor is not None and a.broker._supervisor.done()

    async def only_b_left() -> bool:
        with backend.client(backend.keys.nodes) as client:
            return client.zscore(backend.keys.nodes, "a") is None

    # a recovery that ran on after close() would bring node a back; the withdrawal or
    # b's sweep removes it, and nothing re-adds it
    await eventually(only_b_left, timeout=5)
    assert b.broker.node_id == "b"


async def test_start_fails_fast_when_redis_is_unreachable(own_backend: Backend) -> None:
    """start() raises BrokerError naming the URL (no password) when Redis is down, within
    its timeouts, and leaves the broker closed."""
    backend = own_backend
    url = backend.url_with(":pw-secret")
    backend.kill()
    broker = backend.broker(url=url)
    async with asyncio.timeout(5):
        with pytest.raises(BrokerError, match="unreachable") as failure:
            await broker.start(NodeId("a"), Inbox())
    assert "pw-secret" not in str(failure.value)
    assert f"127.0.0.1:{backend.servers[0].port}" in str(failure.value)
    with pytest.raises(BrokerError, match="closed"):
        await broker.start(NodeId("a"), Inbox())
    await broker.close()


async def test_password_url_works_and_is_never_logged(
    own_backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """user/password in the URL authenticate (on every master), also after Redis restarts;
    a wrong password fails start with a clear error; no error or log line shows it."""
    backend = own_backend
    backend.config_set("requirepass", "pw-secret")
    with caplog.at_level(logging.DEBUG, logger="roomcast"):
        a = await backend.node("a", url=backend.url_with(":pw-secret"))
        b = await backend.node("b", url=backend.url_with("default:pw-secret"))
        await b.broker.subscribe(R)
        await a.broker.publish(room_env(b"authed", a.id))
        await b.inbox.wait_for_payload(b"authed")
        bad = backend.broker(url=backend.url_with(":wrong-one"))
        with pytest.raises(BrokerError, match="credentials") as refused:
            await bad.start(NodeId("c"), Inbox())
        backend.kill()
        with pytest.raises(PublishError) as failure:
            await a.broker.publish(room_env(b"x", a.id))
        await eventually(lambda: not b.broker.connected)
        backend.restart()
        await eventually(lambda: b.broker.connected and a.broker.connected, timeout=20)
        await eventually(lambda: not a.broker._failing)
        await a.broker.publish(room_env(b"again", a.id))
        await b.inbox.wait_for_payload(b"again")
    assert "wrong-one" not in str(refused.value)
    assert "pw-secret" not in str(failure.value) and "***" in str(failure.value)
    assert caplog.records and not any(
        "pw-secret" in r.getMessage() or "wrong-one" in r.getMessage() for r in caplog.records
    )
