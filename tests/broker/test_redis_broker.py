"""RedisBroker against a real redis-server, plus fakeredis unit tests of its Redis helpers."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

import fakeredis
import msgpack
import pytest
import redis.asyncio as aioredis

from roomcast.broker import create_broker
from roomcast.broker._keys import Keys, redact_url
from roomcast.broker._redis_common import Pipeliner, filter_alive, read_room_members
from roomcast.broker.base import Broker
from roomcast.broker.redis import RedisBroker
from roomcast.shared.envelope import Envelope, Kind, encode
from roomcast.shared.errors import BrokerError, PublishError
from roomcast.shared.ids import ConnectionId, NodeId, Room
from tests.broker.conftest import MakeNode
from tests.broker.helpers import Inbox, envelope, eventually, sync_with
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
R = Room("lobby")


def room_env(payload: bytes, origin: str, room: str = R) -> Envelope:
    return envelope(Kind.ROOM, room, payload, origin=origin)


# -- unit tests: names, URLs, presence filtering, pipelining (no redis-server) ----------


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


def test_create_broker_picks_redis_for_redis_schemes() -> None:
    """redis://, rediss:// and unix:// URLs give a RedisBroker that satisfies Broker."""
    for url in ("redis://u:p@h:1/3", "rediss://h:1/0", "unix:///tmp/r.sock?db=2"):
        broker = create_broker(url, prefix="p")
        assert isinstance(broker, RedisBroker)
        assert isinstance(broker, Broker)
        assert broker.has_peers and not broker.connected


def test_invalid_timing_is_refused() -> None:
    """presence_ttl must exceed heartbeat_interval, else live nodes would be swept."""
    with pytest.raises(ValueError, match="presence_ttl"):
        RedisBroker("redis://h:1/0", heartbeat_interval=2.0, presence_ttl=2.0)
    with pytest.raises(ValueError, match="reconnect_max_delay"):
        RedisBroker("redis://h:1/0", reconnect_max_delay=0)


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


async def test_presence_read_filters_dead_nodes_in_one_round_trip() -> None:
    """read_room_members drops members of stale or unknown nodes (fakeredis)."""
    client = fakeredis.FakeAsyncRedis()
    keys = Keys("t")
    seconds, micros = await client.time()
    now = seconds + micros / 1e6
    await client.zadd(keys.nodes, {"alive": now - 1, "stale": now - 30})
    await client.hset(
        keys.presence("r"), mapping={"alive.1": "alive", "stale.1": "stale", "gone.1": "gone"}
    )
    members = await read_room_members(client, keys, Room("r"), 5.0, "redis://fake")
    assert members == {"alive.1"}
    assert await read_room_members(client, keys, Room("empty"), 5.0, "redis://fake") == set()
    await client.aclose()


async def test_pipeliner_batches_one_loop_turn_and_splits_replies() -> None:
    """Commands queued in one turn go in one pipeline; each caller gets its own replies."""
    client = fakeredis.FakeAsyncRedis()
    pipeliner = Pipeliner(client, 1.0)
    replies = await asyncio.gather(
        *(pipeliner.execute(("SET", f"k{i}", i), ("GET", f"k{i}")) for i in range(50))
    )
    assert pipeliner.batches == 1
    assert [r[1] for r in replies] == [str(i).encode() for i in range(50)]
    await client.aclose()


async def test_cancelled_caller_does_not_cancel_its_batch() -> None:
    """A caller that stops waiting leaves the batch, and the others' replies, intact."""
    client = fakeredis.FakeAsyncRedis()
    pipeliner = Pipeliner(client, 1.0)
    first = asyncio.create_task(pipeliner.execute(("SET", "a", "1")))
    second = asyncio.create_task(pipeliner.execute(("SET", "b", "2"), ("GET", "a")))
    await asyncio.sleep(0)  # one loop turn: both tasks queue their commands
    first.cancel()
    assert await second == [True, b"1"]
    assert first.cancelled() and pipeliner.batches == 1
    await client.aclose()


