"""Sharded pub/sub on a Redis Cluster: one SSUBSCRIBE link per master serving a wanted channel.

A shard channel is served by the master of its slot only, so a node keeps one dedicated
connection per such master, made by that master's redis-py ``ClusterNode`` (its connection
class and settings: TLS, credentials, timeouts) and read by one task. Where a channel
lives comes from redis-py's slot map; this module keeps the links in step with it:

- a link breaks (master killed, frozen, restarted): its channels are re-placed;
- the server sends ``sunsubscribe`` unasked (the slot migrated away) or answers
  SSUBSCRIBE with MOVED (our slot map is stale): those channels are re-placed;

each time after re-reading the slot map, retried with capped, jittered backoff while
no master serves a slot (between a master's death and its replica's promotion).
``ClusterPubSub`` was not used: it reads the shards one after the other with a timeout
each, and its ssubscribe does not wait for the confirmation that ``subscribe`` promises.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.backoff import NoBackoff
from redis.exceptions import AskError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from roomcast.broker._cluster_common import (
    CLUSTER_ERRORS,
    TopologyRefresher,
    describe_cluster_failure,
)

log = logging.getLogger("roomcast.broker.redis_cluster")

_FIRST_RECONNECT_DELAY: Final = 0.1


@dataclass(eq=False)
class _Link:
    """One SSUBSCRIBE connection to one master, and the channels sent on it."""

    name: str
    conn: AbstractConnection
    channels: set[bytes] = field(default_factory=set)
    unsubscribing: collections.Counter[bytes] = field(default_factory=collections.Counter)
    """SUNSUBSCRIBEs we sent and whose reply has not come back yet, per channel."""
    reader: asyncio.Task[None] | None = None
    closing: bool = False


class ShardSubscriber:
    """Keeps the wanted shard channels subscribed on their current masters.

    ``on_message`` gets every message's data, on the event loop; ``on_recovered`` is
    awaited after every channel is subscribed again following a lost link.
    """

    def __init__(
        self,
        client: RedisCluster,
        url: str,
        refresher: TopologyRefresher,
        *,
        on_message: Callable[[bytes], None],
        on_recovered: Callable[[], Awaitable[None]],
        socket_timeout: float,
        health_check_interval: float,
        reconnect_max_delay: float,
    ) -> None:
        self._client = client
        self._url = url
        self._refresher = refresher
        self._on_message = on_message
        self._on_recovered = on_recovered
        self._socket_timeout = socket_timeout
        self._health_check_interval = health_check_interval
        self._reconnect_max_delay = reconnect_max_delay

        self._desired: set[bytes] = set()
        self._placed: dict[bytes, _Link] = {}
        self._links: dict[str, _Link] = {}
        self._waiters: dict[bytes, asyncio.Future[bool]] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._connected = False
        self._lost = False
        self._closed = False
        self.reconnects = 0
        """Recoveries: times every channel was subscribed again after a link was lost."""
        self.resubscribes = 0
        """Channels re-placed on another master (failover, migration, MOVED)."""

    @property
    def connected(self) -> bool:
        """True while every wanted channel sits on a live link (none lost since)."""
        return self._connected

    def links(self) -> dict[str, set[bytes]]:
        """Master name -> channels subscribed there (for tests and diagnostics)."""
        return {name: set(link.channels) for name, link in self._links.items()}

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, channels: Iterable[str]) -> None:
        """Subscribe ``channels`` and wait for every confirmation; raises CLUSTER_ERRORS."""
        self._closed = False
        wanted = [c.encode() for c in channels]
        self._desired.update(wanted)
        waiters: list[asyncio.Future[bool]] = []
        try:
            async with self._lock:
                for channel in wanted:
                    waiters.append(await self._place(channel, self._owner(channel)))
            if not all(await self._settle(waiters)):
                raise TimeoutError(
                    f"the cluster did not confirm SSUBSCRIBE within {self._socket_timeout} s"
                )
        except BaseException:
            await self._teardown()
            raise
        self._connected = True
        self._supervisor = asyncio.create_task(self._supervise(),
                                               name="roomcast-cluster-supervisor")

    async def close(self) -> None:
        """Stop the supervisor and every link; idempotent; ``start`` may follow."""
        self._closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._teardown()

    async def _teardown(self) -> None:
        self._connected = False
        async with self._lock:  # an add() opening a link finishes first
            for link in list(self._links.values()):
                await self._close_link(link)
            for channel in list(self._waiters):
                self._resolve(channel, False)
            self._desired.clear()
            self._placed.clear()

    # -- subscriptions ---------------------------------------------------------------

    async def add(self, channel: str) -> None:
        """Subscribe ``channel``; returns once confirmed, refused, or after the socket timeout."""
        key = channel.encode()
        self._desired.add(key)
        waiter: asyncio.Future[bool] | None = None
        async with self._lock:
            # the wanted set was updated before the lock: whatever order calls get it
            # in, the link ends up matching the latest call
            if key in self._desired and key not in self._placed and not self._closed:
                try:
                    waiter = await self._place(key, self._owner(key))
                except CLUSTER_ERRORS as exc:
                    # its master is unreachable: the supervisor places it when it can
                    log.debug("SSUBSCRIBE %r deferred: %s", channel, exc)
                    self._lost = True
                    self._connected = False
                    self._wake.set()
            else:
                waiter = self._waiters.get(key)
        if waiter is not None:
            await asyncio.wait([waiter], timeout=self._socket_timeout)

    async def remove(self, channel: str) -> None:
        """Unsubscribe ``channel``; messages still in flight are the caller's to ignore."""
        key = channel.encode()
        self._desired.discard(key)
        async with self._lock:
            link = self._placed.get(key)
            if key in self._desired or link is None:
                return
            self._unplace(key)
            await self._unsubscribe(link, key)

    # -- placement (under the lock) --------------------------------------------------

    def _owner(self, channel: bytes) -> ClusterNode:
        return self._client.nodes_manager.get_node_from_slot(self._client.keyslot(channel))

    async def _place(self, channel: bytes, node: ClusterNode) -> asyncio.Future[bool]:
        """SSUBSCRIBE ``channel`` on the link to ``node``; the future of its confirmation."""
        link = self._links.get(node.name)
        if link is None:
            link = await self._open_link(node)
        waiter = self._waiters.get(channel)
        if waiter is None or waiter.done():
            waiter = self._waiters[channel] = asyncio.get_running_loop().create_future()
        link.channels.add(channel)
        self._placed[channel] = link
        try:
            await _send(link, "SSUBSCRIBE", channel)
        except BaseException:
            # the send broke the link: its reader sees that and recovers; here, undo
            self._unplace(channel)
            raise
        return waiter

    async def _unsubscribe(self, link: _Link, channel: bytes) -> None:
        link.unsubscribing[channel] += 1
        try:
            await _send(link, "SUNSUBSCRIBE", channel)
        except CLUSTER_ERRORS as exc:
            log.debug("SUNSUBSCRIBE not sent (the link is going away): %s", exc)

    def _unplace(self, channel: bytes) -> None:
        link = self._placed.pop(channel, None)
        if link is not None:
            link.channels.discard(channel)
        self._resolve(channel, False)

    def _resolve(self, channel: bytes, confirmed: bool) -> None:
        waiter = self._waiters.pop(channel, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(confirmed)

    async def _open_link(self, node: ClusterNode) -> _Link:
        options = dict(node.connection_kwargs)
        options["retry"] = Retry(NoBackoff(), 0)  # this module decides when to reconnect
        conn: AbstractConnection = node.connection_class(**options)
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            await _disconnect(conn)
            raise
        link = _Link(node.name, conn)
        self._links[node.name] = link
        link.reader = asyncio.create_task(self._run_link(link),
                                          name=f"roomcast-cluster-link-{node.name}")
        return link

    async def _close_link(self, link: _Link) -> None:
        link.closing = True
        if self._links.get(link.name) is link:
            del self._links[link.name]
        for channel in list(link.channels):
            if self._placed.get(channel) is link:
                self._unplace(channel)
        if link.reader is not None and link.reader is not asyncio.current_task():
            link.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await link.reader
        await _disconnect(link.conn)

    async def _reconcile(self) -> bool:
        """Make the links match the slot map; True once every wanted channel is confirmed."""
        waiters: list[asyncio.Future[bool]] = []
        complete = True
        async with self._lock:
            for channel, link in list(self._placed.items()):
                try:
                    moved = self._owner(channel).name != link.name
                except CLUSTER_ERRORS:
                    moved = True
                if moved:
                    self._unplace(channel)
                    await self._unsubscribe(link, channel)
            unreachable: set[str] = set()  # try each master once per pass, not per channel
            for channel in self._desired - self._placed.keys():
                node: ClusterNode | None = None
                try:
                    node = self._owner(channel)
                    if node.name in unreachable:
                        complete = False
                        continue
                    waiters.append(await self._place(channel, node))
                    self.resubscribes += 1
                except CLUSTER_ERRORS as exc:
                    log.debug("SSUBSCRIBE %r deferred: %s", channel, exc)
                    if node is not None:
                        unreachable.add(node.name)
                    complete = False
            for channel in self._desired:
                pending = self._waiters.get(channel)
                if pending is not None and pending not in waiters:
                    waiters.append(pending)
            for link in list(self._links.values()):
                if not link.channels and not link.unsubscribing:
                    await self._close_link(link)  # a master we no longer need
        return all(await self._settle(waiters)) and complete

    async def _settle(self, waiters: list[asyncio.Future[bool]]) -> list[bool]:
        if waiters:
            await asyncio.wait(waiters, timeout=self._socket_timeout)
        return [w.done() and w.result() for w in waiters]

    # -- recovery --------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Whenever woken: refresh the slot map and re-place channels until all are live."""
        while True:
            await self._wake.wait()
            attempt = 0
            warned = False
            while True:
                self._wake.clear()
                if attempt:
                    await asyncio.sleep(self._backoff(attempt - 1))
                attempt += 1
                try:
                    await self._refresher.refresh()
                    done = await self._reconcile()
                except CLUSTER_ERRORS as exc:
                    done = False
                    if not warned:
                        log.warning("re-subscribing shard channels: %s; retrying",
                                    describe_cluster_failure(exc, self._url))
                        warned = True
                if done and not self._wake.is_set():  # nothing new went wrong meanwhile
                    break
            if self._lost:
                self._lost = False
                self._connected = True
                self.reconnects += 1
                log.info("sharded pub/sub restored after %d attempt(s): %d channel(s) on "
                         "%d master(s)", attempt, len(self._placed), len(self._links))
                try:
                    await self._on_recovered()
                except Exception:
                    log.exception("re-registering after recovery failed")

    def _backoff(self, attempt: int) -> float:
        """Capped exponential delay with jitter, so restarted nodes don't stampede Redis."""
        ceiling = min(self._reconnect_max_delay, _FIRST_RECONNECT_DELAY * 2.0 ** min(attempt, 30))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    # -- reading ---------------------------------------------------------------------

    async def _run_link(self, link: _Link) -> None:
        try:
            await self._read(link)
        except asyncio.CancelledError:
            raise
        except CLUSTER_ERRORS as exc:
            if not link.closing:
                log.warning("lost the sharded pub/sub link to %s (%s); re-subscribing its "
                            "%d channel(s)", link.name, exc or type(exc).__name__,
                            len(link.channels))
        except Exception:
            log.exception("sharded pub/sub reader of %s failed; re-subscribing", link.name)
        finally:
            if not link.closing:
                self._lost = True
                self._connected = False
                self._wake.set()
                await self._close_link(link)

    async def _read(self, link: _Link) -> None:
        """Handle every reply; PING when idle, give up when the PING goes unanswered."""
        loop = asyncio.get_running_loop()
        idle, pong_wait = self._health_check_interval, self._socket_timeout
        awaiting_pong = False
        while True:
            try:
                async with asyncio.timeout(None) as deadline:
                    while True:
                        # re-arm the idle timer only once half of it is used up
                        limit = pong_wait if awaiting_pong else idle
                        now, when = loop.time(), deadline.when()
                        if when is None or when - now < limit / 2:
                            deadline.reschedule(now + limit)
                        try:
                            reply = await link.conn.read_response(
                                timeout=math.inf, disconnect_on_error=False
                            )
                        except AskError as exc:  # MOVED/ASK: our slot map is stale
                            awaiting_pong = False
                            self._refused(link, exc)
                            continue
                        awaiting_pong = False  # any reply proves the server alive
                        self._on_reply(link, reply)
            except TimeoutError:
                if awaiting_pong:
                    raise TimeoutError(
                        f"no answer to PING within {pong_wait} s; is {link.name} frozen?"
                    ) from None
                await link.conn.send_command("PING", check_health=False)
                awaiting_pong = True

    def _on_reply(self, link: _Link, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 2:
            return  # PONG outside subscribed mode
        kind = reply[0]
        if kind == b"smessage":
            self._on_message(reply[2])
        elif kind == b"ssubscribe":
            if self._placed.get(reply[1]) is link:
                self._resolve(reply[1], True)
        elif kind == b"sunsubscribe":
            channel = reply[1]
            if link.unsubscribing[channel] > 0:
                link.unsubscribing[channel] -= 1  # the answer to our own SUNSUBSCRIBE
                if not link.unsubscribing[channel]:
                    del link.unsubscribing[channel]
            elif self._placed.get(channel) is link:
                # unasked: the slot left this master (migration, or it became a replica)
                log.info("master %s dropped shard channel %r (slot moved); re-subscribing",
                         link.name, channel.decode(errors="replace"))
                self._unplace(channel)
                self._wake.set()

    def _refused(self, link: _Link, exc: AskError) -> None:
        """SSUBSCRIBE answered MOVED/ASK: re-place that slot's unconfirmed channels."""
        for channel in list(link.channels):
            if channel in self._waiters and self._client.keyslot(channel) == exc.slot_id:
                self._unplace(channel)
        log.info("master %s refused a shard channel of slot %s (%s); re-reading the slot map",
                 link.name, exc.slot_id, type(exc).__name__)
        self._wake.set()


async def _send(link: _Link, *args: str | bytes) -> None:
    # never let redis-py reconnect a broken link behind its reader's back
    if link.closing or not link.conn.is_connected:
        raise RedisConnectionError(f"the pub/sub link to {link.name} is down")
    await link.conn.send_command(*args, check_health=False)


async def _disconnect(conn: AbstractConnection) -> None:
    with contextlib.suppress(*CLUSTER_ERRORS):
        await conn.disconnect(nowait=True)
