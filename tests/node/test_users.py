"""Users across the cluster: send_to_user, disconnect_user, user_connections.

The contract cases run on three hubs sharing each broker medium of
tests/node/test_cluster_contract.py (memory, a real redis-server, a real 3-master Redis
Cluster), with real client sockets; a test authenticator takes the user from ``?user=``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Final, cast
from urllib.parse import quote

import aiohttp
import msgpack
import pytest
import websockets
from aiohttp import web

from roomcast.broker import MemoryBroker, MemoryBus, Publisher, RedisBroker
from roomcast.node import HUB, Connection, EventHandler, Hub, HubConfig, demo
from roomcast.node.app import NodeOptions, create_app
from roomcast.node.auth import Auth, Identity
from roomcast.shared.envelope import Envelope, Kind, decode, encode
from roomcast.shared.errors import EnvelopeError
from roomcast.shared.presence import Presence, PresenceEvent
from roomcast.shared.users import (
    USER_ROOM_PREFIX,
    decode_disconnect,
    encode_disconnect,
    is_user_room,
    user_room,
)
from tests.node.test_cluster_contract import Cluster, Member, Serve, _cluster
from tests.node.test_cluster_contract import redis_cluster as redis_cluster  # fixture


class QueryUser:
    """Test credentials: the user id in ``?user=``, the name in ``?name=``."""

    async def authenticate(self, request: web.Request) -> Identity | None:
        user = request.query.get("user")
        if user is None:
            return None
        return Identity(user, {"name": request.query.get("name", user)})


AUTH = Auth(QueryUser())
KEY: Final = "s3cret-key"
API: Final = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def ucluster(request: pytest.FixtureRequest, serve: Serve) -> AsyncIterator[Cluster]:
    """Three nodes that know users, sharing the broker named by the parameter."""
    async with _cluster(request, serve, None, AUTH) as made:
        yield made


async def tab(cluster: Cluster, node: int, user: str, *rooms: str) -> Member:
    return await cluster.member(node, *rooms, query=f"?user={user}")


async def closed_with(member: Member, timeout: float = 10.0) -> tuple[int, str]:
    msg = await member.ws.receive(timeout=timeout)
    assert msg.type is aiohttp.WSMsgType.CLOSE, msg
    return msg.data, msg.extra


async def all_closed(cluster: Cluster, members: list[Member]) -> None:
    """Until every hub reported on_close for ``members`` (after withdrawing presence)."""
    expected = {m.conn.id for m in members}
    seen: set[str] = set()
    async with asyncio.timeout(10):
        while not expected <= seen:
            seen.add(await cluster.closed.get())


# -- the contract, on every broker ---------------------------------------------------


async def test_send_to_user_reaches_every_tab_once(ucluster: Cluster) -> None:
    """Three tabs of one user on three nodes each get one copy, from any node; another
    user and an anonymous connection get nothing."""
    tabs = [await tab(ucluster, i, "ann") for i in range(3)]
    other = await tab(ucluster, 1, "bob")
    anonymous = await ucluster.member(2)
    for sender in range(3):
        await ucluster.hubs[sender].send_to_user("ann", f"hi from {sender}")
        assert [await t.recv() for t in tabs] == [f"hi from {sender}"] * 3
    await ucluster.hubs[0].send_to_user("ann", b"\x00bin")
    assert [await t.recv() for t in tabs] == [b"\x00bin"] * 3
    for t in tabs:  # exactly once: the marker is next
        await t.nothing_more(ucluster.hubs[2])
    await other.nothing_more(ucluster.hubs[0])
    await anonymous.nothing_more(ucluster.hubs[0])


async def test_user_connections_across_nodes(ucluster: Cluster) -> None:
    """Every node sees all of a user's connections; one that closes drops out."""
    tabs = [await tab(ucluster, i, "ann") for i in range(3)]
    bob = await tab(ucluster, 0, "bob")  # kept: an unreferenced socket may be collected
    ids = {t.conn.id for t in tabs}
    for hub in ucluster.hubs:
        assert await hub.user_connections("ann") == ids
        assert await hub.user_connections("nobody") == set()
    assert ucluster.hubs[1].local_user_connections("ann") == {tabs[1].conn.id}
    await tabs[1].ws.close()
    assert await asyncio.wait_for(ucluster.closed.get(), 5) == tabs[1].conn.id
    assert await ucluster.hubs[0].user_connections("ann") == ids - {tabs[1].conn.id}
    assert await ucluster.hubs[2].user_connections("bob") == {bob.conn.id}


