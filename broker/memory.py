"""The in-process broker: one node with no Redis, or several hubs in one process.

Hubs whose brokers share one ``MemoryBus`` behave like nodes of one cluster, which is
how the cross-node contract tests run without Redis. Envelopes still travel as msgpack
bytes so the codec is exercised the same way as over Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from roomcast.broker.base import BrokerStats, Deliver
from roomcast.shared.envelope import Envelope, Kind, decode, encode
from roomcast.shared.errors import BrokerError, EnvelopeError
from roomcast.shared.ids import ConnectionId, NodeId, Room, node_of

log = logging.getLogger("roomcast.broker.memory")


class MemoryBus:
    """What several in-process brokers share: subscriptions and presence."""

    def __init__(self) -> None:
        self.brokers: dict[NodeId, MemoryBroker] = {}
        self.presence: dict[Room, dict[ConnectionId, NodeId]] = {}
        self.dropped = 0

    def send_raw(self, kind: Kind, target: str, data: bytes, origin: str = "") -> None:
        """Hand raw bytes to every broker that would receive ``kind``/``target``.

        Used by publish and by tests that inject garbage, as a rogue Redis client would.
        """
        for node, broker in list(self.brokers.items()):
            if node == origin:
                continue
            if (
                kind is Kind.ALL
                or (kind is Kind.ROOM and target in broker.rooms)
                or (kind is Kind.CONNECTION and node_of(target) == node)
            ):
                asyncio.get_running_loop().call_soon(broker.receive_raw, data)


class MemoryBroker:
    """A Broker for one process; pass the same ``bus`` to several to make a cluster."""

    def __init__(self, bus: MemoryBus | None = None) -> None:
        self._bus = bus if bus is not None else MemoryBus()
        self._node: NodeId | None = None
        self._deliver: Deliver | None = None
        self.rooms: set[Room] = set()
        self.stats = BrokerStats()
        """Counters: ``published``, ``received`` and ``dropped`` (the others stay 0)."""

    @property
    def connected(self) -> bool:
        return True

    @property
    def has_peers(self) -> bool:
        return len(self._bus.brokers) > 1

    async def start(self, node_id: NodeId, deliver: Deliver) -> None:
        if node_id in self._bus.brokers:
            raise BrokerError(f"node {node_id} is already on this bus")
        self._node = node_id
        self._deliver = deliver
        self._bus.brokers[node_id] = self

    async def close(self) -> None:
        node = self._node
        if node is None:
            return
        self._bus.brokers.pop(node, None)
        for room in list(self._bus.presence):
            members = self._bus.presence[room]
            for conn in [c for c, n in members.items() if n == node]:
                del members[conn]
            if not members:
                del self._bus.presence[room]
        self.rooms.clear()
        self._node = None

    def receive_raw(self, data: bytes) -> None:
        """Decode and deliver one envelope; garbage is dropped and counted."""
        if self._deliver is None:
            return
        try:
            envelope = decode(data)
        except EnvelopeError as exc:
            self.stats.dropped += 1
            log.warning("dropped an invalid envelope: %s", exc)
            return
        self.stats.received += 1
        self._deliver(envelope)

    async def publish(self, envelope: Envelope) -> None:
        if self._node is None:
            raise BrokerError("broker is not started")
        if self.has_peers:
            self._bus.send_raw(envelope.kind, envelope.target, encode(envelope), self._node)
            self.stats.published += 1

    async def subscribe(self, room: Room) -> None:
        self.rooms.add(room)

    async def unsubscribe(self, room: Room) -> None:
        self.rooms.discard(room)

    async def add_presence(self, room: Room, connection: ConnectionId) -> None:
        if self._node is None:
            raise BrokerError("broker is not started")
        self._bus.presence.setdefault(room, {})[connection] = self._node

    async def remove_presence(self, connection: ConnectionId, rooms: Iterable[Room]) -> None:
        for room in rooms:
            members = self._bus.presence.get(room)
            if members is None:
                continue
            members.pop(connection, None)
            if not members:
                del self._bus.presence[room]

    async def room_members(self, room: Room) -> set[ConnectionId]:
        return set(self._bus.presence.get(room, ()))
