"""The transport to one Redis server: PUBLISH and SUBSCRIBE.

Three kinds of connection, all made by one bounded redis-py pool with the URL's
settings (TLS, credentials, database, unix socket):

- the command pool: presence writes, heartbeats and reads, pipelined (``Pipeliner``);
- the publish link: a connection of its own that writes each PUBLISH in the caller's
  turn (``PublishLink``), so it leaves ahead of the local members' writes;
- the pub/sub link: one connection subscribed to every wanted channel, read by one task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable, Collection
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.retry import Retry

from roomcast.broker._transport import (
    REDIS_ERRORS,
    Command,
    Listener,
    Pipeliner,
    describe_failure,
    disconnect,
    read_replies,
    stop_tasks,
)
from roomcast.broker._urls import redact_url

log = logging.getLogger("roomcast.broker.redis")

POOL_SIZE: Final = 16
"""Command connections per client at most (pub/sub and publish links are separate)."""


def make_client(url: str, socket_timeout: float) -> aioredis.Redis:
    """A command client for ``url`` whose every call is bounded by ``socket_timeout``.

    RESP2 and no automatic retry: a retried PUBLISH could be delivered twice, and the
    callers already handle failure (PublishError, presence re-sync).
    """
    if not isinstance(url, str):
        raise TypeError(f"Redis URL must be a str, got {type(url).__name__}")
    if not isinstance(socket_timeout, int | float) or not socket_timeout > 0:
        raise ValueError(f"socket_timeout must be a number > 0, got {socket_timeout!r}")
    try:
        # A bounded pool: a burst of concurrent calls (every join's room_size) waits
        # for a connection instead of opening, and keeping, one each.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_SIZE,
            timeout=socket_timeout,
            protocol=2,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        client = aioredis.Redis.from_pool(pool)
    except ValueError as exc:
        raise ValueError(f"invalid Redis URL {redact_url(url)}: {exc}") from None
    # options in the URL's query win over ours; refuse those the pub/sub reader can't parse
    options = client.connection_pool.connection_kwargs
    if str(options.get("protocol", 2)) != "2" or options.get("decode_responses"):
        raise ValueError(
            f"Redis URL {redact_url(url)}: roomcast speaks RESP2 with raw bytes; "
            "remove protocol= and decode_responses= from the URL"
        )
    return client


async def open_connection(client: aioredis.Redis) -> AbstractConnection:
    """A connected connection outside the pool, with the pool's settings."""
    conn: AbstractConnection = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
    try:
        await conn.connect()  # type: ignore[no-untyped-call]
    except BaseException:
        await disconnect(conn)
        raise
    return conn


