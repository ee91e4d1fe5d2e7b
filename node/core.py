"""The rules of one WebSocket connection, with no I/O: ``ConnectionCore``.

Everything that decides what happens on one connection lives here: its state
(CONNECTING → OPEN → CLOSING → CLOSED), the closing handshake and its close codes, the
keepalive deadlines, the outgoing buffer and the slow-consumer limit. The core is a
plain object, as python-websockets' ``Protocol`` is: bytes and time go in; bytes,
events and deadlines come out. It reads and writes no socket and arms no timer:
``node.connection`` and ``node.asyncio_protocol`` do, and ``tests/node/test_core.py``
drives it with plain values.

In                                          Out
``receive(data, limit, now)`` peer bytes    the events they complete; ``error``
``push(frame)`` a frame to send             ``WRITE``: have the connection flushed;
                                            ``FULL``: flush it now (batch at its cap);
                                            ``CUT_OFF``: it was cut off (see below)
``begin_close(code, reason)`` our close     ``take_output()``: the bytes to write now
``begin_abort(code, reason)`` end at once   ``ending``, ``close_transport``,
``keepalive(now, interval, timeout)``       ``abort_after``: what to do with the socket
``reading_paused`` the socket is not read   ``keepalive``'s ``WRITE`` / ``PONG_OVERDUE``,
``lost()`` the socket is gone               ``keepalive_deadline(timeout)``;
                                            ``take_cut_off()``: report a slow consumer

Close codes (RFC 6455 section 7.4). Ours: ``begin_close`` queues the close frame after
the frames already queued; the peer's answer completes the handshake. The peer's: its
code is echoed (1000 for a close frame without one, 1005), then the socket ends. A
frame the reader refuses: 1002, 1007 or 1009 with the fault as reason. Aborts, which
drop what is queued and queue only the close frame: 1013 "slow consumer", 1011
"keepalive pong timeout", 1011 "server error while opening". The socket is then
closed once the output is written, and aborted if it lingers (``abort_after``).

The outgoing buffer and the slow-consumer rule: frames wait in the core until the next
``take_output`` (one write per event-loop turn); bytes written and not yet sent are the
transport's. A frame is refused, and the connection cut off with 1013, only when the
bytes already held for the client before it, waiting here or unsent, are over
``send_buffer_limit``. A client is thus judged by whether it drains, not by the size of
one message: a message of any size reaches a client that reads, and a client that does
not read holds at most the limit plus one message. The core counts what it handed out
as unsent, an upper bound; only when that bound is over the limit does it ask for the
real count (``unsent_now``, which the I/O layer answers from its transport).

Write batching (``HubConfig.write_delay_ms``): the I/O layer may wait longer than a turn
before ``take_output``; frames keep collecting in the one batch meanwhile, and once the
batch holds ``batch_bytes`` (``HubConfig.write_batch_bytes``) ``push`` answers ``FULL``:
write it now. Without a cap (the default, no delay) ``FULL`` never comes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from enum import Enum
from typing import Final, TypeVar

from roomcast.shared.errors import ConnectionClosedError, ProtocolError
from roomcast.shared.frames import (
    MessageReader,
    PreparedMessage,
    build_frame,
    close_payload,
    parse_close_payload,
)
from roomcast.shared.ids import ConnectionId
from roomcast.shared.rfc6455 import CloseCode, Opcode

CLOSE_TIMEOUT: Final = 5.0
"""Seconds the socket may linger once the closing handshake began before it is aborted."""
ABORT_TIMEOUT: Final = 1.0
"""Seconds an aborted connection's socket may linger to pass on its close frame."""
SLOW_CONSUMER_REASON: Final = "slow consumer"
PONG_TIMEOUT_REASON: Final = "keepalive pong timeout"
OPENING_ERROR_REASON: Final = "server error while opening"
PING_PAYLOAD: Final = b"roomcast"
PING_FRAME: Final = build_frame(Opcode.PING, PING_PAYLOAD)

