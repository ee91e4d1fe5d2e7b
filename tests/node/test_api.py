"""The HTTP API under /api, served by ``create_app`` on real sockets.

Members are real WebSocket clients; their connection ids come from the 101 response's
``X-Roomcast-Connection`` header, as a backend would get them. Cross-node cases run two
apps whose brokers share one MemoryBus.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import pytest
from aiohttp import web
from websockets.asyncio.client import ClientConnection, connect

from roomcast.broker import Broker, MemoryBroker, MemoryBus, Publisher, RedisBroker
from roomcast.node import HUB, Connection, EventHandler, Hub, HubConfig
from roomcast.node.api import IDEMPOTENCY_KEY
from roomcast.node.app import NodeOptions, create_app
from roomcast.shared.envelope import Envelope
from roomcast.shared.errors import BrokerError, PublishError
from roomcast.shared.history import History, HistoryPolicy, Position
from roomcast.shared.ids import ConnectionId, Room
from tests.redis_server import RedisServer

Serve = Callable[[web.Application], Awaitable[str]]

KEY: Final = "s3cret-key"
AUTH: Final = {"Authorization": f"Bearer {KEY}"}
MARKER: Final = "__marker__"
EXPECT_100: Final = "Expect: 100-continue\r\n"


@dataclass
class Member:
    """A WebSocket client and the connection id its node announced."""

    ws: ClientConnection
    id: str
    hub: Hub

    async def recv(self) -> str | bytes:
        return await asyncio.wait_for(self.ws.recv(), 5)

    async def nothing_more(self) -> None:
        """Prove nothing is pending: a marker sent now is the next thing received."""
        assert await self.hub.send_to(self.id, MARKER)
        assert await self.recv() == MARKER


@dataclass
class Node:
    """One app from ``create_app`` on a real socket, plus a test route for members."""

    url: str
    hub: Hub
    opened: asyncio.Queue[Connection]
    closed: asyncio.Queue[str]
    stack: contextlib.AsyncExitStack

    def api(self, path: str) -> str:
        return self.url + path

    async def member(self, *rooms: str) -> Member:
        """Connect a client that is in ``rooms`` once this returns."""
        query = "&".join(f"room={room}" for room in rooms)
        ws = await self.stack.enter_async_context(
            connect(self.url.replace("http", "ws") + "/test-ws?" + query)
        )
        assert ws.response is not None
        conn_id = ws.response.headers["X-Roomcast-Connection"]
        conn = await asyncio.wait_for(self.opened.get(), 5)  # joined its rooms by now
        assert conn.id == conn_id
        return Member(ws, conn_id, self.hub)


class Nodes:
    """Starts nodes for one test and closes their clients afterwards."""

    def __init__(self, serve: Serve, stack: contextlib.AsyncExitStack) -> None:
        self._serve = serve
        self._stack = stack

    async def start(
        self, *, broker: Broker | None = None, config: HubConfig | None = None,
        api_key: str | None = KEY,
    ) -> Node:
        app = create_app(config, broker=broker, options=NodeOptions(api_key=api_key))
        hub = app[HUB]
        opened: asyncio.Queue[Connection] = asyncio.Queue()
        closed: asyncio.Queue[str] = asyncio.Queue()

        async def on_close(conn: Connection, code: int, reason: str) -> None:
            await closed.put(conn.id)

        handler = EventHandler(on_open=opened.put, on_close=on_close)

        async def test_ws(request: web.Request) -> web.StreamResponse:
            return await hub.upgrade(request, handler, rooms=request.query.getall("room", []))

        app.router.add_get("/test-ws", test_ws)
        return Node(await self._serve(app), hub, opened, closed, self._stack)


@pytest.fixture
async def nodes(serve: Serve) -> AsyncIterator[Nodes]:
    async with contextlib.AsyncExitStack() as stack:
        yield Nodes(serve, stack)


@pytest.fixture
async def node(nodes: Nodes) -> Node:
    return await nodes.start()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession, url: str, body: Any = b"", *,
    content_type: str | None = "text/plain; charset=utf-8", headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    """POST ``body`` with the API key (unless ``headers`` says otherwise); status and JSON."""
    sent = dict(AUTH if headers is None else headers)
    skip = []
    if content_type is None:
        skip.append("Content-Type")
    else:
        sent["Content-Type"] = content_type
    async with http.post(url, data=body, headers=sent, skip_auto_headers=skip,
                         **kwargs) as resp:
        return resp.status, await resp.json(), resp


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url, headers=AUTH) as resp:
        return resp.status, await resp.json()


class UnreachableBroker(MemoryBroker):
    """A broker whose other nodes cannot be reached: publishes and lookups fail."""

    @property
    def has_peers(self) -> bool:
        return True

    async def publish(self, envelope: Envelope) -> None:
        raise PublishError("redis unreachable (test)")

    async def room_members(self, room: Room) -> set[ConnectionId]:
        raise BrokerError("redis unreachable (test)")


# -- switched on, and locked ---------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/api/rooms/r/messages"), ("POST", "/api/connections/n.1/messages"),
     ("POST", "/api/broadcast"), ("GET", "/api/rooms/r")],
)
async def test_api_is_off_without_a_key(
    nodes: Nodes, http: aiohttp.ClientSession, method: str, path: str
) -> None:
    """With no API key configured the /api routes do not exist, even with a bearer header."""
    off = await nodes.start(api_key=None)
    async with http.request(method, off.api(path), headers=AUTH, data=b"x") as resp:
        assert resp.status == 404


def test_an_empty_key_is_refused() -> None:
    """An empty API key is a configuration error, not an open API."""
    with pytest.raises(ValueError, match="non-empty"):
        create_app(options=NodeOptions(api_key=""))


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY}x"},
     {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY}],
    ids=["none", "wrong", "longer", "basic", "no-scheme"],
)
async def test_requests_without_the_key_get_401(
    node: Node, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    """A missing or wrong key gets 401 with a Bearer challenge, and nothing is sent."""
    member = await node.member("r")
    for path in ("/api/rooms/r/messages", "/api/broadcast",
                 f"/api/connections/{member.id}/messages"):
        status, body, resp = await post(http, node.api(path), b"leak", headers=headers)
        assert status == 401, path
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert "key" in body["error"]
    async with http.get(node.api("/api/rooms/r"), headers=headers) as resp:
        assert resp.status == 401
    await member.nothing_more()


# -- the routes ------------------------------------------------------------------------


async def test_room_message_reaches_room_members_only(
    node: Node, http: aiohttp.ClientSession
) -> None:
    """POST /api/rooms/{room}/messages reaches every member of the room and no one else."""
    a, b = await node.member("r"), await node.member("r", "s")
    outsider = await node.member("s")
    status, body, _ = await post(http, node.api("/api/rooms/r/messages"), b"hello")
    assert (status, body) == (202, {"status": "accepted"})
    assert await a.recv() == "hello"
    assert await b.recv() == "hello"
    await outsider.nothing_more()


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        (None, b"no type", "no type"),
        ("text/plain; charset=utf-8", "h\u00e9llo \u2603".encode(), "h\u00e9llo \u2603"),
        ("TEXT/Markdown; charset=UTF8", b"# title", "# title"),
        ("text/plain", b"", ""),
        ("application/octet-stream", b"\x00\xff\x10", b"\x00\xff\x10"),
        ("application/octet-stream", b"looks like text", b"looks like text"),
    ],
    ids=["untyped", "utf8", "other-text", "empty", "binary", "binary-ascii"],
)
async def test_content_type_decides_text_or_binary(
    node: Node, http: aiohttp.ClientSession, content_type: str | None, body: bytes,
    expected: str | bytes,
) -> None:
    """text/* and untyped bodies arrive as text frames, octet-stream as binary frames."""
    member = await node.member("r")
    status, _, _ = await post(http, node.api("/api/rooms/r/messages"), body,
                              content_type=content_type)
    assert status == 202
    received = await member.recv()
    assert type(received) is type(expected)
    assert received == expected


async def test_exclude_skips_one_connection(node: Node, http: aiohttp.ClientSession) -> None:
    """?exclude= leaves out that one connection, for room messages and broadcasts."""
    a, b = await node.member("r"), await node.member("r")
    c = await node.member()
    status, _, _ = await post(http, node.api(f"/api/rooms/r/messages?exclude={b.id}"),
                              b"not for b")
    assert status == 202
    assert await a.recv() == "not for b"
    await b.nothing_more()
    status, _, _ = await post(http, node.api(f"/api/broadcast?exclude={a.id}"),
                              b"not for a", content_type="application/octet-stream")
    assert status == 202
    assert await b.recv() == b"not for a"
    assert await c.recv() == b"not for a"
    await a.nothing_more()


async def test_connection_message_reaches_that_connection_only(
    node: Node, http: aiohttp.ClientSession
) -> None:
    """POST /api/connections/{id}/messages reaches the named connection and no other."""
    a, b = await node.member("r"), await node.member("r")
    status, body, _ = await post(http, node.api(f"/api/connections/{b.id}/messages"),
                                 b"\x01psst", content_type="application/octet-stream")
    assert (status, body) == (202, {"status": "accepted"})
    assert await b.recv() == b"\x01psst"
    await a.nothing_more()


async def test_unknown_or_closed_local_connection_is_404(
    node: Node, http: aiohttp.ClientSession
) -> None:
    """An id of this node with no open connection behind it gets 404."""
    member = await node.member()
    status, body, _ = await post(http, node.api(f"/api/connections/{node.hub.node_id}.ffff"
                                                "/messages"), b"x")
    assert status == 404
    assert f"{node.hub.node_id}.ffff" in body["error"]
    await member.ws.close()
    assert await asyncio.wait_for(node.closed.get(), 5) == member.id
    status, _, _ = await post(http, node.api(f"/api/connections/{member.id}/messages"), b"x")
    assert status == 404


async def test_broadcast_reaches_every_connection(
    node: Node, http: aiohttp.ClientSession
) -> None:
    """POST /api/broadcast reaches connections in rooms and in none."""
    a, b = await node.member("r"), await node.member()
    status, body, _ = await post(http, node.api("/api/broadcast"), b"everyone")
    assert (status, body) == (202, {"status": "accepted"})
    assert await a.recv() == "everyone"
    assert await b.recv() == "everyone"


async def test_get_room_lists_members(node: Node, http: aiohttp.ClientSession) -> None:
    """GET /api/rooms/{room} gives the room, its size and its sorted member ids."""
    a, b = await node.member("r"), await node.member("r")
    await node.member("other")
    status, body = await get_json(http, node.api("/api/rooms/r"))
    assert status == 200
    assert body == {"room": "r", "size": 2, "members": sorted([a.id, b.id])}
    assert await get_json(http, node.api("/api/rooms/empty")) == (
        200, {"room": "empty", "size": 0, "members": []}
    )


async def test_room_names_are_percent_decoded(node: Node, http: aiohttp.ClientSession) -> None:
    """A room name with '/', spaces or non-ASCII travels percent-encoded in the path."""
    member = await node.member("a%2Fb%20caf%C3%A9")
    status, body = await get_json(http, node.api("/api/rooms/a%2Fb%20caf%C3%A9"))
    assert (status, body["room"], body["members"]) == (200, "a/b caf\u00e9", [member.id])
    status, _, _ = await post(http, node.api("/api/rooms/a%2Fb%20caf%C3%A9/messages"), b"hi")
    assert status == 202
    assert await member.recv() == "hi"


# -- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "named"),
    [
        ("POST", "/api/rooms/bad%01room/messages", "room"),
        ("POST", "/api/rooms/" + "x" * 201 + "/messages", "room"),
        ("GET", "/api/rooms/" + "x" * 201, "room"),
        ("POST", "/api/connections/not-an-id/messages", "connection id"),
        ("POST", "/api/connections/node.xyz/messages", "connection id"),
        ("POST", "/api/rooms/r/messages?exclude=nope", "exclude"),
        ("POST", "/api/rooms/r/messages?exclude=", "exclude"),
        ("POST", "/api/broadcast?exclude=a.1&exclude=b.2", "exclude"),
    ],
)
async def test_malformed_names_get_400(
    node: Node, http: aiohttp.ClientSession, method: str, path: str, named: str
) -> None:
    """Malformed room names and connection ids get 400 naming what is wrong; nothing sent."""
    member = await node.member("r")
    async with http.request(method, node.api(path), headers=AUTH, data=b"x") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"].startswith(named)
    await member.nothing_more()


async def test_text_that_is_not_utf8_gets_400(node: Node, http: aiohttp.ClientSession) -> None:
    """A text body that does not decode as UTF-8 gets 400 and is not sent."""
    member = await node.member("r")
    status, body, _ = await post(http, node.api("/api/rooms/r/messages"), b"caf\xe9")
    assert status == 400
    assert "UTF-8" in body["error"]
    await member.nothing_more()


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ({"Content-Type": "application/xml"}, "application/xml"),
        ({"Content-Type": "multipart/form-data; boundary=x"}, "multipart/form-data"),
        ({"Content-Type": "text/plain; charset=latin-1"}, "latin-1"),
        ({"Content-Type": "text/plain", "Content-Encoding": "gzip"}, "gzip"),
    ],
    ids=["xml", "multipart", "latin-1", "gzip"],
)
async def test_unsupported_bodies_get_415(
    node: Node, http: aiohttp.ClientSession, headers: dict[str, str], named: str
) -> None:
    """Types other than text/*, JSON and octet-stream, other charsets and codings get 415."""
    member = await node.member("r")
    async with http.post(node.api("/api/rooms/r/messages"), headers={**AUTH, **headers},
                         data=gzip.compress(b"{}")) as resp:
        assert resp.status == 415
        assert named in (await resp.json())["error"]
    await member.nothing_more()


async def test_json_body_is_sent_as_text(node: Node, http: aiohttp.ClientSession) -> None:
    """application/json bodies reach members as text messages, unchanged."""
    member = await node.member("r")
    async with http.post(node.api("/api/rooms/r/messages"),
                         headers={**AUTH, "Content-Type": "application/json"},
                         data=b'{"event": "deploy"}') as resp:
        assert resp.status == 202
    assert await member.recv() == '{"event": "deploy"}'


@pytest.mark.parametrize("route", ["room", "connection", "broadcast"])
async def test_body_over_the_limit_gets_413(
    nodes: Nodes, http: aiohttp.ClientSession, route: str
) -> None:
    """A body of max_message_size bytes is sent; one byte more gets 413 and is not."""
    node = await nodes.start(config=HubConfig(max_message_size=64))
    member = await node.member("r")
    path = {"room": "/api/rooms/r/messages", "broadcast": "/api/broadcast",
            "connection": f"/api/connections/{member.id}/messages"}[route]
    status, body, resp = await post(http, node.api(path), b"y" * 65)
    assert resp.request_info.headers["Content-Length"] == "65"
    assert status == 413
    assert "64" in body["error"]
    status, _, _ = await post(http, node.api(path), b"x" * 64)
    assert status == 202
    assert await member.recv() == "x" * 64


async def test_chunked_body_over_the_limit_gets_413_before_it_ends(
    nodes: Nodes, http: aiohttp.ClientSession
) -> None:
    """A chunked body is refused with 413 once past the limit, while the rest is held back."""
    node = await nodes.start(config=HubConfig(max_message_size=64))
    member = await node.member("r")
    release = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"z" * 16
        await release.wait()  # the server must answer without the end of the body

    try:
        status, reply, resp = await post(http, node.api("/api/rooms/r/messages"), body())
    finally:
        release.set()
    assert resp.request_info.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in resp.request_info.headers
    assert status == 413
    assert "64" in reply["error"]

    async def small() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"s" * 16

    status, _, _ = await post(http, node.api("/api/rooms/r/messages"), small())
    assert status == 202
    assert await member.recv() == "s" * 64


@pytest.mark.parametrize(
    ("auth", "length", "expect", "status"),
    [(KEY, 100_000, EXPECT_100, 413), ("wrong", 10, EXPECT_100, 401), (KEY, 100_000, "", 413)],
    ids=["expect-too-big", "expect-wrong-key", "too-big"],
)
async def test_refused_before_the_body_is_sent(
    nodes: Nodes, auth: str, length: int, expect: str, status: int
) -> None:
    """A bad key (with Expect: 100-continue) or Content-Length is refused before any body."""
    node = await nodes.start(config=HubConfig(max_message_size=64))
    host, port = node.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST /api/broadcast HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {auth}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {length}\r\n{expect}\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), head  # no 100 Continue first
    assert b"connection: close" in head.lower()


async def test_expect_continue_is_accepted_with_a_good_request(
    node: Node, http: aiohttp.ClientSession
) -> None:
    """A client that waits for 100 Continue gets it and its message is sent."""
    member = await node.member("r")
    status, _, _ = await post(http, node.api("/api/rooms/r/messages"), b"after 100",
                              expect100=True)
    assert status == 202
    assert await member.recv() == "after 100"


# -- across nodes ------------------------------------------------------------------------


async def test_api_on_one_node_reaches_members_on_another(
    nodes: Nodes, http: aiohttp.ClientSession
) -> None:
    """Rooms, connections, broadcasts and membership span both nodes sharing a bus."""
    bus = MemoryBus()
    one = await nodes.start(broker=MemoryBroker(bus))
    two = await nodes.start(broker=MemoryBroker(bus))
    a = await one.member("r")
    b, c = await two.member("r"), await two.member()

    assert (await post(http, one.api("/api/rooms/r/messages"), b"room"))[0] == 202
    assert await a.recv() == "room"
    assert await b.recv() == "room"
    await c.nothing_more()

    assert (await post(http, one.api(f"/api/rooms/r/messages?exclude={b.id}"), b"not b"))[0] \
        == 202
    assert await a.recv() == "not b"
    await b.nothing_more()

    status, _, _ = await post(http, one.api(f"/api/connections/{c.id}/messages"), b"\x02c",
                              content_type="application/octet-stream")
    assert status == 202
    assert await c.recv() == b"\x02c"
    await b.nothing_more()

    assert (await post(http, one.api(f"/api/broadcast?exclude={a.id}"), b"all"))[0] == 202
    assert await b.recv() == "all"
    assert await c.recv() == "all"
    await a.nothing_more()

    for n in (one, two):
        status, body = await get_json(http, n.api("/api/rooms/r"))
        assert (status, body) == (200, {"room": "r", "size": 2,
                                        "members": sorted([a.id, b.id])})


async def test_unreachable_broker_gives_503_after_local_delivery(
    nodes: Nodes, http: aiohttp.ClientSession
) -> None:
    """A failed cross-node publish gets 503 saying only local members were served."""
    node = await nodes.start(broker=UnreachableBroker())
    member = await node.member("r")

    status, body, _ = await post(http, node.api("/api/rooms/r/messages"), b"local")
    assert status == 503
    assert "this node only" in body["error"]
    assert "redis unreachable (test)" in body["error"]
    assert await member.recv() == "local"

    status, body, _ = await post(http, node.api("/api/broadcast"), b"local too")
    assert status == 503
    assert "this node only" in body["error"]
    assert await member.recv() == "local too"

    status, body, _ = await post(http, node.api("/api/connections/elsewhere.1/messages"), b"x")
    assert status == 503
    assert body["error"].startswith("not delivered")

    async with http.get(node.api("/api/rooms/r"), headers=AUTH) as resp:
        assert resp.status == 503
        assert "membership" in (await resp.json())["error"]


# -- rooms with history: positions and idempotency keys ---------------------------------

HISTORY: Final = HubConfig(history=HistoryPolicy(History(10, 60), rooms={"plain": None}))
"""Every room keeps history except ``plain``."""


async def test_history_room_publish_answers_its_position(
    nodes: Nodes, http: aiohttp.ClientSession
) -> None:
    """In a room with history the 202 body adds room, epoch and offset, counting up by one;
    the message is in the room's history."""
    node = await nodes.start(config=HISTORY)
    member = await node.member("r")
    status, first, _ = await post(http, node.api("/api/rooms/r/messages"), b"one")
    assert status == 202
    assert set(first) == {"status", "room", "epoch", "offset"}
    assert first["status"] == "accepted" and first["room"] == "r"
    assert await member.recv() == "one"
    status, second, _ = await post(http, node.api("/api/rooms/r/messages"), b"two")
    assert (status, second) == (202, {**first, "offset": first["offset"] + 1})
    assert await member.recv() == "two"
    page = await node.hub.room_history(Room("r"), since=0)
    assert [(e.payload, e.epoch, e.offset) for e in page.envelopes] == [
        (b"one", first["epoch"], first["offset"]), (b"two", first["epoch"], second["offset"])]
    await member.nothing_more()


async def test_room_without_history_answers_as_before(
    nodes: Nodes, http: aiohttp.ClientSession
) -> None:
    """A room the policy leaves without history gets the old 202 body, no position."""
    node = await nodes.start(config=HISTORY)
    member = await node.member("plain")
    status, body, _ = await post(http, node.api("/api/rooms/plain/messages"), b"as before")
    assert (status, body) == (202, {"status": "accepted"})
    assert await member.recv() == "as before"


async def test_retry_with_the_same_idempotency_key_is_stored_and_delivered_once(
    nodes: Nodes, http: aiohttp.ClientSession
) -> None:
    """A retried request with the same Idempotency-Key, on the same node or another one,
    answers the first position; the message is stored once and every member gets it once.
    Another key is another message."""
    bus = MemoryBus()
    one = await nodes.start(broker=MemoryBroker(bus), config=HISTORY)
    two = await nodes.start(broker=MemoryBroker(bus), config=HISTORY)
    a, b = await one.member("r"), await two.member("r")
    keyed = {**AUTH, IDEMPOTENCY_KEY: "order-42:shipped"}
    status, first, _ = await post(http, one.api("/api/rooms/r/messages"), b"shipped",
                                  headers=keyed)
    assert status == 202
    assert await a.recv() == "shipped"
    assert await b.recv() == "shipped"
    for retry_on in (one, two, one):
        status, again, _ = await post(http, retry_on.api("/api/rooms/r/messages"),
                                      b"shipped", headers=keyed)
        assert (status, again) == (202, first)
    status, other, _ = await post(http, two.api("/api/rooms/r/messages"), b"delivered",
                                  headers={**AUTH, IDEMPOTENCY_KEY: "order-42:delivered"})
    assert (status, other) == (202, {**first, "offset": first["offset"] + 1})
    assert await a.recv() == "delivered"
    assert await b.recv() == "delivered"
    await a.nothing_more()
    await b.nothing_more()
    page = await two.hub.room_history(Room("r"), since=0)
    assert [e.payload for e in page.envelopes] == [b"shipped", b"delivered"]
    assert one.hub.broker.stats.duplicates + two.hub.broker.stats.duplicates == 3


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("has space", "visible ASCII"),
        ("k" * 201, "1-200 visible ASCII"),
        ("tab\there", "visible ASCII"),
    ],
    ids=["space", "too-long", "control"],
)
async def test_malformed_idempotency_key_gets_400(
    nodes: Nodes, http: aiohttp.ClientSession, key: str, says: str
) -> None:
    """A malformed Idempotency-Key gets 400 saying what a key must be; nothing is sent."""
    node = await nodes.start(config=HISTORY)
    member = await node.member("r")
    status, body, _ = await post(http, node.api("/api/rooms/r/messages"), b"x",
                                 headers={**AUTH, IDEMPOTENCY_KEY: key})
    assert status == 400
    assert body["error"].startswith(f"{IDEMPOTENCY_KEY}: idempotency key must be")
    assert says in body["error"]
    await member.nothing_more()
    assert (await node.hub.room_history(Room("r"))).top == 0


async def test_empty_or_repeated_idempotency_key_gets_400(
    nodes: Nodes, http: aiohttp.ClientSession
) -> None:
    """An empty header, or the header given twice, gets 400; nothing is sent."""
    node = await nodes.start(config=HISTORY)
    member = await node.member("r")
    host, port = node.url.removeprefix("http://").split(":")
    for headers, says in ((f"{IDEMPOTENCY_KEY}:\r\n", "idempotency key must be"),
                          (f"{IDEMPOTENCY_KEY}: a\r\n{IDEMPOTENCY_KEY}: b\r\n",
                           "give the header once")):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(
                (f"POST /api/rooms/r/messages HTTP/1.1\r\nHost: x\r\nAuthorization: "
                 f"Bearer {KEY}\r\n{headers}Content-Length: 1\r\nConnection: close\r\n\r\nx"
                 ).encode())
            reply = (await asyncio.wait_for(reader.read(), 5)).decode()
        finally:
            writer.close()
        assert reply.startswith("HTTP/1.1 400"), reply
        assert f'"{IDEMPOTENCY_KEY}: {says}' in reply, reply
    await member.nothing_more()


async def test_idempotency_key_for_a_room_without_history_gets_400(
    nodes: Nodes, http: aiohttp.ClientSession
) -> None:
    """A key for a room that keeps no history (policy off for it, or no policy at all)
    gets 400 saying the room needs history; nothing is sent."""
    for config, room in ((HISTORY, "plain"), (None, "r")):
        node = await nodes.start(config=config)
        member = await node.member(room)
        status, body, _ = await post(http, node.api(f"/api/rooms/{room}/messages"), b"x",
                                     headers={**AUTH, IDEMPOTENCY_KEY: "k1"})
        assert status == 400
        assert f"room {room!r} keeps no history" in body["error"]
        assert "need a room with history" in body["error"]
        await member.nothing_more()


async def test_idempotency_key_on_broadcasts_and_connection_sends_gets_400(
    nodes: Nodes, http: aiohttp.ClientSession
) -> None:
    """Broadcasts and sends to one connection are not stored: a key there gets 400 (a
    backend must not retry them believing it safe); nothing is sent."""
    node = await nodes.start(config=HISTORY)
    member = await node.member("r")
    for path, what in (("/api/broadcast", "a broadcast to everyone"),
                       (f"/api/connections/{member.id}/messages",
                        "a message to one connection")):
        status, body, _ = await post(http, node.api(path), b"x",
                                     headers={**AUTH, IDEMPOTENCY_KEY: "k1"})
        assert status == 400, path
        assert body["error"] == (f"{IDEMPOTENCY_KEY}: {what} is not stored, so a retry "
                                 "cannot be recognised; only room messages in rooms with "
                                 "history take a key")
    await member.nothing_more()


class HistoryUnreachableBroker(MemoryBroker):
    """A broker whose Redis is unreachable for publishes to rooms with history too."""

    @property
    def has_peers(self) -> bool:
        return True

    async def publish(self, envelope: Envelope, *, history: History | None = None,
                      idempotency_key: str | None = None) -> Position | None:
        raise PublishError("redis unreachable (test)")


async def test_unreachable_broker_in_a_history_room_says_to_retry_with_the_key(
    nodes: Nodes, http: aiohttp.ClientSession
) -> None:
    """A failed publish in a room with history: 503, local members served, and the error
    says the message may not be stored and to retry with the same key."""
    node = await nodes.start(broker=HistoryUnreachableBroker(), config=HISTORY)
    member = await node.member("r")
    status, body, _ = await post(http, node.api("/api/rooms/r/messages"), b"local",
                                 headers={**AUTH, IDEMPOTENCY_KEY: "k1"})
    assert status == 503
    assert "this node only" in body["error"]
    assert "may not be in the room's history" in body["error"]
    assert f"same {IDEMPOTENCY_KEY}" in body["error"]
    assert "redis unreachable (test)" in body["error"]
    assert await member.recv() == "local"


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A private redis-server (free port, no persistence) for one test."""
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.cleanup()


async def test_idempotent_retry_across_nodes_on_real_redis(
    nodes: Nodes, http: aiohttp.ClientSession, redis_url: str
) -> None:
    """Two nodes on one real Redis, and a Publisher with the same policy: a message sent
    with a key through the Publisher, then retried through either node's API with the
    same key, has one position, is stored once and reaches every member once."""
    one = await nodes.start(broker=RedisBroker(redis_url, prefix="api"), config=HISTORY)
    two = await nodes.start(broker=RedisBroker(redis_url, prefix="api"), config=HISTORY)
    try:
        a, b = await one.member("r"), await two.member("r")
        # b's node subscribed before answering; a message now reaches it
        await one.hub.broadcast_to_room("r", "warm-up")
        assert await a.recv() == "warm-up"
        assert await b.recv() == "warm-up"
        async with Publisher(redis_url, prefix="api", history=HISTORY.history) as pub:
            position = await pub.publish_to_room("r", "invoice 7 paid",
                                                 idempotency_key="invoice-7:paid")
        assert position is not None
        assert await a.recv() == "invoice 7 paid"
        assert await b.recv() == "invoice 7 paid"
        expected = {"status": "accepted", "room": "r", "epoch": position.epoch,
                    "offset": position.offset}
        for retry_on in (one, two):
            status, body, _ = await post(http, retry_on.api("/api/rooms/r/messages"),
                                         b"invoice 7 paid",
                                         headers={**AUTH, IDEMPOTENCY_KEY: "invoice-7:paid"})
            assert (status, body) == (202, expected)
        await a.nothing_more()
        await b.nothing_more()
        page = await one.hub.room_history(Room("r"), since=0)
        assert [e.payload for e in page.envelopes] == [b"warm-up", b"invoice 7 paid"]
        assert page.position == position
    finally:
        for n in (one, two):
            await n.hub.close()


async def test_retry_after_a_timed_out_publish_on_real_redis_stores_once(
    nodes: Nodes, http: aiohttp.ClientSession
) -> None:
    """Redis frozen: a keyed room publish times out (503, says to retry with the key) but
    Redis runs it after the thaw; the retry with the same key answers that very position,
    and the room's history holds the message once."""
    server = RedisServer().start()
    try:
        node = await nodes.start(broker=RedisBroker(server.url, prefix="api",
                                                    socket_timeout=1.0), config=HISTORY)
        member = await node.member("r")
        keyed = {**AUTH, IDEMPOTENCY_KEY: "report-9"}
        status, first, _ = await post(http, node.api("/api/rooms/r/messages"), b"before")
        assert status == 202
        assert await member.recv() == "before"
        server.freeze()
        try:
            status, body, _ = await post(http, node.api("/api/rooms/r/messages"), b"report",
                                         headers=keyed)
        finally:
            server.thaw()
        assert status == 503, body
        assert f"retry with the same {IDEMPOTENCY_KEY}" in body["error"]
        assert await member.recv() == "report"  # local members were served meanwhile
        async with asyncio.timeout(20):  # the node reconnects after the thaw
            while True:
                status, body, _ = await post(http, node.api("/api/rooms/r/messages"),
                                             b"report", headers=keyed)
                if status == 202:
                    break
                assert status == 503, body
                await asyncio.sleep(0.2)  # a backend's retry interval, not a sync point
        assert body == {**first, "offset": first["offset"] + 1}
        page = await node.hub.room_history(Room("r"), since=0)
        assert [e.payload for e in page.envelopes] == [b"before", b"report"]
        await node.hub.close()
    finally:
        server.cleanup()
