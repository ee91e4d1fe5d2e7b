"""One client connection as users see it: the core's rules, the seed's API, and the I/O.

``Connection`` is a ``node.core.ConnectionCore`` (state, closing handshake, keepalive,
outgoing buffer and slow-consumer rules, no I/O) with what the seed's ``Connection``
offers on top (sending, closing, metadata, rooms) and the few steps that touch the
socket: ``flush`` writes what the core queued in one write, ``settle`` carries out the
core's decision to end the socket. The socket's own side (reading, timers, callbacks)
is ``node.asyncio_protocol.WebSocketProtocol``, reached through ``SocketControl``.

What the hub calls: ``attach``, ``enqueue`` (or the core's ``push`` for broadcasts),
``flush``, ``settle``, ``close``, ``abort``, ``abort_socket``, ``keepalive``, ``lost``.
Imports point one way (hub → asyncio_protocol → connection → core); the Hub's type is
imported here for annotations only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

from roomcast.node.core import CUT_OFF, WRITE, ConnectionCore, ConnectionState
from roomcast.node.limits import apply_rate_limit
from roomcast.node.v1 import message_frame
from roomcast.shared.frames import MessageReader, PreparedMessage, build_frame
from roomcast.shared.history import Position
from roomcast.shared.ids import ConnectionId, Room
from roomcast.shared.rfc6455 import CloseCode, Opcode

if TYPE_CHECKING:
    from roomcast.node.auth import Identity
    from roomcast.node.hub import Hub
    from roomcast.node.limits import ConnectionLimiter

__all__ = ["Connection", "ConnectionState", "SocketControl"]

log = logging.getLogger("roomcast.node")


class SocketControl(Protocol):
    """What a connection asks of its socket's side (``WebSocketProtocol``)."""

    def end(self, close_transport: bool, abort_after: float) -> None:
        """Closing began: close the socket if asked, abort it after ``abort_after`` s."""

    def abort_now(self) -> None:
        """Abort the socket at once, without waiting for anything."""

    async def wait_closed(self) -> None:
        """Return once the socket is gone."""


