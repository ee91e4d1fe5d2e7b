"""The asyncio side of one open connection: a thin adapter between the socket and its core.

aiohttp parses the upgrade request and routes it; once the hub has accepted it, the
transport is handed to a ``WebSocketProtocol`` and aiohttp's request objects are let
go. What stays per connection is this object, the ``Connection`` (with its core and
``MessageReader``): no task, no queue, no request while the connection is idle. That is
what keeps an idle connection small (see docs/benchmarks.md, idle memory).

This module decides nothing about the WebSocket protocol (``node.core`` does): it moves
bytes and time into the core, writes what the core gives out, closes or aborts the
socket when the core says so (arming the timer for the core's ``abort_after``), and
hands events to the user's callbacks.

Incoming events are handled in the order they arrived. Pings, pongs, close frames and
protocol errors are handled by the core at once; the callbacks run one at a time in a
task that exists only while there are events to hand over (``_dispatch``), which lets
the event loop in between every ``INBOX_HIGH`` of them. At most ``INBOX_HIGH`` events
are parsed from one read; while that many wait, the socket is not read and the rest
of the bytes stay unparsed (TCP pushes back on the client), so a fast sender holds at
most that many messages in the node and cannot keep the loop from other sockets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, cast

from roomcast.node.connection import Connection
from roomcast.node.handlers import Callback, EventHandler, run_callback
from roomcast.node.messages import Message, MessageType
from roomcast.node.stats import HubStats
from roomcast.shared.rfc6455 import Opcode

log = logging.getLogger("roomcast.node")

INBOX_HIGH: Final = 64
"""Events waiting for the callbacks at which the socket stops being read."""
INBOX_LOW: Final = 8
"""...and at which it is read again."""

# Looked up once per event: module names are quicker to reach than enum members.
_TEXT: Final = Opcode.TEXT
_BINARY: Final = Opcode.BINARY
_PING: Final = Opcode.PING
_PONG: Final = Opcode.PONG
_TEXT_MESSAGE: Final = MessageType.TEXT
_BINARY_MESSAGE: Final = MessageType.BINARY


@dataclass(frozen=True, slots=True)
class Owner:
    """What every connection's protocol shares with the hub that made it (one per hub)."""

    stats: HubStats
    tasks: set[asyncio.Task[Any]]
    """Callback tasks running; the hub waits for them when it closes."""
    lost: Callable[[Connection, EventHandler, asyncio.Task[None] | None], None]
    """The socket is gone (and on_open has run): the connection, its handler, and the
    task still running its callbacks, if any."""


