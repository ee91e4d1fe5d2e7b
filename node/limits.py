"""Rate limits: what one connection may send, and how often one address may connect.

Plain objects with no I/O and no timers: time goes in as an argument (``time.monotonic()``
in the node, plain numbers in tests).

- ``RateLimit``: a token bucket per connection on the messages it sends and one on their
  bytes. A message the buckets cannot pay for is dropped (the application never sees
  it; a ``roomcast.v1`` client gets an ``error`` frame with code ``rate_limited``). A
  client that keeps sending over the limit, ``close_after`` drops within
  ``window`` seconds, is closed with 1008 (policy violation). Every drop and close is
  counted (``HubStats.messages_rate_limited``, ``rate_limit_closes``).
- ``ConnectLimiter``: new WebSocket connections per client address per second, as a
  token bucket per address; over it the upgrade is answered 429 with ``Retry-After``.
- ``Limits``: the node's settings (the default rate limit of its routes, the connect
  limit, the handshake timeout), given to ``Hub(limits=...)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from roomcast.node.v1 import error_frame
from roomcast.shared.rfc6455 import CloseCode, Opcode

if TYPE_CHECKING:
    from roomcast.node.connection import Connection

log = logging.getLogger("roomcast.node")

DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
"""Seconds a new socket has to complete its upgrade request (its HTTP request head)."""
DEFAULT_WINDOW: Final = 10.0
"""Seconds over which a connection's drops are counted towards closing it."""

BYTES_ONLY_DROPS_TO_CLOSE: Final = 10
"""``RateLimit.close_after`` when only bytes are limited (there is no message burst)."""

ALLOW: Final = 0
"""``ConnectionLimiter.admit``: the message is within the limit."""
DROP: Final = 1
"""...the message is over the limit: drop it and tell the client."""
CLOSE: Final = 2
"""...the client kept exceeding the limit: drop it and close the connection with 1008."""

RATE_LIMITED_REASON: Final = "rate limit exceeded"
"""The close reason sent with 1008 to a client closed for flooding."""

_TEXT: Final = Opcode.TEXT
_BINARY: Final = Opcode.BINARY