async def test_disconnect_user_closes_every_tab_with_its_code(ucluster: Cluster) -> None:
    """disconnect_user closes the user's connections on every node with its code and
    reason; another user's stay open."""
    tabs = [await tab(ucluster, i, "ann") for i in range(3)]
    other = await tab(ucluster, 2, "bob")
    await ucluster.hubs[1].disconnect_user("ann", code=4003, reason="banned")
    for t in tabs:
        assert await closed_with(t) == (4003, "banned")
    await all_closed(ucluster, tabs)
    for hub in ucluster.hubs:
        assert await hub.user_connections("ann") == set()
    await other.nothing_more(ucluster.hubs[0])
    # the user comes back: a new tab works as before
    again = await tab(ucluster, 0, "ann")
    await ucluster.hubs[2].send_to_user("ann", "welcome back")
    assert await again.recv() == "welcome back"


async def test_user_rooms_are_reserved_and_hidden(ucluster: Cluster) -> None:
    """Applications cannot join or send to a user's internal room, and it is not one of
    the node's rooms."""
    hub = ucluster.hubs[0]
    ann = await tab(ucluster, 0, "ann", "lobby")
    reserved = user_room("ann")
    with pytest.raises(ValueError, match="reserved for users"):
        await hub.join_room(ann.conn, reserved)
    with pytest.raises(ValueError, match="reserved for users"):
        await hub.broadcast_to_room(reserved, "x")
    with pytest.raises(ValueError, match="reserved for users"):
        await hub.room_members(reserved)
    with pytest.raises(ValueError, match="reserved for users"):
        await hub.leave_room(ann.conn, reserved)
    assert hub.local_rooms() == ["lobby"]
    assert ann.conn.rooms == frozenset({"lobby"})


# -- Publisher on a real redis-server ------------------------------------------------


@pytest.fixture(params=["redis"])
async def rcluster(request: pytest.FixtureRequest, serve: Serve) -> AsyncIterator[Cluster]:
    async with _cluster(request, serve, None, AUTH) as made:
        yield made


def _publisher(cluster: Cluster) -> Publisher:
    return Publisher(cluster.servers[0].url, prefix="contract")


async def test_publisher_reaches_users(rcluster: Cluster) -> None:
    """Publisher.send_to_user, user_connections and disconnect_user, on Redis."""
    tabs = [await tab(rcluster, i, "ann") for i in range(3)]
    await rcluster.hubs[0].join_room(tabs[0].conn, "r")
    async with _publisher(rcluster) as pub:
        assert await pub.room_presence("r") == [Presence(tabs[0].conn.id, "ann", {"name": "ann"})]
        assert await pub.user_connections("ann") == {t.conn.id for t in tabs}
        await pub.send_to_user("ann", "from a worker")
        assert [await t.recv() for t in tabs] == ["from a worker"] * 3
        with pytest.raises(ValueError, match="reserved for users"):
            await pub.publish_to_room(user_room("ann"), "x")
        with pytest.raises(ValueError, match="may not be sent"):
            await pub.disconnect_user("ann", code=1006)
        await pub.disconnect_user("ann", code=4000, reason="logged out")
        for t in tabs:
            assert await closed_with(t) == (4000, "logged out")
        await all_closed(rcluster, tabs)
        assert await pub.user_connections("ann") == set()


# -- one node ------------------------------------------------------------------------