NOTHING: Final = 0
"""``push`` and ``keepalive``: nothing more to do (queued behind frames that wait)."""
WRITE: Final = 1
"""The first frame since the last write is queued: have the connection flushed."""
CUT_OFF: Final = 2
"""``push`` refused the frame: the connection is cut off as a slow consumer."""
PONG_OVERDUE: Final = 3
"""``keepalive``: no pong within the timeout: abort with 1011."""
FULL: Final = 4
"""``push``: the frame is queued and the batch reached its cap: write it now."""
NO_CAP: Final = sys.maxsize
"""``batch_bytes`` of a connection whose batch has no cap (no write delay)."""

# How far the closing handshake is (``ConnectionCore._ending``).
_NOT_ENDING: Final = 0
_CLOSE_SENT: Final = 1
"""Our close frame is queued; the socket stays until the peer answers."""
_CLOSE_DONE: Final = 2
"""The handshake is done on our side (or failed): close the socket after the output."""
_ABORTED: Final = 3
"""Aborted: only the close frame goes out, then the socket is closed, and soon aborted."""
_CUT_OFF: Final = 4
"""As ``_ABORTED``, for a slow consumer not yet reported (``take_cut_off``)."""

_REASON_BYTES: Final = 123
_FIRST_CONTROL: Final = 0x8


class ConnectionState(Enum):
    """The seed's ``ConnectionState``."""

    CONNECTING = "connecting"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


_OPEN: Final = ConnectionState.OPEN
_ALLOWED: Final = {
    ConnectionState.CONNECTING: {ConnectionState.OPEN, ConnectionState.CLOSED},
    ConnectionState.OPEN: {ConnectionState.CLOSING, ConnectionState.CLOSED},
    ConnectionState.CLOSING: {ConnectionState.CLOSED},
    ConnectionState.CLOSED: set(),
}