def _positive_number(name: str, value: object, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


@dataclass(frozen=True, slots=True)
class RateLimit:
    """How much one connection may send, in messages and bytes per second.

    ``messages_per_second`` and ``bytes_per_second``: the sustained rates (None: that
    one is not limited; at least one must be set). ``burst``: the messages the message
    bucket holds, i.e. how many may arrive at once after a quiet spell (default: one
    second's worth, at least 1). The byte bucket holds as many seconds' worth of bytes
    as the message bucket does (at least one second's); a message is let through while
    the byte bucket is not empty and may take it below zero (so a message larger than
    one second's bytes still passes, and the client then waits for the debt).
    ``close_after``: drops within ``window`` seconds after which the client is closed
    with 1008 (default: twice the burst; 10 when only bytes are limited).
    """

    messages_per_second: float | None = None
    bytes_per_second: float | None = None
    burst: int | None = None
    close_after: int | None = None
    window: float = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        _positive_number("RateLimit.messages_per_second", self.messages_per_second)
        _positive_number("RateLimit.bytes_per_second", self.bytes_per_second)
        _positive_number("RateLimit.window", self.window, optional=False)
        if self.messages_per_second is None and self.bytes_per_second is None:
            raise ValueError("RateLimit needs messages_per_second or bytes_per_second "
                             "(or both); pass no RateLimit to leave a route unlimited")
        for name in ("burst", "close_after"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"RateLimit.{name} must be an int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"RateLimit.{name} must be > 0, got {value}")

    @property
    def message_capacity(self) -> float:
        """Messages the message bucket holds (``burst``, or one second's worth)."""
        if self.burst is not None:
            return float(self.burst)
        return max(1.0, self.messages_per_second or 1.0)

    @property
    def burst_seconds(self) -> float:
        """Seconds' worth of sending the buckets hold (at least 1)."""
        if self.messages_per_second is None:
            return max(1.0, float(self.burst or 1))
        return max(1.0, self.message_capacity / self.messages_per_second)

    @property
    def drops_to_close(self) -> int:
        """Drops within ``window`` seconds that close the connection."""
        if self.close_after is not None:
            return self.close_after
        if self.messages_per_second is None:
            return BYTES_ONLY_DROPS_TO_CLOSE
        return max(2, int(2 * self.message_capacity))

    def limiter(self, now: float) -> ConnectionLimiter:
        """A fresh limiter for one connection, its buckets full at ``now``."""
        return ConnectionLimiter(self, now)


class ConnectionLimiter:
    """The buckets of one connection under a ``RateLimit``."""

    __slots__ = ("_byte_cap", "_byte_rate", "_bytes", "_close_at", "_drops", "_last",
                 "_message_cap", "_message_rate", "_messages", "_window", "_window_start",
                 "closed", "limit", "told")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.limit = limit
        self.closed = False
        """Set once the connection was closed for flooding: drop everything after."""
        self.told = False
        """A roomcast.v1 client was sent ``rate_limited`` for the current run of drops."""
        # The settings, read once: admit runs for every message.
        self._message_rate = limit.messages_per_second
        self._byte_rate = limit.bytes_per_second
        self._message_cap = limit.message_capacity
        self._byte_cap = (limit.bytes_per_second or 0.0) * limit.burst_seconds
        self._close_at = limit.drops_to_close
        self._window = limit.window
        self._messages = self._message_cap
        self._bytes = self._byte_cap
        self._last = now
        self._drops = 0
        self._window_start = now

    def admit(self, size: int, now: float) -> int:
        """A message of ``size`` bytes arrived at ``now``: ``ALLOW``, ``DROP`` or ``CLOSE``."""
        rate = self._message_rate
        byte_rate = self._byte_rate
        elapsed = now - self._last
        if elapsed > 0:
            self._last = now
            if rate is not None:
                messages = self._messages + elapsed * rate
                cap = self._message_cap
                self._messages = messages if messages < cap else cap
            if byte_rate is not None:
                filled = self._bytes + elapsed * byte_rate
                cap = self._byte_cap
                self._bytes = filled if filled < cap else cap
        if (rate is None or self._messages >= 1.0) and (byte_rate is None or self._bytes > 0.0):
            if rate is not None:
                self._messages -= 1.0
            if byte_rate is not None:
                self._bytes -= size
            return ALLOW
        if now - self._window_start > self._window:
            self._window_start = now
            self._drops = 0
        self._drops += 1
        return CLOSE if self._drops >= self._close_at else DROP


def apply_rate_limit(
    conn: Connection, limiter: ConnectionLimiter, events: list[tuple[Opcode, bytes | str]],
    now: float,
) -> list[tuple[Opcode, bytes | str]]:
    """``events`` (what a read completed) without the messages over ``conn``'s limit.

    Control frames pass. A roomcast.v1 client gets one ``error`` frame (code
    ``rate_limited``) per run of dropped messages; a client that keeps flooding is
    sent a 1008 close, its socket is no longer read, and every message already read
    is dropped. Counted in the hub's stats.
    """
    # None while every event is kept: then ``events`` itself is returned.
    kept: list[tuple[Opcode, bytes | str]] | None = None
    admit = limiter.admit
    for index, event in enumerate(events):
        opcode, payload = event
        if opcode is not _TEXT and opcode is not _BINARY:
            if kept is not None:
                kept.append(event)
            continue
        verdict = DROP  # closed: the rest of the read that closed it
        if not limiter.closed:
            size = (len(payload) if not isinstance(payload, str) or payload.isascii()
                    else len(payload.encode()))
            verdict = admit(size, now)
            if verdict == ALLOW:
                limiter.told = False
                if kept is not None:
                    kept.append(event)
                continue
        if kept is None:
            kept = events[:index]
        _dropped(conn, limiter, verdict)
    return events if kept is None else kept


def _dropped(conn: Connection, limiter: ConnectionLimiter, verdict: int) -> None:
    """Count a dropped message; tell a v1 client, or close a flooder (``CLOSE``)."""
    stats = conn.hub.stats
    stats.messages_rate_limited += 1
    if limiter.closed:  # the rest of the read that closed it
        conn.stop_reading()
        return
    if verdict == CLOSE:
        limiter.closed = True
        stats.rate_limit_closes += 1
        log.info("closing %s with 1008: over its rate limit %d times within %.0fs",
                 conn.id, limiter.limit.drops_to_close, limiter.limit.window,
                 extra={"conn_id": conn.id})
        # The closing handshake, not an abort: closing a socket with the flood
        # unread would reset it, and the client could lose the 1008 with it. The
        # socket is not read any more (its flood costs nothing from here on); it
        # is aborted when the closing handshake times out.
        if conn.begin_close(CloseCode.POLICY_VIOLATION, RATE_LIMITED_REASON):
            conn.settle()
        conn.stop_reading()
    elif not limiter.told and conn.is_open:
        limiter.told = True
        if conn.v1:
            conn.send_prepared(error_frame(
                "rate_limited", "message dropped: over the rate limit of this "
                "connection; send more slowly"))


class ConnectLimiter:
    """New connections per client address: a token bucket of ``burst`` per address,
    refilled at ``per_second``. ``check`` answers 0 (allowed) or the seconds to wait.

    Memory stays bounded: addresses whose bucket has refilled are forgotten on a sweep
    made every ``SWEEP_EVERY`` checks, and at most ``max_addresses`` are tracked (past
    that the fullest-looking entries are dropped first: the oldest).
    """

    SWEEP_EVERY: Final = 1024

    __slots__ = ("_buckets", "_checks", "burst", "max_addresses", "per_second")

    def __init__(self, per_second: float, burst: int | None = None,
                 max_addresses: int = 100_000) -> None:
        _positive_number("ConnectLimiter.per_second", per_second, optional=False)
        if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int)
                                  or burst <= 0):
            raise ValueError(f"ConnectLimiter.burst must be an int > 0, got {burst!r}")
        self.per_second = float(per_second)
        self.burst = float(burst) if burst is not None else max(1.0, self.per_second)
        self.max_addresses = max_addresses
        self._buckets: dict[str, tuple[float, float]] = {}
        """address -> (tokens, when they were counted)."""
        self._checks = 0

    def check(self, address: str | None, now: float) -> float:
        """A new connection from ``address`` at ``now``: 0.0 if allowed (and counted),
        else the seconds until it would be. An unknown address (None) is not limited."""
        if address is None:
            return 0.0
        self._checks += 1
        if self._checks % self.SWEEP_EVERY == 0 or len(self._buckets) >= self.max_addresses:
            self._sweep(now)
        tokens, then = self._buckets.get(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.per_second)
        if tokens >= 1.0:
            self._buckets[address] = (tokens - 1.0, now)
            return 0.0
        self._buckets[address] = (tokens, now)
        return (1.0 - tokens) / self.per_second

    def _sweep(self, now: float) -> None:
        full_after = self.burst / self.per_second
        buckets = self._buckets
        for address in [a for a, (_, then) in buckets.items() if now - then >= full_after]:
            del buckets[address]
        excess = len(buckets) - self.max_addresses // 2
        if excess > 0 and len(buckets) >= self.max_addresses:
            for address in list(buckets)[:excess]:  # insertion order: oldest first
                del buckets[address]

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(seconds: float) -> str:
    """The ``Retry-After`` header value for a wait of ``seconds`` (whole seconds, >= 1)."""
    return str(max(1, math.ceil(seconds)))