async def test_pipeliner_failure_reaches_every_caller_of_the_batch() -> None:
    """When the batch cannot be sent, every caller awaiting it gets the error."""
    server = fakeredis.FakeServer()
    server.connected = False
    client = fakeredis.FakeAsyncRedis(server=server)
    pipeliner = Pipeliner(client, 1.0)
    results = await asyncio.gather(
        *(pipeliner.execute(("PUBLISH", "c", b"x")) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, aioredis.ConnectionError) for r in results)
    await client.aclose()


# -- real redis-server: routing ------------------------------------------------------


async def test_room_envelope_reaches_only_subscribed_nodes(make_node: MakeNode) -> None:
    """A room publish reaches a node subscribed to the room and not one that is not."""
    a, b, c = await make_node("a"), await make_node("b"), await make_node("c")
    await b.broker.subscribe(R)
    await a.broker.publish(room_env(b"hello", a.id))
    await b.inbox.wait_for_payload(b"hello")
    await sync_with(a, c, b"marker")
    assert c.inbox.payloads == [b"marker"]
    got = b.inbox.envelopes[0]
    assert (got.kind, got.target, got.origin, got.binary) == (Kind.ROOM, R, "a", False)
    assert a.broker.published == 2 and b.broker.received == 1


async def test_room_not_received_after_unsubscribe(make_node: MakeNode) -> None:
    """After unsubscribe, the room's envelopes no longer reach the node."""
    a, b = await make_node("a"), await make_node("b")
    await b.broker.subscribe(R)
    await a.broker.publish(room_env(b"one", a.id))
    await b.inbox.wait_for_payload(b"one")
    await b.broker.unsubscribe(R)
    await a.broker.publish(room_env(b"two", a.id))
    await sync_with(a, b, b"marker")
    assert b.inbox.payloads == [b"one", b"marker"]


async def test_connection_envelope_reaches_owning_node_only(make_node: MakeNode) -> None:
    """A send to connection b.7 goes to node b's channel and nowhere else."""
    a, b, c = await make_node("a"), await make_node("b"), await make_node("c")
    await a.broker.publish(envelope(Kind.CONNECTION, b.conn(7), b"for-b", origin=a.id))
    await b.inbox.wait_for_payload(b"for-b")
    assert b.inbox.envelopes[0].target == "b.7"
    await sync_with(a, c, b"marker")
    assert c.inbox.payloads == [b"marker"]


async def test_all_reaches_every_other_node_and_own_echo_is_ignored(
    make_node: MakeNode,
) -> None:
    """A broadcast to everyone reaches every other node; the publisher ignores its echo."""
    a, b, c = await make_node("a"), await make_node("b"), await make_node("c")
    await a.broker.publish(envelope(Kind.ALL, "", b"everyone", origin=a.id, exclude="b.1"))
    await b.inbox.wait_for_payload(b"everyone")
    await c.inbox.wait_for_payload(b"everyone")
    assert b.inbox.envelopes[0].exclude == "b.1"
    await sync_with(b, a, b"marker")  # a's echo was queued to a before this marker
    assert a.inbox.payloads == [b"marker"]
    assert a.broker.received == 1


async def test_concurrent_publishes_all_arrive_in_order(make_node: MakeNode) -> None:
    """Hundreds of concurrent publishes arrive, in order (pipelining on the publish link is
    proved in test_publish_link.py)."""
    a, b = await make_node("a"), await make_node("b")
    await b.broker.subscribe(R)
    count = 500
    await asyncio.gather(*(a.broker.publish(room_env(b"%d" % i, a.id)) for i in range(count)))
    await b.inbox.wait_until(lambda: len(b.inbox.envelopes) >= count)
    assert b.inbox.payloads == [b"%d" % i for i in range(count)]
    assert a.broker.published == count


