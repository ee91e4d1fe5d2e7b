"""The ``roomcast.v1`` client for Python: connect, reconnect, resume, drop duplicates.

For bots, services, command-line tools and tests. It speaks the protocol in
``docs/protocol.md`` on aiohttp's client::

    async with Client("ws://localhost:8080/chat?room=lobby&name=bot") as client:
        await client.send("hello")
        async for event in client:
            match event:
                case Message(room=room, data=data):
                    print(room, data)
                case Joined(room=room, recovered=False):
                    reload_state(room)  # the messages missed there are gone

Iterating a client yields every event as a typed object, in the order the server sent
them (a ``Joined`` with ``recovered=False`` sits exactly where the gap is), and ends
after a ``Closed``. Events wait in a bounded queue: a client nobody iterates stops
reading its socket once ``max_queue`` events wait (back-pressure, never a silent drop).

The parts without I/O (frame parsing, the position book, the backoff, the close-code
rules) are plain functions and classes, tested with plain values.

Exceptions::

    ClientError             root of everything this module raises
     ├── ConnectError       the first connection failed (refused, HTTP status, timeout)
     │    └── SubprotocolError   the server answered without roomcast.v1
     └── NotConnected       send() while no connection is open, or after close
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random as _random
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple, TypeVar
from urllib.parse import quote

import aiohttp
from yarl import URL

from roomcast.node.v1 import MAX_DECLARED_ROOMS, PREVIOUS_PARAM, PROTOCOL, SINCE_PARAM
from roomcast.shared.envelope import MAX_OFFSET
from roomcast.shared.ids import MAX_ROOM_LENGTH

__all__ = [
    "MAX_DECLARED_ROOMS",
    "PROTOCOL",
    "SINCE_PARAM",
    "Backoff",
    "Client",
    "ClientError",
    "Closed",
    "ConnectError",
    "Error",
    "Event",
    "Joined",
    "Left",
    "Lost",
    "Message",
    "NotConnected",
    "Open",
    "Position",
    "PositionBook",
    "Reconnecting",
    "SubprotocolError",
    "close_action",
    "parse_binary",
    "parse_text",
]

# The protocol's names and limits, as the node defines them (node/v1.py): the
# subprotocol, the query parameters that declare positions and the previous connection,
# at most 100 rooms in one roomcast.since; room names and offsets as shared defines them.
_EPOCH: Final = re.compile(r"[0-9A-Za-z_-]{1,32}")
_MAX_EXPONENT: Final = 64  # factor ** 64 exceeds any sensible max_delay; no overflow

# Close codes after which the protocol says not to reconnect (docs/protocol.md).
_FINAL_CODES: Final = frozenset({1000, 1002, 1003, 1007, 1008, 1009, 1010})
_GOING_AWAY: Final = 1001
_TOKEN_EXPIRED: Final = 4001
_ABNORMAL: Final = 1006
_NO_STATUS: Final = 1005
# HTTP statuses of a refused upgrade that are worth retrying (the rest are final).
_RETRY_STATUSES: Final = frozenset({408, 425, 429})
_AUTH_STATUSES: Final = frozenset({401, 403})


# ---------------------------------------------------------------------------- errors


class ClientError(Exception):
    """Root of the exceptions this client raises."""


class ConnectError(ClientError):
    """The first connection failed; ``status`` is the HTTP status of a refused upgrade."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SubprotocolError(ConnectError):
    """The server (or this route) answered without ``roomcast.v1``: check the URL."""


class NotConnected(ClientError):
    """``send`` while no connection is open (reconnecting, or closed for good)."""


# ---------------------------------------------------------------------------- events


class Position(NamedTuple):
    """Where a client is in a room with history: compare offsets only within one epoch."""

    epoch: str
    offset: int


@dataclass(frozen=True, slots=True)
class Open:
    """A connection is open and the server welcomed it (``reconnect``: not the first)."""

    node: str
    connection: str
    reconnect: bool = False


@dataclass(frozen=True, slots=True)
class Message:
    """An application message: ``str`` from a text frame, ``bytes`` from a binary one.

    ``room`` is None for a send to this connection or a broadcast to everyone;
    ``position`` is None outside rooms with history.
    """

    room: str | None
    data: str | bytes
    position: Position | None = None


