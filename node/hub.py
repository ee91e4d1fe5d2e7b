"""The Hub: this node's connections, rooms and broadcasts, wired to a broker.

Every broadcast is framed once (``PreparedMessage``) and the same bytes are queued for
each local member; one envelope goes to the broker for the members on other nodes.
Queued frames are written once per event-loop turn. There is no task per recipient.
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
from roomcast.node.auth import Auth, AuthRefused, RoomForbidden, arm_expiry, error_frame, speaks_v1
from roomcast.node.connection import Connection
from roomcast.node.core import (
    CUT_OFF,
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
from roomcast.node.rooms import RoomIndex
from roomcast.node.stats import HubStats as HubStats  # re-exported: node.metrics imports it
from roomcast.shared.config import HubConfig
from roomcast.shared.envelope import Envelope, Kind
from roomcast.shared.errors import HandshakeError
from roomcast.shared.frames import MessageReader, PreparedMessage
from roomcast.shared.handshake import handshake_response, origin_allowed, validate_upgrade_request
from roomcast.shared.ids import (
    ConnectionId,
    NodeId,
    Room,
    make_connection_id,
    new_node_id,
    node_of,
    validate_room,
)
from roomcast.shared.rfc6455 import CloseCode
from roomcast.shared.rfc6455 import Data as Data  # re-exported: node.api imports it here

log = logging.getLogger("roomcast.node")


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

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the broker and the keepalive sweep; idempotent."""
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        await self.broker.start(self.node_id, self._on_envelope)
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
        if self._started:
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
        self, handler: EventHandler, *, rooms: Iterable[str] = (),
        rate_limit: RateLimit | None = None,
    ) -> Any:
        """An aiohttp handler that upgrades every request with ``handler``."""
        rooms = tuple(rooms)

        async def websocket_route(request: web.Request) -> web.StreamResponse:
            return await self.upgrade(request, handler, rooms=rooms, rate_limit=rate_limit)

        return websocket_route

    async def upgrade(
        self,
        request: web.Request,
        handler: EventHandler,
        *,
        rooms: Iterable[str] = (),
        metadata: Mapping[str, str] | None = None,
        rate_limit: RateLimit | None = None,
    ) -> web.StreamResponse:
        """Accept a WebSocket on ``request`` (``register``); return what aiohttp must return.

        Refused before the upgrade: not a WebSocket request (400/405/426), origin not
        allowed (403), too many connections from the address (429, ``Limits``), no or
        invalid credentials (401) or a room the identity may not join (403; ``Auth``),
        node full or shutting down (503). On success the hub writes the
        101, takes the socket over from aiohttp, the connection gets ``metadata``, joins
        ``rooms`` and ``on_open`` runs; then this returns. From there on the hub serves
        the connection on its own (no task, and not the request, is kept while it is
        idle): every message goes to ``on_message`` in order, and ``on_close`` comes
        last. A failure while opening (a broker error joining a room) closes it with
        1011. ``rate_limit``: what the connection may send (default: ``limits.rate``).
        """
        try:
            key = validate_upgrade_request(request.method, request.headers)
        except HandshakeError as exc:
            self.stats.refused_handshake += 1
            headers = {"Sec-WebSocket-Version": "13"} if exc.status == 426 else None
            return web.Response(status=exc.status, text=f"{exc}\n", headers=headers)
        room_names = [validate_room(r) for r in rooms]
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
        conn = Connection(make_connection_id(self.node_id, self._seq), self, reader,
                          self._write_soon, request.remote)
        conn.identity = identity
        self._connections[conn.id] = conn  # reserve the slot before awaiting
        if self.auth is not None:
            for room in room_names:
                why = await self.auth.refusal(conn, room)
                if why is not None:
                    self._connections.pop(conn.id, None)
                    return self._refused(request, AuthRefused(
                        f"may not join room {room!r}: {why}", status=403))
        # Which node took the connection, and its id (for targeted sends and for
        # checking where a load balancer sends clients).
        ids = {"X-Roomcast-Node": self.node_id, "X-Roomcast-Connection": conn.id}
        protocol = WebSocketProtocol(conn, handler, self._owner)
        try:
            transport, tail = take_over(request, protocol)
        except BaseException:
            self._connections.pop(conn.id, None)
            raise
        transport.write(handshake_response(key, extensions, ids))
        conn.attach(protocol, transport, wbits, time.time() + self.config.ping_interval)
        if identity is not None and identity.expires_at is not None:
            arm_expiry(conn, identity.expires_at)
        rate = rate_limit if rate_limit is not None else self.limits.rate
        if rate is not None:
            conn.limiter = rate.limiter(time.time())
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
            for room in room_names:
                if conn.state is ConnectionState.OPEN:
                    await self.join_room(conn, room)
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
        rooms, emptied = self._rooms.leave_all(conn.id)
        if rooms:
            try:
                await self.broker.remove_presence(conn.id, rooms)
                for room in emptied:
                    if not self._rooms.size(room):
                        await self.broker.unsubscribe(room)
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

    async def join_room(self, conn: Connection, room: str) -> None:
        """Add ``conn`` to ``room``; its cross-node broadcasts reach it once this returns.

        RoomForbidden if the hub's ``Auth`` does not let it join (a roomcast.v1 client is
        sent an ``error`` frame with code ``forbidden``).
        """
        name = validate_room(room)
        if conn.state is not ConnectionState.OPEN:
            raise ValueError(f"connection {conn.id} is {conn.state.value}; it cannot join rooms")
        if self.auth is not None:
            why = await self.auth.refusal(conn, name)
            if why is not None:
                self.stats.joins_forbidden += 1
                if conn.is_open and speaks_v1(conn):
                    conn.send_prepared(error_frame(
                        "forbidden", f"not allowed to join room {name!r}", name))
                raise RoomForbidden(name, conn.id, why)
        if self._rooms.contains(name, conn.id):
            return
        first = self._rooms.join(name, conn.id, conn)
        if first:
            await self.broker.subscribe(name)
        await self.broker.add_presence(name, conn.id)

    async def leave_room(self, conn: Connection, room: str) -> None:
        """Remove ``conn`` from ``room``; nothing happens if it was not a member."""
        name = validate_room(room)
        if not self._rooms.contains(name, conn.id):
            return
        last = self._rooms.leave(name, conn.id)
        await self.broker.remove_presence(conn.id, (name,))
        if last and not self._rooms.size(name):
            await self.broker.unsubscribe(name)

    def local_room_size(self, room: str) -> int:
        """Members of ``room`` on this node only."""
        return self._rooms.size(validate_room(room))

    def local_rooms(self) -> list[Room]:
        """Rooms with at least one member on this node."""
        return list(self._rooms.rooms())

    async def room_size(self, room: str) -> int:
        """Members of ``room`` across the cluster (``roomSize``)."""
        return len(await self.room_members(room))

    async def room_members(self, room: str) -> set[ConnectionId]:
        """Connection ids in ``room`` across the cluster."""
        name = validate_room(room)
        if not self.broker.has_peers:
            return set(self._rooms.members(name))
        return await self.broker.room_members(name)

    # -- sending ---------------------------------------------------------------------

    async def broadcast_to_room(
        self, room: str, data: Data, *, exclude: str | None = None
    ) -> None:
        """Send ``data`` to every member of ``room`` on every node (``broadcastToRoom``).

        Local members get it before this returns; PublishError means members on other
        nodes did not.
        """
        name = validate_room(room)
        prepared = PreparedMessage.of(data)
        self.stats.broadcasts += 1
        self._deliver(self._rooms.members(name).values(), prepared, exclude)
        if self.broker.has_peers:
            await self.broker.publish(
                Envelope(Kind.ROOM, name, prepared.payload, prepared.binary, self.node_id,
                         exclude or "", time.time())
            )

    async def broadcast_to_room_except(self, room: str, data: Data, exclude: str) -> None:
        """``broadcast_to_room`` without the connection ``exclude`` (``broadcastToRoomExcept``)."""
        await self.broadcast_to_room(room, data, exclude=exclude)

    async def broadcast(self, data: Data, *, exclude: str | None = None) -> None:
        """Send ``data`` to every connection on every node (``broadcast``)."""
        prepared = PreparedMessage.of(data)
        self.stats.broadcasts += 1
        self._deliver(self._connections.values(), prepared, exclude)
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
            conn.send_prepared(prepared)
            if not conn.is_open:  # this frame took it over its limit: cut off, dropped
                return False
            self.stats.messages_out += 1
            self.stats.bytes_out += len(prepared.payload)
            return True
        await self.broker.publish(
            Envelope(Kind.CONNECTION, conn_id, prepared.payload, prepared.binary,
                     self.node_id, "", time.time())
        )
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
        cut_off: list[Connection] = []
        count = deliver(members, prepared, exclude, self.config.enable_compression, dirty,
                        cut_off)
        if dirty and not self._flush_scheduled:
            self._flush_scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self._flush_all)
        stats = self.stats
        stats.messages_out += count
        stats.bytes_out += count * len(prepared.payload)
        for conn in cut_off:
            conn.settle()

    def _on_envelope(self, env: Envelope) -> None:
        """Deliver an envelope from another node to the local connections it names."""
        if env.origin == self.node_id:
            return
        self.stats.envelopes_received += 1
        if self.on_envelope_latency is not None and env.sent_at:
            self.on_envelope_latency(max(0.0, time.time() - env.sent_at))
        prepared = PreparedMessage(env.payload, binary=env.binary)
        exclude = env.exclude or None
        if env.kind is Kind.ROOM:
            self._deliver(self._rooms.members(Room(env.target)).values(), prepared, exclude)
        elif env.kind is Kind.ALL:
            self._deliver(self._connections.values(), prepared, exclude)
        else:
            conn = self._connections.get(ConnectionId(env.target))
            if conn is not None:
                self._deliver((conn,), prepared, None)

    # -- the write path --------------------------------------------------------------

    def _schedule_flush(self, conn: Connection) -> None:
        """``conn`` has its first frame of this turn queued: write it when the turn ends."""
        self._dirty.append(conn)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self._flush_all)

    def _flush_all(self) -> None:
        """Write every connection's queued frames: one write per connection per turn.

        Scheduled with ``call_soon`` by the first frame of a turn, so everything queued
        while the current batch of callbacks and I/O events runs leaves together.
        """
        self._flush_scheduled = False
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
                elif code == CUT_OFF:
                    conn.settle()
                elif code == PONG_OVERDUE:
                    self.stats.pong_timeouts += 1
                    log.info("closing %s: no pong within %.1fs", conn.id, timeout,
                             extra={"conn_id": conn.id})
                    conn.abort(CloseCode.INTERNAL_ERROR, PONG_TIMEOUT_REASON)


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