async def test_v1_tab_gets_a_message_frame_and_bad_input_is_refused(serve: Serve) -> None:
    """A roomcast.v1 tab gets the user's message in a message frame without a room; bad
    codes, reasons and user ids raise."""
    hub = Hub(broker=MemoryBroker(), auth=AUTH)
    app = web.Application()
    hub.attach(app)
    opened: asyncio.Queue[str] = asyncio.Queue()

    async def on_open(conn: object) -> None:
        await opened.put("open")

    app.router.add_get("/ws", hub.route(EventHandler(on_open=on_open)))
    url = (await serve(app)).replace("http", "ws") + "/ws?user=ann"
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(url, protocols=("roomcast.v1",)) as v1, \
            session.ws_connect(url) as raw:
        for _ in range(2):
            await asyncio.wait_for(opened.get(), 5)
        welcome = await v1.receive_json(timeout=5)
        assert welcome["type"] == "welcome"
        await hub.send_to_user("ann", "hello")
        assert await raw.receive_str(timeout=5) == "hello"
        frame = await v1.receive_json(timeout=5)
        assert frame["type"] == "message" and frame["data"] == "hello"
        assert "room" not in frame
        with pytest.raises(ValueError, match="may not be sent"):
            await hub.disconnect_user("ann", code=1005)
        with pytest.raises(ValueError, match="123"):
            await hub.disconnect_user("ann", code=4000, reason="x" * 124)
        with pytest.raises(ValueError, match="empty"):
            await hub.send_to_user("", "x")
        with pytest.raises(TypeError):
            await hub.send_to_user(None, "x")  # type: ignore[arg-type]
        await hub.disconnect_user("ann")
        for ws in (v1, raw):
            msg = await ws.receive(timeout=5)
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1000
    await hub.close()


# -- the disconnect envelope ---------------------------------------------------------


def test_user_room_names() -> None:
    """Readable for ordinary ids; hashed for ids that are no room name there."""
    assert user_room("ann") == USER_ROOM_PREFIX + "ann"
    assert is_user_room(user_room("ann"))
    long = user_room("u" * 500)
    assert is_user_room(long) and len(long) == len(USER_ROOM_PREFIX) + 65
    assert user_room("~abc") != USER_ROOM_PREFIX + "~abc"
    assert user_room("a\nb").startswith(USER_ROOM_PREFIX + "~")


def test_disconnect_envelope_round_trip_and_validation() -> None:
    """A disconnect envelope decodes to its code and reason; a bad one is refused whole."""
    env = Envelope(Kind.DISCONNECT, user_room("ann"), encode_disconnect(4001, "bye"), True,
                   "abc")
    back = decode(encode(env))
    assert back.kind is Kind.DISCONNECT and decode_disconnect(back.payload) == (4001, "bye")
    bad = [
        ("lobby", encode_disconnect(4000, ""), True),  # not a user's room
        (user_room("ann"), msgpack.packb([1006, ""]), True),  # code not sendable
        (user_room("ann"), msgpack.packb([4000, "x" * 124]), True),  # reason too long
        (user_room("ann"), msgpack.packb(["4000", ""]), True),  # code not an int
        (user_room("ann"), b"\xc1", True),  # not msgpack
        (user_room("ann"), encode_disconnect(4000, ""), False),  # text
    ]
    for target, payload, binary in bad:
        with pytest.raises(EnvelopeError):
            Envelope(Kind.DISCONNECT, target, payload, binary)
    raw = msgpack.packb([1, 4, "", "lobby", "", True, encode_disconnect(4000, ""), 0.0],
                        use_bin_type=True)
    with pytest.raises(EnvelopeError, match="user's room"):
        decode(raw)



# -- the HTTP API --------------------------------------------------------------------


async def _api_node(serve: Serve, bus: MemoryBus, opened: asyncio.Queue[Connection]
                    ) -> tuple[str, Hub]:
    app = create_app(broker=MemoryBroker(bus), options=NodeOptions(api_key=KEY, auth=AUTH))
    hub = app[HUB]
    app.router.add_get("/test-ws", hub.route(EventHandler(on_open=opened.put)))
    return await serve(app), hub


