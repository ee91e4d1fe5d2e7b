"""Users across the cluster: the internal room of each user, and the disconnect order.

Every connection that has a user id (``conn.user_id``, from ``node.auth``) is also a
member of its user's internal room, so that reaching a user on every node reuses what
rooms do: presence (swept with a dead node), channels and cross-node delivery. The room
of user ``u`` is ``USER_ROOM_PREFIX + u`` (or, for an id that is no valid room name
there, the prefix, ``~`` and the SHA-256 of the id). Applications cannot join, leave or
broadcast to rooms with the prefix (ValueError); those rooms are not in
``Hub.local_rooms`` or the room metrics.

``send_to_user`` travels as a room envelope to the user's room; ``disconnect_user`` as
an envelope of kind ``Kind.DISCONNECT`` whose payload is ``encode_disconnect(code,
reason)`` (msgpack ``[code, reason]``, checked on decode). Nodes of earlier releases
never subscribe to users' rooms, and would drop the unknown kind as garbage.
"""

from __future__ import annotations

import hashlib
from typing import Final

import msgpack

from roomcast.shared.ids import MAX_ROOM_LENGTH, Room, validate_room
from roomcast.shared.rfc6455 import is_sendable_close_code

USER_ROOM_PREFIX: Final = "roomcast:user:"
"""Rooms whose name starts with this are users' internal rooms (reserved)."""
MAX_REASON_BYTES: Final = 123
"""The longest close reason a close frame carries (RFC 6455: 125 bytes with the code)."""
_HASHED: Final = "~"


def is_user_room(room: str) -> bool:
    """True if ``room`` is a user's internal room (the reserved prefix)."""
    return room.startswith(USER_ROOM_PREFIX)


def validate_user_id(user_id: object) -> str:
    """``user_id`` if it is a non-empty str; TypeError/ValueError otherwise."""
    if not isinstance(user_id, str):
        raise TypeError(f"user id must be a str, got {type(user_id).__name__}")
    if not user_id:
        raise ValueError("user id must not be empty")
    return user_id


def user_room(user_id: str) -> Room:
    """The internal room of ``user_id`` (the same on every node and in ``Publisher``)."""
    validate_user_id(user_id)
    name = USER_ROOM_PREFIX + user_id
    if not user_id.startswith(_HASHED) and len(name) <= MAX_ROOM_LENGTH:
        try:
            return validate_room(name)
        except ValueError:
            pass  # control characters or a lone surrogate: hashed below
    digest = hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()
    return Room(USER_ROOM_PREFIX + _HASHED + digest)


def check_not_user_room(room: Room) -> Room:
    """``room`` unless it is a user's internal room (ValueError saying what to use)."""
    if is_user_room(room):
        raise ValueError(
            f"room names starting with {USER_ROOM_PREFIX!r} are reserved for users' "
            "connections: reach a user with send_to_user, disconnect_user and "
            "user_connections")
    return room


def check_close(code: object, reason: object) -> tuple[int, str]:
    """``(code, reason)`` if a close frame may carry them; TypeError/ValueError otherwise."""
    if isinstance(code, bool) or not isinstance(code, int):
        raise TypeError(f"close code must be an int, got {type(code).__name__}")
    if not is_sendable_close_code(code):
        raise ValueError(f"close code {code} may not be sent: use 1000, 1001, 1008, "
                         "1011-1014 or an application code from 3000 to 4999")
    if not isinstance(reason, str):
        raise TypeError(f"close reason must be a str, got {type(reason).__name__}")
    try:
        size = len(reason.encode())
    except UnicodeEncodeError:
        raise ValueError("close reason is not valid Unicode (lone surrogate)") from None
    if size > MAX_REASON_BYTES:
        raise ValueError(f"close reason is {size} bytes in UTF-8; at most "
                         f"{MAX_REASON_BYTES} fit in a close frame")
    return code, reason


def encode_disconnect(code: int, reason: str) -> bytes:
    """The payload of a ``Kind.DISCONNECT`` envelope (checked first)."""
    code, reason = check_close(code, reason)
    data: bytes = msgpack.packb([code, reason], use_bin_type=True)
    return data


def decode_disconnect(payload: bytes) -> tuple[int, str]:
    """``(code, reason)`` from a ``Kind.DISCONNECT`` payload; ValueError if malformed."""
    try:
        obj = msgpack.unpackb(payload, raw=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ValueError(f"disconnect payload is not msgpack: {exc.__class__.__name__}"
                         ) from None
    if not isinstance(obj, list) or len(obj) != 2:
        raise ValueError("disconnect payload must be a msgpack array [code, reason]")
    try:
        return check_close(obj[0], obj[1])
    except TypeError as exc:
        raise ValueError(str(exc)) from None
