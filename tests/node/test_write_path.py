"""The write path over real sockets: shared frame bytes, coalesced writes, bounded buffers.

Server-side transports are wrapped to record what the hub hands to ``write``; nothing
here measures time (benchmarks under scripts/bench do that).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import websockets
from aiohttp import web

import roomcast.node.core
import roomcast.shared.frames
from roomcast.node import CloseCode, Connection, ConnectionState, EventHandler, Hub, HubConfig
from roomcast.shared.frames import (
    PreparedMessage,
    close_frame,
    parse_close_payload,
    parse_frame,
    text_frame,
)
from roomcast.shared.rfc6455 import Opcode

Serve = Callable[[web.Application], Awaitable[str]]
ROOM = "hall"
WAIT = 10.0
"""Upper bound of every wait in these tests."""
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@dataclass
class Node:
    """A hub serving /ws (every client joins ROOM) and what its handler saw."""

    hub: Hub
    base: str
    opened: asyncio.Queue[Connection] = field(default_factory=asyncio.Queue)
    closed: asyncio.Queue[tuple[str, int, str]] = field(default_factory=asyncio.Queue)

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.base.removeprefix("http://").split(":")
        return host, int(port)


@pytest.fixture
async def make_node(serve: Serve) -> AsyncIterator[Callable[..., Awaitable[Node]]]:
    hubs: list[Hub] = []

    async def make(**config: Any) -> Node:
        hub = Hub(HubConfig(**config))
        hubs.append(hub)
        node = Node(hub, "")

        def on_open(conn: Connection) -> None:
            node.opened.put_nowait(conn)

        def on_close(conn: Connection, code: int, reason: str) -> None:
            node.closed.put_nowait((conn.id, code, reason))

        app = web.Application()
        hub.attach(app)
        app.router.add_get("/ws", hub.route(EventHandler(on_open=on_open, on_close=on_close),
                                            rooms=(ROOM,)))
        node.base = await serve(app)
        return node

    yield make
    for hub in hubs:
        await hub.close(drain_seconds=1)


ASYNCIO_ONLY = pytest.mark.asyncio(loop_factories=["asyncio"])
"""For tests that record writes by replacing ``transport.write``: uvloop's transports
do not allow it (their attributes are read-only), and what they check is the hub's own
calls, the same on every loop."""


class Writes:
    """Records every ``write`` the hub makes on some server-side transports."""

    def __init__(self) -> None:
        self.calls: dict[str, list[bytes]] = {}

    def watch(self, conn: Connection) -> None:
        transport: Any = conn._transport
        assert transport is not None
        real = transport.write
        calls = self.calls.setdefault(conn.id, [])

        def write(data: bytes) -> None:
            calls.append(data)
            real(data)

        transport.write = write


async def raw_client(node: Node, rcvbuf: int | None = None) -> tuple[socket.socket, Connection]:
    """A WebSocket client on a bare socket (it reads only when the test says so)."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, node.host_port)
    await loop.sock_sendall(sock, UPGRADE)
    conn = await asyncio.wait_for(node.opened.get(), 5)
    return sock, conn


@ASYNCIO_ONLY
async def test_broadcast_hands_the_same_bytes_object_to_every_member(
    make_node: Callable[..., Awaitable[Node]],
) -> None:
    """One broadcast builds one frame; every member's transport gets that very object."""
    node = await make_node()
    writes = Writes()
    async with aiohttp.ClientSession() as session:
        clients = [await session.ws_connect(node.base + "/ws") for _ in range(5)]
        conns = [await asyncio.wait_for(node.opened.get(), 5) for _ in clients]
        for conn in conns:
            writes.watch(conn)
        await node.hub.broadcast_to_room(ROOM, "shared bytes")
        for client in clients:
            assert (await client.receive(timeout=5)).data == "shared bytes"
        written = [data for conn in conns for data in writes.calls[conn.id]]
        assert len(written) == len(conns)
        assert all(data is written[0] for data in written)
        assert written[0] == text_frame("shared bytes")
        assert node.hub.stats.messages_out == 5
        assert node.hub.stats.bytes_out == 5 * len("shared bytes")
        for client in clients:
            await client.close()


