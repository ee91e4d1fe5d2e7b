"""PublishLink on a real redis-server: order, error replies, cancellation, failure."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from roomcast.broker._single import PublishLink, make_client
from tests.redis_server import RedisServer


async def test_concurrent_callers_get_their_own_replies_in_order(redis_url: str) -> None:
    """Commands from many callers share one connection; each gets its own replies."""
    client = make_client(redis_url, 1.0)
    link = PublishLink(client, 1.0)
    try:
        replies = await asyncio.gather(
            *(link.execute(("SET", f"k{i}", i), ("GET", f"k{i}")) for i in range(50)))
        assert [r[1] for r in replies] == [str(i).encode() for i in range(50)]
        assert await link.execute(("PUBLISH", "nobody", b"x")) == [0]
    finally:
        await link.close()
        await client.aclose()


async def test_command_is_on_the_wire_before_the_caller_first_waits(redis_url: str) -> None:
    """The write happens in the caller's turn, before execute() first suspends."""
    client = make_client(redis_url, 1.0)
    link = PublishLink(client, 1.0)
    try:
        await link.execute(("PING",))  # connect first
        conn = link._conn
        assert conn is not None
        writer: Any = conn._writer
        written: list[bytes] = []
        real = writer.writelines

        def writelines(data: Any) -> None:
            written.append(b"".join(data))
            real(data)

        writer.writelines = writelines
        pending = asyncio.ensure_future(link.execute(("PUBLISH", "c", b"early")))
        await asyncio.sleep(0)  # exactly the task's first step runs, up to its first wait
        assert not pending.done()
        assert len(written) == 1 and b"early" in written[0]
        assert await pending == [0]
    finally:
        await link.close()
        await client.aclose()


async def test_error_reply_is_returned_and_the_link_goes_on(redis_url: str) -> None:
    """An error reply comes back as an exception object; later commands still work."""
    client = make_client(redis_url, 1.0)
    link = PublishLink(client, 1.0)
    try:
        (reply,) = await link.execute(("PUBLISH", "only-a-channel"))
        assert isinstance(reply, ResponseError)
        assert await link.execute(("ECHO", b"still")) == [b"still"]
    finally:
        await link.close()
        await client.aclose()


async def test_cancelled_caller_does_not_shift_the_replies(redis_url: str) -> None:
    """A caller that stops waiting leaves its reply slot; the others get theirs."""
    client = make_client(redis_url, 1.0)
    link = PublishLink(client, 1.0)
    try:
        await link.execute(("PING",))
        first = asyncio.create_task(link.execute(("ECHO", b"one")))
        second = asyncio.create_task(link.execute(("ECHO", b"two")))
        await asyncio.sleep(0)
        first.cancel()
        assert await second == [b"two"]
        assert first.cancelled()
        assert await link.execute(("ECHO", b"three")) == [b"three"]
    finally:
        await link.close()
        await client.aclose()


async def test_redis_gone_fails_the_call_and_a_restart_is_picked_up(
    redis_server: RedisServer,
) -> None:
    """Redis killed: the call raises; once it is back, the next call reconnects."""
    client = make_client(redis_server.url, 0.5)
    link = PublishLink(client, 0.5)
    try:
        assert await link.execute(("ECHO", b"up")) == [b"up"]
        redis_server.kill()
        with pytest.raises((RedisConnectionError, OSError, TimeoutError)):
            for _ in range(3):  # the first write may still land in the dead socket's buffer
                await link.execute(("ECHO", b"down"))
        redis_server.start()
        assert await link.execute(("ECHO", b"back")) == [b"back"]
    finally:
        await link.close()
        await client.aclose()


async def test_frozen_redis_fails_within_the_bound(redis_server: RedisServer) -> None:
    """No reply: the caller gets TimeoutError after twice the socket timeout at most."""
    client = make_client(redis_server.url, 0.3)
    link = PublishLink(client, 0.3)
    try:
        await link.execute(("PING",))
        redis_server.freeze()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await link.execute(("PUBLISH", "c", b"x"))
        assert loop.time() - started < 2 * 0.3 + 0.5
    finally:
        redis_server.thaw()
        await link.close()
        await client.aclose()


async def test_close_fails_waiting_callers(redis_server: RedisServer) -> None:
    """close() releases whoever still waits for a reply."""
    client = make_client(redis_server.url, 5.0)
    link = PublishLink(client, 5.0)
    try:
        await link.execute(("PING",))
        redis_server.freeze()
        waiting = asyncio.create_task(link.execute(("PING",)))
        await asyncio.sleep(0.05)
        await link.close()
        with pytest.raises(RedisConnectionError):
            await waiting
        with pytest.raises(RedisConnectionError):
            await link.execute(("PING",))
    finally:
        redis_server.thaw()
        await client.aclose()
