"""The Redis broker: envelopes over Redis pub/sub, cluster-wide presence in Redis.

One class, ``RedisBroker``, for one Redis server (``redis://``, ``rediss://``,
``unix://``) and for a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``). It
owns every rule: the lifecycle, this node's presence (a local mirror, heartbeats,
re-syncs, sweeping dead nodes), receiving envelopes (decode, filter, count, deliver),
publishing (in the caller's turn, failing fast after a failure) and re-subscribing
after a lost link (capped, jittered backoff). How to talk to Redis is the transport's
job (``broker/_transport.py``), chosen by the URL's scheme: ``SingleTransport`` or
``ClusterTransport``. Channel and key names live in ``broker/_keys.py``, the Lua scripts
in ``broker/_scripts.py``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Collection, Iterable
from typing import Final

from roomcast.broker import _scripts as scripts
from roomcast.broker._cluster import ClusterTransport
from roomcast.broker._history import RedisHistory
from roomcast.broker._keys import Keys
from roomcast.broker._single import SingleTransport
from roomcast.broker._transport import (
    DEFAULT_SOCKET_TIMEOUT,
    REDIS_ERRORS,
    Command,
    Listener,
    Transport,
    call,
    stop_tasks,
)
from roomcast.broker._urls import is_cluster_url, redact_url
from roomcast.broker.base import (
    BrokerStats,
    Deliver,
    Departed,
    Resumed,
    check_history_publish,
    check_history_read,
)
from roomcast.shared.envelope import ROOM_CHANNEL_KINDS, Envelope, decode, encode
from roomcast.shared.errors import BrokerError, EnvelopeError, PublishError
from roomcast.shared.history import History, HistoryPage, Position
from roomcast.shared.ids import (
    ConnectionId,
    NodeId,
    Room,
    node_of,
    validate_node_id,
    validate_room,
)

log = logging.getLogger("roomcast.broker.redis")

_FIRST_RECONNECT_DELAY: Final = 0.1
_WARN_EVERY: Final = 1.0
"""Seconds between two warnings about the same kind of failure (publish, presence)."""


def transport_for(url: str, *, socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
                  health_check_interval: float = 1.0) -> Transport:
    """The transport ``url``'s scheme asks for: a Redis Cluster or one server."""
    if not isinstance(url, str):
        raise TypeError(f"Redis URL must be a str, got {type(url).__name__}")
    if is_cluster_url(url):
        return ClusterTransport(url, socket_timeout=socket_timeout,
                                health_check_interval=health_check_interval)
    return SingleTransport(url, socket_timeout=socket_timeout,
                           health_check_interval=health_check_interval)


