"""The demo node: the seed's chat example, an echo endpoint and the chat page.

Routes: ``GET /`` the chat page, ``GET /chat?room=NAME&name=NAME`` the chat socket,
``GET /echo`` an echo socket. Chat notices are JSON text messages
(``{"type": "join"|"leave", "name": ..., "members": N}``, the name taken from the
member's token when the node authenticates (``roomcast serve --jwt-secret ...``),
``members`` null while the cluster-wide count is unknown); what members send is
broadcast to the room as it came, sender included. A member whose message could not
reach other nodes is told so with ``{"type": "error", "text": ...}``.

A chat socket opened with ``&presence=1`` (the chat page does) also gets the room's
member list: ``{"type": "members", "members": [{"id": ..., "name": ...}, ...]}`` once it
has joined, then ``{"type": "presence", "event": "join"|"leave", "id": ..., "name":
...}`` for every join and leave on any node (``Hub.on_presence``; at most once, so the
list is sent again on every reconnect). Without it the chat is exactly as before. Only
the sockets that asked are looked at for each event (not every member of the room: a
room of N members would cost N*N/2 checks to fill).

A chat socket opened with ``&quiet=1`` joins and leaves without a join or leave notice
(each notice is a broadcast to the whole room and a cluster-wide member count: a room
filled by N such joins costs N*N/2 deliveries); it gets the room's messages as any
member does. For listeners and load tests.

A ``roomcast.v1`` client (docs/protocol.md) joining a room with history first gets the
room's last ``CHAT_REPLAY`` messages, or, reconnecting with the positions it saw, exactly
what it missed; raw clients get live messages only, as before.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any, Final

from aiohttp import web

from roomcast.node.connection import Connection
from roomcast.node.handlers import EventHandler
from roomcast.node.hub import HUB, Hub, get_hub
from roomcast.node.messages import Message
from roomcast.shared.errors import BrokerError, PublishError
from roomcast.shared.ids import validate_room
from roomcast.shared.presence import PresenceEvent

DEFAULT_ROOM: Final = "general"
MAX_NAME_LENGTH: Final = 40
CHAT_REPLAY: Final = 50
"""Recent messages of its room a v1 chat client that declared no position gets on join."""


def _room_of(conn: Connection) -> str:
    return conn.get_metadata("room") or DEFAULT_ROOM


async def _room_broadcast(conn: Connection, data: str | bytes) -> None:
    """Broadcast to the member's room; tell the member if other nodes were not reached."""
    try:
        await conn.hub.broadcast_to_room(_room_of(conn), data)
    except PublishError:
        if conn.is_open:
            warning = {"type": "error", "text": "not delivered to members on other nodes"}
            await conn.send_text(json.dumps(warning))


def _name_of(conn: Connection) -> str | None:
    """The token's name (its ``info.name``, else its user id) for an authenticated
    member: a ``?name=`` cannot pass for someone else; the query's name otherwise."""
    if conn.user_id is not None:
        name = conn.user_info.get("name")
        return str(name)[:MAX_NAME_LENGTH] if name else conn.user_id[:MAX_NAME_LENGTH]
    return conn.get_metadata("name")


async def _notice(conn: Connection, kind: str) -> None:
    try:
        members: int | None = await conn.hub.room_size(_room_of(conn))
    except BrokerError:
        members = None  # the cluster-wide count is unknown while Redis is unreachable
    notice = {"type": kind, "name": _name_of(conn), "members": members}
    await _room_broadcast(conn, json.dumps(notice))


def _wants_presence(conn: Connection) -> bool:
    return conn.get_metadata("presence") == "1"


def _is_quiet(conn: Connection) -> bool:
    return conn.get_metadata("quiet") == "1"


_WATCHERS: Final[weakref.WeakKeyDictionary[Hub, dict[str, set[Connection]]]] = (
    weakref.WeakKeyDictionary())
"""Per hub and room, the local chat sockets that asked for presence events."""


def _watchers(hub: Hub, room: str) -> set[Connection]:
    return _WATCHERS.setdefault(hub, {}).setdefault(room, set())


