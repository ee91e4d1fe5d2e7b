"""Publish to roomcast from any Python process that does not run a node.

A worker, a cron job or another web app can reach rooms, one connection, a user's
connections or everyone, and read cluster-wide room and user membership, through the
same Redis the nodes use (one server or a Redis Cluster, by the URL's scheme, as for the
nodes)::

    async with Publisher("redis://redis:6379/0") as pub:
        await pub.publish_to_room("lobby", "hello")
        print(await pub.room_size("lobby"))
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Self

from roomcast.broker import _scripts as scripts
from roomcast.broker._history import RedisHistory
from roomcast.broker._keys import Keys
from roomcast.broker._transport import DEFAULT_SOCKET_TIMEOUT, REDIS_ERRORS
from roomcast.broker._urls import is_cluster_url
from roomcast.broker.base import check_history_publish, check_history_read
from roomcast.broker.redis import check_positive, transport_for
from roomcast.shared.envelope import Envelope, Kind, encode
from roomcast.shared.errors import BrokerError, PublishError
from roomcast.shared.history import HistoryPage, HistoryPolicy, Position
from roomcast.shared.ids import ConnectionId, Room, node_of, validate_room
from roomcast.shared.presence import Presence, decode_info
from roomcast.shared.users import check_not_user_room, encode_disconnect, user_room

Data = str | bytes
"""A message: ``str`` is sent as a text frame, ``bytes`` as a binary frame."""


def external_envelope(kind: Kind, target: str, data: Data, exclude: str | None) -> Envelope:
    """The envelope a process that is not a node publishes (no origin node)."""
    if isinstance(data, str):
        payload, binary = data.encode(), False
    elif isinstance(data, bytes | bytearray | memoryview):
        payload, binary = bytes(data), True
    else:
        raise TypeError(f"data must be str or bytes, got {type(data).__name__}")
    if exclude is not None:
        node_of(exclude)
    return Envelope(
        kind, target, payload, binary, origin="", exclude=exclude or "", sent_at=time.time()
    )


class Publisher:
    """Sends envelopes to the nodes sharing ``prefix`` on the Redis at ``url``; not a node.

    ``url`` is any URL the nodes take: ``redis://``, ``rediss://``, ``unix://``, or
    ``redis+cluster://`` / ``rediss+cluster://`` for a Redis Cluster. ``presence_ttl``
    must match the nodes' so that ``room_members`` leaves out the same dead nodes they
    do, and ``history`` their history policy, so that a room's messages are stored
    (and get positions) whoever publishes them. Publishes are pipelined as a node's
    are; failures raise PublishError and are counted in ``publish_failures``.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "roomcast",
        presence_ttl: float = 5.0,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        history: HistoryPolicy | None = None,
    ) -> None:
        check_positive("presence_ttl", presence_ttl)
        if history is not None and not isinstance(history, HistoryPolicy):
            raise TypeError(f"history must be a HistoryPolicy, got {type(history).__name__}")
        self._history_policy = history if history is not None else HistoryPolicy()
        self._keys = Keys(prefix, cluster=isinstance(url, str) and is_cluster_url(url))
        self._transport = transport_for(url, socket_timeout=socket_timeout)
        self._history = RedisHistory(self._transport, self._keys)
        self._presence_ttl = float(presence_ttl)
        self._closed = False
        self.published = 0
        self.publish_failures = 0

    async def publish_to_room(
        self,
        room: str,
        data: Data,
        *,
        exclude: str | None = None,
        idempotency_key: str | None = None,
    ) -> Position | None:
        """Send ``data`` to every member of ``room`` on every node, except ``exclude``.

        For a room with history (by the ``history`` policy) the message is stored and
        its position returned; with ``idempotency_key`` a retry of a publish that was
        made (the same key in the same room within ``max(ttl, 300 s)``) returns the
        first position and is neither stored nor sent again, so a backend may retry
        after a timeout. Rooms without history return None (and refuse a key:
        ValueError). Raises PublishError when Redis did not take the message.
        """
        room = check_not_user_room(validate_room(room))
        history = self._history_policy.for_room(room)
        envelope = external_envelope(Kind.ROOM, room, data, exclude)
        history = check_history_publish(envelope, history, idempotency_key)
        if history is None:
            await self._send(envelope)
            return None
        self._require_open()
        try:
            position, duplicate = await self._history.publish(envelope, history,
                                                              idempotency_key)
        except REDIS_ERRORS as exc:
            self.publish_failures += 1
            raise PublishError(self._transport.describe(exc)) from exc
        if not duplicate:
            self.published += 1
        return position

    async def room_history(
        self, room: str, *, since: int | None = None, limit: int = 100
    ) -> HistoryPage:
        """The room's position and up to ``limit`` messages after offset ``since`` (None:
        the latest), read from Redis as the nodes would (``Broker.read_history``).
        ValueError for a room without history; BrokerError if Redis is unreachable."""
        self._require_open()
        room = validate_room(room)
        history = self._history_policy.for_room(room)
        if history is None:
            raise ValueError(f"room {room!r} has no history in this Publisher's policy")
        room = check_history_read(room, history, since, limit)
        try:
            return await self._history.read(room, history, since, limit)
        except REDIS_ERRORS as exc:
            raise BrokerError(self._transport.describe(exc)) from exc

    async def send_to_connection(self, connection_id: str, data: Data) -> None:
        """Send ``data`` to the one connection ``connection_id``, wherever it lives."""
        node_of(connection_id)  # ValueError now rather than an envelope nobody can route
        await self._publish(Kind.CONNECTION, connection_id, data, None)

    async def broadcast(self, data: Data, *, exclude: str | None = None) -> None:
        """Send ``data`` to every connection of every node, except ``exclude``."""
        await self._publish(Kind.ALL, "", data, exclude)

    async def room_members(self, room: str) -> set[ConnectionId]:
        """Every connection in ``room`` on a live node; BrokerError if Redis is unreachable."""
        return await self._members(check_not_user_room(validate_room(room)))

    async def _members(self, room: Room) -> set[ConnectionId]:
        self._require_open()
        try:
            return await scripts.room_members(
                self._transport, self._keys, room, self._presence_ttl)
        except REDIS_ERRORS as exc:
            raise BrokerError(self._transport.describe(exc)) from exc

    async def room_presence(self, room: str) -> list[Presence]:
        """Every member of ``room`` on a live node with its user id and info (as
        ``Hub.room_presence``); BrokerError if Redis is unreachable."""
        room = check_not_user_room(validate_room(room))
        self._require_open()
        try:
            found = await scripts.room_presence(
                self._transport, self._keys, room, self._presence_ttl)
        except REDIS_ERRORS as exc:
            raise BrokerError(self._transport.describe(exc)) from exc
        members = []
        for connection, blob in found.items():
            try:
                members.append(decode_info(connection, blob))
            except ValueError:
                members.append(Presence(connection, None, {}))
        return sorted(members, key=lambda p: p.connection)

    async def send_to_user(self, user_id: str, data: Data) -> None:
        """Send ``data`` to every connection of the user (``conn.user_id``) on every node;
        PublishError when Redis did not take it."""
        await self._publish(Kind.ROOM, user_room(user_id), data, None)

    async def disconnect_user(
        self, user_id: str, *, code: int = 1000, reason: str = ""
    ) -> None:
        """Close every connection of the user on every node with ``code`` and ``reason``
        (ValueError for a code that may not be sent or a reason over 123 bytes)."""
        await self._send(Envelope(Kind.DISCONNECT, user_room(user_id),
                                  encode_disconnect(code, reason), True, sent_at=time.time()))

    async def user_connections(self, user_id: str) -> set[ConnectionId]:
        """The user's connections on live nodes; BrokerError if Redis is unreachable."""
        return await self._members(user_room(user_id))

    async def room_size(self, room: str) -> int:
        """How many connections are in ``room`` across the cluster."""
        return len(await self.room_members(room))

    async def close(self) -> None:
        """Let pending publishes go (bounded) and release the connections; idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._history.close()
        await self._transport.close()

    async def __aenter__(self) -> Self:
        self._require_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _publish(self, kind: Kind, target: str, data: Data, exclude: str | None) -> None:
        await self._send(external_envelope(kind, target, data, exclude))

    async def _send(self, envelope: Envelope) -> None:
        self._require_open()
        channel = self._keys.channel_for(envelope)
        try:
            await self._transport.publish(channel, encode(envelope))
        except REDIS_ERRORS as exc:
            self.publish_failures += 1
            raise PublishError(self._transport.describe(exc)) from exc
        self.published += 1

    def _require_open(self) -> None:
        if self._closed:
            raise BrokerError(f"this {type(self).__name__} is closed; create a new one")
