"""Rate limits, the per-address connect limit and the handshake timeout (node.limits)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from roomcast.node import Connection, EventHandler, Hub, Message
from roomcast.node.limits import (
    ALLOW,
    CLOSE,
    DROP,
    ConnectLimiter,
    Limits,
    RateLimit,
    retry_after,
)
from roomcast.shared.frames import build_frame
from roomcast.shared.rfc6455 import Opcode
from tests.rawws import RawClient

Start = Callable[[web.Application], Awaitable[tuple[str, int]]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    servers: list[TestServer] = []

    async def run(app: web.Application) -> tuple[str, int]:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        assert server.port is not None
        return "127.0.0.1", server.port

    yield run
    for server in reversed(servers):
        await server.close()


def room_app(hub: Hub, rate: RateLimit | None = None) -> web.Application:
    """``/ws``: everyone in room ``r``; each message is broadcast to the room."""

    async def on_message(conn: Connection, msg: Message) -> None:
        await hub.broadcast_to_room("r", msg.data)

    app = web.Application()
    hub.attach(app)
    app.router.add_get("/ws", hub.route(EventHandler(on_message=on_message), rooms=("r",),
                                        rate_limit=rate))
    return app


# -- units ----------------------------------------------------------------------------

def test_message_bucket_burst_refill_and_close() -> None:
    """burst at once, then the rate; drops past close_after within the window close."""
    limiter = RateLimit(messages_per_second=10, burst=5, close_after=4).limiter(0.0)
    assert [limiter.admit(1, 0.0) for _ in range(5)] == [ALLOW] * 5
    assert limiter.admit(1, 0.0) == DROP
    assert limiter.admit(1, 0.1) == ALLOW  # 0.1 s refilled one message
    assert [limiter.admit(1, 0.1) for _ in range(3)] == [DROP, DROP, CLOSE]


def test_drops_outside_the_window_do_not_add_up() -> None:
    """A client over the limit now and then is not closed: the window restarts."""
    limiter = RateLimit(messages_per_second=1, burst=1, close_after=3, window=1.0).limiter(0.0)
    now = 0.0
    for _ in range(10):
        assert limiter.admit(1, now) == ALLOW
        assert limiter.admit(1, now) == DROP
        assert limiter.admit(1, now) == DROP
        now += 2.0


def test_byte_bucket_lets_one_large_message_through_then_waits() -> None:
    """Bytes: a message passes while the bucket is not empty (it may go into debt)."""
    limiter = RateLimit(bytes_per_second=1000).limiter(0.0)
    assert limiter.admit(5000, 0.0) == ALLOW  # bigger than a second's worth: passes
    assert limiter.admit(1, 0.0) == DROP      # 4000 bytes of debt
    assert limiter.admit(1, 3.9) == DROP
    assert limiter.admit(1, 4.1) == ALLOW


def test_rate_limit_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="needs messages_per_second or bytes_per_second"):
        RateLimit()
    with pytest.raises(ValueError, match="> 0"):
        RateLimit(messages_per_second=0)
    with pytest.raises(ValueError, match="finite"):
        RateLimit(messages_per_second=float("inf"))
    with pytest.raises(TypeError, match="must be an int"):
        RateLimit(messages_per_second=1, burst=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        Limits(handshake_timeout=-1)
    with pytest.raises(TypeError, match="RateLimit"):
        Limits(rate=5)  # type: ignore[arg-type]
    assert RateLimit(messages_per_second=50).drops_to_close == 100
    assert RateLimit(messages_per_second=0.5).message_capacity == 1.0
    assert Limits().connect_limiter() is None


def test_connect_limiter_per_address_with_retry_after() -> None:
    """Each address has its own bucket; the wait says when the next one may come."""
    limiter = ConnectLimiter(2.0, burst=2)
    assert limiter.check("a", 0.0) == 0.0
    assert limiter.check("a", 0.0) == 0.0
    wait = limiter.check("a", 0.0)
    assert wait == pytest.approx(0.5)
    assert retry_after(wait) == "1" and retry_after(2.1) == "3"
    assert limiter.check("b", 0.0) == 0.0  # another address is not affected
    assert limiter.check("a", 0.5) == 0.0
    assert limiter.check(None, 0.0) == 0.0


def test_connect_limiter_memory_is_bounded() -> None:
    """Refilled buckets are swept; past max_addresses the oldest go."""
    limiter = ConnectLimiter(1.0, burst=1, max_addresses=100)
    for i in range(10_000):
        limiter.check(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter) <= 100
    limiter.check("x", 10.0)
    for i in range(ConnectLimiter.SWEEP_EVERY):
        limiter.check("y", 10.0 + i)
    assert len(limiter) <= 2


# -- over real sockets ----------------------------------------------------------------

async def test_flood_at_ten_times_the_limit_is_refused_then_closed_with_1008(
    start: Start,
) -> None:
    """A client sending 10x its limit: messages over it never reach the room, then it is
    closed with 1008; a bystander in the room keeps sending and receiving."""
    hub = Hub()
    rate = RateLimit(messages_per_second=20, burst=20)
    host, port = await start(room_app(hub, rate))
    url = f"ws://{host}:{port}/ws"
    async with aiohttp.ClientSession() as session:
        bystander = await session.ws_connect(url)
        flooder = await session.ws_connect(url)
        flood_seen = 0

        async def flood() -> None:
            for i in range(400):  # 200 messages a second: 10x the limit
                await flooder.send_str(f"flood {i}")
                await asyncio.sleep(0.005)  # pacing the sender, not waiting for an event

        flooding = asyncio.create_task(flood())
        async with asyncio.timeout(30):
            msg = await flooder.receive()
            while msg.type is aiohttp.WSMsgType.TEXT:
                msg = await flooder.receive()
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert (msg.data, msg.extra) == (1008, "rate limit exceeded")
            flooding.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await flooding
            # The bystander: what the flooder got through, then its own messages.
            await bystander.send_str("still here")
            while (text := await bystander.receive_str()) != "still here":
                assert text.startswith("flood ")
                flood_seen += 1
            for i in range(30):  # the bystander's own pace is under the limit
                await bystander.send_str(f"mine {i}")
                while (text := await bystander.receive_str()) != f"mine {i}":
                    # the flooder's last callbacks may still be running
                    assert text.startswith("flood ")
                    flood_seen += 1
                await asyncio.sleep(0.06)
        assert not bystander.closed
        await bystander.close()
    # The burst and what refilled while the flood lasted: far less than was sent.
    assert 20 <= flood_seen < 100  # of 400 sent
    assert hub.stats.rate_limit_closes == 1
    assert hub.stats.messages_rate_limited >= 2 * 20
    assert hub.stats.messages_in == flood_seen + 1 + 30


async def test_default_rate_limit_from_hub_limits_and_bytes(start: Start) -> None:
    """Limits(rate=...) applies to routes without their own; bytes count too."""
    hub = Hub(limits=Limits(rate=RateLimit(bytes_per_second=100, close_after=4)))
    host, port = await start(room_app(hub))
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"ws://{host}:{port}/ws")
        await ws.send_str("x" * 90)
        async with asyncio.timeout(10):
            assert await ws.receive_str() == "x" * 90
            for _ in range(4):
                # 10 bytes left: the first passes into 890 bytes of debt (8.9 s to pay)
                await ws.send_str("y" * 900)
            assert await ws.receive_str() == "y" * 900
            await ws.send_str("z")  # the fourth drop within the window
            msg = await ws.receive()
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1008)
    assert hub.stats.messages_rate_limited == 4


async def test_connects_per_address_over_the_limit_get_429(start: Start) -> None:
    """The third connection within a second from one address: 429 with Retry-After."""
    hub = Hub(limits=Limits(connects_per_address=2, connect_burst=2))
    host, port = await start(room_app(hub))
    first = await RawClient.connect(host, port, "/ws")
    second = await RawClient.connect(host, port, "/ws")
    third = await RawClient.connect(host, port, "/ws")
    assert (first.status, second.status, third.status) == (101, 101, 429)
    assert third.headers["retry-after"] == "1"
    assert hub.stats.refused_rate == 1
    for client in (first, second, third):
        await client.close()


async def test_slow_headers_are_closed_after_the_handshake_timeout(start: Start) -> None:
    """A socket that sends half a request and stops, and one that trickles its headers,
    are both closed once the handshake timeout passes, and counted; a complete upgrade
    and an idle keep-alive HTTP connection are not."""
    hub = Hub(limits=Limits(handshake_timeout=0.5))
    app = room_app(hub)

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/ok", ok)
    host, port = await start(app)
    good = await RawClient.connect(host, port, "/ws")
    assert good.status == 101
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and nothing more
    trickle_reader, trickle = await asyncio.open_connection(host, port)
    http_reader, http = await asyncio.open_connection(host, port)
    http.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")

    async def trickling() -> None:
        trickle.write(b"GET /ws HTTP/1.1\r\n")
        with contextlib.suppress(ConnectionError):
            for i in range(100):
                trickle.write(f"X-Slow-{i}: 1\r\n".encode())
                await asyncio.sleep(0.1)  # pacing the slow client

    task = asyncio.create_task(trickling())
    async with asyncio.timeout(10):
        assert await reader.read() == b""  # closed by the node
        assert await trickle_reader.read() == b""
        head = await http_reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert hub.stats.handshake_timeouts == 2
    # The upgraded socket lives on past the timeout: a ping still gets its pong.
    good.send(b"\x89\x80\x00\x00\x00\x00")  # masked ping, empty payload
    frame = await good.recv_frame(timeout=5)
    assert frame is not None and frame.opcode == 0xA
    for w in (writer, trickle, http):
        w.close()
    await good.close()
    assert hub.stats.handshake_timeouts == 2


def test_handshake_timeout_off() -> None:
    """Limits(handshake_timeout=0) leaves the app's servers as aiohttp makes them."""
    hub = Hub(limits=Limits(handshake_timeout=0))
    app = web.Application()
    hub.attach(app)
    assert "_make_handler" not in vars(app)


