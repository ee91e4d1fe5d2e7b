"""The hub with roomcast.v1 clients and rooms with history, over real sockets.

Nodes run on MemoryBus brokers (the broker's history semantics are the same on Redis;
tests/node/test_cluster_contract.py runs the cross-node cases on Redis too). Frames are
read raw with aiohttp's client, so a duplicate the server sent would show (the Python
client drops duplicates itself); a few tests use that client (``node.client``) as a
user would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web

from roomcast.broker import MemoryBroker, MemoryBus
from roomcast.node import Connection, EventHandler, Hub, HubConfig
from roomcast.node.client import Client, Joined
from roomcast.node.client import Message as ClientMessage
from roomcast.shared.envelope import Envelope
from roomcast.shared.errors import BrokerError, PublishError
from roomcast.shared.history import History, HistoryPage, HistoryPolicy, Position
from roomcast.shared.ids import Room

Serve = Callable[[web.Application], Awaitable[str]]
POLICY = HistoryPolicy(History(size=100, ttl=60), rooms={"plain-*": None})
V1 = ("roomcast.v1",)


class TestBroker(MemoryBroker):
    """A MemoryBroker whose publishes can fail and whose history reads can be held."""

    __test__ = False

    def __init__(self, bus: MemoryBus | None = None) -> None:
        super().__init__(bus)
        self.fail_publish = False
        self.store_then_fail = False
        """Store and publish, then raise PublishError (an answer that never came)."""
        self.echo_before_failure = False
        self.fail_reads = False
        self.gate: asyncio.Event | None = None
        """While set to an unset Event, history reads wait for it."""
        self.read_before_gate = False
        """Read the page first, then wait (else wait, then read)."""
        self.reading = asyncio.Event()

    async def publish(self, envelope: Envelope, *, history: History | None = None,
                      idempotency_key: str | None = None) -> Position | None:
        if self.fail_publish:
            self.stats.publish_failures += 1
            raise PublishError("redis is down (test)", maybe_sent=False)
        position = await super().publish(envelope, history=history,
                                         idempotency_key=idempotency_key)
        if self.store_then_fail:
            if self.echo_before_failure:
                await asyncio.sleep(0)  # the bus hands the stored copy over first
            self.stats.publish_failures += 1
            raise PublishError("timed out (test)")
        return position

    async def read_history(self, room: Room, history: History, *, since: int | None = None,
                           limit: int = 100) -> HistoryPage:
        gate = self.gate
        page = None
        if gate is not None and self.read_before_gate:
            page = await super().read_history(room, history, since=since, limit=limit)
        if gate is not None:
            self.reading.set()
            await gate.wait()
        if self.fail_reads:
            raise BrokerError("redis is down (test)")
        if page is None:
            page = await super().read_history(room, history, since=since, limit=limit)
        return page


@dataclass
class Node:
    hub: Hub
    url: str
    broker: TestBroker
    opened: asyncio.Queue[Connection]


class Harness:
    """Nodes on one bus, and raw v1 sockets to them."""

    def __init__(self, serve: Serve, session: aiohttp.ClientSession) -> None:
        self.serve = serve
        self.session = session
        self.bus = MemoryBus()
        self.nodes: list[Node] = []

    async def node(self, config: HubConfig | None = None) -> Node:
        broker = TestBroker(self.bus)
        hub = Hub(config or HubConfig(history=POLICY), broker=broker)
        opened: asyncio.Queue[Connection] = asyncio.Queue()
        handler = EventHandler(on_open=opened.put)

        async def ws(request: web.Request) -> web.StreamResponse:
            return await hub.upgrade(request, handler, rooms=request.query.getall("room", []),
                                     replay=int(request.query.get("replay", "0")))

        app = web.Application()
        hub.attach(app)
        app.router.add_get("/ws", ws)
        node = Node(hub, (await self.serve(app)).replace("http", "ws") + "/ws", broker,
                    opened)
        self.nodes.append(node)
        return node

    async def connect(self, node: Node, query: str = "", *, v1: bool = True,
                      compress: int = 0) -> Socket:
        ws = await self.session.ws_connect(f"{node.url}?{query}", protocols=V1 if v1 else (),
                                           compress=compress)
        return Socket(ws, node)


@dataclass
class Socket:
    ws: aiohttp.ClientWebSocketResponse
    node: Node

    async def recv(self, timeout: float = 5.0) -> Any:
        """The next frame: a v1 text frame as a dict, a binary one as its header plus
        ``bytes``, a raw text frame as its str."""
        msg = await self.ws.receive(timeout=timeout)
        if msg.type is aiohttp.WSMsgType.TEXT:
            if self.ws.protocol is None:
                return msg.data
            return json.loads(msg.data)
        if msg.type is aiohttp.WSMsgType.BINARY:
            if self.ws.protocol is None:
                return msg.data
            head, _, data = msg.data.partition(b"\n")
            return {**json.loads(head), "bytes": data}
        raise AssertionError(f"expected a frame, got {msg}")

    async def welcome(self) -> str:
        frame = await self.recv()
        assert frame["type"] == "welcome", frame
        return str(frame["connection"])

    async def messages(self, n: int) -> list[tuple[int | None, Any]]:
        """The next ``n`` frames, all messages, as (offset, data)."""
        out = []
        for _ in range(n):
            frame = await self.recv()
            assert frame["type"] == "message", frame
            out.append((frame.get("offset"), frame.get("data", frame.get("bytes"))))
        return out

    async def nothing_more(self, conn_id: str) -> None:
        """No frame is pending: a marker sent now is the next one."""
        await self.node.hub.send_to(conn_id, "__marker__")
        frame = await self.recv()
        assert frame in ({"type": "message", "data": "__marker__"}, "__marker__"), frame


@pytest.fixture
async def harness(serve: Serve) -> AsyncIterator[Harness]:
    async with aiohttp.ClientSession() as session:
        h = Harness(serve, session)
        yield h
        for node in h.nodes:
            await node.hub.close()


def since(room: str, epoch: str, offset: int) -> str:
    return "roomcast.since=" + quote(json.dumps({room: [epoch, offset]}), safe="")


async def test_welcome_first_then_joined_with_position(harness: Harness) -> None:
    """The 101 names roomcast.v1; welcome is the first frame; joining a room with
    history gives its position (offset 0 before any message), replayed 0."""
    node = await harness.node()
    sock = await harness.connect(node, "room=lobby")
    assert sock.ws.protocol == "roomcast.v1"
    first = await sock.recv()
    assert first["type"] == "welcome" and first["protocol"] == "roomcast.v1"
    assert first["node"] == node.hub.node_id
    conn = await node.opened.get()
    assert first["connection"] == conn.id and conn.protocol == "roomcast.v1" and conn.v1
    joined = await sock.recv()
    assert joined == {"type": "joined", "room": "lobby", "epoch": joined["epoch"],
                      "offset": 0, "replayed": 0}


async def test_raw_client_is_unchanged_in_a_room_with_history(harness: Harness) -> None:
    """A client without the subprotocol gets no subprotocol, no welcome, raw messages in
    order, and no replay; a roomcast.since in its query is not even parsed."""
    node = await harness.node()
    raw = await harness.connect(node, "room=lobby&roomcast.since=garbage", v1=False)
    conn = await node.opened.get()
    assert raw.ws.protocol is None and conn.protocol is None and not conn.v1
    for i in range(5):
        await node.hub.broadcast_to_room("lobby", f"m{i}" if i % 2 else f"b{i}".encode())
    assert [await raw.recv() for _ in range(5)] == [
        b"b0", "m1", b"b2", "m3", b"b4"]
    await raw.nothing_more(conn.id)


async def test_positions_count_up_by_one_and_own_echo_is_not_delivered_twice(
        harness: Harness) -> None:
    """Each broadcast returns its position; the v1 member sees offsets 1, 2, 3 ... once
    each (the broker's echo of the node's own publish is dropped)."""
    node = await harness.node()
    sock = await harness.connect(node, "room=lobby")
    me = await sock.welcome()
    joined = await sock.recv()
    epoch = joined["epoch"]
    positions = [await node.hub.broadcast_to_room("lobby", f"m{i}") for i in range(1, 6)]
    assert positions == [Position(epoch, i) for i in range(1, 6)]
    assert await sock.messages(5) == [(i, f"m{i}") for i in range(1, 6)]
    await asyncio.sleep(0)  # let the echoes arrive (they are dropped)
    await sock.nothing_more(me)
    assert node.hub.stats.catchup_gaps_lost == 0


async def test_recovery_is_exactly_once_in_order_without_the_previous_own(
        harness: Harness) -> None:
    """A reconnecting client that declares its position gets what it missed, in order,
    without the message broadcast 'except' its previous connection, then joined
    (recovered), then live messages."""
    node = await harness.node()
    sock = await harness.connect(node, "room=lobby")
    first_id = await sock.welcome()
    epoch = (await sock.recv())["epoch"]
    await node.hub.broadcast_to_room("lobby", "seen")
    assert await sock.messages(1) == [(1, "seen")]
    await sock.ws.close()
    await node.hub.broadcast_to_room("lobby", "missed 1")
    await node.hub.broadcast_to_room_except("lobby", "own", first_id)
    await node.hub.broadcast_to_room("lobby", "missed 2")
    back = await harness.connect(
        node, f"room=lobby&{since('lobby', epoch, 1)}&roomcast.previous={first_id}")
    me = await back.welcome()
    assert await back.messages(2) == [(2, "missed 1"), (4, "missed 2")]
    assert await back.recv() == {"type": "joined", "room": "lobby", "epoch": epoch,
                                 "offset": 4, "recovered": True, "replayed": 2}
    await node.hub.broadcast_to_room("lobby", "live")
    assert await back.messages(1) == [(5, "live")]
    await back.nothing_more(me)
    stats = node.hub.stats
    assert (stats.recoveries, stats.recoveries_failed, stats.messages_recovered) == (1, 0, 2)


@pytest.mark.parametrize(("history", "recovery_max", "declared", "reason"), [
    (History(size=3, ttl=60), 1000, 1, "window"),
    (History(size=100, ttl=60), 2, 1, "limit"),
    (History(size=100, ttl=60), 1000, None, "epoch"),
    (History(size=100, ttl=60), 1000, 99, "epoch"),
])
async def test_recovery_that_cannot_be_served_says_why(
        harness: Harness, history: History, recovery_max: int, declared: int | None,
        reason: str) -> None:
    """Past the window, past recovery_max, another epoch or an offset never given out:
    nothing is replayed and joined says recovered false with the reason and where the
    client now is."""
    node = await harness.node(HubConfig(history=HistoryPolicy(history),
                                        recovery_max=recovery_max))
    first = await harness.connect(node, "room=r")
    await first.welcome()
    epoch = (await first.recv())["epoch"]
    for i in range(6):
        await node.hub.broadcast_to_room("r", f"m{i}")
    claimed = "0ther" if declared is None else epoch
    sock = await harness.connect(node, f"room=r&{since('r', claimed, declared or 1)}")
    me = await sock.welcome()
    assert await sock.recv() == {"type": "joined", "room": "r", "epoch": epoch, "offset": 6,
                                 "recovered": False, "reason": reason, "replayed": 0}
    await sock.nothing_more(me)
    assert node.hub.stats.recoveries_failed == 1


async def test_replay_gives_recent_messages_on_a_join_without_position(
        harness: Harness) -> None:
    """replay=N: a v1 client that declared nothing gets the last N messages first."""
    node = await harness.node()
    for i in range(1, 5):
        await node.hub.broadcast_to_room("r", f"m{i}")  # no member yet: stored only
    sock = await harness.connect(node, "room=r&replay=2")
    await sock.welcome()
    assert await sock.messages(2) == [(3, "m3"), (4, "m4")]
    joined = await sock.recv()
    assert (joined["offset"], joined["replayed"], "recovered" in joined) == (4, 2, False)
    assert node.hub.stats.messages_recovered == 2


async def test_a_replay_longer_than_the_send_buffer_reaches_a_reading_client(
        harness: Harness) -> None:
    """A recovery of more bytes than send_buffer_limit goes out as the client reads it:
    the client is not cut off as a slow consumer and gets everything in order."""
    node = await harness.node(HubConfig(history=POLICY, send_buffer_limit=4096))
    for i in range(1, 41):
        await node.hub.broadcast_to_room("r", f"{i:03d}" + "x" * 400)
    epoch = (await node.hub.room_history("r", limit=0)).epoch
    sock = await harness.connect(node, f"room=r&{since('r', epoch, 0)}")
    me = await sock.welcome()
    got = await sock.messages(40)
    assert [offset for offset, _ in got] == list(range(1, 41))
    assert (await sock.recv())["replayed"] == 40
    await sock.nothing_more(me)
    assert node.hub.stats.slow_consumers == 0


async def test_epoch_change_mid_session_sends_lost(harness: Harness) -> None:
    """The room's history is lost (a new epoch): members get lost, then go on."""
    node = await harness.node()
    sock = await harness.connect(node, "room=r")
    me = await sock.welcome()
    old = (await sock.recv())["epoch"]
    await node.hub.broadcast_to_room("r", "a")
    assert await sock.messages(1) == [(1, "a")]
    del harness.bus.histories[Room("r")]  # as if Redis lost the keys
    position = await node.hub.broadcast_to_room("r", "b")
    assert position is not None and position.epoch != old and position.offset == 1
    assert await sock.recv() == {"type": "lost", "room": "r", "epoch": position.epoch,
                                 "offset": 0, "reason": "epoch"}
    assert await sock.messages(1) == [(1, "b")]
    await sock.nothing_more(me)
    assert node.hub.stats.catchup_gaps_lost == 1


