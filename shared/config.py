"""Hub configuration: the seed's ``HubConfig`` with its defaults, validated on creation."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from roomcast.shared.history import HistoryPolicy

DEFAULT_MAX_CONNECTIONS: Final = 10_000
DEFAULT_MAX_MESSAGE_SIZE: Final = 64 * 1024
DEFAULT_PING_INTERVAL_MS: Final = 30_000
DEFAULT_PONG_TIMEOUT_MS: Final = 10_000
DEFAULT_SEND_BUFFER_LIMIT: Final = 1024 * 1024
DEFAULT_RECOVERY_MAX: Final = 1000
DEFAULT_WRITE_BATCH_BYTES: Final = 64 * 1024
MAX_WRITE_DELAY_MS: Final = 1000


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"HubConfig.{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"HubConfig.{name} must be > 0, got {value}")


@dataclass(frozen=True, slots=True)
class HubConfig:
    """Limits and options of one hub (one node).

    ``max_connections_per_user`` is not in the seed: how many connections one user
    (``conn.user_id``) may have open across the cluster; more are refused at the upgrade
    with 429. 0 (the default): no limit. Checked against the cluster's presence when a
    connection opens, so simultaneous upgrades of one user may pass it by a few.

    ``allowed_origins``: the browser origins (``scheme://host[:port]``) allowed to open a
    WebSocket. Empty means same-origin only (the Origin's host:port equals the Host
    header) plus clients that send no Origin header (non-browser clients); ``"*"``
    allows every origin.

    ``send_buffer_limit`` is not in the seed: the bytes that may wait unsent for one
    connection before it is cut off as a slow consumer (close code 1013,
    "try again later": the client may reconnect).

    ``history`` is not in the seed: which rooms keep history (positions, recovery; see
    ``roomcast.shared.history``). None (the default): no room does, and every room
    behaves as before. ``recovery_max``: the most messages one recovery (a
    ``roomcast.v1`` client that declared a position) replays; past it the client is told
    ``recovered: false`` with reason ``limit``.
    """

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    ping_interval_ms: int = DEFAULT_PING_INTERVAL_MS
    pong_timeout_ms: int = DEFAULT_PONG_TIMEOUT_MS
    enable_compression: bool = False
    allowed_origins: tuple[str, ...] = field(default=())
    send_buffer_limit: int = DEFAULT_SEND_BUFFER_LIMIT
    history: HistoryPolicy | None = None
    recovery_max: int = DEFAULT_RECOVERY_MAX
    write_delay_ms: int = 0
    write_batch_bytes: int = DEFAULT_WRITE_BATCH_BYTES
    max_connections_per_user: int = 0

    def __post_init__(self) -> None:
        for name in (
            "max_connections",
            "max_message_size",
            "ping_interval_ms",
            "pong_timeout_ms",
            "send_buffer_limit",
            "recovery_max",
            "write_batch_bytes",
        ):
            _positive_int(name, getattr(self, name))
        delay = self.write_delay_ms
        if isinstance(delay, bool) or not isinstance(delay, int):
            raise TypeError(f"HubConfig.write_delay_ms must be an int, got {type(delay).__name__}")
        if not 0 <= delay <= MAX_WRITE_DELAY_MS:
            raise ValueError(f"HubConfig.write_delay_ms must be 0 (no delay) to "
                             f"{MAX_WRITE_DELAY_MS}, got {delay}")
        per_user = self.max_connections_per_user
        if isinstance(per_user, bool) or not isinstance(per_user, int):
            raise TypeError("HubConfig.max_connections_per_user must be an int, got "
                            f"{type(per_user).__name__}")
        if per_user < 0:
            raise ValueError("HubConfig.max_connections_per_user must be >= 0 (0: no "
                             f"limit), got {per_user}")
        if not isinstance(self.enable_compression, bool):
            raise TypeError("HubConfig.enable_compression must be a bool")
        origins = self.allowed_origins
        if isinstance(origins, str) or not isinstance(origins, Iterable):
            raise TypeError("HubConfig.allowed_origins must be a sequence of origin strings")
        if self.history is not None and not isinstance(self.history, HistoryPolicy):
            raise TypeError("HubConfig.history must be a HistoryPolicy or None, got "
                            f"{type(self.history).__name__}")
        normalised = tuple(_normalise_origin(o) for o in origins)
        object.__setattr__(self, "allowed_origins", normalised)

    @property
    def ping_interval(self) -> float:
        """The ping interval in seconds."""
        return self.ping_interval_ms / 1000

    @property
    def pong_timeout(self) -> float:
        """The pong timeout in seconds."""
        return self.pong_timeout_ms / 1000

    @property
    def write_delay(self) -> float:
        """The write delay in seconds (0: one write per event-loop turn)."""
        return self.write_delay_ms / 1000


def _normalise_origin(origin: object) -> str:
    if not isinstance(origin, str):
        raise TypeError(f"allowed origin must be a str, got {type(origin).__name__}")
    value = origin.strip().rstrip("/").lower()
    if value == "*":
        return value
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
        raise ValueError(
            f"allowed origin {origin!r} is not of the form scheme://host[:port] "
            "(http or https), or '*'"
        )
    return value