async def test_sequential_publishes_from_tasks_keep_order_per_publisher(
    make_node: MakeNode,
) -> None:
    """Two tasks publishing in turn to two rooms: each room's order is the publish order."""
    a, b = await make_node("a"), await make_node("b")
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
    make_node: MakeNode, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Raw garbage on the channel is dropped, counted and logged; the next envelope arrives."""
    a, b = await make_node("a"), await make_node("b")
    await b.broker.subscribe(R)
    garbage = [
        b"\xc1not msgpack",
        msgpack.packb({"kind": 1}),
        msgpack.packb([1, [1], "a", "lobby", "", False, b"x", 0.0]),
        msgpack.packb([1, 1, "a", "lobby", "", False, b"\xff", 0.0]),  # text, not UTF-8
    ]
    raw = aioredis.from_url(redis_url)
    with caplog.at_level(logging.WARNING, logger="roomcast.broker.redis"):
        for data in garbage:
            await raw.publish("roomcast:room:lobby", data)
        await a.broker.publish(room_env(b"valid", a.id))
        await b.inbox.wait_for_payload(b"valid")
    await raw.aclose()
    assert b.broker.dropped == len(garbage)
    assert b.inbox.payloads == [b"valid"]
    assert b.broker.connected and b.broker.reconnects == 0
    # warnings are rate-limited to one a second, each saying how many were dropped so far
    assert any("invalid envelope" in r.getMessage() for r in caplog.records)


async def test_deliver_that_raises_does_not_stop_the_listener(
    make_node: MakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception from the deliver callback is logged; later envelopes still arrive."""
    a, b = await make_node("a"), await make_node("b")
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
    assert b.broker.connected and b.broker.reconnects == 0


async def test_subscription_calls_are_applied_in_call_order(
    make_node: MakeNode, redis_server: RedisServer
) -> None:
    """Unawaited subscribe/unsubscribe calls for one room end in the state of the last call."""
    b = await make_node("b")

    def subscribers() -> int:
        with redis_server.client() as client:
            return int(client.pubsub_numsub("roomcast:room:lobby")[0][1])

    await asyncio.gather(b.broker.subscribe(R), b.broker.unsubscribe(R), b.broker.subscribe(R))
    assert subscribers() == 1
    await asyncio.gather(b.broker.unsubscribe(R), b.broker.subscribe(R), b.broker.unsubscribe(R))
    await eventually(lambda: subscribers() == 0)
    with redis_server.client() as client:
        channels = set(client.pubsub_channels())
    assert channels == {b"roomcast:node:b", b"roomcast:all"}


# -- real redis-server: presence -----------------------------------------------------


async def test_presence_is_shared_across_nodes(make_node: MakeNode) -> None:
    """Members added on two nodes are seen by both; removal is seen by both too."""
    a, b = await make_node("a"), await make_node("b")
    await a.broker.add_presence(R, a.conn(1))
    await b.broker.add_presence(R, b.conn(1))
    await b.broker.add_presence(Room("other"), b.conn(1))
    assert await a.broker.room_members(R) == {"a.1", "b.1"}
    assert await b.broker.room_members(R) == {"a.1", "b.1"}
    await b.broker.remove_presence(b.conn(1), [R, Room("other")])
    assert await a.broker.room_members(R) == {"a.1"}
    assert await a.broker.room_members(Room("other")) == set()


async def test_presence_refuses_a_connection_of_another_node(make_node: MakeNode) -> None:
    """A node can only register its own connections (the id names the owner)."""
    a = await make_node("a")
    with pytest.raises(ValueError, match="belongs to node b"):
        await a.broker.add_presence(R, ConnectionId("b.1"))