class RedisBroker:
    """A Broker that reaches the other nodes through the Redis (or Redis Cluster) at ``url``.

    Presence timing: a node that dies without ``close()`` (SIGKILL, power loss) drops out
    of ``room_members`` within ``presence_ttl`` of its last heartbeat, and its entries are
    deleted by a live peer within ``presence_ttl + heartbeat_interval``. Every Redis call
    is bounded by ``socket_timeout``, and so is each step of ``close()``; a silent pub/sub
    link is pinged after ``health_check_interval`` and dropped if the PING is not answered
    within ``socket_timeout``.

    Failure rules, the same for both transports:

    - A publish that Redis did not take raises PublishError and is counted; then every
      publish to the same part of Redis (the server, or the room's master on a cluster)
      fails at once until a heartbeat or, with each heartbeat, a PING gets through, so a
      frozen Redis holds one caller for the timeout, not every one.
    - Presence calls never raise for Redis being away. After a failed presence write or
      heartbeat, or a lost link, writes are skipped and the next heartbeat replaces this
      node's presence in Redis by the local mirror, in one script.
    - A lost link is restored with capped, jittered backoff: every channel is subscribed
      again and presence re-registered before ``connected`` turns True.
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
        self._keys = Keys(prefix, cluster=isinstance(url, str) and is_cluster_url(url))
        self._transport = transport_for(url, socket_timeout=socket_timeout,
                                        health_check_interval=health_check_interval)
        self._history = RedisHistory(self._transport, self._keys)
        self._safe_url = redact_url(url)
        self._heartbeat_interval = float(heartbeat_interval)
        self._presence_ttl = float(presence_ttl)
        self._reconnect_max_delay = float(reconnect_max_delay)
        self._timeout = float(socket_timeout)

        self._node: NodeId | None = None
        self._deliver: Deliver | None = None
        self._resumed: Resumed | None = None
        self._started = False
        self._closed = False
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._probes: dict[str, asyncio.Task[None]] = {}

        self._rooms: set[Room] = set()
        """Rooms with local members: their envelopes are delivered, others dropped."""
        self._trouble = asyncio.Event()
        """Set when channels stopped being subscribed: the supervisor repairs."""
        self._lost = False
        """A link was lost and is not restored yet."""
        self._failing: dict[str, tuple[str, str]] = {}
        """Failure domain -> (a route in it, why): publishes there fail fast."""

        # This node's presence, re-applied whenever Redis may have lost or missed some.
        self._presence: dict[Room, set[ConnectionId]] = {}
        self._people: dict[ConnectionId, bytes] = {}
        """Info of this node's connections with presence (mirrored in their hash)."""
        self._memberships: dict[ConnectionId, int] = {}
        """How many rooms each connection of this node has presence in."""
        self._departed: Departed | None = None
        self._presence_dirty = False
        self._last_warning: dict[str, float] = {}
        self.stats = BrokerStats()
        """Counters, read by metrics; ``reconnects`` counts lost links restored."""

    @property
    def connected(self) -> bool:
        """True while every channel this node needs is subscribed on a live link."""
        return self._started and not self._closed and not self._lost

    @property
    def has_peers(self) -> bool:
        """Always True: other nodes may share this Redis."""
        return True

    @property
    def node_id(self) -> NodeId | None:
        """The node id given to ``start()``, None before."""
        return self._node

    # -- lifecycle -------------------------------------------------------------------

    async def start(
        self, node_id: NodeId, deliver: Deliver, *, resumed: Resumed | None = None,
        departed: Departed | None = None,
    ) -> None:
        """Connect, subscribe this node's and the everyone channel, register, listen.

        ``resumed`` gets the rooms whose subscription came back after a gap (a lost
        link, a failover, a slot move), once they are subscribed again. Raises
        BrokerError if Redis cannot be reached now, so a bad URL fails fast; the broker
        is closed then (make a new one to try again).
        """
        if self._closed:
            raise BrokerError("this RedisBroker is closed; create a new one")
        if self._node is not None:
            raise BrokerError(f"this RedisBroker is already started as node {self._node}")
        node = self._node = validate_node_id(node_id)
        self._deliver = deliver
        self._resumed = resumed
        self._departed = departed
        listener = Listener(self._on_message, self._on_unsubscribed)
        try:
            await self._transport.start(
                listener, [self._keys.node_channel(node), self._keys.all_channel]
            )
            await self._heartbeat()
        except BaseException as exc:
            await self.close()
            self._node = None
            self._deliver = None
            if isinstance(exc, REDIS_ERRORS):
                raise BrokerError(f"cannot start: {self._transport.describe(exc)}") from exc
            raise
        self._started = True
        self._heartbeat_task = asyncio.create_task(
            self._heartbeat_loop(), name="roomcast-redis-heartbeat")
        self._supervisor = asyncio.create_task(self._supervise(), name="roomcast-redis-supervisor")
        log.info("node %s joined Redis at %s (prefix %r)", node, self._safe_url,
                 self._keys.prefix)

    async def close(self) -> None:
        """Withdraw this node's presence, stop the tasks, close connections; idempotent.

        Bounded whatever Redis does (down, frozen, failing over): background tasks are
        cancelled first, and each step gives up after the socket timeout or twice it.
        """
        if self._closed:
            return
        self._closed = True
        await stop_tasks(
            [self._supervisor, self._heartbeat_task, *self._probes.values()], self._timeout
        )
        node = self._node
        if node is not None and self._started:
            try:
                async with asyncio.timeout(2 * self._timeout):
                    await call(self._transport, self._keys.nodes,
                               scripts.withdraw(self._keys, node))
            except REDIS_ERRORS as exc:
                log.warning(
                    "could not withdraw node %s's presence (%s); peers remove it within %.1f s",
                    node, self._transport.describe(exc),
                    self._presence_ttl + self._heartbeat_interval,
                )
        await self._history.close()
        await self._transport.close()
        self._presence.clear()
        self._people.clear()
        self._memberships.clear()
        self._rooms.clear()

    # -- publishing ------------------------------------------------------------------

    async def publish(
        self,
        envelope: Envelope,
        *,
        history: History | None = None,
        idempotency_key: str | None = None,
    ) -> Position | None:
        """Publish ``envelope`` on its one channel, pipelined with concurrent publishes.

        On one server the command is written before this first suspends, so it leaves
        ahead of the local members' writes the hub queued just before; on a cluster it
        is pipelined per master. Raises PublishError (and counts it) if Redis did not
        take it, or at once while the channel's part of Redis is failing.

        With ``history`` (see Broker.publish) the command is one script on the room's
        slot (EVALSHA, written in the caller's turn on one server) that stores the
        envelope at the room's next position and publishes it; this node gets it back
        on the room's channel like every other subscribed node.
        """
        self._require_running()
        if history is not None or idempotency_key is not None or envelope.offset:
            history = check_history_publish(envelope, history, idempotency_key)
        channel = self._keys.channel_for(envelope)
        if self._failing:
            failing = self._failing.get(self._transport.failure_domain(channel))
            if failing is not None:
                self.stats.publish_failures += 1
                raise PublishError(failing[1], maybe_sent=False)
        position: Position | None = None
        try:
            if history is None:
                await self._transport.publish(channel, encode(envelope))
            else:
                position, duplicate = await self._history.publish(
                    envelope, history, idempotency_key)
        except REDIS_ERRORS as exc:
            self.stats.publish_failures += 1
            reason = self._transport.describe(exc)
            self._failing[self._transport.failure_domain(channel)] = (
                channel, f"{reason} (failing fast until it answers again, checked with "
                         "each heartbeat)")
            self._warn("publish", "cross-node publish failed (%d so far): %s",
                       self.stats.publish_failures, reason)
            raise PublishError(reason) from exc
        if position is not None:
            if duplicate:
                self.stats.duplicates += 1
                return position
            self.stats.history_published += 1
        self.stats.published += 1
        return position

    async def read_history(
        self, room: Room, history: History, *, since: int | None = None, limit: int = 100
    ) -> HistoryPage:
        """The room's position and messages after ``since``; see Broker.read_history.

        One script on the room's slot, pipelined with concurrent calls. A room whose
        history was lost (keys gone, Redis restarted without them, a failover) gets its
        new epoch here already, so readers learn it before the next publish. Raises
        BrokerError when Redis cannot be reached.
        """
        self._require_running()
        room = check_history_read(room, history, since, limit)
        try:
            page = await self._history.read(room, history, since, limit)
        except REDIS_ERRORS as exc:
            self.stats.history_read_failures += 1
            raise BrokerError(f"cannot read the history of room {room!r}: "
                              f"{self._transport.describe(exc)}") from exc
        except BrokerError:
            self.stats.history_read_failures += 1
            raise
        self.stats.history_reads += 1
        return page

    # -- subscriptions ---------------------------------------------------------------

    async def subscribe(self, room: Room) -> None:
        """Receive ``room``'s envelopes; returns once Redis confirmed (or the link is down)."""
        room = validate_room(room)
        self._rooms.add(room)
        await self._transport.subscribe(self._keys.room_channel(room))

    async def unsubscribe(self, room: Room) -> None:
        """Stop receiving ``room``'s envelopes; late ones still in flight are ignored."""
        room = validate_room(room)
        self._rooms.discard(room)
        await self._transport.unsubscribe(self._keys.room_channel(room))

    # -- presence --------------------------------------------------------------------

    async def add_presence(
        self, room: Room, connection: ConnectionId, info: bytes = b""
    ) -> None:
        """Record ``connection`` in ``room`` (with ``info``); never raises for Redis
        being down."""
        node = self._require_running()
        room = validate_room(room)
        owner = node_of(connection)
        if owner != node:
            raise ValueError(f"connection {connection} belongs to node {owner}, not {node}")
        members = self._presence.setdefault(room, set())
        if connection not in members:
            members.add(connection)
            self._memberships[connection] = self._memberships.get(connection, 0) + 1
        commands: list[Command] = [
            ("HSET", self._keys.presence(room), connection, node),
            ("SADD", self._keys.node_rooms(node), room),
        ]
        if info:
            self._people[connection] = info
            commands.append(("HSET", self._keys.people(node), connection, info))
        await self._write_presence(*commands)

    async def remove_presence(self, connection: ConnectionId, rooms: Iterable[Room]) -> None:
        """Withdraw ``connection`` from ``rooms``; never raises for Redis being down."""
        node = self._node
        commands: list[Command] = []
        for room in rooms:
            members = self._presence.get(room)
            if members is not None and connection in members:
                members.discard(connection)
                if not members:
                    del self._presence[room]
                left = self._memberships.get(connection, 1) - 1
                if left > 0:
                    self._memberships[connection] = left
                else:
                    self._memberships.pop(connection, None)
                    if self._people.pop(connection, None) is not None and node is not None:
                        commands.append(("HDEL", self._keys.people(node), connection))
            commands.append(("HDEL", self._keys.presence(room), connection))
            if node is not None and room not in self._presence:
                commands.append(("SREM", self._keys.node_rooms(node), room))
        if commands and node is not None and not self._closed:
            await self._write_presence(*commands)

    async def room_members(self, room: Room) -> set[ConnectionId]:
        """Every connection in ``room`` on a live node; BrokerError if Redis is unreachable."""
        if self._closed:
            raise BrokerError("this RedisBroker is closed")
        try:
            return await scripts.room_members(
                self._transport, self._keys, validate_room(room), self._presence_ttl)
        except REDIS_ERRORS as exc:
            raise BrokerError(self._transport.describe(exc)) from exc

    async def room_presence(self, room: Room) -> dict[ConnectionId, bytes]:
        """Every connection in ``room`` on a live node with its info; BrokerError if
        Redis is unreachable."""
        if self._closed:
            raise BrokerError("this RedisBroker is closed")
        try:
            return await scripts.room_presence(
                self._transport, self._keys, validate_room(room), self._presence_ttl)
        except REDIS_ERRORS as exc:
            raise BrokerError(self._transport.describe(exc)) from exc

    async def _write_presence(self, *commands: Command) -> None:
        if self._presence_dirty:
            # Redis failed lately: don't make the hub wait for a timeout; the next
            # heartbeat re-applies the whole local mirror anyway
            return
        try:
            replies = await self._transport.execute(self._keys.nodes, *commands)
        except REDIS_ERRORS as exc:
            replies = [exc]
        failure = next((r for r in replies if isinstance(r, Exception)), None)
        if failure is not None:
            self._presence_dirty = True
            self._warn("presence", "presence write deferred: %s",
                       self._transport.describe(failure))

    async def _resync_presence(self, node: NodeId) -> None:
        """Replace this node's presence in Redis by the local mirror, atomically."""
        self._presence_dirty = False
        await self._write_presence(
            scripts.resync(self._keys, node, self._presence, self._people))

    async def _heartbeat(self) -> None:
        """Refresh this node's score, sweep dead nodes, re-sync presence if needed.

        Raises what the transport raises, so the caller knows the beat failed.
        """
        node = self._require_running()
        # through the pipeline, so a beat still in flight can't land after close()'s
        # withdrawal and bring a closed node back
        added, dead, departed = await call(
            self._transport, self._keys.nodes,
            scripts.heartbeat(self._keys, node, self._presence_ttl))
        # the presence slot answers again: publishes there may try again
        self._failing.pop(self._transport.failure_domain(self._keys.nodes), None)
        if dead:
            log.info("removed the presence of dead nodes %s",
                     ", ".join(scripts.as_text(n) for n in dead))
        if departed and self._departed is not None:
            try:
                self._departed(scripts.departed_entries(departed))
            except Exception:
                log.exception("departed callback raised; the heartbeat goes on")
        if added and self._presence:
            log.info("node %s was missing from Redis (swept, restarted or failed over); "
                     "re-registering its presence", node)
            await self._resync_presence(node)
        elif self._presence_dirty:
            await self._resync_presence(node)

    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_beat = loop.time()
        failing = False
        while True:
            next_beat += self._heartbeat_interval
            await asyncio.sleep(max(0.0, next_beat - loop.time()))
            try:
                await self._heartbeat()
            except REDIS_ERRORS as exc:
                # Redis may lose recent writes (restart, failover): re-apply them all
                self._presence_dirty = True
                if not failing:
                    log.warning("heartbeat failed: %s", self._transport.describe(exc))
                failing = True
            except Exception:
                # a bug here must not silently stop the beats: peers would sweep us
                log.exception("heartbeat failed unexpectedly; retrying")
                failing = True
            else:
                if failing:
                    log.info("heartbeat to %s works again", self._safe_url)
                failing = False
            self._probe_failing()
            next_beat = max(next_beat, loop.time() - self._heartbeat_interval)

    def _probe_failing(self) -> None:
        """PING each part of Redis publishes fail fast for, unless a PING is on its way."""
        for domain, (route, _) in self._failing.items():
            probe = self._probes.get(domain)
            if probe is None or probe.done():
                self._probes[domain] = asyncio.create_task(
                    self._probe(domain, route), name="roomcast-redis-probe")

    async def _probe(self, domain: str, route: str) -> None:
        try:
            await call(self._transport, route, ("PING",))
        except REDIS_ERRORS:
            return  # still failing; the next heartbeat probes again
        self._failing.pop(domain, None)

    # -- receiving and re-subscribing ------------------------------------------------

    def _on_message(self, data: bytes) -> None:
        try:
            envelope = decode(data)
        except EnvelopeError as exc:
            self.stats.dropped += 1
            self._warn("dropped", "dropped an invalid envelope from Redis (%d so far): %s",
                       self.stats.dropped, exc)
            return
        except Exception:
            # anyone can publish on our channels: a decoder bug must not kill the link
            self.stats.dropped += 1
            log.exception("dropped an envelope the decoder choked on (%d so far)",
                          self.stats.dropped)
            return
        if envelope.origin and envelope.origin == self._node and not envelope.offset:
            return  # our own publish: the hub already delivered it locally
        if envelope.kind in ROOM_CHANNEL_KINDS and envelope.target not in self._rooms:
            return  # in flight when the room's last local member left
        self.stats.received += 1
        if self._deliver is None:
            return
        try:
            self._deliver(envelope)
        except Exception:
            log.exception("deliver callback raised for a %s envelope; listener goes on",
                          envelope.kind.name)

    def _on_unsubscribed(self, channels: Collection[str], lost: bool) -> None:
        if self._closed:
            return
        if lost:
            self._lost = True
            self._presence_dirty = True  # Redis may have restarted or failed over
        self._trouble.set()

    async def _supervise(self) -> None:
        """Whenever channels stopped being subscribed: repair until every one is back."""
        while True:
            await self._trouble.wait()
            attempt = 0
            warned = False
            restored: set[str] = set()
            while True:
                self._trouble.clear()
                if attempt or self._lost:
                    # a lost link may mean every node lost it: jitter, don't stampede
                    await asyncio.sleep(self._backoff(attempt))
                attempt += 1
                try:
                    channels, complete = await self._transport.repair()
                except REDIS_ERRORS as exc:
                    complete = False
                    if not warned:
                        log.warning("re-subscribing at %s: %s; retrying", self._safe_url,
                                    self._transport.describe(exc))
                        warned = True
                except Exception:
                    # a bug here must not stop the repairs for good
                    complete = False
                    if not warned:
                        log.exception("re-subscribing failed unexpectedly; retrying")
                        warned = True
                else:
                    restored |= channels
                    self._report_resumed(channels)
                if self._closed:
                    return  # a repair that outlived close(): stop here
                if complete and not self._trouble.is_set():  # nothing new went wrong
                    break
            self.stats.resubscribes += len(restored)
            if self._lost:
                await self._recovered(attempt, len(restored))

    def _report_resumed(self, channels: Collection[str]) -> None:
        """Tell ``resumed`` which subscribed rooms came back on these channels."""
        if self._resumed is None or self._closed or not channels:
            return
        rooms = frozenset(room for room in self._rooms
                          if self._keys.room_channel(room) in channels)
        if not rooms:
            return
        self.stats.resumed_rooms += len(rooms)
        try:
            self._resumed(rooms)
        except Exception:
            log.exception("resumed callback raised for %d room(s); listener goes on",
                          len(rooms))

    async def _recovered(self, attempts: int, channels: int) -> None:
        """Every channel is back after a lost link: re-register, then report connected."""
        try:
            await self._heartbeat()  # re-applies the whole mirror: presence is dirty
        except REDIS_ERRORS as exc:
            log.warning("could not re-register presence after reconnecting: %s; the "
                        "heartbeat retries", self._transport.describe(exc))
        except Exception:
            log.exception("re-registering presence after reconnecting failed; the "
                          "heartbeat retries")
        if self._trouble.is_set():
            return  # lost again meanwhile: the supervisor goes on
        self._lost = False
        self.stats.reconnects += 1
        log.info("pub/sub link to %s restored after %d attempt(s), %d channel(s) "
                 "re-subscribed", self._safe_url, attempts, channels)

    def _backoff(self, attempt: int) -> float:
        """Capped exponential delay with jitter, so restarted nodes don't stampede Redis."""
        ceiling = min(self._reconnect_max_delay, _FIRST_RECONNECT_DELAY * 2.0 ** min(attempt, 30))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    # -- helpers ---------------------------------------------------------------------

    def _require_running(self) -> NodeId:
        if self._closed:
            raise BrokerError("this RedisBroker is closed")
        if self._node is None:
            raise BrokerError("this RedisBroker is not started; call start() first")
        return self._node

    def _warn(self, topic: str, message: str, *args: object) -> None:
        # an outage fails every call; one warning per second per topic is enough
        now = time.monotonic()
        if now - self._last_warning.get(topic, -_WARN_EVERY) >= _WARN_EVERY:
            self._last_warning[topic] = now
            log.warning(message, *args)


def check_positive(name: str, value: float) -> None:
    """TypeError unless ``value`` is a number, ValueError unless it is > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def check_timing(heartbeat_interval: float, presence_ttl: float, reconnect_max_delay: float,
                 health_check_interval: float) -> None:
    """The timing settings of a RedisBroker, checked before anything is made."""
    check_positive("heartbeat_interval", heartbeat_interval)
    check_positive("presence_ttl", presence_ttl)
    check_positive("reconnect_max_delay", reconnect_max_delay)
    check_positive("health_check_interval", health_check_interval)
    if presence_ttl <= heartbeat_interval:
        raise ValueError(
            f"presence_ttl ({presence_ttl}) must exceed heartbeat_interval "
            f"({heartbeat_interval}), or live nodes would be swept between heartbeats"
        )
