"""The counters of one hub, in plain integers; the node exports them as metrics."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class HubStats:
    """Counters of one hub; the node exports them as metrics."""

    connections_opened: int = 0
    connections_closed: int = 0
    broadcasts: int = 0
    envelopes_received: int = 0
    messages_in: int = 0
    bytes_in: int = 0
    messages_out: int = 0
    """Deliveries: one per recipient of every message."""
    bytes_out: int = 0
    refused_full: int = 0
    refused_origin: int = 0
    refused_handshake: int = 0
    refused_draining: int = 0
    slow_consumers: int = 0
    pong_timeouts: int = 0
    recoveries: int = 0
    """Joins of a roomcast.v1 client that declared a position and got everything after it."""
    recoveries_failed: int = 0
    """Such joins told ``recovered: false`` (epoch, window, limit or unavailable)."""
    messages_recovered: int = 0
    """Messages replayed to recovering clients (and as recent history on join)."""
    catchup_gaps_filled: int = 0
    """Gaps in a room's stream this node filled from the history (after a lost link)."""
    catchup_gaps_lost: int = 0
    """Gaps it could not fill: its members were sent ``lost`` for the room."""
    refused_auth: int = 0
    """Upgrades refused with 401 (no or invalid credentials; ``node.auth``)."""
    refused_forbidden: int = 0
    """Upgrades refused with 403: valid credentials, a room they may not join."""
    refused_rate: int = 0
    """Upgrades refused with 429: too many new connections from the address."""
    refused_user_limit: int = 0
    """Upgrades refused with 429: the user has ``max_connections_per_user`` open."""
    handshake_timeouts: int = 0
    """Sockets closed for not completing their upgrade request in time."""
    joins_forbidden: int = 0
    """``join_room`` calls refused by the room rules (``RoomForbidden``)."""
    tokens_expired: int = 0
    """Connections closed with 4001 because their token expired."""
    messages_rate_limited: int = 0
    """Client messages dropped for being over the connection's rate limit."""
    rate_limit_closes: int = 0
    """Connections closed with 1008 for flooding (over the limit again and again)."""

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return asdict(self)
