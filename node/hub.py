"""The Hub: this node's connections, rooms and broadcasts, wired to a broker.

Every broadcast is framed once (``PreparedMessage``) and the same bytes are queued for
each local member; one envelope goes to the broker for the members on other nodes.
Queued frames are written once per event-loop turn (or, with ``HubConfig.write_delay_ms``,
once per delay). There is no task per recipient.

A connection that asked for the ``roomcast.v1`` subprotocol gets every message in a v1
frame (``node.v1``): a broadcast is framed once for the plain members and once for the
v1 members. Rooms with history (``HubConfig.history``) are published through the broker,
which gives every message its position; each node then delivers the room's messages in
stream order through ``node.recovery`` (its own included, from the broker's echo), and a
v1 member that joins gets what it missed before its ``joined`` frame.

A connection with a user id (``node.auth``) is also a member of its user's internal
room (``shared.users``): ``send_to_user``, ``disconnect_user`` and ``user_connections``
reach every connection of the user on every node through it. Those rooms are kept apart
from the application's rooms (not in ``local_rooms``, ``rooms_of`` or the metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, Final

from aiohttp import web
from aiohttp.http_websocket import ws_ext_gen, ws_ext_parse

from roomcast.broker import Broker, MemoryBroker
from roomcast.node._aiohttp import Upgraded, guard_handshakes, take_over
from roomcast.node.asyncio_protocol import Owner, WebSocketProtocol
from roomcast.node.auth import Auth, AuthRefused, RoomForbidden, arm_expiry
from roomcast.node.connection import Connection
from roomcast.node.core import (
    CUT_OFF,
    FULL,
    NOTHING,
    OPENING_ERROR_REASON,
    PONG_OVERDUE,
    PONG_TIMEOUT_REASON,
    WRITE,
    ConnectionState,
    deliver,
)
from roomcast.node.handlers import EventHandler, run_callback
from roomcast.node.limits import Limits, RateLimit, retry_after
from roomcast.node.recovery import LOST, MESSAGE, Catchup, Item, Lost, PendingJoin, Step
from roomcast.node.rooms import RoomIndex
from roomcast.node.stats import HubStats as HubStats  # re-exported: node.metrics imports it
from roomcast.node.v1 import (
    PROTOCOL,
    UpgradeParams,
    error_frame,
    joined_frame,
    left_frame,
    lost_frame,
    message_frame,
    offers_v1,
    parse_upgrade_params,
    welcome_frame,
)
from roomcast.shared.cache import ENTRY_OVERHEAD, BoundedCache
from roomcast.shared.config import HubConfig
from roomcast.shared.envelope import Envelope, Kind
from roomcast.shared.errors import BrokerError, HandshakeError, PublishError
from roomcast.shared.frames import MessageReader, PreparedMessage
from roomcast.shared.handshake import handshake_response, origin_allowed, validate_upgrade_request
from roomcast.shared.history import (
    MAX_READ_LIMIT,
    History,
    HistoryPage,
    Position,
    validate_idempotency_key,
)
from roomcast.shared.ids import (
    ConnectionId,
    NodeId,
    Room,
    make_connection_id,
    new_node_id,
    node_of,
    validate_room,
)
from roomcast.shared.presence import (
    Presence,
    PresenceCallback,
    PresenceEvent,
    decode_event,
    decode_info,
    encode_event,
    encode_info,
)
from roomcast.shared.rfc6455 import CloseCode
from roomcast.shared.rfc6455 import Data as Data  # re-exported: node.api imports it here
from roomcast.shared.users import (
    check_close,
    check_not_user_room,
    decode_disconnect,
    encode_disconnect,
    is_user_room,
    user_room,
)

log = logging.getLogger("roomcast.node")

REPLAY_CACHE_BYTES: Final = 4 * 2**20
"""About how much memory the frames of replayed messages a hub keeps for the next member
that recovers them may take (``shared.cache``): about 6,000 messages of 64 B."""
_DRAIN_POLL: Final = 0.005
"""Seconds between checks of a client's unsent bytes while a long replay waits for it
(the transport has no drain event the hub can await)."""


class Hub:
    """The seed's ``Hub``: connections, rooms and broadcasts of one node.

    Create one per process, ``attach`` it to an aiohttp Application, and route
    WebSocket requests to ``upgrade`` (or ``route(handler)``).
    """

    def __init__(
        self,
        config: HubConfig | None = None,
        *,
        broker: Broker | None = None,
        node_id: NodeId | None = None,
        auth: Auth | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.config = config if config is not None else HubConfig()
        self.auth = auth
        """Who may connect and join which rooms (``node.auth``); None: anyone, anywhere."""
        self.limits = limits if limits is not None else Limits()
        """Rate limits, the per-address connect limit, the handshake timeout."""
        self._connects = self.limits.connect_limiter()
        self.node_id: NodeId = node_id if node_id is not None else new_node_id()
        self.broker: Broker = broker if broker is not None else MemoryBroker()
        self.stats = HubStats()
        self._connections: dict[ConnectionId, Connection] = {}
        self._rooms: RoomIndex[Connection] = RoomIndex()
        self._seq = 0
        self._dirty: list[Connection] = []
        self._flush_scheduled = False
        self._write_delay = self.config.write_delay
        self._flush_timer: asyncio.TimerHandle | None = None
        """The pending flush while ``HubConfig.write_delay_ms`` batches writes."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._started = False
        self._accepting = False
        self._callback_tasks: set[asyncio.Task[Any]] = set()
        """Tasks running user callbacks (on_open in upgrade, then each connection's)."""
        self._finishing: set[asyncio.Future[None]] = set()
        """Tasks leaving rooms and reporting on_close for connections that went."""
        # Made once and shared by every connection (not a bound method each).
        self._write_soon = self._schedule_flush
        self._owner = Owner(self.stats, self._callback_tasks, self._connection_lost)
        self.on_envelope_latency: Callable[[float], None] | None = None
        """Called with publish-to-delivery seconds of each envelope from another node."""
        self._framed_conns: dict[ConnectionId, Connection] = {}
        """The roomcast.v1 connections (also in ``_connections``)."""
        self._users: dict[Room, dict[ConnectionId, Connection]] = {}
        """Each user's internal room: its connections on this node."""
        self._presence_callbacks: list[PresenceCallback] = []
        self.presence_info: Callable[[Connection], Mapping[str, Any]] | None = None
        """What presence shows of a connection (``room_presence``, events); None: its
        identity's info (``conn.user_info``; nothing for anonymous connections)."""
        self._pending: dict[Room, dict[ConnectionId, PendingJoin]] = {}
        """v1 members joining rooms with history, not yet caught up with the stream."""
        self._subscribing: dict[Room, asyncio.Future[None]] = {}
        """Rooms with history whose first subscribe is under way (later joiners wait)."""
        self._catchup = Catchup(self._read_gap, self._emit_steps, self.stats,
                                limit=min(self.config.recovery_max, MAX_READ_LIMIT))
        self._unconfirmed: dict[_Sent, bool] = {}
        """This node's publishes to rooms with history whose answer has not come (False),
        or whose publish failed after it may have reached Redis and which local members
        therefore got without a position (True). Redis may still have stored such a
        message: its copy from the stream is then not delivered here a second time."""
        self._replay_frames: BoundedCache[tuple[Room, str, int], PreparedMessage] = (
            BoundedCache(REPLAY_CACHE_BYTES))
        """Frames of replayed messages by room and position, shared by every member that
        recovers them (``_recover``): in a reconnect storm each is framed once."""

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the broker and the keepalive sweep; idempotent."""
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        await self.broker.start(self.node_id, self._on_envelope, resumed=self._on_resumed,
                                departed=self._on_departed)
        self._keepalive = asyncio.create_task(self._keepalive_loop(), name="roomcast-keepalive")
        self._started = True
        self._accepting = True
        log.info("node %s started", self.node_id)

    async def close(
        self, code: int = CloseCode.GOING_AWAY, reason: str = "server shutting down",
        drain_seconds: float = 5.0,
    ) -> None:
        """Stop accepting, flush queued frames, close every client with ``code``, stop."""
        self._accepting = False
        conns = [c for c in self._connections.values() if c.state is ConnectionState.OPEN]
        if conns:
            self._flush_all()
            closing = [asyncio.ensure_future(c.close(code, reason)) for c in conns]
            _, pending = await asyncio.wait(closing, timeout=drain_seconds)
            for fut in pending:
                fut.cancel()
        if self._callback_tasks:
            await asyncio.wait(self._callback_tasks, timeout=drain_seconds)
        lingering = list(self._connections.values())
        for conn in lingering:
            conn.abort_socket()  # did not finish the closing handshake in time
        if lingering:
            await asyncio.sleep(0)  # their connection_lost callbacks start _finish
        if self._finishing:
            await asyncio.wait(self._finishing, timeout=drain_seconds)
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
            self._keepalive = None
        await self._catchup.close_all()
        if self._started:  # a second close (the app's shutdown, then its cleanup) is quiet
            await self.broker.close()
            self._started = False
            log.info("node %s stopped", self.node_id)

    @property
    def accepting(self) -> bool:
        """True while the hub takes new connections (started and not draining)."""
        return self._accepting

    def attach(self, app: web.Application, *, drain_seconds: float = 10.0) -> web.Application:
        """Enable WebSockets on ``app`` (the seed's ``enableWebSocket``).

        Stores the hub as ``app[HUB]``, starts it with the app, and when the app shuts
        down closes every client with 1001, waiting at most ``drain_seconds``.
        """
        app[HUB] = self
        if self.limits.handshake_timeout:
            guard_handshakes(app, self.limits.handshake_timeout, self._handshake_timed_out)

        async def lifespan(_: web.Application) -> AsyncIterator[None]:
            await self.start()
            yield
            await self.close(drain_seconds=drain_seconds)

        async def on_shutdown(_: web.Application) -> None:
            await self.close(drain_seconds=drain_seconds)

        app.cleanup_ctx.append(lifespan)
        app.on_shutdown.append(on_shutdown)
        return app

    # -- connections -----------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        """How many connections this node holds (connecting ones included)."""
        return len(self._connections)

    def connections(self) -> list[Connection]:
        """A snapshot of this node's open connections."""
        return [c for c in self._connections.values() if c.state is ConnectionState.OPEN]

    def get_connection(self, conn_id: str) -> Connection | None:
        """The open local connection with this id, or None (``getConnection``).

        Connections on other nodes are reached with ``send_to``.
        """
        conn = self._connections.get(ConnectionId(conn_id))
        return conn if conn is not None and conn.state is ConnectionState.OPEN else None

    def route(
        self, handler: EventHandler, *, rooms: Iterable[str] = (), replay: int = 0,
        rate_limit: RateLimit | None = None,
    ) -> Any:
        """An aiohttp handler that upgrades every request with ``handler`` (see
        ``upgrade`` for ``rooms`` and ``replay``)."""
        rooms = tuple(rooms)
        _check_replay(replay)

        async def websocket_route(request: web.Request) -> web.StreamResponse:
            return await self.upgrade(request, handler, rooms=rooms, replay=replay,
                                      rate_limit=rate_limit)

        return websocket_route

    async def upgrade(
        self,
        request: web.Request,
        handler: EventHandler,
        *,
        rooms: Iterable[str] = (),
        metadata: Mapping[str, str] | None = None,
        replay: int = 0,
        rate_limit: RateLimit | None = None,
    ) -> web.StreamResponse:
        """Accept a WebSocket on ``request`` (``register``); return what aiohttp must return.

        A client that offers the ``roomcast.v1`` subprotocol gets it (see
        docs/protocol.md): a ``welcome`` frame first, framed messages, and in each room
        with history it joins, the messages after the position it declared in
        ``roomcast.since`` (or, without one, the last ``replay`` messages), then a
        ``joined`` frame. Other clients get raw messages, as always.

        Refused before the upgrade: not a WebSocket request (400/405/426), a v1 request
        whose ``roomcast.since`` or ``roomcast.previous`` is malformed (400, the body says
        what is wrong), origin not allowed (403), too many connections from the address
        (429, ``Limits``), no or invalid credentials (401) or a room the identity may not
        join (403; ``Auth``), node full or shutting down (503). On success the hub writes
        the 101, takes the socket over from aiohttp, the connection gets ``metadata``,
        joins ``rooms`` and ``on_open`` runs; then this returns. From there on the hub
        serves the connection on its own (no task, and not the request, is kept while it
        is idle): every message goes to ``on_message`` in order, and ``on_close`` comes
        last. A failure while opening (a broker error joining a room) closes it with
        1011. ``rate_limit``: what the connection may send (default: ``limits.rate``).
        """
        try:
            key = validate_upgrade_request(request.method, request.headers)
        except HandshakeError as exc:
            self.stats.refused_handshake += 1
            headers = {"Sec-WebSocket-Version": "13"} if exc.status == 426 else None
            return web.Response(status=exc.status, text=f"{exc}\n", headers=headers)
        params: UpgradeParams | None = None
        if offers_v1(request.headers.getall("Sec-WebSocket-Protocol", ())):
            try:
                params = parse_upgrade_params(request.query, request.query.getall)
            except ValueError as exc:
                self.stats.refused_handshake += 1
                return web.Response(status=400, text=f"{exc}\n")
        room_names = [check_not_user_room(validate_room(r)) for r in rooms]
        _check_replay(replay)
        origin = request.headers.get("Origin")
        if not origin_allowed(origin, request.host, self.config.allowed_origins):
            self.stats.refused_origin += 1
            log.info("refused origin %r from %s", origin, request.remote)
            return web.Response(status=403, text=f"origin {origin} is not allowed\n")
        if self._connects is not None:
            wait = self._connects.check(request.remote, time.monotonic())
            if wait:
                self.stats.refused_rate += 1
                return web.Response(status=429, headers={"Retry-After": retry_after(wait)},
                                    text="too many new connections from this address\n")
        identity = None
        if self.auth is not None:
            try:
                identity = await self.auth.identify(request)
            except AuthRefused as exc:
                return self._refused(request, exc)
        if not self._accepting:
            self.stats.refused_draining += 1
            return web.Response(status=503, text="node is not accepting connections\n")
        if len(self._connections) >= self.config.max_connections:
            self.stats.refused_full += 1
            return web.Response(
                status=503,
                text=f"node is full ({self.config.max_connections} connections)\n",
                headers={"Retry-After": "1"},
            )
        per_user = self.config.max_connections_per_user
        if per_user and identity is not None:
            try:
                open_now = len(await self.user_connections(identity.user_id))
            except BrokerError:  # the cluster cannot be asked: count this node's
                open_now = len(self.local_user_connections(identity.user_id))
            if open_now >= per_user:
                self.stats.refused_user_limit += 1
                log.info("refused %s from %s: user has %d connections (limit %d)",
                         request.path, request.remote, open_now, per_user)
                return web.Response(
                    status=429, text=f"this user has {open_now} connections open, the limit "
                    f"is {per_user}: close one before opening another\n")

        wbits, no_takeover = 0, False
        if self.config.enable_compression:
            wbits, no_takeover = ws_ext_parse(
                request.headers.get("Sec-WebSocket-Extensions"), isserver=True
            )
        extensions = (
            ws_ext_gen(compress=wbits, isserver=True, server_notakeover=no_takeover)
            if wbits else None
        )
        self._seq += 1
        reader = MessageReader(self.config.max_message_size, deflate=bool(wbits))
        conn = Connection(
            make_connection_id(self.node_id, self._seq), self, reader, self._write_soon,
            request.remote, PROTOCOL if params is not None else None,
            params.since if params is not None else None,
            params.previous if params is not None else None)
        conn.identity = identity
        self._connections[conn.id] = conn  # reserve the slot before awaiting
        if params is not None:
            self._framed_conns[conn.id] = conn
        if self.auth is not None:
            for room in room_names:
                why = await self.auth.refusal(conn, room)
                if why is not None:
                    self._connections.pop(conn.id, None)
                    self._framed_conns.pop(conn.id, None)
                    return self._refused(request, AuthRefused(
                        f"may not join room {room!r}: {why}", status=403))
            if not self._accepting:  # it began to drain while the hooks ran
                self._connections.pop(conn.id, None)
                self._framed_conns.pop(conn.id, None)
                self.stats.refused_draining += 1
                return web.Response(status=503, text="node is not accepting connections\n")
        # Which node took the connection, and its id (for targeted sends and for
        # checking where a load balancer sends clients).
        ids = {"X-Roomcast-Node": self.node_id, "X-Roomcast-Connection": conn.id}
        protocol = WebSocketProtocol(conn, handler, self._owner)
        try:
            transport, tail = take_over(request, protocol)
        except BaseException:
            self._connections.pop(conn.id, None)
            self._framed_conns.pop(conn.id, None)
            raise
        transport.write(handshake_response(key, extensions, ids, conn.protocol))
        conn.attach(protocol, transport, wbits, time.time() + self.config.ping_interval)
        if identity is not None and identity.expires_at is not None:
            arm_expiry(conn, identity.expires_at)
        rate = rate_limit if rate_limit is not None else self.limits.rate
        if rate is not None:
            conn.limiter = rate.limiter(time.monotonic())
        if conn.protocol is not None:
            ids["Sec-WebSocket-Protocol"] = conn.protocol
            conn.send_prepared(welcome_frame(self.node_id, conn.id))  # the first frame
        self.stats.connections_opened += 1
        task = asyncio.current_task()
        if task is not None:
            self._callback_tasks.add(task)
        try:
            if tail:
                protocol.data_received(tail)
            if metadata:
                for name, value in metadata.items():
                    conn.set_metadata(name, value)
            if conn.user_id is not None and conn.state is ConnectionState.OPEN:
                await self._join_user(conn, user_room(conn.user_id))
            for room in room_names:
                if conn.state is ConnectionState.OPEN:
                    await self.join_room(conn, room, replay=replay)
            log.debug("opened %s from %s", conn.id, request.remote,
                      extra={"conn_id": conn.id})
            await run_callback(conn, handler, handler.on_open)
        except asyncio.CancelledError:
            transport.abort()
            raise
        except Exception:
            # The 101 is out, so aiohttp cannot answer with a 500: close the socket.
            log.exception("opening %s failed", conn.id, extra={"conn_id": conn.id})
            conn.abort(CloseCode.INTERNAL_ERROR, OPENING_ERROR_REASON)
        finally:
            if task is not None:
                self._callback_tasks.discard(task)
            protocol.opened()
        return Upgraded({"Upgrade": "websocket", "Connection": "Upgrade", **ids})

    def _refused(self, request: web.Request, exc: AuthRefused) -> web.Response:
        """The 401 or 403 for a request ``node.auth`` refused (its message never holds
        the token)."""
        if exc.status == 401:
            self.stats.refused_auth += 1
            headers = {"WWW-Authenticate": 'Bearer realm="roomcast"'}
        else:
            self.stats.refused_forbidden += 1
            headers = None
        log.info("refused %s from %s: %s", request.path, request.remote, exc)
        return web.Response(status=exc.status, text=f"{exc}\n", headers=headers)

    def _handshake_timed_out(self) -> None:
        self.stats.handshake_timeouts += 1

    def _connection_lost(
        self, conn: Connection, handler: EventHandler, dispatching: asyncio.Task[None] | None
    ) -> None:
        """The socket is gone: leave rooms and report on_close once the callbacks are done.

        Runs in a task of its own, tracked in ``_finishing`` so that ``close`` waits
        for it: cleanup happens even while the node shuts down.
        """
        finishing = asyncio.ensure_future(self._finish(conn, handler, dispatching))
        self._finishing.add(finishing)
        finishing.add_done_callback(self._finishing.discard)

    async def _finish(
        self, conn: Connection, handler: EventHandler, dispatching: asyncio.Task[None] | None
    ) -> None:
        """Leave every room, forget the connection, then report ``on_close`` once.

        Waits for ``dispatching`` (the callbacks of events that arrived before the
        socket went) so that ``on_close`` comes last.
        """
        if dispatching is not None and not dispatching.done():
            await asyncio.wait((dispatching,))
        was_open = conn.lost()
        self._connections.pop(conn.id, None)
        self._framed_conns.pop(conn.id, None)
        rooms, emptied = self._rooms.leave_all(conn.id)
        for room in rooms:
            self._drop_pending(room, conn.id)
        for room in emptied:
            self._catchup.close(room)
        user = self._leave_user(conn)
        if rooms or user is not None:
            try:
                await self.broker.remove_presence(
                    conn.id, rooms if user is None else (*rooms, user[0]))
                for room in rooms:
                    await self._presence_changed(room, conn, False)
                for room in emptied:
                    if not self._rooms.size(room):
                        await self.broker.unsubscribe(room)
                if user is not None and user[1] and user[0] not in self._users:
                    await self.broker.unsubscribe(user[0])
            except Exception:
                log.exception("broker failed while %s left its rooms", conn.id,
                              extra={"conn_id": conn.id})
        if was_open:
            self.stats.connections_closed += 1
            code = conn.close_code if conn.close_code is not None else CloseCode.ABNORMAL
            log.debug("closed %s with %s %s", conn.id, code, conn.close_reason,
                      extra={"conn_id": conn.id})
            await run_callback(conn, handler, handler.on_close, code, conn.close_reason)

    # -- rooms -----------------------------------------------------------------------

    def rooms_of(self, conn_id: ConnectionId) -> frozenset[Room]:
        """The rooms a local connection is in."""
        return self._rooms.rooms_of(conn_id)

    async def join_room(self, conn: Connection, room: str, *, replay: int = 0) -> None:
        """Add ``conn`` to ``room``; its cross-node broadcasts reach it once this returns.

        A v1 connection gets a ``joined`` frame. In a room with history it first gets the
        messages after the position it declared for the room at the upgrade (at most
        ``HubConfig.recovery_max``; ``joined`` says ``recovered`` false, with the reason,
        when they cannot all be sent), or without one the last ``replay`` messages, and
        then the room's live messages from where ``joined`` left it, none twice.

        RoomForbidden if the hub's ``Auth`` does not let it join (a v1 connection is sent
        an ``error`` frame with code ``forbidden``).
        """
        name = check_not_user_room(validate_room(room))
        _check_replay(replay)
        if conn.state is not ConnectionState.OPEN:
            raise ValueError(f"connection {conn.id} is {conn.state.value}; it cannot join rooms")
        if self.auth is not None:
            why = await self.auth.refusal(conn, name)
            if why is not None:
                self.stats.joins_forbidden += 1
                if conn.is_open and conn.v1:
                    conn.send_prepared(error_frame(
                        "forbidden", f"not allowed to join room {name!r}", name))
                raise RoomForbidden(name, conn.id, why)
        if self._rooms.contains(name, conn.id):
            return
        history = self.history_for(name)
        framed = conn.protocol is not None
        if history is None:
            first = self._rooms.join(name, conn.id, conn, framed=framed)
            if framed:
                self._send_one(conn, joined_frame(name))
            if first:
                await self.broker.subscribe(name)
            await self.broker.add_presence(name, conn.id, self._info_of(conn))
            await self._presence_changed(name, conn, True)
            return
        if not framed:
            first = self._rooms.join(name, conn.id, conn)
            await self._subscribe_history(name, history, first, start=True)
            await self.broker.add_presence(name, conn.id, self._info_of(conn))
            await self._presence_changed(name, conn, True)
            return
        pending = PendingJoin(name)
        first = self._rooms.join(name, conn.id, conn, pending=True)
        self._pending.setdefault(name, {})[conn.id] = pending
        try:
            await self._subscribe_history(name, history, first, start=False)
            await self.broker.add_presence(name, conn.id, self._info_of(conn))
            await self._presence_changed(name, conn, True)
            await self._recover(conn, name, history, pending, replay)
        finally:
            # Not caught up yet: it stays pending, served on its own until it has caught
            # up (see _emit_steps); failed before its joined frame: a plain v1 member.
            if self._pending.get(name, {}).get(conn.id) is pending and not pending.ready:
                self._drop_pending(name, conn.id)
                self._rooms.activate(name, conn.id)

    async def _subscribe_history(
        self, name: Room, history: History, first: bool, *, start: bool
    ) -> None:
        """Subscribe to a room with history (first local member) and track its stream;
        a later joiner waits for a subscribe under way. ``start``: read the room's
        position now to start its stream (a plain member; a v1 one reads it anyway)."""
        if not first:
            waiting = self._subscribing.get(name)
            if waiting is not None:
                await asyncio.shield(waiting)
            return
        stream = self._catchup.open(name, history)
        done = (self._loop or asyncio.get_running_loop()).create_future()
        self._subscribing[name] = done
        try:
            await self.broker.subscribe(name)
        finally:
            done.set_result(None)
            if self._subscribing.get(name) is done:
                del self._subscribing[name]
        if start:
            position: Position | None = None
            try:
                position = (await self.broker.read_history(name, history, limit=0)).position
            except BrokerError as exc:
                log.warning("could not read the position of room %r: %s", name, exc)
            if self._catchup.stream(name) is stream:
                self._catchup.start(stream, position)

    async def _recover(
        self, conn: Connection, name: Room, history: History, pending: PendingJoin,
        replay: int,
    ) -> None:
        """Read the room's history for a joining v1 member, send what it missed and the
        ``joined`` frame, then the live messages that came meanwhile."""
        declared = conn.take_since(name)
        page: HistoryPage | None = None
        recovered: bool | None = None
        reason: str | None = None
        envelopes: tuple[Envelope, ...] | list[Envelope] = ()
        try:
            if declared is not None:
                page = await self.broker.read_history(
                    name, history, since=declared.offset,
                    limit=min(self.config.recovery_max, MAX_READ_LIMIT))
                reason = page.gap(declared)
                recovered = reason is None
                if recovered:
                    envelopes = page.envelopes
            else:
                page = await self.broker.read_history(name, history, limit=replay)
                envelopes = [env for env in page.envelopes if env.epoch == page.epoch]
        except BrokerError as exc:
            log.warning("could not read the history of room %r for %s: %s", name, conn.id,
                        exc, extra={"conn_id": conn.id})
            if declared is not None:
                recovered, reason = False, "unavailable"
        position = page.position if page is not None else None
        stream = self._catchup.stream(name)
        if stream is not None and not stream.started:
            self._catchup.start(stream, position)
        if (self._pending.get(name, {}).get(conn.id) is not pending
                or conn.state is not ConnectionState.OPEN):
            return  # it left the room (or closed) during the read
        previous = conn.previous
        replayed = 0
        budget = max(self.config.send_buffer_limit // 2, 1)
        queued = 0
        frames = self._replay_frames
        for env in envelopes:
            if previous is not None and env.exclude == previous:
                continue
            key = (name, env.epoch, env.offset)
            frame = frames.get(key)
            if frame is None:
                frame = message_frame(env.payload, env.binary, name, (env.epoch, env.offset))
                frames.put(key, frame,
                           len(frame.payload) + len(frame.frame) + ENTRY_OVERHEAD)
            if queued and queued + len(frame.payload) > budget:
                # A long replay goes out as fast as the client reads it, not all at
                # once: queued whole it could exceed send_buffer_limit and cut off a
                # client that is reading.
                await self._drained(conn, budget)
                if (self._pending.get(name, {}).get(conn.id) is not pending
                        or conn.state is not ConnectionState.OPEN):
                    return
                queued = 0
            self._send_one(conn, frame)
            queued += len(frame.payload)
            replayed += 1
        stats = self.stats
        stats.messages_recovered += replayed
        if recovered is True:
            stats.recoveries += 1
        elif recovered is False:
            stats.recoveries_failed += 1
        self._send_one(conn, joined_frame(name, position, recovered=recovered, reason=reason,
                                          replayed=replayed))
        for frame in pending.joined(position):
            self._send_one(conn, frame)
        if pending.caught_up(self._catchup.stream(name)):
            self._drop_pending(name, conn.id)
            self._rooms.activate(name, conn.id)

    async def _drained(self, conn: Connection, below: int) -> None:
        """Write what is queued for ``conn`` and wait until less than ``below`` bytes of
        it are unsent, or the connection ends; after ``pong_timeout`` the wait ends
        anyway (the next frame then meets the slow-consumer rule)."""
        conn.flush()
        deadline = time.monotonic() + max(self.config.pong_timeout, 1.0)
        # Polled: the transport's own pause/resume marks are not this threshold.
        while (conn.state is ConnectionState.OPEN and conn.unsent_now() >= below  # noqa: ASYNC110
               and time.monotonic() < deadline):
            await asyncio.sleep(_DRAIN_POLL)

    def _drop_pending(self, room: Room, conn_id: ConnectionId) -> None:
        pending = self._pending.get(room)
        if pending is not None and pending.pop(conn_id, None) is not None and not pending:
            del self._pending[room]

    async def leave_room(self, conn: Connection, room: str) -> None:
        """Remove ``conn`` from ``room``; nothing happens if it was not a member.

        A v1 connection gets a ``left`` frame.
        """
        name = check_not_user_room(validate_room(room))
        if not self._rooms.contains(name, conn.id):
            return
        self._drop_pending(name, conn.id)
        last = self._rooms.leave(name, conn.id)
        if last:
            self._catchup.close(name)
        if conn.protocol is not None and conn.state is ConnectionState.OPEN:
            self._send_one(conn, left_frame(name))
        await self.broker.remove_presence(conn.id, (name,))
        await self._presence_changed(name, conn, False)
        if last and not self._rooms.size(name):
            await self.broker.unsubscribe(name)

    def local_room_size(self, room: str) -> int:
        """Members of ``room`` on this node only."""
        return self._rooms.size(validate_room(room))

    def local_members(self, room: str) -> list[Connection]:
        """The connections in ``room`` on this node."""
        return list(self._rooms.members(validate_room(room)).values())

    def local_rooms(self) -> list[Room]:
        """Rooms with at least one member on this node."""
        return list(self._rooms.rooms())

    async def room_size(self, room: str) -> int:
        """Members of ``room`` across the cluster (``roomSize``)."""
        return len(await self.room_members(room))

    async def room_members(self, room: str) -> set[ConnectionId]:
        """Connection ids in ``room`` across the cluster."""
        name = check_not_user_room(validate_room(room))
        if not self.broker.has_peers:
            return set(self._rooms.members(name))
        return await self.broker.room_members(name)

    # -- presence --------------------------------------------------------------------

    def on_presence(self, callback: PresenceCallback) -> PresenceCallback:
        """Call ``callback(event)`` for every join and leave in a room this node has
        members in, on whichever node it happens (usable as a decorator).

        Each event is raised once per node: on the connection's own node when it joins
        or leaves (its last local member leaving included), on other nodes with members
        when the broker brings it; for a dead node's connections, within the presence
        TTL, by the peer that removes their presence. At most once: a node cut off from
        Redis misses events meanwhile (``room_presence`` tells who is there). Users'
        internal rooms raise none. Callbacks run in the order they were added; a
        coroutine function runs as a task; what they raise is logged.
        """
        self._presence_callbacks.append(callback)
        return callback

    async def room_presence(self, room: str) -> list[Presence]:
        """Every member of ``room`` across the cluster, with user id and info (the user
        id None and the info empty for anonymous connections), ordered by connection id.
        BrokerError when the other nodes cannot be reached."""
        name = check_not_user_room(validate_room(room))
        if not self.broker.has_peers:
            members = self._rooms.members(name)
            found = [Presence(cid, c.user_id, self._shown(c)) for cid, c in members.items()]
        else:
            found = []
            for cid, blob in (await self.broker.room_presence(name)).items():
                try:
                    found.append(decode_info(cid, blob))
                except ValueError:
                    found.append(Presence(cid, None, {}))  # another release's entry
        return sorted(found, key=lambda p: p.connection)

    async def room_users(self, room: str) -> dict[str, Mapping[str, Any]]:
        """The users in ``room`` across the cluster (user id -> info): a user with
        several connections there counts once; anonymous connections are left out."""
        users: dict[str, Mapping[str, Any]] = {}
        for member in await self.room_presence(room):
            if member.user_id is not None:
                users.setdefault(member.user_id, member.info)
        return users

    def _shown(self, conn: Connection) -> Mapping[str, Any]:
        hook = self.presence_info
        return conn.user_info if hook is None else hook(conn)

    def _info_of(self, conn: Connection) -> bytes:
        return encode_info(conn.user_id, self._shown(conn))

    async def _presence_changed(self, room: Room, conn: Connection, joined: bool) -> None:
        """Raise a local join/leave here and publish it for the room's other nodes."""
        event = PresenceEvent("join" if joined else "leave", room, conn.id, conn.user_id,
                              self._shown(conn))
        self._raise_presence(event)
        if self.broker.has_peers:
            try:
                await self.broker.publish(Envelope(
                    Kind.PRESENCE, room, encode_event(joined, conn.id, self._info_of(conn)),
                    True, self.node_id, "", time.time()))
            except BrokerError as exc:
                log.warning("presence event of %s in %r not published: %s", conn.id, room,
                            exc)

    def _raise_presence(self, event: PresenceEvent) -> None:
        for callback in self._presence_callbacks:
            try:
                result = callback(event)
            except Exception:
                log.exception("presence callback raised")
                continue
            if asyncio.iscoroutine(result):
                task = asyncio.ensure_future(result)
                self._callback_tasks.add(task)
                task.add_done_callback(self._presence_done)

    def _presence_done(self, task: asyncio.Task[Any]) -> None:
        self._callback_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("presence callback raised", exc_info=task.exception())

    def _on_departed(self, entries: list[tuple[Room, ConnectionId, bytes]]) -> None:
        """This node removed a dead node's presence: raise and publish its leaves."""
        events: list[tuple[PresenceEvent, bytes]] = []
        for room, cid, blob in entries:
            if is_user_room(room):
                continue
            try:
                who = decode_info(cid, blob)
            except ValueError:
                who = Presence(cid, None, {})
            events.append((PresenceEvent("leave", room, cid, who.user_id, who.info), blob))
        if not events:
            return
        for event, _ in events:
            if self._rooms.size(Room(event.room)):
                self._raise_presence(event)
        task = asyncio.ensure_future(self._publish_departed(events))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _publish_departed(self, events: list[tuple[PresenceEvent, bytes]]) -> None:
        if not self.broker.has_peers:
            return
        for event, blob in events:
            try:
                await self.broker.publish(Envelope(
                    Kind.PRESENCE, event.room, encode_event(False, event.connection, blob),
                    True, self.node_id, "", time.time()))
            except BrokerError as exc:
                log.warning("leave of %s (its node died) not published: %s",
                            event.connection, exc)

    # -- users -----------------------------------------------------------------------

    async def _join_user(self, conn: Connection, room: Room) -> None:
        """Make ``conn`` a member of its user's internal room, here and cluster-wide."""
        members = self._users.setdefault(room, {})
        first = not members
        members[conn.id] = conn
        if first:
            await self.broker.subscribe(room)
        await self.broker.add_presence(room, conn.id)
        if conn.id not in self._users.get(room, ()):  # it went meanwhile (_finish ran)
            await self.broker.remove_presence(conn.id, (room,))

    def _leave_user(self, conn: Connection) -> tuple[Room, bool] | None:
        """Take ``conn`` out of its user's room here: the room and whether it was the
        user's last connection on this node; None if it was in none."""
        if conn.user_id is None:
            return None
        room = user_room(conn.user_id)
        members = self._users.get(room)
        if members is None or members.pop(conn.id, None) is None:
            return None
        if not members:
            del self._users[room]
            return room, True
        return room, False

    def local_user_connections(self, user_id: str) -> set[ConnectionId]:
        """The user's connections on this node."""
        return set(self._users.get(user_room(user_id), ()))

    async def user_connections(self, user_id: str) -> set[ConnectionId]:
        """The user's connections on every node (presence of the user's internal room:
        a dead node's are left out once the presence TTL passed). BrokerError when the
        other nodes cannot be reached."""
        room = user_room(user_id)
        if not self.broker.has_peers:
            return set(self._users.get(room, ()))
        return await self.broker.room_members(room)

    async def send_to_user(self, user_id: str, data: Data) -> None:
        """Send ``data`` to every connection of the user, on every node.

        Raw connections get it as it is, ``roomcast.v1`` ones in a ``message`` frame
        without a room (as ``send_to``). Local connections get it before this returns;
        PublishError means connections on other nodes did not (at most once, as any
        message without history). TypeError/ValueError for a bad user id or data.
        """
        room = user_room(user_id)
        prepared = PreparedMessage.of(data)
        self._deliver_user(room, prepared)
        if self.broker.has_peers:
            await self.broker.publish(
                Envelope(Kind.ROOM, room, prepared.payload, prepared.binary, self.node_id,
                         "", time.time()))

    async def disconnect_user(
        self, user_id: str, *, code: int = CloseCode.NORMAL, reason: str = ""
    ) -> None:
        """Close every connection of the user, on every node, with ``code`` and ``reason``.

        Local connections begin their closing handshake before this returns (their
        ``on_close`` comes later); other nodes get the order through the broker
        (PublishError: they did not). ValueError for a code that may not be sent or a
        reason over 123 bytes. A connection the user opens afterwards is not affected.
        """
        room = user_room(user_id)
        payload = encode_disconnect(*check_close(code, reason))
        self._disconnect_local(room, code, reason)
        if self.broker.has_peers:
            await self.broker.publish(
                Envelope(Kind.DISCONNECT, room, payload, True, self.node_id, "", time.time()))

    def _deliver_user(self, room: Room, prepared: PreparedMessage) -> None:
        members = self._users.get(room)
        if not members:
            return
        plain = [c for c in members.values() if c.protocol is None]
        if plain:
            self._deliver(plain, prepared, None)
        if len(plain) < len(members):
            self._deliver([c for c in members.values() if c.protocol is not None],
                          message_frame(prepared.payload, prepared.binary), None)

    def _disconnect_local(self, room: Room, code: int, reason: str) -> None:
        members = self._users.get(room)
        if not members:
            return
        for conn in list(members.values()):
            if conn.state is ConnectionState.OPEN:
                # begin the closing handshake without waiting for the peer's answer
                closing = asyncio.ensure_future(conn.close(code, reason))
                self._finishing.add(closing)
                closing.add_done_callback(self._finishing.discard)

    # -- history ---------------------------------------------------------------------

    def history_for(self, room: str) -> History | None:
        """The history ``room`` keeps under ``HubConfig.history``, or None (no history)."""
        policy = self.config.history
        return None if policy is None else policy.for_room(room)

    async def room_history(
        self, room: str, *, since: int | None = None, limit: int = 100
    ) -> HistoryPage:
        """The room's position and its messages after offset ``since`` (None: the latest
        ``limit``), oldest first, at most ``limit`` (0-10,000).

        ValueError if the room keeps no history (``HubConfig.history``) or for a bad
        ``since``/``limit``; BrokerError when the history cannot be read.
        """
        name = validate_room(room)
        history = self.history_for(name)
        if history is None:
            raise ValueError(f"room {name!r} has no history: give it one in "
                             "HubConfig.history (a HistoryPolicy)")
        return await self.broker.read_history(name, history, since=since, limit=limit)

    # -- sending ---------------------------------------------------------------------

    async def broadcast_to_room(
        self, room: str, data: Data, *, exclude: str | None = None,
        idempotency_key: str | None = None,
    ) -> Position | None:
        """Send ``data`` to every member of ``room`` on every node (``broadcastToRoom``).

        Local members get it before this returns (in a room with history, once the
        room's earlier messages are delivered here: normally at once); PublishError means
        members on other nodes did not. In a room with history the message is stored and
        the position it got is returned (None for a room without history);
        ``idempotency_key``: a retry with the same key within the room's history window
        is stored and delivered once, and returns the first position. In a room with
        history, PublishError means the message was probably not stored: local members
        got it once, without a position; when ``exc.maybe_sent`` it may still be stored
        (Redis was frozen, not down) and then reaches the other nodes late, and a retry
        should carry the same idempotency key.
        """
        name = check_not_user_room(validate_room(room))
        prepared = PreparedMessage.of(data)
        history = self.history_for(name)
        if idempotency_key is not None and history is None:
            validate_idempotency_key(idempotency_key)
            raise ValueError(f"room {name!r} has no history, so an idempotency key cannot "
                             "be honoured; give the room a History (HubConfig.history)")
        self.stats.broadcasts += 1
        if history is None:
            self._deliver_room(name, prepared, exclude, None)
            if self.broker.has_peers:
                await self.broker.publish(
                    Envelope(Kind.ROOM, name, prepared.payload, prepared.binary,
                             self.node_id, exclude or "", time.time())
                )
            return None
        env = Envelope(Kind.ROOM, name, prepared.payload, prepared.binary, self.node_id,
                       exclude or "", time.time())
        sent = _sent(env)
        unconfirmed = self._unconfirmed
        unconfirmed[sent] = False
        try:
            position = await self.broker.publish(env, history=history,
                                                 idempotency_key=idempotency_key)
        except PublishError as exc:
            if unconfirmed.pop(sent, None) is None:
                raise  # it was stored after all, and the stream delivered it here
            # Probably not stored: local members still get it, without a position. If it
            # may have reached Redis, remember it, so that its stored copy is not
            # delivered here again (a frozen Redis runs the script once it thaws).
            self._deliver_room(name, prepared, exclude, None)
            if exc.maybe_sent:
                unconfirmed[sent] = True
                if len(unconfirmed) > _MAX_UNCONFIRMED:
                    del unconfirmed[next(iter(unconfirmed))]
            raise
        finally:
            if unconfirmed.get(sent) is False:
                del unconfirmed[sent]
        if position is not None and not self._catchup.offer(
                env.with_position(position.epoch, position.offset)):
            self._deliver_room(name, prepared, exclude, None)  # no local member tracks it
        return position

    async def broadcast_to_room_except(
        self, room: str, data: Data, exclude: str, *, idempotency_key: str | None = None
    ) -> Position | None:
        """``broadcast_to_room`` without the connection ``exclude`` (``broadcastToRoomExcept``)."""
        return await self.broadcast_to_room(room, data, exclude=exclude,
                                            idempotency_key=idempotency_key)

    async def broadcast(self, data: Data, *, exclude: str | None = None) -> None:
        """Send ``data`` to every connection on every node (``broadcast``)."""
        prepared = PreparedMessage.of(data)
        self.stats.broadcasts += 1
        self._deliver_all(prepared, exclude)
        if self.broker.has_peers:
            await self.broker.publish(
                Envelope(Kind.ALL, "", prepared.payload, prepared.binary, self.node_id,
                         exclude or "", time.time())
            )

    async def broadcast_except(self, data: Data, exclude: str) -> None:
        """``broadcast`` without the connection ``exclude`` (``broadcastExcept``)."""
        await self.broadcast(data, exclude=exclude)

    async def send_to(self, conn_id: str, data: Data) -> bool:
        """Send ``data`` to one connection on any node.

        True if it was queued locally or published to the owning node; False if the id
        names a connection of this node that is not open. ValueError for a malformed id.
        """
        owner = node_of(conn_id)
        prepared = PreparedMessage.of(data)
        if owner == self.node_id:
            conn = self.get_connection(conn_id)
            if conn is None:
                return False
            return self._send_one(conn, conn.prepare(prepared.payload, binary=prepared.binary)
                                  if conn.protocol is not None else prepared)
        await self.broker.publish(
            Envelope(Kind.CONNECTION, conn_id, prepared.payload, prepared.binary,
                     self.node_id, "", time.time())
        )
        return True

    def _send_one(self, conn: Connection, prepared: PreparedMessage) -> bool:
        """Queue a frame for one connection; False if it is not open or this frame cut it
        off (dropped)."""
        if conn.state is not ConnectionState.OPEN:
            return False
        conn.send_prepared(prepared)
        if not conn.is_open:  # this frame took it over its limit: cut off, dropped
            return False
        self.stats.messages_out += 1
        self.stats.bytes_out += len(prepared.payload)
        return True

    def _deliver(
        self, members: Iterable[Connection], prepared: PreparedMessage, exclude: str | None
    ) -> None:
        """Queue the prepared frame for each open member except ``exclude``.

        Every member gets the same bytes object (``node.core.deliver``); members get one
        write each when the loop turn ends (``_flush_all``). A member this frame cut off
        as a slow consumer gets its close frame at once, and the frame is not counted.
        """
        dirty = self._dirty
        settle: list[Connection] = []
        count = deliver(members, prepared, exclude, self.config.enable_compression, dirty,
                        settle)
        if dirty and not self._flush_scheduled:
            self._arm_flush()
        stats = self.stats
        stats.messages_out += count
        stats.bytes_out += count * len(prepared.payload)
        for conn in settle:  # cut off, or its batch reached write_batch_bytes
            conn.settle()

    def _deliver_all(self, prepared: PreparedMessage, exclude: str | None) -> None:
        """A message to every local connection: as it is, or v1-framed (no room)."""
        framed = self._framed_conns
        if not framed:
            self._deliver(self._connections.values(), prepared, exclude)
            return
        self._deliver((c for c in self._connections.values() if c.protocol is None),
                      prepared, exclude)
        self._deliver(framed.values(), message_frame(prepared.payload, prepared.binary),
                      exclude)

    def _deliver_room(
        self, name: Room, prepared: PreparedMessage | Envelope, exclude: str | None,
        position: Position | tuple[str, int] | None,
    ) -> None:
        """A room message to the room's local members: the plain ones get it as it is,
        the v1 ones one frame with the room (and ``position``), each framed once for all;
        members still joining get it through their ``PendingJoin``. ``prepared`` may be
        the envelope itself: its plain frame is then made only if a plain member needs it.
        """
        rooms = self._rooms
        plain = rooms.plain(name)
        if plain:
            if isinstance(prepared, Envelope):
                prepared = PreparedMessage(prepared.payload, binary=prepared.binary)
            self._deliver(plain.values(), prepared, exclude)
        framed = rooms.framed(name)
        pending = self._pending.get(name)
        if not framed and not pending:
            return
        frame = message_frame(prepared.payload, prepared.binary, name, position)
        if framed:
            self._deliver(framed.values(), frame, exclude)
        if pending:
            if position is None:
                item: Item = (MESSAGE, None, 0, frame)
            elif isinstance(position, Position):
                item = (MESSAGE, position.epoch, position.offset, frame)
            else:
                item = (MESSAGE, position[0], position[1], frame)
            self._offer_pending(name, pending, exclude, item)

    def _offer_pending(
        self, name: Room, pending: dict[ConnectionId, PendingJoin], exclude: str | None,
        item: Item,
    ) -> None:
        """Pass one room item to the members still joining ``name``."""
        kind, epoch, offset, _ = item
        excluded: Item = (kind, epoch, offset, None)
        for conn_id, join in list(pending.items()):
            out = join.offer(excluded if conn_id == exclude else item)
            if out is not None:
                conn = self._connections.get(conn_id)
                if conn is not None:
                    self._send_one(conn, out)

    def _emit_steps(self, name: Room, steps: list[Step]) -> None:
        """Carry out the tracker's steps for a room: deliver envelopes, report losses."""
        for step in steps:
            if isinstance(step, Lost):
                self.stats.catchup_gaps_lost += 1
                log.info("room %r: messages before %s:%d cannot be delivered (%s)", name,
                         step.position.epoch, step.position.offset, step.reason)
                frame = lost_frame(name, step.position, step.reason)
                framed = self._rooms.framed(name)
                if framed:
                    self._deliver(framed.values(), frame, None)
                pending = self._pending.get(name)
                if pending:
                    self._offer_pending(name, pending, None, (
                        LOST, step.position.epoch, step.position.offset, frame))
            else:
                if (step.origin == self.node_id and self._unconfirmed
                        and self._unconfirmed.pop(_sent(step), False)):
                    continue  # members got it when its publish failed (see broadcast)
                self._deliver_room(name, step, step.exclude or None, (step.epoch, step.offset))
        pending = self._pending.get(name)
        if pending:
            stream = self._catchup.stream(name)
            for conn_id, join in list(pending.items()):
                if join.caught_up(stream):
                    self._drop_pending(name, conn_id)
                    self._rooms.activate(name, conn_id)

    async def _read_gap(
        self, room: Room, history: History, since: int, limit: int
    ) -> HistoryPage:
        return await self.broker.read_history(room, history, since=since, limit=limit)

    def _on_resumed(self, rooms: frozenset[Room]) -> None:
        """The broker's subscriptions of ``rooms`` came back: fill what was missed."""
        self._catchup.resumed(rooms)

    def _on_envelope(self, env: Envelope) -> None:
        """Deliver an envelope from the broker to the local connections it names.

        Positioned room envelopes (rooms with history, this node's own included) go
        through the stream tracker; other envelopes of this node are ignored.
        """
        if env.origin == self.node_id:
            if env.kind is Kind.ROOM and env.offset:
                self._catchup.offer(env)  # the echo of our own publish: in stream order
            return
        self.stats.envelopes_received += 1
        if self.on_envelope_latency is not None and env.sent_at:
            self.on_envelope_latency(max(0.0, time.time() - env.sent_at))
        if env.kind is Kind.DISCONNECT:
            self._disconnect_local(Room(env.target), *decode_disconnect(env.payload))
            return
        if env.kind is Kind.PRESENCE:
            if self._rooms.size(Room(env.target)):
                self._raise_presence(decode_event(env.target, env.payload))
            return
        if env.kind is Kind.ROOM and is_user_room(env.target):
            self._deliver_user(Room(env.target), PreparedMessage(env.payload, binary=env.binary))
            return
        if env.kind is Kind.ROOM and env.offset and self._catchup.offer(env):
            return
        prepared = PreparedMessage(env.payload, binary=env.binary)
        exclude = env.exclude or None
        if env.kind is Kind.ROOM:
            self._deliver_room(Room(env.target), prepared, exclude,
                               (env.epoch, env.offset) if env.offset else None)
        elif env.kind is Kind.ALL:
            self._deliver_all(prepared, exclude)
        else:
            conn = self._connections.get(ConnectionId(env.target))
            if conn is not None:
                self._deliver((conn,), conn.prepare(env.payload, binary=env.binary)
                              if conn.protocol is not None else prepared, None)

    # -- the write path --------------------------------------------------------------

    def _schedule_flush(self, conn: Connection) -> None:
        """``conn`` has its first frame of this turn queued: write it when the turn ends."""
        self._dirty.append(conn)
        if not self._flush_scheduled:
            self._arm_flush()

    def _arm_flush(self) -> None:
        """Have ``_flush_all`` run at the end of this turn, or after the write delay: one
        timer for the whole hub, armed by the first frame after a flush."""
        self._flush_scheduled = True
        loop = self._loop or asyncio.get_running_loop()
        delay = self._write_delay
        if delay:
            self._flush_timer = loop.call_later(delay, self._flush_all)
        else:
            loop.call_soon(self._flush_all)

    def _flush_all(self) -> None:
        """Write every connection's queued frames: one write per connection per turn.

        Scheduled with ``call_soon`` by the first frame of a turn, so everything queued
        while the current batch of callbacks and I/O events runs leaves together; with a
        write delay, with ``call_later``, so everything queued within the delay does.
        """
        self._flush_scheduled = False
        if self._flush_timer is not None:  # called early (close): the timer is not needed
            self._flush_timer.cancel()
            self._flush_timer = None
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.flush()

    # -- keepalive -------------------------------------------------------------------

    async def _keepalive_loop(self) -> None:
        """Let time pass for every connection: each pings when due (``node.core``), and
        one whose pong is overdue is closed with 1011."""
        interval = self.config.ping_interval
        timeout = self.config.pong_timeout
        tick = max(min(interval, timeout) / 4, 0.01)
        open_state = ConnectionState.OPEN
        while True:
            await asyncio.sleep(tick)
            now = time.time()
            for conn in self._connections.values():
                if conn.state is not open_state:
                    continue
                code = conn.keepalive(now, interval, timeout)
                if code == NOTHING:
                    continue
                if code == WRITE:
                    self._schedule_flush(conn)
                elif code == FULL:
                    conn.flush()
                elif code == CUT_OFF:
                    conn.settle()
                elif code == PONG_OVERDUE:
                    self.stats.pong_timeouts += 1
                    log.info("closing %s: no pong within %.1fs", conn.id, timeout,
                             extra={"conn_id": conn.id})
                    conn.abort(CloseCode.INTERNAL_ERROR, PONG_TIMEOUT_REASON)


def _check_replay(replay: object) -> None:
    if isinstance(replay, bool) or not isinstance(replay, int):
        raise TypeError(f"replay must be an int, got {type(replay).__name__}")
    if not 0 <= replay <= MAX_READ_LIMIT:
        raise ValueError(f"replay must be from 0 to {MAX_READ_LIMIT}, got {replay}")


_Sent = tuple[str, float, str, bytes]
_MAX_UNCONFIRMED: Final = 1024
"""Failed publishes remembered at most (the oldest is forgotten first)."""


def _sent(env: Envelope) -> _Sent:
    """What tells one of this node's room publishes from another: room, time sent,
    excluded connection and payload (the stream's copy carries them unchanged)."""
    return (env.target, env.sent_at, env.exclude, env.payload)


HUB: Final = web.AppKey("roomcast_hub", Hub)
"""Where ``Hub.attach`` stores the hub on an aiohttp Application."""


def get_hub(request: web.Request) -> Hub:
    """The hub attached to the request's application (``ctx.app.ws_hub``)."""
    try:
        return request.app[HUB]
    except KeyError:
        raise RuntimeError(
            "no roomcast Hub on this application: call hub.attach(app) first"
        ) from None
