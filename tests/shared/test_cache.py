"""shared.cache.BoundedCache: what it keeps and what it forgets."""

from __future__ import annotations

import pytest

from roomcast.shared.cache import BoundedCache


def test_keeps_what_fits_and_forgets_the_oldest_first() -> None:
    cache: BoundedCache[str, int] = BoundedCache(10)
    cache.put("a", 1, 4)
    cache.put("b", 2, 4)
    assert (cache.get("a"), cache.get("b"), cache.size, len(cache)) == (1, 2, 8, 2)
    cache.get("a")  # a read does not renew an entry
    cache.put("c", 3, 4)  # 12 > 10: "a", the oldest put, goes
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (None, 2, 3)
    assert (cache.size, len(cache)) == (8, 2)
    cache.put("d", 4, 10)  # exactly the bound: everything else goes
    assert (cache.get("b"), cache.get("c"), cache.get("d"), cache.size) == (None, None, 4, 10)


def test_an_entry_over_the_bound_is_not_kept_and_evicts_nothing() -> None:
    cache: BoundedCache[str, int] = BoundedCache(10)
    cache.put("a", 1, 6)
    cache.put("big", 2, 11)
    assert (cache.get("a"), cache.get("big"), cache.size) == (1, None, 6)


def test_putting_a_key_again_replaces_it_and_its_size() -> None:
    cache: BoundedCache[str, int] = BoundedCache(10)
    cache.put("a", 1, 6)
    cache.put("a", 2, 3)
    assert (cache.get("a"), cache.size, len(cache)) == (2, 3, 1)
    cache.clear()
    assert (cache.get("a"), cache.size, len(cache)) == (None, 0, 0)


def test_a_negative_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        BoundedCache(-1)


def test_a_long_run_of_puts_keeps_exactly_the_newest_that_fit() -> None:
    cache: BoundedCache[int, int] = BoundedCache(1000)
    for i in range(20_000):
        cache.put(i, i, 10)
    assert (len(cache), cache.size) == (100, 1000)
    assert [cache.get(i) for i in (19_899, 19_900, 19_999)] == [None, 19_900, 19_999]
