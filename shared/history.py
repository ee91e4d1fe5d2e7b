"""Room history: positions, how much history a room keeps, and a page read from it.

Pure values, no I/O. A room **with history** keeps its recent messages (bounded by
``History.size`` and by age, ``History.ttl``); every message published to it gets a
``Position``: ``offset`` counts up by one per message within an ``epoch``, and the epoch
(a short random string) changes whenever the room's history may have been lost. Within
one epoch an offset is never reused; an epoch carries no order.

``HistoryPolicy`` says which rooms keep history and how much (a default, and overrides by
exact room name or ``fnmatch`` pattern); nodes and Publishers that share rooms must use
the same policy, like the same prefix. ``HistoryPage`` is what a history read returns,
and ``HistoryPage.gap`` decides whether it fills the gap after a position.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Final, Literal

from roomcast.shared.envelope import EPOCH_RE, MAX_OFFSET, Envelope
from roomcast.shared.ids import Room, validate_room

MAX_EPOCH_LENGTH: Final = 32

MAX_HISTORY_SIZE: Final = 1_000_000
"""Messages one room may keep at most (Redis memory is the operator's, but bounded)."""
MIN_HISTORY_TTL: Final = 0.001
MAX_HISTORY_TTL: Final = 30 * 24 * 3600.0
"""A room's messages may be kept from 1 ms to 30 days."""
MIN_META_TTL: Final = 24 * 3600.0
"""A room's epoch and top offset outlive its messages: at least a day, or 10 x ttl."""
MIN_IDEMPOTENCY_TTL: Final = 300.0
"""An idempotency key is remembered for max(ttl, 5 minutes) after its publish."""
MAX_READ_LIMIT: Final = 10_000
"""Messages one history read returns at most (page through longer histories)."""
MAX_IDEMPOTENCY_KEY_LENGTH: Final = 200
_IDEMPOTENCY_KEY_RE: Final = re.compile(r"[\x21-\x7e]{1,200}")

Reason = Literal["epoch", "window", "limit"]
"""Why a page does not fill a gap (the ``reason`` values of docs/protocol.md)."""
EPOCH: Final[Reason] = "epoch"
"""The room's history was lost since the position (its epoch changed)."""
WINDOW: Final[Reason] = "window"
"""The position is older than what the history still holds (trimmed by size or age)."""
LIMIT: Final[Reason] = "limit"
"""More messages followed the position than the read returns."""


def new_epoch() -> str:
    """A random epoch: 8 characters of ``[0-9A-Za-z_-]`` (48 bits)."""
    return secrets.token_urlsafe(6)


def validate_epoch(epoch: object) -> str:
    """``epoch`` if it is a valid epoch; TypeError/ValueError say what is wrong."""
    if not isinstance(epoch, str):
        raise TypeError(f"epoch must be a str, got {type(epoch).__name__}")
    if not EPOCH_RE.fullmatch(epoch):
        raise ValueError(f"epoch {epoch!r} must be 1-{MAX_EPOCH_LENGTH} characters of "
                         "[0-9A-Za-z_-]")
    return epoch


def validate_offset(offset: object, name: str = "offset") -> int:
    """``offset`` if it is an int from 0 to 2^53-1; TypeError/ValueError otherwise."""
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"{name} must be an int, got {type(offset).__name__}")
    if not 0 <= offset <= MAX_OFFSET:
        raise ValueError(f"{name} must be from 0 to 2^53-1, got {offset}")
    return offset


def validate_idempotency_key(key: object) -> str:
    """``key`` if it is 1-200 visible ASCII characters (0x21-0x7E); else TypeError or
    ValueError saying so (the HTTP API answers 400 with it)."""
    if not isinstance(key, str):
        raise TypeError(f"idempotency key must be a str, got {type(key).__name__}")
    if not _IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise ValueError(
            f"idempotency key must be 1-{MAX_IDEMPOTENCY_KEY_LENGTH} visible ASCII "
            f"characters (no spaces or control characters), got {len(key)} character(s)"
            + ("" if len(key) > MAX_IDEMPOTENCY_KEY_LENGTH or not key else
               f": {key[:40]!r}")
        )
    return key


@dataclass(frozen=True, slots=True)
class Position:
    """Where a message stands in its room's history: ``(epoch, offset)``.

    Offset 0 is "before the first message" of the epoch. Compare offsets only within
    one epoch.
    """

    epoch: str
    offset: int

    def __post_init__(self) -> None:
        validate_epoch(self.epoch)
        validate_offset(self.offset)

    def __iter__(self) -> Iterator[str | int]:
        """``epoch, offset = position`` works, and ``list(p)`` is the wire form."""
        yield self.epoch
        yield self.offset