async def test_http_api_users_across_two_nodes(serve: Serve) -> None:
    """POST /api/users/{id}/messages, GET /api/users/{id} and DELETE
    /api/users/{id}/connections reach the user's tabs on both nodes; bad input is 400."""
    bus = MemoryBus()
    opened: asyncio.Queue[Connection] = asyncio.Queue()
    one, _ = await _api_node(serve, bus, opened)
    two, _ = await _api_node(serve, bus, opened)
    user = quote("ann smith", safe="")
    async with aiohttp.ClientSession() as http:
        tabs = []
        for base in (one, two, two):
            tabs.append(await http.ws_connect(
                base.replace("http", "ws") + f"/test-ws?user={user}"))
            await asyncio.wait_for(opened.get(), 5)
        ids = sorted(t._response.headers["X-Roomcast-Connection"] for t in tabs)
        async with http.get(f"{two}/api/users/{user}", headers=API) as resp:
            assert resp.status == 200
            assert await resp.json() == {"user": "ann smith", "count": 3, "connections": ids}
        async with http.post(f"{one}/api/users/{user}/messages", data="hi",
                             headers={**API, "Content-Type": "text/plain"}) as resp:
            assert resp.status == 202, await resp.text()
        assert [await t.receive_str(timeout=5) for t in tabs] == ["hi"] * 3
        async with http.post(f"{one}/api/users/{user}/messages", data="x",
                             headers={**API, "Idempotency-Key": "k1"}) as resp:
            assert resp.status == 400
        for query, why in (("code=abc", "not an integer"), ("code=1006", "may not be sent"),
                           ("code=4000&code=4001", "at most once"),
                           ("reason=" + "x" * 124, "123")):
            async with http.delete(f"{one}/api/users/{user}/connections?{query}",
                                   headers=API) as resp:
                assert resp.status == 400
                assert why in (await resp.json())["error"]
        async with http.delete(f"{one}/api/users/{user}/connections",
                               headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
        async with http.get(f"{one}/api/rooms/{quote(user_room('ann'), safe='')}",
                            headers=API) as resp:
            assert resp.status == 400
        async with http.delete(f"{two}/api/users/{user}/connections?code=4003&reason=gone",
                               headers=API) as resp:
            assert resp.status == 202
        for t in tabs:
            msg = await t.receive(timeout=5)
            assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 4003, "gone")


# -- presence with people, and its events ---------------------------------------------


def _watch(hub: Hub) -> asyncio.Queue[PresenceEvent]:
    events: asyncio.Queue[PresenceEvent] = asyncio.Queue()
    hub.on_presence(events.put_nowait)
    return events


async def _next(events: asyncio.Queue[PresenceEvent], count: int
                ) -> list[tuple[str, str | None]]:
    out = []
    async with asyncio.timeout(10):
        for _ in range(count):
            event = await events.get()
            out.append((event.kind, event.user_id))
    return out


async def test_room_presence_and_users_across_nodes(ucluster: Cluster) -> None:
    """room_presence lists every member with user id and info on every node; room_users
    counts a user with two tabs once and leaves anonymous members out."""
    a1 = await cluster_tab(ucluster, 0, "ann", "r", name="Ann")
    a2 = await cluster_tab(ucluster, 2, "ann", "r", name="Ann")
    b = await cluster_tab(ucluster, 1, "bob", "r", name="Bob")
    anon = await ucluster.member(1, "r")
    expected = sorted([
        Presence(a1.conn.id, "ann", {"name": "Ann"}),
        Presence(a2.conn.id, "ann", {"name": "Ann"}),
        Presence(b.conn.id, "bob", {"name": "Bob"}),
        Presence(anon.conn.id, None, {}),
    ], key=lambda p: p.connection)
    for hub in ucluster.hubs:
        assert await hub.room_presence("r") == expected
        assert await hub.room_users("r") == {"ann": {"name": "Ann"}, "bob": {"name": "Bob"}}
    await b.ws.close()
    assert await asyncio.wait_for(ucluster.closed.get(), 5) == b.conn.id
    assert await ucluster.hubs[0].room_users("r") == {"ann": {"name": "Ann"}}
    with pytest.raises(ValueError, match="reserved for users"):
        await ucluster.hubs[0].room_presence(user_room("ann"))


