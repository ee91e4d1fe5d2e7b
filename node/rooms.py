"""The local room index: which of this node's connections are in which room.

Everything about room membership on one node lives here: plain code, no I/O. The hub
asks it who is in a room and learns from ``join``/``leave`` when a room gains its first
local member or loses its last (the moments to subscribe to or drop the room's channel).

Members are of three kinds, kept apart so that a broadcast frames a message once per
kind and not once per member: ``plain`` members get the application's message as it is,
``framed`` members (``roomcast.v1`` connections) get it in a v1 ``message`` frame, and a
member that is neither is *pending*: a v1 member whose history is still being read
(the hub serves it on its own until ``activate``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

from roomcast.shared.ids import ConnectionId, Room

T = TypeVar("T")

_EMPTY: Mapping[ConnectionId, Any] = {}
_MISSING: Any = object()


class RoomIndex(Generic[T]):
    """Rooms to members (``ConnectionId`` → member object) and members to rooms."""

    __slots__ = ("_framed", "_members", "_plain", "_rooms_of")

    def __init__(self) -> None:
        self._members: dict[Room, dict[ConnectionId, T]] = {}
        self._plain: dict[Room, dict[ConnectionId, T]] = {}
        self._framed: dict[Room, dict[ConnectionId, T]] = {}
        self._rooms_of: dict[ConnectionId, set[Room]] = {}

    def join(
        self, room: Room, conn_id: ConnectionId, member: T, *, framed: bool = False,
        pending: bool = False,
    ) -> bool:
        """Add a member (plain, or framed; ``pending``: neither until ``activate``);
        True if ``room`` had no local member before."""
        members = self._members.get(room)
        first = members is None
        if members is None:
            members = self._members[room] = {}
        members[conn_id] = member
        if not pending:
            kind = self._framed if framed else self._plain
            kind.setdefault(room, {})[conn_id] = member
        self._rooms_of.setdefault(conn_id, set()).add(room)
        return first

    def activate(self, room: Room, conn_id: ConnectionId) -> None:
        """A pending member becomes a framed one (no-op if it is not a member)."""
        members = self._members.get(room)
        if members is not None and conn_id in members:
            self._framed.setdefault(room, {})[conn_id] = members[conn_id]

    def _drop(self, room: Room, conn_id: ConnectionId) -> None:
        for kind in (self._plain, self._framed):
            members = kind.get(room)
            if members is not None and members.pop(conn_id, _MISSING) is not _MISSING \
                    and not members:
                del kind[room]

    def leave(self, room: Room, conn_id: ConnectionId) -> bool:
        """Remove a member; True if ``room`` has no local member left (and was joined)."""
        members = self._members.get(room)
        # Membership by key, not by popped value: a member object may itself be None.
        if members is None or conn_id not in members:
            return False
        del members[conn_id]
        self._drop(room, conn_id)
        rooms = self._rooms_of.get(conn_id)
        if rooms is not None:
            rooms.discard(room)
            if not rooms:
                del self._rooms_of[conn_id]
        if members:
            return False
        del self._members[room]
        return True

    def leave_all(self, conn_id: ConnectionId) -> tuple[list[Room], list[Room]]:
        """Remove a member from every room: (rooms it left, rooms now empty locally)."""
        rooms = self._rooms_of.pop(conn_id, set())
        emptied = []
        for room in rooms:
            members = self._members[room]
            del members[conn_id]
            self._drop(room, conn_id)
            if not members:
                del self._members[room]
                emptied.append(room)
        return sorted(rooms), emptied

    def members(self, room: Room) -> Mapping[ConnectionId, T]:
        """The local members of ``room`` (a live view: copy before awaiting)."""
        members = self._members.get(room)
        return _EMPTY if members is None else members

    def plain(self, room: Room) -> Mapping[ConnectionId, T]:
        """The members of ``room`` that get messages as they are (a live view)."""
        members = self._plain.get(room)
        return _EMPTY if members is None else members

    def framed(self, room: Room) -> Mapping[ConnectionId, T]:
        """The members of ``room`` that get v1 frames, pending ones excepted (a live view)."""
        members = self._framed.get(room)
        return _EMPTY if members is None else members

    def size(self, room: Room) -> int:
        """How many local members ``room`` has."""
        members = self._members.get(room)
        return 0 if members is None else len(members)

    def rooms_of(self, conn_id: ConnectionId) -> frozenset[Room]:
        """The rooms ``conn_id`` is in."""
        return frozenset(self._rooms_of.get(conn_id, ()))

    def contains(self, room: Room, conn_id: ConnectionId) -> bool:
        """Whether ``conn_id`` is a local member of ``room``."""
        members = self._members.get(room)
        return members is not None and conn_id in members

    def rooms(self) -> Iterator[Room]:
        """Every room with at least one local member."""
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)
