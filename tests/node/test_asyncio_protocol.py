"""The socket after the handshake: the hub's own WebSocketProtocol, over real sockets.

Since the hub writes the 101 itself and takes the socket over from aiohttp, what an
open connection keeps (no request, no task while idle), how its events reach the
callbacks (in order, paused reading when too many wait, on_close last and once) and how
it opens and closes are the hub's own doing; these tests pin that behaviour.

A masked frame sent in the same TCP write as the upgrade request is covered by
tests/node/test_raw_protocol.py::test_masked_frame_sent_with_the_handshake_is_served.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import os
import random
import string
import time
import weakref
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import websockets
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from roomcast.broker import Broker, MemoryBroker
from roomcast.node import Connection, EventHandler, Hub, HubConfig, Message
from roomcast.node.asyncio_protocol import INBOX_HIGH
from roomcast.node.core import CLOSE_TIMEOUT, NOTHING
from roomcast.shared.errors import BrokerError
from roomcast.shared.frames import build_frame, parse_close_payload
from roomcast.shared.handshake import accept_key
from roomcast.shared.ids import Room
from roomcast.shared.rfc6455 import CloseCode, Opcode
from tests.rawws import RawClient

Serve = Callable[[web.Application], Awaitable[str]]
MASK = b"\x11\x22\x33\x44"
WAIT = 10.0
"""Upper bound of every wait inside a test (the 60 s pytest timeout bounds the rest)."""


@dataclass
class Node:
    """A hub serving /ws with a given handler, and the weak references of its requests."""

    hub: Hub
    base: str = ""
    requests: list[weakref.ref[web.Request]] = field(default_factory=list)

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.base.removeprefix("http://").split(":")
        return host, int(port)

    @property
    def ws_url(self) -> str:
        return self.base.replace("http://", "ws://") + "/ws"

    async def raw(self, extra: dict[str, str] | None = None) -> RawClient:
        host, port = self.host_port
        return await RawClient.connect(host, port, "/ws", extra)


async def start_node(
    serve: Serve,
    handler: EventHandler,
    *,
    config: HubConfig | None = None,
    broker: Broker | None = None,
    rooms: Iterable[str] = (),
) -> Node:
    """Serve ``handler`` on /ws; the aiohttp handler keeps only a weakref to its request.

    The ``serve`` fixture stops the server (and with it the hub) when the test ends.
    """
    hub = Hub(config, broker=broker)
    node = Node(hub)
    room_names = tuple(rooms)

    async def ws(request: web.Request) -> web.StreamResponse:
        node.requests.append(weakref.ref(request))
        return await hub.upgrade(request, handler, rooms=room_names)

    app = web.Application()
    hub.attach(app, drain_seconds=1.0)
    app.router.add_get("/ws", ws)
    node.base = await serve(app)
    return node


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; for states nothing can be awaited for."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():  # noqa: ASYNC110 - nothing to await: only polling tells
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


@contextlib.asynccontextmanager
async def raw_clients() -> AsyncIterator[list[RawClient]]:
    """A list to put RawClients in; every one is closed on the way out."""
    clients: list[RawClient] = []
    try:
        yield clients
    finally:
        for client in clients:
            await client.close()


def masked_text(text: str) -> bytes:
    return build_frame(Opcode.TEXT, text.encode(), mask_key=MASK)


def inflate_with_window(body: bytes, wbits: int) -> bytes:
    """Inflate a permessage-deflate body keeping only a ``wbits`` window.

    The output is taken 64 bytes at a time, so a back-reference further than the
    window cannot be served from the output of the same call and zlib.error is raised.
    """
    inflater = zlib.decompressobj(-wbits)
    data, out = body + b"\x00\x00\xff\xff", b""
    while data:
        out += inflater.decompress(data, 64)
        data = inflater.unconsumed_tail
    return out


def live_request_handlers() -> int:
    """aiohttp server protocols (one per accepted socket) still in memory."""
    gc.collect()
    return sum(isinstance(o, RequestHandler) for o in gc.get_objects())


class Events:
    """What the callbacks saw, in order, with an awaitable signal per kind of event."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.opened: asyncio.Queue[Connection] = asyncio.Queue()
        self.closed = asyncio.Event()
        self._changed = asyncio.Event()

    def record(self, *event: Any) -> None:
        self.log.append(event)
        self._changed.set()

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [e for e in self.log if e[0] == kind]

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition`` holds after some recorded event."""
        async with asyncio.timeout(WAIT):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    def on_close(self, conn: Connection, code: int, reason: str) -> None:
        self.record("close", code, reason)
        self.closed.set()


# -- what an open connection keeps ---------------------------------------------------


async def test_request_is_not_kept_after_upgrade(serve: Serve) -> None:
    """Once upgrade returned, the aiohttp Request is garbage; the connection still works."""
    events = Events()

    async def on_message(conn: Connection, msg: Message) -> None:
        await conn.send(msg.data)

    handler = EventHandler(on_open=events.opened.put_nowait, on_message=on_message)
    node = await start_node(serve, handler)
    handlers_before = live_request_handlers()
    async with aiohttp.ClientSession() as session, session.ws_connect(node.ws_url) as ws:
        async with asyncio.timeout(WAIT):
            await events.opened.get()
        assert len(node.requests) == 1
        ref = node.requests[0]

        def request_is_gone() -> bool:
            gc.collect()
            return ref() is None

        # aiohttp finishes the request just after upgrade returns; nothing can be
        # awaited for that, so it is polled.
        await eventually(request_is_gone, "the upgraded request was collected")
        # Nor is aiohttp's protocol for the socket (its parser, buffers, keep-alive
        # timer) kept: the hub's WebSocketProtocol replaced it.
        await eventually(lambda: live_request_handlers() == handlers_before,
                         "aiohttp's RequestHandler was collected")
        assert node.hub.connection_count == 1
        await ws.send_str("still here")
        msg = await ws.receive(timeout=WAIT)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, "still here")


async def test_idle_connections_keep_no_task(serve: Serve) -> None:
    """50 open, idle connections add no asyncio task (beyond a small constant)."""
    events = Events()
    node = await start_node(serve, EventHandler(on_open=events.opened.put_nowait))
    before = len(asyncio.all_tasks())
    async with raw_clients() as clients:
        for _ in range(50):
            client = await node.raw()
            clients.append(client)
            assert client.status == 101
        async with asyncio.timeout(WAIT):
            for _ in range(50):
                await events.opened.get()
        assert node.hub.connection_count == 50

        def tasks_now() -> int:
            return len(asyncio.all_tasks())

        # aiohttp's request tasks end just after upgrade returns; nothing can be awaited
        # for that, so the count is polled.
        try:
            await eventually(lambda: tasks_now() <= before + 5,
                             f"at most {before} + 5 tasks with 50 idle connections")
        except AssertionError as exc:
            names = sorted(t.get_name() for t in asyncio.all_tasks())
            raise AssertionError(f"{exc}; tasks: {names}") from None
        # Idle is not dead: every connection still gets a broadcast.
        await node.hub.broadcast("all there?")
        for client in clients:
            frame = await client.recv_frame(WAIT)
            assert frame is not None
            assert (frame.opcode, frame.payload) == (Opcode.TEXT, b"all there?")


# -- events reach the callbacks in order ---------------------------------------------


async def test_messages_in_order_and_on_close_last_once(serve: Serve) -> None:
    """An awaiting on_message sees the messages in send order; on_close comes last, once."""
    events = Events()

    async def on_message(conn: Connection, msg: Message) -> None:
        n = int(msg.data)
        for _ in range(n % 4):
            await asyncio.sleep(0)
        await asyncio.sleep(0.001 * (n % 3))  # callbacks of varying length
        events.record("message", msg.data)

    node = await start_node(serve, EventHandler(on_message=on_message, on_close=events.on_close))
    sent = [str(i) for i in range(30)]
    async with websockets.connect(node.ws_url) as ws:
        for text in sent:
            await ws.send(text)
        await ws.close(1000)
    async with asyncio.timeout(WAIT):
        await events.closed.wait()
    await node.hub.close(drain_seconds=1.0)  # nothing more may come after this
    assert events.log == [("message", text) for text in sent] + [("close", 1000, "")]


async def test_reading_pauses_while_callbacks_lag_and_nothing_is_lost(serve: Serve) -> None:
    """With on_message blocked, reading pauses at INBOX_HIGH; released, all 300 arrive."""
    events = Events()
    gate = asyncio.Event()

    async def on_message(conn: Connection, msg: Message) -> None:
        await gate.wait()
        events.record("message", msg.data)

    handler = EventHandler(on_open=events.opened.put_nowait, on_message=on_message)
    node = await start_node(serve, handler)
    texts = [f"{i:04d}" + "m" * 1020 for i in range(300)]  # 1 KB each
    async with raw_clients() as clients:
        try:
            client = await node.raw()
            clients.append(client)
            async with asyncio.timeout(WAIT):
                conn = await events.opened.get()
            protocol, transport = conn._protocol, conn._transport
            assert protocol is not None and transport is not None
            # The writer buffers what the socket cannot take; no drain, so no blocking.
            client.send(b"".join(masked_text(text) for text in texts))
            await eventually(lambda: conn.reading_paused, "reading paused")
            assert not transport.is_reading()
            assert protocol._inbox is not None and len(protocol._inbox) >= INBOX_HIGH - 1
            # While the node does not read, a pong could not be seen: the keepalive
            # must not blame the client for the node's own backlog, however late it is.
            later = time.time() + 3600
            assert conn.keepalive(later, 1.0, 1.0) == NOTHING
            assert conn.keepalive(later + 3600, 1.0, 1.0) == NOTHING
        finally:
            gate.set()
        await events.until(lambda: len(events.log) >= len(texts))
        assert events.log == [("message", text) for text in texts]
        assert not conn.reading_paused and transport.is_reading()
        # Reading really resumed: a message sent now is read too.
        client.send(masked_text("after"))
        await events.until(lambda: events.log[-1] == ("message", "after"))


async def test_a_burst_in_one_read_is_parsed_a_bounded_batch_at_a_time(serve: Serve) -> None:
    """2,000 messages in one write: the node never holds more than about INBOX_HIGH of
    them waiting for on_message, yet all arrive, in order."""
    events = Events()
    waiting: list[int] = []

    async def on_message(conn: Connection, msg: Message) -> None:
        protocol = conn._protocol
        assert protocol is not None and protocol._inbox is not None
        waiting.append(len(protocol._inbox))
        events.record("message", msg.data)

    node = await start_node(serve, EventHandler(on_open=events.opened.put_nowait,
                                                on_message=on_message))
    texts = [f"{i:05d}" for i in range(2000)]
    async with raw_clients() as clients:
        client = await node.raw()
        clients.append(client)
        async with asyncio.timeout(WAIT):
            await events.opened.get()
        client.send(b"".join(masked_text(text) for text in texts))
        await events.until(lambda: len(events.log) >= len(texts))
    assert [e[1] for e in events.log] == texts
    assert max(waiting) <= 2 * INBOX_HIGH


async def test_a_burst_without_on_message_is_read_to_the_end(serve: Serve) -> None:
    """With no callback to wait for, a read of more than INBOX_HIGH frames is parsed to
    its end at once: reading never stays paused (a ping after the burst is answered)."""
    node = await start_node(serve, EventHandler())
    async with raw_clients() as clients:
        client = await node.raw()
        clients.append(client)
        burst = b"".join(masked_text(f"{i}") for i in range(5 * INBOX_HIGH))
        client.send(burst + build_frame(Opcode.PING, b"still there?", mask_key=MASK))
        async with asyncio.timeout(WAIT):
            while True:
                frame = await client.recv_frame(WAIT)
                assert frame is not None
                if frame.opcode is Opcode.PONG:
                    break
        assert frame.payload == b"still there?"
        assert node.hub.stats.messages_in == 5 * INBOX_HIGH


# -- opening -------------------------------------------------------------------------


async def test_client_gone_during_on_open_gets_on_close_after_it(serve: Serve) -> None:
    """A client that aborts while on_open awaits: on_close once, after on_open, 1006."""
    events = Events()
    release = asyncio.Event()

    async def on_open(conn: Connection) -> None:
        events.record("open-start", conn.hub.local_room_size("r"))
        events.opened.put_nowait(conn)
        await release.wait()
        events.record("open-end")

    node = await start_node(serve, EventHandler(on_open=on_open, on_close=events.on_close),
                            rooms=["r"])
    async with raw_clients() as clients:
        try:
            client = await node.raw()
            clients.append(client)
            assert client.status == 101
            async with asyncio.timeout(WAIT):
                conn = await events.opened.get()
            protocol = conn._protocol
            assert protocol is not None
            client.writer.transport.abort()
            await eventually(lambda: protocol._gone, "the server saw the client go")
            assert events.of("close") == []  # not while on_open still runs
        finally:
            release.set()
        async with asyncio.timeout(WAIT):
            await events.closed.wait()
        assert node.hub.connection_count == 0
        assert node.hub.local_room_size("r") == 0
        await node.hub.close(drain_seconds=1.0)
    assert events.log == [("open-start", 1), ("open-end",),
                          ("close", CloseCode.ABNORMAL, "")]


class SubscribeFails(MemoryBroker):
    """A broker that cannot subscribe (as a Redis that went away mid-join would)."""

    async def subscribe(self, room: Room) -> None:
        raise BrokerError("subscribe failed (test)")


async def test_broker_error_while_joining_closes_1011(serve: Serve) -> None:
    """subscribe raising in upgrade's join: the client gets 1011; the node lets go."""
    events = Events()
    handler = EventHandler(on_open=events.opened.put_nowait, on_close=events.on_close)
    node = await start_node(serve, handler, broker=SubscribeFails(), rooms=["r"])
    async with aiohttp.ClientSession() as session, session.ws_connect(node.ws_url) as ws:
        msg = await ws.receive(timeout=WAIT)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == CloseCode.INTERNAL_ERROR
    async with asyncio.timeout(WAIT):
        await events.closed.wait()
    assert node.hub.connection_count == 0
    assert node.hub.local_room_size("r") == 0
    await node.hub.close(drain_seconds=1.0)
    assert events.opened.empty()  # it never opened
    assert events.of("close") == [
        ("close", CloseCode.INTERNAL_ERROR, "server error while opening")
    ]