async def test_publish_error_delivers_locally_without_position(harness: Harness) -> None:
    """Redis down: local members still get the message (v1: no position), and the
    caller gets PublishError; the room goes on in order once it is back."""
    node = await harness.node()
    sock = await harness.connect(node, "room=r")
    raw = await harness.connect(node, "room=r", v1=False)
    await sock.welcome()
    await sock.recv()
    node.broker.fail_publish = True
    with pytest.raises(PublishError):
        await node.hub.broadcast_to_room("r", "during")
    assert await sock.recv() == {"type": "message", "room": "r", "data": "during"}
    assert await raw.recv() == "during"
    node.broker.fail_publish = False
    assert await node.hub.broadcast_to_room("r", "after") is not None
    assert await sock.messages(1) == [(1, "after")]
    assert await raw.recv() == "after"


@pytest.mark.parametrize("echo_first", [False, True], ids=["echo-after", "echo-before"])
async def test_publish_stored_but_unanswered_is_delivered_once(
    harness: Harness, echo_first: bool
) -> None:
    """A publish Redis stored but whose answer never came (a frozen Redis that thawed):
    local members get it exactly once, whether the stored copy comes back on the stream
    after the caller was told PublishError (echo-after) or before (echo-before), and the
    room goes on in order."""
    node = await harness.node()
    sock = await harness.connect(node, "room=r")
    raw = await harness.connect(node, "room=r", v1=False)
    me = await sock.welcome()
    await sock.recv()
    node.broker.store_then_fail = True
    node.broker.echo_before_failure = echo_first
    try:
        await node.hub.broadcast_to_room("r", "stored")
    except PublishError as exc:  # not pytest.raises(...) as: its traceback keeps sockets
        maybe_sent = exc.maybe_sent
    else:
        raise AssertionError("the publish did not fail")
    assert maybe_sent
    node.broker.store_then_fail = False
    after = await node.hub.broadcast_to_room("r", "after")
    assert after is not None and after.offset == 2
    got = [await sock.recv(), await sock.recv()]
    assert got[0]["data"] == "stored" and got[1]["data"] == "after"
    assert got[1]["offset"] == 2
    assert [await raw.recv(), await raw.recv()] == ["stored", "after"]
    await sock.nothing_more(me)
    assert not node.hub._unconfirmed


