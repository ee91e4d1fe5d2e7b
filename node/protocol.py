"""The WebSocket protocol of one open connection, on the socket after the handshake.

aiohttp parses the upgrade request and routes it; once the hub has accepted it, the
transport is handed to a ``WebSocketProtocol`` and aiohttp's request objects are let
go. What stays per connection is this object, its ``MessageReader`` and the
``Connection``: no task, no queue, no request while the connection is idle. That is
what keeps an idle connection small (see docs/benchmarks.md, idle memory).

Incoming events are handled in the order they arrived. Keepalive pongs, close frames
and protocol errors are handled at once; the user's callbacks run one at a time in a
task that exists only while there are events to hand over (``_dispatch``), which lets
the event loop in between every ``INBOX_HIGH`` of them. At most ``INBOX_HIGH`` events
are parsed from one read; while that many wait, the socket is not read and the rest
of the bytes stay unparsed (TCP pushes back on the client), so a fast sender holds at
most that many messages in the node and cannot keep the loop from other sockets.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

from roomcast.node.events import Message, MessageType
from roomcast.shared.errors import ProtocolError
from roomcast.shared.frames import MessageReader, build_frame, close_payload, parse_close_payload
from roomcast.shared.protocol import CloseCode, Opcode

if TYPE_CHECKING:
    from roomcast.node.connection import Connection
    from roomcast.node.hub import Hub

log = logging.getLogger("roomcast.node")

INBOX_HIGH: Final = 64
"""Events waiting for the callbacks at which the socket stops being read."""
INBOX_LOW: Final = 8
"""...and at which it is read again."""
CLOSE_TIMEOUT: Final = 5.0
"""Seconds to wait for the peer's close frame (or to go) after ours, then abort."""


