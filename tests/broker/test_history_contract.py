"""The history contract of every broker: the same test bodies on the in-process broker
``[memory]``, one real redis-server ``[redis]`` and a real 3-master Redis Cluster
``[cluster]``.

Positions count up by one, every subscribed node (the publisher's too) gets each message
with its position in offset order, history reads are exact about what they hold (size,
age, limit), idempotent publishes are stored once, and a lost room state is a new epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from roomcast.broker.base import Broker
from roomcast.broker.memory import MemoryBroker, MemoryBus
from roomcast.shared.envelope import Envelope, Kind
from roomcast.shared.errors import BrokerError
from roomcast.shared.history import EPOCH, LIMIT, WINDOW, History, Position
from roomcast.shared.ids import NodeId, Room
from tests.broker.helpers import Backend, Inbox, envelope

R = Room("lobby")
H = History(size=50, ttl=60)


class FakeClock:
    """A monotonic clock the memory bus reads; tests move it forward."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class HNode:
    """A started broker, its inbox and the rooms ``resumed`` reported."""

    id: str
    broker: Broker
    inbox: Inbox
    resumed: list[frozenset[Room]] = field(default_factory=list)

    def positions(self, room: str = R) -> list[tuple[str, int]]:
        """(epoch, offset) of the room's envelopes received so far, in order."""
        return [(e.epoch, e.offset) for e in self.inbox.envelopes
                if e.kind is Kind.ROOM and e.target == room]

    async def wait_count(self, count: int, room: str = R, timeout: float = 10.0) -> None:
        """Return once ``count`` envelopes of ``room`` were received."""
        await self.inbox.wait_until(lambda: len(self.positions(room)) >= count, timeout)


class World:
    """The brokers of one test, on memory, one Redis or a cluster; closed after."""

    def __init__(self, kind: str, make: Callable[[], Broker]) -> None:
        self.kind = kind
        self._make = make
        self.nodes: list[HNode] = []
        self.clock = FakeClock()
        self.forget_room: Callable[[str], None] = lambda room: None
        self.stored: Callable[[str], int] = lambda room: 0
        """How many messages of ``room`` are kept (Redis: XLEN of its stream)."""

    async def node(self, name: str) -> HNode:
        """A started broker as node ``name``."""
        broker = self._make()
        inbox = Inbox()
        made = HNode(name, broker, inbox)
        await broker.start(NodeId(name), inbox, resumed=made.resumed.append)
        self.nodes.append(made)
        return made

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass for the history's age limits (a fake clock on memory)."""
        if self.kind == "memory":
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)  # Redis' own clock must move: the subject here

    async def close(self) -> None:
        for made in reversed(self.nodes):
            await made.broker.close()


@pytest.fixture(params=["memory", "redis", "cluster"])
async def world(request: pytest.FixtureRequest) -> AsyncIterator[World]:
    """This test's brokers: in process, or on a real Redis / Redis Cluster."""
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "memory":
            bus = MemoryBus()
            made = World("memory", lambda: MemoryBroker(bus))
            bus.clock = made.clock

            def forget(room: str) -> None:
                made.clock.now += H.meta_ttl + 1  # the room's state expires

            made.stored = lambda room: len(bus.histories[Room(room)].entries)
        else:
            if request.param == "cluster":
                local = request.getfixturevalue("shared_cluster")
                backend = Backend("cluster", local.servers, local)
            else:
                backend = Backend("redis", [request.getfixturevalue("redis_server")])
            stack.push_async_callback(backend.close)
            made = World(request.param, backend.broker)

            def forget(room: str) -> None:
                key = backend.keys.history_meta(room)
                with backend.client(key) as client:  # as an eviction would
                    assert client.delete(key) == 1

            def stored(room: str) -> int:
                key = backend.keys.history_stream(room)
                with backend.client(key) as client:
                    return int(client.xlen(key))

            made.stored = stored
        made.forget_room = forget
        stack.push_async_callback(made.close)
        yield made


def text(room: str, payload: bytes, origin: str = "", exclude: str = "") -> Envelope:
    """A room envelope without a position."""
    return envelope(Kind.ROOM, room, payload, origin=origin, exclude=exclude)


_rooms = itertools.count()


def fresh_room() -> Room:
    """A room name no other test used (the cluster is shared between tests)."""
    return Room(f"hist{next(_rooms)}")