async def test_idempotent_broadcast_is_stored_and_delivered_once(harness: Harness) -> None:
    """A retried broadcast with the same key returns the first position, once."""
    node = await harness.node()
    sock = await harness.connect(node, "room=r")
    me = await sock.welcome()
    await sock.recv()
    first = await node.hub.broadcast_to_room("r", "pay", idempotency_key="k-1")
    again = await node.hub.broadcast_to_room("r", "pay", idempotency_key="k-1")
    assert first == again and first is not None and first.offset == 1
    assert await sock.messages(1) == [(1, "pay")]
    await asyncio.sleep(0)
    await sock.nothing_more(me)
    page = await node.hub.room_history("r")
    assert [e.payload for e in page.envelopes] == [b"pay"]
    with pytest.raises(ValueError, match="has no history"):
        await node.hub.broadcast_to_room("plain-x", "x", idempotency_key="k")


async def test_catch_up_after_the_link_came_back(harness: Harness) -> None:
    """A node whose subscription dropped reads what it missed once the broker reports the
    room resumed, and delivers it in order before what follows."""
    a = await harness.node()
    b = await harness.node()
    sock = await harness.connect(b, "room=r")
    me = await sock.welcome()
    await sock.recv()
    b.broker.lose_link()
    for i in range(1, 4):
        await a.hub.broadcast_to_room("r", f"m{i}")
    b.broker.restore_link()
    await a.hub.broadcast_to_room("r", "m4")
    assert await sock.messages(4) == [(i, f"m{i}") for i in range(1, 5)]
    await sock.nothing_more(me)
    assert b.hub.stats.catchup_gaps_filled == 1
    assert b.hub.stats.catchup_gaps_lost == 0


