"""Identifiers: node ids, connection ids that name their node, and room names.

A connection id is ``<node id>.<sequence in hex>``, so a send to one connection goes
straight to the owning node's channel with no lookup.
"""

from __future__ import annotations

import re
import secrets
from typing import Final, NewType

NodeId = NewType("NodeId", str)
ConnectionId = NewType("ConnectionId", str)
Room = NewType("Room", str)

MAX_ROOM_LENGTH: Final = 200
_NODE_ALPHABET: Final = frozenset("0123456789abcdefghijklmnopqrstuvwxyz")
_HEX: Final = frozenset("0123456789abcdef")


def new_node_id() -> NodeId:
    """A random node id: 12 lowercase hex characters (48 bits)."""
    return NodeId(secrets.token_hex(6))


def validate_node_id(value: str) -> NodeId:
    """Return ``value`` as a NodeId, or raise ValueError naming what is wrong."""
    if not isinstance(value, str):
        raise TypeError(f"node id must be a str, got {type(value).__name__}")
    if not 1 <= len(value) <= 64 or not set(value) <= _NODE_ALPHABET:
        raise ValueError(f"node id {value!r} must be 1-64 characters of [0-9a-z]")
    return NodeId(value)


def make_connection_id(node: NodeId, sequence: int) -> ConnectionId:
    """The id of the ``sequence``-th connection on ``node``."""
    return ConnectionId(f"{node}.{sequence:x}")


def node_of(connection_id: str) -> NodeId:
    """The node that owns ``connection_id``; ValueError if it is not a connection id."""
    if not isinstance(connection_id, str):
        raise TypeError(f"connection id must be a str, got {type(connection_id).__name__}")
    node, sep, seq = connection_id.rpartition(".")
    if not sep or not seq or not set(seq) <= _HEX or len(seq) > 16:
        raise ValueError(f"{connection_id!r} is not a roomcast connection id (node.hex)")
    return validate_node_id(node)


def validate_room(room: object) -> Room:
    """Return ``room`` as a Room, or raise TypeError/ValueError saying what is wrong."""
    if not isinstance(room, str):
        raise TypeError(f"room name must be a str, got {type(room).__name__}")
    if not 1 <= len(room) <= MAX_ROOM_LENGTH:
        raise ValueError(f"room name must be 1-{MAX_ROOM_LENGTH} characters, got {len(room)}")
    if _CONTROL.search(room) is not None:
        raise ValueError(f"room name {room!r} contains control characters")
    if not room.isascii():
        try:
            room.encode()  # channel names and envelopes carry it as UTF-8
        except UnicodeEncodeError:
            raise ValueError(f"room name {room!r} is not valid Unicode (lone surrogate)"
                             ) from None
    return Room(room)


_CONTROL: Final = re.compile("[\x00-\x1f\x7f]")
"""What a room name may not contain (checked for every envelope a node receives)."""
