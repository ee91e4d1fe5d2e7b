"""The broker interface: how a node reaches the other nodes.

A broker carries envelopes between nodes and keeps cluster-wide room presence. Two
implementations honour it: ``MemoryBroker`` (one process) and ``RedisBroker`` (one Redis
server, or a Redis Cluster with sharded pub/sub). The hub is their only caller and makes
calls for one room in order; metrics read ``stats``.

Failures: ``publish`` raises PublishError and ``room_members`` raises BrokerError when
the other nodes cannot be reached; ``subscribe``, ``unsubscribe`` and the presence calls
never fail for that reason (a broker re-applies them once it is connected again).
``close`` may be called more than once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from roomcast.shared.envelope import Envelope
from roomcast.shared.ids import ConnectionId, NodeId, Room

Deliver = Callable[[Envelope], None]
"""Called by the broker, on the event loop, for every valid envelope from another node."""


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

    async def start(self, node_id: NodeId, deliver: Deliver) -> None:
        """Connect, join this node's channel and the everyone channel, start listening."""
        ...

    async def close(self) -> None:
        """Withdraw this node's presence, stop listening, release connections."""
        ...

    async def publish(self, envelope: Envelope) -> None:
        """Send one envelope to the nodes it concerns.

        Raises PublishError if it could not be handed to the transport.
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

    async def add_presence(self, room: Room, connection: ConnectionId) -> None:
        """Record ``connection`` (on this node) as a member of ``room`` cluster-wide."""
        ...

    async def remove_presence(self, connection: ConnectionId, rooms: Iterable[Room]) -> None:
        """Withdraw ``connection`` from ``rooms`` cluster-wide."""
        ...

    async def room_members(self, room: Room) -> set[ConnectionId]:
        """Every live connection in ``room`` on every node."""
        ...
