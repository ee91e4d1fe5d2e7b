"""A small cache bounded by bytes, for work that many connections would otherwise repeat.

A reconnect storm has many clients of one room recover the same messages at once: each
reads the room's history and is sent each missed message. What a message decodes to,
and the frame it is sent in, are the same for all of them, so the broker keeps the
envelopes it decoded from history entries (keyed by the entry's bytes) and the hub the
frames it built for replayed messages (keyed by room and position), each in one of these.
Both keys name content that never changes (an offset is never reused within an epoch),
so nothing is ever stale; the bound only keeps memory in check.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

ENTRY_OVERHEAD: Final = 400
"""Bytes an entry takes beyond its payload bytes (its key, the objects it holds, the
map's own node), to add to the size a caller puts it with: about what tracemalloc
shows for a 64-byte message (a decoded envelope with its key: 566 B for 234 counted
payload bytes, a replay frame: 689 for 293)."""


class BoundedCache(Generic[K, V]):
    """A map that forgets its oldest entries once their sizes add up to over ``max_bytes``.

    Oldest means first put (a read does not renew an entry): in a storm the same entries
    are read again within moments, so order of insertion is enough, at no cost per read.
    An entry larger than ``max_bytes`` is not kept. (An OrderedDict, whose oldest entry
    goes in constant time: taking a plain dict's first key passes over every entry
    deleted before it, 20 µs per eviction at 30,000 entries against 0.16.)
    """

    __slots__ = ("_items", "_size", "max_bytes")

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._size = 0

    def get(self, key: K) -> V | None:
        """The value put under ``key``, or None."""
        item = self._items.get(key)
        return None if item is None else item[0]

    def put(self, key: K, value: V, size: int) -> None:
        """Keep ``value`` under ``key``, counted as ``size`` bytes; drop the oldest
        entries while the total is over the bound."""
        if size > self.max_bytes:
            return
        items = self._items
        old = items.pop(key, None)
        if old is not None:
            self._size -= old[1]
        items[key] = (value, size)
        self._size += size
        while self._size > self.max_bytes:
            self._size -= items.popitem(last=False)[1][1]

    @property
    def size(self) -> int:
        """Bytes counted for the entries held."""
        return self._size

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
        self._size = 0
