"""Positions, history bounds, the per-room policy and a page's gap rule, with plain values."""

from __future__ import annotations

from typing import Any

import pytest

from roomcast.shared.envelope import Kind, room_envelope
from roomcast.shared.history import (
    EPOCH,
    LIMIT,
    MAX_OFFSET,
    WINDOW,
    History,
    HistoryPage,
    HistoryPolicy,
    Position,
    new_epoch,
    validate_epoch,
    validate_idempotency_key,
)
from roomcast.shared.ids import Room

R = Room("lobby")


def page(top: int, offsets: list[int], *, epoch: str = "e1", since: int | None = None,
         more: bool = False) -> HistoryPage:
    """A page of ``lobby`` holding messages at ``offsets``."""
    envs = tuple(room_envelope(R, b"m%d" % o, binary=False).with_position(epoch, o)
                 for o in offsets)
    return HistoryPage(R, epoch, top, envs, since, more)


def test_new_epochs_are_valid_and_distinct() -> None:
    """A new epoch is 8 characters of the epoch alphabet, and two are not the same."""
    epochs = {new_epoch() for _ in range(100)}
    assert len(epochs) == 100
    for epoch in epochs:
        assert len(epoch) == 8
        assert validate_epoch(epoch) == epoch


def test_position_validates_and_unpacks() -> None:
    """A Position holds a valid epoch and offset and unpacks to (epoch, offset)."""
    epoch, offset = Position("f3k9q2", 41)
    assert (epoch, offset) == ("f3k9q2", 41)
    assert list(Position("a", MAX_OFFSET)) == ["a", MAX_OFFSET]
    assert Position("a", 1) == Position("a", 1)


@pytest.mark.parametrize(
    ("epoch", "offset", "error", "match"),
    [
        ("", 1, ValueError, "epoch"),
        ("x" * 33, 1, ValueError, "epoch"),
        ("a.b", 1, ValueError, "epoch"),
        (1, 1, TypeError, "epoch"),
        ("a", -1, ValueError, "offset"),
        ("a", MAX_OFFSET + 1, ValueError, "offset"),
        ("a", 1.0, TypeError, "offset"),
        ("a", True, TypeError, "offset"),
    ],
)
def test_bad_positions_are_refused(epoch: Any, offset: Any, error: type[Exception],
                                   match: str) -> None:
    """An epoch outside 1-32 of [0-9A-Za-z_-] or an offset outside 0..2^53-1 is refused."""
    with pytest.raises(error, match=match):
        Position(epoch, offset)


def test_history_bounds_and_derived_ttls() -> None:
    """Size 0 is no history; meta TTL is max(24 h, 10 x ttl); keys live max(ttl, 300 s)."""
    assert not History(size=0).enabled
    history = History(size=100, ttl=300)
    assert history.enabled
    assert history.ttl_ms == 300_000
    assert history.meta_ttl == 24 * 3600
    assert History(ttl=3 * 24 * 3600).meta_ttl == 30 * 24 * 3600
    assert history.idempotency_ttl == 300
    assert History(ttl=1).idempotency_ttl == 300
    assert History(ttl=0.0004 * 10).ttl_ms == 4


@pytest.mark.parametrize(
    ("size", "ttl", "error", "match"),
    [
        (-1, 300, ValueError, "size"),
        (1_000_001, 300, ValueError, "size"),
        (1.5, 300, TypeError, "size"),
        (10, 0, ValueError, "ttl"),
        (10, 31 * 24 * 3600, ValueError, "ttl"),
        (10, "300", TypeError, "ttl"),
    ],
)
def test_bad_history_bounds_are_refused(size: Any, ttl: Any, error: type[Exception],
                                        match: str) -> None:
    """A size outside 0..1,000,000 or a ttl outside 1 ms..30 days says what is wrong."""
    with pytest.raises(error, match=match):
        History(size=size, ttl=ttl)


