"""Publish to roomcast from any Python process that does not run a node.

A worker, a cron job or another web app can reach rooms, one connection or everyone,
and read cluster-wide room membership, through the same Redis the nodes use::

    async with Publisher("redis://redis:6379/0") as pub:
        await pub.publish_to_room("lobby", "hello")
        print(await pub.room_size("lobby"))
"""

from __future__ import annotations

import contextlib
import time
from types import TracebackType
from typing import Self

from roomcast.broker._keys import Keys
from roomcast.broker._redis_common import (
    DEFAULT_SOCKET_TIMEOUT,
    TRANSPORT_ERRORS,
    Pipeliner,
    check_positive,
    make_client,
    publish_bytes,
    read_room_members,
)
from roomcast.shared.envelope import Envelope, Kind, encode
from roomcast.shared.errors import BrokerError, PublishError
from roomcast.shared.ids import ConnectionId, Room, node_of, validate_room

Data = str | bytes
"""A message: ``str`` is sent as a text frame, ``bytes`` as a binary frame."""


_CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


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


class PublisherBase:
    """What every publisher offers; subclasses say how bytes reach Redis (``_send``),
    how presence is read (``_read_members``) and what closing releases (``_release``)."""

    _keys: Keys
    _closed: bool
    published: int
    publish_failures: int

    async def publish_to_room(
        self, room: str, data: Data, *, exclude: str | None = None
    ) -> None:
        """Send ``data`` to every member of ``room`` on every node, except ``exclude``."""
        await self._publish(Kind.ROOM, validate_room(room), data, exclude)

    async def send_to_connection(self, connection_id: str, data: Data) -> None:
        """Send ``data`` to the one connection ``connection_id``, wherever it lives."""
        node_of(connection_id)  # ValueError now rather than an envelope nobody can route
        await self._publish(Kind.CONNECTION, connection_id, data, None)

    async def broadcast(self, data: Data, *, exclude: str | None = None) -> None:
        """Send ``data`` to every connection of every node, except ``exclude``."""
        await self._publish(Kind.ALL, "", data, exclude)

    async def room_members(self, room: str) -> set[ConnectionId]:
        """Every connection in ``room`` on a live node; BrokerError if Redis is unreachable."""
        self._require_open()
        return await self._read_members(validate_room(room))

    async def room_size(self, room: str) -> int:
        """How many connections are in ``room`` across the cluster."""
        return len(await self.room_members(room))

    async def close(self) -> None:
        """Finish pending publishes and release the connections; idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._release()

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
        self._require_open()
        envelope = external_envelope(kind, target, data, exclude)
        try:
            await self._send(self._keys.channel_for(envelope), encode(envelope))
        except PublishError:
            self.publish_failures += 1
            raise
        self.published += 1

    def _require_open(self) -> None:
        if self._closed:
            raise BrokerError(f"this {type(self).__name__} is closed; create a new one")

    async def _send(self, channel: str, data: bytes) -> None:
        raise NotImplementedError

    async def _read_members(self, room: Room) -> set[ConnectionId]:
        raise NotImplementedError

    async def _release(self) -> None:
        raise NotImplementedError


class Publisher(PublisherBase):
    """Sends envelopes to the nodes sharing ``prefix`` on Redis at ``url``; not a node.

    ``presence_ttl`` must match the nodes' so that ``room_members`` leaves out the same
    dead nodes they do. Publishes are pipelined like a node's; failures raise
    PublishError and are counted in ``publish_failures``.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "roomcast",
        presence_ttl: float = 5.0,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
    ) -> None:
        if isinstance(url, str) and url.lower().startswith(_CLUSTER_SCHEMES):
            raise ValueError("Publisher takes redis://, rediss:// and unix:// URLs; for a "
                             "Redis Cluster use broker.ClusterPublisher (same methods)")
        check_positive("presence_ttl", presence_ttl)
        self._keys = Keys(prefix)
        self._url = url
        self._presence_ttl = float(presence_ttl)
        self._client = make_client(url, socket_timeout)
        self._pipeliner = Pipeliner(self._client, socket_timeout)
        self._closed = False
        self.published = 0
        self.publish_failures = 0

    async def _send(self, channel: str, data: bytes) -> None:
        await publish_bytes(self._pipeliner, self._url, channel, data)

    async def _read_members(self, room: Room) -> set[ConnectionId]:
        return await read_room_members(
            self._client, self._keys, room, self._presence_ttl, self._url
        )

    async def _release(self) -> None:
        await self._pipeliner.drain()
        with contextlib.suppress(*TRANSPORT_ERRORS):
            await self._client.aclose()  # can time out if Redis is frozen
