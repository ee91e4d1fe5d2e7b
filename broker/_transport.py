"""The seam under RedisBroker: what a transport does, and the I/O pieces both transports use.

``RedisBroker`` (``broker/redis.py``) owns every policy: presence, publishing, when to
fail fast, when and how often to re-subscribe. A ``Transport`` only knows how to talk to
Redis. Two implement it: ``SingleTransport`` (``broker/_single.py``: one server,
PUBLISH/SUBSCRIBE) and ``ClusterTransport`` (``broker/_cluster.py``: a Redis Cluster,
SPUBLISH/SSUBSCRIBE per shard). ``Publisher`` uses the command half only.

Commands are routed by a key or channel name (``route``): a cluster sends them to the
master of its slot, a single server ignores it. Every command of one call must hash to
the route's slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Final, NoReturn, Protocol

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from roomcast.broker._urls import redact_url

log = logging.getLogger("roomcast.broker.redis")

Command = tuple[str | bytes | int | float, ...]
"""One Redis command and its arguments, as sent."""

DEFAULT_SOCKET_TIMEOUT: Final = 2.0
"""Seconds one Redis call may wait, by default."""

REDIS_ERRORS: Final = (RedisError, RedisClusterException, OSError, TimeoutError)
"""What a Redis call raises when the server is down, frozen, moving or refuses the command.

``RedisClusterException`` (no node reachable, slot not covered) is not a RedisError.
"""


@dataclass(frozen=True, slots=True)
class Listener:
    """What a transport tells the broker that listens through it; called on the loop."""

    on_message: Callable[[bytes], None]
    """Gets the data of every message received on a subscribed channel."""
    on_unsubscribed: Callable[[Collection[str], bool], None]
    """Gets channels that are no longer subscribed, and ``lost``: True when a link broke
    or could not be opened (messages may have been missed), False when the server moved
    them elsewhere (slot migration). The broker then calls ``repair`` to restore them."""


class Transport(Protocol):
    """How the Redis broker talks to Redis: commands by route, a publish, subscriptions."""

    @property
    def publish_command(self) -> str:
        """``PUBLISH`` or ``SPUBLISH``: the command that reaches the nodes on a channel."""
        ...

    def describe(self, exc: BaseException) -> str:
        """What went wrong and where, fit for an error message (no password)."""
        ...

    def failure_domain(self, route: str) -> str:
        """The part of Redis that serves ``route`` and fails as one: "" for a single
        server, the master's address on a cluster."""
        ...

    async def execute(self, route: str, *commands: Command) -> list[Any]:
        """Run ``commands`` on ``route``'s slot, pipelined with concurrent calls and in call
        order per slot; their replies (an error reply as an exception object).

        Raises what the whole batch failed with; bounded by the socket timeout.
        """
        ...

    async def execute_now(self, route: str, *commands: Command) -> list[Any]:
        """Like ``execute``, but written in the caller's turn where the transport can
        (before the caller first suspends), for publishes."""
        ...

    async def execute_bound(
        self, route: str, bind: Callable[[str], tuple[Command, ...]]
    ) -> list[Any]:
        """Like ``execute_now``, with the commands made by ``bind(run_id)`` once the
        connection they go out on is chosen: ``run_id`` is that server's run id where the
        transport knows it for that very connection (a connection never outlives a
        restart), else ""."""
        ...

    async def publish(self, channel: str, data: bytes) -> None:
        """PUBLISH (or SPUBLISH) ``data`` on ``channel`` as ``execute_now`` would; raises
        what Redis raised, an error reply too. The fan-out path: one call, no detour."""
        ...

    async def start(self, listener: Listener, channels: Collection[str]) -> None:
        """Reach Redis and subscribe ``channels`` for good; raises if Redis is unreachable."""
        ...

    async def subscribe(self, channel: str) -> None:
        """Subscribe ``channel``; returns once confirmed, or after the socket timeout.

        Never raises for Redis being away: the listener hears ``on_unsubscribed`` if the
        channel could not be placed, or its link is down already.
        """
        ...

    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel``; messages in flight are the listener's to ignore."""
        ...

    async def repair(self) -> tuple[frozenset[str], bool]:
        """One attempt to subscribe every wanted channel that is not: the channels
        subscribed again and confirmed since the last repair reported them (the broker
        tells ``resumed`` about their rooms), and whether every wanted one is subscribed
        now. Raises on failure."""
        ...

    async def close(self) -> None:
        """Release every link and connection, within a bounded time; idempotent."""
        ...


async def call(transport: Transport, route: str, command: Command) -> Any:
    """The reply of one command run through ``execute``; an error reply is raised."""
    (reply,) = await transport.execute(route, command)
    if isinstance(reply, Exception):
        raise reply
    return reply


def describe_failure(exc: BaseException, url: str) -> str:
    """Whether Redis was unreachable, refused or failing over, and where (no password)."""
    where = redact_url(url)
    cause = exc.__cause__
    if isinstance(exc, RedisClusterException) and isinstance(
        cause, AuthenticationError | AuthorizationError
    ):
        exc = cause  # no node of the cluster would take the credentials
    if isinstance(exc, AuthenticationError | AuthorizationError):
        return f"Redis at {where} refused the credentials ({exc}); check the URL's user/password"
    if isinstance(exc, SlotNotCoveredError):
        return f"Redis Cluster at {where} has no master for a slot now ({exc})"
    if isinstance(exc, ClusterDownError):
        return f"Redis Cluster at {where} is down ({exc}); a shard lost its master"
    if isinstance(exc, RedisClusterException):
        return f"Redis Cluster is unreachable at {where} ({exc})"
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError | TimeoutError):
        detail = str(exc) or type(exc).__name__
        return f"Redis is unreachable at {where} ({detail}); check that it runs and answers"
    return f"Redis at {where} refused the command: {exc}"


