"""What both Redis brokers share: envelope receipt and this node's presence mirror."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Final

from roomcast.broker._keys import Keys
from roomcast.broker._redis_common import Command
from roomcast.broker.base import Deliver
from roomcast.shared.envelope import Kind, decode
from roomcast.shared.errors import BrokerError, EnvelopeError
from roomcast.shared.ids import ConnectionId, NodeId, Room, node_of, validate_room

log = logging.getLogger("roomcast.broker.redis")

_WARN_EVERY: Final = 1.0
"""Seconds between two warnings about the same kind of failure (publish, heartbeat)."""


class EnvelopeReceiver:
    """Decode, filter, count and deliver envelopes; keep the local presence mirror that
    is re-applied after Redis comes back; rate-limited warnings.

    Subclasses set these attributes in ``__init__`` and write presence commands in
    ``_presence_changed`` (never raising for Redis being down).
    """

    _node: NodeId | None
    _deliver: Deliver | None
    _desired: set[Room]
    _closed: bool
    _last_warning: dict[str, float]
    _keys: Keys
    _presence: dict[Room, set[ConnectionId]]
    dropped: int
    received: int

    async def _presence_changed(self, *commands: Command) -> None:
        raise NotImplementedError

    async def add_presence(self, room: Room, connection: ConnectionId) -> None:
        """Record ``connection`` in ``room``; never raises for Redis being down."""
        node = self._require_running()
        room = validate_room(room)
        owner = node_of(connection)
        if owner != node:
            raise ValueError(f"connection {connection} belongs to node {owner}, not {node}")
        self._presence.setdefault(room, set()).add(connection)
        await self._presence_changed(
            ("HSET", self._keys.presence(room), connection, node),
            ("SADD", self._keys.node_rooms(node), room),
        )

    async def remove_presence(self, connection: ConnectionId, rooms: Iterable[Room]) -> None:
        """Withdraw ``connection`` from ``rooms``; never raises for Redis being down."""
        node = self._node
        commands: list[Command] = []
        for room in rooms:
            members = self._presence.get(room)
            if members is not None:
                members.discard(connection)
                if not members:
                    del self._presence[room]
            commands.append(("HDEL", self._keys.presence(room), connection))
            if node is not None and room not in self._presence:
                commands.append(("SREM", self._keys.node_rooms(node), room))
        if commands and node is not None and not self._closed:
            await self._presence_changed(*commands)

    def _on_message(self, data: bytes) -> None:
        try:
            envelope = decode(data)
        except EnvelopeError as exc:
            self.dropped += 1
            self._warn("dropped", "dropped an invalid envelope from Redis (%d so far): %s",
                       self.dropped, exc)
            return
        except Exception:
            # anyone can publish on our channels: a decoder bug must not kill the link
            self.dropped += 1
            log.exception("dropped an envelope the decoder choked on (%d so far)", self.dropped)
            return
        if envelope.origin and envelope.origin == self._node:
            return  # our own publish: the hub already delivered it locally
        if envelope.kind is Kind.ROOM and envelope.target not in self._desired:
            return  # in flight when the room's last local member left
        self.received += 1
        if self._deliver is None:
            return
        try:
            self._deliver(envelope)
        except Exception:
            log.exception("deliver callback raised for a %s envelope; listener goes on",
                          envelope.kind.name)

    def _require_running(self) -> NodeId:
        name = type(self).__name__
        if self._closed:
            raise BrokerError(f"this {name} is closed")
        if self._node is None:
            raise BrokerError(f"this {name} is not started; call start() first")
        return self._node

    def _warn(self, topic: str, message: str, *args: object) -> None:
        # an outage fails every call; one warning per second per topic is enough
        now = time.monotonic()
        if now - self._last_warning.get(topic, -_WARN_EVERY) >= _WARN_EVERY:
            self._last_warning[topic] = now
            log.warning(message, *args)