async def test_presence_events_once_on_every_node_with_members(ucluster: Cluster) -> None:
    """Each join and leave is raised once on every node that has members in the room at
    the time (and on the connection's own node), with the user's info; other rooms and
    users' internal rooms raise nothing there."""
    events = [_watch(hub) for hub in ucluster.hubs]
    ann = await cluster_tab(ucluster, 0, "ann", "r", name="Ann")
    assert await _next(events[0], 1) == [("join", "ann")]
    bob = await cluster_tab(ucluster, 1, "bob", "r", name="Bob")
    assert await _next(events[0], 1) == [("join", "bob")]
    assert await _next(events[1], 1) == [("join", "bob")]
    carl = await cluster_tab(ucluster, 2, "carl", "r", name="Carl")
    for i in range(3):
        event = await asyncio.wait_for(events[i].get(), 10)
        assert (event.kind, event.room, event.connection, event.user_id, event.info) == (
            "join", "r", carl.conn.id, "carl", {"name": "Carl"})
    await ucluster.hubs[1].leave_room(bob.conn, "r")
    for i in range(3):
        assert await _next(events[i], 1) == [("leave", "bob")]
    await carl.ws.close()
    for i in (0, 2):  # node 1 has no member in the room any more
        assert await _next(events[i], 1) == [("leave", "carl")]
    # once: a last join is the next event wherever the room has members
    await ucluster.hubs[1].join_room(bob.conn, "r")
    for i in (0, 1):
        assert await _next(events[i], 1) == [("join", "bob")]
    for queue in events:
        assert queue.empty()
    assert ann.conn.rooms == frozenset({"r"})


async def cluster_tab(cluster: Cluster, node: int, user: str, *rooms: str, name: str
                      ) -> Member:
    return await cluster.member(node, *rooms, query=f"?user={user}&name={name}")


# -- the demo chat's member list -------------------------------------------------------


