"""The Hub over real sockets, with aiohttp's client and the independent websockets client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import websockets
from aiohttp import web

from roomcast.node import (
    CloseCode,
    Connection,
    ConnectionState,
    EventHandler,
    Hub,
    HubConfig,
    Message,
)
from roomcast.node.app import create_app
from roomcast.node.hub import get_hub
from roomcast.shared.errors import ConnectionClosedError

Serve = Callable[[web.Application], Awaitable[str]]


def ws_url(base: str, path: str) -> str:
    return base.replace("http://", "ws://") + path


class Recorder:
    """An EventHandler that records every event and lets a test await them."""

    def __init__(self, hub_rooms: tuple[str, ...] = ()) -> None:
        self.events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.opened: asyncio.Queue[Connection] = asyncio.Queue()
        self.rooms = hub_rooms
        self.fail_on: str | None = None

    def handler(self) -> EventHandler:
        async def on_open(conn: Connection) -> None:
            await self.opened.put(conn)
            await self.events.put(("open", conn.id))

        async def on_message(conn: Connection, msg: Message) -> None:
            if self.fail_on is not None and msg.data == self.fail_on:
                raise RuntimeError("handler failed on purpose")
            await self.events.put(("message", conn.id, msg.data, msg.type.value))

        def on_close(conn: Connection, code: int, reason: str) -> None:
            self.events.put_nowait(("close", conn.id, code, reason))

        def on_error(conn: Connection, exc: BaseException) -> None:
            self.events.put_nowait(("error", conn.id, exc))

        def on_ping(conn: Connection, payload: bytes) -> None:
            self.events.put_nowait(("ping", conn.id, payload))

        def on_pong(conn: Connection, payload: bytes) -> None:
            self.events.put_nowait(("pong", conn.id, payload))

        return EventHandler(on_open, on_message, on_close, on_error, on_ping, on_pong)

    async def next(self, kind: str, timeout: float = 5.0) -> tuple[Any, ...]:
        async with asyncio.timeout(timeout):
            while True:
                event = await self.events.get()
                if event[0] == kind:
                    return event


def app_with(hub: Hub, rec: Recorder, rooms: tuple[str, ...] = ()) -> web.Application:
    app = web.Application()
    hub.attach(app)
    app.router.add_get("/ws", hub.route(rec.handler(), rooms=rooms))
    return app


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


async def test_echo_keeps_text_as_text_and_binary_as_binary(serve: Serve) -> None:
    """/echo returns each message with its type, to the websockets client."""
    base = await serve(create_app())
    async with websockets.connect(ws_url(base, "/echo")) as ws:
        await ws.send("héllo")
        assert await ws.recv() == "héllo"
        await ws.send(b"\x00\xff\x10")
        assert await ws.recv() == b"\x00\xff\x10"


async def test_chat_broadcasts_to_room_with_sender_and_notices(serve: Serve) -> None:
    """Chat: join notices with member counts, messages to the whole room, leave notice."""
    base = await serve(create_app())
    async with aiohttp.ClientSession() as session:
        a = await session.ws_connect(ws_url(base, "/chat?room=r1&name=ann"))
        assert json.loads(await a.receive_str()) == {"type": "join", "name": "ann", "members": 1}
        b = await session.ws_connect(ws_url(base, "/chat?room=r1&name=bob"))
        other = await session.ws_connect(ws_url(base, "/chat?room=r2&name=eve"))
        assert json.loads(await a.receive_str())["members"] == 2
        assert json.loads(await b.receive_str()) == {"type": "join", "name": "bob", "members": 2}
        await other.receive_str()
        await a.send_str("hi room")
        assert await a.receive_str() == "hi room"
        assert await b.receive_str() == "hi room"
        await b.send_bytes(b"\x01\x02")
        assert await a.receive_bytes() == b"\x01\x02"
        await b.close()
        assert json.loads(await a.receive_str()) == {"type": "leave", "name": "bob", "members": 1}
        await other.send_str("only r2")
        assert await other.receive_str() == "only r2"
        await a.send_str("still here")
        assert await a.receive_str() == "still here"  # nothing from r2 came first
        await a.close()
        await other.close()


async def test_chat_rejects_bad_room_name(serve: Serve) -> None:
    """A room name with control characters is refused with 400 before the upgrade."""
    base = await serve(create_app())
    async with aiohttp.ClientSession() as session, session.get(base + "/chat?room=a%00b") as resp:
        assert resp.status == 400


async def test_room_api_and_metadata(serve: Serve, rec: Recorder) -> None:
    """join/leave_room, in_room, rooms, metadata and room_size follow the seed's API."""
    hub = Hub()
    base = await serve(app_with(hub, rec))
    async with aiohttp.ClientSession() as session:
        c1 = await session.ws_connect(ws_url(base, "/ws"))
        conn = await asyncio.wait_for(rec.opened.get(), 5)
        await hub.join_room(conn, "chat:general")
        await hub.join_room(conn, "notifications")
        await hub.join_room(conn, "notifications")  # joining twice changes nothing
        assert conn.in_room("chat:general")
        assert conn.rooms == {"chat:general", "notifications"}
        assert await hub.room_size("notifications") == 1
        assert await hub.room_members("chat:general") == {conn.id}
        await hub.leave_room(conn, "chat:general")
        assert not conn.in_room("chat:general")
        assert await hub.room_size("chat:general") == 0
        conn.set_metadata("user_id", "12345")
        assert conn.get_metadata("user_id") == "12345"
        assert conn.get_metadata("missing") is None
        with pytest.raises(TypeError):
            conn.set_metadata("n", 5)  # type: ignore[arg-type]
        assert hub.get_connection(conn.id) is conn
        await c1.close()
        await rec.next("close")
        assert await hub.room_size("notifications") == 0, "closed connections leave rooms"
        assert hub.get_connection(conn.id) is None
        assert conn.state is ConnectionState.CLOSED
        with pytest.raises(ConnectionClosedError):
            await conn.send_text("too late")


