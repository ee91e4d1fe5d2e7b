"""A fake ``roomcast.v1`` server for the client tests, on a real loopback socket.

It speaks docs/protocol.md as written (subprotocol, ``roomcast.since`` validated with its
400, welcome, per-room history with epochs and offsets, replay then ``joined``, binary
framing, close codes) with rooms in memory, and lets a test misbehave on purpose:
refuse upgrades, answer without the subprotocol, replay overlapping messages, change a
room's epoch, send raw frames, close with any code or drop the socket without a close.
The real server is built elsewhere; this is the contract the clients are written to.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMessage, WSMsgType, web

PROTOCOL = "roomcast.v1"
_EPOCH = re.compile(r"[0-9A-Za-z_-]{1,32}")
_epochs = itertools.count(1)


def new_epoch() -> str:
    """A fresh epoch string (the fake's history was 'lost')."""
    return f"ep{next(_epochs)}"


def validate_since(raw: str) -> dict[str, tuple[str, int]]:
    """Parse ``roomcast.since`` with the protocol's limits; ValueError says what is wrong."""
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"roomcast.since is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("roomcast.since must be a JSON object")
    if len(value) > 100:
        raise ValueError(f"roomcast.since: {len(value)} rooms, at most 100")
    out: dict[str, tuple[str, int]] = {}
    for room, position in value.items():
        if not 1 <= len(room) <= 200:
            raise ValueError(f"roomcast.since: room name of {len(room)} characters")
        if (not isinstance(position, list) or len(position) != 2
                or not isinstance(position[0], str) or not _EPOCH.fullmatch(position[0])
                or type(position[1]) is not int or not 0 <= position[1] <= 2**53 - 1):
            raise ValueError(f"roomcast.since: bad position for {room!r}: {position!r}")
        out[room] = (position[0], position[1])
    return out


@dataclass
class Room:
    """One room's history: ``log[i]`` has offset ``i + 1`` in ``epoch``."""

    epoch: str = field(default_factory=new_epoch)
    log: list[str | bytes] = field(default_factory=list)
    history: bool = True

    @property
    def top(self) -> int:
        return len(self.log)


@dataclass
class FakeConn:
    """One accepted connection, as the server sees it."""

    ws: web.WebSocketResponse
    request: web.Request
    since: dict[str, tuple[str, int]] | None
    number: int
    rooms: set[str] = field(default_factory=set)
    received: asyncio.Queue[WSMessage] = field(default_factory=asyncio.Queue)
    closed: asyncio.Future[int | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def id(self) -> str:
        return f"fake.{self.number}"

    async def send(self, frame: dict[str, Any] | str) -> None:
        """Send one text frame: a dict as JSON, a str as is (to send garbage)."""
        await self.ws.send_str(frame if isinstance(frame, str) else json.dumps(frame))

    async def send_bytes(self, frame: bytes) -> None:
        await self.ws.send_bytes(frame)

    async def close(self, code: int, reason: str = "") -> None:
        """Close with a close frame carrying ``code``."""
        await self.ws.close(code=code, message=reason.encode())

    def kill(self) -> None:
        """Drop the TCP connection without a close frame (what a SIGKILLed node does)."""
        transport = self.request.transport
        assert transport is not None
        transport.abort()

    async def receive(self, timeout: float = 5.0) -> WSMessage:
        """The next text or binary message the client sent."""
        return await asyncio.wait_for(self.received.get(), timeout)

    async def wait_closed(self, timeout: float = 5.0) -> int | None:
        """The close code the client sent (None if the socket just went away)."""
        return await asyncio.wait_for(asyncio.shield(self.closed), timeout)


def message_frame(room: str | None, epoch: str | None, offset: int | None,
                  data: str | bytes) -> str | bytes:
    """A ``message`` frame: JSON text for str data, header line + bytes for binary."""
    header: dict[str, Any] = {"type": "message"}
    if room is not None:
        header["room"] = room
    if epoch is not None:
        header["epoch"], header["offset"] = epoch, offset
    if isinstance(data, bytes):
        return json.dumps(header, separators=(",", ":")).encode() + b"\n" + data
    header["data"] = data
    return json.dumps(header)


class FakeV1:
    """The fake server. ``app`` serves ``/chat?room=R...``; the test drives the rest.

    ``recent``: messages replayed on a join without a declared position. ``overlap``:
    how many already-seen messages a recovery replays again (to test de-duplication).
    """

    def __init__(self, *, recent: int = 0, overlap: int = 0) -> None:
        self.recent, self.overlap = recent, overlap
        self.rooms: dict[str, Room] = {}
        self.conns: list[FakeConn] = []
        self.accepted: asyncio.Queue[FakeConn] = asyncio.Queue()
        self.handshakes: list[dict[str, str]] = []
        self.refuse: list[int] = []
        self.subprotocol = True
        self._numbers = itertools.count(1)
        self.app = web.Application()
        self.app.router.add_get("/chat", self._chat)

    def room(self, name: str) -> Room:
        return self.rooms.setdefault(name, Room())

    async def accept(self, timeout: float = 5.0) -> FakeConn:
        """The next connection that completed its upgrade."""
        return await asyncio.wait_for(self.accepted.get(), timeout)

    async def publish(self, room: str, data: str | bytes) -> int:
        """Append to the room's history and send to its members; the new offset."""
        r = self.room(room)
        r.log.append(data)
        frame = message_frame(room, r.epoch if r.history else None,
                              r.top if r.history else None, data)
        for conn in list(self.conns):
            if room in conn.rooms and not conn.ws.closed:
                # A connection that died gets nothing; it recovers the message later.
                with contextlib.suppress(ConnectionResetError):
                    await self._send(conn, frame)
        return r.top

    async def _send(self, conn: FakeConn, frame: str | bytes) -> None:
        if isinstance(frame, bytes):
            await conn.ws.send_bytes(frame)
        else:
            await conn.ws.send_str(frame)

    async def join(self, conn: FakeConn, room: str) -> None:
        """Join ``conn`` to ``room`` as the protocol says: replay, then ``joined``."""
        r = self.room(room)
        joined: dict[str, Any] = {"type": "joined", "room": room}
        declared = (conn.since or {}).get(room)
        start = r.top + 1
        if r.history:
            if declared is None:
                start = max(1, r.top - self.recent + 1)
            elif declared[0] != r.epoch or declared[1] > r.top:
                joined.update(recovered=False, reason="epoch")
            else:
                start = max(1, declared[1] + 1 - self.overlap)
                joined["recovered"] = True
            for offset in range(start, r.top + 1):
                await self._send(conn, message_frame(room, r.epoch, offset, r.log[offset - 1]))
            joined.update(epoch=r.epoch, offset=r.top, replayed=r.top + 1 - start)
        conn.rooms.add(room)
        await conn.send(joined)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.handshakes.append(dict(request.query))
        if self.refuse:
            status = self.refuse.pop(0)
            return web.Response(status=status, text=f"refused with {status} by the test")
        since = None
        if "roomcast.since" in request.query:
            try:
                since = validate_since(request.query["roomcast.since"])
            except ValueError as exc:
                return web.Response(status=400, text=str(exc))
        ws = web.WebSocketResponse(protocols=(PROTOCOL,) if self.subprotocol else ())
        await ws.prepare(request)
        conn = FakeConn(ws, request, since, next(self._numbers))
        self.conns.append(conn)
        try:
            if ws.ws_protocol == PROTOCOL:
                await conn.send({"type": "welcome", "protocol": PROTOCOL, "node": "fake",
                                 "connection": conn.id})
                for room in request.query.getall("room", []):
                    await self.join(conn, room)
            self.accepted.put_nowait(conn)
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    conn.received.put_nowait(msg)
        finally:
            self.conns.remove(conn)
            if not conn.closed.done():
                conn.closed.set_result(ws.close_code)
        return ws
