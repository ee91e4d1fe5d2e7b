"""Redis plumbing shared by RedisBroker and Publisher: client, publish pipelining, presence reads.

Both speak to Redis the same way so an external publisher and a node can never disagree
on how envelopes are sent or how room membership is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Sequence
from typing import Any, Final, Protocol

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from roomcast.broker._keys import Keys, redact_url
from roomcast.shared.errors import BrokerError, PublishError
from roomcast.shared.ids import ConnectionId, Room

DEFAULT_SOCKET_TIMEOUT: Final = 2.0

Command = tuple[str | bytes | int | float, ...]

POOL_SIZE: Final = 16
"""Command connections per client at most (pub/sub links are separate)."""
TRANSPORT_ERRORS: Final = (RedisError, OSError, asyncio.TimeoutError)
"""What a Redis call raises when the server is down, frozen, or refuses the command."""


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
    """A connected connection outside the pool, with the pool's settings: the pub/sub link."""
    conn: AbstractConnection = client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
    try:
        await conn.connect()  # type: ignore[no-untyped-call]
    except BaseException:
        with contextlib.suppress(*TRANSPORT_ERRORS):
            await conn.disconnect(nowait=True)
        raise
    return conn


def describe_failure(exc: BaseException, url: str) -> str:
    """A message saying whether Redis was unreachable or refused, and where (no password)."""
    where = redact_url(url)
    if isinstance(exc, AuthenticationError | AuthorizationError):
        return f"Redis at {where} refused the credentials ({exc}); check the URL's user/password"
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError | asyncio.TimeoutError):
        detail = str(exc) or type(exc).__name__
        return f"Redis is unreachable at {where} ({detail}); check that it runs and answers"
    return f"Redis at {where} refused the command: {exc}"


class Pipeliner:
    """Sends the commands queued in one loop turn, or while a batch is in flight, as one pipeline.

    One batch is in flight at a time, so commands reach Redis in the order they were
    queued: this keeps per-publisher order and orders presence writes behind each other.
    """

    def __init__(self, client: aioredis.Redis, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._queued: _Batch | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.batches = 0
        """Pipelines sent so far (tests use it to see that publishes were batched)."""

    async def execute(self, *commands: Command) -> list[Any]:
        """Queue ``commands`` and return their replies; a reply may be an exception object.

        Raises what the whole batch failed with (connection lost, timeout). A caller
        that is cancelled only stops waiting: its commands still go out with the batch.
        """
        if self._queued is None:
            self._queued = _Batch()
        reply: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queued.add(commands, reply)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="roomcast-redis-pipeline")
        return await reply

    async def drain(self) -> None:
        """Wait until every queued batch has been sent or has failed."""
        while self._flusher is not None and not self._flusher.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._flusher)

    async def _flush(self) -> None:
        while self._queued is not None:
            batch, self._queued = self._queued, None
            try:
                # the socket timeouts bound each step; this bounds the whole batch
                async with asyncio.timeout(2 * self._timeout):
                    pipe = self._client.pipeline(transaction=False)
                    for command in batch.commands:
                        pipe.execute_command(*command)
                    replies = await pipe.execute(raise_on_error=False)
                self.batches += 1
            except asyncio.CancelledError:
                batch.cancel()
                raise
            except Exception as exc:
                batch.fail(exc)
            else:
                batch.succeed(replies)


class _Batch:
    """Commands queued together, and for each caller the slice of replies it waits for."""

    def __init__(self) -> None:
        self.commands: list[Command] = []
        self._waiters: list[tuple[asyncio.Future[list[Any]], int, int]] = []

    def add(self, commands: tuple[Command, ...], reply: asyncio.Future[list[Any]]) -> None:
        self._waiters.append((reply, len(self.commands), len(commands)))
        self.commands.extend(commands)

    def succeed(self, replies: list[Any]) -> None:
        for reply, start, count in self._waiters:
            if not reply.done():  # done means its caller was cancelled
                reply.set_result(replies[start : start + count])

    def fail(self, exc: Exception) -> None:
        for reply, _, _ in self._waiters:
            if not reply.done():
                reply.set_exception(exc)

    def cancel(self) -> None:
        for reply, _, _ in self._waiters:
            reply.cancel()


