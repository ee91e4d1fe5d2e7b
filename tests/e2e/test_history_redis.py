"""Room history under Redis faults, at the broker level, on real redis-server processes.

A pub/sub link killed during a burst: ``resumed`` names exactly the subscribed rooms and
the history fills the gap, exactly once and in order. Redis SIGKILLed and restarted:
without persistence (or with AOF everysec, or with CONFIG refused) the epoch changes
and no offset is reused; with ``appendonly yes`` + ``appendfsync always`` the epoch is
kept and offsets continue. A promoted replica, and a server promoted back after a
failover (same run id), start new epochs. A cluster master failover changes the epoch of
that shard's rooms only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.crc import key_slot

from roomcast.broker.publisher import Publisher
from roomcast.broker.redis import RedisBroker
from roomcast.shared.envelope import Envelope, Kind
from roomcast.shared.errors import BrokerError, PublishError
from roomcast.shared.history import EPOCH, History, HistoryPolicy, Position
from roomcast.shared.ids import NodeId, Room
from tests.broker.helpers import Inbox, envelope, eventually
from tests.loops import ONE_LOOP
from tests.redis_cluster import LocalRedisCluster
from tests.redis_server import RedisServer

pytestmark = ONE_LOOP  # Redis faults are the subject, not the node's socket path

H = History(size=1000, ttl=300)
FAST = {"heartbeat_interval": 0.1, "presence_ttl": 0.5, "reconnect_max_delay": 0.5,
        "socket_timeout": 1.0, "health_check_interval": 0.3}
AOF_ALWAYS = ("--appendonly", "yes", "--appendfsync", "always")
AOF_EVERYSEC = ("--appendonly", "yes", "--appendfsync", "everysec")
DEADLINE = 30.0
"""Seconds within which publishing must work again after Redis came back."""


def text(room: str, payload: bytes, origin: str = "") -> Envelope:
    return envelope(Kind.ROOM, room, payload, origin=origin)


class Brokers:
    """Brokers of one test on one URL, closed (bounded) at the end."""

    def __init__(self, url: str, prefix: str = "hr") -> None:
        self.url = url
        self.prefix = prefix
        self.made: list[RedisBroker] = []
        self.publishers: list[Publisher] = []

    async def node(self, name: str, inbox: Inbox | None = None,
                   resumed: list[frozenset[Room]] | None = None) -> RedisBroker:
        broker = RedisBroker(self.url, prefix=self.prefix, **FAST)
        self.made.append(broker)
        await broker.start(NodeId(name), inbox or Inbox(),
                           resumed=resumed.append if resumed is not None else None)
        return broker

    def publisher(self) -> Publisher:
        made = Publisher(self.url, prefix=self.prefix, history=HistoryPolicy(H))
        self.publishers.append(made)
        return made

    async def close(self) -> None:
        for broker in reversed(self.made):
            async with asyncio.timeout(20):
                await broker.close()
        for publisher in self.publishers:
            await publisher.close()


@contextlib.asynccontextmanager
async def brokers_on(url: str) -> AsyncIterator[Brokers]:
    made = Brokers(url)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A redis-server with the persistence the test is parametrized with (none by
    default), in a directory that survives its restarts."""
    args: tuple[str, ...] = getattr(request, "param", ())
    made = RedisServer(extra_args=args)
    try:
        made.start()
        yield made
    finally:
        made.cleanup()


async def publish_until_taken(broker: RedisBroker, room: str, payload: bytes,
                              deadline: float = DEADLINE) -> Position:
    """Publish with history until Redis takes it (after a restart the first tries fail)."""
    until = time.monotonic() + deadline
    while True:
        try:
            position = await broker.publish(text(room, payload), history=H)
        except PublishError:
            assert time.monotonic() < until, "publishing did not work again in time"
            await asyncio.sleep(0.05)  # retry interval, bounded by the deadline
            continue
        assert position is not None
        return position


def offsets_of(inbox: Inbox, room: str) -> list[tuple[str, int]]:
    return [(e.epoch, e.offset) for e in inbox.envelopes if e.target == room]


# -- a lost pub/sub link: resumed, and the gap filled from the history ------------------


