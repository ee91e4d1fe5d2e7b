"""The in-process broker: one node with no Redis, or several hubs in one process.

Hubs whose brokers share one ``MemoryBus`` behave like nodes of one cluster, which is
how the cross-node contract tests run without Redis. Envelopes still travel as msgpack
bytes so the codec is exercised the same way as over Redis.

Rooms with history behave as on Redis: the bus keeps, per room, an epoch (made when the
room's state is first needed, or again once it expired), the top offset and the recent
messages (bounded by size and age), and remembers idempotency keys. A process restart
is a new epoch, since nothing is kept outside the process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from roomcast.broker.base import (
    BrokerStats,
    Deliver,
    Departed,
    Resumed,
    check_history_publish,
    check_history_read,
)
from roomcast.shared.envelope import ROOM_CHANNEL_KINDS, Envelope, Kind, decode, encode
from roomcast.shared.errors import BrokerError, EnvelopeError
from roomcast.shared.history import History, HistoryPage, Position, new_epoch
from roomcast.shared.ids import ConnectionId, NodeId, Room, node_of

log = logging.getLogger("roomcast.broker.memory")

_SWEEP_EVERY = 1024
"""History calls between two sweeps of expired room states and idempotency keys."""


@dataclass(slots=True)
class _RoomHistory:
    """One room's history: its epoch, top offset, and recent messages (oldest first)."""

    epoch: str
    expires: float
    """When the room's state expires (a new epoch then): its meta TTL after it was made
    or last published to."""
    top: int = 0
    entries: deque[tuple[float, Envelope]] = field(default_factory=deque)
    """(time stored, envelope with its position)."""