@ASYNCIO_ONLY
async def test_frames_queued_in_one_turn_leave_in_one_write(
    make_node: Callable[..., Awaitable[Node]],
) -> None:
    """Broadcasts and sends made in one loop turn reach each member in a single write."""
    node = await make_node()
    writes = Writes()
    async with aiohttp.ClientSession() as session:
        clients = [await session.ws_connect(node.base + "/ws") for _ in range(3)]
        conns = [await asyncio.wait_for(node.opened.get(), 5) for _ in clients]
        for conn in conns:
            writes.watch(conn)
        # No await suspends in between: a hub without peers publishes nothing.
        for i in range(10):
            await node.hub.broadcast_to_room(ROOM, f"m{i}")
        await conns[0].send_text("just for 0")
        for client in clients:
            got = [(await client.receive(timeout=5)).data for _ in range(10)]
            assert got == [f"m{i}" for i in range(10)]
        assert (await clients[0].receive(timeout=5)).data == "just for 0"
        assert [len(writes.calls[c.id]) for c in conns] == [1, 1, 1]
        expected = b"".join(text_frame(f"m{i}") for i in range(10))
        assert writes.calls[conns[1].id] == [expected]
        assert writes.calls[conns[0].id] == [expected + text_frame("just for 0")]
        # the next turn's frames go in the next write
        await node.hub.broadcast_to_room(ROOM, "later")
        assert (await clients[2].receive(timeout=5)).data == "later"
        assert writes.calls[conns[2].id][1] == text_frame("later")
        for client in clients:
            await client.close()


