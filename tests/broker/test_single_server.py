"""What only the single-server transport does: unix sockets, and PUBLISH of the encoded
envelope on exactly one channel, seen by a plain Redis subscriber."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from roomcast.shared.envelope import Kind, encode
from roomcast.shared.ids import Room
from tests.broker.helpers import Backend, envelope
from tests.redis_server import RedisServer

R = Room("lobby")


async def test_unix_socket_url() -> None:
    """unix:// URLs with a db number work alongside TCP clients of the same server."""
    with RedisServer(unix_socket=True) as server:
        backend = Backend("redis", [server])
        try:
            a = await backend.node("a", url=server.unix_url)
            b = await backend.node("b", url=server.url)
            await a.broker.subscribe(R)
            await b.broker.add_presence(R, b.conn(1))
            await b.broker.publish(envelope(Kind.ROOM, R, b"via-unix", origin=b.id))
            await a.inbox.wait_for_payload(b"via-unix")
            assert await a.broker.room_members(R) == {"b.1"}
        finally:
            await backend.close()


async def test_encoded_envelope_is_published_once_on_one_channel(
    redis_server: RedisServer,
) -> None:
    """A raw subscriber sees exactly one message, the encoded envelope, per publish."""
    backend = Backend("redis", [redis_server], prefix="roomcast")
    raw = aioredis.from_url(redis_server.url)
    pubsub = raw.pubsub()
    try:
        a = await backend.node("a")
        await pubsub.subscribe("roomcast:room:lobby", "roomcast:all", "roomcast:node:z")
        env = envelope(Kind.ROOM, R, b"once", origin=a.id)
        await a.broker.publish(env)
        await a.broker.publish(envelope(Kind.CONNECTION, "z.1", b"z", origin=a.id))
        await a.broker.publish(envelope(Kind.ALL, "", b"all", origin=a.id))
        seen: list[tuple[bytes, bytes]] = []
        async with asyncio.timeout(10):
            while len(seen) < 3:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    seen.append((message["channel"], message["data"]))
        assert seen[0] == (b"roomcast:room:lobby", encode(env))
        assert [channel for channel, _ in seen] == [
            b"roomcast:room:lobby", b"roomcast:node:z", b"roomcast:all"
        ]
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await raw.aclose()
        await backend.close()
