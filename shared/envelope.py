"""The msgpack envelope that carries a broadcast or a targeted send between nodes.

Wire form: a msgpack array ``[version, kind, origin, target, exclude, binary, payload,
sent_at]``. Decoding validates every field; anything else raises EnvelopeError, so
garbage on a channel is dropped whole and never half-delivered.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final

import msgpack

from roomcast.shared.errors import EnvelopeError
from roomcast.shared.ids import ConnectionId, NodeId, node_of, validate_node_id, validate_room

ENVELOPE_VERSION: Final = 1
_FIELDS: Final = 8


class Kind(IntEnum):
    """What an envelope is addressed to."""

    ROOM = 1
    """Every member of the room ``target``."""
    CONNECTION = 2
    """The one connection ``target``."""
    ALL = 3
    """Every connection of every node; ``target`` is empty."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message on its way between nodes.

    ``origin`` is the publishing node ("" for an external publisher), ``exclude`` a
    connection id not to deliver to ("" for none), ``sent_at`` the publisher's
    ``time.time()`` (for latency metrics).
    """

    kind: Kind
    target: str
    payload: bytes
    binary: bool
    origin: str = ""
    exclude: str = ""
    sent_at: float = 0.0

    def __post_init__(self) -> None:
        _validate(self)


def _validate(env: Envelope) -> None:
    if not isinstance(env.kind, Kind):
        raise EnvelopeError(f"unknown envelope kind {env.kind!r}")
    if not isinstance(env.payload, bytes):
        raise EnvelopeError("envelope payload must be bytes")
    if not isinstance(env.binary, bool):
        raise EnvelopeError("envelope binary flag must be a bool")
    for name in ("target", "origin", "exclude"):
        if not isinstance(getattr(env, name), str):
            raise EnvelopeError(f"envelope {name} must be a str")
    if not isinstance(env.sent_at, float | int) or isinstance(env.sent_at, bool):
        raise EnvelopeError("envelope sent_at must be a number")
    try:
        if env.kind is Kind.ROOM:
            validate_room(env.target)
        elif env.kind is Kind.CONNECTION:
            node_of(env.target)
        elif env.target:
            raise EnvelopeError("a broadcast to everyone has no target")
        if env.origin:
            validate_node_id(env.origin)
        if env.exclude:
            node_of(env.exclude)
    except (TypeError, ValueError) as exc:
        raise EnvelopeError(str(exc)) from None
    if not env.binary:
        try:
            env.payload.decode()
        except UnicodeDecodeError:
            raise EnvelopeError("text envelope payload is not UTF-8") from None


def encode(env: Envelope) -> bytes:
    """The msgpack bytes of ``env``."""
    data: bytes = msgpack.packb(
        [
            ENVELOPE_VERSION,
            int(env.kind),
            env.origin,
            env.target,
            env.exclude,
            env.binary,
            env.payload,
            float(env.sent_at),
        ],
        use_bin_type=True,
    )
    return data


def decode(data: bytes) -> Envelope:
    """Parse and validate envelope bytes; EnvelopeError says what is wrong."""
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise EnvelopeError(f"not msgpack: {exc.__class__.__name__}") from None
    if not isinstance(obj, list) or len(obj) != _FIELDS:
        raise EnvelopeError(f"envelope must be a msgpack array of {_FIELDS} items")
    version, kind, origin, target, exclude, binary, payload, sent_at = obj
    if type(version) is not int or version != ENVELOPE_VERSION:
        raise EnvelopeError(f"unsupported envelope version {version!r}")
    # An exact int check first: a list or map here is unhashable (TypeError on lookup).
    if type(kind) is not int or kind not in Kind._value2member_map_:
        raise EnvelopeError(f"unknown envelope kind {kind!r}")
    return Envelope(
        kind=Kind(kind),
        target=target,
        payload=payload,
        binary=binary,
        origin=origin,
        exclude=exclude,
        sent_at=sent_at,
    )


def room_envelope(
    room: str, payload: bytes, *, binary: bool, origin: NodeId | str = "",
    exclude: ConnectionId | str = "", sent_at: float = 0.0,
) -> Envelope:
    """An envelope for every member of ``room``."""
    return Envelope(Kind.ROOM, room, payload, binary, origin, exclude, sent_at)
