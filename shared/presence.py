"""Presence with people: who is in a room (connection, user id, info), and the events
``join`` and ``leave``.

A node stores, with each presence entry of a connection that has a user id, the user's
id and info (``encode_info``: msgpack ``[user_id, info]``), so that any node or
``Publisher`` can list a room's members with their names. Join and leave events travel
as envelopes of kind ``Kind.PRESENCE`` on the room's channel (payload ``encode_event``:
msgpack ``[joined, connection, info bytes]``), so every node with members in the room
hears them; the node of the connection raises its own at once. When a node dies, the
peer whose heartbeat removes its presence (within the presence TTL) raises and publishes
a ``leave`` for each of its entries.

Delivery is at most once: an event published while a node's link to Redis is down is
lost to that node (``room_presence`` then says who is there).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from roomcast.shared.ids import ConnectionId, node_of


@dataclass(frozen=True, slots=True)
class Presence:
    """One member of a room: its connection, its user id (None: anonymous) and info."""

    connection: ConnectionId
    user_id: str | None
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """A connection joined or left ``room`` (on any node)."""

    kind: Literal["join", "leave"]
    room: str
    connection: ConnectionId
    user_id: str | None
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def presence(self) -> Presence:
        """The member the event is about."""
        return Presence(self.connection, self.user_id, self.info)


PresenceCallback = Callable[[PresenceEvent], "Awaitable[None] | None"]
"""``callback(event)``, a plain function or a coroutine function."""


def encode_info(user_id: str | None, info: Mapping[str, Any]) -> bytes:
    """The stored form of a connection's user: b"" for an anonymous one without info.
    Values msgpack cannot carry are stored as their ``str``."""
    if user_id is None and not info:
        return b""
    data: bytes = msgpack.packb([user_id, dict(info)], use_bin_type=True, default=str)
    return data


def decode_info(connection: ConnectionId, data: bytes) -> Presence:
    """The ``Presence`` of ``connection`` from its stored info; ValueError if malformed."""
    if not data:
        return Presence(connection, None, {})
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ValueError(f"presence info is not msgpack: {exc.__class__.__name__}") from None
    if (not isinstance(obj, list) or len(obj) != 2
            or not (obj[0] is None or isinstance(obj[0], str)) or not isinstance(obj[1], dict)):
        raise ValueError("presence info must be a msgpack array [user id, info map]")
    return Presence(connection, obj[0], obj[1])


def encode_event(joined: bool, connection: ConnectionId, info: bytes) -> bytes:
    """The payload of a ``Kind.PRESENCE`` envelope."""
    data: bytes = msgpack.packb([joined, connection, info], use_bin_type=True)
    return data


def decode_event(room: str, payload: bytes) -> PresenceEvent:
    """The event in a ``Kind.PRESENCE`` payload; ValueError if malformed."""
    try:
        obj = msgpack.unpackb(payload, raw=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ValueError(f"presence event is not msgpack: {exc.__class__.__name__}") from None
    if (not isinstance(obj, list) or len(obj) != 3 or not isinstance(obj[0], bool)
            or not isinstance(obj[1], str) or not isinstance(obj[2], bytes)):
        raise ValueError("presence event must be a msgpack array [joined, connection, info]")
    connection = ConnectionId(obj[1])
    node_of(connection)
    who = decode_info(connection, obj[2])
    return PresenceEvent("join" if obj[0] else "leave", room, connection, who.user_id,
                         who.info)