@pytest.mark.parametrize("where", ["redis", "cluster"])
async def test_pubsub_link_killed_during_a_burst_resumes_exactly_the_subscribed_rooms(
    where: str, request: pytest.FixtureRequest,
) -> None:
    """CLIENT KILL TYPE pubsub while another node publishes to three rooms: ``resumed``
    names each subscribed room once (not the unsubscribed one), and what the subscriber
    received plus the history read since its last offset is every message exactly once,
    in offset order."""
    with contextlib.ExitStack() as stack:
        if where == "cluster":
            local = stack.enter_context(LocalRedisCluster(masters=3))
            url, servers = local.url, local.servers
        else:
            server = stack.enter_context(RedisServer())
            url, servers = server.url, [server]
        async with brokers_on(url) as brokers:
            inbox, resumed = Inbox(), []
            a = await brokers.node("aa")
            b = await brokers.node("bb", inbox, resumed)
            rooms = [Room(f"burst{i}") for i in range(3)]
            for room in rooms:
                await b.subscribe(room)
            await b.subscribe(Room("no-history-here"))
            await b.unsubscribe(Room("no-history-here"))
            sent = 0

            async def burst() -> None:
                # publish through the whole outage, and a little after it
                nonlocal sent
                after = 0
                while after < 20:
                    sent += 1
                    for room in rooms:
                        await a.publish(text(room, b"%d" % sent, origin="aa"), history=H)
                    await asyncio.sleep(0)  # let the subscriber read meanwhile
                    if set().union(*resumed) == set(rooms):
                        after += 1

            publishing = asyncio.create_task(burst())
            await inbox.wait_until(lambda: len(inbox.envelopes) >= 30)
            for server in servers:
                with server.client() as client:
                    client.client_kill_filter(_type="pubsub")
            async with asyncio.timeout(DEADLINE):
                await publishing
            assert sorted(r for batch in resumed for r in batch) == sorted(rooms)
            assert b.stats.resumed_rooms == len(rooms)
            gaps = 0
            for room in rooms:
                await inbox.wait_until(lambda room=room: offsets_of(inbox, room)[-1][1] == sent)
                live = [o for _, o in offsets_of(inbox, room)]
                epoch = offsets_of(inbox, room)[0][0]
                assert live == sorted(set(live))  # in order, no duplicate
                history = await b.read_history(room, H, since=0, limit=1000)
                assert [e.offset for e in history.envelopes] == list(range(1, sent + 1))
                # the node's catch-up: live up to the first gap, then the history since
                first_gap = next((i for i, o in enumerate(live) if o != i + 1), len(live))
                gaps += first_gap < len(live)
                caught = await b.read_history(room, H, since=first_gap, limit=1000)
                assert caught.gap(Position(epoch, first_gap)) is None
                assert live[:first_gap] + [e.offset for e in caught.envelopes] == list(
                    range(1, sent + 1))
            assert gaps, "the link was killed but no message was missed: nothing tested"


# -- restarts: a new epoch unless every acknowledged write was on disk ------------------


async def test_restart_without_persistence_is_a_new_epoch(server: RedisServer) -> None:
    """SIGKILL and restart with no persistence: the next publish is in a new epoch, and
    a reader holding the old position is told ``epoch``; no old message is served."""
    async with brokers_on(server.url) as brokers:
        a = await brokers.node("aa")
        before = [await a.publish(text("r", b"%d" % i), history=H) for i in range(5)]
        assert before[-1] is not None
        server.kill()
        server.start()
        after = await publish_until_taken(a, "r", b"new")
        assert after.epoch != before[-1].epoch
        assert after.offset == 1  # everything was lost: the room starts again
        page = await a.read_history(Room("r"), H, since=0)
        assert [e.payload for e in page.envelopes] == [b"new"]
        assert page.gap(before[-1]) == EPOCH


@pytest.mark.parametrize("server", [AOF_ALWAYS], indirect=True)
async def test_restart_with_aof_always_keeps_the_epoch(server: RedisServer) -> None:
    """appendonly yes + appendfsync always, SIGKILL and restart: the same epoch, offsets
    continue, and a reader that was at offset 3 recovers 4..7 exactly; a node connected
    before the restart and a Publisher made after it agree."""
    async with brokers_on(server.url) as brokers:
        a = await brokers.node("aa")
        before = [await a.publish(text("r", b"%d" % i), history=H) for i in range(5)]
        epoch = before[0].epoch  # type: ignore[union-attr]
        server.kill()
        server.start()
        after = await publish_until_taken(a, "r", b"after")
        assert after == Position(epoch, 6)
        late = brokers.publisher()
        assert await late.publish_to_room("r", "late") == Position(epoch, 7)
        page = await late.room_history("r", since=3)
        assert page.gap(Position(epoch, 3)) is None
        assert [e.payload for e in page.envelopes] == [b"3", b"4", b"after", b"late"]