async def test_positions_count_up_by_one_and_reach_every_subscriber(world: World) -> None:
    """Offsets 1, 2, 3... in one epoch; every subscribed node, the publisher included,
    gets each message with the position publish returned, in order; others get none."""
    room = fresh_room()
    a, b, c = await world.node("aa"), await world.node("bb"), await world.node("cc")
    await a.broker.subscribe(room)
    await b.broker.subscribe(room)
    returned = [await a.broker.publish(text(room, b"m%d" % i, origin="aa"), history=H)
                for i in range(5)]
    assert all(isinstance(p, Position) for p in returned)
    epoch = returned[0].epoch  # type: ignore[union-attr]
    assert returned == [Position(epoch, i) for i in range(1, 6)]
    for member in (a, b):
        await member.wait_count(5, room)
        assert member.positions(room) == [(epoch, i) for i in range(1, 6)]
        assert [e.payload for e in member.inbox.envelopes] == [b"m%d" % i for i in range(5)]
    assert c.positions(room) == []


async def test_concurrent_publishers_get_distinct_contiguous_offsets(world: World) -> None:
    """Publishes from two nodes at once get offsets 1..N with none repeated, and every
    subscriber receives them in offset order."""
    room = fresh_room()
    a, b = await world.node("aa"), await world.node("bb")
    await a.broker.subscribe(room)
    await b.broker.subscribe(room)
    results = await asyncio.gather(*(
        node.broker.publish(text(room, b"%s%d" % (node.id.encode(), i), origin=node.id),
                            history=H)
        for i in range(40) for node in (a, b)))
    offsets = sorted(p.offset for p in results if p is not None)
    assert offsets == list(range(1, 81))
    for member in (a, b):
        await member.wait_count(80, room)
        assert [o for _, o in member.positions(room)] == list(range(1, 81))


async def test_room_without_history_is_published_as_before(world: World) -> None:
    """No history: publish returns None, no position on the wire, no echo to the
    publisher, and the room's history is not touched."""
    room = fresh_room()
    a, b = await world.node("aa"), await world.node("bb")
    await a.broker.subscribe(room)
    await b.broker.subscribe(room)
    assert await a.broker.publish(text(room, b"plain", origin="aa")) is None
    assert await a.broker.publish(text(room, b"size0", origin="aa"), history=History(0)) is None
    await b.wait_count(2, room)
    assert b.positions(room) == [("", 0), ("", 0)]
    page = await a.broker.read_history(room, H)
    assert page.top == 0
    assert page.envelopes == ()
    assert a.positions(room) == []


async def test_reading_an_empty_room_fixes_its_epoch(world: World) -> None:
    """A read before any publish makes the room's epoch (top 0); the first publish then
    gets offset 1 in that same epoch, and reading again gives the same epoch."""
    room = fresh_room()
    a = await world.node("aa")
    first = await a.broker.read_history(room, H)
    assert first.top == 0 and first.envelopes == () and not first.more
    again = await a.broker.read_history(room, H, since=0)
    assert again.epoch == first.epoch
    assert await a.broker.publish(text(room, b"x"), history=H) == Position(first.epoch, 1)


async def test_history_reads_latest_and_since(world: World) -> None:
    """since=None reads the latest messages; since=k the ones after k; limit bounds the
    page (the newest ones, ``more`` set); limit 0 reads the position only."""
    room = fresh_room()
    a = await world.node("aa")
    for i in range(10):
        await a.broker.publish(text(room, b"m%d" % i), history=H)
    latest = await a.broker.read_history(room, H, limit=3)
    assert [e.offset for e in latest.envelopes] == [8, 9, 10]
    assert latest.more and latest.top == 10
    assert [e.payload for e in latest.envelopes] == [b"m7", b"m8", b"m9"]
    since = await a.broker.read_history(room, H, since=6, limit=10)
    assert [e.offset for e in since.envelopes] == [7, 8, 9, 10]
    assert not since.more
    assert since.gap(Position(since.epoch, 6)) is None
    assert all(e.epoch == since.epoch and e.target == room for e in since.envelopes)
    over = await a.broker.read_history(room, H, since=2, limit=5)
    assert over.more and [e.offset for e in over.envelopes] == [6, 7, 8, 9, 10]
    assert over.gap(Position(over.epoch, 2)) == LIMIT
    exact = await a.broker.read_history(room, H, since=5, limit=5)
    assert not exact.more and exact.gap(Position(exact.epoch, 5)) is None
    bare = await a.broker.read_history(room, H, since=3, limit=0)
    assert bare.envelopes == () and bare.more and bare.top == 10
    none_after = await a.broker.read_history(room, H, since=10, limit=0)
    assert not none_after.more and none_after.gap(Position(none_after.epoch, 10)) is None


