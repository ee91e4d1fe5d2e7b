"""The broker interface: how a node reaches the other nodes.

A broker carries envelopes between nodes and keeps cluster-wide room presence. Two
implementations honour it: ``MemoryBroker`` (one process) and ``RedisBroker`` (one Redis
server, or a Redis Cluster with sharded pub/sub). The hub is their only caller and makes
calls for one room in order; metrics read ``stats``.

Failures: ``publish`` raises PublishError and ``room_members`` and ``read_history``
raise BrokerError when the other nodes cannot be reached; ``subscribe``, ``unsubscribe``
and the presence calls never fail for that reason (a broker re-applies them once it is
connected again). ``close`` may be called more than once.

History (issue 12): a room envelope published with a ``History`` gets a position
``(epoch, offset)`` from the broker, is stored in the room's history, and comes back to
every subscribed node with its position, the publishing node included (the hub serves
its own members from that echo, so every node delivers a room's messages in offset
order). ``read_history`` reads a room's history; ``resumed`` tells the hub which rooms'
subscriptions came back after a gap in which messages may have been missed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from roomcast.shared.envelope import Envelope, Kind
from roomcast.shared.history import (
    MAX_READ_LIMIT,
    History,
    HistoryPage,
    Position,
    validate_idempotency_key,
    validate_offset,
)
from roomcast.shared.ids import ConnectionId, NodeId, Room, validate_room

Deliver = Callable[[Envelope], None]
"""Called by the broker, on the event loop, for every valid envelope from another node,
and for this node's own envelopes that carry a position (rooms with history)."""

Departed = Callable[[list[tuple[Room, ConnectionId, bytes]]], None]
"""Called by the broker, on the event loop of the one node that swept a dead node's
presence, with what it removed: (room, connection, info) for each entry."""

Resumed = Callable[[frozenset[Room]], None]
"""Called by the broker, on the event loop, with rooms whose subscription came back after
a lost link, a failover or a move (never for a first subscribe): their messages published
meanwhile may be missing, so the hub reads their history since its last position."""


@dataclass(slots=True)
class BrokerStats:
    """A broker's counters: plain ints the broker adds to and metrics read."""

    published: int = 0
    """Envelopes handed to the other nodes."""
    received: int = 0
    """Envelopes from other nodes handed to ``deliver``."""
    dropped: int = 0
    """Envelopes from other nodes dropped because they did not decode or validate."""
    publish_failures: int = 0
    """Publishes that raised PublishError (including those failed fast)."""
    reconnects: int = 0
    """Times every subscription was restored after a lost link."""
    resubscribes: int = 0
    """Channels subscribed again after a lost link or a move to another master."""
    history_published: int = 0
    """Envelopes stored in a room's history and published with a position."""
    duplicates: int = 0
    """Publishes whose idempotency key was seen before: answered with the first
    position, neither stored nor published again."""
    history_reads: int = 0
    """History reads answered."""
    history_read_failures: int = 0
    """History reads that raised BrokerError."""
    resumed_rooms: int = 0
    """Rooms reported to ``resumed`` (each time one came back)."""


