"""The HTTP API for backends under /api: send to rooms, connections and everyone.

Registered only when an API key is set; every request needs ``Authorization: Bearer
<key>``. The request body is the message: ``text/*`` or ``application/json`` (UTF-8), or no
Content-Type, sends text, ``application/octet-stream`` sends binary. Every reply is JSON.

    POST /api/rooms/{room}/messages[?exclude=ID]   broadcast_to_room     202
    POST /api/connections/{id}/messages            send_to               202, 404
    POST /api/broadcast[?exclude=ID]               broadcast             202
    GET  /api/rooms/{room}                         room_members          200
    POST /api/users/{user}/messages                send_to_user          202
    DELETE /api/users/{user}/connections[?code=N&reason=TEXT]
                                                   disconnect_user       202
    GET  /api/users/{user}                         user_connections      200

In a room with history the 202 body also carries the message's position (``room``,
``epoch``, ``offset``), and an ``Idempotency-Key`` header makes a retry safe: a retried
request with the same key within max(history ttl, 5 minutes) gets the first request's
position and is neither stored nor delivered again.

A user is the ``user_id`` of its connections' identities (``node.auth``); the user's
messages and disconnects reach its connections on every node. ``DELETE`` closes them
with ``code`` (default 1000; 1000, 1001, 1008, 1011-1014 or 3000-4999) and ``reason``
(at most 123 bytes of UTF-8).

Refusals: 400 bad room, id, body, close code or reason, or idempotency key (or a key for
a room without history, a broadcast or a message to one connection or a user); 401 no
or wrong key; 413 body over ``max_message_size``; 415 other media types or content
codings; 503 the broker failed.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from aiohttp import hdrs, web

from roomcast.node._aiohttp import default_expect_handler
from roomcast.node.hub import Data, Hub
from roomcast.shared.errors import BrokerError
from roomcast.shared.history import Position, validate_idempotency_key
from roomcast.shared.ids import Room, node_of, validate_room
from roomcast.shared.users import check_close, check_not_user_room

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_UTF8: Final = frozenset({"utf-8", "utf8"})
_BINARY_TYPE: Final = "application/octet-stream"
_CHALLENGE: Final = 'Bearer realm="roomcast"'
IDEMPOTENCY_KEY: Final = "Idempotency-Key"
"""The request header that makes a room publish safe to retry (rooms with history)."""


class _Refusal(Exception):
    """A request the API answers with an error status and a JSON reason."""

    def __init__(
        self, status: int, reason: str, *, headers: Mapping[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})
        self.close = close

    def response(self) -> web.Response:
        """The JSON error reply; ``close`` ends the connection instead of reading on."""
        resp = web.json_response({"error": self.reason}, status=self.status,
                                 headers=self.headers)
        if self.close:
            resp.force_close()
        return resp


def setup_api(app: web.Application, hub: Hub, api_key: str | None) -> None:
    """Add the /api routes when ``api_key`` is set; None leaves them out (404)."""
    if api_key is None:
        return
    if not api_key:
        raise ValueError("the API key must be a non-empty string; None turns the API off")
    api = _Api(hub, api_key.encode())
    router = app.router
    router.add_post("/api/rooms/{room}/messages", api.endpoint(api.post_room),
                    expect_handler=api.expect)
    router.add_post("/api/connections/{conn_id}/messages", api.endpoint(api.post_connection),
                    expect_handler=api.expect)
    router.add_post("/api/broadcast", api.endpoint(api.post_broadcast),
                    expect_handler=api.expect)
    router.add_get("/api/rooms/{room}", api.endpoint(api.get_room))
    router.add_post("/api/users/{user}/messages", api.endpoint(api.post_user),
                    expect_handler=api.expect)
    router.add_delete("/api/users/{user}/connections", api.endpoint(api.delete_user))
    router.add_get("/api/users/{user}", api.endpoint(api.get_user))


class _Api:
    """The handlers, bound to one hub and one key."""

    def __init__(self, hub: Hub, key: bytes) -> None:
        self._hub = hub
        self._key = key

    def endpoint(self, handler: _Handler) -> _Handler:
        """``handler`` behind the key check, with refusals turned into JSON replies."""

        async def checked(request: web.Request) -> web.StreamResponse:
            try:
                self._authorize(request)
                return await handler(request)
            except _Refusal as refusal:
                return refusal.response()

        return checked

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """Answer ``Expect: 100-continue`` with 401 or 413 before the client sends a body."""
        try:
            self._authorize(request)
            self._check_declared_length(request)
        except _Refusal as refusal:
            refusal.close = True  # the body will not come; do not wait for it
            return refusal.response()
        await default_expect_handler(request)
        return None

    async def post_room(self, request: web.Request) -> web.StreamResponse:
        """Broadcast the body to a room on every node."""
        room = _room(request)
        exclude = _exclude(request)
        key = self._idempotency_key(request, room)
        data = await self._read_message(request)
        history = self._hub.history_for(room) is not None
        try:
            position = await self._hub.broadcast_to_room(room, data, exclude=exclude,
                                                         idempotency_key=key)
        except BrokerError as exc:
            raise _not_published(exc, history=history) from exc
        return _accepted(room, position)

    async def post_connection(self, request: web.Request) -> web.StreamResponse:
        """Send the body to one connection, on whichever node holds it."""
        conn_id = request.match_info["conn_id"]
        try:
            node_of(conn_id)
        except ValueError as exc:
            raise _Refusal(400, f"connection id: {exc}") from None
        _no_idempotency_key(request, "a message to one connection")
        data = await self._read_message(request)
        try:
            sent = await self._hub.send_to(conn_id, data)
        except BrokerError as exc:
            raise _Refusal(
                503, f"not delivered: the node holding {conn_id} could not be reached ({exc})"
            ) from exc
        if not sent:
            raise _Refusal(404, f"no open connection {conn_id} on this node")
        return _accepted()

    async def post_broadcast(self, request: web.Request) -> web.StreamResponse:
        """Send the body to every connection on every node."""
        exclude = _exclude(request)
        _no_idempotency_key(request, "a broadcast to everyone")
        data = await self._read_message(request)
        try:
            await self._hub.broadcast(data, exclude=exclude)
        except BrokerError as exc:
            raise _not_published(exc) from exc
        return _accepted()

    async def get_room(self, request: web.Request) -> web.StreamResponse:
        """The room's members across the cluster."""
        room = _room(request)
        try:
            members = await self._hub.room_members(room)
        except BrokerError as exc:
            raise _Refusal(503, f"cluster membership is unavailable: {exc}") from exc
        return web.json_response({"room": room, "size": len(members),
                                  "members": sorted(members)})

    async def post_user(self, request: web.Request) -> web.StreamResponse:
        """Send the body to every connection of a user, on every node."""
        user = request.match_info["user"]
        _no_idempotency_key(request, "a message to a user")
        data = await self._read_message(request)
        try:
            await self._hub.send_to_user(user, data)
        except BrokerError as exc:
            raise _Refusal(
                503, "delivered to the user's connections on this node only; other "
                f"nodes were not reached ({exc})") from exc
        return _accepted()

    async def delete_user(self, request: web.Request) -> web.StreamResponse:
        """Close every connection of a user, on every node, with ``?code=`` and
        ``?reason=``."""
        user = request.match_info["user"]
        code_text = _one(request, "code", "1000")
        reason = _one(request, "reason", "")
        try:
            code = int(code_text)
        except ValueError:
            raise _Refusal(400, f"code: {code_text!r} is not an integer") from None
        try:
            check_close(code, reason)
        except ValueError as exc:
            raise _Refusal(400, str(exc)) from None
        try:
            await self._hub.disconnect_user(user, code=code, reason=reason)
        except BrokerError as exc:
            raise _Refusal(
                503, "closed the user's connections on this node only; other nodes were "
                f"not reached ({exc})") from exc
        return _accepted()

    async def get_user(self, request: web.Request) -> web.StreamResponse:
        """A user's connections across the cluster."""
        user = request.match_info["user"]
        try:
            connections = await self._hub.user_connections(user)
        except BrokerError as exc:
            raise _Refusal(503, f"cluster membership is unavailable: {exc}") from exc
        return web.json_response({"user": user, "count": len(connections),
                                  "connections": sorted(connections)})

    def _idempotency_key(self, request: web.Request, room: Room) -> str | None:
        """The ``Idempotency-Key`` header, if any; 400 if malformed, repeated, or given
        for a room that keeps no history (nothing would remember the key)."""
        values = request.headers.getall(IDEMPOTENCY_KEY, [])
        if not values:
            return None
        if len(values) > 1:
            raise _Refusal(400, f"{IDEMPOTENCY_KEY}: give the header once")
        try:
            key = validate_idempotency_key(values[0])
        except ValueError as exc:
            raise _Refusal(400, f"{IDEMPOTENCY_KEY}: {exc}") from None
        if self._hub.history_for(room) is None:
            raise _Refusal(
                400, f"{IDEMPOTENCY_KEY}: room {room!r} keeps no history, so a retry "
                "cannot be recognised; idempotency keys need a room with history "
                "(--history-size above 0, and the room not excluded by the policy)")
        return key

    def _authorize(self, request: web.Request) -> None:
        """Refuse with 401 unless the request carries the bearer key."""
        scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        if scheme.lower() != "bearer":
            raise _Refusal(401, "missing API key: send Authorization: Bearer <key>",
                           headers={hdrs.WWW_AUTHENTICATE: _CHALLENGE})
        # aiohttp decodes headers as UTF-8 with surrogateescape; this restores the bytes.
        given = token.strip().encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, self._key):
            raise _Refusal(401, "wrong API key",
                           headers={hdrs.WWW_AUTHENTICATE: f'{_CHALLENGE}, error="invalid_token"'})

    def _check_declared_length(self, request: web.Request) -> None:
        """Refuse with 413 a Content-Length over the hub's message limit."""
        limit = self._hub.config.max_message_size
        length = request.content_length
        if length is not None and length > limit:
            raise _Refusal(413, f"message is {length} bytes; the limit is {limit}", close=True)

    async def _read_message(self, request: web.Request) -> Data:
        """The body as a text or binary message, never reading past the size limit."""
        binary = _is_binary(request)
        self._check_declared_length(request)
        limit = self._hub.config.max_message_size
        body = bytearray()
        while chunk := await request.content.read(limit + 1 - len(body)):
            body += chunk
            if len(body) > limit:
                raise _Refusal(413, f"message is over the limit of {limit} bytes", close=True)
        if binary:
            return bytes(body)
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Refusal(400, f"text body is not valid UTF-8: {exc}") from None


