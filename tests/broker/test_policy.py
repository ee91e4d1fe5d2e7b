"""RedisBroker's rules over a fake transport (no Redis): failing fast per part of Redis,
skipping presence writes until a re-sync, repairing lost and moved subscriptions, and a
bounded close; plus the Pipeliner, stop_tasks and the pub/sub reader they rest on."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from roomcast.broker._scripts import HEARTBEAT, READ_MEMBERS, RESYNC
from roomcast.broker._transport import (
    Command,
    Listener,
    Pipeliner,
    disconnect,
    read_replies,
    stop_tasks,
)
from roomcast.broker.redis import RedisBroker
from roomcast.shared.envelope import Kind
from roomcast.shared.errors import PublishError
from roomcast.shared.ids import ConnectionId, NodeId, Room
from tests.broker.helpers import Inbox, envelope, eventually
from tests.redis_server import RedisServer

R = Room("lobby")


class FakeTransport:
    """A Transport that records every command and fails the domains it is told to."""

    publish_command = "PUBLISH"

    def __init__(self) -> None:
        self.commands: list[tuple[str, Command]] = []
        self.domains: dict[str, str] = {}
        """route -> failure domain; "" for routes not listed."""
        self.down: set[str] = set()
        """Failure domains whose commands raise ConnectionError."""
        self.listener: Listener | None = None
        self.wanted: set[str] = set()
        self.repairs = 0
        self.repair_blocks: asyncio.Event | None = None
        """When set, repair() waits for it, ignoring cancellation (a stuck library call)."""
        self.repaired: frozenset[str] | None = None
        """What repair() says it subscribed again (None: every wanted channel)."""
        self.closed = False

    def describe(self, exc: BaseException) -> str:
        return f"fake Redis: {exc}"

    def failure_domain(self, route: str) -> str:
        return self.domains.get(route, "")

    def sent(self, name: str) -> list[Command]:
        """The commands named ``name`` (or EVALs of script ``name``) sent so far."""
        return [c for _, c in self.commands if c[0] == name or (c[0] == "EVAL" and c[1] == name)]

    async def execute(self, route: str, *commands: Command) -> list[Any]:
        await asyncio.sleep(0)
        if self.failure_domain(route) in self.down:
            raise RedisConnectionError(f"{self.failure_domain(route) or 'server'} is down")
        self.commands.extend((route, c) for c in commands)
        return [self._reply(c) for c in commands]

    async def execute_now(self, route: str, *commands: Command) -> list[Any]:
        return await self.execute(route, *commands)

    async def publish(self, channel: str, data: bytes) -> None:
        await self.execute(channel, ("PUBLISH", channel, data))

    async def start(self, listener: Listener, channels: Collection[str]) -> None:
        self.listener = listener
        self.wanted.update(channels)

    async def subscribe(self, channel: str) -> None:
        self.wanted.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self.wanted.discard(channel)

    async def repair(self) -> tuple[frozenset[str], bool]:
        self.repairs += 1
        if self.repair_blocks is not None:
            while not self.repair_blocks.is_set():
                try:
                    await self.repair_blocks.wait()
                except asyncio.CancelledError:
                    continue  # a call that does not let go when cancelled
        if "" in self.down:
            raise RedisConnectionError("still down")
        return (frozenset(self.wanted) if self.repaired is None else self.repaired), True

    async def close(self) -> None:
        self.closed = True

    def _reply(self, command: Command) -> Any:
        if command[0] == "EVAL" and command[1] == HEARTBEAT:
            return [0, [], []]
        if command[0] == "EVAL" and command[1] == READ_MEMBERS:
            return [b"100", b"0", [], []]
        return 1


async def started(fake: FakeTransport, resumed: Any = None, **options: Any) -> RedisBroker:
    """A RedisBroker over ``fake``, started as node ``a``."""
    timing = {"heartbeat_interval": 0.05, "presence_ttl": 0.5, "reconnect_max_delay": 0.05,
              "socket_timeout": 0.2, **options}
    broker = RedisBroker("redis://fake.invalid:1/0", **timing)
    broker._transport = fake
    await broker.start(NodeId("a"), Inbox(), resumed=resumed)
    return broker


@pytest.fixture
def fake() -> FakeTransport:
    """A fake transport for one broker."""
    return FakeTransport()


def room_env(room: str) -> Any:
    return envelope(Kind.ROOM, room, b"x", origin="a")


# -- failing fast --------------------------------------------------------------------


async def test_publish_fails_fast_only_in_the_failing_domain_until_probed(
    fake: FakeTransport,
) -> None:
    """After a failed publish, publishes to that part of Redis fail at once (counted, never
    sent), others go on; once a PING to it gets through, publishes there try again."""
    broker = await started(fake)
    fake.domains = {"roomcast:room:r1": "m1", "roomcast:room:r2": "m2"}
    try:
        fake.down = {"m1"}
        with pytest.raises(PublishError, match="m1 is down"):
            await broker.publish(room_env("r1"))
        sent = len(fake.commands)
        with pytest.raises(PublishError, match="failing fast"):
            await broker.publish(room_env("r1"))
        assert len(fake.commands) == sent  # refused without reaching the transport
        await broker.publish(room_env("r2"))
        assert broker.stats.publish_failures == 2 and broker.stats.published == 1
        assert broker.connected  # publishing trouble is not a lost subscription
        fake.down = set()
        await eventually(lambda: not broker._failing, timeout=5)  # a heartbeat's PING
        assert ("roomcast:room:r1", ("PING",)) in fake.commands
        await broker.publish(room_env("r1"))
        assert broker.stats.published == 2
    finally:
        await broker.close()


# -- presence ------------------------------------------------------------------------


async def test_presence_writes_wait_for_the_resync_after_a_failure(fake: FakeTransport) -> None:
    """A failed presence write makes later writes skip Redis (no wait for timeouts) until
    a heartbeat re-applies the whole local mirror in one script; then writes go again."""
    broker = await started(fake, heartbeat_interval=0.05)
    try:
        fake.down = {""}
        await broker.add_presence(R, ConnectionId("a.1"))  # fails, never raises
        await broker.add_presence(R, ConnectionId("a.2"))
        await broker.remove_presence(ConnectionId("a.1"), [R])
        assert broker._presence_dirty
        fake.commands.clear()
        fake.down = set()
        await eventually(lambda: bool(fake.sent(RESYNC)), timeout=5)
        (resync,) = fake.sent(RESYNC)
        assert resync[-2:] == (R, "a.2")  # the mirror: only a.2 is left
        assert not fake.sent("HSET") and not broker._presence_dirty
        await broker.add_presence(R, ConnectionId("a.3"))
        assert ("HSET", "roomcast:presence:lobby", "a.3", "a") in fake.sent("HSET")
    finally:
        await broker.close()


# -- re-subscribing ------------------------------------------------------------------


async def test_lost_link_is_repaired_and_presence_re_registered_before_connected(
    fake: FakeTransport,
) -> None:
    """A lost link turns connected off; repairs retry with backoff while Redis is away;
    once every channel is back, presence is re-synced, then connected turns on, counted."""
    broker = await started(fake)
    try:
        await broker.add_presence(R, ConnectionId("a.1"))
        await broker.subscribe(R)
        fake.down = {""}
        assert fake.listener is not None
        fake.listener.on_unsubscribed(["roomcast:room:lobby"], True)
        assert not broker.connected
        await eventually(lambda: fake.repairs >= 2, timeout=5)
        assert not broker.connected
        fake.commands.clear()
        fake.down = set()
        await eventually(lambda: broker.connected, timeout=5)
        assert fake.sent(RESYNC)  # re-registered before connected
        assert broker.stats.reconnects == 1
        assert broker.stats.resubscribes == len(fake.wanted) == 3
    finally:
        await broker.close()


async def test_moved_channels_are_repaired_without_a_reconnect(fake: FakeTransport) -> None:
    """Channels the server moved (not lost) are re-placed at once, stay connected, and
    count as resubscribes but not as a reconnect."""
    broker = await started(fake)
    try:
        assert fake.listener is not None
        fake.listener.on_unsubscribed(["roomcast:room:lobby"], False)
        assert broker.connected
        await eventually(lambda: fake.repairs == 1, timeout=5)
        await eventually(lambda: broker.stats.resubscribes > 0, timeout=5)
        assert broker.stats.reconnects == 0 and broker.connected
    finally:
        await broker.close()


async def test_resumed_gets_the_subscribed_rooms_of_the_channels_repaired(
    fake: FakeTransport,
) -> None:
    """After a lost link, ``resumed`` gets exactly the subscribed rooms whose channels
    came back (not the node's own channels, not a room left meanwhile); a first
    subscribe reports nothing."""
    reported: list[frozenset[Room]] = []
    broker = await started(fake, resumed=reported.append)
    try:
        for room in ("lobby", "news", "gone"):
            await broker.subscribe(Room(room))
        await broker.unsubscribe(Room("gone"))
        assert reported == []
        assert fake.listener is not None
        fake.listener.on_unsubscribed(["roomcast:room:lobby"], True)
        await eventually(lambda: bool(reported), timeout=5)
        assert reported == [frozenset({Room("lobby"), Room("news")})]
        assert broker.stats.resumed_rooms == 2
    finally:
        await broker.close()


async def test_moved_channel_resumes_only_its_room(fake: FakeTransport) -> None:
    """A channel the server moved resumes its one room once it is placed again; a
    resumed callback that raises is logged and does not stop the repairs."""
    reported: list[frozenset[Room]] = []

    def resumed(rooms: frozenset[Room]) -> None:
        reported.append(rooms)
        raise RuntimeError("a bug in the hub")

    broker = await started(fake, resumed=resumed)
    try:
        await broker.subscribe(Room("lobby"))
        await broker.subscribe(Room("news"))
        fake.repaired = frozenset({"roomcast:room:news"})
        assert fake.listener is not None
        fake.listener.on_unsubscribed(["roomcast:room:news"], False)
        await eventually(lambda: bool(reported), timeout=5)
        assert reported == [frozenset({Room("news")})]
        fake.listener.on_unsubscribed(["roomcast:room:news"], False)
        await eventually(lambda: len(reported) == 2, timeout=5)
    finally:
        await broker.close()


# -- closing -------------------------------------------------------------------------


async def test_close_is_bounded_when_a_repair_never_lets_go(fake: FakeTransport) -> None:
    """A repair stuck in a call that ignores cancellation does not hold close(): the
    background tasks get the socket timeout to stop, then close goes on without them."""
    broker = await started(fake, socket_timeout=0.2)
    fake.repair_blocks = asyncio.Event()
    assert fake.listener is not None
    fake.listener.on_unsubscribed(["roomcast:all"], True)
    await eventually(lambda: fake.repairs == 1, timeout=5)
    try:
        async with asyncio.timeout(5):
            await broker.close()
        assert fake.closed
    finally:
        fake.repair_blocks.set()  # let the stuck task end: it sees the broker closed
        assert broker._supervisor is not None
        await asyncio.wait([broker._supervisor], timeout=5)
    assert broker._supervisor.done()


async def test_close_is_bounded_when_redis_never_answers(fake: FakeTransport) -> None:
    """The withdrawal of presence at close gives up after twice the socket timeout."""
    broker = await started(fake, socket_timeout=0.2)
    never = asyncio.Event()

    async def hang(route: str, *commands: Command) -> list[Any]:
        await never.wait()
        return []

    fake.execute = hang  # type: ignore[method-assign]
    async with asyncio.timeout(5):
        await broker.close()
    assert fake.closed


# -- the pieces underneath -------------------------------------------------------------


class Recorder:
    """A Pipeliner send that records each batch and answers each command with its index."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.batches: list[list[Command]] = []
        self.fail = fail

    async def __call__(self, commands: list[Command]) -> list[Any]:
        self.batches.append(list(commands))
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        return [command[1] for command in commands]


async def test_pipeliner_batches_one_loop_turn_and_splits_replies() -> None:
    """Commands queued in one turn go in one batch; each caller gets its own replies."""
    send = Recorder()
    pipeliner = Pipeliner(send, 1.0)
    replies = await asyncio.gather(
        *(pipeliner.execute(("SET", f"k{i}"), ("GET", f"g{i}")) for i in range(50))
    )
    assert pipeliner.batches == 1 and len(send.batches) == 1
    assert replies == [[f"k{i}", f"g{i}"] for i in range(50)]


async def test_pipeliner_keeps_call_order_across_batches() -> None:
    """Commands queued while a batch is in flight go in the next one, in call order."""
    send = Recorder()
    pipeliner = Pipeliner(send, 1.0)
    first = asyncio.ensure_future(pipeliner.execute(("C", 0)))
    await asyncio.sleep(0)  # the first batch is in flight
    rest = [asyncio.ensure_future(pipeliner.execute(("C", i))) for i in range(1, 5)]
    await asyncio.gather(first, *rest)
    assert send.batches == [[("C", 0)], [("C", i) for i in range(1, 5)]]


async def test_cancelled_caller_does_not_cancel_its_batch() -> None:
    """A caller that stops waiting leaves the batch, and the others' replies, intact."""
    send = Recorder()
    pipeliner = Pipeliner(send, 1.0)
    first = asyncio.create_task(pipeliner.execute(("SET", "a")))
    second = asyncio.create_task(pipeliner.execute(("SET", "b"), ("GET", "a")))
    await asyncio.sleep(0)  # one loop turn: both tasks queue their commands
    first.cancel()
    assert await second == ["b", "a"]
    assert first.cancelled() and pipeliner.batches == 1
    assert send.batches == [[("SET", "a"), ("SET", "b"), ("GET", "a")]]


async def test_pipeliner_failure_reaches_every_caller_of_the_batch() -> None:
    """When the batch cannot be sent, every caller awaiting it gets the error."""
    pipeliner = Pipeliner(Recorder(fail=RedisConnectionError("gone")), 1.0)
    results = await asyncio.gather(
        *(pipeliner.execute(("PUBLISH", b"x")) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, RedisConnectionError) for r in results)


async def test_pipeliner_batch_is_bounded_and_close_releases_its_callers() -> None:
    """A batch with no answer fails after twice the timeout; close() fails what waits."""
    never = asyncio.Event()

    async def hang(commands: list[Command]) -> list[Any]:
        await never.wait()
        return []

    pipeliner = Pipeliner(hang, 0.05)
    with pytest.raises(TimeoutError):
        await pipeliner.execute(("PING",))
    waiting = asyncio.ensure_future(pipeliner.execute(("PING",)))
    await asyncio.sleep(0)
    async with asyncio.timeout(1):
        await pipeliner.close(0.01)
    with pytest.raises(RedisConnectionError, match="closed"):
        await waiting


async def test_stop_tasks_waits_a_bounded_time_and_never_swallows_its_own_cancel() -> None:
    """stop_tasks cancels and awaits tasks; one that ignores cancellation is left after
    the grace period; and cancelling the caller while it waits cancels the caller (the
    flaw that let RedisClusterBroker.close() hang: a suppressed CancelledError)."""
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    polite = asyncio.create_task(asyncio.sleep(60))
    stuck = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(2):
        await stop_tasks([polite, stuck, None], 0.05)
    assert polite.cancelled() and not stuck.done()

    stopper = asyncio.create_task(stop_tasks([stuck], 30))
    await asyncio.sleep(0.01)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(2):
            await stopper
    release.set()
    await stuck


async def test_a_pubsub_reader_never_reconnects_a_link_closed_under_it(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idle PING of a pub/sub reader whose connection was closed under it (a close()
    that stopped waiting for the reader) raises "closed" instead of letting redis-py
    connect again: nobody would ever close that connection. Real server: a reconnect
    would succeed."""
    conn = Connection(host="127.0.0.1", port=redis_server.port, socket_timeout=1.0)
    await conn.connect()  # type: ignore[no-untyped-call]
    await disconnect(conn)  # closed; the reader below waits on, as a late reader would
    never = asyncio.Event()

    async def silent(*args: Any, **kwargs: Any) -> Any:
        await never.wait()

    monkeypatch.setattr(conn, "read_response", silent)
    with pytest.raises(RedisConnectionError, match="closed"):
        async with asyncio.timeout(5):
            await read_replies(conn, lambda reply: None, idle=0.05, pong_wait=1.0,
                               name="the test server")
    assert not conn.is_connected