async def test_close_removes_presence_and_node_entry(
    make_node: MakeNode, redis_server: RedisServer
) -> None:
    """close() withdraws all of the node's presence and its heartbeat entry; twice is fine."""
    a, b = await make_node("a"), await make_node("b")
    await a.broker.add_presence(R, a.conn(1))
    await b.broker.add_presence(R, b.conn(1))
    await b.broker.add_presence(Room("two"), b.conn(2))
    await b.broker.close()
    await b.broker.close()
    assert await a.broker.room_members(R) == {"a.1"}
    with redis_server.client() as client:
        assert client.zscore("roomcast:nodes", "b") is None
        assert client.hgetall("roomcast:presence:lobby") == {b"a.1": b"a"}
        assert not client.exists("roomcast:presence:two", "roomcast:node-rooms:b")
    assert not b.broker.connected
    with pytest.raises(BrokerError, match="closed"):
        await b.broker.publish(room_env(b"x", "b"))


_CRASHING_NODE = """
import asyncio, sys
from roomcast.broker.redis import RedisBroker
from roomcast.shared.ids import ConnectionId, NodeId, Room

async def main() -> None:
    broker = RedisBroker(sys.argv[1], heartbeat_interval=0.1, presence_ttl=0.5)
    await broker.start(NodeId("doomed"), lambda envelope: None)
    await broker.add_presence(Room("lobby"), ConnectionId("doomed.1"))
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_killed_node_vanishes_within_ttl_plus_interval(
    make_node: MakeNode, redis_url: str, redis_server: RedisServer
) -> None:
    """A node process killed with SIGKILL leaves room_members and Redis within ttl+interval."""
    ttl, interval = 0.5, 0.1
    a = await make_node("a", heartbeat_interval=interval, presence_ttl=ttl)
    await a.broker.add_presence(R, a.conn(1))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CRASHING_NODE, redis_url, cwd=ROOT,
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

    async def only_a() -> bool:
        return await a.broker.room_members(R) == {"a.1"}

    def swept() -> bool:
        with redis_server.client() as client:
            return client.zscore("roomcast:nodes", "doomed") is None and not client.hexists(
                "roomcast:presence:lobby", "doomed.1"
            )

    await eventually(only_a, timeout=5)
    left_members = time.monotonic() - killed_at
    await eventually(swept, timeout=5)
    swept_after = time.monotonic() - killed_at
    slack = 0.5  # scheduling on a busy test machine
    assert left_members <= ttl + slack
    assert swept_after <= ttl + interval + slack


async def test_node_swept_while_alive_re_registers_itself(
    make_node: MakeNode, redis_server: RedisServer
) -> None:
    """If peers swept a live node (e.g. after a pause), its next heartbeat restores it."""
    a, b = await make_node("a"), await make_node("b")
    await b.broker.add_presence(R, b.conn(1))
    with redis_server.client() as client:
        client.zrem("roomcast:nodes", "b")
        client.hdel("roomcast:presence:lobby", "b.1")

    async def restored() -> bool:
        return await a.broker.room_members(R) == {"b.1"}

    await eventually(restored, timeout=5)


# -- real redis-server: failures and recovery ----------------------------------------


async def test_redis_restart_fails_publishes_then_recovers_by_itself(
    make_node: MakeNode, redis_server: RedisServer
) -> None:
    """Redis killed: publish raises PublishError; restarted on its port: all comes back."""
    a, b = await make_node("a"), await make_node("b")
    await b.broker.subscribe(R)
    await a.broker.add_presence(R, a.conn(1))
    await b.broker.add_presence(R, b.conn(1))

    redis_server.kill()
    with pytest.raises(PublishError, match="unreachable") as failure:
        await a.broker.publish(room_env(b"lost", a.id))
    assert f"127.0.0.1:{redis_server.port}" in str(failure.value)
    assert a.broker.publish_failures == 1
    await eventually(lambda: not a.broker.connected and not b.broker.connected)
    with pytest.raises(BrokerError, match="unreachable"):
        await a.broker.room_members(R)
    # none of these raise while Redis is away; they are applied on reconnect
    await a.broker.add_presence(R, a.conn(2))
    await a.broker.remove_presence(a.conn(1), [R])
    await b.broker.subscribe(Room("late"))

    redis_server.start()  # same port, empty: no persistence
    await eventually(lambda: a.broker.connected and b.broker.connected)
    assert a.broker.reconnects >= 1 and b.broker.reconnects >= 1
    # presence is re-registered before a link reports itself connected
    assert await b.broker.room_members(R) == {"a.2", "b.1"}
    await a.broker.publish(room_env(b"back", a.id))
    await a.broker.publish(room_env(b"late", a.id, "late"))
    await b.inbox.wait_until(lambda: len(b.inbox.envelopes) >= 2)
    assert b.inbox.payloads == [b"back", b"late"]


async def test_pubsub_client_kill_triggers_reconnect_and_resubscribe(
    make_node: MakeNode, redis_server: RedisServer
) -> None:
    """CLIENT KILL TYPE pubsub: the link is rebuilt, counted, and every channel re-joined."""
    a, b = await make_node("a"), await make_node("b")
    await b.broker.subscribe(R)
    with redis_server.client() as client:
        assert client.client_kill_filter(_type="pubsub") == 2
    await eventually(lambda: b.broker.reconnects == 1 and b.broker.connected)
    await a.broker.publish(room_env(b"room", a.id))
    await a.broker.publish(envelope(Kind.CONNECTION, b.conn(1), b"direct", origin=a.id))
    await a.broker.publish(envelope(Kind.ALL, "", b"all", origin=a.id))
    await b.inbox.wait_until(lambda: len(b.inbox.envelopes) >= 3)
    assert b.inbox.payloads == [b"room", b"direct", b"all"]


async def test_output_buffer_limit_disconnect_is_survived(
    make_node: MakeNode, redis_server: RedisServer
) -> None:
    """Redis closing a slow subscriber (pubsub output buffer limit) leads to a reconnect."""
    a, b = await make_node("a"), await make_node("b")
    await b.broker.subscribe(R)
    redis_server.config_set("client-output-buffer-limit", "pubsub 1kb 0 0")
    await a.broker.publish(room_env(b"x" * 200_000, a.id))
    redis_server.config_set("client-output-buffer-limit", "pubsub 32mb 8mb 60")
    await eventually(lambda: b.broker.reconnects >= 1 and b.broker.connected)
    await a.broker.publish(room_env(b"small", a.id))
    await b.inbox.wait_for_payload(b"small")


async def test_frozen_redis_is_detected_and_survived(
    make_node: MakeNode, redis_server: RedisServer
) -> None:
    """SIGSTOPped Redis: publish fails within its bound, the link drops, then recovers."""
    timing = {"socket_timeout": 0.5, "health_check_interval": 0.2}
    a, b = await make_node("a", **timing), await make_node("b", **timing)
    await b.broker.subscribe(R)
    redis_server.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(PublishError, match="unreachable"):
            await a.broker.publish(room_env(b"frozen", a.id))
        assert time.monotonic() - started <= 2 * 0.5 + 0.5
        await eventually(lambda: not b.broker.connected, timeout=0.2 + 0.5 + 1.5)
    finally:
        redis_server.thaw()
    await eventually(lambda: a.broker.connected and b.broker.connected)
    assert b.broker.reconnects >= 1
    await a.broker.publish(room_env(b"thawed", a.id))
    await b.inbox.wait_for_payload(b"thawed")


async def test_close_is_bounded_while_redis_is_frozen(
    make_node: MakeNode, redis_server: RedisServer
) -> None:
    """close() gives up on a frozen Redis within its timeouts instead of hanging."""
    a = await make_node("a", socket_timeout=0.5, health_check_interval=0.2)
    await a.broker.add_presence(R, a.conn(1))
    redis_server.freeze()
    try:
        started = time.monotonic()
        await a.broker.close()
        assert time.monotonic() - started <= 3 * 0.5 + 1.0
    finally:
        redis_server.thaw()


async def test_start_fails_fast_when_redis_is_unreachable(redis_server: RedisServer) -> None:
    """start() raises BrokerError naming the URL (no password) when Redis is down."""
    url = f"redis://:pw-secret@127.0.0.1:{redis_server.port}/0"
    redis_server.kill()
    broker = RedisBroker(url)
    with pytest.raises(BrokerError, match="unreachable") as failure:
        await broker.start(NodeId("a"), Inbox())
    assert "pw-secret" not in str(failure.value)
    assert f"127.0.0.1:{redis_server.port}" in str(failure.value)
    await broker.close()


async def test_wrong_password_fails_start_with_a_clear_error(redis_server: RedisServer) -> None:
    """A bad password is reported as refused credentials, without echoing the password."""
    redis_server.config_set("requirepass", "right-one")
    broker = RedisBroker(f"redis://:wrong-one@127.0.0.1:{redis_server.port}/0")
    with pytest.raises(BrokerError, match="credentials") as failure:
        await broker.start(NodeId("a"), Inbox())
    assert "wrong-one" not in str(failure.value)
    await broker.close()


async def test_password_url_works_and_is_never_logged(
    make_node: MakeNode, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A URL with a password authenticates; errors and logs show it redacted."""
    redis_server.config_set("requirepass", "pw-secret")
    url = f"redis://:pw-secret@127.0.0.1:{redis_server.port}/0"
    with caplog.at_level(logging.DEBUG, logger="roomcast"):
        a, b = await make_node("a", url=url), await make_node("b", url=url)
        await b.broker.subscribe(R)
        await a.broker.publish(room_env(b"authed", a.id))
        await b.inbox.wait_for_payload(b"authed")
        redis_server.kill()
        with pytest.raises(PublishError) as failure:
            await a.broker.publish(room_env(b"x", a.id))
        await eventually(lambda: not b.broker.connected)
        redis_server.start()
        await eventually(lambda: b.broker.connected and a.broker.connected)
    assert "pw-secret" not in str(failure.value) and "***" in str(failure.value)
    assert caplog.records and not any("pw-secret" in r.getMessage() for r in caplog.records)


