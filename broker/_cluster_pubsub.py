"""Sharded pub/sub on a Redis Cluster: one SSUBSCRIBE link per master serving a wanted channel.

A shard channel is served by the master of its slot only, so a node keeps one dedicated
connection per such master, made by that master's redis-py ``ClusterNode`` (its connection
class and settings: TLS, credentials, timeouts) and read by one task. Where a channel
lives comes from redis-py's slot map. When a channel stops being subscribed, the
listener hears ``on_unsubscribed`` and the broker calls ``reconcile`` (after refreshing
the slot map) until every channel is placed again:

- a link breaks (master killed, frozen, restarted): its channels, as lost;
- the server sends ``sunsubscribe`` unasked (the slot migrated away) or answers
  SSUBSCRIBE with MOVED (our slot map is stale): those channels, as moved.

``ClusterPubSub`` was not used: it reads the shards one after the other with a timeout
each, and its ssubscribe does not wait for the confirmation that ``subscribe`` promises.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.backoff import NoBackoff
from redis.exceptions import AskError, SlotNotCoveredError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from roomcast.broker._transport import (
    REDIS_ERRORS,
    Listener,
    disconnect,
    read_replies,
    stop_tasks,
)

log = logging.getLogger("roomcast.broker.redis")


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
    """Keeps the wanted shard channels subscribed on their current masters."""

    def __init__(
        self, client: RedisCluster, *, socket_timeout: float, health_check_interval: float
    ) -> None:
        self._client = client
        self._socket_timeout = socket_timeout
        self._health_check_interval = health_check_interval
        self._listener: Listener | None = None
        self._desired: set[bytes] = set()
        self._placed: dict[bytes, _Link] = {}
        self._links: dict[str, _Link] = {}
        self._waiters: dict[bytes, asyncio.Future[bool]] = {}
        self._unreported: set[bytes] = set()
        """Channels placed again by ``reconcile`` whose confirmation it has not reported."""
        self._lock = asyncio.Lock()
        self._closed = False

    def links(self) -> dict[str, set[bytes]]:
        """Master name -> channels subscribed there (for tests and diagnostics)."""
        return {name: set(link.channels) for name, link in self._links.items()}

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, listener: Listener, channels: Iterable[str]) -> None:
        """Subscribe ``channels`` and wait for every confirmation; raises REDIS_ERRORS."""
        self._closed = False
        self._listener = listener
        wanted = [c.encode() for c in channels]
        self._desired.update(wanted)
        waiters: list[asyncio.Future[bool]] = []
        async with self._lock:
            for channel in wanted:
                waiters.append(await self._place(channel, self._owner(channel)))
        if not all(await self._settle(waiters)):
            raise TimeoutError(
                f"the cluster did not confirm SSUBSCRIBE within {self._socket_timeout} s"
            )

    async def close(self) -> None:
        """Close every link (bounded: waits for no lock); idempotent."""
        self._closed = True
        for link in list(self._links.values()):
            await self._close_link(link)
        for channel in list(self._waiters):
            self._resolve(channel, False)
        self._desired.clear()
        self._placed.clear()
        self._unreported.clear()

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
                except REDIS_ERRORS as exc:
                    # its master is unreachable: the broker repairs when it can
                    log.debug("SSUBSCRIBE %r deferred: %s", channel, exc)
                    self._report([key], lost=True)
            else:
                waiter = self._waiters.get(key)
        if waiter is not None:
            await asyncio.wait([waiter], timeout=self._socket_timeout)

    async def remove(self, channel: str) -> None:
        """Unsubscribe ``channel``; messages still in flight are the listener's to ignore."""
        key = channel.encode()
        self._desired.discard(key)
        async with self._lock:
            link = self._placed.get(key)
            if key in self._desired or link is None:
                return
            self._unplace(key)
            await self._unsubscribe(link, key)

    async def reconcile(self) -> tuple[frozenset[str], bool]:
        """Make the links match the slot map: the channels placed again (by this pass or
        an earlier one) whose SSUBSCRIBE is confirmed now and was not reported yet, and
        whether every wanted channel is confirmed now. Raises REDIS_ERRORS."""
        waiters: list[asyncio.Future[bool]] = []
        placed: set[bytes] = set()
        complete = True
        async with self._lock:
            for channel, link in list(self._placed.items()):
                try:
                    moved = self._owner(channel).name != link.name
                except REDIS_ERRORS:
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
                    placed.add(channel)
                except REDIS_ERRORS as exc:
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
        confirmed = all(await self._settle(waiters)) and complete
        self._unreported |= placed
        self._unreported &= self._desired
        # placed and no confirmation pending: confirmed (an unplaced one is not placed)
        done = {c for c in self._unreported if c in self._placed and c not in self._waiters}
        self._unreported -= done
        return frozenset(c.decode() for c in done), confirmed

    # -- placement (under the lock) --------------------------------------------------

    def _owner(self, channel: bytes) -> ClusterNode:
        return master_of(self._client, channel)

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
            # the send broke the link: its reader sees that and reports it; here, undo
            self._unplace(channel)
            raise
        return waiter

    async def _unsubscribe(self, link: _Link, channel: bytes) -> None:
        link.unsubscribing[channel] += 1
        try:
            await _send(link, "SUNSUBSCRIBE", channel)
        except REDIS_ERRORS as exc:
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

    def _report(self, channels: Collection[bytes], *, lost: bool) -> None:
        if self._listener is not None and not self._closed:
            self._listener.on_unsubscribed([c.decode() for c in channels], lost)

    async def _open_link(self, node: ClusterNode) -> _Link:
        options = dict(node.connection_kwargs)
        options["retry"] = Retry(NoBackoff(), 0)  # the broker decides when to reconnect
        conn: AbstractConnection = node.connection_class(**options)
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
            if self._closed:
                raise RedisConnectionError("the subscriber was closed")
        except BaseException:
            await disconnect(conn)
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
        try:
            await stop_tasks([link.reader], self._socket_timeout)
        finally:
            # also when the caller is cancelled meanwhile (a repair stopped by close()):
            # the link is out of ``_links`` already, nobody else would close it
            await disconnect(link.conn)

    async def _settle(self, waiters: list[asyncio.Future[bool]]) -> list[bool]:
        if waiters:
            await asyncio.wait(waiters, timeout=self._socket_timeout)
        return [w.done() and w.result() for w in waiters]

    # -- reading ---------------------------------------------------------------------

    async def _run_link(self, link: _Link) -> None:
        try:
            await read_replies(
                link.conn, lambda reply: self._on_reply(link, reply),
                idle=self._health_check_interval, pong_wait=self._socket_timeout,
                name=link.name,
            )
        except REDIS_ERRORS as exc:
            if not link.closing:
                log.warning("lost the sharded pub/sub link to %s (%s); re-subscribing its "
                            "%d channel(s)", link.name, exc or type(exc).__name__,
                            len(link.channels))
        except Exception:
            log.exception("sharded pub/sub reader of %s failed; re-subscribing", link.name)
        if not link.closing:
            lost = set(link.channels)
            await self._close_link(link)
            self._report(lost, lost=True)

    def _on_reply(self, link: _Link, reply: Any) -> None:
        if isinstance(reply, AskError):  # MOVED/ASK on SSUBSCRIBE: our slot map is stale
            self._refused(link, reply)
            return
        if isinstance(reply, Exception):
            raise reply
        if not isinstance(reply, list) or len(reply) < 2:
            return  # PONG outside subscribed mode
        kind = reply[0]
        if kind == b"smessage":
            if self._listener is not None:
                self._listener.on_message(reply[2])
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
                self._report([channel], lost=False)

    def _refused(self, link: _Link, exc: AskError) -> None:
        """SSUBSCRIBE answered MOVED/ASK: re-place that slot's unconfirmed channels."""
        refused = [channel for channel in link.channels
                   if channel in self._waiters and self._client.keyslot(channel) == exc.slot_id]
        for channel in refused:
            self._unplace(channel)
        log.info("master %s refused a shard channel of slot %s (%s); re-reading the slot map",
                 link.name, exc.slot_id, type(exc).__name__)
        self._report(refused, lost=False)


def master_of(client: RedisCluster, key: str | bytes) -> ClusterNode:
    """The master serving ``key``'s slot in the client's slot map; SlotNotCoveredError if none."""
    slot = client.keyslot(key)
    try:
        return client.nodes_manager.get_node_from_slot(slot)
    except (KeyError, SlotNotCoveredError):  # a slot missing from the map (failover)
        raise SlotNotCoveredError(f"slot {slot} is not covered by the cluster") from None


async def _send(link: _Link, *args: str | bytes) -> None:
    # never let redis-py reconnect a broken link behind its reader's back
    if link.closing or not link.conn.is_connected:
        raise RedisConnectionError(f"the pub/sub link to {link.name} is down")
    await link.conn.send_command(*args, check_health=False)