def _is_binary(request: web.Request) -> bool:
    """False for a text body, True for binary; 415 for anything else."""
    coding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
    if coding != "identity":
        raise _Refusal(415, f"Content-Encoding {coding} is not supported; send the body as is")
    if not request.headers.get(hdrs.CONTENT_TYPE, "").strip():
        return False
    media_type = request.content_type.lower()
    if media_type == _BINARY_TYPE:
        return True
    if media_type.startswith("text/") or media_type == "application/json":
        charset = request.charset
        if charset is not None and charset.lower() not in _UTF8:
            raise _Refusal(415, f"text must be UTF-8, not {charset}")
        return False
    raise _Refusal(
        415, f"Content-Type {media_type} is not supported; send text/* or "
        f"application/json (UTF-8) for a text message or {_BINARY_TYPE} for a binary one",
    )


def _room(request: web.Request) -> Room:
    """The room named in the path; 400 if it is not a valid room name (or a user's
    internal room)."""
    try:
        return check_not_user_room(validate_room(request.match_info["room"]))
    except ValueError as exc:
        raise _Refusal(400, f"room: {exc}") from None


def _one(request: web.Request, name: str, default: str) -> str:
    """The query parameter ``name`` (``default`` if absent); 400 if given twice."""
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise _Refusal(400, f"{name}: give it at most once")
    return values[0] if values else default