@dataclass(frozen=True, slots=True)
class History:
    """How much history one room keeps: the last ``size`` messages, none older than
    ``ttl`` seconds. ``size`` 0 means no history (a per-room override that turns it off).
    """

    size: int = 100
    ttl: float = 300.0

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise TypeError(f"history size must be an int, got {type(self.size).__name__}")
        if not 0 <= self.size <= MAX_HISTORY_SIZE:
            raise ValueError(f"history size must be from 0 (no history) to "
                             f"{MAX_HISTORY_SIZE}, got {self.size}")
        if isinstance(self.ttl, bool) or not isinstance(self.ttl, int | float):
            raise TypeError(f"history ttl must be a number of seconds, got "
                            f"{type(self.ttl).__name__}")
        if not MIN_HISTORY_TTL <= self.ttl <= MAX_HISTORY_TTL:
            raise ValueError(f"history ttl must be from {MIN_HISTORY_TTL} s to "
                             f"{MAX_HISTORY_TTL:.0f} s (30 days), got {self.ttl}")

    @property
    def enabled(self) -> bool:
        """True when the room keeps messages (``size`` > 0)."""
        return self.size > 0

    @property
    def ttl_ms(self) -> int:
        """``ttl`` in whole milliseconds (at least 1)."""
        return max(1, round(self.ttl * 1000))

    @property
    def meta_ttl(self) -> float:
        """Seconds the room's epoch and top offset outlive its last publish:
        max(24 h, 10 x ttl), so a quiet room keeps its epoch longer than its messages."""
        return max(MIN_META_TTL, 10 * self.ttl)

    @property
    def idempotency_ttl(self) -> float:
        """Seconds a publish's idempotency key is remembered: max(ttl, 300 s)."""
        return max(MIN_IDEMPOTENCY_TTL, self.ttl)


NO_HISTORY: Final = History(size=0)


class HistoryPolicy:
    """Which rooms keep history, and how much.

    ``default`` applies to every room (None: no history); ``rooms`` overrides it by exact
    room name or by ``fnmatch`` pattern (``*``, ``?``, ``[...]``, case-sensitive), a
    value of None or ``History(size=0)`` turning history off. An exact name wins over
    patterns; among patterns the first that matches, in the mapping's order, wins.
    Every node and Publisher of one cluster must use the same policy.
    """

    __slots__ = ("_cache", "_exact", "_patterns", "default")

    _CACHE_SIZE: Final = 4096

    def __init__(
        self,
        default: History | None = None,
        rooms: Mapping[str, History | None] | None = None,
    ) -> None:
        if default is not None and not isinstance(default, History):
            raise TypeError(f"default must be a History or None, got {type(default).__name__}")
        self.default = default if default is not None and default.enabled else None
        self._exact: dict[str, History | None] = {}
        self._patterns: list[tuple[str, History | None]] = []
        for name, history in (rooms or {}).items():
            validate_room(name)
            if history is not None and not isinstance(history, History):
                raise TypeError(f"history of room {name!r} must be a History or None, got "
                                f"{type(history).__name__}")
            value = history if history is not None and history.enabled else None
            self._exact[name] = value
            if any(ch in name for ch in "*?["):
                self._patterns.append((name, value))
        self._cache: dict[str, History | None] = {}

    @property
    def enabled(self) -> bool:
        """False when no room can have history (the hub can skip every history step)."""
        return self.default is not None or any(
            h is not None for h in self._exact.values())

    def for_room(self, room: str) -> History | None:
        """The history ``room`` keeps, or None when it keeps none."""
        cache = self._cache
        try:
            return cache[room]
        except KeyError:
            pass
        if room in self._exact:
            found = self._exact[room]
        else:
            found = self.default
            for pattern, history in self._patterns:
                if fnmatchcase(room, pattern):
                    found = history
                    break
        if len(cache) >= self._CACHE_SIZE:
            cache.clear()
        cache[room] = found
        return found

    def __repr__(self) -> str:
        return f"HistoryPolicy(default={self.default!r}, rooms={self._exact!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HistoryPolicy):
            return NotImplemented
        return (self.default, list(self._exact.items())) == (
            other.default, list(other._exact.items()))

    def __hash__(self) -> int:
        return hash((self.default, tuple(self._exact.items())))


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """What one history read of a room returned, read atomically.

    ``epoch`` and ``top`` are the room's position now (``top`` 0: nothing published in
    this epoch yet). ``envelopes`` are the messages after ``since`` (or the latest ones
    when ``since`` is None), oldest first, each with its position; at most ``limit`` of
    them: when more followed ``since``, ``more`` is True and ``envelopes`` holds the
    newest ``limit``. Messages older than the room's ``ttl`` are left out (trimmed), so
    the page may start later than ``since + 1``. After an epoch change that kept the
    offsets (see RedisBroker), a "latest" read may hold messages of the previous epoch:
    each envelope carries its own epoch.
    """

    room: Room
    epoch: str
    top: int
    envelopes: tuple[Envelope, ...]
    since: int | None = None
    more: bool = False

    @property
    def position(self) -> Position:
        """The room's position now: the next message gets ``top + 1`` in ``epoch``."""
        return Position(self.epoch, self.top)

    def gap(self, since: Position) -> Reason | None:
        """None when this page (read since ``since.offset``) holds every message after
        ``since``, in order; otherwise why not: EPOCH, WINDOW or LIMIT.

        A position past ``top`` in this epoch was never given out (this epoch never
        reached it): EPOCH, as for a position of a lost history.
        """
        if since.epoch != self.epoch or since.offset > self.top:
            return EPOCH
        if since.offset == self.top:
            return None
        if self.more:
            return LIMIT
        expected = since.offset + 1
        if len(self.envelopes) != self.top - since.offset:
            return WINDOW
        for env in self.envelopes:
            if env.epoch != since.epoch or env.offset != expected:
                return WINDOW
            expected += 1
        return None