@dataclass(frozen=True, slots=True)
class Joined:
    """The connection is in ``room``; the missed (or recent) messages came before this.

    ``recovered`` is None when no position was declared for the room, True when every
    missed message was replayed, False (with ``reason``) when they cannot be: reload the
    room's state from the application. ``position`` is None for a room without history.
    """

    room: str
    recovered: bool | None = None
    reason: str | None = None
    replayed: int = 0
    position: Position | None = None


@dataclass(frozen=True, slots=True)
class Left:
    """The server removed the connection from ``room``; its position is forgotten."""

    room: str


@dataclass(frozen=True, slots=True)
class Lost:
    """Messages of ``room`` were lost mid-session; reload its state, go on from here."""

    room: str
    position: Position
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Error:
    """A refusal from the server (``source="server"``) or a problem the client saw.

    Client-side codes: ``bad_frame`` (a frame that breaks the protocol; it was
    skipped), ``subprotocol`` (a reconnect reached a server without roomcast.v1),
    ``handshake`` (a reconnect was refused), ``refresh`` (the refresh hook raised),
    ``receive`` (the socket failed while reading). The connection stays up after a
    server error and a bad frame.
    """

    code: str
    message: str
    room: str | None = None
    source: Literal["server", "client"] = "server"


@dataclass(frozen=True, slots=True)
class Reconnecting:
    """The connection ended (``code``/``reason``); attempt ``attempt`` in ``delay`` s."""

    attempt: int
    delay: float
    code: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class Closed:
    """Closed for good: no more reconnects. The last event of a client.

    ``code`` is the close code (None when no connection ended it, e.g. a refused
    upgrade, whose HTTP ``status`` is then set); ``by_client`` when ``close()`` did it.
    """

    code: int | None
    reason: str
    by_client: bool = False
    status: int | None = None


Event = Open | Message | Joined | Left | Lost | Error | Reconnecting | Closed
"""Everything iterating a client can yield."""

_E = TypeVar("_E", Open, Message, Joined, Left, Lost, Error, Reconnecting, Closed)


# ---------------------------------------------------------------------------- parsing


class _BadFrame(ValueError):
    """A frame (or batch entry) that breaks the protocol."""


def _bad(message: str) -> Error:
    return Error("bad_frame", message, source="client")


def _str_field(obj: Mapping[str, Any], name: str, *, required: bool = True) -> str | None:
    value = obj.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise _BadFrame(f"{obj.get('type')!r} frame: {name!r} must be a string, got {value!r}")
    return value


def _position(obj: Mapping[str, Any], *, required: bool) -> Position | None:
    epoch, offset = obj.get("epoch"), obj.get("offset")
    if epoch is None and offset is None and not required:
        return None
    if not isinstance(epoch, str) or not _EPOCH.fullmatch(epoch):
        raise _BadFrame(f"{obj.get('type')!r} frame: bad epoch {epoch!r}")
    if type(offset) is not int or not 0 <= offset <= MAX_OFFSET:
        raise _BadFrame(f"{obj.get('type')!r} frame: bad offset {offset!r}")
    return Position(epoch, offset)