@pytest.mark.parametrize("server", [AOF_EVERYSEC], indirect=True)
async def test_restart_with_aof_everysec_is_a_new_epoch_and_offsets_go_on(
    server: RedisServer,
) -> None:
    """appendfsync everysec, SIGKILL and restart: acknowledged writes may be lost, so the
    epoch changes; offsets continue from what was loaded, so no (epoch, offset) repeats."""
    async with brokers_on(server.url) as brokers:
        a = await brokers.node("aa")
        before = [await a.publish(text("r", b"%d" % i), history=H) for i in range(5)]
        server.kill()
        server.start()
        after = [await publish_until_taken(a, "r", b"after%d" % i) for i in range(3)]
        assert after[0].epoch != before[0].epoch  # type: ignore[union-attr]
        assert after[0].offset >= 1
        assert [p.offset for p in after] == [after[0].offset + i for i in range(3)]
        positions = [*before, *after]
        assert len(set(positions)) == len(positions)


@pytest.mark.parametrize(
    "server", [(*AOF_ALWAYS, "--rename-command", "CONFIG", "")], indirect=True)
async def test_durability_unknown_when_config_is_refused(server: RedisServer) -> None:
    """With CONFIG renamed away (managed Redis), durability cannot be read: a restart is
    a new epoch even with AOF always, and publishing works throughout."""
    async with brokers_on(server.url) as brokers:
        a = await brokers.node("aa")
        before = await a.publish(text("r", b"x"), history=H)
        server.kill()
        server.start()
        after = await publish_until_taken(a, "r", b"y")
        assert before is not None and after.epoch != before.epoch
        assert after.offset == 2


async def test_promoted_replica_and_failback_are_new_epochs() -> None:
    """A replica promoted over the room's master starts a new epoch; so does the old
    master promoted back after it followed the replica, though its run id is the same
    (the writes it acknowledged last may be the ones the replica never got)."""
    with RedisServer() as first, RedisServer() as second:
        async with brokers_on(first.url) as on_first, brokers_on(second.url) as on_second:
            a = await on_first.node("aa")
            e1 = await a.publish(text("r", b"1"), history=H)
            assert e1 is not None
            with second.client() as client:
                client.replicaof("127.0.0.1", first.port)
            await eventually(lambda: _synced(second), timeout=DEADLINE)
            with second.client() as client:
                client.replicaof("NO", "ONE")
            b = await on_second.node("bb")
            e2 = await b.publish(text("r", b"2"), history=H)
            assert e2 is not None and e2.epoch != e1.epoch and e2.offset == 2
            # the old master follows the new one, then is promoted back
            with first.client() as client:
                client.replicaof("127.0.0.1", second.port)
            await eventually(lambda: _synced(first), timeout=DEADLINE)
            with first.client() as client:
                client.replicaof("NO", "ONE")
            e3 = await publish_until_taken(a, "r", b"3")
            assert e3.epoch not in (e1.epoch, e2.epoch) and e3.offset == 3


def _synced(server: RedisServer) -> bool:
    with server.client() as client:
        info = client.info("replication")
    return info.get("master_link_status") == "up"


async def test_lost_script_cache_is_reloaded(server: RedisServer) -> None:
    """SCRIPT FLUSH under a running broker: the next publish and read load the scripts
    again (NOSCRIPT fallback) and the room's positions go on."""
    async with brokers_on(server.url) as brokers:
        a = await brokers.node("aa")
        first = await a.publish(text("r", b"1"), history=H)
        with server.client() as client:
            client.script_flush()
        second = await a.publish(text("r", b"2"), history=H)
        assert first is not None and second == Position(first.epoch, 2)
        with server.client() as client:
            client.script_flush()
        page = await a.read_history(Room("r"), H, since=0)
        assert [e.payload for e in page.envelopes] == [b"1", b"2"]


async def test_history_read_while_redis_is_down_is_a_broker_error(server: RedisServer) -> None:
    """Reading history with Redis gone raises BrokerError naming the room, and counts it."""
    async with brokers_on(server.url) as brokers:
        a = await brokers.node("aa")
        await a.publish(text("r", b"1"), history=H)
        server.kill()
        with pytest.raises(BrokerError, match="history of room 'r'"):
            await a.read_history(Room("r"), H)
        assert a.stats.history_read_failures == 1
        with pytest.raises(PublishError):
            await a.publish(text("r", b"2"), history=H)