def _exclude(request: web.Request) -> str | None:
    """The connection id given as ``?exclude=``, if any; 400 if malformed."""
    values = request.query.getall("exclude", [])
    if not values:
        return None
    if len(values) > 1:
        raise _Refusal(400, "exclude: give at most one connection id")
    try:
        node_of(values[0])
    except ValueError as exc:
        raise _Refusal(400, f"exclude: {exc}") from None
    return values[0]


def _no_idempotency_key(request: web.Request, what: str) -> None:
    """400 for an ``Idempotency-Key`` where none can be honoured (nothing is stored), so
    that a backend does not retry believing it safe."""
    if IDEMPOTENCY_KEY in request.headers:
        raise _Refusal(
            400, f"{IDEMPOTENCY_KEY}: {what} is not stored, so a retry cannot be "
            "recognised; only room messages in rooms with history take a key")


def _not_published(exc: BrokerError, *, history: bool = False) -> _Refusal:
    """503 for a broadcast whose local members were served but other nodes were not
    (``history``: in a room with history, which may not have stored the message)."""
    return _Refusal(
        503, "delivered to members on this node only; other nodes were not reached"
        + (" and the message may not be in the room's history: retry with the same "
           f"{IDEMPOTENCY_KEY} to store it once (members of this node may see it twice)"
           if history else "")
        + f" ({exc})"
    )


def _accepted(room: Room | None = None, position: Position | None = None) -> web.Response:
    """202: the hub took the message; in a room with history, where it stands in it
    (recoverable), else delivery across nodes is at most once."""
    body: dict[str, str | int] = {"status": "accepted"}
    if room is not None and position is not None:
        body.update(room=room, epoch=position.epoch, offset=position.offset)
    return web.json_response(body, status=202)