async def test_broadcast_variants_and_targeted_send(serve: Serve, rec: Recorder) -> None:
    """Room, room-except, everyone, everyone-except and send_to reach exactly who they name."""
    hub = Hub()
    base = await serve(app_with(hub, rec, rooms=("lobby",)))
    async with aiohttp.ClientSession() as session:
        clients = [await session.ws_connect(ws_url(base, "/ws")) for _ in range(3)]
        conns = [await asyncio.wait_for(rec.opened.get(), 5) for _ in range(3)]
        by_id = {c.id: c for c in conns}
        ids = [c.id for c in conns]
        # Map each client socket to its connection by sending a marker.
        order: dict[int, str] = {}
        for i, ws in enumerate(clients):
            await ws.send_str(f"marker{i}")
            event = await rec.next("message")
            order[i] = event[1]
        outsider = order[2]
        await hub.leave_room(by_id[outsider], "lobby")

        await hub.broadcast_to_room("lobby", "to-lobby")
        await hub.broadcast_to_room_except("lobby", "lobby-but-0", order[0])
        await hub.broadcast("to-all")
        await hub.broadcast_except(b"all-but-1", order[1])
        assert await hub.send_to(order[2], "just-2")
        assert not await hub.send_to(ids[0].rsplit(".", 1)[0] + ".ffff", "nobody")
        with pytest.raises(ValueError):
            await hub.send_to("not-an-id", "x")

        async def drain(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[Any]:
            return [(await ws.receive(timeout=5)).data for _ in range(n)]

        assert await drain(clients[0], 3) == ["to-lobby", "to-all", b"all-but-1"]
        assert await drain(clients[1], 3) == ["to-lobby", "lobby-but-0", "to-all"]
        assert await drain(clients[2], 3) == ["to-all", b"all-but-1", "just-2"]
        for ws in clients:
            await ws.close()


async def test_callback_error_goes_to_on_error_and_connection_lives(
    serve: Serve, rec: Recorder
) -> None:
    """An exception in on_message reaches on_error; the connection and node carry on."""
    hub = Hub()
    rec.fail_on = "boom"
    base = await serve(app_with(hub, rec))
    async with websockets.connect(ws_url(base, "/ws")) as ws:
        await ws.send("boom")
        event = await rec.next("error")
        assert isinstance(event[2], RuntimeError)
        await ws.send("fine")
        assert (await rec.next("message"))[2] == "fine"


async def test_server_close_sends_code_and_reason(serve: Serve, rec: Recorder) -> None:
    """conn.close(code, reason) reaches the client; on_close reports the same code."""
    hub = Hub()
    base = await serve(app_with(hub, rec))
    async with websockets.connect(ws_url(base, "/ws")) as ws:
        conn = await asyncio.wait_for(rec.opened.get(), 5)
        await conn.send_text("before close")
        await conn.close(CloseCode.POLICY_VIOLATION, "Goodbye")
        assert await ws.recv() == "before close"
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, "Goodbye")
    assert (await rec.next("close"))[2:] == (1008, "Goodbye")
    with pytest.raises(ValueError):
        await conn.close(1005)