@pytest.mark.parametrize("key", ["a", "x" * 200, "order-42:retry/1", "!~"])
def test_idempotency_keys_within_the_rules(key: str) -> None:
    """1-200 visible ASCII characters make a key."""
    assert validate_idempotency_key(key) == key


@pytest.mark.parametrize("key", ["", "x" * 201, "with space", "tab\t", "é", "nl\n"])
def test_idempotency_keys_outside_the_rules(key: str) -> None:
    """An empty, long, spaced, control or non-ASCII key is a ValueError naming the rule."""
    with pytest.raises(ValueError, match="1-200 visible ASCII"):
        validate_idempotency_key(key)


def test_policy_default_exact_and_patterns() -> None:
    """Exact names win over patterns, the first matching pattern wins, None or size 0
    turns history off, other rooms get the default."""
    default, chat, big = History(10), History(20), History(500)
    policy = HistoryPolicy(default, {
        "chat:vip": big, "chat:*": chat, "chat:v*": big, "tmp-*": None, "quiet": History(0),
        "chat:*x": None,
    })
    assert policy.for_room("lobby") == default
    assert policy.for_room("chat:vip") == big
    assert policy.for_room("chat:vx") == chat  # "chat:*" is listed before "chat:v*"
    assert policy.for_room("tmp-1") is None
    assert policy.for_room("quiet") is None
    assert policy.for_room("chat:*") == chat  # a room named like the pattern: exact
    assert policy.enabled
    assert policy.for_room("Chat:a") == default  # case-sensitive


def test_policy_without_history() -> None:
    """The default policy keeps no history for any room."""
    policy = HistoryPolicy()
    assert policy.for_room("lobby") is None
    assert not policy.enabled
    assert not HistoryPolicy(History(0)).enabled
    assert HistoryPolicy(None, {"news": History(5)}).enabled


def test_policy_cache_stays_bounded() -> None:
    """Looking up many rooms keeps answering right with a bounded cache."""
    policy = HistoryPolicy(None, {"r1*": History(3)})
    for i in range(10_000):
        assert (policy.for_room(f"r{i}") is not None) == str(i).startswith("1")
    assert len(policy._cache) <= HistoryPolicy._CACHE_SIZE


@pytest.mark.parametrize(
    ("rooms", "error"),
    [({"": History()}, ValueError), ({"a": 5}, TypeError)],
)
def test_policy_refuses_bad_overrides(rooms: Any, error: type[Exception]) -> None:
    """An override for an invalid room name, or not a History, is refused."""
    with pytest.raises(error):
        HistoryPolicy(None, rooms)


def test_page_that_follows_on_fills_the_gap() -> None:
    """Entries since+1..top, in the same epoch: no gap; position is (epoch, top)."""
    full = page(5, [3, 4, 5], since=2)
    assert full.gap(Position("e1", 2)) is None
    assert full.position == Position("e1", 5)
    assert page(5, [], since=5).gap(Position("e1", 5)) is None


def test_page_gaps_have_reasons() -> None:
    """Another epoch or a position past the top: epoch; trimmed past since: window;
    more than the limit: limit."""
    assert page(5, [3, 4, 5], since=2).gap(Position("e0", 2)) == EPOCH
    assert page(5, [], since=7).gap(Position("e1", 7)) == EPOCH
    assert page(5, [4, 5], since=2).gap(Position("e1", 2)) == WINDOW
    assert page(5, [], since=2).gap(Position("e1", 2)) == WINDOW
    assert page(9, [7, 8, 9], since=2, more=True).gap(Position("e1", 2)) == LIMIT
    assert page(5, [3, 5, 4], since=2).gap(Position("e1", 2)) == WINDOW


def test_page_entries_of_an_older_epoch_do_not_fill_a_gap() -> None:
    """Entries that carry another epoch than the page's do not count as contiguous."""
    envs = tuple(room_envelope(R, b"m", binary=False).with_position("old", o) for o in (3, 4))
    mixed = HistoryPage(R, "e1", 4, envs, 2, False)
    assert mixed.gap(Position("e1", 2)) == WINDOW
    assert envs[0].kind is Kind.ROOM
