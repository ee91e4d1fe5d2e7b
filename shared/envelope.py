"""The msgpack envelope that carries a broadcast or a targeted send between nodes.

Kinds: a room, one connection, everyone, or a disconnect order for a user's connections
(``Kind.DISCONNECT``, see ``shared.users``).

Wire form: a msgpack array ``[version, kind, origin, target, exclude, binary, payload,
sent_at]`` (version 1), or, for a room message with a position in the room's history,
``[2, kind, origin, target, exclude, binary, payload, sent_at, epoch, offset]``
(version 2). An envelope without a position is always written as version 1, so nodes
of earlier releases still read every message of rooms without history; both versions
decode. Decoding validates every field; anything else raises EnvelopeError, so garbage
on a channel is dropped whole and never half-delivered.

``encode_head`` gives the first bytes of a version 2 envelope, up to its position: the
Redis script that assigns the position appends the epoch and offset itself, so the
position on the wire is the one stored in the room's history.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Final

import msgpack

from roomcast.shared.errors import EnvelopeError
from roomcast.shared.ids import ConnectionId, NodeId, node_of, validate_node_id, validate_room
from roomcast.shared.presence import decode_event
from roomcast.shared.users import decode_disconnect, is_user_room

ENVELOPE_VERSION: Final = 1
"""The version of an envelope without a position (every kind)."""
POSITIONED_VERSION: Final = 2
"""The version of a room envelope with a position (epoch, offset)."""
_FIELDS: Final = 8
_POSITIONED_FIELDS: Final = 10
MAX_OFFSET: Final = 2**53 - 1
"""The largest offset (JSON and JavaScript represent every integer up to it exactly)."""
EPOCH_RE: Final = re.compile(r"[0-9A-Za-z_-]{1,32}")
"""What an epoch is: 1-32 characters of ``[0-9A-Za-z_-]`` (docs/protocol.md)."""


class Kind(IntEnum):
    """What an envelope is addressed to."""

    ROOM = 1
    """Every member of the room ``target``."""
    CONNECTION = 2
    """The one connection ``target``."""
    ALL = 3
    """Every connection of every node; ``target`` is empty."""
    DISCONNECT = 4
    """Close every member of the user's room ``target`` (``shared.users``) with the code
    and reason in ``payload`` (``encode_disconnect``). Travels on the room's channel;
    nodes of earlier releases drop it as an unknown kind."""
    PRESENCE = 5
    """A join or leave in the room ``target`` (``payload``: ``shared.presence.encode_event``,
    checked on decode). Travels on the room's channel; nodes of earlier
    releases drop it as an unknown kind (counted in ``dropped``)."""


ROOM_CHANNEL_KINDS: Final = frozenset({Kind.ROOM, Kind.DISCONNECT, Kind.PRESENCE})
"""Kinds published on the channel of the room ``target``."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message on its way between nodes.

    ``origin`` is the publishing node ("" for an external publisher), ``exclude`` a
    connection id not to deliver to ("" for none), ``sent_at`` the publisher's
    ``time.time()`` (for latency metrics). ``epoch`` and ``offset`` are the message's
    position in its room's history (room envelopes only, given by the broker); ``""``
    and 0 when it has none.
    """

    kind: Kind
    target: str
    payload: bytes
    binary: bool
    origin: str = ""
    exclude: str = ""
    sent_at: float = 0.0
    epoch: str = ""
    offset: int = 0

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def positioned(self) -> bool:
        """True when the message has a position in its room's history."""
        return self.offset != 0

    def with_position(self, epoch: str, offset: int) -> Envelope:
        """This envelope with the position ``(epoch, offset)``."""
        return replace(self, epoch=epoch, offset=offset)


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
        elif env.kind is Kind.DISCONNECT:
            _validate_disconnect(env)
        elif env.kind is Kind.PRESENCE:
            validate_room(env.target)
            if not env.binary or env.exclude:
                raise EnvelopeError("a presence envelope is binary and excludes no one")
            decode_event(env.target, env.payload)
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
    if env.epoch != "" or type(env.offset) is not int or env.offset != 0:
        _validate_position(env)


