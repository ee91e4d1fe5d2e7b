"""Redis Cluster failover and slot migration, with brokers and with real node processes.

Each test starts its own cluster (3 masters, with one replica each where a master is
killed) and changes its topology under running nodes: delivery must resume by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.crc import key_slot

from roomcast.broker._keys import Keys
from roomcast.broker.redis import RedisBroker
from roomcast.shared.envelope import Kind
from roomcast.shared.errors import PublishError
from roomcast.shared.ids import ConnectionId, NodeId, Room
from tests.broker.helpers import Inbox, envelope, eventually
from tests.e2e.procs import NodeProcess
from tests.e2e.test_cluster import chat
from tests.loops import ONE_LOOP
from tests.redis_cluster import LocalRedisCluster

pytestmark = ONE_LOOP  # Redis Cluster failover is its subject, not the socket path

PREFIX = "fo"
FAST = {"heartbeat_interval": 0.2, "presence_ttl": 1.0, "reconnect_max_delay": 0.5}
RESUME_DEADLINE = 30.0
"""Seconds within which delivery must resume after a master is killed (observed ~3 s)."""
CLOSE_BOUND = 20.0
"""Seconds within which closing one broker must return, whatever the cluster does."""


@pytest.fixture
def ha_cluster() -> Iterator[LocalRedisCluster]:
    """3 masters with one replica each; cluster-node-timeout 1000 ms."""
    with LocalRedisCluster(masters=3, replicas=1) as local:
        yield local


@pytest.fixture
def plain_cluster() -> Iterator[LocalRedisCluster]:
    """3 masters, no replicas."""
    with LocalRedisCluster(masters=3) as local:
        yield local


class Pair:
    """Two started brokers, ``a`` publishing and ``b`` receiving."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.a = RedisBroker(url, prefix=PREFIX, **FAST)
        self.b = RedisBroker(url, prefix=PREFIX, **FAST)
        self.inbox = Inbox()
        self.sent = 0

    async def start(self) -> Pair:
        await self.a.start(NodeId("a"), Inbox())
        await self.b.start(NodeId("b"), self.inbox)
        return self

    async def close(self) -> None:
        # bounded whatever the cluster is doing (failing over, a master dead): issue 11
        for broker in (self.a, self.b):
            async with asyncio.timeout(CLOSE_BOUND):
                await broker.close()

    async def publish_until_received(self, room: str, deadline: float) -> tuple[float, int]:
        """Publish numbered envelopes to ``room`` until ``b`` gets one; (when, failures)."""
        failures = 0
        while True:
            assert time.monotonic() < deadline, "delivery did not resume in time"
            self.sent += 1
            payload = b"after-%d" % self.sent
            try:
                await self.a.publish(envelope(Kind.ROOM, room, payload, origin="a"))
            except PublishError:
                failures += 1
            with contextlib.suppress(TimeoutError):
                await self.inbox.wait_for_payload(payload, timeout=0.1)
                return time.monotonic(), failures

    def tasks_alive(self) -> bool:
        brokers = (self.a, self.b)
        return all(
            task is not None and not task.done()
            for broker in brokers
            for task in (broker._heartbeat_task, broker._supervisor)
        )


@pytest.fixture
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    local: LocalRedisCluster = request.getfixturevalue(request.param)
    started = await Pair(local.url).start()
    try:
        yield started
    finally:
        await started.close()


def room_served_by(local: LocalRedisCluster, port: int) -> str:
    """A room whose channel lives on the master at ``port``."""
    owners = local.slot_owners()
    for i in range(100_000):
        room = f"room{i}"
        if owners[key_slot(Keys(PREFIX).room_channel(room).encode())] == port:
            return room
    raise AssertionError(f"no room hashes to {port}")


@pytest.mark.parametrize("pair", ["ha_cluster"], indirect=True)
async def test_killed_master_fails_over_and_room_delivery_resumes(
    pair: Pair, ha_cluster: LocalRedisCluster
) -> None:
    """SIGKILL the master of a room's slot: its replica is promoted, the subscriber moves
    to it by itself, publishes succeed again and reach the other node; nothing crashes."""
    presence_master = ha_cluster.master_of(Keys(PREFIX, cluster=True).nodes)
    victim = next(p for p in ha_cluster.master_ports() if p != presence_master)
    room = room_served_by(ha_cluster, victim)
    slot = key_slot(Keys(PREFIX).room_channel(room).encode())
    await pair.b.subscribe(Room(room))
    await pair.publish_until_received(room, time.monotonic() + 5)

    ha_cluster.server(victim).kill()
    killed = time.monotonic()

    async def promotion() -> tuple[int, float]:
        port = await asyncio.to_thread(ha_cluster.wait_for_new_master, slot, victim)
        return port, time.monotonic()

    watcher = asyncio.create_task(promotion())
    resumed, failures = await pair.publish_until_received(room, killed + RESUME_DEADLINE)
    promoted_to, promoted = await watcher
    assert failures >= 1  # publishes to the dead master were refused, not silently lost

    await eventually(lambda: pair.b.connected, timeout=10)
    assert pair.b.stats.reconnects >= 1 and pair.b.stats.resubscribes >= 1
    assert Keys(PREFIX).room_channel(room).encode() in pair.b._transport.links()[
        f"127.0.0.1:{promoted_to}"
    ]
    assert pair.tasks_alive()
    # presence was never on the killed master: reads kept working
    assert await pair.a.room_members(Room(room)) == set()
    print(f"\nfailover: promoted after {promoted - killed:.2f} s, delivery resumed after "
          f"{resumed - killed:.2f} s, {failures} publish(es) failed meanwhile")


