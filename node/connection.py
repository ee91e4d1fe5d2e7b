"""One WebSocket connection: its state machine, metadata and outgoing buffer.

The state machine lives here and only here: CONNECTING → OPEN → CLOSING → CLOSED
(CONNECTING or OPEN may also go straight to CLOSED when the transport is lost).

Outgoing frames are queued as ready-made bytes (the very objects a broadcast built once)
and written by the hub once per event-loop turn, so frames queued for one connection in
one turn leave in one write.

Slow-consumer policy: the bytes held for one connection (queued this turn plus what
the transport could not hand to the kernel yet) never exceed
``HubConfig.send_buffer_limit``. A frame that would go over it cuts the connection off
at once: the socket is aborted, its queued bytes are dropped, ``on_close`` gets 1008
"slow consumer" and ``HubStats.slow_consumers`` counts it. Nobody else waits for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Final

from roomcast.node.protocol import CLOSE_TIMEOUT
from roomcast.shared.errors import ConnectionClosedError
from roomcast.shared.frames import PreparedMessage, build_frame, close_payload
from roomcast.shared.ids import ConnectionId, Room
from roomcast.shared.rfc6455 import CloseCode, Opcode

if TYPE_CHECKING:
    from roomcast.node.handlers import EventHandler
    from roomcast.node.hub import Hub
    from roomcast.node.protocol import WebSocketProtocol

SLOW_CONSUMER_REASON: Final = "slow consumer"


class ConnectionState(Enum):
    """The seed's ``ConnectionState``."""

    CONNECTING = "connecting"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


_ALLOWED: Final = {
    ConnectionState.CONNECTING: {ConnectionState.OPEN, ConnectionState.CLOSED},
    ConnectionState.OPEN: {ConnectionState.CLOSING, ConnectionState.CLOSED},
    ConnectionState.CLOSING: {ConnectionState.CLOSED},
    ConnectionState.CLOSED: set(),
}