async def test_gap_seen_on_the_live_path_is_filled_from_history(harness: Harness) -> None:
    """Without any resumed report, a jump in offsets is filled by a history read after
    the grace period, in order."""
    a = await harness.node()
    b = await harness.node()
    sock = await harness.connect(b, "room=r")
    await sock.welcome()
    await sock.recv()
    b.broker._link_lost = True  # drop messages silently, as a lossy link would
    await a.hub.broadcast_to_room("r", "m1")
    await a.hub.broadcast_to_room("r", "m2")
    b.broker._link_lost = False
    await a.hub.broadcast_to_room("r", "m3")
    assert await sock.messages(3) == [(1, "m1"), (2, "m2"), (3, "m3")]
    assert b.hub.stats.catchup_gaps_filled == 1


async def test_gap_past_the_window_is_reported_lost(harness: Harness) -> None:
    """A gap the history no longer holds: lost (window), then what it still holds."""
    config = HubConfig(history=HistoryPolicy(History(size=2, ttl=60)))
    a = await harness.node(config)
    b = await harness.node(config)
    sock = await harness.connect(b, "room=r")
    me = await sock.welcome()
    epoch = (await sock.recv())["epoch"]
    b.broker.lose_link()
    for i in range(1, 6):
        await a.hub.broadcast_to_room("r", f"m{i}")
    b.broker.restore_link()
    assert await sock.recv() == {"type": "lost", "room": "r", "epoch": epoch, "offset": 3,
                                 "reason": "window"}
    assert await sock.messages(2) == [(4, "m4"), (5, "m5")]
    await sock.nothing_more(me)
    assert b.hub.stats.catchup_gaps_lost == 1