async def _until(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    """The next JSON message of type ``kind`` (other messages before it are skipped)."""
    async with asyncio.timeout(10):
        while True:
            msg = json.loads(await ws.receive_str())
            if msg.get("type") == kind:
                return cast(dict[str, Any], msg)


async def test_demo_chat_member_list_across_nodes(serve: Serve) -> None:
    """A chat socket with presence=1 gets the room's member list with names on join and
    a presence update for every join and leave on either node; one without it gets the
    chat as before (the join notice first)."""
    bus = MemoryBus()
    one = (await serve(create_app(broker=MemoryBroker(bus)))).replace("http", "ws")
    two = (await serve(create_app(broker=MemoryBroker(bus)))).replace("http", "ws")
    async with aiohttp.ClientSession() as http:
        ann = await http.ws_connect(f"{one}/chat?room=r&name=Ann&presence=1")
        ann_id = ann._response.headers["X-Roomcast-Connection"]
        listing = await _until(ann, "members")
        assert listing["members"] == [{"id": ann_id, "name": "Ann"}]
        bob = await http.ws_connect(f"{two}/chat?room=r&name=Bob&presence=1")
        bob_id = bob._response.headers["X-Roomcast-Connection"]
        assert await _until(ann, "presence") == {"type": "presence", "event": "join",
                                                 "id": bob_id, "name": "Bob"}
        listing = await _until(bob, "members")
        assert sorted(m["name"] for m in listing["members"]) == ["Ann", "Bob"]
        plain = await http.ws_connect(f"{two}/chat?room=r&name=Cy")
        assert json.loads(await plain.receive_str(timeout=5)) == {
            "type": "join", "name": "Cy", "members": 3}
        assert (await _until(ann, "presence"))["name"] == "Cy"
        await bob.close()
        assert await _until(ann, "presence") == {"type": "presence", "event": "leave",
                                                 "id": bob_id, "name": "Bob"}
        await plain.close()
        await ann.close()


async def test_demo_chat_quiet_member_and_presence_watchers(serve: Serve) -> None:
    """A chat socket with quiet=1 joins and leaves with no notice and gets the room's
    messages; presence events go to the sockets that asked, on each node, and stop
    once such a socket has left."""
    bus = MemoryBus()
    app = create_app(broker=MemoryBroker(bus))
    one = (await serve(app)).replace("http", "ws")
    two = (await serve(create_app(broker=MemoryBroker(bus)))).replace("http", "ws")
    async with aiohttp.ClientSession() as http:
        ann = await http.ws_connect(f"{one}/chat?room=r&name=Ann&presence=1")
        await _until(ann, "members")
        plain = await http.ws_connect(f"{two}/chat?room=r&name=Bo")
        assert await _until(plain, "join") == {"type": "join", "name": "Bo", "members": 2}
        assert (await _until(ann, "presence"))["name"] == "Bo"
        quiet = await http.ws_connect(f"{two}/chat?room=r&name=Q&quiet=1")
        quiet_id = quiet._response.headers["X-Roomcast-Connection"]
        assert await _until(ann, "presence") == {"type": "presence", "event": "join",
                                                 "id": quiet_id, "name": "Q"}
        hello = '{"type": "message", "text": "hello"}'
        await plain.send_str(hello)
        assert await quiet.receive_str(timeout=5) == hello  # no notice came before it
        assert await plain.receive_str(timeout=5) == hello  # nor to the others
        await quiet.close()
        assert await _until(ann, "presence") == {"type": "presence", "event": "leave",
                                                 "id": quiet_id, "name": "Q"}
        after = '{"type": "message", "text": "after"}'
        await plain.send_str(after)
        assert await plain.receive_str(timeout=5) == after  # the quiet leave: no notice
        await ann.close()
        assert await _until(plain, "leave") == {"type": "leave", "name": "Ann",
                                                "members": 1}
        assert demo._WATCHERS.get(app[HUB]) == {}  # Ann's entry went with her (first)


# -- the per-user connection limit -----------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def limited(request: pytest.FixtureRequest, serve: Serve) -> AsyncIterator[Cluster]:
    async with _cluster(request, serve, HubConfig(max_connections_per_user=2), AUTH) as made:
        yield made


async def test_max_connections_per_user_across_nodes(limited: Cluster) -> None:
    """A user's third connection, on any node, is refused with 429 (counted); others
    are not limited by it; once one closes the user may open another."""
    first = await tab(limited, 0, "ann")
    second = await tab(limited, 1, "ann")  # kept: an unreferenced socket may be collected
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(limited.urls[2] + "?user=ann", open_timeout=10):
            pass
    assert refused.value.response.status_code == 429
    assert b"limit is 2" in refused.value.response.body
    assert limited.hubs[2].stats.refused_user_limit == 1
    others = [await tab(limited, 2, "bob"), await limited.member(2)]  # anonymous: no limit
    await first.ws.close()
    assert await asyncio.wait_for(limited.closed.get(), 5) == first.conn.id
    again = await tab(limited, 2, "ann")
    assert await limited.hubs[0].user_connections("ann") == {again.conn.id, second.conn.id}
    assert all(not m.ws.closed for m in others)
    for member in (second, again, *others):
        await member.ws.close()


def test_max_connections_per_user_is_checked() -> None:
    assert HubConfig().max_connections_per_user == 0
    with pytest.raises(ValueError, match=">= 0"):
        HubConfig(max_connections_per_user=-1)
    with pytest.raises(TypeError, match="int"):
        HubConfig(max_connections_per_user=True)


# -- a node that stops heartbeating is swept: its members leave ------------------------


@pytest.fixture(params=["redis", "redis-cluster"])
async def swept(request: pytest.FixtureRequest, serve: Serve) -> AsyncIterator[Cluster]:
    async with _cluster(request, serve, None, AUTH) as made:
        yield made


async def test_silent_node_members_leave_once_on_the_others(swept: Cluster) -> None:
    """Node 2 stops heartbeating (as if frozen or killed); once the presence TTL passed,
    the live node that sweeps it raises a leave for each of its members in the room and
    publishes it: each live node with members sees it once, with the user's info, on one
    Redis server and on a Redis Cluster (the heartbeat script returns what it swept)."""
    events = [_watch(hub) for hub in swept.hubs[:2]]
    members = [await cluster_tab(swept, i, "ann" if i < 2 else "zoe", "r", name=f"n{i}")
               for i in range(3)]
    for queue, expected in zip(events, (3, 2), strict=True):
        async with asyncio.timeout(10):
            for _ in range(expected):
                assert (await queue.get()).kind == "join"
    broker = swept.hubs[2].broker
    assert isinstance(broker, RedisBroker)
    task = broker._heartbeat_task  # the node goes silent: no more heartbeats
    assert task is not None
    task.cancel()
    for queue in events:
        event = await asyncio.wait_for(queue.get(), 20)
        assert (event.kind, event.connection, event.user_id, dict(event.info)) == (
            "leave", members[2].conn.id, "zoe", {"name": "n2"})
    assert {p.user_id for p in await swept.hubs[0].room_presence("r")} == {"ann"}
    # once: a later join is the next event on both live nodes
    late = await cluster_tab(swept, 0, "bea", "r", name="Bea")
    for queue in events:
        event = await asyncio.wait_for(queue.get(), 10)
        assert (event.kind, event.connection) == ("join", late.conn.id)