class WebSocketProtocol(asyncio.Protocol):
    """asyncio protocol for one accepted WebSocket; created by ``Hub.upgrade``."""

    __slots__ = (
        "_abort_timer", "_closed", "_conn", "_gone", "_handler", "_inbox", "_owner",
        "_ready", "_task", "_transport",
    )

    def __init__(self, conn: Connection, handler: EventHandler, owner: Owner) -> None:
        self._conn = conn
        self._handler = handler
        self._owner = owner
        self._transport: asyncio.Transport = None  # type: ignore[assignment]
        self._inbox: deque[tuple[Callback, Any]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = False
        """False until on_open has run: events wait in the inbox until then."""
        self._gone = False
        self._abort_timer: asyncio.TimerHandle | None = None
        self._closed: asyncio.Future[None] | None = None
        """Made only when someone waits for the socket to go (``wait_closed``)."""

    # -- asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # take_over calls this when it hands the socket over (asyncio itself calls it
        # only for sockets it accepted). No isinstance check: uvloop's transports are
        # not asyncio.Transport instances, yet have every method used here.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        if conn.reading_done:
            return
        self._received(conn.receive(data, INBOX_HIGH, time.time()))
        while conn.pending and not conn.reading_done:
            if self._inbox:
                self._pause()  # the rest is parsed as the callbacks catch up
                return
            self._received(conn.receive(b"", INBOX_HIGH, time.time()))  # nothing waits

    def _read_buffered(self) -> None:
        """Parse what a read left unparsed (the callbacks have caught up)."""
        conn = self._conn
        if not conn.reading_done:
            self._received(conn.receive(b"", INBOX_HIGH, time.time()))

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        self._conn.transport_lost()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        if self._ready:
            self._owner.lost(self._conn, self._handler, self._task)

    # -- what the connection asks of the socket (node.connection.SocketControl) ----------

    def end(self, close_transport: bool, abort_after: float) -> None:
        """Closing began: close the socket after what is written if ``close_transport``;
        abort it if it is still there ``abort_after`` seconds after closing began."""
        if self._gone:
            return
        transport = self._transport
        if close_transport and not transport.is_closing():
            transport.close()
        if self._abort_timer is None:
            self._abort_timer = asyncio.get_running_loop().call_later(
                abort_after, transport.abort
            )

    def abort_now(self) -> None:
        """Abort the socket at once."""
        if not self._gone:
            self._transport.abort()

    async def wait_closed(self) -> None:
        """Return once the socket is gone (what ``Connection.close`` waits for)."""
        if self._gone:
            return
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._closed)

    # -- events ----------------------------------------------------------------------

    def _received(self, events: list[tuple[Opcode, bytes | str]]) -> None:
        """Hand what the core returned to the callbacks; write what it queued (with a
        write delay, only for a ping: other frames wait for the hub's timer)."""
        conn = self._conn
        handler = self._handler
        stats = self._owner.stats
        pinged = False
        for opcode, payload in events:
            if opcode is _TEXT or opcode is _BINARY:
                stats.messages_in += 1
                if isinstance(payload, str) and not payload.isascii():
                    stats.bytes_in += len(payload.encode())
                else:
                    stats.bytes_in += len(payload)
                if handler.on_message is not None:
                    mtype = _TEXT_MESSAGE if opcode is _TEXT else _BINARY_MESSAGE
                    self._queue(handler.on_message, Message(payload, mtype))
            elif opcode is _PING:
                pinged = True
                if handler.on_ping is not None:
                    self._queue(handler.on_ping, payload)
            elif opcode is _PONG and handler.on_pong is not None:
                self._queue(handler.on_pong, payload)
        error = conn.error
        if error is not None:
            log.info("closing %s with %d: %s", conn.id, error.close_code, error,
                     extra={"conn_id": conn.id})
            if handler.on_error is not None:
                self._queue(handler.on_error, error)
        if conn.ending:
            conn.settle()  # the close handshake, a fault, or a pong that cut it off
        elif conn.has_output and (pinged or not conn.batching):
            conn.flush()  # pongs; a batch without one waits for the hub's timer

    # -- handing events to the callbacks ---------------------------------------------

    def _queue(self, callback: Callback, arg: Any) -> None:
        inbox = self._inbox
        if inbox is None:
            inbox = self._inbox = deque()
        inbox.append((callback, arg))
        if self._task is None and self._ready:
            self._start_dispatch()
        elif len(inbox) >= INBOX_HIGH:
            self._pause()

    def _pause(self) -> None:
        conn = self._conn
        if not conn.reading_paused and not self._gone:
            conn.reading_paused = True
            self._transport.pause_reading()

    def opened(self) -> None:
        """on_open has run: hand over what arrived meanwhile, and everything after."""
        self._ready = True
        if self._inbox and self._task is None:
            self._start_dispatch()
        if self._gone:  # the client went while on_open ran
            self._owner.lost(self._conn, self._handler, self._task)

    def _start_dispatch(self) -> None:
        task = asyncio.get_running_loop().create_task(self._dispatch())
        self._task = task
        tasks = self._owner.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _dispatch(self) -> None:
        inbox = self._inbox
        assert inbox is not None
        conn = self._conn
        handler = self._handler
        handed = 0
        try:
            while inbox:
                callback, arg = inbox.popleft()
                await run_callback(conn, handler, callback, arg)
                handed += 1
                if handed % INBOX_HIGH == 0:
                    await asyncio.sleep(0)  # let other sockets and timers in
                if conn.reading_paused and len(inbox) <= INBOX_LOW:
                    while conn.pending and len(inbox) <= INBOX_LOW:
                        self._read_buffered()
                    if not conn.pending:
                        conn.reading_paused = False
                        if not self._gone:
                            self._transport.resume_reading()
        finally:
            self._task = None
            self._inbox = None