@pytest.mark.parametrize("read_before_gate", [False, True])
async def test_live_messages_during_the_join_read_are_neither_lost_nor_doubled(
        harness: Harness, read_before_gate: bool) -> None:
    """Messages published while a joining member's history is read come after its
    joined frame if the read did not hold them, and not again if it did."""
    node = await harness.node()
    other = await harness.connect(node, "room=r")
    await other.welcome()
    epoch = (await other.recv())["epoch"]
    await node.hub.broadcast_to_room("r", "m1")
    node.broker.gate = asyncio.Event()
    node.broker.read_before_gate = read_before_gate
    sock = await harness.connect(node, f"room=r&{since('r', epoch, 0)}")
    me = await sock.welcome()
    await asyncio.wait_for(node.broker.reading.wait(), 5)
    await node.hub.broadcast_to_room("r", "m2")
    await node.hub.broadcast_to_room("r", "m3")
    node.broker.gate.set()
    frames = [await sock.recv() for _ in range(4)]
    got = [(f.get("offset"), f.get("data")) for f in frames if f["type"] == "message"]
    joined = next(f for f in frames if f["type"] == "joined")
    assert got == [(1, "m1"), (2, "m2"), (3, "m3")]
    assert joined["recovered"] is True
    assert joined["offset"] == (1 if read_before_gate else 3)
    await node.hub.broadcast_to_room("r", "m4")
    assert await sock.messages(1) == [(4, "m4")]
    await sock.nothing_more(me)
    assert await other.messages(4) == [(i, f"m{i}") for i in range(1, 5)]