@dataclass(frozen=True, slots=True)
class Limits:
    """A node's limits beyond ``HubConfig``, given to ``Hub(limits=...)``.

    ``rate``: the rate limit of every connection whose route does not set its own
    (``Hub.route(..., rate_limit=)``); None: unlimited. ``connects_per_address``: new
    WebSocket connections per second from one client address (0: off; behind a load
    balancer every client has its address, so limit there instead).
    ``connect_burst``: how many may come at once (default: one second's worth).
    ``handshake_timeout``: seconds a new socket has to send its complete request head
    before it is closed (0: never; aiohttp's keep-alive timeout then applies).
    """

    rate: RateLimit | None = None
    connects_per_address: float = 0.0
    connect_burst: int | None = None
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT

    def __post_init__(self) -> None:
        if self.rate is not None and not isinstance(self.rate, RateLimit):
            raise TypeError(f"Limits.rate must be a RateLimit or None, got "
                            f"{type(self.rate).__name__}")
        for name in ("connects_per_address", "handshake_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"Limits.{name} must be a number, got {type(value).__name__}")
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"Limits.{name} must be a finite number >= 0 (0: off), "
                                 f"got {value}")

    def connect_limiter(self) -> ConnectLimiter | None:
        """The per-address limiter these settings ask for, or None when it is off."""
        if not self.connects_per_address:
            return None
        return ConnectLimiter(self.connects_per_address, self.connect_burst)
