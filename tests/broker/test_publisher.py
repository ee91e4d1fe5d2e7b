"""The external Publisher against a real redis-server and real RedisBroker nodes."""

from __future__ import annotations

import pytest

from roomcast.broker.publisher import Publisher
from roomcast.shared.envelope import Kind
from roomcast.shared.errors import BrokerError, PublishError
from roomcast.shared.ids import ConnectionId, Room
from tests.broker.conftest import MakeNode
from tests.broker.helpers import eventually
from tests.redis_server import RedisServer

R = Room("lobby")


async def test_publisher_reaches_a_room(make_node: MakeNode, redis_url: str) -> None:
    """publish_to_room reaches the nodes subscribed to the room, as text with no origin."""
    a, b = await make_node("a"), await make_node("b")
    await a.broker.subscribe(R)
    await b.broker.subscribe(R)
    async with Publisher(redis_url) as pub:
        await pub.publish_to_room(R, "héllo", exclude="a.1")
    for node in (a, b):
        await node.inbox.wait_for_payload("héllo".encode())
        env = node.inbox.envelopes[0]
        assert (env.kind, env.target, env.binary, env.origin, env.exclude) == (
            Kind.ROOM, R, False, "", "a.1"
        )
        assert env.sent_at > 0


async def test_publisher_reaches_one_connection_then_everyone(
    make_node: MakeNode, redis_url: str
) -> None:
    """send_to_connection reaches only the owner node; broadcast reaches every node."""
    a, b = await make_node("a"), await make_node("b")
    async with Publisher(redis_url) as pub:
        await pub.send_to_connection("b.2a", b"\x00\x01binary")
        await pub.broadcast("to all", exclude="b.2a")
        assert pub.published == 2
    await b.inbox.wait_until(lambda: len(b.inbox.envelopes) == 2)
    direct, everyone = b.inbox.envelopes
    assert (direct.kind, direct.target, direct.binary, direct.payload) == (
        Kind.CONNECTION, "b.2a", True, b"\x00\x01binary"
    )
    assert (everyone.kind, everyone.payload, everyone.exclude) == (Kind.ALL, b"to all", "b.2a")
    # the broadcast was published after the direct send, so a would have had both by now
    await a.inbox.wait_for_payload(b"to all")
    assert a.inbox.payloads == [b"to all"]


async def test_publisher_reads_cluster_presence(make_node: MakeNode, redis_url: str) -> None:
    """room_members and room_size count every live node's members, read from outside."""
    a, b = await make_node("a"), await make_node("b")
    await a.broker.add_presence(R, ConnectionId("a.1"))
    await b.broker.add_presence(R, ConnectionId("b.1"))
    await b.broker.add_presence(R, ConnectionId("b.2"))
    async with Publisher(redis_url, presence_ttl=0.5) as pub:
        assert await pub.room_members(R) == {"a.1", "b.1", "b.2"}
        assert await pub.room_size(R) == 3
        assert await pub.room_size("empty") == 0
        await b.broker.close()
        assert await pub.room_members(R) == {"a.1"}


async def test_publisher_uses_the_prefix(make_node: MakeNode, redis_url: str) -> None:
    """A publisher with another prefix reaches nobody in this cluster."""
    a = await make_node("a", prefix="mine")
    async with Publisher(redis_url, prefix="theirs") as other, Publisher(
        redis_url, prefix="mine"
    ) as same:
        await other.broadcast("not for you")
        await same.broadcast("for you")
    await a.inbox.wait_for_payload(b"for you")
    assert a.inbox.payloads == [b"for you"]


async def test_publisher_rejects_bad_arguments(redis_url: str) -> None:
    """Bad data, room names and connection ids are TypeError/ValueError before any I/O."""
    async with Publisher(redis_url) as pub:
        with pytest.raises(TypeError, match="str or bytes"):
            await pub.broadcast(42)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="connection id"):
            await pub.send_to_connection("no-dot", "x")
        with pytest.raises(ValueError, match="room name"):
            await pub.publish_to_room("", "x")
        with pytest.raises(ValueError, match="connection id"):
            await pub.broadcast("x", exclude="nope")
        assert pub.published == 0


async def test_publisher_raises_and_counts_when_redis_is_down(
    redis_server: RedisServer,
) -> None:
    """With Redis gone, publishes raise PublishError and reads raise BrokerError."""
    pub = Publisher(f"redis://:pw-secret@127.0.0.1:{redis_server.port}/0")
    redis_server.kill()
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


async def test_publisher_recovers_when_redis_comes_back(
    make_node: MakeNode, redis_server: RedisServer
) -> None:
    """The same Publisher works again once Redis is back on its port."""
    a = await make_node("a")
    async with Publisher(redis_server.url) as pub:
        redis_server.kill()
        with pytest.raises(PublishError):
            await pub.broadcast("lost")
        redis_server.start()
        await eventually(lambda: a.broker.connected)
        await pub.broadcast("back")
    await a.inbox.wait_for_payload(b"back")


def test_publisher_refuses_a_cluster_url_and_names_the_right_class() -> None:
    """Publisher given a cluster URL says to use ClusterPublisher."""
    with pytest.raises(ValueError, match="ClusterPublisher"):
        Publisher("redis+cluster://127.0.0.1:7000")