async def test_messages_before_the_first_members_read_reach_every_member(
        harness: Harness) -> None:
    """The room's first member reads the room's position after subscribing; members who
    join meanwhile and what they publish (a burst of reconnecting chat members, each
    with its join notice) reach everyone, though the read already counts them."""
    node = await harness.node()
    node.broker.gate = asyncio.Event()
    node.broker.read_before_gate = False  # the read happens after the publishes
    first = await harness.connect(node, "room=r", v1=False)
    await asyncio.wait_for(node.broker.reading.wait(), 5)
    second = await harness.connect(node, "room=r", v1=False)
    await asyncio.wait_for(node.opened.get(), 5)  # the second (the first waits the read)
    await node.hub.broadcast_to_room("r", "hello")
    node.broker.gate.set()
    assert await first.recv() == "hello"
    assert await second.recv() == "hello"


async def test_unreadable_history_on_join_says_unavailable(harness: Harness) -> None:
    """A history read that fails: recovered false (unavailable) without a position, or a
    plain joined without one when nothing was declared; live messages still flow."""
    node = await harness.node()
    node.broker.fail_reads = True
    sock = await harness.connect(node, f"room=r&{since('r', 'e', 3)}")
    await sock.welcome()
    assert await sock.recv() == {"type": "joined", "room": "r", "recovered": False,
                                 "reason": "unavailable", "replayed": 0}
    fresh = await harness.connect(node, "room=r")
    await fresh.welcome()
    assert await fresh.recv() == {"type": "joined", "room": "r"}
    await node.hub.broadcast_to_room("r", "m")
    assert (await sock.messages(1))[0][1] == "m"
    assert (await fresh.messages(1))[0][1] == "m"
    assert node.hub.stats.recoveries_failed == 1