class PublishLink:
    """Commands on a connection of their own, written in the caller's loop turn.

    ``execute`` puts its commands on the wire before it first suspends, and one reader
    task hands the replies back in order. A hub that queues frames for its own members
    and then publishes therefore sends the envelope before those members' writes run,
    so the other nodes deliver while this one does. Commands from concurrent callers
    are pipelined on the one connection, in call order.

    A caller that is cancelled only stops waiting. A call that is not answered within
    twice the socket timeout (write and reply), or a broken connection, fails every
    waiting caller and drops the connection; the next call connects again.
    """

    def __init__(self, client: aioredis.Redis, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._conn: AbstractConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._opening: asyncio.Lock | None = None
        self._closed = False
        self._run_id = ""

    async def execute(self, *commands: Command) -> list[Any]:
        """Send ``commands`` now and return their replies (an error reply as an exception)."""
        conn = self._conn
        if conn is None or not conn.is_connected:
            conn = await self._open()
        return await self._send(conn, commands)

    async def execute_bound(self, bind: Callable[[str], tuple[Command, ...]]) -> list[Any]:
        """Send ``bind(run_id)`` now, ``run_id`` being that of the server this link's
        connection reached (read when it connected), and return the replies."""
        conn = self._conn
        if conn is None or not conn.is_connected:
            conn = await self._open()
        return await self._send(conn, bind(self._run_id))

    @property
    def run_id(self) -> str:
        """The run id of the server the current connection reached ("" before one)."""
        return self._run_id

    async def _send(self, conn: AbstractConnection, commands: tuple[Command, ...]) -> list[Any]:
        loop = asyncio.get_running_loop()
        replies = [loop.create_future() for _ in commands]
        self._waiting.extend(replies)
        packed = conn.pack_commands(commands) if len(commands) > 1 else conn.pack_command(
            *commands[0])
        try:
            # entering the timeout does not suspend: the write below is still in our turn
            async with asyncio.timeout(2 * self._timeout):
                try:
                    # no socket timeout on this connection: the write suspends only when
                    # the kernel's and the transport's buffers are full (a frozen Redis)
                    await conn.send_packed_command(packed, check_health=False)
                except BaseException as exc:  # a write cut short leaves the stream unusable
                    await self._drop(conn, exc)
                    raise
                return [await reply for reply in replies]
        except TimeoutError as exc:
            await self._drop(conn, exc)
            raise

    async def connect(self) -> None:
        """Open the connection now, so that the first command does not wait for it."""
        conn = self._conn
        if conn is None or not conn.is_connected:
            await self._open()

    async def close(self) -> None:
        """Fail whoever still waits and close the connection; idempotent."""
        self._closed = True
        if self._conn is not None:
            await self._drop(self._conn, RedisConnectionError("the publish link was closed"))

    async def _open(self) -> AbstractConnection:
        if self._closed:
            raise RedisConnectionError("the publish link was closed")
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            conn = self._conn
            if conn is not None and conn.is_connected:
                return conn
            async with asyncio.timeout(2 * self._timeout):
                conn = await open_connection(self._client)
                try:
                    # the run id of this very server: valid as long as this connection
                    await conn.send_command("INFO", "server", check_health=False)
                    info = await conn.read_response(disconnect_on_error=False)
                except BaseException:
                    await disconnect(conn)
                    raise
            conn.socket_timeout = None  # bounded in execute(), around write and reply
            self._run_id = _run_id(info)
            self._conn = conn
            self._reader = asyncio.create_task(self._read(conn), name="roomcast-redis-publish")
            return conn

    async def _read(self, conn: AbstractConnection) -> None:
        waiting = self._waiting
        try:
            while True:
                try:
                    reply: Any = await conn.read_response(
                        timeout=math.inf, disconnect_on_error=False)
                except ResponseError as exc:
                    reply = exc
                if not waiting:
                    raise RedisConnectionError("a reply nobody asked for")
                future = waiting.popleft()
                if not future.done():  # done: its caller was cancelled
                    future.set_result(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._drop(conn, exc)

    async def _drop(self, conn: AbstractConnection, exc: BaseException) -> None:
        if self._conn is not conn:
            return
        self._conn = None
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        waiting, self._waiting = self._waiting, deque()
        error = exc if isinstance(exc, Exception) else RedisConnectionError(
            str(exc) or type(exc).__name__)
        for future in waiting:
            if not future.done():
                future.set_exception(error)
                future.exception()  # a caller that went away must not leave it unretrieved
        await disconnect(conn)


def _run_id(info: Any) -> str:
    """The ``run_id`` in an INFO reply ("" if it has none: the script then reads it)."""
    text = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "run_id":
            return value.strip()
    return ""


class SingleTransport:
    """A ``Transport`` to the one Redis server at ``url``.

    The pub/sub link is pinged after ``health_check_interval`` seconds without traffic
    and dropped if the PING is not answered within ``socket_timeout``.
    """

    publish_command: Final = "PUBLISH"

    def __init__(self, url: str, *, socket_timeout: float, health_check_interval: float) -> None:
        self._url = url
        self._safe_url = redact_url(url)
        self._client = make_client(url, socket_timeout)
        self._timeout = float(socket_timeout)
        self._health_check_interval = float(health_check_interval)
        self._pipeliner = Pipeliner(self._send_batch, self._timeout)
        self._publish_link = PublishLink(self._client, self._timeout)
        self._listener: Listener | None = None
        self._closed = False
        # the channels the broker wants, and those sent on the current link
        self._desired: set[str] = set()
        self._subscribed: set[str] = set()
        self._lock = asyncio.Lock()
        self._conn: AbstractConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._confirmations: dict[bytes, asyncio.Future[None]] = {}

    # -- commands ------------------------------------------------------------------

    def describe(self, exc: BaseException) -> str:
        """What went wrong, and where (no password)."""
        return describe_failure(exc, self._url)

    def failure_domain(self, route: str) -> str:
        """One server: everything fails together."""
        return ""

    async def execute(self, route: str, *commands: Command) -> list[Any]:
        """Run ``commands`` through the pool, pipelined with concurrent calls."""
        return await self._pipeliner.execute(*commands)

    async def execute_now(self, route: str, *commands: Command) -> list[Any]:
        """Write ``commands`` on the publish link in the caller's turn."""
        return await self._publish_link.execute(*commands)

    async def execute_bound(
        self, route: str, bind: Callable[[str], tuple[Command, ...]]
    ) -> list[Any]:
        """Write ``bind(run_id)`` on the publish link in the caller's turn, with the run id
        of the server that link is connected to."""
        return await self._publish_link.execute_bound(bind)

    async def publish(self, channel: str, data: bytes) -> None:
        """PUBLISH on the publish link, written in the caller's turn."""
        (reply,) = await self._publish_link.execute((self.publish_command, channel, data))
        if isinstance(reply, Exception):
            raise reply

    async def _send_batch(self, commands: list[Command]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    # -- subscriptions -------------------------------------------------------------

    async def start(self, listener: Listener, channels: Collection[str]) -> None:
        """Open the pub/sub link on ``channels`` and the publish link; raises if unreachable
        (``close`` then releases what was opened)."""
        self._listener = listener
        self._desired.update(channels)
        await self._open_link()
        await self._publish_link.connect()

    async def subscribe(self, channel: str) -> None:
        """SUBSCRIBE ``channel``; returns once Redis confirmed (or the link is down)."""
        self._desired.add(channel)
        await self._sync()
        waiter = self._confirmations.get(channel.encode())
        if waiter is not None:
            await asyncio.wait([waiter], timeout=self._timeout)

    async def unsubscribe(self, channel: str) -> None:
        """UNSUBSCRIBE ``channel``."""
        self._desired.discard(channel)
        await self._sync()

    async def repair(self) -> tuple[frozenset[str], bool]:
        """Open a new pub/sub link on every wanted channel, unless one is up."""
        conn = self._conn
        if conn is not None and conn.is_connected:
            return frozenset(), True
        await self._open_link()
        return frozenset(self._subscribed), True

    async def close(self) -> None:
        """Stop the reader, close both links, let queued commands go, close the pool."""
        if self._closed:
            return
        self._closed = True
        await stop_tasks([self._reader], self._timeout)
        await self._drop_link(self._conn)
        await self._publish_link.close()
        await self._pipeliner.close(self._timeout)
        with contextlib.suppress(*REDIS_ERRORS):
            async with asyncio.timeout(self._timeout):
                await self._client.aclose()

    async def _sync(self) -> None:
        # The wanted set was updated before this call, so whatever order the lock is
        # granted in, the link ends up matching the latest call for every channel.
        async with self._lock:
            conn = self._conn
            if conn is None or not conn.is_connected:
                return  # repair() subscribes every wanted channel on the next link
            add = self._desired - self._subscribed
            drop = self._subscribed - self._desired
            try:
                if drop:
                    self._subscribed -= drop
                    await conn.send_command("UNSUBSCRIBE", *drop, check_health=False)
                if add:
                    loop = asyncio.get_running_loop()
                    for channel in add:
                        self._confirmations.setdefault(channel.encode(), loop.create_future())
                    self._subscribed |= add
                    await conn.send_command("SUBSCRIBE", *add, check_health=False)
            except REDIS_ERRORS as exc:
                # the send closed the link; its reader sees that and reports it lost
                log.debug("subscription change not sent: %s", exc)

    async def _open_link(self) -> None:
        """A new pub/sub link subscribed to every wanted channel, and its reader."""
        if self._closed:
            raise RedisConnectionError("this transport is closed")
        conn = await open_connection(self._client)
        try:
            async with self._lock:
                channels = set(self._desired)
                await conn.send_command("SUBSCRIBE", *channels, check_health=False)
                pending = {c.encode() for c in channels}
                while pending:  # each read is bounded by the socket timeout
                    reply = await conn.read_response(disconnect_on_error=False)
                    if reply[0] == b"subscribe":
                        pending.discard(reply[1])
                    else:
                        self._on_reply(reply)
                if self._closed:
                    raise RedisConnectionError("this transport is closed")
                self._conn = conn
                self._subscribed = channels
        except BaseException:
            await disconnect(conn)
            raise
        self._reader = asyncio.create_task(self._read(conn), name="roomcast-redis-listener")

    async def _read(self, conn: AbstractConnection) -> None:
        try:
            await read_replies(conn, self._on_reply, idle=self._health_check_interval,
                               pong_wait=self._timeout, name=f"Redis at {self._safe_url}")
        except REDIS_ERRORS as exc:
            log.warning("lost the pub/sub link to %s (%s); reconnecting", self._safe_url,
                        exc or type(exc).__name__)
        except Exception:
            log.exception("pub/sub listener failed; reconnecting")
        lost = self._subscribed
        await self._drop_link(conn)
        if self._listener is not None and not self._closed:
            self._listener.on_unsubscribed(lost, True)

    async def _drop_link(self, conn: AbstractConnection | None) -> None:
        if conn is None:
            return
        if self._conn is conn:
            self._conn = None
            self._subscribed = set()
        for waiter in self._confirmations.values():
            if not waiter.done():
                waiter.set_result(None)
        self._confirmations.clear()
        await disconnect(conn)

    def _on_reply(self, reply: Any) -> None:
        if isinstance(reply, Exception):
            raise reply
        kind = reply[0]
        if kind == b"message":
            if self._listener is not None:
                self._listener.on_message(reply[2])
        elif kind == b"subscribe":
            waiter = self._confirmations.pop(reply[1], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