class Connection:
    """A client connected to this node. Created by ``Hub.upgrade``; never by hand."""

    __slots__ = (
        "_awaiting_pong_since",
        "_backlog",
        "_close_code",
        "_close_reason",
        "_hub",
        "_limit",
        "_next_ping",
        "_out",
        "_out_size",
        "_protocol",
        "_rooms_view",
        "_schedule_flush",
        "_transport",
        "handler",
        "id",
        "last_ping_time",
        "last_pong_time",
        "metadata",
        "remote",
        "state",
        "wbits",
    )

    def __init__(
        self,
        conn_id: ConnectionId,
        handler: EventHandler,
        hub: Hub,
        schedule_flush: Callable[[Connection], None],
        remote: str | None = None,
    ) -> None:
        self.id: Final = conn_id
        self.handler = handler
        self.remote = remote
        """The client's address as the upgrade request gave it (``request.remote``).

        The request itself is not kept (it would cost every idle connection its
        memory): read what you need from it before ``Hub.upgrade`` and pass it as
        ``metadata``.
        """
        self.state = ConnectionState.CONNECTING
        self.metadata: dict[str, str] = {}
        self.last_ping_time = 0.0
        """``time.time()`` when this node last sent a ping (0 if never)."""
        self.last_pong_time = 0.0
        """``time.time()`` when a pong last arrived (0 if never)."""
        self.wbits = 0
        """Negotiated permessage-deflate window bits; 0 when not compressed."""
        self._hub = hub
        self._protocol: WebSocketProtocol | None = None
        self._transport: asyncio.Transport | None = None
        self._out: bytes | list[bytes] | None = None
        """Frames queued since the last write: None, one frame, or a list of frames."""
        self._out_size = 0
        """Bytes in ``_out``."""
        self._backlog = 0
        """At least the bytes the transport still holds (refreshed when it matters)."""
        self._limit: int = hub.config.send_buffer_limit
        self._schedule_flush = schedule_flush
        self._awaiting_pong_since = 0.0
        self._next_ping = 0.0
        self._close_code: int | None = None
        self._close_reason = ""
        self._rooms_view: Callable[[ConnectionId], frozenset[Room]] = hub.rooms_of

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.state.value}>"

    # -- state machine ---------------------------------------------------------------

    def _set_state(self, new: ConnectionState) -> None:
        if new not in _ALLOWED[self.state]:
            raise RuntimeError(f"connection {self.id}: {self.state.value} -> {new.value}")
        self.state = new

    @property
    def hub(self) -> Hub:
        """The hub this connection belongs to."""
        return self._hub

    @property
    def is_open(self) -> bool:
        """True while frames can be sent."""
        return self.state is ConnectionState.OPEN

    @property
    def close_code(self) -> int | None:
        """The close code once closing has begun (ours or the peer's)."""
        return self._close_code

    # -- rooms and metadata ----------------------------------------------------------

    @property
    def rooms(self) -> frozenset[Room]:
        """The rooms this connection is in (on this node's index)."""
        return self._rooms_view(self.id)

    def in_room(self, room: str) -> bool:
        """Whether this connection is in ``room`` (the seed's ``inRoom``)."""
        return room in self._rooms_view(self.id)

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
        """Queue a text message; ConnectionClosedError if the connection is not open."""
        if not isinstance(text, str):
            raise TypeError(f"send_text takes str, got {type(text).__name__}")
        self.send_prepared(PreparedMessage(text.encode(), binary=False))

    async def send_binary(self, data: bytes | bytearray | memoryview) -> None:
        """Queue a binary message; ConnectionClosedError if the connection is not open."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"send_binary takes bytes, got {type(data).__name__}")
        self.send_prepared(PreparedMessage(bytes(data), binary=True))

    async def send(self, data: str | bytes) -> None:
        """Queue ``data``: text for ``str``, binary for bytes."""
        self.send_prepared(PreparedMessage.of(data))

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
        self._require_open()
        self.enqueue(build_frame(opcode, bytes(payload)))

    def send_prepared(self, message: PreparedMessage) -> None:
        """Queue a message framed once for many (what broadcasts use)."""
        self._require_open()
        self.enqueue(message.frame_for(self.wbits))

    def _require_open(self) -> None:
        if self.state is not ConnectionState.OPEN:
            raise ConnectionClosedError(
                f"connection {self.id} is {self.state.value}; it cannot send",
                self._close_code,
            )

    def enqueue(self, frame: bytes) -> None:
        """Queue frame bytes for this turn's write; cut off a slow consumer."""
        if self.state is ConnectionState.OPEN and self._push(frame):
            self._schedule_flush(self)

    def _push(self, frame: bytes) -> bool:
        """Queue ``frame`` without scheduling a write (the caller does that).

        True if the connection needs a flush this turn: the frame is the first one
        queued since the last write. A frame that would take the bytes held for this
        connection over the limit cuts it off instead. Call only while OPEN.
        """
        size = self._out_size + len(frame)
        self._out_size = size
        if size + self._backlog > self._limit and self._over_limit():
            return False
        out = self._out
        if out is None:
            self._out = frame
            return True
        if isinstance(out, list):
            out.append(frame)
        else:
            self._out = [out, frame]
        return False

    def _over_limit(self) -> bool:
        """The held bytes may be over the limit: ask the transport, cut off if they are.

        ``_backlog`` only ever overestimates what the transport holds (it grows by each
        write and is corrected here), so the transport is asked only near the limit.
        """
        transport = self._transport
        self._backlog = transport.get_write_buffer_size() if transport is not None else 0
        if self._out_size + self._backlog <= self._limit:
            return False
        self._cut_off_slow_consumer()
        return True

    def flush(self) -> None:
        """Write everything queued in one call to the transport."""
        data = self._out
        if data is None:
            return
        self._out = None
        size, self._out_size = self._out_size, 0
        if isinstance(data, list):
            data = b"".join(data)
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        self._backlog += size

    def _cut_off_slow_consumer(self) -> None:
        """The peer does not read fast enough: drop it so it slows no one else."""
        self._hub.stats.slow_consumers += 1
        self.abort(CloseCode.POLICY_VIOLATION, SLOW_CONSUMER_REASON)

    # -- closing ---------------------------------------------------------------------

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Send a close frame with ``code`` and ``reason`` and finish the closing handshake.

        Frames already queued go out first. Returns once the peer answered and the
        socket is closed, or after ``node.protocol.CLOSE_TIMEOUT`` seconds, when the
        socket is aborted. ValueError for a code that may not be sent.
        """
        payload = close_payload(code, reason)  # validates before any state changes
        if self.state is ConnectionState.CONNECTING:
            raise ConnectionClosedError(f"connection {self.id} is not open yet")
        if self.state is not ConnectionState.OPEN:
            return
        self._close_code, self._close_reason = code, reason
        self.flush()
        self._set_state(ConnectionState.CLOSING)
        protocol = self._protocol
        assert protocol is not None  # OPEN implies attached
        protocol.send_close(payload)
        protocol.arm_abort(CLOSE_TIMEOUT)
        await protocol.wait_closed()

    def abort(self, code: int, reason: str) -> None:
        """Close at once without waiting for the peer: a slow consumer or a missed pong.

        A close frame is written if the socket can take it; the transport is then
        closed and, if the peer still does not go, aborted shortly after.
        """
        if self.state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
            return
        self._close_code, self._close_reason = code, reason
        self._out = None
        self._out_size = 0
        if self.state is ConnectionState.OPEN:
            self._set_state(ConnectionState.CLOSING)
        transport, protocol = self._transport, self._protocol
        if transport is None or protocol is None:
            return
        if reason == SLOW_CONSUMER_REASON:
            transport.abort()
            return
        protocol.send_close(close_payload(code, reason))
        if not transport.is_closing():
            transport.close()
        protocol.arm_abort(1.0)

    def _abort_transport(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _attach(
        self, protocol: WebSocketProtocol, transport: asyncio.Transport, wbits: int,
        ping_interval: float,
    ) -> None:
        """The handshake is done: start sending, and schedule the first keepalive ping."""
        self._protocol = protocol
        self._transport = transport
        self.wbits = wbits
        self._next_ping = time.time() + ping_interval
        self._set_state(ConnectionState.OPEN)

    def _mark_closed(self) -> bool:
        """The connection is gone; True if it had been open (so on_close is due)."""
        was_open = self.state is not ConnectionState.CONNECTING
        self._out = None
        self._out_size = 0
        if self.state is not ConnectionState.CLOSED:
            self._set_state(ConnectionState.CLOSED)
        return was_open

    def _peer_closing(self) -> None:
        """The closing handshake began on the peer's side (or on a protocol error)."""
        if self.state is ConnectionState.OPEN:
            self._set_state(ConnectionState.CLOSING)
            self._out = None
            self._out_size = 0

    def _pong_received(self) -> None:
        self.last_pong_time = time.time()
        self._awaiting_pong_since = 0.0

    def _keepalive(self, now: float, interval: float, timeout: float, ping: bytes) -> bool:
        """One keepalive step: ping when due; False if a pong is overdue (close it).

        While the node does not read the socket (its callbacks lag behind: see
        ``node.protocol.INBOX_HIGH``) a pong could not be seen, so none is awaited:
        the client is not blamed for the node's own backlog.
        """
        protocol = self._protocol
        if protocol is not None and protocol.reading_paused:
            self._awaiting_pong_since = 0.0
            self._next_ping = now + interval
            return True
        waiting = self._awaiting_pong_since
        if waiting:
            return now - waiting < timeout
        if now >= self._next_ping:
            self.enqueue(ping)
            self.last_ping_time = self._awaiting_pong_since = now
            self._next_ping = now + interval
        return True