async def test_room_without_history_and_direct_sends_on_v1(harness: Harness) -> None:
    """Rooms without history: joined without position, messages without one; direct
    sends and broadcasts have no room; leave_room sends left."""
    node = await harness.node()
    sock = await harness.connect(node, "room=plain-a")
    await sock.welcome()
    conn = await node.opened.get()
    assert await sock.recv() == {"type": "joined", "room": "plain-a"}
    assert await node.hub.broadcast_to_room("plain-a", "hi") is None
    assert await sock.recv() == {"type": "message", "room": "plain-a", "data": "hi"}
    await node.hub.broadcast_to_room("plain-a", b"\x00\n")
    assert await sock.recv() == {"type": "message", "room": "plain-a", "bytes": b"\x00\n"}
    assert await node.hub.send_to(conn.id, "direct")
    assert await sock.recv() == {"type": "message", "data": "direct"}
    await conn.send_binary(b"bin")
    assert await sock.recv() == {"type": "message", "bytes": b"bin"}
    await conn.send_text("t")
    assert await sock.recv() == {"type": "message", "data": "t"}
    await node.hub.broadcast("everyone")
    assert await sock.recv() == {"type": "message", "data": "everyone"}
    await node.hub.leave_room(conn, "plain-a")
    assert await sock.recv() == {"type": "left", "room": "plain-a"}
    await node.hub.join_room(conn, "lobby", replay=0)
    assert (await sock.recv())["type"] == "joined"


async def test_compressed_v1_and_raw_members_share_one_broadcast(harness: Harness) -> None:
    """With permessage-deflate, v1 and raw members both get correct frames."""
    node = await harness.node(HubConfig(history=POLICY, enable_compression=True))
    sock = await harness.connect(node, "room=r", compress=15)
    raw = await harness.connect(node, "room=r", v1=False, compress=15)
    await sock.welcome()
    await sock.recv()
    big = "x" * 5000
    await node.hub.broadcast_to_room("r", big)
    await node.hub.broadcast_to_room("r", big.encode())
    assert await sock.messages(2) == [(1, big), (2, big.encode())]
    assert [await raw.recv() for _ in range(2)] == [big, big.encode()]


