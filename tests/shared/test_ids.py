"""Node ids, connection ids that name their node, and room-name limits."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roomcast.shared.ids import (
    MAX_ROOM_LENGTH,
    NodeId,
    make_connection_id,
    new_node_id,
    node_of,
    validate_node_id,
    validate_room,
)


def test_new_node_id_format() -> None:
    """A new node id is 12 lowercase hex characters and passes validate_node_id."""
    node = new_node_id()
    assert re.fullmatch(r"[0-9a-f]{12}", node)
    assert validate_node_id(node) == node


def test_new_node_ids_differ() -> None:
    """Node ids are random: many draws do not collide."""
    assert len({new_node_id() for _ in range(100)}) == 100


@pytest.mark.parametrize("value", ["", "a" * 65, "ABC", "a.b", "node-1", "nöde"])
def test_validate_node_id_rejects(value: str) -> None:
    """Node ids outside 1-64 chars of [0-9a-z] raise ValueError."""
    with pytest.raises(ValueError):
        validate_node_id(value)


def test_validate_node_id_rejects_non_str() -> None:
    """A non-str node id is a TypeError."""
    with pytest.raises(TypeError):
        validate_node_id(12)  # type: ignore[arg-type]


def test_connection_id_format() -> None:
    """A connection id is '<node>.<sequence in hex>'."""
    assert make_connection_id(NodeId("abc123"), 255) == "abc123.ff"


@given(st.from_regex(r"[0-9a-z]{1,64}", fullmatch=True), st.integers(0, 2**64 - 1))
def test_node_of_round_trip(node: str, sequence: int) -> None:
    """node_of recovers the node from any id make_connection_id builds."""
    assert node_of(make_connection_id(NodeId(node), sequence)) == node


@pytest.mark.parametrize(
    "value",
    [
        "",
        "abc",
        "abc.",
        ".1f",
        "abc.xyz",
        "abc.1F",
        "abc.-1",
        "ABC.1",
        "a.b.1",
        "abc." + "f" * 17,
        "abc. 1",
    ],
)
def test_node_of_rejects_malformed(value: str) -> None:
    """Strings that are not node.hex raise ValueError."""
    with pytest.raises(ValueError):
        node_of(value)


def test_node_of_rejects_non_str() -> None:
    """A non-str connection id is a TypeError."""
    with pytest.raises(TypeError):
        node_of(b"abc.1")  # type: ignore[arg-type]


@pytest.mark.parametrize("room", ["a", "lobby", "x" * MAX_ROOM_LENGTH, "chat/ümlaut 💬", "a b"])
def test_validate_room_accepts(room: str) -> None:
    """Printable names of 1 to MAX_ROOM_LENGTH characters are returned unchanged."""
    assert validate_room(room) == room


@pytest.mark.parametrize(
    ("room", "message"),
    [
        ("", "1-200"),
        ("x" * (MAX_ROOM_LENGTH + 1), "1-200"),
        ("a\nb", "control"),
        ("\x00", "control"),
        ("tab\there", "control"),
        ("del\x7f", "control"),
        ("\ud800", "surrogate"),
    ],
)
def test_validate_room_rejects(room: str, message: str) -> None:
    """Empty, too long, control characters and unencodable names raise ValueError."""
    with pytest.raises(ValueError, match=message):
        validate_room(room)


@pytest.mark.parametrize("room", [None, 1, b"lobby", ["lobby"]])
def test_validate_room_rejects_non_str(room: object) -> None:
    """A non-str room name is a TypeError."""
    with pytest.raises(TypeError, match="room name must be a str"):
        validate_room(room)
