"""Redis key and channel names for one roomcast prefix: the one module that spells them.

Channels: ``{prefix}:room:{room}``, ``{prefix}:node:{node}`` (sends to that node's
connections) and ``{prefix}:all``. Presence: the hash ``{prefix}:presence:{room}``
(connection id -> node id), the set ``{prefix}:node-rooms:{node}`` (rooms a node has
presence in, for cleanup), the hash ``{prefix}:people:{node}`` (connection id -> the
info of its user, for ``room_presence``) and the sorted set ``{prefix}:nodes`` (node ->
last heartbeat).

On a Redis Cluster (``cluster=True``) the channel names are the same, so each room's
channel hashes on its whole name and rooms spread over the shards; the presence keys
put the prefix in a hash tag (``{roomcast}:presence:lobby``, ``{roomcast}:nodes``, ...),
so that every presence key lives in one slot and the presence scripts stay single-slot.

History keys of a room (rooms with history; ``broker/_history.py``): the hash
``{prefix}:hmeta:{<tag>}`` (epoch, top offset, writer), the stream ``{prefix}:hist:{<tag>}``
(recent messages) and ``{prefix}:idem:{<tag>}:<key>`` (idempotency keys). One script
touches a room's keys and publishes on its channel atomically, so under Redis Cluster
all of them must live in the channel's slot. The per-room hash tag is chosen so, with
channels unchanged wherever possible:

- a room name without ``{`` or ``}``: the tag is the room's channel name itself
  (``roomcast:hmeta:{roomcast:room:lobby}``). The channel has no braces, so Redis
  hashes all of it, exactly as it hashes the tag: one slot, and the channel name is the
  one every earlier release used.
- a room name with ``{`` or ``}`` (Redis would hash only part of the channel, or a
  ``}`` would end the tag early): the tag is ``~`` and the first 32 hex digits of the
  room's SHA-256, and on a cluster the channel carries the same tag,
  ``roomcast:room:{~<hex>}`` (a wire change for these rooms only: nodes of earlier
  releases do not share such rooms with this one on a cluster). On one server the
  channel stays ``roomcast:room:<room>``.

Tags of the two kinds never meet: a prefix cannot start with ``~``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

from roomcast.shared.envelope import ROOM_CHANNEL_KINDS, Envelope, Kind
from roomcast.shared.ids import node_of

_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


@dataclass(frozen=True, slots=True)
class Keys:
    """Every channel and key name under ``prefix``; prefixes never collide (no ``:``)."""

    prefix: str
    cluster: bool = False
    """Hash-tag the presence keys into one slot (Redis Cluster); channels are unchanged."""

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str):
            raise TypeError(f"prefix must be a str, got {type(self.prefix).__name__}")
        if not _PREFIX_RE.fullmatch(self.prefix):
            raise ValueError(
                f"prefix {self.prefix!r} must be 1-64 characters of [A-Za-z0-9_.-]"
                " (a ':' would let two prefixes share channel names)"
            )

    @property
    def all_channel(self) -> str:
        """The channel every node joins, for broadcasts to everyone."""
        return f"{self.prefix}:all"

    @property
    def nodes(self) -> str:
        """The sorted set of live nodes, scored by their last heartbeat (Redis time)."""
        return f"{self._key_root}:nodes"

    @property
    def presence_prefix(self) -> str:
        """What precedes the room name in a presence hash key (Lua scripts build keys)."""
        return f"{self._key_root}:presence:"

    @property
    def people_prefix(self) -> str:
        """What precedes the node id in a node's people hash (connection -> info)."""
        return f"{self._key_root}:people:"

    def people(self, node: str) -> str:
        """The hash of ``node``'s connections' presence info (connection -> bytes)."""
        return self.people_prefix + node

    @property
    def node_rooms_prefix(self) -> str:
        """What precedes the node id in a node's room-set key (Lua scripts build keys)."""
        return f"{self._key_root}:node-rooms:"

    @property
    def _key_root(self) -> str:
        # "{prefix}" is a Redis Cluster hash tag: only the prefix is hashed, one slot
        return f"{{{self.prefix}}}" if self.cluster else self.prefix

    def room_channel(self, room: str) -> str:
        """The channel of ``room``'s envelopes."""
        if self.cluster and _has_braces(room):
            return f"{self.prefix}:room:{{{_digest_tag(room)}}}"
        return f"{self.prefix}:room:{room}"

    def history_tag(self, room: str) -> str:
        """The hash tag (without braces) of ``room``'s history keys: its channel's slot."""
        if _has_braces(room):
            return _digest_tag(room)
        return f"{self.prefix}:room:{room}"

    def history_meta(self, room: str) -> str:
        """The hash of ``room``'s epoch (``e``), top offset (``o``) and writer (``r``, ``d``)."""
        return f"{self.prefix}:hmeta:{{{self.history_tag(room)}}}"

    def history_stream(self, room: str) -> str:
        """The stream of ``room``'s recent messages (fields ``o`` offset, ``m`` envelope)."""
        return f"{self.prefix}:hist:{{{self.history_tag(room)}}}"

    def idempotency(self, room: str, key: str) -> str:
        """The key that remembers the position of ``room``'s publish with idempotency ``key``."""
        return f"{self.prefix}:idem:{{{self.history_tag(room)}}}:{key}"

    def node_channel(self, node: str) -> str:
        """The channel of envelopes for connections owned by ``node``."""
        return f"{self.prefix}:node:{node}"

    def presence(self, room: str) -> str:
        """The hash of ``room``'s members: connection id -> node id."""
        return self.presence_prefix + room

    def node_rooms(self, node: str) -> str:
        """The set of rooms ``node`` has presence in, so its entries can be removed."""
        return self.node_rooms_prefix + node

    def channel_for(self, envelope: Envelope) -> str:
        """The one channel ``envelope`` is published on, chosen by its kind."""
        if envelope.kind in ROOM_CHANNEL_KINDS:
            return self.room_channel(envelope.target)
        if envelope.kind is Kind.CONNECTION:
            return self.node_channel(node_of(envelope.target))
        return self.all_channel



def _has_braces(room: str) -> bool:
    return "{" in room or "}" in room


def _digest_tag(room: str) -> str:
    return "~" + hashlib.sha256(room.encode()).hexdigest()[:32]