@pytest.mark.parametrize("pair", ["ha_cluster"], indirect=True)
async def test_presence_master_failover_keeps_presence(
    pair: Pair, ha_cluster: LocalRedisCluster
) -> None:
    """SIGKILL the master of the presence slot: after the promotion, room_members answers
    again with every member (nodes re-register what a lagging replica may have missed)."""
    keys = Keys(PREFIX, cluster=True)
    victim = ha_cluster.master_of(keys.nodes)
    await pair.a.add_presence(Room("r"), ConnectionId("a.1"))
    await pair.b.add_presence(Room("r"), ConnectionId("b.1"))
    assert await pair.a.room_members(Room("r")) == {"a.1", "b.1"}

    ha_cluster.server(victim).kill()
    killed = time.monotonic()

    async def members_back() -> bool:
        with contextlib.suppress(Exception):
            return await pair.a.room_members(Room("r")) == {"a.1", "b.1"}
        return False

    # the first reads fail (BrokerError) until the replica is promoted
    await eventually(members_back, timeout=RESUME_DEADLINE)
    print(f"\npresence readable again {time.monotonic() - killed:.2f} s after the kill")
    await pair.b.add_presence(Room("r"), ConnectionId("b.2"))

    async def joined() -> bool:
        return await pair.a.room_members(Room("r")) == {"a.1", "b.1", "b.2"}

    await eventually(joined, timeout=5)
    assert pair.tasks_alive()


@pytest.mark.parametrize("pair", ["plain_cluster"], indirect=True)
async def test_slot_migration_moves_subscription_and_publishes_follow_moved(
    pair: Pair, plain_cluster: LocalRedisCluster
) -> None:
    """Migrate a room's slot (and the presence slot) to another master: the old master
    drops the subscription, the subscriber re-subscribes on the new one, publishes follow
    MOVED, presence keys move with their slot; no link is lost, no publish fails."""
    room = "migrating"
    channel = Keys(PREFIX).room_channel(room)
    slot = key_slot(channel.encode())
    keys = Keys(PREFIX, cluster=True)
    await pair.b.subscribe(Room(room))
    await pair.b.add_presence(Room(room), ConnectionId("b.1"))
    await pair.publish_until_received(room, time.monotonic() + 5)
    source = plain_cluster.master_of(channel)
    target = next(p for p in plain_cluster.master_ports() if p != source)

    plain_cluster.migrate_slot(slot, target)
    presence_slot = key_slot(keys.nodes.encode())
    presence_target = next(p for p in plain_cluster.master_ports()
                           if p != plain_cluster.master_of(keys.nodes))
    plain_cluster.migrate_slot(presence_slot, presence_target)
    moved = time.monotonic()

    resumed, failures = await pair.publish_until_received(room, moved + 10)
    await eventually(
        lambda: channel.encode() in pair.b._transport.links().get(f"127.0.0.1:{target}", ())
    )
    with plain_cluster.client(target) as client:
        assert client.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1] == 1
    with plain_cluster.client(source) as client:
        assert client.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1] == 0
    assert pair.b.stats.resubscribes >= 1 and pair.b.stats.reconnects == 0 and pair.b.connected
    assert failures == 0 and pair.a.stats.publish_failures == 0
    assert await pair.a.room_members(Room(room)) == {"b.1"}
    with plain_cluster.client(presence_target) as client:
        assert client.hgetall(keys.presence(room)) == {b"b.1": b"b"}
    # the heartbeat (a script on the presence slot) follows MOVED too
    before = await asyncio.to_thread(_score, plain_cluster, presence_target, keys.nodes, "a")
    await eventually(
        lambda: _score(plain_cluster, presence_target, keys.nodes, "a") != before
    )
    print(f"\nmigration: delivery resumed {resumed - moved:.2f} s after the slot moved")


def _score(local: LocalRedisCluster, port: int, key: str, member: str) -> float | None:
    with local.client(port) as client:
        score = client.zscore(key, member)
    return None if score is None else float(score)


async def test_node_processes_survive_failover_of_their_room(
    ha_cluster: LocalRedisCluster,
) -> None:
    """``roomcast serve --redis redis+cluster://...``: two node processes, members chat
    across them; the room's master is SIGKILLed; cross-node chat resumes by itself."""
    args = ["--redis", ha_cluster.url, "--redis-prefix", PREFIX, "--heartbeat-ms", "200",
            "--presence-ttl-ms", "1000"]
    nodes = [NodeProcess(*args), NodeProcess(*args)]
    try:
        for node in nodes:
            node.start()
        room = room_served_by(ha_cluster, ha_cluster.master_ports()[0])
        async with chat(nodes[0], room=room, name="a") as a, \
                chat(nodes[1], room=room, name="b") as b:
            await a.ws.send("before")
            assert await b.recv_chat() == "before"
            ha_cluster.server(ha_cluster.master_of(Keys(PREFIX).room_channel(room))).kill()
            deadline = time.monotonic() + RESUME_DEADLINE
            received = None
            i = 0
            while received is None or not received.startswith("after "):
                assert time.monotonic() < deadline, "cross-node chat did not resume"
                i += 1
                await a.ws.send(f"after {i}")
                with contextlib.suppress(TimeoutError):
                    received = await b.recv_chat(timeout=0.3)
        for node in nodes:
            assert node.proc is not None and node.proc.poll() is None, node.log()
    finally:
        for node in nodes:
            node.kill()
