"""The external Publisher against real nodes, on a redis-server and on a Redis Cluster."""

from __future__ import annotations

import pytest

from roomcast.broker import ClusterPublisher
from roomcast.broker._cluster import ClusterTransport
from roomcast.broker.publisher import Publisher
from roomcast.shared.envelope import Kind
from roomcast.shared.errors import BrokerError, PublishError
from roomcast.shared.ids import ConnectionId, Room
from tests.broker.helpers import Backend, eventually

R = Room("lobby")


async def test_publisher_reaches_a_room(backend: Backend) -> None:
    """publish_to_room reaches the nodes subscribed to the room, as text with no origin."""
    a, b = await backend.node("a"), await backend.node("b")
    await a.broker.subscribe(R)
    await b.broker.subscribe(R)
    async with backend.publisher() as pub:
        await pub.publish_to_room(R, "héllo", exclude="a.1")
    for node in (a, b):
        await node.inbox.wait_for_payload("héllo".encode())
        env = node.inbox.envelopes[0]
        assert (env.kind, env.target, env.binary, env.origin, env.exclude) == (
            Kind.ROOM, R, False, "", "a.1"
        )
        assert env.sent_at > 0


async def test_publisher_reaches_one_connection_then_everyone(backend: Backend) -> None:
    """send_to_connection reaches only the owner node; broadcast reaches every node."""
    a, b = await backend.node("a"), await backend.node("b")
    async with backend.publisher() as pub:
        await pub.send_to_connection("b.2a", b"\x00\x01binary")
        await pub.broadcast("to all", exclude="b.2a")
        assert pub.published == 2
    await b.inbox.wait_until(lambda: len(b.inbox.envelopes) == 2)
    if backend.cluster:  # two channels, maybe on two masters: no order between them
        b.inbox.envelopes.sort(key=lambda e: e.kind is Kind.ALL)
    direct, everyone = b.inbox.envelopes
    assert (direct.kind, direct.target, direct.binary, direct.payload) == (
        Kind.CONNECTION, "b.2a", True, b"\x00\x01binary"
    )
    assert (everyone.kind, everyone.payload, everyone.exclude) == (Kind.ALL, b"to all", "b.2a")
    await a.inbox.wait_for_payload(b"to all")
    assert a.inbox.payloads == [b"to all"]


async def test_publisher_reads_cluster_presence(backend: Backend) -> None:
    """room_members and room_size count every live node's members, read from outside."""
    a, b = await backend.node("a"), await backend.node("b")
    await a.broker.add_presence(R, ConnectionId("a.1"))
    await b.broker.add_presence(R, ConnectionId("b.1"))
    await b.broker.add_presence(R, ConnectionId("b.2"))
    async with backend.publisher(presence_ttl=0.5) as pub:
        assert await pub.room_members(R) == {"a.1", "b.1", "b.2"}
        assert await pub.room_size(R) == 3
        assert await pub.room_size("empty") == 0
        await b.broker.close()
        assert await pub.room_members(R) == {"a.1"}


async def test_publisher_uses_the_prefix(backend: Backend) -> None:
    """A publisher with another prefix reaches nobody in this cluster."""
    a = await backend.node("a")
    async with backend.publisher(prefix=f"{backend.prefix}x") as other, \
            backend.publisher() as same:
        await other.broadcast("not for you")
        await same.broadcast("for you")
    await a.inbox.wait_for_payload(b"for you")
    assert a.inbox.payloads == [b"for you"]


async def test_publisher_rejects_bad_arguments(backend: Backend) -> None:
    """Bad data, room names and connection ids are TypeError/ValueError before any I/O."""
    async with backend.publisher() as pub:
        with pytest.raises(TypeError, match="str or bytes"):
            await pub.broadcast(42)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="connection id"):
            await pub.send_to_connection("no-dot", "x")
        with pytest.raises(ValueError, match="room name"):
            await pub.publish_to_room("", "x")
        with pytest.raises(ValueError, match="connection id"):
            await pub.broadcast("x", exclude="nope")
        assert pub.published == 0


async def test_publisher_raises_and_counts_when_redis_is_down(own_backend: Backend) -> None:
    """With Redis gone, publishes raise PublishError and reads raise BrokerError."""
    backend = own_backend
    pub = backend.publisher(url=backend.url_with(":pw-secret"))
    backend.kill()
    with pytest.raises(PublishError, match="unreachable") as failure:
        await pub.publish_to_room(R, "x")
    assert "pw-secret" not in str(failure.value)
    assert pub.publish_failures == 1
    with pytest.raises(BrokerError, match="unreachable"):
        await pub.room_size(R)
    await pub.close()
    await pub.close()
    with pytest.raises(BrokerError, match="closed"):
        await pub.broadcast("x")


async def test_publisher_recovers_when_redis_comes_back(own_backend: Backend) -> None:
    """The same Publisher works again once Redis is back on its port."""
    backend = own_backend
    a = await backend.node("a")
    async with backend.publisher() as pub:
        backend.kill()
        with pytest.raises(PublishError):
            await pub.broadcast("lost")
        backend.restart()
        await eventually(lambda: a.broker.connected, timeout=20)
        await pub.broadcast("back")
    await a.inbox.wait_for_payload(b"back")


def test_publisher_takes_cluster_urls_and_the_old_name_is_the_same_class() -> None:
    """Publisher picks the cluster transport for a cluster URL; ClusterPublisher is Publisher."""
    publisher = ClusterPublisher("redis+cluster://127.0.0.1:7000")
    assert type(publisher) is Publisher
    assert isinstance(publisher._transport, ClusterTransport)