class Connection(ConnectionCore):
    """A client connected to this node. Created by ``Hub.upgrade``; never by hand."""

    __slots__ = ("_hub", "_protocol", "_since", "_transport", "_write_soon", "expiry_timer",
                 "identity", "limiter", "metadata", "previous", "protocol", "remote")

    def __init__(
        self,
        conn_id: ConnectionId,
        hub: Hub,
        reader: MessageReader,
        write_soon: Callable[[Connection], None],
        remote: str | None = None,
        protocol: str | None = None,
        since: Mapping[Room, Position] | None = None,
        previous: ConnectionId | None = None,
    ) -> None:
        super().__init__(conn_id, reader, hub.config.send_buffer_limit)
        self.protocol: Final = protocol
        """``"roomcast.v1"`` when the client asked for it (messages are framed, with
        rooms and positions), None for a raw connection (messages as sent)."""
        self._since: dict[Room, Position] | None = dict(since) if since else None
        self.previous: Final = previous
        """The ``roomcast.previous`` a v1 client declared (the connection it replaces)."""
        self.remote = remote
        """The client's address as the upgrade request gave it (``request.remote``).

        The request itself is not kept (it would cost every idle connection its
        memory): read what you need from it before ``Hub.upgrade`` and pass it as
        ``metadata``.
        """
        self.metadata: dict[str, str] = {}
        self._hub = hub
        self._write_soon = write_soon
        """Has the hub flush this connection at the end of the loop turn (one write)."""
        self._protocol: SocketControl | None = None
        self._transport: asyncio.Transport | None = None
        self.identity: Identity | None = None
        """Who the connection belongs to (``node.auth``); None when anonymous."""
        self.limiter: ConnectionLimiter | None = None
        """The rate limit on what it sends (``node.limits``); None when unlimited."""
        self.expiry_timer: asyncio.TimerHandle | None = None
        """Closes it with 4001 when its identity expires (``node.auth.arm_expiry``)."""

    @property
    def v1(self) -> bool:
        """True for a ``roomcast.v1`` connection."""
        return self.protocol is not None

    def take_since(self, room: Room) -> Position | None:
        """The position the client declared for ``room`` at the upgrade, once: a later
        join of the same room starts from where the connection then is."""
        since = self._since
        if since is None:
            return None
        position = since.pop(room, None)
        if not since:
            self._since = None
        return position

    @property
    def hub(self) -> Hub:
        """The hub this connection belongs to."""
        return self._hub

    @property
    def user_id(self) -> str | None:
        """The user this connection belongs to (its identity's); None when anonymous."""
        identity = self.identity
        return identity.user_id if identity is not None else None

    @property
    def user_info(self) -> Mapping[str, Any]:
        """The identity's info mapping (a JWT's ``info`` claim); empty when anonymous."""
        identity = self.identity
        return identity.info if identity is not None else {}

    # -- rooms and metadata ----------------------------------------------------------

    @property
    def rooms(self) -> frozenset[Room]:
        """The rooms this connection is in (on this node's index)."""
        return self._hub.rooms_of(self.id)

    def in_room(self, room: str) -> bool:
        """Whether this connection is in ``room`` (the seed's ``inRoom``)."""
        return room in self._hub.rooms_of(self.id)

    def set_metadata(self, key: str, value: str) -> None:
        """Attach a string value to this connection (``setMetadata``)."""
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("metadata keys and values must be str")
        self.metadata[key] = value

    def get_metadata(self, key: str, default: str | None = None) -> str | None:
        """A metadata value, or ``default`` (``getMetadata``)."""
        return self.metadata.get(key, default)

    # -- sending ---------------------------------------------------------------------

    async def send_text(self, text: str) -> None:
        """Queue a text message; ConnectionClosedError if the connection is not open.

        On a v1 connection it goes as a ``message`` frame without a room.
        """
        if not isinstance(text, str):
            raise TypeError(f"send_text takes str, got {type(text).__name__}")
        self.send_prepared(self.prepare(text.encode(), binary=False))

    async def send_binary(self, data: bytes | bytearray | memoryview) -> None:
        """Queue a binary message; ConnectionClosedError if the connection is not open.

        On a v1 connection it goes as a binary ``message`` frame without a room.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"send_binary takes bytes, got {type(data).__name__}")
        self.send_prepared(self.prepare(bytes(data), binary=True))

    async def send(self, data: str | bytes) -> None:
        """Queue ``data``: text for ``str``, binary for bytes (framed on v1)."""
        if isinstance(data, str):
            await self.send_text(data)
        else:
            await self.send_binary(data)

    def prepare(self, payload: bytes, *, binary: bool) -> PreparedMessage:
        """A direct message to this connection as it asked for messages: as it is, or
        (v1) in a ``message`` frame without a room."""
        if self.protocol is None:
            return PreparedMessage(payload, binary=binary)
        return message_frame(payload, binary)

    async def send_ping(self, payload: bytes = b"") -> None:
        """Queue a ping; the pong that answers it is reported to ``on_pong``."""
        self._send_control(Opcode.PING, payload)
        self.last_ping_time = time.time()

    async def send_pong(self, payload: bytes = b"") -> None:
        """Queue a pong (the node already answers every ping by itself)."""
        self._send_control(Opcode.PONG, payload)

    def _send_control(self, opcode: Opcode, payload: bytes) -> None:
        if len(payload) > 125:
            raise ValueError("ping/pong payload is limited to 125 bytes")
        self.require_open()
        self.enqueue(build_frame(opcode, bytes(payload)))

    def send_prepared(self, message: PreparedMessage) -> None:
        """Queue a message framed once for many (what broadcasts use)."""
        self.require_open()
        self.enqueue(message.frame_for(self.wbits))

    def enqueue(self, frame: bytes) -> None:
        """Queue frame bytes for this turn's write, or cut the connection off if the
        bytes it holds are over the limit (see ``node.core``)."""
        code = self.push(frame)
        if code == WRITE:
            self._write_soon(self)
        elif code == CUT_OFF:
            self.settle()

    # -- the socket ------------------------------------------------------------------

    def attach(
        self, protocol: SocketControl | None, transport: asyncio.Transport, wbits: int,
        first_ping_at: float,
    ) -> None:
        """The handshake is done on ``transport``: open, and start sending."""
        self._protocol = protocol
        self._transport = transport
        self.open(wbits, first_ping_at)

    def transport_lost(self) -> None:
        """The socket is gone: what is still queued has nowhere to go."""
        self._transport = None
        if self.expiry_timer is not None:
            self.expiry_timer.cancel()
            self.expiry_timer = None

    def receive(
        self, data: bytes, limit: int, now: float
    ) -> list[tuple[Opcode, bytes | str]]:
        """The core's ``receive``, with the rate limit applied to the messages (if any).

        A message over the limit is dropped (a roomcast.v1 client is told with an
        ``error`` frame, code ``rate_limited``); one that makes the client a flooder
        closes it with 1008, and every message after it is dropped.
        """
        events = super().receive(data, limit, now)
        if self.limiter is None or not events:
            return events
        # Monotonic time: a wall clock stepped back must not stall the refill.
        return apply_rate_limit(self, self.limiter, events, time.monotonic())

    def stop_reading(self) -> None:
        """Read nothing more from the socket (a flooder being closed: ``node.limits``).

        The socket ends when the closing handshake times out. What was read and not
        parsed yet is left unparsed (``reading_done``).
        """
        transport = self._transport
        if transport is not None and transport.is_reading():
            transport.pause_reading()

    @property
    def reading_done(self) -> bool:
        """The core's, or True once the connection was closed for flooding."""
        limiter = self.limiter
        return self._reader.done or (limiter is not None and limiter.closed)

    @property
    def pending(self) -> bool:
        """The core's, or False once the connection was closed for flooding (what
        is buffered is never parsed)."""
        limiter = self.limiter
        return self._reader.pending and (limiter is None or not limiter.closed)

    def unsent_now(self) -> int:
        """Bytes the transport has not sent yet (its own count)."""
        transport = self._transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def flush(self) -> None:
        """Write everything queued in one call to the transport."""
        data = self.take_output()
        if data is not None:
            transport = self._transport
            if transport is not None:
                transport.write(data)

    def settle(self) -> None:
        """Write what is queued and carry out how the core ends the socket.

        A connection cut off as a slow consumer is counted and logged here, once.
        """
        self.flush()
        if self.take_cut_off():
            self._hub.stats.slow_consumers += 1
            log.info("cut off %s: slow consumer (over %d bytes waiting)", self.id,
                     self._hub.config.send_buffer_limit, extra={"conn_id": self.id})
        protocol = self._protocol
        if protocol is not None and self.ending:
            protocol.end(self.close_transport, self.abort_after)

    # -- closing ---------------------------------------------------------------------

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Send a close frame with ``code`` and ``reason`` and finish the closing handshake.

        Frames already queued go out first. Returns once the peer answered and the
        socket is closed, or after ``node.core.CLOSE_TIMEOUT`` seconds, when the
        socket is aborted. ValueError for a code that may not be sent.
        """
        if not self.begin_close(code, reason):
            return
        self.settle()
        protocol = self._protocol
        assert protocol is not None  # OPEN implies attached
        await protocol.wait_closed()

    def abort(self, code: int, reason: str) -> None:
        """Close at once without waiting for the peer (a missed pong, an opening error).

        What is queued is dropped; the close frame is written if the socket takes it;
        the socket is closed, and aborted if the peer still does not go.
        """
        if self.begin_abort(code, reason):
            self.settle()

    def abort_socket(self) -> None:
        """Abort the socket now: the closing handshake did not finish in time."""
        if self._protocol is not None:
            self._protocol.abort_now()
