"""RoomIndex: local membership, and the first-join / last-leave signals the hub acts on."""

from __future__ import annotations

from roomcast.node.rooms import RoomIndex
from roomcast.shared.ids import ConnectionId, Room

A = ConnectionId("n1.1")
B = ConnectionId("n1.2")
LOBBY = Room("lobby")
GAMES = Room("games")


def test_join_true_only_for_first_member() -> None:
    """join returns True for a room's first local member and False after."""
    index: RoomIndex[str] = RoomIndex()
    assert index.join(LOBBY, A, "a") is True
    assert index.join(LOBBY, B, "b") is False
    assert index.join(LOBBY, A, "a") is False


def test_leave_true_only_when_last_leaves() -> None:
    """leave returns True only when the room's last local member leaves."""
    index: RoomIndex[str] = RoomIndex()
    index.join(LOBBY, A, "a")
    index.join(LOBBY, B, "b")
    assert index.leave(LOBBY, A) is False
    assert index.leave(LOBBY, B) is True
    assert index.size(LOBBY) == 0
    assert list(index.rooms()) == []


def test_leave_non_member_is_false() -> None:
    """Leaving a room one is not in (or that does not exist) is False and changes nothing."""
    index: RoomIndex[str] = RoomIndex()
    assert index.leave(LOBBY, A) is False
    index.join(LOBBY, A, "a")
    assert index.leave(LOBBY, B) is False
    assert index.leave(GAMES, A) is False
    assert index.contains(LOBBY, A)
    assert index.rooms_of(A) == {LOBBY}


def test_rejoin_after_empty_is_first_again() -> None:
    """A room emptied and joined again reports a first member again."""
    index: RoomIndex[str] = RoomIndex()
    index.join(LOBBY, A, "a")
    index.leave(LOBBY, A)
    assert index.join(LOBBY, B, "b") is True


def test_none_member_can_leave() -> None:
    """A member object of None is still removed properly, and the room emptied."""
    index: RoomIndex[None] = RoomIndex()
    index.join(LOBBY, A, None)
    assert index.leave(LOBBY, A) is True
    assert index.rooms_of(A) == frozenset()
    assert len(index) == 0


def test_leave_all_reports_left_and_emptied() -> None:
    """leave_all returns every room left and those now without a local member."""
    index: RoomIndex[str] = RoomIndex()
    index.join(LOBBY, A, "a")
    index.join(GAMES, A, "a")
    index.join(GAMES, B, "b")
    left, emptied = index.leave_all(A)
    assert sorted(left) == [GAMES, LOBBY]
    assert emptied == [LOBBY]
    assert index.rooms_of(A) == frozenset()
    assert not index.contains(GAMES, A)
    assert index.size(GAMES) == 1
    assert list(index.rooms()) == [GAMES]


def test_leave_all_of_unknown_member() -> None:
    """leave_all of a connection in no room returns two empty lists."""
    index: RoomIndex[str] = RoomIndex()
    assert index.leave_all(A) == ([], [])


def test_members_view() -> None:
    """members maps connection id to member object; an unknown room is empty."""
    index: RoomIndex[str] = RoomIndex()
    index.join(LOBBY, A, "a")
    index.join(LOBBY, B, "b")
    assert dict(index.members(LOBBY)) == {A: "a", B: "b"}
    assert dict(index.members(GAMES)) == {}
    view = index.members(LOBBY)
    index.leave(LOBBY, B)
    assert dict(view) == {A: "a"}


def test_rooms_of_and_contains() -> None:
    """rooms_of lists a connection's rooms and contains answers per room."""
    index: RoomIndex[str] = RoomIndex()
    index.join(LOBBY, A, "a")
    index.join(GAMES, A, "a")
    assert index.rooms_of(A) == {LOBBY, GAMES}
    assert index.rooms_of(B) == frozenset()
    assert index.contains(LOBBY, A)
    assert not index.contains(LOBBY, B)
    assert not index.contains(Room("nowhere"), A)


def test_size_and_len() -> None:
    """size counts a room's members; len counts rooms with a member."""
    index: RoomIndex[str] = RoomIndex()
    assert index.size(LOBBY) == 0
    index.join(LOBBY, A, "a")
    index.join(LOBBY, B, "b")
    index.join(GAMES, B, "b")
    assert index.size(LOBBY) == 2
    assert index.size(GAMES) == 1
    assert len(index) == 2