def _frame_event(obj: Any, data: bytes | None = None, *, in_batch: bool = False) -> Event | None:
    """One frame object -> its event; None for a type this version does not know."""
    if not isinstance(obj, dict):
        raise _BadFrame(f"a frame must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise _BadFrame(f"a frame needs a string 'type', got {kind!r}")
    if data is not None and kind != "message":
        if kind in _KNOWN_TYPES:
            raise _BadFrame(f"a binary frame carries only messages, not {kind!r}")
        return None
    if kind == "message":
        room = _str_field(obj, "room", required=False)
        position = _position(obj, required=False)
        if position is not None and room is None:
            raise _BadFrame("'message' frame: a position without a room")
        if data is not None:
            return Message(room, data, position)
        text = obj.get("data")
        if not isinstance(text, str):
            raise _BadFrame(f"'message' frame: 'data' must be a string, got {text!r}")
        return Message(room, text, position)
    if in_batch:
        raise _BadFrame(f"a batch carries only messages, not {kind!r}")
    if kind == "welcome":
        node = _str_field(obj, "node")
        connection = _str_field(obj, "connection")
        assert node is not None and connection is not None  # required=True
        return Open(node, connection)
    if kind == "joined":
        room = _str_field(obj, "room")
        assert room is not None
        recovered = obj.get("recovered")
        if recovered is not None and not isinstance(recovered, bool):
            raise _BadFrame(f"'joined' frame: 'recovered' must be a boolean, got {recovered!r}")
        replayed = obj.get("replayed", 0)
        if type(replayed) is not int or replayed < 0:
            raise _BadFrame(f"'joined' frame: bad 'replayed' {replayed!r}")
        reason = _str_field(obj, "reason", required=False)
        return Joined(room, recovered, reason, replayed, _position(obj, required=False))
    if kind == "left":
        room = _str_field(obj, "room")
        assert room is not None
        return Left(room)
    if kind == "lost":
        room = _str_field(obj, "room")
        position = _position(obj, required=True)
        assert room is not None and position is not None
        return Lost(room, position, _str_field(obj, "reason", required=False))
    if kind == "error":
        code = _str_field(obj, "code")
        assert code is not None
        return Error(code, _str_field(obj, "message", required=False) or "",
                     _str_field(obj, "room", required=False))
    return None


_KNOWN_TYPES: Final = frozenset({"welcome", "message", "joined", "left", "lost", "error", "batch"})


def parse_text(text: str) -> list[Event]:
    """The events of one text frame, in order; a broken frame becomes an ``Error``.

    A ``batch`` yields its messages in order; a broken entry becomes an ``Error`` in its
    place and the others still count. Unknown types and fields are ignored.
    """
    try:
        obj = json.loads(text)
    except ValueError as exc:
        return [_bad(f"a text frame that is not JSON: {exc}")]
    try:
        if isinstance(obj, dict) and obj.get("type") == "batch":
            entries = obj.get("messages")
            if not isinstance(entries, list):
                raise _BadFrame("'batch' frame: 'messages' must be a list")
            events: list[Event] = []
            for entry in entries:
                try:
                    event = _frame_event(entry, in_batch=True)
                except _BadFrame as exc:
                    events.append(_bad(f"batch entry: {exc}"))
                else:
                    if event is not None:
                        events.append(event)
            return events
        event = _frame_event(obj)
    except _BadFrame as exc:
        return [_bad(str(exc))]
    return [] if event is None else [event]


def parse_binary(frame: bytes) -> list[Event]:
    """The message of one binary frame: a JSON header line, 0x0A, then the bytes."""
    newline = frame.find(b"\n")
    if newline < 0:
        return [_bad("a binary frame without a header line (no 0x0A)")]
    try:
        header = json.loads(frame[:newline].decode("utf-8"))
        event = _frame_event(header, frame[newline + 1:])
    except (UnicodeDecodeError, ValueError) as exc:  # _BadFrame is a ValueError
        return [_bad(f"binary frame header: {exc}")]
    return [] if event is None else [event]


# ---------------------------------------------------------------------------- positions


def _declarable(room: str) -> bool:
    return 1 <= len(room) <= MAX_ROOM_LENGTH


class PositionBook:
    """The last position per room, bounded: at most ``max_rooms``, least recent out.

    Only rooms whose names the protocol lets a client declare are kept; a room is
    forgotten on ``left``. Nothing here grows with the number of messages.
    """

    def __init__(self, max_rooms: int = MAX_DECLARED_ROOMS,
                 initial: Mapping[str, tuple[str, int]] | None = None) -> None:
        if type(max_rooms) is not int or not 1 <= max_rooms <= MAX_DECLARED_ROOMS:
            raise ValueError(f"max_rooms must be an int in 1..{MAX_DECLARED_ROOMS}, "
                             f"got {max_rooms!r}")
        self._max = max_rooms
        self._rooms: OrderedDict[str, Position] = OrderedDict()
        for room, (epoch, offset) in (initial or {}).items():
            if not isinstance(room, str) or not _declarable(room):
                raise ValueError(f"positions: bad room name {room!r} (1-200 characters)")
            try:
                position = _position({"type": "positions", "epoch": epoch, "offset": offset},
                                     required=True)
            except _BadFrame as exc:
                raise ValueError(f"positions[{room!r}]: {exc}") from None
            assert position is not None
            self.set(room, position)

    def __len__(self) -> int:
        return len(self._rooms)

    def get(self, room: str) -> Position | None:
        """The position held for ``room``, or None."""
        return self._rooms.get(room)

    def snapshot(self) -> dict[str, Position]:
        """A copy: room -> position, least recently updated first."""
        return dict(self._rooms)

    def set(self, room: str, position: Position) -> None:
        """Hold ``position`` for ``room`` (the server said so: joined, lost)."""
        if not _declarable(room):
            return
        self._rooms[room] = position
        self._rooms.move_to_end(room)
        while len(self._rooms) > self._max:
            self._rooms.popitem(last=False)

    def accept(self, room: str, position: Position) -> bool:
        """False for a duplicate (same epoch, offset not after the held one), else hold it."""
        held = self._rooms.get(room)
        if held is not None and held.epoch == position.epoch and position.offset <= held.offset:
            return False
        self.set(room, position)
        return True

    def forget(self, room: str) -> None:
        """Drop ``room``'s position (left, or a room without history)."""
        self._rooms.pop(room, None)

    def since(self, max_length: int) -> str | None:
        """The JSON to declare, most recent rooms first, within ``max_length`` encoded
        characters (percent-encoded, as it travels); None when nothing is held."""
        budget = max_length - len(quote("{}", safe=""))
        parts: list[str] = []
        for room, (epoch, offset) in reversed(self._rooms.items()):
            part = f"{json.dumps(room, ensure_ascii=False)}:[{json.dumps(epoch)},{offset}]"
            cost = len(quote(part, safe="")) + (len(quote(",", safe="")) if parts else 0)
            if cost > budget:
                continue
            budget -= cost
            parts.append(part)
        if not parts:
            return None
        return "{" + ",".join(reversed(parts)) + "}"


# ---------------------------------------------------------------------------- reconnecting


CloseAction = Literal["final", "refresh", "retry"]


def close_action(code: int | None, *, can_refresh: bool) -> CloseAction:
    """What the protocol says to do after a connection ended with ``code``.

    ``final``: do not reconnect (1000, 1002, 1003, 1007-1010, 4000-4499);
    ``refresh``: 4001 (token expired) with a refresh hook: get a new URL, reconnect;
    ``retry``: reconnect (1001 promptly, the rest with backoff).
    """
    if code == _TOKEN_EXPIRED and can_refresh:
        return "refresh"
    if code is not None and (code in _FINAL_CODES or 4000 <= code <= 4499):
        return "final"
    return "retry"


class Backoff:
    """Capped exponential backoff with full jitter; 1001 after a stable connection is
    prompt (``0..going_away_delay``) so that a drained node's clients spread out.

    ``attempt`` counts reconnects since the last connection that stayed open at least
    ``stable_after`` seconds after its welcome; ``stable()`` resets it.
    """

    def __init__(self, *, initial_delay: float = 0.5, max_delay: float = 30.0,
                 factor: float = 2.0, going_away_delay: float = 1.0,
                 random: Callable[[], float] = _random.random) -> None:
        for name, value in (("initial_delay", initial_delay), ("max_delay", max_delay),
                            ("factor", factor), ("going_away_delay", going_away_delay)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
                raise TypeError(f"{name} must be a number of seconds, got {value!r}")
        if initial_delay <= 0:
            raise ValueError(f"initial_delay must be > 0, got {initial_delay!r}")
        if max_delay < initial_delay:
            raise ValueError(f"max_delay ({max_delay!r}) must be >= initial_delay "
                             f"({initial_delay!r})")
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor!r}")
        if going_away_delay < 0:
            raise ValueError(f"going_away_delay must be >= 0, got {going_away_delay!r}")
        self.initial_delay, self.max_delay, self.factor = initial_delay, max_delay, factor
        self.going_away_delay = going_away_delay
        self._random = random
        self.attempt = 0

    def ceiling(self, attempt: int) -> float:
        """The largest delay of reconnect number ``attempt`` (1-based), capped."""
        exponent = min(attempt - 1, _MAX_EXPONENT)
        return float(min(self.max_delay, self.initial_delay * self.factor**exponent))

    def next(self, code: int | None) -> tuple[int, float]:
        """Count one more reconnect; its (attempt, delay) after a close with ``code``."""
        self.attempt += 1
        if code == _GOING_AWAY and self.attempt == 1:
            ceiling = self.going_away_delay
        else:
            ceiling = self.ceiling(self.attempt)
        return self.attempt, self._random() * ceiling

    def stable(self) -> None:
        """A connection stayed up: the next reconnect starts from the initial delay."""
        self.attempt = 0


# ---------------------------------------------------------------------------- the client


class _Crash:
    """Queue entry: the client's loop failed; iteration raises it."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


Refresh = Callable[[], Awaitable["str | URL | None"]]


class Client:
    """A roomcast.v1 connection that reconnects and resumes until closed.

    ``url`` is the application's route with its own query (``ws://`` or ``http://``).
    Delays are in seconds. ``positions`` seeds the position book (e.g. saved from an
    earlier run). ``refresh`` is awaited after a 4001 close (token expired) and after a
    401/403 on a reconnect; it returns the URL to use (absolute, or relative to the
    current one: ``"?token=new"`` replaces the query), or None to give up.
    ``random`` and ``session`` are injectable for tests and for sharing a pool.
    """

    def __init__(
        self,
        url: str | URL,
        *,
        initial_delay: float = 0.5,
        max_delay: float = 30.0,
        factor: float = 2.0,
        going_away_delay: float = 1.0,
        stable_after: float = 5.0,
        connect_timeout: float = 10.0,
        close_timeout: float = 2.0,
        heartbeat: float | None = 20.0,
        max_queue: int = 1000,
        max_rooms: int = MAX_DECLARED_ROOMS,
        max_since_length: int = 4096,
        max_msg_size: int = 4 * 1024 * 1024,
        positions: Mapping[str, tuple[str, int]] | None = None,
        refresh: Refresh | None = None,
        headers: Mapping[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self._url = URL(url)
        if self._url.scheme not in ("ws", "wss", "http", "https"):
            raise ValueError(f"url must be ws://, wss://, http:// or https://, got {url!s}")
        for name, value in (("stable_after", stable_after), ("connect_timeout", connect_timeout),
                            ("close_timeout", close_timeout)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if heartbeat is not None and not heartbeat > 0:
            raise ValueError(f"heartbeat must be positive seconds or None, got {heartbeat!r}")
        for name, count in (("max_queue", max_queue), ("max_since_length", max_since_length),
                            ("max_msg_size", max_msg_size)):
            if type(count) is not int or count < 1:
                raise ValueError(f"{name} must be a positive int, got {count!r}")
        self._backoff = Backoff(initial_delay=initial_delay, max_delay=max_delay,
                                factor=factor, going_away_delay=going_away_delay, random=random)
        self._positions = PositionBook(max_rooms, positions)
        self._stable_after = stable_after
        self._connect_timeout = connect_timeout
        self._close_timeout = close_timeout
        self._heartbeat = heartbeat
        self._max_queue = max_queue
        self._max_since_length = max_since_length
        self._max_msg_size = max_msg_size
        self._refresh = refresh
        self._headers = dict(headers or {})
        self._session = session
        self._own_session = session is None

        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._events: asyncio.Queue[Event | _Crash] = asyncio.Queue()
        self._space = asyncio.Event()
        self._space.set()
        self._state: Literal["idle", "open", "reconnecting", "closed"] = "idle"
        self._welcomed_at: float | None = None
        self._opens = 0
        self._close_code, self._close_reason = 1000, ""
        self._ended = False  # the terminal event (Closed or a crash) is queued
        self._exhausted = False  # ... and the iterator has handed it out
        self.node: str | None = None
        """The node the current (or last) connection is on, from its welcome."""
        self.connection_id: str | None = None
        """The current (or last) connection's id, what the server's send_to takes."""
        self.duplicates = 0
        """Messages dropped as duplicates (position not after the one held)."""

    # -- public state

    @property
    def url(self) -> URL:
        """The application's URL (a connection adds ``roomcast.since`` and, on a
        reconnect, ``roomcast.previous``)."""
        return self._url

    @property
    def positions(self) -> dict[str, Position]:
        """A copy of the last position per room, the ones a reconnect declares."""
        return self._positions.snapshot()

    @property
    def state(self) -> Literal["idle", "open", "reconnecting", "closed"]:
        """``idle`` before connect, ``open``, ``reconnecting``, or ``closed`` for good."""
        return self._state

    @property
    def connected(self) -> bool:
        """True while a connection is open (``send`` works)."""
        return self._state == "open" and self._ws is not None and not self._ws.closed

    def forget(self, room: str) -> None:
        """Stop declaring a position for ``room`` (the application left it)."""
        self._positions.forget(room)

    # -- lifecycle

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the first connection and wait for its welcome (``connect_timeout``).

        Raises ``ConnectError`` (``SubprotocolError``) if it fails: a wrong URL or a
        server without roomcast.v1 shows at once. Later failures are retried.
        """
        if self._state != "idle":
            raise ClientError(f"connect() on a client that is {self._state}; "
                              f"make a new Client")
        loop = asyncio.get_running_loop()
        if self._session is None:
            self._session = aiohttp.ClientSession()
        self._ready = loop.create_future()
        self._state = "reconnecting"
        try:
            async with asyncio.timeout(self._connect_timeout):
                try:
                    ws = await self._handshake()
                except _Refused as exc:
                    raise ConnectError(str(exc), status=exc.status) from None
                except (aiohttp.ClientError, OSError) as exc:
                    raise ConnectError(f"cannot connect to {self._url}: {exc}") from exc
                self._state = "open"
                self._task = loop.create_task(self._run(ws), name=f"roomcast client {self._url}")
                self._task.add_done_callback(self._task_done)
                await asyncio.shield(self._ready)
        except TimeoutError:
            await self._shutdown()
            message = f"no welcome from {self._url} within {self._connect_timeout} s"
            self._finish(Closed(None, message))
            raise ConnectError(message) from None
        except BaseException as exc:
            await self._shutdown()
            # Anyone iterating this client later sees it ended, rather than waiting.
            self._finish(Closed(None, str(exc), status=getattr(exc, "status", None)))
            raise

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close for good (1000 by default) and wait until the socket and task are gone.

        Idempotent. The iterator hands out what was already queued, then a ``Closed``
        with ``by_client=True``, then stops.
        """
        if not (code == 1000 or 3000 <= code <= 4999):
            raise ValueError(f"a client may close with 1000 or 3000-4999, not {code}")
        if self._state == "closed":
            await self._shutdown()
            return
        self._close_code, self._close_reason = code, reason
        self._state = "closed"
        await self._shutdown()
        self._finish(Closed(code, reason, by_client=True))

    async def _shutdown(self) -> None:
        """Stop the loop task, close the socket (it says goodbye), close our session."""
        self._state = "closed"
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})
        ws, self._ws = self._ws, None
        if ws is not None and not ws.closed:
            await self._close_ws(ws, self._close_code, self._close_reason)
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
        if self._own_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A loop that failed (a bug) ends the iteration with its exception, not a hang."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._state = "closed"
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(exc)
            self._finish(_Crash(exc))

    async def _close_ws(self, ws: aiohttp.ClientWebSocketResponse, code: int,
                        reason: str) -> None:
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with asyncio.timeout(self._close_timeout):
                await ws.close(code=code, message=reason.encode())

    # -- sending

    async def send(self, data: str | bytes | bytearray | memoryview) -> None:
        """Send one application message (text for ``str``, binary for bytes).

        Raises ``NotConnected`` while reconnecting or once closed; nothing is queued, so
        nothing is sent late. A send that returned can still be lost if the connection
        drops before the server read it (at most once, like any WebSocket send).
        """
        if not isinstance(data, str | bytes | bytearray | memoryview):
            raise TypeError(f"send() takes str or bytes, not {type(data).__name__}")
        ws = self._ws
        if ws is None or ws.closed or self._state != "open":
            raise NotConnected(f"not connected ({self._state}); wait for the next Open event")
        try:
            if isinstance(data, str):
                await ws.send_str(data)
            else:
                await ws.send_bytes(bytes(data))
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            raise NotConnected(f"the connection dropped while sending: {exc}") from exc

    # -- receiving

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Event:
        if self._exhausted:
            raise StopAsyncIteration
        item = await self._events.get()
        if self._events.qsize() < self._max_queue:
            self._space.set()
        if isinstance(item, _Crash):
            self._exhausted = True
            raise ClientError(f"the client's loop failed: {item.exc!r}") from item.exc
        if isinstance(item, Closed):
            self._exhausted = True
        return item

    # A default bound is the point of these helpers (tests and tools must not hang), so
    # they take ``timeout`` rather than leaving it to the caller's asyncio.timeout.
    async def next_event(self, timeout: float = 10.0) -> Event:  # noqa: ASYNC109
        """The next event; ``TimeoutError`` after ``timeout`` s, ``ClientError`` at the end."""
        async with asyncio.timeout(timeout):
            try:
                return await self.__anext__()
            except StopAsyncIteration:
                raise ClientError("the client is closed: no more events") from None

    async def wait_for(self, kind: type[_E], *, room: str | None = None,
                       timeout: float = 10.0) -> _E:  # noqa: ASYNC109
        """Skip events until one of ``kind`` (in ``room`` if given); bounded by ``timeout``.

        The events skipped are gone. A ``Closed`` before the match raises ``ClientError``.
        """
        async with asyncio.timeout(timeout):
            while True:
                try:
                    event = await self.__anext__()
                except StopAsyncIteration:
                    raise ClientError(f"closed before a {kind.__name__} came") from None
                if isinstance(event, kind) and (room is None or getattr(event, "room", None)
                                                == room):
                    return event
                if isinstance(event, Closed):
                    raise ClientError(f"closed before a {kind.__name__} came: code "
                                      f"{event.code}, {event.reason!r}")

    async def next_message(self, timeout: float = 10.0) -> Message:  # noqa: ASYNC109
        """The next ``Message``, skipping other events; bounded by ``timeout``."""
        return await self.wait_for(Message, timeout=timeout)

    # -- the loop

    async def _emit(self, event: Event) -> None:
        """Queue an event for the iterator; wait while ``max_queue`` events wait."""
        while self._events.qsize() >= self._max_queue:
            self._space.clear()
            await self._space.wait()
        self._events.put_nowait(event)

    def _finish(self, item: Closed | _Crash) -> None:
        """Queue the terminal entry once (beyond the bound: it must not be lost)."""
        if not self._ended:
            self._ended = True
            self._events.put_nowait(item)

    def _connect_url(self) -> URL:
        """The application's URL with the positions to declare (``roomcast.since``) and,
        on a reconnect, the id of the connection they come from (``roomcast.previous``):
        what the server sent "to the room except that connection" is then not replayed
        to it. Stale values of either in the application's URL are replaced."""
        url = self._url.without_query_params(SINCE_PARAM, PREVIOUS_PARAM)
        since = self._positions.since(self._max_since_length)
        if since is not None:
            url = url.update_query({SINCE_PARAM: since})
        if self.connection_id is not None:
            url = url.update_query({PREVIOUS_PARAM: self.connection_id})
        return url

    async def _handshake(self) -> aiohttp.ClientWebSocketResponse:
        """One upgrade, checked: roomcast.v1 or ``SubprotocolError``; a refusal raises
        ``_Refused``; network failures raise aiohttp's or OSError."""
        assert self._session is not None
        try:
            ws = await self._session.ws_connect(
                self._connect_url(), protocols=(PROTOCOL,), headers=self._headers,
                heartbeat=self._heartbeat, max_msg_size=self._max_msg_size, autoclose=True,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=self._close_timeout),
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 101:  # upgraded, but not as RFC 6455 wants
                raise
            raise _Refused(exc.status, f"{self._url} refused the upgrade: HTTP {exc.status} "
                                       f"{exc.message}") from None
        if ws.protocol != PROTOCOL:
            await self._close_ws(ws, 1000, f"{PROTOCOL} required")
            raise SubprotocolError(
                f"server does not speak {PROTOCOL}: {self._url} answered without the "
                f"subprotocol (a route that is not a roomcast.v1 endpoint, or an older node)")
        self._ws = ws
        return ws

    async def _run(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Read until the connection ends, then reconnect, until closed for good."""
        try:
            while True:
                code, reason = await self._read(ws)
                self._ws = None
                if self._state == "closed":
                    return
                self._state = "reconnecting"
                if (self._welcomed_at is not None
                        and asyncio.get_running_loop().time() - self._welcomed_at
                        >= self._stable_after):
                    self._backoff.stable()
                self._welcomed_at = None
                next_ws = await self._reconnect(code, reason)
                if next_ws is None:
                    return
                ws = next_ws
                self._state = "open"
        finally:
            if self._ws is not None and not self._ws.closed:
                await self._close_ws(self._ws, self._close_code, self._close_reason)
            self._ws = None

    async def _reconnect(self, code: int | None,
                         reason: str) -> aiohttp.ClientWebSocketResponse | None:
        """Wait and retry until a connection opens (returned) or it is final (None)."""
        status: int | None = None
        while True:
            action = close_action(code, can_refresh=self._refresh is not None)
            if status is not None and status in _AUTH_STATUSES and self._refresh is not None:
                action = "refresh"
            elif status is not None:
                action = "retry" if status in _RETRY_STATUSES or status >= 500 else "final"
            if action == "final":
                self._give_up(Closed(code, reason, status=status))
                return None
            if action == "refresh" and not await self._refresh_url():
                self._give_up(Closed(code, reason, status=status))
                return None
            attempt, delay = self._backoff.next(code)
            await self._emit(Reconnecting(attempt, delay, code, reason))
            await asyncio.sleep(delay)
            code, status = _ABNORMAL, None
            try:
                return await self._handshake()
            except _Refused as exc:
                code, status, reason = None, exc.status, str(exc)
                await self._emit(Error("handshake", reason, source="client"))
            except SubprotocolError as exc:
                reason = str(exc)
                await self._emit(Error("subprotocol", reason, source="client"))
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                reason = f"cannot connect: {exc!r}"

    async def _refresh_url(self) -> bool:
        """Ask the refresh hook for a new URL; False when it gave up (returned None)."""
        assert self._refresh is not None
        try:
            new = await self._refresh()
        except Exception as exc:  # the app's hook: report, keep the old URL, back off
            await self._emit(Error("refresh", f"refresh hook failed: {exc!r}", source="client"))
            return True
        if new is None:
            return False
        url = self._url.join(URL(new))
        if url.scheme not in ("ws", "wss", "http", "https"):
            await self._emit(Error("refresh", f"refresh hook gave a bad URL: {new!s}",
                                   source="client"))
            return True
        self._url = url
        return True

    def _give_up(self, closed: Closed) -> None:
        self._state = "closed"
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ConnectError(
                f"closed before the welcome: code {closed.code}, {closed.reason!r}",
                status=closed.status))
        self._finish(closed)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
        """Hand every frame's events on until the connection ends; its (code, reason).

        Only a close frame tells the code: an EOF or a reset without one is 1006, even
        where aiohttp records 1000 for it.
        """
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                events = parse_text(msg.data)
            elif msg.type is aiohttp.WSMsgType.BINARY:
                events = parse_binary(msg.data)
            elif msg.type is aiohttp.WSMsgType.CLOSE:
                code = msg.data or _NO_STATUS
                return code, msg.extra or ""
            elif msg.type is aiohttp.WSMsgType.ERROR:
                await self._emit(Error("receive", f"the connection failed: {msg.data!r}",
                                       source="client"))
                return _ABNORMAL, str(msg.data)
            else:  # CLOSED, CLOSING: the socket went away without a close frame
                return _ABNORMAL, "connection lost"
            for event in events:
                await self._handle(event)

    async def _handle(self, event: Event) -> None:
        """Keep the position book, drop duplicates, pass the rest on."""
        book = self._positions
        if isinstance(event, Message):
            if event.position is not None and event.room is not None:
                if not _declarable(event.room):
                    pass  # cannot be declared: delivered, not tracked
                elif not book.accept(event.room, event.position):
                    self.duplicates += 1
                    return
        elif isinstance(event, Open):
            self.node, self.connection_id = event.node, event.connection
            self._welcomed_at = asyncio.get_running_loop().time()
            self._opens += 1
            event = Open(event.node, event.connection, reconnect=self._opens > 1)
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        elif isinstance(event, Joined):
            if event.position is None:
                book.forget(event.room)
            else:
                book.set(event.room, event.position)
        elif isinstance(event, Left):
            book.forget(event.room)
        elif isinstance(event, Lost):
            book.set(event.room, event.position)
        await self._emit(event)


class _Refused(Exception):
    """Internal: the server answered the upgrade with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