async def test_history_is_trimmed_to_its_size(world: World) -> None:
    """Past ``size`` messages the oldest go: a position before them is not recoverable
    (window), the newest ``size`` exactly still are, and what is stored stays bounded."""
    room = fresh_room()
    small = History(size=5, ttl=60)
    a = await world.node("aa")
    for i in range(12):
        await a.broker.publish(text(room, b"m%d" % i), history=small)
    page = await a.broker.read_history(room, small, since=0, limit=100)
    assert [e.offset for e in page.envelopes] == [8, 9, 10, 11, 12]
    assert page.gap(Position(page.epoch, 0)) == WINDOW
    assert page.gap(Position(page.epoch, 6)) == WINDOW
    tail = await a.broker.read_history(room, small, since=7, limit=100)
    assert tail.gap(Position(tail.epoch, 7)) is None
    latest = await a.broker.read_history(room, small, limit=100)
    assert [e.offset for e in latest.envelopes] == [8, 9, 10, 11, 12] and not latest.more
    await asyncio.gather(*(a.broker.publish(text(room, b"x"), history=small)
                           for _ in range(300)))
    page = await a.broker.read_history(room, small, since=300, limit=100)
    assert [e.offset for e in page.envelopes] == [308, 309, 310, 311, 312]
    assert world.stored(room) <= small.size + 100  # approximate trimming on Redis


async def test_history_is_trimmed_by_age(world: World) -> None:
    """Messages older than ``ttl`` are not served (window), even with no publish since;
    a later publish continues the same epoch's offsets."""
    room = fresh_room()
    brief = History(size=50, ttl=0.3)
    a = await world.node("aa")
    first = await a.broker.publish(text(room, b"old"), history=brief)
    assert first is not None
    await world.advance(0.6)
    page = await a.broker.read_history(room, brief, since=0)
    assert page.envelopes == () and page.top == 1
    assert page.gap(Position(first.epoch, 0)) == WINDOW
    assert page.gap(first) is None  # nothing was missed after offset 1
    later = await a.broker.publish(text(room, b"new"), history=brief)
    assert later == Position(first.epoch, 2)
    fresh = await a.broker.read_history(room, brief, since=0)
    assert [e.payload for e in fresh.envelopes] == [b"new"]


async def test_idempotent_publish_is_stored_and_sent_once(world: World) -> None:
    """A publish retried with the same key returns the first position and is neither
    stored nor delivered again; another key, or the same key in another room, is new."""
    room, other = fresh_room(), fresh_room()
    a, b = await world.node("aa"), await world.node("bb")
    await b.broker.subscribe(room)
    first = await a.broker.publish(text(room, b"pay"), history=H, idempotency_key="order-1")
    retry = await a.broker.publish(text(room, b"pay"), history=H, idempotency_key="order-1")
    assert first is not None and retry == first
    second = await a.broker.publish(text(room, b"next"), history=H, idempotency_key="order-2")
    assert second == Position(first.epoch, 2)
    elsewhere = await a.broker.publish(text(other, b"x"), history=H, idempotency_key="order-1")
    assert elsewhere is not None and elsewhere.offset == 1
    await b.wait_count(2, room)
    page = await a.broker.read_history(room, H, since=0)
    assert [e.payload for e in page.envelopes] == [b"pay", b"next"]
    assert [e.payload for e in b.inbox.envelopes] == [b"pay", b"next"]
    assert a.broker.stats.duplicates == 1


async def test_recovery_from_a_position_is_exact(world: World) -> None:
    """A member that saw offset k reads k+1..top exactly once, in order, with the same
    payloads the live subscribers got; the envelopes keep origin and exclude."""
    room = fresh_room()
    a, b = await world.node("aa"), await world.node("bb")
    await b.broker.subscribe(room)
    for i in range(8):
        await a.broker.publish(text(room, b"m%d" % i, origin="aa", exclude="aa.1"), history=H)
    await b.wait_count(8, room)
    epoch = b.inbox.envelopes[0].epoch
    page = await b.broker.read_history(room, H, since=3, limit=100)
    assert page.gap(Position(epoch, 3)) is None
    assert page.envelopes == tuple(b.inbox.envelopes[3:])
    assert all(e.origin == "aa" and e.exclude == "aa.1" for e in page.envelopes)


async def test_lost_room_state_is_a_new_epoch(world: World) -> None:
    """When a room's state is gone (expired, evicted), the next publish starts a new
    epoch at offset 1, old positions get ``epoch``, and no old message is served."""
    room = fresh_room()
    a = await world.node("aa")
    old = [await a.broker.publish(text(room, b"o%d" % i), history=H) for i in range(3)]
    world.forget_room(room)
    new = await a.broker.publish(text(room, b"n0"), history=H)
    assert new is not None and old[-1] is not None
    assert new.epoch != old[-1].epoch and new.offset == 1
    page = await a.broker.read_history(room, H, since=0)
    assert [e.payload for e in page.envelopes] == [b"n0"]
    assert page.gap(old[-1]) == EPOCH


