"""The Redis Cluster broker: envelopes over sharded pub/sub, presence in one hash-tag slot.

Same behaviour as ``RedisBroker``, on a Redis Cluster through redis-py's ``RedisCluster``:

- Channels keep their names (``{prefix}:room:{room}``, ``{prefix}:node:{node}``,
  ``{prefix}:all``) and travel by SPUBLISH/SSUBSCRIBE, so each one lives on the master of
  its slot: a room's traffic stays on one shard and rooms spread over all of them.
- Presence keys put the prefix in a hash tag (``{roomcast}:presence:lobby``,
  ``{roomcast}:node-rooms:<node>``, ``{roomcast}:nodes``): one slot, so the heartbeat,
  sweep, re-sync and read scripts (the very scripts of ``RedisBroker``) run atomically
  on one master.
- Publishes and presence writes are pipelined per master; a dead master fails only its
  own rooms' publishes. Subscriptions follow failovers and slot migrations by themselves
  (``broker._cluster_pubsub``).

URL: ``redis+cluster://[[user]:password@]host[:port][,host[:port]...][/?options]``, or
``rediss+cluster://`` for TLS; any one reachable node is enough to find the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from roomcast.broker._cluster_common import (
    CLUSTER_ERRORS,
    ShardPipeliner,
    TopologyRefresher,
    describe_cluster_failure,
    make_cluster_client,
    read_cluster_room_members,
    spublish_bytes,
)
from roomcast.broker._cluster_pubsub import ShardSubscriber
from roomcast.broker._keys import Keys, redact_url
from roomcast.broker._receiving import EnvelopeReceiver
from roomcast.broker._redis_common import (
    DEFAULT_SOCKET_TIMEOUT,
    Command,
    as_text,
    check_positive,
    check_timing,
)
from roomcast.broker.base import Deliver
from roomcast.broker.publisher import PublisherBase
from roomcast.broker.redis import _HEARTBEAT_LUA, _RESYNC_LUA, _WITHDRAW_LUA
from roomcast.shared.envelope import Envelope, encode
from roomcast.shared.errors import BrokerError, PublishError
from roomcast.shared.ids import ConnectionId, NodeId, Room, validate_node_id, validate_room

__all__ = ["ClusterPublisher", "RedisClusterBroker"]

log = logging.getLogger("roomcast.broker.redis_cluster")




class RedisClusterBroker(EnvelopeReceiver):
    """A Broker that reaches the other nodes through the Redis Cluster at ``url``.

    Timing, failure rules and stats are those of ``RedisBroker``: a node that dies
    without ``close()`` drops out of ``room_members`` within ``presence_ttl`` of its last
    heartbeat and is swept by a live peer within ``presence_ttl + heartbeat_interval``;
    a publish that cannot be made raises PublishError. Stats (plain ints): ``published``,
    ``received``, ``dropped``, ``publish_failures``, ``reconnects`` (recoveries after a
    lost pub/sub link) and ``resubscribes`` (channels moved to another master).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "roomcast",
        heartbeat_interval: float = 1.0,
        presence_ttl: float = 5.0,
        reconnect_max_delay: float = 5.0,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        health_check_interval: float = 1.0,
    ) -> None:
        check_timing(heartbeat_interval, presence_ttl, reconnect_max_delay,
                     health_check_interval)
        self._keys = Keys(prefix, cluster=True)
        self._url = url
        self._safe_url = redact_url(url)
        self._client = make_cluster_client(url, socket_timeout)
        self._refresher = TopologyRefresher(self._client, float(socket_timeout))
        self._pipeliner = ShardPipeliner(self._client, float(socket_timeout),
                                         self._refresher.request)
        self._subscriber = ShardSubscriber(
            self._client, url, self._refresher,
            on_message=self._on_message, on_recovered=self._on_recovered,
            socket_timeout=float(socket_timeout),
            health_check_interval=float(health_check_interval),
            reconnect_max_delay=float(reconnect_max_delay),
        )
        self._heartbeat_interval = float(heartbeat_interval)
        self._presence_ttl = float(presence_ttl)

        self._node: NodeId | None = None
        self._deliver: Deliver | None = None
        self._closed = False
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._desired: set[Room] = set()

        # This node's presence, re-applied whenever Redis may have lost or missed some.
        self._presence: dict[Room, set[ConnectionId]] = {}
        self._presence_dirty = False
        self._last_warning: dict[str, float] = {}

        self.published = 0
        self.received = 0
        self.dropped = 0
        self.publish_failures = 0

    @property
    def connected(self) -> bool:
        """True while every channel this node needs is subscribed on a live master."""
        return self._subscriber.connected and not self._closed

    @property
    def has_peers(self) -> bool:
        """Always True: other nodes may share this cluster."""
        return True

    @property
    def node_id(self) -> NodeId | None:
        """The node id given to ``start()``, None before."""
        return self._node

    @property
    def reconnects(self) -> int:
        """Times sharded pub/sub was restored after a link to a master was lost."""
        return self._subscriber.reconnects

    @property
    def resubscribes(self) -> int:
        """Channels re-subscribed on another master (failover, slot migration, MOVED)."""
        return self._subscriber.resubscribes

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, node_id: NodeId, deliver: Deliver) -> None:
        """Find the cluster, subscribe this node's and the everyone channel, register.

        Raises BrokerError if the cluster cannot be reached now, so a bad URL fails fast.
        """
        if self._closed:
            raise BrokerError("this RedisClusterBroker is closed; create a new one")
        if self._node is not None:
            raise BrokerError(f"this RedisClusterBroker is already started as node "
                              f"{self._node}")
        self._node = validate_node_id(node_id)
        self._deliver = deliver
        try:
            await self._client.initialize()
            await self._subscriber.start(
                [self._keys.node_channel(self._node), self._keys.all_channel]
            )
            await self._heartbeat()
        except CLUSTER_ERRORS as exc:
            self._node = None
            self._deliver = None
            await self._subscriber.close()
            raise BrokerError(
                f"cannot start: {describe_cluster_failure(exc, self._url)}"
            ) from exc
        self._heartbeat_task = asyncio.create_task(
            self._heartbeat_loop(), name="roomcast-cluster-heartbeat"
        )
        log.info("node %s joined Redis Cluster at %s (prefix %r, %d masters)", node_id,
                 self._safe_url, self._keys.prefix, len(self._client.get_primaries()))

    async def close(self) -> None:
        """Withdraw this node's presence, stop the tasks, close connections; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
        node = self._node
        if node is not None:
            try:
                replies = await self._pipeliner.execute(
                    self._keys.nodes,
                    ("EVAL", _WITHDRAW_LUA, 1, self._keys.nodes, node,
                     self._keys.presence_prefix, self._keys.node_rooms(node)),
                )
                _raise_first(replies)
            except CLUSTER_ERRORS as exc:
                log.warning(
                    "could not withdraw node %s's presence (%s); peers remove it within %.1f s",
                    node, describe_cluster_failure(exc, self._url),
                    self._presence_ttl + self._heartbeat_interval,
                )
        await self._pipeliner.drain()
        await self._subscriber.close()
        await self._refresher.close()
        self._presence.clear()
        self._desired.clear()
        with contextlib.suppress(*CLUSTER_ERRORS):
            await self._client.aclose()  # can time out if a master is frozen

    # -- publishing ------------------------------------------------------------------

    async def publish(self, envelope: Envelope) -> None:
        """SPUBLISH ``envelope`` on its one channel, pipelined per master.

        Raises PublishError (and counts it) if the cluster did not take it.
        """
        self._require_running()
        try:
            await spublish_bytes(
                self._pipeliner, self._url, self._keys.channel_for(envelope), encode(envelope)
            )
        except PublishError as exc:
            self.publish_failures += 1
            self._warn("publish", "cross-node publish failed (%d so far): %s",
                       self.publish_failures, exc)
            raise
        self.published += 1

    # -- subscriptions ---------------------------------------------------------------

    async def subscribe(self, room: Room) -> None:
        """Receive ``room``'s envelopes; returns once its master confirmed (or refused)."""
        room = validate_room(room)
        self._desired.add(room)
        await self._subscriber.add(self._keys.room_channel(room))

    async def unsubscribe(self, room: Room) -> None:
        """Stop receiving ``room``'s envelopes; late ones still in flight are ignored."""
        room = validate_room(room)
        self._desired.discard(room)
        await self._subscriber.remove(self._keys.room_channel(room))

    # -- presence --------------------------------------------------------------------

    async def _presence_changed(self, *commands: Command) -> None:
        await self._write_presence(*commands)

    async def room_members(self, room: Room) -> set[ConnectionId]:
        """Every connection in ``room`` on a live node; BrokerError if unreachable."""
        if self._closed:
            raise BrokerError("this RedisClusterBroker is closed")
        return await read_cluster_room_members(
            self._client, self._keys, validate_room(room), self._presence_ttl, self._url
        )

    async def _write_presence(self, *commands: Command) -> None:
        if self._presence_dirty:
            # the presence master failed lately: don't make the hub wait for a timeout;
            # the next heartbeat re-applies the whole local mirror anyway
            return
        try:
            replies = await self._pipeliner.execute(self._keys.nodes, *commands)
            failure = next((r for r in replies if isinstance(r, Exception)), None)
        except CLUSTER_ERRORS as exc:
            failure = exc
        if failure is not None:
            # remembered, and re-applied in full by the next heartbeat
            self._presence_dirty = True
            self._warn("presence", "presence write deferred: %s",
                       describe_cluster_failure(failure, self._url))

    async def _resync_presence(self) -> None:
        """Replace this node's presence in Redis by the local mirror, atomically."""
        node = self._require_running()
        self._presence_dirty = False
        pairs: list[str] = []
        for room, members in self._presence.items():
            for connection in members:
                pairs += (room, connection)
        rooms_key = self._keys.node_rooms(node)
        # KEYS[1] only routes the script to the presence slot; the script reads ARGV
        await self._write_presence(
            ("EVAL", _RESYNC_LUA, 1, rooms_key, node, self._keys.presence_prefix,
             rooms_key, *pairs)
        )

    async def _heartbeat(self) -> None:
        """Refresh this node's score, sweep dead nodes, re-register if we were swept."""
        node = self._require_running()
        (reply,) = await self._pipeliner.execute(
            self._keys.nodes,
            ("EVAL", _HEARTBEAT_LUA, 1, self._keys.nodes, node, repr(self._presence_ttl),
             self._keys.presence_prefix, self._keys.node_rooms_prefix),
        )
        if isinstance(reply, Exception):
            raise reply
        added, dead = reply
        if dead:
            log.info("removed the presence of dead nodes %s",
                     ", ".join(as_text(n) for n in dead))
        if (added and self._presence) or self._presence_dirty:
            if added and self._presence:
                log.info("node %s was missing from Redis (swept or failed over); "
                         "re-registering its presence", node)
            await self._resync_presence()

    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_beat = loop.time()
        failing = False
        while True:
            next_beat += self._heartbeat_interval
            await asyncio.sleep(max(0.0, next_beat - loop.time()))
            try:
                await self._heartbeat()
            except CLUSTER_ERRORS as exc:
                if not failing:
                    log.warning("heartbeat failed: %s",
                                describe_cluster_failure(exc, self._url))
                failing = True
                # the presence master may be failing over and lose recent writes
                self._presence_dirty = True
            except Exception:
                # a bug here must not silently stop the beats: peers would sweep us
                log.exception("heartbeat failed unexpectedly; retrying")
                failing = True
            else:
                if failing:
                    log.info("heartbeat to %s works again", self._safe_url)
                failing = False
            next_beat = max(next_beat, loop.time() - self._heartbeat_interval)

    async def _on_recovered(self) -> None:
        # the presence master may have failed over and lost recent writes: re-apply all
        self._presence_dirty = True
        try:
            await self._heartbeat()
        except CLUSTER_ERRORS as exc:
            log.warning("could not re-register presence after recovery: %s",
                        describe_cluster_failure(exc, self._url))

    # -- receiving -------------------------------------------------------------------