class ConnectionCore:
    """The state, closing handshake, keepalive and outgoing buffer of one connection."""

    __slots__ = (
        "_awaiting_pong",
        "_batch_cap",
        "_close_code",
        "_close_reason",
        "_ending",
        "_limit",
        "_next_ping",
        "_out",
        "_out_size",
        "_reader",
        "_unsent",
        "id",
        "last_ping_time",
        "last_pong_time",
        "reading_paused",
        "state",
        "wbits",
    )

    def __init__(self, conn_id: ConnectionId, reader: MessageReader, send_buffer_limit: int,
                 batch_bytes: int = NO_CAP) -> None:
        self.id: Final = conn_id
        self.state = ConnectionState.CONNECTING
        self.wbits = 0
        """Negotiated permessage-deflate window bits; 0 when not compressed."""
        self.last_ping_time = 0.0
        """``time.time()`` when this node last sent a ping (0 if never)."""
        self.last_pong_time = 0.0
        """``time.time()`` when a pong last arrived (0 if never)."""
        self.reading_paused = False
        """Set by the I/O layer while it does not read the socket (callbacks lag)."""
        self._reader = reader
        self._limit = send_buffer_limit
        self._batch_cap = batch_bytes
        """Bytes of queued frames at which ``push`` answers ``FULL``."""
        self._out: bytes | list[bytes] | None = None
        """Frames queued since the last write: None, one frame, or a list of frames."""
        self._out_size = 0
        """Bytes in ``_out``."""
        self._unsent = 0
        """At least the bytes written and not yet sent (corrected by ``unsent_now``)."""
        self._next_ping = 0.0
        self._awaiting_pong = 0.0
        """When the unanswered keepalive ping was sent; 0 when none is awaited."""
        self._close_code: int | None = None
        self._close_reason = ""
        self._ending = _NOT_ENDING

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.state.value}>"

    # -- state -----------------------------------------------------------------------

    def _set_state(self, new: ConnectionState) -> None:
        if new not in _ALLOWED[self.state]:
            raise RuntimeError(f"connection {self.id}: {self.state.value} -> {new.value}")
        self.state = new

    @property
    def is_open(self) -> bool:
        """True while frames can be sent."""
        return self.state is _OPEN

    @property
    def close_code(self) -> int | None:
        """The close code once closing has begun (ours or the peer's)."""
        return self._close_code

    @property
    def close_reason(self) -> str:
        """The close reason that goes with ``close_code``."""
        return self._close_reason

    def open(self, wbits: int, first_ping_at: float) -> None:
        """The handshake is done: frames may flow; the first keepalive ping is due then."""
        self._set_state(_OPEN)
        self.wbits = wbits
        self._next_ping = first_ping_at

    def lost(self) -> bool:
        """The socket is gone and its callbacks are done: CLOSED. True if it had opened."""
        was_open = self.state is not ConnectionState.CONNECTING
        self._out = None
        self._out_size = 0
        if self.state is not ConnectionState.CLOSED:
            self._set_state(ConnectionState.CLOSED)
        return was_open

    def require_open(self) -> None:
        """ConnectionClosedError unless frames can be sent."""
        if self.state is not _OPEN:
            raise ConnectionClosedError(
                f"connection {self.id} is {self.state.value}; it cannot send",
                self._close_code,
            )

    # -- receiving -------------------------------------------------------------------

    def receive(
        self, data: bytes, limit: int, now: float
    ) -> list[tuple[Opcode, bytes | str]]:
        """Bytes from the peer in; the events they complete out, at most ``limit``.

        Control frames are acted on here (a ping queues its pong, a pong ends the wait
        for one, a close frame answers or completes the closing handshake) and returned
        all the same, for the callbacks. A frame that breaks RFC 6455 ends reading: it
        is kept in ``error`` and its close frame is queued. Bytes past the ``limit``-th
        event wait in the reader (``pending``); ``receive(b"", ...)`` reads on.
        """
        reader = self._reader
        events = reader.feed(data, limit)
        for opcode, payload in events:
            if opcode < _FIRST_CONTROL:  # text or binary: nothing to do here
                continue
            if opcode is Opcode.PING:
                if self.state is _OPEN:
                    assert isinstance(payload, bytes)
                    self.push(build_frame(Opcode.PONG, payload))
            elif opcode is Opcode.PONG:
                self.last_pong_time = now
                self._awaiting_pong = 0.0
            elif opcode is Opcode.CLOSE:
                assert isinstance(payload, bytes)
                self._peer_closed(payload)
        if reader.error is not None:
            self._failed(reader.error)
        return events

    @property
    def pending(self) -> bool:
        """True if bytes wait in the reader past the last ``receive``'s limit."""
        return self._reader.pending

    @property
    def reading_done(self) -> bool:
        """True after the peer's close frame or a protocol error: nothing more is read."""
        return self._reader.done

    @property
    def error(self) -> ProtocolError | None:
        """The protocol fault that ended reading, with the close code it was given."""
        return self._reader.error

    def _peer_closed(self, payload: bytes) -> None:
        """The peer's close frame: echo its code unless it answers ours; the socket ends."""
        code, reason = parse_close_payload(payload)
        if self._close_code is None:
            self._close_code, self._close_reason = code, reason
        if self._ending == _NOT_ENDING:
            # RFC 6455 section 5.5.1: echo the status code; 1005 (none) is answered 1000.
            self._queue_close(close_payload(CloseCode.NORMAL if code == CloseCode.NO_STATUS
                                            else code))
        self._end(_CLOSE_DONE)

    def _failed(self, exc: ProtocolError) -> None:
        """The peer broke the protocol: close with the fault's code and say why."""
        code = int(exc.close_code)
        if self._close_code is None:
            self._close_code, self._close_reason = code, str(exc)
        if self._ending == _NOT_ENDING:
            self._queue_close(close_payload(code, _short(str(exc))))
        self._end(_CLOSE_DONE)

    # -- sending ---------------------------------------------------------------------

    def push(self, frame: bytes) -> int:
        """Queue ``frame`` (ready-made bytes, perhaps shared by many connections).

        ``WRITE`` if it is the first frame since the last write, ``NOTHING`` if it waits
        behind others (or the connection is not open and it was dropped), ``FULL`` if it
        is queued and the frames now waiting hold ``batch_bytes`` or more, ``CUT_OFF`` if
        the bytes held before it are over the limit: then the frame is refused, the
        connection is aborted with 1013 "slow consumer" and only its close frame waits.
        """
        if self.state is not _OPEN:
            return NOTHING
        if self._out_size + self._unsent > self._limit:
            self._unsent = self.unsent_now()
            if self._out_size + self._unsent > self._limit:
                self.begin_abort(CloseCode.TRY_AGAIN_LATER, SLOW_CONSUMER_REASON)
                self._ending = _CUT_OFF
                return CUT_OFF
        self._out_size += len(frame)
        out = self._out
        if out is None:
            self._out = frame
            return WRITE if self._out_size < self._batch_cap else FULL
        if isinstance(out, list):
            out.append(frame)
        else:
            self._out = [out, frame]
        return NOTHING if self._out_size < self._batch_cap else FULL

    def unsent_now(self) -> int:
        """Bytes written and not yet sent. The core knows only an upper bound (what it
        handed out); the I/O layer overrides this with its transport's own count."""
        return self._unsent

    @property
    def batching(self) -> bool:
        """True if frames may wait longer than a turn (a write delay, with its cap)."""
        return self._batch_cap != NO_CAP

    @property
    def has_output(self) -> bool:
        """True if frames wait for the next write."""
        return self._out is not None

    def take_output(self) -> bytes | None:
        """Everything queued, as the bytes of one write (None if nothing waits).

        What is handed out counts as unsent until ``unsent_now`` says otherwise.
        """
        out = self._out
        if out is None:
            return None
        self._out = None
        self._unsent += self._out_size
        self._out_size = 0
        return b"".join(out) if isinstance(out, list) else out

    def _queue_close(self, payload: bytes) -> None:
        """Queue a close frame after what waits, whatever the limit: it must go out."""
        frame = build_frame(Opcode.CLOSE, payload)
        self._out_size += len(frame)
        out = self._out
        if out is None:
            self._out = frame
        elif isinstance(out, list):
            out.append(frame)
        else:
            self._out = [out, frame]

    # -- closing ---------------------------------------------------------------------

    def begin_close(self, code: int, reason: str) -> bool:
        """Begin our closing handshake: queue a close frame after what waits.

        False if closing had begun already. ValueError for a code that may not be sent
        or a reason over 123 bytes; ConnectionClosedError while still connecting.
        """
        payload = close_payload(code, reason)  # validates before any state changes
        if self.state is ConnectionState.CONNECTING:
            raise ConnectionClosedError(f"connection {self.id} is not open yet")
        if self.state is not _OPEN:
            return False
        self._close_code, self._close_reason = code, reason
        self._queue_close(payload)
        self._end(_CLOSE_SENT)
        return True

    def begin_abort(self, code: int, reason: str) -> bool:
        """End at once (a missed pong, an error while opening, a slow consumer): drop
        what waits and queue only a close frame with ``code``. False if not open."""
        payload = close_payload(code, _short(reason))
        if self.state is not _OPEN:
            return False
        self._close_code, self._close_reason = code, reason
        self._out = None
        self._out_size = 0
        self._queue_close(payload)
        self._end(_ABORTED)
        return True

    def _end(self, ending: int) -> None:
        if self.state is _OPEN:
            self._set_state(ConnectionState.CLOSING)
        if self._ending < ending:
            self._ending = ending

    @property
    def ending(self) -> bool:
        """True once closing has begun: after the output, see ``close_transport``."""
        return self._ending != _NOT_ENDING

    @property
    def close_transport(self) -> bool:
        """True if the socket is to be closed once the output is written (our part of the
        closing handshake is done); False while our close frame awaits the peer's."""
        return self._ending >= _CLOSE_DONE

    @property
    def abort_after(self) -> float:
        """Seconds the socket may linger once closing began before it is aborted."""
        return ABORT_TIMEOUT if self._ending >= _ABORTED else CLOSE_TIMEOUT

    def take_cut_off(self) -> bool:
        """True once after ``push`` cut this connection off: the I/O layer reports it."""
        if self._ending != _CUT_OFF:
            return False
        self._ending = _ABORTED
        return True

    # -- keepalive -------------------------------------------------------------------

    def keepalive(self, now: float, interval: float, timeout: float) -> int:
        """Time passes: queue the keepalive ping when due; ``PONG_OVERDUE`` if its pong
        is ``timeout`` seconds late. Otherwise ``push``'s code (or ``NOTHING``).

        While the socket is not read (``reading_paused``: the callbacks lag behind) a
        pong could not be seen, so none is awaited: the client is not blamed for the
        node's own backlog, and the next ping is due an interval after reading resumes.
        """
        if self.reading_paused:
            self._awaiting_pong = 0.0
            self._next_ping = now + interval
            return NOTHING
        waiting = self._awaiting_pong
        if waiting:
            return NOTHING if now - waiting < timeout else PONG_OVERDUE
        if now < self._next_ping:
            return NOTHING
        code = self.push(PING_FRAME)
        self.last_ping_time = self._awaiting_pong = now
        self._next_ping = now + interval
        return code

    def keepalive_deadline(self, timeout: float) -> float:
        """When ``keepalive`` next has something to do: the pong's deadline while one is
        awaited, else when the next ping is due."""
        if self._awaiting_pong:
            return self._awaiting_pong + timeout
        return self._next_ping