@runtime_checkable
class Broker(Protocol):
    """What the hub needs from a broker."""

    @property
    def stats(self) -> BrokerStats:
        """This broker's counters (zeros for what it never does)."""
        ...

    @property
    def connected(self) -> bool:
        """True while cross-node traffic can flow (always True for a local broker)."""
        ...

    @property
    def has_peers(self) -> bool:
        """False when no other node can exist, so the hub can skip publishing."""
        ...

    async def start(
        self, node_id: NodeId, deliver: Deliver, *, resumed: Resumed | None = None,
        departed: Departed | None = None,
    ) -> None:
        """Connect, join this node's channel and the everyone channel, start listening.

        ``resumed`` (optional) is called with the subscribed rooms whose subscription
        came back after a gap (see ``Resumed``); rooms without history are included,
        the hub ignores them. ``departed`` (optional) is called on the node that removed
        a dead node's presence, with the entries removed (see ``Departed``).
        """
        ...

    async def close(self) -> None:
        """Withdraw this node's presence, stop listening, release connections."""
        ...

    async def publish(
        self,
        envelope: Envelope,
        *,
        history: History | None = None,
        idempotency_key: str | None = None,
    ) -> Position | None:
        """Send one envelope to the nodes it concerns; its position, or None.

        Without ``history`` (or with size 0): as always, returns None; the envelope is
        not echoed to this node. With ``history`` (room envelopes without a position
        only): the broker assigns the next position in the room, stores the envelope in
        the room's history (trimmed to ``history.size`` messages and ``history.ttl``),
        publishes it with its position to every subscribed node, this one included, and
        returns the position, whether or not the room has peers. With
        ``idempotency_key`` too, a publish whose key was used in the room within
        ``history.idempotency_ttl`` is neither stored nor published: the first publish's
        position is returned. Raises PublishError if it could not be handed to the
        transport (the message was then not stored), ValueError for an envelope or key
        that cannot be published so (an idempotency key needs a history).
        """
        ...

    async def read_history(
        self, room: Room, history: History, *, since: int | None = None, limit: int = 100
    ) -> HistoryPage:
        """The room's position and the messages after offset ``since`` (None: the latest
        ``limit``), oldest first, at most ``limit`` (0-10,000), read atomically.

        A room with no state yet gets an epoch now (top 0), so a joining member learns a
        stable position before the first publish. ``HistoryPage.gap`` says whether the
        page fills the gap after a position. Raises BrokerError when the history cannot
        be read, ValueError for a bad ``since`` or ``limit``.
        """
        ...

    async def subscribe(self, room: Room) -> None:
        """Receive ``room``'s envelopes (its first local member joined).

        Returns once the subscription is live, so a publish made after it is received.
        """
        ...

    async def unsubscribe(self, room: Room) -> None:
        """Stop receiving ``room``'s envelopes (its last local member left)."""
        ...

    async def add_presence(
        self, room: Room, connection: ConnectionId, info: bytes = b""
    ) -> None:
        """Record ``connection`` (on this node) as a member of ``room`` cluster-wide;
        ``info`` (the connection's user and info, opaque here) is kept with it until the
        connection has left every room, for ``room_presence``."""
        ...

    async def remove_presence(self, connection: ConnectionId, rooms: Iterable[Room]) -> None:
        """Withdraw ``connection`` from ``rooms`` cluster-wide."""
        ...

    async def room_members(self, room: Room) -> set[ConnectionId]:
        """Every live connection in ``room`` on every node."""
        ...

    async def room_presence(self, room: Room) -> dict[ConnectionId, bytes]:
        """Every live connection in ``room`` on every node, with its ``info`` (b"" when
        its node gave none)."""
        ...


def check_history_publish(
    envelope: Envelope, history: History | None, idempotency_key: str | None
) -> History | None:
    """The history a publish uses (None: the plain path); ValueError/TypeError for an
    envelope or key that cannot be published so. Every broker checks with this."""
    if history is not None and not isinstance(history, History):
        raise TypeError(f"history must be a History or None, got {type(history).__name__}")
    if history is not None and not history.enabled:
        history = None
    if idempotency_key is not None:
        validate_idempotency_key(idempotency_key)
        if history is None:
            raise ValueError(
                "an idempotency key needs a room with history (nothing is stored without "
                "one, so a retry could not be recognised); give the room a History")
    if history is not None:
        if envelope.kind is not Kind.ROOM:
            raise ValueError(f"only room envelopes have history, not {envelope.kind.name}")
        if envelope.positioned:
            raise ValueError("the envelope already has a position; the broker assigns it")
    elif envelope.positioned:
        raise ValueError("an envelope with a position is published with its room's history")
    return history


def check_history_read(
    room: Room, history: History, since: int | None, limit: int
) -> Room:
    """``room`` validated; ValueError/TypeError for a read that cannot be made."""
    room = validate_room(room)
    if not isinstance(history, History):
        raise TypeError(f"history must be a History, got {type(history).__name__}")
    if not history.enabled:
        raise ValueError(f"room {room!r} has no history (size 0): there is nothing to read")
    if since is not None:
        validate_offset(since, "since")
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be an int, got {type(limit).__name__}")
    if not 0 <= limit <= MAX_READ_LIMIT:
        raise ValueError(f"limit must be from 0 to {MAX_READ_LIMIT}, got {limit}; read "
                         "longer histories in pages")
    return room