Send = Callable[[list[Command]], Awaitable[list[Any]]]
"""Sends a batch of commands as one pipeline; their replies, errors as exception objects."""


class Pipeliner:
    """Sends the commands queued in one loop turn, or while a batch is in flight, as one batch.

    One batch is in flight at a time, so commands reach Redis in the order they were
    queued: this keeps per-publisher order and orders presence writes behind each other.
    Each batch is bounded by twice ``timeout``.
    """

    def __init__(self, send: Send, timeout: float) -> None:
        self._send = send
        self._timeout = timeout
        self._queued: _Batch | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self.batches = 0
        """Batches sent so far (tests use it to see that commands were batched)."""

    async def execute(self, *commands: Command) -> list[Any]:
        """Queue ``commands`` and return their replies; a reply may be an exception object.

        Raises what the whole batch failed with (connection lost, timeout). A caller
        that is cancelled only stops waiting: its commands still go out with the batch.
        """
        if self._closed:
            raise RedisConnectionError("the connection to Redis was closed")
        if self._queued is None:
            self._queued = _Batch()
        reply: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queued.add(commands, reply)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="roomcast-redis-pipeline")
        return await reply

    async def close(self, grace: float) -> None:
        """Let queued batches go out for at most ``grace`` seconds, then stop for good."""
        self._closed = True
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            await asyncio.wait([flusher], timeout=grace)
        await stop_tasks([flusher], grace)
        if self._queued is not None:  # never sent: their callers are told
            self._queued.fail(RedisConnectionError("the connection to Redis was closed"))
            self._queued = None

    async def _flush(self) -> None:
        while self._queued is not None:
            batch, self._queued = self._queued, None
            try:
                # the socket timeouts bound each step; this bounds the whole batch
                async with asyncio.timeout(2 * self._timeout):
                    replies = await self._send(batch.commands)
                self.batches += 1
            except asyncio.CancelledError:  # closing: the callers are told, not cancelled
                batch.fail(RedisConnectionError("the connection to Redis was closed"))
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


async def read_replies(
    conn: AbstractConnection,
    handle: Callable[[Any], None],
    *,
    idle: float,
    pong_wait: float,
    name: str,
) -> NoReturn:
    """Hand every reply on a pub/sub link to ``handle``, an error reply as its exception.

    Sends PING after ``idle`` seconds without a reply, and raises TimeoutError when the
    PING is not answered within ``pong_wait``: a frozen server is detected, not waited for.
    Raises what the connection raises, and whatever ``handle`` raises; never reconnects
    ``conn`` (RedisConnectionError when it was disconnected under the reader).
    """
    loop = asyncio.get_running_loop()
    awaiting_pong = False
    while True:
        try:
            async with asyncio.timeout(None) as deadline:
                while True:
                    # Re-arm the idle timer only once half of it is used up: one timer
                    # per interval rather than one per message.
                    limit = pong_wait if awaiting_pong else idle
                    now, when = loop.time(), deadline.when()
                    if when is None or when - now < limit / 2:
                        deadline.reschedule(now + limit)
                    try:
                        reply: Any = await conn.read_response(
                            timeout=math.inf, disconnect_on_error=False
                        )
                    except ResponseError as exc:
                        reply = exc
                    awaiting_pong = False  # any reply proves the server alive
                    handle(reply)
        except TimeoutError:
            if awaiting_pong:
                raise TimeoutError(
                    f"no answer to PING within {pong_wait} s; is {name} frozen?"
                ) from None
            if not conn.is_connected:
                # closed under us (a close() that stopped waiting for this reader):
                # redis-py would connect again for the PING, and nobody would close it
                raise RedisConnectionError(f"the pub/sub link to {name} was closed") from None
            await conn.send_command("PING", check_health=False)
            awaiting_pong = True


async def stop_tasks(tasks: Iterable[asyncio.Task[Any] | None], grace: float) -> None:
    """Cancel ``tasks`` and wait at most ``grace`` seconds for them to end.

    Never raises what they raise, and never swallows the caller's own cancellation. A
    task that does not end in time is left behind with a warning: closing stays bounded.
    """
    current = asyncio.current_task()
    owned = [t for t in tasks if t is not None and t is not current]
    pending = {t for t in owned if not t.done()}
    for task in pending:
        task.cancel()
    if pending:
        _, late = await asyncio.wait(pending, timeout=grace)
        for task in late:
            log.warning("task %s did not stop within %.1f s of being cancelled; left behind",
                        task.get_name(), grace)
    for task in owned:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: a failure was handled (logged) where it happened


async def disconnect(conn: AbstractConnection) -> None:
    """Close ``conn`` at once, whatever state it is in (bounded by its connect timeout)."""
    with contextlib.suppress(*REDIS_ERRORS):
        await conn.disconnect(nowait=True)