async def test_bad_history_calls_are_refused(world: World) -> None:
    """Keys without history, history on a send, a positioned envelope, bad since and
    limit: each a ValueError/TypeError that says what is wrong; nothing is sent."""
    room = fresh_room()
    a = await world.node("aa")
    with pytest.raises(ValueError, match="needs a room with history"):
        await a.broker.publish(text(room, b"x"), idempotency_key="k1")
    with pytest.raises(ValueError, match="visible ASCII"):
        await a.broker.publish(text(room, b"x"), history=H, idempotency_key="has space")
    with pytest.raises(ValueError, match="only room envelopes"):
        await a.broker.publish(envelope(Kind.ALL, "", b"x"), history=H)
    with pytest.raises(ValueError, match="already has a position"):
        await a.broker.publish(text(room, b"x").with_position("e1", 3), history=H)
    with pytest.raises(TypeError, match="History"):
        await a.broker.publish(text(room, b"x"), history=100)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="since"):
        await a.broker.read_history(room, H, since=-1)
    with pytest.raises(ValueError, match="limit"):
        await a.broker.read_history(room, H, limit=10_001)
    with pytest.raises(ValueError, match="no history"):
        await a.broker.read_history(room, History(0))
    with pytest.raises(ValueError, match="room"):
        await a.broker.read_history(Room(""), H)
    page = await a.broker.read_history(room, H)
    assert page.top == 0


async def test_history_calls_need_a_started_broker(world: World) -> None:
    """Publishing or reading history before start() is a BrokerError, not a hang."""
    made = world._make()
    with pytest.raises(BrokerError):
        await made.publish(text("r", b"x"), history=H)
    with pytest.raises(BrokerError):
        await made.read_history(Room("r"), H)
    await made.close()


async def test_memory_link_loss_reports_the_subscribed_rooms_when_restored() -> None:
    """MemoryBroker.lose_link drops what comes meanwhile; restore_link reports every
    subscribed room to ``resumed`` once, and the gap can be read from the history."""
    bus = MemoryBus()
    a, b = MemoryBroker(bus), MemoryBroker(bus)
    inbox, resumed = Inbox(), []
    await a.start(NodeId("aa"), Inbox())
    await b.start(NodeId("bb"), inbox, resumed=resumed.append)
    await b.subscribe(R)
    await b.subscribe(Room("other"))
    b.lose_link()
    assert not b.connected
    await a.publish(text(R, b"missed"), history=H)
    b.restore_link()
    assert b.connected and resumed == [frozenset({R, Room("other")})]
    await a.publish(text(R, b"live"), history=H)
    await inbox.wait_for_payload(b"live")
    assert inbox.payloads == [b"live"]
    page = await b.read_history(R, H, since=0)
    assert [e.payload for e in page.envelopes] == [b"missed", b"live"]
    await a.close()
    await b.close()


@pytest.mark.parametrize("name", ["a{b}c", "{}", "x}", "{y", "chat:{1}:z", "ü {ö}"])
async def test_room_names_with_braces_keep_history(world: World, name: str) -> None:
    """Room names with braces (a Redis Cluster hash tag in the channel's name) still put
    the room's keys and channel in one slot: publish, deliver and read all work."""
    room = Room(f"{name}{next(_rooms)}")
    a, b = await world.node("aa"), await world.node("bb")
    await b.broker.subscribe(room)
    first = await a.broker.publish(text(room, b"1"), history=H, idempotency_key="k")
    second = await a.broker.publish(text(room, b"2"), history=H)
    assert first is not None and second == Position(first.epoch, 2)
    await b.wait_count(2, room)
    assert b.positions(room) == [(first.epoch, 1), (first.epoch, 2)]
    page = await b.broker.read_history(room, H, since=0)
    assert [e.payload for e in page.envelopes] == [b"1", b"2"]


async def test_memory_idempotency_keys_and_room_states_expire() -> None:
    """On the memory bus an idempotency key is remembered for max(ttl, 300 s), then a
    publish with it is new; expired room states are swept, so memory stays bounded."""
    clock = FakeClock()
    bus = MemoryBus(clock=clock)
    broker = MemoryBroker(bus)
    await broker.start(NodeId("aa"), Inbox())
    short = History(size=10, ttl=1)
    first = await broker.publish(text(R, b"x"), history=short, idempotency_key="k")
    clock.now += 299
    assert await broker.publish(text(R, b"x"), history=short, idempotency_key="k") == first
    clock.now += 2
    again = await broker.publish(text(R, b"x"), history=short, idempotency_key="k")
    assert first is not None and again == Position(first.epoch, 2)
    clock.now += short.meta_ttl + 1
    for i in range(1100):  # enough calls for a sweep
        await broker.read_history(Room(f"other{i}"), short, limit=0)
    assert R not in bus.histories and not bus._idempotency
    await broker.close()