C = TypeVar("C", bound=ConnectionCore)


def deliver(
    members: Iterable[C],
    prepared: PreparedMessage,
    exclude: str | None,
    compressed: bool,
    dirty: list[C],
    settle: list[C],
) -> int:
    """Queue a broadcast's frame for every open member but ``exclude``; how many got it.

    Every member gets the same bytes object (one per deflate window with compression
    on): nothing is copied and no task or coroutine is made per member. Members whose
    first frame of the turn this is go to ``dirty`` (flush them at the end of the turn),
    members it cut off, and members whose batch it brought to the cap, to ``settle``
    (write them now; report those cut off and write their close frame).
    """
    count = 0
    if compressed:
        frame_for = prepared.frame_for
        for conn in members:
            if conn.state is _OPEN and conn.id != exclude:
                count += _push(conn, frame_for(conn.wbits), dirty, settle)
        return count
    frame = prepared.frame
    size = len(frame)
    open_state = _OPEN
    for conn in members:
        if conn.state is open_state and (exclude is None or conn.id != exclude):
            # push() inlined for its common cases: the bytes held before this frame,
            # queued and (at most) unsent, are within the limit.
            out = conn._out
            if out is None:
                if conn._unsent <= conn._limit:
                    conn._out = frame
                    conn._out_size = size
                    if size < conn._batch_cap:
                        dirty.append(conn)
                    else:
                        settle.append(conn)
                    count += 1
                    continue
            elif conn._out_size + conn._unsent <= conn._limit:
                conn._out_size += size
                if isinstance(out, list):
                    out.append(frame)
                else:
                    conn._out = [out, frame]
                if conn._out_size >= conn._batch_cap:
                    settle.append(conn)
                count += 1
                continue
            count += _push(conn, frame, dirty, settle)  # asks for the real unsent count
    return count


def _push(conn: C, frame: bytes, dirty: list[C], settle: list[C]) -> int:
    """``conn.push(frame)`` for ``deliver``: 1 if queued, 0 if it cut ``conn`` off."""
    code = conn.push(frame)
    if code == CUT_OFF:
        settle.append(conn)
        return 0
    if code == WRITE:
        dirty.append(conn)
    elif code == FULL:
        settle.append(conn)
    return 1


def _short(reason: str) -> str:
    """A close reason that fits a control frame (123 bytes of UTF-8)."""
    data = reason.encode()[:_REASON_BYTES]
    return data.decode(errors="ignore")