@pytest.mark.parametrize(("value", "match"), [
    ("%7B", "not valid JSON"),
    (quote('{"r": ["e", -1]}'), "offset of room 'r'"),
])
async def test_bad_since_is_refused_with_400(harness: Harness, value: str, match: str) -> None:
    """A malformed roomcast.since is refused before the upgrade, saying what is wrong."""
    node = await harness.node()
    async with harness.session.get(
        f"{node.url.replace('ws', 'http', 1)}?room=r&roomcast.since={value}",
        headers={"Upgrade": "websocket", "Connection": "Upgrade",
                 "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                 "Sec-WebSocket-Protocol": "roomcast.v1"},
    ) as resp:
        assert resp.status == 400
        assert match in await resp.text()
    assert node.hub.stats.refused_handshake == 1
    async with harness.session.get(
        f"{node.url.replace('ws', 'http', 1)}?roomcast.previous=nodot",
        headers={"Upgrade": "websocket", "Connection": "Upgrade",
                 "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                 "Sec-WebSocket-Protocol": "roomcast.v1"},
    ) as resp:
        assert resp.status == 400
        assert "roomcast.previous" in await resp.text()


async def test_room_history_reads_and_refuses_rooms_without_history(
        harness: Harness) -> None:
    """room_history returns the page; a room without history is a ValueError."""
    node = await harness.node()
    for i in range(3):
        await node.hub.broadcast_to_room("r", f"m{i}")
    page = await node.hub.room_history("r", since=1, limit=10)
    assert [e.offset for e in page.envelopes] == [2, 3] and page.top == 3
    assert node.hub.history_for("r") == POLICY.default
    assert node.hub.history_for("plain-z") is None
    with pytest.raises(ValueError, match="has no history"):
        await node.hub.room_history("plain-z")
    with pytest.raises(ValueError, match="replay must be from 0"):
        node.hub.route(EventHandler(), replay=-1)


async def test_python_client_resumes_through_another_node(harness: Harness) -> None:
    """The Python client against real nodes: it reconnects to another node with its
    positions and ends with every message exactly once, in order."""
    a = await harness.node()
    b = await harness.node()
    async with Client(f"{a.url}?room=r", initial_delay=0.05, heartbeat=None) as client:
        joined = await client.wait_for(Joined, room="r")
        assert joined.position is not None and joined.position.offset == 0
        await a.hub.broadcast_to_room("r", "one")
        assert (await client.next_message()).data == "one"
        position = client.positions["r"]
    for i in range(2, 5):
        await b.hub.broadcast_to_room("r", f"m{i}")
    async with Client(f"{b.url}?room=r", positions={"r": (position.epoch, position.offset)},
                      heartbeat=None) as again:
        got = [await again.next_message() for _ in range(3)]
        assert [(m.data, m.position.offset if m.position else None) for m in got] == [
            ("m2", 2), ("m3", 3), ("m4", 4)]
        rejoined = await again.wait_for(Joined, room="r")
        assert rejoined.recovered is True and rejoined.replayed == 3
        await b.hub.broadcast_to_room("r", "m5")
        message = await again.next_message()
        assert isinstance(message, ClientMessage) and message.data == "m5"
        assert again.duplicates == 0


async def test_a_broadcast_is_framed_once_for_all_v1_members(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Five v1 members and two raw ones in a room: one v1 frame per broadcast, and every
    v1 member gets the same bytes."""
    import roomcast.node.hub as hub_module
    import roomcast.node.v1 as v1_module

    node = await harness.node()
    socks = [await harness.connect(node, "room=r") for _ in range(5)]
    raws = [await harness.connect(node, "room=r", v1=False) for _ in range(2)]
    for sock in socks:
        await sock.welcome()
        await sock.recv()
    made: list[Any] = []
    real = v1_module.message_frame

    def counting(*args: Any, **kwargs: Any) -> Any:
        frame = real(*args, **kwargs)
        made.append(frame)
        return frame

    monkeypatch.setattr(hub_module, "message_frame", counting)
    await node.hub.broadcast_to_room("r", "once")
    await node.hub.broadcast_to_room("plain-none", "nobody")  # no member: no frame
    assert len(made) == 1
    for sock in socks:
        assert await sock.messages(1) == [(1, "once")]
    for raw in raws:
        assert await raw.recv() == "once"


async def test_members_recovering_the_same_messages_share_their_frames(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three clients that missed the same three messages each get all three, exactly
    once and in order, but each message is framed once for all of them (a reconnect
    storm frames a page once, not once per member); one that also missed a fourth gets
    it framed then."""
    import roomcast.node.hub as hub_module
    import roomcast.node.v1 as v1_module

    node = await harness.node()
    first = await harness.connect(node, "room=lobby")
    await first.welcome()
    epoch = (await first.recv())["epoch"]
    await first.ws.close()
    for i in range(1, 4):
        await node.hub.broadcast_to_room("lobby", f"m{i}")
    made: list[tuple[Any, ...]] = []
    real = v1_module.message_frame

    def counting(*args: Any, **kwargs: Any) -> Any:
        made.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(hub_module, "message_frame", counting)
    for _ in range(3):
        back = await harness.connect(node, f"room=lobby&{since('lobby', epoch, 0)}")
        me = await back.welcome()
        assert await back.messages(3) == [(1, "m1"), (2, "m2"), (3, "m3")]
        joined = await back.recv()
        assert (joined["recovered"], joined["replayed"]) == (True, 3)
        await back.nothing_more(me)
        await back.ws.close()
    assert [args[3] for args in made] == [(epoch, 1), (epoch, 2), (epoch, 3)]
    await node.hub.broadcast_to_room("lobby", "m4")  # no member: nothing framed
    back = await harness.connect(node, f"room=lobby&{since('lobby', epoch, 2)}")
    await back.welcome()
    assert await back.messages(2) == [(3, "m3"), (4, "m4")]
    assert [args[3] for args in made] == [(epoch, 1), (epoch, 2), (epoch, 3), (epoch, 4)]
    assert node.hub.stats.messages_recovered == 3 * 3 + 2