async def test_unix_socket_url(make_node: MakeNode) -> None:
    """unix:// URLs with a db number work alongside TCP clients of the same server."""
    with RedisServer(unix_socket=True) as server:
        a = await make_node("a", url=server.unix_url)
        b = await make_node("b", url=server.url)
        await a.broker.subscribe(R)
        await b.broker.add_presence(R, b.conn(1))
        await b.broker.publish(room_env(b"via-unix", b.id))
        await a.inbox.wait_for_payload(b"via-unix")
        assert await a.broker.room_members(R) == {"b.1"}
        await a.broker.close()
        await b.broker.close()


async def test_prefixes_isolate_clusters_on_one_redis(make_node: MakeNode) -> None:
    """Two prefixes on one Redis see neither each other's messages nor presence."""
    a1, c1 = await make_node("a", prefix="one"), await make_node("c", prefix="one")
    b2, d2 = await make_node("b", prefix="two"), await make_node("d", prefix="two")
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


async def test_encoded_envelope_is_published_once_on_one_channel(
    make_node: MakeNode, redis_url: str
) -> None:
    """A raw subscriber sees exactly one message, the encoded envelope, per publish."""
    a = await make_node("a")
    raw = aioredis.from_url(redis_url)
    pubsub = raw.pubsub()
    await pubsub.subscribe("roomcast:room:lobby", "roomcast:all", "roomcast:node:z")
    env = room_env(b"once", a.id)
    await a.broker.publish(env)
    await a.broker.publish(envelope(Kind.CONNECTION, "z.1", b"z", origin=a.id))
    await a.broker.publish(envelope(Kind.ALL, "", b"all", origin=a.id))
    seen: list[tuple[bytes, bytes]] = []
    async with asyncio.timeout(10):
        while len(seen) < 3:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                seen.append((message["channel"], message["data"]))
    assert seen[0] == (b"roomcast:room:lobby", encode(env))
    assert [channel for channel, _ in seen] == [
        b"roomcast:room:lobby", b"roomcast:node:z", b"roomcast:all"
    ]
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await raw.aclose()