def _validate_disconnect(env: Envelope) -> None:
    validate_room(env.target)
    if not is_user_room(env.target):
        raise EnvelopeError(f"a disconnect envelope goes to a user's room, not {env.target!r}")
    if not env.binary or env.exclude:
        raise EnvelopeError("a disconnect envelope is binary and excludes no connection")
    try:
        decode_disconnect(env.payload)
    except ValueError as exc:
        raise EnvelopeError(str(exc)) from None


def _validate_position(env: Envelope) -> None:
    if env.kind is not Kind.ROOM:
        raise EnvelopeError("only a room envelope has a position")
    if not isinstance(env.epoch, str) or not EPOCH_RE.fullmatch(env.epoch):
        raise EnvelopeError(f"envelope epoch {env.epoch!r} must be 1-32 characters of "
                            "[0-9A-Za-z_-]")
    offset = env.offset
    if type(offset) is not int or not 1 <= offset <= MAX_OFFSET:
        raise EnvelopeError(f"envelope offset {offset!r} must be an int from 1 to 2^53-1")


def encode(env: Envelope) -> bytes:
    """The msgpack bytes of ``env``: version 1 without a position, 2 with one."""
    if env.offset:
        position: bytes = msgpack.packb(env.epoch) + msgpack.packb(env.offset)
        return encode_head(env) + position
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


def encode_head(env: Envelope) -> bytes:
    """The bytes of ``env`` as a version 2 envelope up to its position (its own position,
    if any, left out): a msgpack array header for 10 items and the first 8 items.

    Appending the msgpack of an epoch (str) and of an offset (int) makes a complete
    envelope; the Redis history script does that with ``cmsgpack.pack``.
    """
    items: bytes = msgpack.packb(
        [
            POSITIONED_VERSION,
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
    # an 8-item array starts with the one-byte header 0x98 (fixarray); 10 items: 0x9a
    return b"\x9a" + items[1:]


def decode(data: bytes) -> Envelope:
    """Parse and validate envelope bytes; EnvelopeError says what is wrong."""
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise EnvelopeError(f"not msgpack: {exc.__class__.__name__}") from None
    if not isinstance(obj, list) or len(obj) not in (_FIELDS, _POSITIONED_FIELDS):
        raise EnvelopeError(f"envelope must be a msgpack array of {_FIELDS} items "
                            f"(version 1) or {_POSITIONED_FIELDS} (version 2)")
    version = obj[0]
    if type(version) is not int or version not in (ENVELOPE_VERSION, POSITIONED_VERSION):
        raise EnvelopeError(f"unsupported envelope version {version!r}")
    if len(obj) != (_FIELDS if version == ENVELOPE_VERSION else _POSITIONED_FIELDS):
        raise EnvelopeError(f"a version {version} envelope has "
                            f"{_FIELDS if version == ENVELOPE_VERSION else _POSITIONED_FIELDS}"
                            f" items, got {len(obj)}")
    kind, origin, target, exclude, binary, payload, sent_at = obj[1:8]
    epoch, offset = (obj[8], obj[9]) if version == POSITIONED_VERSION else ("", 0)
    if version == POSITIONED_VERSION and not epoch and not offset:
        raise EnvelopeError("a version 2 envelope must carry a position (epoch, offset)")
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
        epoch=epoch,
        offset=offset,
    )


def room_envelope(
    room: str, payload: bytes, *, binary: bool, origin: NodeId | str = "",
    exclude: ConnectionId | str = "", sent_at: float = 0.0,
) -> Envelope:
    """An envelope for every member of ``room``."""
    return Envelope(Kind.ROOM, room, payload, binary, origin, exclude, sent_at)