async def test_a_closed_flooder_is_no_longer_read(start: Start) -> None:
    """After its 1008 the flooder's socket is not read: what it goes on sending is not
    parsed (the drop count stops), and the socket goes when the closing handshake times
    out."""
    hub = Hub()
    rate = RateLimit(messages_per_second=5, burst=5)
    host, port = await start(room_app(hub, rate))
    client = await RawClient.connect(host, port, "/ws")
    frame = build_frame(Opcode.TEXT, b"spam", mask_key=b"\x01\x02\x03\x04")
    client.send(frame * 100)
    async with asyncio.timeout(10):
        while True:
            got = await client.recv_frame()
            assert got is not None
            if got.opcode == Opcode.CLOSE:
                break
    assert int.from_bytes(got.payload[:2], "big") == 1008
    dropped = hub.stats.messages_rate_limited
    assert 10 <= dropped <= 100
    with contextlib.suppress(ConnectionError):
        for _ in range(50):  # 200 KB more, without answering the close
            client.send(frame * 5000)
            await asyncio.sleep(0.01)
    async with asyncio.timeout(15):
        with contextlib.suppress(ConnectionError):  # aborted: a reset, or EOF
            while await client.reader.read(65536):  # the node ends it after CLOSE_TIMEOUT
                pass
    assert hub.stats.messages_rate_limited == dropped
    assert hub.stats.rate_limit_closes == 1
    await client.close()


async def test_v1_client_is_told_rate_limited_once_per_run(start: Start) -> None:
    """A roomcast.v1 client over its limit gets one error frame rate_limited per run of
    dropped messages (not one per message)."""
    hub = Hub()
    host, port = await start(room_app(hub, RateLimit(messages_per_second=1, burst=2,
                                                      close_after=50)))
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"ws://{host}:{port}/ws", protocols=["roomcast.v1"])
        async with asyncio.timeout(10):
            assert (await ws.receive_json())["type"] == "welcome"
            assert (await ws.receive_json())["type"] == "joined"
            for i in range(6):
                await ws.send_str(f"m{i}")
            frames = [await ws.receive_json() for _ in range(3)]
        assert sorted(f["type"] for f in frames) == ["error", "message", "message"]
        error = next(f for f in frames if f["type"] == "error")
        assert error["code"] == "rate_limited" and "rate limit" in error["message"]
        assert [f["data"] for f in frames if f["type"] == "message"] == ["m0", "m1"]
        await ws.close()
    assert hub.stats.messages_rate_limited == 4