class PublishLink:
    """Commands on a connection of their own, written in the caller's loop turn.

    ``execute`` puts its commands on the wire before it first suspends, and one reader
    task hands the replies back in order. A hub that queues frames for its own members
    and then publishes therefore sends the envelope before those members' writes run,
    so the other nodes deliver while this one does. Commands from concurrent callers
    are pipelined on the one connection, in call order.

    A caller that is cancelled only stops waiting. A reply that does not come within
    twice the socket timeout, or a broken connection, fails every waiting caller and
    drops the connection; the next call connects again.
    """

    def __init__(self, client: aioredis.Redis, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._conn: AbstractConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._opening: asyncio.Lock | None = None
        self._closed = False

    async def execute(self, *commands: Command) -> list[Any]:
        """Send ``commands`` now and return their replies (an error reply as an exception)."""
        conn = self._conn
        if conn is None or not conn.is_connected:
            conn = await self._open()
        loop = asyncio.get_running_loop()
        replies = [loop.create_future() for _ in commands]
        self._waiting.extend(replies)
        packed = conn.pack_commands(commands) if len(commands) > 1 else conn.pack_command(
            *commands[0])
        try:
            # no socket timeout on this connection: the write does not suspend
            await conn.send_packed_command(packed, check_health=False)
        except BaseException as exc:
            await self._drop(conn, exc)
            raise
        try:
            async with asyncio.timeout(2 * self._timeout):
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
            conn.socket_timeout = None  # replies are bounded in execute(), writes never wait
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
        error = exc if isinstance(exc, Exception) else RedisConnectionError(str(exc))
        for future in waiting:
            if not future.done():
                future.set_exception(error)
                future.exception()  # a caller that went away must not leave it unretrieved
        with contextlib.suppress(*TRANSPORT_ERRORS):
            await conn.disconnect(nowait=True)


class _Executes(Protocol):
    async def execute(self, *commands: Command) -> list[Any]: ...


async def publish_bytes(pipeliner: _Executes, url: str, channel: str, data: bytes) -> None:
    """PUBLISH ``data`` on ``channel`` through ``pipeliner``; PublishError if not made."""
    try:
        (reply,) = await pipeliner.execute(("PUBLISH", channel, data))
    except TRANSPORT_ERRORS as exc:
        raise PublishError(describe_failure(exc, url)) from exc
    if isinstance(reply, Exception):
        raise PublishError(describe_failure(reply, url)) from reply


async def read_room_members(
    client: aioredis.Redis, keys: Keys, room: Room, presence_ttl: float, url: str
) -> set[ConnectionId]:
    """Members of ``room`` whose node heartbeated within ``presence_ttl`` (Redis clock).

    One MULTI round trip reads the hash, the node scores and the server time together,
    so members of a dead node are left out even before a peer sweeps them.
    """
    try:
        pipe = client.pipeline(transaction=True)
        pipe.time()
        pipe.hgetall(keys.presence(room))
        pipe.zrange(keys.nodes, 0, -1, withscores=True)
        now_reply, members, scores = await pipe.execute()
    except TRANSPORT_ERRORS as exc:
        raise BrokerError(describe_failure(exc, url)) from exc
    return filter_alive(members, scores, _seconds(now_reply), presence_ttl)


def filter_alive(
    members: dict[Any, Any],
    scores: Sequence[Sequence[Any]],
    now: float,
    presence_ttl: float,
) -> set[ConnectionId]:
    """The connections in ``members`` (conn -> node) whose node's score is fresh at ``now``."""
    alive = {as_text(node) for node, score in scores if float(score) >= now - presence_ttl}
    return {
        ConnectionId(as_text(conn)) for conn, node in members.items() if as_text(node) in alive
    }


def _seconds(reply: Any) -> float:
    seconds, micros = reply
    return float(seconds) + float(micros) / 1_000_000


def as_text(value: Any) -> str:
    """A Redis reply item as ``str`` (replies are bytes unless decoded)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def check_positive(name: str, value: float) -> None:
    """TypeError unless ``value`` is a number, ValueError unless it is > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_timing(heartbeat_interval: float, presence_ttl: float, reconnect_max_delay: float,
                 health_check_interval: float) -> None:
    """The timing settings every Redis broker takes, checked alike."""
    check_positive("heartbeat_interval", heartbeat_interval)
    check_positive("presence_ttl", presence_ttl)
    check_positive("reconnect_max_delay", reconnect_max_delay)
    check_positive("health_check_interval", health_check_interval)
    if presence_ttl <= heartbeat_interval:
        raise ValueError(
            f"presence_ttl ({presence_ttl}) must exceed heartbeat_interval "
            f"({heartbeat_interval}), or live nodes would be swept between heartbeats"
        )