async def test_handshake_headers_and_negotiated_deflate_window(serve: Serve) -> None:
    """The 101: a correct accept key, the node and connection ids, and the asked window;
    broadcasts are deflated with that window."""
    events = Events()
    node = await start_node(serve, EventHandler(on_open=events.opened.put_nowait),
                            config=HubConfig(enable_compression=True))
    host, port = node.host_port
    key = base64.b64encode(os.urandom(16)).decode()
    reader, writer = await asyncio.open_connection(host, port)
    client = RawClient(reader, writer)
    try:
        writer.write(
            f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10\r\n"
            "\r\n".encode()
        )
        async with asyncio.timeout(WAIT):
            head = await reader.readuntil(b"\r\n\r\n")
            conn = await events.opened.get()
        status, *lines = head.decode().split("\r\n")
        assert status.split()[1] == "101"
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines if line)
        }
        assert headers["sec-websocket-accept"] == accept_key(key)
        assert headers["x-roomcast-node"] == node.hub.node_id
        assert headers["x-roomcast-connection"] == conn.id
        extensions = [p.strip() for p in headers["sec-websocket-extensions"].split(";")]
        assert extensions[0] == "permessage-deflate"
        assert "server_max_window_bits=10" in extensions[1:]

        text = "roomcast compresses broadcasts " * 33  # about 1 KB, compressible
        assert 1000 <= len(text) <= 1100
        # Repeats 1200 bytes back: deflated with a window over 10 bits it refers to them,
        # and inflate_with_window(..., 10) fails.
        block = "".join(random.Random(7).choices(string.ascii_letters, k=1200))
        for message in (text, block + block):
            await node.hub.broadcast(message)
            frame = await client.recv_frame(WAIT)
            assert frame is not None and frame.opcode is Opcode.TEXT and frame.rsv1
            assert inflate_with_window(frame.payload, 10) == message.encode()
    finally:
        await client.close()