@ASYNCIO_ONLY
async def test_compression_deflates_once_per_broadcast(
    make_node: Callable[..., Awaitable[Node]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With permessage-deflate, a broadcast is compressed once and those bytes go to all."""
    calls: list[bytes] = []
    deflate = roomcast.shared.frames.deflate_message

    def counting(payload: bytes, wbits: int = 15) -> bytes:
        calls.append(payload)
        return deflate(payload, wbits)

    monkeypatch.setattr(roomcast.shared.frames, "deflate_message", counting)
    node = await make_node(enable_compression=True)
    writes = Writes()
    text = "compress me once " * 20
    clients = [await websockets.connect(node.base.replace("http", "ws") + "/ws",
                                        compression="deflate") for _ in range(4)]
    try:
        conns = [await asyncio.wait_for(node.opened.get(), 5) for _ in clients]
        assert all(conn.wbits for conn in conns)
        for conn in conns:
            writes.watch(conn)
        await node.hub.broadcast_to_room(ROOM, text)
        for client in clients:
            assert await asyncio.wait_for(client.recv(), 5) == text
        assert calls == [text.encode()]
        written = [writes.calls[c.id][0] for c in conns]
        assert all(data is written[0] for data in written)
        assert len(written[0]) < len(text)
    finally:
        for client in clients:
            await client.close()


@pytest.mark.parametrize("delay_ms", [0, 10], ids=["no-delay", "delay-10ms"])
async def test_slow_consumer_is_bounded_cut_off_and_never_delays_the_others(
    make_node: Callable[..., Awaitable[Node]], delay_ms: int,
) -> None:
    """A member that stops reading holds at most send_buffer_limit bytes plus one frame,
    is cut off with 1013 only once the bytes it held were over the limit, and the member
    that reads gets every broadcast before the next one is made. With a write delay
    too: batched bytes count as held."""
    limit = 64 * 1024
    node = await make_node(send_buffer_limit=limit, write_delay_ms=delay_ms)
    sock, slow = await raw_client(node, rcvbuf=4096)  # never reads
    async with aiohttp.ClientSession() as session:
        fast = await session.ws_connect(node.base + "/ws")
        await asyncio.wait_for(node.opened.get(), 5)
        chunk = "z" * 8000
        frame_size = len(text_frame(f"0000{chunk}"))
        held: list[int] = []
        try:
            for i in range(1000):
                await node.hub.broadcast_to_room(ROOM, f"{i:04}{chunk}")
                # the reader is served in lockstep, whatever the slow one does
                assert (await fast.receive(timeout=5)).data == f"{i:04}{chunk}"
                transport = slow._transport
                if slow.state is not ConnectionState.OPEN or transport is None:
                    break
                held.append(slow._out_size + transport.get_write_buffer_size())
            else:
                pytest.fail("the slow consumer was never cut off")
            assert held and max(held) <= limit + frame_size
            # refused only when what it held before the frame was over the limit
            assert held[-1] > limit
            assert slow.close_code == CloseCode.TRY_AGAIN_LATER
            assert await asyncio.wait_for(node.closed.get(), 5) == (
                slow.id, CloseCode.TRY_AGAIN_LATER, "slow consumer")
            assert node.hub.stats.slow_consumers == 1
            assert slow._out is None
            await node.hub.broadcast_to_room(ROOM, "after")
            assert (await fast.receive(timeout=5)).data == "after"
        finally:
            sock.close()
            await fast.close()


async def test_a_cut_off_member_gets_the_1013_close_frame_after_what_it_was_sent(
    make_node: Callable[..., Awaitable[Node]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow consumer that reads again after it was cut off finds, after the frames
    that were written to it, a 1013 "slow consumer" close frame, then the end of the
    stream: nothing that was queued but not written, nothing after the close frame."""
    monkeypatch.setattr(roomcast.node.core, "ABORT_TIMEOUT", WAIT)  # reading takes time
    limit = 16 * 1024
    node = await make_node(send_buffer_limit=limit)
    sock, slow = await raw_client(node, rcvbuf=4096)  # reads only once cut off
    sent = 0
    try:
        while slow.state is ConnectionState.OPEN and sent < 10_000:
            await node.hub.broadcast_to_room(ROOM, f"{sent:05}" + "w" * 2000)
            sent += 1
            await asyncio.sleep(0)  # the write of this turn
        assert slow.state is ConnectionState.CLOSING
        loop = asyncio.get_running_loop()
        stream = bytearray()
        async with asyncio.timeout(WAIT):
            while chunk := await loop.sock_recv(sock, 65536):
                stream += chunk
        head = stream.index(b"\r\n\r\n") + 4  # the 101 response comes first
        assert stream.startswith(b"HTTP/1.1 101 ")
        del stream[:head]
        frames = []
        while stream:
            parsed = parse_frame(stream, expect_masked=False)
            assert parsed is not None, "the stream ends inside a frame"
            frames.append(parsed[0])
            del stream[: parsed[1]]
        *data, last = frames
        assert [f.payload[:5] for f in data] == [f"{i:05}".encode() for i in range(len(data))]
        assert len(data) < sent  # the refused frame (and what was queued) never left
        assert last.opcode is Opcode.CLOSE
        assert parse_close_payload(last.payload) == (CloseCode.TRY_AGAIN_LATER,
                                                     "slow consumer")
        assert await asyncio.wait_for(node.closed.get(), WAIT) == (
            slow.id, CloseCode.TRY_AGAIN_LATER, "slow consumer")
    finally:
        sock.close()


async def test_a_reader_that_keeps_up_is_never_cut_off(
    make_node: Callable[..., Awaitable[Node]],
) -> None:
    """Far more than the limit in total is fine when the client reads it as it comes."""
    limit = 16 * 1024
    node = await make_node(send_buffer_limit=limit)
    async with aiohttp.ClientSession() as session:
        client = await session.ws_connect(node.base + "/ws")
        conn = await asyncio.wait_for(node.opened.get(), 5)
        message = "r" * 4000
        for _ in range(50):  # 200 kB in all, one message a turn
            await node.hub.broadcast_to_room(ROOM, message)
            assert (await client.receive(timeout=5)).data == message
        assert conn.state is ConnectionState.OPEN
        assert node.hub.stats.slow_consumers == 0
        await client.close()


@ASYNCIO_ONLY
async def test_one_turn_over_the_limit_cuts_off_before_anything_is_written(
    make_node: Callable[..., Awaitable[Node]], caplog: pytest.LogCaptureFixture,
) -> None:
    """Queuing more than the limit in one turn drops the member; nothing queued is
    written (only its 1013 close frame), the cut-off is logged, and only what was
    queued counts as delivered."""
    caplog.set_level(logging.INFO, "roomcast.node")
    node = await make_node(send_buffer_limit=10_000)
    sock, conn = await raw_client(node)
    writes = Writes()
    writes.watch(conn)
    try:
        for _ in range(5):
            await node.hub.broadcast_to_room(ROOM, "q" * 3000)
        assert conn.state is ConnectionState.CLOSING
        assert conn._out is None and conn._out_size == 0
        assert node.hub.stats.slow_consumers == 1
        assert f"cut off {conn.id}: slow consumer" in caplog.text
        # Counted: the four that were queued (the fourth while 9,012 bytes were held,
        # within the limit), not the fifth, refused with 12,016 bytes held.
        assert node.hub.stats.messages_out == 4
        assert node.hub.stats.bytes_out == 4 * 3000
        assert not await node.hub.send_to(conn.id, "gone")
        await asyncio.wait_for(node.closed.get(), 5)
        assert writes.calls[conn.id] == [close_frame(CloseCode.TRY_AGAIN_LATER,
                                                     "slow consumer")]
    finally:
        sock.close()


async def test_send_that_tips_a_member_over_is_not_counted_as_sent(
    make_node: Callable[..., Awaitable[Node]],
) -> None:
    """send_to returns False when its own frame gets the member cut off."""
    node = await make_node(send_buffer_limit=10_000)
    sock, conn = await raw_client(node)
    try:
        assert await node.hub.send_to(conn.id, "s" * 6000)
        assert await node.hub.send_to(conn.id, "s" * 6000)  # 6,004 held: within the limit
        assert not await node.hub.send_to(conn.id, "s" * 6000)  # 12,008 held: over it
        assert conn.state is ConnectionState.CLOSING
        assert node.hub.stats.slow_consumers == 1
        assert node.hub.stats.messages_out == 2
        await asyncio.wait_for(node.closed.get(), 5)
    finally:
        sock.close()


async def test_prepared_message_frames_once() -> None:
    """PreparedMessage builds its frame once; frame_for returns that same object."""
    prepared = PreparedMessage(b"x" * 10, binary=True)
    assert prepared.frame_for(0) is prepared.frame
    assert prepared.frame_for(0) is prepared.frame_for(0)