class WebSocketProtocol(asyncio.Protocol):
    """asyncio protocol for one accepted WebSocket; created by ``Hub.upgrade``."""

    __slots__ = (
        "_abort_timer", "_close_sent", "_closed", "_conn", "_gone", "_hub", "_inbox",
        "_paused", "_reader", "_ready", "_task", "_transport",
    )

    def __init__(self, hub: Hub, conn: Connection, reader: MessageReader) -> None:
        self._hub = hub
        self._conn = conn
        self._transport: asyncio.Transport = None  # type: ignore[assignment]
        self._reader = reader
        self._inbox: deque[tuple[Callable[..., Any], Any]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = False
        """False until on_open has run: events wait in the inbox until then."""
        self._paused = False
        self._close_sent = False
        self._gone = False
        self._abort_timer: asyncio.TimerHandle | None = None
        self._closed: asyncio.Future[None] | None = None
        """Made only when someone waits for the socket to go (``wait_closed``)."""

    # -- asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # take_over calls this when it hands the socket over (asyncio itself calls it
        # only for sockets it accepted). Not every stream transport subclasses
        # asyncio.Transport (uvloop's do not); take_over checked the methods used.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        if reader.done:
            return
        events = reader.feed(data, INBOX_HIGH)
        while True:
            for opcode, payload in events:
                self._event(opcode, payload)
            if reader.error is not None:
                self._fail(reader.error)
                return
            if not reader.pending:
                return
            if self._inbox:
                self._pause()  # the rest is parsed as the callbacks catch up
                return
            events = reader.feed(b"", INBOX_HIGH)  # nothing waits: read on

    def _read_buffered(self) -> None:
        """Parse what a read left unparsed (the callbacks have caught up)."""
        reader = self._reader
        if reader.done:
            return
        for opcode, payload in reader.feed(b"", INBOX_HIGH):
            self._event(opcode, payload)
        if reader.error is not None:
            self._fail(reader.error)

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        if self._ready:
            self._hub._connection_lost(self._conn, self._task)

    @property
    def reading_paused(self) -> bool:
        """True while the socket is not read because callbacks lag behind."""
        return self._paused

    async def wait_closed(self) -> None:
        """Return once the socket is gone (what ``Connection.close`` waits for)."""
        if self._gone:
            return
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._closed)

    # -- events ----------------------------------------------------------------------

    def _event(self, opcode: Opcode, payload: bytes | str) -> None:
        conn = self._conn
        hub = self._hub
        handler = conn.handler
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            stats = hub.stats
            stats.messages_in += 1
            if isinstance(payload, str) and not payload.isascii():
                stats.bytes_in += len(payload.encode())
            else:
                stats.bytes_in += len(payload)
            if handler.on_message is not None:
                mtype = MessageType.TEXT if opcode is Opcode.TEXT else MessageType.BINARY
                self._queue(handler.on_message, Message(payload, mtype))
        elif opcode is Opcode.PING:
            assert isinstance(payload, bytes)
            if conn.is_open:
                conn.enqueue(build_frame(Opcode.PONG, payload))
            if handler.on_ping is not None:
                self._queue(handler.on_ping, payload)
        elif opcode is Opcode.PONG:
            conn._pong_received()
            if handler.on_pong is not None:
                self._queue(handler.on_pong, payload)
        elif opcode is Opcode.CLOSE:
            assert isinstance(payload, bytes)
            self._peer_closed(payload)

    def _peer_closed(self, payload: bytes) -> None:
        """The peer's close frame: answer it (unless it answers ours) and end the socket."""
        conn = self._conn
        code, reason = parse_close_payload(payload)
        if conn._close_code is None:
            conn._close_code, conn._close_reason = code, reason
        if not self._close_sent:
            conn.flush()
            # Echo the peer's code (RFC 6455 section 5.5.1); 1000 when it sent none.
            self.send_close(close_payload(CloseCode.NORMAL if code == CloseCode.NO_STATUS
                                          else code))
        conn._peer_closing()
        self._end()

    def _fail(self, exc: ProtocolError) -> None:
        """The client broke the protocol: close with the error's code, tell on_error."""
        conn = self._conn
        code = int(exc.close_code)
        if conn._close_code is None:
            conn._close_code, conn._close_reason = code, str(exc)
        log.info("closing %s with %d: %s", conn.id, code, exc, extra={"conn_id": conn.id})
        if not self._close_sent:
            conn.flush()
            self.send_close(close_payload(code, _short(str(exc))))
        conn._peer_closing()
        if conn.handler.on_error is not None:
            self._queue(conn.handler.on_error, exc)
        self._end()

    # -- sending and closing ---------------------------------------------------------

    def send_close(self, payload: bytes) -> None:
        """Write a close frame (once)."""
        if self._close_sent or self._gone:
            return
        self._close_sent = True
        transport = self._transport
        if not transport.is_closing():
            transport.write(build_frame(Opcode.CLOSE, payload))

    def _end(self) -> None:
        """Close the socket after what is written; abort it if the peer lingers."""
        transport = self._transport
        if not transport.is_closing():
            transport.close()
        self.arm_abort(CLOSE_TIMEOUT)

    def arm_abort(self, delay: float) -> None:
        """Abort the socket in ``delay`` seconds unless it is gone by then."""
        if self._abort_timer is None and not self._gone:
            self._abort_timer = asyncio.get_running_loop().call_later(
                delay, self._transport.abort
            )

    # -- handing events to the callbacks ---------------------------------------------

    def _queue(self, callback: Callable[..., Any], arg: Any) -> None:
        inbox = self._inbox
        if inbox is None:
            inbox = self._inbox = deque()
        inbox.append((callback, arg))
        if self._task is None and self._ready:
            self._start_dispatch()
        elif len(inbox) >= INBOX_HIGH:
            self._pause()

    def _pause(self) -> None:
        if not self._paused and not self._gone:
            self._paused = True
            self._transport.pause_reading()

    def opened(self) -> None:
        """on_open has run: hand over what arrived meanwhile, and everything after."""
        self._ready = True
        if self._inbox and self._task is None:
            self._start_dispatch()
        if self._gone:  # the client went while on_open ran
            self._hub._connection_lost(self._conn, self._task)

    def _start_dispatch(self) -> None:
        task = asyncio.get_running_loop().create_task(self._dispatch())
        self._task = task
        self._hub._handlers.add(task)
        task.add_done_callback(self._hub._handlers.discard)

    async def _dispatch(self) -> None:
        inbox = self._inbox
        assert inbox is not None
        call = self._hub._call
        conn = self._conn
        reader = self._reader
        handed = 0
        try:
            while inbox:
                callback, arg = inbox.popleft()
                await call(conn, callback, arg)
                handed += 1
                if handed % INBOX_HIGH == 0:
                    await asyncio.sleep(0)  # let other sockets and timers in
                if self._paused and len(inbox) <= INBOX_LOW:
                    while reader.pending and len(inbox) <= INBOX_LOW:
                        self._read_buffered()
                    if not reader.pending:
                        self._paused = False
                        if not self._gone:
                            self._transport.resume_reading()
        finally:
            self._task = None
            self._inbox = None


def _short(reason: str) -> str:
    """A close reason that fits a control frame (123 bytes of UTF-8)."""
    data = reason.encode()[:123]
    return data.decode(errors="ignore")