async def test_client_close_code_reaches_on_close(serve: Serve, rec: Recorder) -> None:
    """The client's close code and reason are what on_close receives."""
    hub = Hub()
    base = await serve(app_with(hub, rec))
    async with websockets.connect(ws_url(base, "/ws")) as ws:
        await rec.opened.get()
        await ws.close(4001, "bye now")
    assert (await rec.next("close"))[2:] == (4001, "bye now")


async def test_ping_from_client_is_answered_and_reported(serve: Serve, rec: Recorder) -> None:
    """A client ping gets a pong with the same payload and fires on_ping; pongs fire on_pong."""
    hub = Hub()
    base = await serve(app_with(hub, rec))
    async with websockets.connect(ws_url(base, "/ws")) as ws:
        conn = await asyncio.wait_for(rec.opened.get(), 5)
        pong = await ws.ping(b"heartbeat")
        await asyncio.wait_for(pong, 5)
        assert (await rec.next("ping"))[2] == b"heartbeat"
        await conn.send_ping(b"from-server")
        assert (await rec.next("pong"))[2] == b"from-server"
        assert conn.last_pong_time >= conn.last_ping_time > 0


async def test_keepalive_pings_and_closes_silent_client(serve: Serve, rec: Recorder) -> None:
    """The node pings on its interval; a client that never answers is closed with 1011."""
    hub = Hub(HubConfig(ping_interval_ms=100, pong_timeout_ms=200))
    base = await serve(app_with(hub, rec))
    async with aiohttp.ClientSession() as session:
        # aiohttp's client with autoping=False does not answer pings.
        ws = await session.ws_connect(ws_url(base, "/ws"), autoping=False)
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.PING
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == CloseCode.INTERNAL_ERROR
        event = await rec.next("close")
        assert event[2] == CloseCode.INTERNAL_ERROR
        assert hub.stats.pong_timeouts == 1
        await ws.close()


async def test_keepalive_keeps_answering_client(serve: Serve, rec: Recorder) -> None:
    """A client that answers pings stays connected across several intervals."""
    hub = Hub(HubConfig(ping_interval_ms=50, pong_timeout_ms=100))
    base = await serve(app_with(hub, rec))
    async with websockets.connect(ws_url(base, "/ws")) as ws:
        for _ in range(4):
            await rec.next("pong")
        await ws.send("alive")
        assert (await rec.next("message"))[2] == "alive"
    assert hub.stats.pong_timeouts == 0


async def test_message_over_limit_closes_1009(serve: Serve, rec: Recorder) -> None:
    """A message bigger than max_message_size closes the connection with 1009."""
    hub = Hub(HubConfig(max_message_size=1024))
    base = await serve(app_with(hub, rec))
    async with websockets.connect(ws_url(base, "/ws"), max_size=None) as ws:
        await ws.send("x" * 1024)
        assert (await rec.next("message"))[2] == "x" * 1024
        await ws.send("x" * 1025)
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    assert (await rec.next("close"))[2] == 1009


async def test_max_connections_refused_with_503(serve: Serve, rec: Recorder) -> None:
    """Past max_connections the upgrade is refused with HTTP 503 before any WebSocket."""
    hub = Hub(HubConfig(max_connections=2))
    base = await serve(app_with(hub, rec))
    async with websockets.connect(ws_url(base, "/ws")), websockets.connect(ws_url(base, "/ws")):
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(ws_url(base, "/ws")):
                pass
        assert info.value.response.status_code == 503
        assert hub.stats.refused_full == 1
    # A slot frees up once a connection closes.
    await rec.next("close")
    await rec.next("close")
    async with websockets.connect(ws_url(base, "/ws")) as ws:
        await ws.send("in")


@pytest.mark.parametrize(
    ("allowed", "origin", "status"),
    [
        ((), None, 101),
        ((), "same", 101),
        ((), "http://evil.example", 403),
        (("https://example.com",), "https://example.com", 101),
        (("https://example.com",), "https://other.example", 403),
        (("*",), "http://anything.example", 101),
    ],
)
async def test_origin_rules(
    serve: Serve, rec: Recorder, allowed: tuple[str, ...], origin: str | None, status: int
) -> None:
    """allowed_origins: empty = same-origin or no Origin; a list; '*' allows all."""
    hub = Hub(HubConfig(allowed_origins=allowed))
    base = await serve(app_with(hub, rec))
    headers = {}
    if origin == "same":
        headers["Origin"] = base
    elif origin is not None:
        headers["Origin"] = origin
    async with aiohttp.ClientSession() as session:
        if status == 101:
            ws = await session.ws_connect(ws_url(base, "/ws"), headers=headers)
            await ws.close()
        else:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(ws_url(base, "/ws"), headers=headers)
            assert info.value.status == status
            assert hub.stats.refused_origin == 1