class ClusterPublisher(PublisherBase):
    """``Publisher`` for a Redis Cluster: reaches the nodes sharing ``prefix`` at ``url``.

    Same methods and rules as ``broker.Publisher`` (which takes ``redis://`` URLs):
    ``presence_ttl`` must match the nodes'; failures raise PublishError and are counted
    in ``publish_failures``.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "roomcast",
        presence_ttl: float = 5.0,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
    ) -> None:
        check_positive("presence_ttl", presence_ttl)
        self._keys = Keys(prefix, cluster=True)
        self._url = url
        self._presence_ttl = float(presence_ttl)
        self._client = make_cluster_client(url, socket_timeout)
        self._refresher = TopologyRefresher(self._client, float(socket_timeout))
        self._pipeliner = ShardPipeliner(self._client, float(socket_timeout),
                                         self._refresher.request)
        self._closed = False
        self.published = 0
        self.publish_failures = 0

    async def _send(self, channel: str, data: bytes) -> None:
        await spublish_bytes(self._pipeliner, self._url, channel, data)

    async def _read_members(self, room: Room) -> set[ConnectionId]:
        return await read_cluster_room_members(
            self._client, self._keys, room, self._presence_ttl, self._url
        )

    async def _release(self) -> None:
        await self._pipeliner.drain()
        await self._refresher.close()
        with contextlib.suppress(*CLUSTER_ERRORS):
            await self._client.aclose()


def _raise_first(replies: list[Any]) -> None:
    failure = next((r for r in replies if isinstance(r, Exception)), None)
    if failure is not None:
        raise failure