# -- closing -------------------------------------------------------------------------


async def test_server_close_handshake_with_code_and_reason(serve: Serve) -> None:
    """conn.close(4000, "bye"): the client gets and answers it; close returns; on_close."""
    events = Events()
    handler = EventHandler(on_open=events.opened.put_nowait, on_close=events.on_close)
    node = await start_node(serve, handler)
    async with websockets.connect(node.ws_url) as ws:
        async with asyncio.timeout(WAIT):
            conn = await events.opened.get()
        # Well under CLOSE_TIMEOUT: returned because the client answered, not by abort.
        async with asyncio.timeout(CLOSE_TIMEOUT - 1):
            await conn.close(4000, "bye")
        with pytest.raises(websockets.ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), WAIT)
        received, answered = info.value.rcvd, info.value.sent
        assert received is not None and (received.code, received.reason) == (4000, "bye")
        assert answered is not None and answered.code == 4000
    async with asyncio.timeout(WAIT):
        await events.closed.wait()
    assert events.of("close") == [("close", 4000, "bye")]


async def test_hub_close_does_not_wait_for_a_client_that_never_answers(serve: Serve) -> None:
    """A client that ignores the close frame: hub.close returns, the client sees EOF."""
    events = Events()
    handler = EventHandler(on_open=events.opened.put_nowait, on_close=events.on_close)
    node = await start_node(serve, handler)
    async with raw_clients() as clients:
        client = await node.raw()
        clients.append(client)
        async with asyncio.timeout(WAIT):
            await events.opened.get()
        # Bounded by drain_seconds, not by the protocol's own CLOSE_TIMEOUT abort.
        async with asyncio.timeout(CLOSE_TIMEOUT - 1):
            await node.hub.close(drain_seconds=0.5)
        assert node.hub.connection_count == 0
        frame = await client.recv_frame(WAIT)
        assert frame is not None and frame.opcode is Opcode.CLOSE
        assert parse_close_payload(frame.payload)[0] == CloseCode.GOING_AWAY
        assert await client.recv_frame(WAIT) is None  # EOF: the server let the socket go
    assert events.of("close") == [("close", CloseCode.GOING_AWAY, "server shutting down")]