async def test_plain_http_request_gets_400_with_explanation(serve: Serve) -> None:
    """A non-WebSocket GET on a WebSocket route is answered 400 with a reason."""
    base = await serve(create_app())
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/echo") as resp:
            assert resp.status == 400
            assert "WebSocket" in await resp.text()
        async with session.post(base + "/echo") as resp:
            assert resp.status == 405


@pytest.mark.parametrize("enabled", [True, False])
async def test_compression_negotiated_only_when_enabled(serve: Serve, enabled: bool) -> None:
    """permessage-deflate is agreed when enabled and offered; messages round-trip either way."""
    base = await serve(create_app(HubConfig(enable_compression=enabled)))
    async with websockets.connect(ws_url(base, "/echo")) as ws:
        names = [ext.name for ext in ws.protocol.extensions]
        assert names == (["permessage-deflate"] if enabled else [])
        text = "compress me " * 100
        await ws.send(text)
        assert await ws.recv() == text


async def test_compressed_broadcast_reaches_mixed_members(serve: Serve, rec: Recorder) -> None:
    """With compression on, members with and without deflate both get the broadcast."""
    hub = Hub(HubConfig(enable_compression=True))
    base = await serve(app_with(hub, rec, rooms=("z",)))
    text = "the same words again " * 50
    async with websockets.connect(ws_url(base, "/ws")) as deflating, websockets.connect(
        ws_url(base, "/ws"), compression=None
    ) as plain:
        await rec.opened.get()
        await rec.opened.get()
        await hub.broadcast_to_room("z", text)
        await hub.broadcast_to_room("z", text.encode())
        assert await deflating.recv() == text
        assert await plain.recv() == text
        assert await deflating.recv() == text.encode()
        assert await plain.recv() == text.encode()


async def test_shutdown_closes_clients_with_1001(serve: Serve, rec: Recorder) -> None:
    """Closing the hub closes every client with 1001 going away."""
    hub = Hub()
    base = await serve(app_with(hub, rec))
    async with websockets.connect(ws_url(base, "/ws")) as ws:
        await rec.opened.get()
        await hub.close()
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert (await rec.next("close"))[2] == 1001


async def test_slow_consumer_is_cut_off_and_others_still_served(
    serve: Serve, rec: Recorder
) -> None:
    """A member that stops reading is cut off at send_buffer_limit; others keep receiving."""
    hub = Hub(HubConfig(send_buffer_limit=64 * 1024))
    base = await serve(app_with(hub, rec, rooms=("busy",)))
    async with aiohttp.ClientSession() as session:
        fast = await session.ws_connect(ws_url(base, "/ws"))
        await rec.opened.get()
        # A raw socket with a tiny receive buffer that never reads.
        import socket

        host, port = base.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (host, int(port)))
        await loop.sock_sendall(
            sock,
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        slow = await asyncio.wait_for(rec.opened.get(), 5)
        chunk = "y" * 16000
        received = 0
        try:
            for _ in range(2000):
                await hub.broadcast_to_room("busy", chunk)
                msg = await fast.receive(timeout=5)
                assert msg.data == chunk
                received += 1
                if slow.state is not ConnectionState.OPEN:
                    break
            assert slow.close_code == CloseCode.TRY_AGAIN_LATER
            assert hub.stats.slow_consumers == 1
            event = await rec.next("close")
            assert event[1:3] == (slow.id, CloseCode.TRY_AGAIN_LATER)
            await hub.broadcast_to_room("busy", "after")
            assert (await fast.receive(timeout=5)).data == "after"
        finally:
            sock.close()
            await fast.close()


async def test_get_hub_without_attach_says_what_to_do() -> None:
    """get_hub on an app without a hub raises an error that names hub.attach."""
    app = web.Application()
    from aiohttp.test_utils import make_mocked_request

    request = make_mocked_request("GET", "/", app=app)
    with pytest.raises(RuntimeError, match="attach"):
        get_hub(request)