# -- a cluster master failover ----------------------------------------------------------


async def test_cluster_failover_is_a_new_epoch_for_that_shards_rooms_only() -> None:
    """SIGKILL one master of a 3-master cluster with replicas: rooms of its slots get a
    new epoch (offsets going on from what the replica had), rooms of the other masters
    keep theirs; the subscriber's ``resumed`` names the failed shard's room only."""
    with LocalRedisCluster(masters=3, replicas=1) as local:
        async with brokers_on(local.url) as brokers:
            inbox, resumed = Inbox(), []
            a = await brokers.node("aa")
            b = await brokers.node("bb", inbox, resumed)
            owners = local.slot_owners()
            rooms: dict[int, Room] = {}
            for i in range(10_000):
                room = Room(f"shard{i}")
                port = owners[key_slot(f"hr:room:{room}".encode())]
                rooms.setdefault(port, room)
                if len(rooms) == 3:
                    break
            for room in rooms.values():
                await b.subscribe(room)
            before = {room: [await a.publish(text(room, b"%d" % i), history=H)
                             for i in range(3)] for room in rooms.values()}
            await inbox.wait_until(lambda: len(inbox.envelopes) == 9)
            victim = max(rooms)
            victim_room = rooms[victim]
            slot = key_slot(f"hr:room:{victim_room}".encode())
            local.server(victim).kill()
            await asyncio.to_thread(local.wait_for_new_master, slot, victim)
            for port, room in rooms.items():
                after = await publish_until_taken(a, room, b"after")
                last = before[room][-1]
                assert last is not None
                if port == victim:
                    assert after.epoch != last.epoch
                    assert 1 <= after.offset <= last.offset + 1
                else:
                    assert after == Position(last.epoch, last.offset + 1)
            await eventually(lambda: bool(resumed), timeout=DEADLINE)
            assert set().union(*resumed) == {victim_room}


async def test_cluster_master_restarted_with_aof_always_keeps_the_epoch() -> None:
    """On a cluster without replicas, a master with appendonly yes + appendfsync always
    SIGKILLed and restarted keeps its rooms' epochs; offsets continue."""
    with LocalRedisCluster(masters=3, extra_args=AOF_ALWAYS) as local:
        async with brokers_on(local.url) as brokers:
            a = await brokers.node("aa")
            before = [await a.publish(text("r", b"%d" % i), history=H) for i in range(3)]
            last = before[-1]
            assert last is not None
            master = local.master_of("hr:room:r")
            local.server(master).kill()
            local.server(master).start()
            await asyncio.to_thread(local.wait_until_ok)
            after = await publish_until_taken(a, "r", b"after")
            assert after == Position(last.epoch, last.offset + 1)


async def test_cluster_slot_migration_resumes_the_room_and_starts_a_new_epoch() -> None:
    """A room's slot migrated to another master (its keys with it): the subscriber's
    ``resumed`` names the room once it is subscribed on the new master; the next publish
    works there, in a new epoch (a moved key cannot be told from one restored after a
    loss) with offsets going on, and the history moved along."""
    with LocalRedisCluster(masters=3) as local:
        async with brokers_on(local.url) as brokers:
            inbox, resumed = Inbox(), []
            a = await brokers.node("aa")
            b = await brokers.node("bb", inbox, resumed)
            room = Room("moving")
            await b.subscribe(room)
            before = [await a.publish(text(room, b"%d" % i), history=H) for i in range(3)]
            last = before[-1]
            assert last is not None
            slot = key_slot(b"hr:room:moving")
            source = local.master_of("hr:room:moving")
            target = next(p for p in local.master_ports() if p != source)
            await asyncio.to_thread(local.migrate_slot, slot, target)
            after = await publish_until_taken(a, room, b"after")
            assert after.epoch != last.epoch and after.offset == last.offset + 1
            await eventually(lambda: bool(resumed), timeout=DEADLINE)
            assert set().union(*resumed) == {room}
            await inbox.wait_for_payload(b"after")
            page = await b.read_history(room, H, since=0)
            assert [e.payload for e in page.envelopes] == [b"0", b"1", b"2", b"after"]