class MemoryBus:
    """What several in-process brokers share: subscriptions, presence and room history.

    ``clock`` (seconds, monotonic) times the history's age limits; tests pass their own.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.brokers: dict[NodeId, MemoryBroker] = {}
        self.presence: dict[Room, dict[ConnectionId, NodeId]] = {}
        self.people: dict[ConnectionId, bytes] = {}
        """The info of connections with presence (``room_presence``)."""
        self.dropped = 0
        self.clock = clock
        self.histories: dict[Room, _RoomHistory] = {}
        self._idempotency: dict[tuple[Room, str], tuple[Position, float]] = {}
        self._calls_since_sweep = 0

    def send_raw(self, kind: Kind, target: str, data: bytes, origin: str = "") -> None:
        """Hand raw bytes to every broker that would receive ``kind``/``target``, except
        the broker of node ``origin``.

        Used by publish and by tests that inject garbage, as a rogue Redis client would.
        """
        for node, broker in list(self.brokers.items()):
            if node == origin or broker._link_lost:
                continue
            if (
                kind is Kind.ALL
                or (kind in ROOM_CHANNEL_KINDS and target in broker.rooms)
                or (kind is Kind.CONNECTION and node_of(target) == node)
            ):
                asyncio.get_running_loop().call_soon(broker.receive_raw, data)

    # -- history ---------------------------------------------------------------------

    def publish_with_history(
        self, envelope: Envelope, history: History, idempotency_key: str | None
    ) -> tuple[Position, bool]:
        """Store ``envelope`` at the room's next position and hand it to every broker
        subscribed to the room (its publisher's too); the position, and whether the
        idempotency key was seen before (then nothing was stored or sent)."""
        room = Room(envelope.target)
        now = self.clock()
        if idempotency_key is not None:
            seen = self._idempotency.get((room, idempotency_key))
            if seen is not None and seen[1] > now:
                return seen[0], True
        state = self._state(room, history, now)
        state.top += 1
        state.expires = now + history.meta_ttl
        stored = envelope.with_position(state.epoch, state.top)
        entries = state.entries
        entries.append((now, stored))
        while len(entries) > history.size:
            entries.popleft()
        self._trim_by_age(state, history, now)
        position = Position(state.epoch, state.top)
        if idempotency_key is not None:
            self._idempotency[(room, idempotency_key)] = (
                position, now + history.idempotency_ttl)
        self.send_raw(Kind.ROOM, room, encode(stored))
        return position, False

    def read_history(
        self, room: Room, history: History, since: int | None, limit: int
    ) -> HistoryPage:
        """The room's position and messages after ``since`` (see Broker.read_history)."""
        now = self.clock()
        state = self._state(room, history, now)
        self._trim_by_age(state, history, now)
        if since is None:
            after = list(state.entries)
        else:
            after = [entry for entry in state.entries if entry[1].offset > since]
        more = len(after) > limit
        picked = after[len(after) - limit:] if limit else []
        return HistoryPage(room, state.epoch, state.top, tuple(env for _, env in picked),
                           since, more)

    def _state(self, room: Room, history: History, now: float) -> _RoomHistory:
        """The room's history state, made anew (a new epoch) if missing or expired."""
        self._calls_since_sweep += 1
        if self._calls_since_sweep >= _SWEEP_EVERY:
            self._sweep(now)
        state = self.histories.get(room)
        if state is None or now >= state.expires:
            state = self.histories[room] = _RoomHistory(new_epoch(), now + history.meta_ttl)
        return state

    def _sweep(self, now: float) -> None:
        """Forget expired room states and idempotency keys (memory stays bounded)."""
        self._calls_since_sweep = 0
        for room, state in list(self.histories.items()):
            if now >= state.expires:
                del self.histories[room]
        for item, (_, until) in list(self._idempotency.items()):
            if until <= now:
                del self._idempotency[item]

    @staticmethod
    def _trim_by_age(state: _RoomHistory, history: History, now: float) -> None:
        entries = state.entries
        cutoff = now - history.ttl
        while entries and entries[0][0] < cutoff:
            entries.popleft()


class MemoryBroker:
    """A Broker for one process; pass the same ``bus`` to several to make a cluster."""

    def __init__(self, bus: MemoryBus | None = None) -> None:
        self._bus = bus if bus is not None else MemoryBus()
        self._node: NodeId | None = None
        self._deliver: Deliver | None = None
        self._resumed: Resumed | None = None
        self._link_lost = False
        self.rooms: set[Room] = set()
        self.stats = BrokerStats()
        """Counters: ``published``, ``received``, ``dropped`` and the history ones."""

    @property
    def bus(self) -> MemoryBus:
        """The bus this broker is on."""
        return self._bus

    @property
    def connected(self) -> bool:
        """True, unless a test cut this broker's link (``lose_link``)."""
        return not self._link_lost

    @property
    def has_peers(self) -> bool:
        return len(self._bus.brokers) > 1

    async def start(
        self, node_id: NodeId, deliver: Deliver, *, resumed: Resumed | None = None,
        departed: Departed | None = None,
    ) -> None:
        if node_id in self._bus.brokers:
            raise BrokerError(f"node {node_id} is already on this bus")
        self._node = node_id
        self._deliver = deliver
        self._resumed = resumed
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
                self._bus.people.pop(conn, None)
            if not members:
                del self._bus.presence[room]
        self.rooms.clear()
        self._node = None

    def receive_raw(self, data: bytes) -> None:
        """Decode and deliver one envelope; garbage is dropped and counted."""
        if self._deliver is None or self._link_lost:
            return
        try:
            envelope = decode(data)
        except EnvelopeError as exc:
            self.stats.dropped += 1
            log.warning("dropped an invalid envelope: %s", exc)
            return
        self.stats.received += 1
        self._deliver(envelope)

    async def publish(
        self,
        envelope: Envelope,
        *,
        history: History | None = None,
        idempotency_key: str | None = None,
    ) -> Position | None:
        if self._node is None:
            raise BrokerError("broker is not started")
        history = check_history_publish(envelope, history, idempotency_key)
        if history is not None:
            position, duplicate = self._bus.publish_with_history(
                envelope, history, idempotency_key)
            if duplicate:
                self.stats.duplicates += 1
            else:
                self.stats.published += 1
                self.stats.history_published += 1
            return position
        if self.has_peers:
            self._bus.send_raw(envelope.kind, envelope.target, encode(envelope), self._node)
            self.stats.published += 1
        return None

    async def read_history(
        self, room: Room, history: History, *, since: int | None = None, limit: int = 100
    ) -> HistoryPage:
        if self._node is None:
            raise BrokerError("broker is not started")
        room = check_history_read(room, history, since, limit)
        self.stats.history_reads += 1
        return self._bus.read_history(room, history, since, limit)

    async def subscribe(self, room: Room) -> None:
        self.rooms.add(room)

    async def unsubscribe(self, room: Room) -> None:
        self.rooms.discard(room)

    async def add_presence(
        self, room: Room, connection: ConnectionId, info: bytes = b""
    ) -> None:
        if self._node is None:
            raise BrokerError("broker is not started")
        self._bus.presence.setdefault(room, {})[connection] = self._node
        if info:
            self._bus.people[connection] = info

    async def remove_presence(self, connection: ConnectionId, rooms: Iterable[Room]) -> None:
        for room in rooms:
            members = self._bus.presence.get(room)
            if members is None:
                continue
            members.pop(connection, None)
            if not members:
                del self._bus.presence[room]
        if connection in self._bus.people and not any(
                connection in members for members in self._bus.presence.values()):
            del self._bus.people[connection]

    async def room_presence(self, room: Room) -> dict[ConnectionId, bytes]:
        people = self._bus.people
        return {conn: people.get(conn, b"") for conn in self._bus.presence.get(room, ())}

    async def room_members(self, room: Room) -> set[ConnectionId]:
        return set(self._bus.presence.get(room, ()))

    # -- for tests: a lost subscription link, as CLIENT KILL TYPE pubsub makes on Redis --

    def lose_link(self) -> None:
        """Stop receiving (envelopes sent meanwhile are lost to this node), as when a
        Redis pub/sub link drops; publishing still works. ``connected`` turns False."""
        self._link_lost = True

    def restore_link(self) -> None:
        """Receive again and report every subscribed room to ``resumed``."""
        if not self._link_lost:
            return
        self._link_lost = False
        self.stats.reconnects += 1
        rooms = frozenset(self.rooms)
        if rooms and self._resumed is not None:
            self.stats.resumed_rooms += len(rooms)
            self._resumed(rooms)