def _unwatch(conn: Connection) -> None:
    rooms = _WATCHERS.get(conn.hub)
    if rooms is None:
        return
    room = _room_of(conn)
    watching = rooms.get(room)
    if watching is not None:
        watching.discard(conn)
        if not watching:
            del rooms[room]


def _shown(conn: Connection) -> Mapping[str, Any]:
    """What the room's member list shows of a chat member (``Hub.presence_info``)."""
    return {"name": _name_of(conn) or "anonymous"}


def _on_presence(hub: Hub) -> Callable[[PresenceEvent], None]:
    def changed(event: PresenceEvent) -> None:
        """A join or leave anywhere: tell this node's members of the room who asked."""
        update = json.dumps({"type": "presence", "event": event.kind, "id": event.connection,
                             "name": str(event.info.get("name") or "anonymous")})
        watching = _WATCHERS.get(hub, {}).get(event.room)
        if not watching:
            return
        for conn in list(watching):
            if conn.is_open:
                conn.send_prepared(conn.prepare(update.encode(), binary=False))
    return changed


async def _send_members(conn: Connection) -> None:
    try:
        members = await conn.hub.room_presence(_room_of(conn))
    except BrokerError:
        return  # unknown while Redis is unreachable; the events still come
    listing = [{"id": m.connection, "name": str(m.info.get("name") or "anonymous")}
               for m in members]
    if conn.is_open:
        await conn.send_text(json.dumps({"type": "members", "members": listing}))


async def _chat_open(conn: Connection) -> None:
    if _wants_presence(conn):
        _watchers(conn.hub, _room_of(conn)).add(conn)
        await _send_members(conn)
    if not _is_quiet(conn):
        await _notice(conn, "join")


async def _chat_message(conn: Connection, msg: Message) -> None:
    await _room_broadcast(conn, msg.data)


async def _chat_close(conn: Connection, code: int, reason: str) -> None:
    if _wants_presence(conn):
        _unwatch(conn)
    if not _is_quiet(conn):
        await _notice(conn, "leave")


CHAT: Final = EventHandler(on_open=_chat_open, on_message=_chat_message, on_close=_chat_close)


async def _echo_message(conn: Connection, msg: Message) -> None:
    await conn.send(msg.data)


ECHO: Final = EventHandler(on_message=_echo_message)


async def chat(request: web.Request) -> web.StreamResponse:
    """The chat socket: join ``room`` (default ``general``) under ``name`` (``presence=1``:
    the member list and its events; ``quiet=1``: no join or leave notice)."""
    room = request.query.get("room", DEFAULT_ROOM)
    try:
        validate_room(room)
    except ValueError as exc:
        return web.Response(status=400, text=f"bad room: {exc}\n")
    name = request.query.get("name", "").strip()[:MAX_NAME_LENGTH] or "anonymous"
    metadata = {"room": room, "name": name}
    if request.query.get("presence") == "1":
        metadata["presence"] = "1"
    if request.query.get("quiet") == "1":
        metadata["quiet"] = "1"
    return await get_hub(request).upgrade(
        request, CHAT, rooms=[room], metadata=metadata, replay=CHAT_REPLAY,
    )


async def echo(request: web.Request) -> web.StreamResponse:
    """The echo socket: every message comes back as it came."""
    return await get_hub(request).upgrade(request, ECHO)


async def index(request: web.Request) -> web.Response:
    """The chat page."""
    page = resources.files("roomcast.node").joinpath("chat.html").read_text("utf-8")
    return web.Response(text=page, content_type="text/html")


def add_demo_routes(app: web.Application) -> None:
    """The chat page, the chat socket and the echo socket (and, when the app has a hub
    already, the chat's member list: its presence info and events)."""
    hub = app.get(HUB)
    if hub is not None:
        hub.presence_info = _shown
        hub.on_presence(_on_presence(hub))
    app.router.add_get("/", index)
    app.router.add_get("/chat", chat)
    app.router.add_get("/echo", echo)
