"""The ``roomcast.v1`` client protocol on the node side: negotiation, upgrade parameters,
and the frames the server sends (docs/protocol.md).

Plain code, no I/O. ``offers_v1`` reads the client's ``Sec-WebSocket-Protocol``;
``parse_upgrade_params`` reads ``roomcast.since`` and ``roomcast.previous`` from the
query and raises ``ValueError`` with the text of the HTTP 400 for a malformed value.
The frame builders return ``PreparedMessage`` objects, so a frame made once can be
queued for many members (and compressed once per window size):

- text ``message``: ``{"type":"message","room":...,"epoch":...,"offset":...,"data":"..."}``;
- binary ``message``: the same header without ``data``, compact JSON (no raw newline:
  JSON escapes newlines in strings), one 0x0A byte, then the message's bytes;
- ``welcome``, ``joined``, ``left``, ``lost`` and ``error`` as text frames.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

from roomcast.shared.envelope import EPOCH_RE, MAX_OFFSET
from roomcast.shared.frames import PreparedMessage
from roomcast.shared.history import Position
from roomcast.shared.ids import ConnectionId, Room, node_of, validate_room

__all__ = [
    "MAX_DECLARED_ROOMS",
    "MAX_SINCE_LENGTH",
    "PREVIOUS_PARAM",
    "PROTOCOL",
    "SINCE_PARAM",
    "UpgradeParams",
    "error_frame",
    "joined_frame",
    "left_frame",
    "lost_frame",
    "message_frame",
    "offers_v1",
    "parse_since",
    "parse_upgrade_params",
    "welcome_frame",
]

PROTOCOL: Final = "roomcast.v1"
"""The subprotocol a client offers to get framed messages, positions and recovery."""
SINCE_PARAM: Final = "roomcast.since"
"""Query parameter: JSON object room -> [epoch, offset], the last positions seen."""
PREVIOUS_PARAM: Final = "roomcast.previous"
"""Query parameter: the id of the connection whose positions the client declares."""
MAX_DECLARED_ROOMS: Final = 100
MAX_SINCE_LENGTH: Final = 4096
"""Characters of ``roomcast.since`` once percent-encoded (as ``quote(value, safe="")``)."""

_COMPACT: Final = (",", ":")


def offers_v1(values: list[str] | tuple[str, ...]) -> bool:
    """Whether the ``Sec-WebSocket-Protocol`` header values offer ``roomcast.v1``.

    Subprotocol names are case-sensitive tokens (RFC 6455 section 4.1); the header may
    be sent more than once and lists names separated by commas.
    """
    return any(token.strip() == PROTOCOL for value in values for token in value.split(","))


@dataclass(frozen=True, slots=True)
class UpgradeParams:
    """What a ``roomcast.v1`` upgrade request declared: positions and previous id."""

    since: Mapping[Room, Position] = field(default_factory=dict)
    previous: ConnectionId | None = None


def parse_since(value: str) -> dict[Room, Position]:
    """``roomcast.since`` as positions by room; ValueError with what is wrong.

    Limits (docs/protocol.md): at most 100 rooms and 4096 characters once
    percent-encoded; a room name of 1-200 code points; an epoch of 1-32 characters of
    ``[0-9A-Za-z_-]``; an offset an integer from 0 to 2^53-1.
    """
    encoded = len(quote(value, safe=""))
    if encoded > MAX_SINCE_LENGTH:
        raise ValueError(f"{SINCE_PARAM} is {encoded} characters percent-encoded, at most "
                         f"{MAX_SINCE_LENGTH}: declare only the most recently used rooms")
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise ValueError(f"{SINCE_PARAM} is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{SINCE_PARAM} must be a JSON object from room name to "
                         f"[epoch, offset], got {type(parsed).__name__}")
    if len(parsed) > MAX_DECLARED_ROOMS:
        raise ValueError(f"{SINCE_PARAM} declares {len(parsed)} rooms, at most "
                         f"{MAX_DECLARED_ROOMS}")
    out: dict[Room, Position] = {}
    for name, position in parsed.items():
        try:
            room = validate_room(name)
        except ValueError as exc:
            raise ValueError(f"{SINCE_PARAM}: {exc}") from None
        if not isinstance(position, list) or len(position) != 2:
            raise ValueError(f"{SINCE_PARAM}: the position of room {_short(name)} must be "
                             f"[epoch, offset], got {_short(position)}")
        epoch, offset = position
        if not isinstance(epoch, str) or not EPOCH_RE.fullmatch(epoch):
            raise ValueError(f"{SINCE_PARAM}: the epoch of room {_short(name)} must be 1-32 "
                             f"characters of [0-9A-Za-z_-], got {_short(epoch)}")
        if type(offset) is not int or not 0 <= offset <= MAX_OFFSET:
            raise ValueError(f"{SINCE_PARAM}: the offset of room {_short(name)} must be an "
                             f"integer from 0 to 2^53-1, got {_short(offset)}")
        out[room] = Position(epoch, offset)
    return out


def parse_upgrade_params(query: Mapping[str, str], getall: Any = None) -> UpgradeParams:
    """``roomcast.since`` and ``roomcast.previous`` of a v1 upgrade request's query.

    ``getall(name)`` (a multidict's) lists repeated values: a parameter given twice is
    refused. ValueError carries the text of the HTTP 400.
    """
    for name in (SINCE_PARAM, PREVIOUS_PARAM):
        if getall is not None and len(getall(name, ())) > 1:
            raise ValueError(f"{name} is given more than once; send it once")
    since: dict[Room, Position] = {}
    raw_since = query.get(SINCE_PARAM)
    if raw_since is not None:
        since = parse_since(raw_since)
    previous: ConnectionId | None = None
    raw_previous = query.get(PREVIOUS_PARAM)
    if raw_previous is not None:
        try:
            node_of(raw_previous)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{PREVIOUS_PARAM} is not a connection id (the 'connection' "
                             f"of a welcome frame): {exc}") from None
        previous = ConnectionId(raw_previous)
    return UpgradeParams(since, previous)


def _short(value: object) -> str:
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- frames ------------------------------------------------------------------------------


def _text(obj: dict[str, Any]) -> PreparedMessage:
    return PreparedMessage(json.dumps(obj, separators=_COMPACT).encode(), binary=False)


def message_frame(
    payload: bytes, binary: bool, room: str | None = None,
    position: Position | tuple[str, int] | None = None,
) -> PreparedMessage:
    """A ``message`` frame for ``payload`` (UTF-8 text unless ``binary``).

    ``room`` None: a direct send or a broadcast to everyone. ``position`` only with a
    room (a room with history).
    """
    header: dict[str, Any] = {"type": "message"}
    if room is not None:
        header["room"] = room
        if isinstance(position, Position):
            header["epoch"], header["offset"] = position.epoch, position.offset
        elif position is not None:
            header["epoch"], header["offset"] = position
    if binary:
        head = json.dumps(header, separators=_COMPACT).encode()
        return PreparedMessage(head + b"\n" + payload, binary=True)
    header["data"] = payload.decode()
    return _text(header)


def welcome_frame(node: str, connection: str) -> PreparedMessage:
    """The first frame of every v1 connection."""
    return _text({"type": "welcome", "protocol": PROTOCOL, "node": node,
                  "connection": connection})


def joined_frame(
    room: str,
    position: Position | None = None,
    *,
    recovered: bool | None = None,
    reason: str | None = None,
    replayed: int = 0,
) -> PreparedMessage:
    """``joined``: without ``position`` for a room without history (or an unreadable
    one); ``recovered`` only when the client declared a position for the room."""
    obj: dict[str, Any] = {"type": "joined", "room": room}
    if position is not None:
        obj["epoch"] = position.epoch
        obj["offset"] = position.offset
    if recovered is not None:
        obj["recovered"] = recovered
        if not recovered and reason is not None:
            obj["reason"] = reason
    if position is not None or recovered is not None:
        obj["replayed"] = replayed
    return _text(obj)


def left_frame(room: str) -> PreparedMessage:
    """``left``: the server removed the connection from ``room``."""
    return _text({"type": "left", "room": room})


def lost_frame(room: str, position: Position, reason: str) -> PreparedMessage:
    """``lost``: messages of ``room`` before ``position`` cannot be delivered; the next
    message has ``position.offset + 1`` in ``position.epoch``."""
    return _text({"type": "lost", "room": room, "epoch": position.epoch,
                  "offset": position.offset, "reason": reason})


def error_frame(code: str, message: str, room: str | None = None) -> PreparedMessage:
    """``error``: a request of the application concerning this connection was refused
    (``code`` such as ``"forbidden"`` or ``"rate_limited"``); the connection stays open.

    Send it with ``conn.send_prepared(error_frame(...))`` on a v1 connection
    (``conn.v1``); raw connections have no such frame.
    """
    if not isinstance(code, str) or not code:
        raise ValueError("an error frame needs a non-empty str code")
    if not isinstance(message, str):
        raise TypeError(f"error message must be a str, got {type(message).__name__}")
    obj: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if room is not None:
        obj["room"] = room
    return _text(obj)

