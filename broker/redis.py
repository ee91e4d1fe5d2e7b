"""The Redis broker: envelopes over Redis pub/sub, cluster-wide presence in Redis hashes.

Each node keeps one dedicated pub/sub connection, read by one listener task, subscribed
to its own node channel, the everyone channel and the channels of rooms it has local
members in. Publishes and presence writes go through a pool of command connections,
pipelined. Names of every channel and key live in ``broker._keys``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from typing import Any, Final

from redis.asyncio.connection import AbstractConnection

from roomcast.broker._keys import Keys, redact_url
from roomcast.broker._receiving import EnvelopeReceiver
from roomcast.broker._redis_common import (
    DEFAULT_SOCKET_TIMEOUT,
    TRANSPORT_ERRORS,
    Command,
    Pipeliner,
    PublishLink,
    as_text,
    check_timing,
    describe_failure,
    make_client,
    open_connection,
    publish_bytes,
    read_room_members,
)
from roomcast.broker.base import Deliver
from roomcast.shared.envelope import Envelope, encode
from roomcast.shared.errors import BrokerError, PublishError
from roomcast.shared.ids import ConnectionId, NodeId, Room, validate_node_id, validate_room

log = logging.getLogger("roomcast.broker.redis")

_FIRST_RECONNECT_DELAY: Final = 0.1

# clear_node(): delete every presence entry of one node; used inside the scripts below,
# each of which Redis runs atomically.
_CLEAR_NODE_LUA: Final = """
local function clear_node(node, presence_prefix, rooms_key)
  for _, room in ipairs(redis.call('SMEMBERS', rooms_key)) do
    local hash = presence_prefix .. room
    local flat = redis.call('HGETALL', hash)
    for i = 1, #flat, 2 do
      if flat[i + 1] == node then redis.call('HDEL', hash, flat[i]) end
    end
  end
  redis.call('DEL', rooms_key)
end
"""

# KEYS[1] nodes zset; ARGV node, ttl, presence prefix, node-rooms prefix.
# Scores use the Redis clock so nodes on different hosts need no clock agreement.
_HEARTBEAT_LUA: Final = (
    _CLEAR_NODE_LUA
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local added = redis.call('ZADD', KEYS[1], string.format('%.6f', now), ARGV[1])
local cutoff = string.format('(%.6f', now - tonumber(ARGV[2]))
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff)
for _, node in ipairs(dead) do
  clear_node(node, ARGV[3], ARGV[4] .. node)
  redis.call('ZREM', KEYS[1], node)
end
return {added, dead}
"""
)

# ARGV node, presence prefix, this node's rooms key, then room/connection pairs.
_RESYNC_LUA: Final = (
    _CLEAR_NODE_LUA
    + """
clear_node(ARGV[1], ARGV[2], ARGV[3])
for i = 4, #ARGV, 2 do
  redis.call('HSET', ARGV[2] .. ARGV[i], ARGV[i + 1], ARGV[1])
  redis.call('SADD', ARGV[3], ARGV[i])
end
return 1
"""
)

# KEYS[1] nodes zset; ARGV node, presence prefix, this node's rooms key.
_WITHDRAW_LUA: Final = (
    _CLEAR_NODE_LUA
    + """
clear_node(ARGV[1], ARGV[2], ARGV[3])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""
)


class RedisBroker(EnvelopeReceiver):
    """A Broker that reaches the other nodes through Redis at ``url``.

    Presence timing: a node that dies without ``close()`` (SIGKILL, power loss) drops out
    of ``room_members`` within ``presence_ttl`` of its last heartbeat, and its entries are
    deleted by a live peer within ``presence_ttl + heartbeat_interval``. Every Redis
    call is bounded by ``socket_timeout``; a silent pub/sub link is pinged after
    ``health_check_interval`` and dropped if the PING is not answered in ``socket_timeout``.

    Stats (plain ints): ``published``, ``received`` (envelopes from other nodes handed to
    ``deliver``), ``dropped`` (invalid envelopes), ``publish_failures`` and ``reconnects``
    (pub/sub links re-established).
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
        self._keys = Keys(prefix)
        self._url = url
        self._safe_url = redact_url(url)
        self._client = make_client(url, socket_timeout)
        self._pipeliner = Pipeliner(self._client, socket_timeout)
        self._publish_link = PublishLink(self._client, socket_timeout)
        self._heartbeat_interval = float(heartbeat_interval)
        self._presence_ttl = float(presence_ttl)
        self._reconnect_max_delay = float(reconnect_max_delay)
        self._socket_timeout = float(socket_timeout)
        self._health_check_interval = float(health_check_interval)

        self._node: NodeId | None = None
        self._deliver: Deliver | None = None
        self._closed = False
        self._connected = False
        self._listener: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None

        # Subscriptions: the rooms the hub wants, and those sent on the current link.
        self._desired: set[Room] = set()
        self._subscribed: set[Room] = set()
        self._sub_lock = asyncio.Lock()
        self._conn: AbstractConnection | None = None
        self._confirmations: dict[bytes, asyncio.Future[None]] = {}

        # This node's presence, re-applied whenever Redis may have lost or missed some.
        self._presence: dict[Room, set[ConnectionId]] = {}
        self._presence_dirty = False
        self._last_warning: dict[str, float] = {}

        self._publish_down: str | None = None
        """Why publishes fail fast, from a failed publish until the next heartbeat."""

        self.published = 0
        self.received = 0
        self.dropped = 0
        self.publish_failures = 0
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        """True while the pub/sub link is up and subscribed."""
        return self._connected

    @property
    def has_peers(self) -> bool:
        """Always True: other nodes may share this Redis."""
        return True

    @property
    def node_id(self) -> NodeId | None:
        """The node id given to ``start()``, None before."""
        return self._node

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, node_id: NodeId, deliver: Deliver) -> None:
        """Connect, subscribe to this node's and the everyone channel, register, listen.

        Raises BrokerError if Redis cannot be reached now, so a bad URL fails fast.
        """
        if self._closed:
            raise BrokerError("this RedisBroker is closed; create a new one")
        if self._node is not None:
            raise BrokerError(f"this RedisBroker is already started as node {self._node}")
        self._node = validate_node_id(node_id)
        self._deliver = deliver
        try:
            conn = await self._open_pubsub()
            try:
                await self._heartbeat()
                await self._publish_link.connect()
            except BaseException:
                await self._drop_link(conn)
                raise
        except TRANSPORT_ERRORS as exc:
            self._node = None
            self._deliver = None
            raise BrokerError(f"cannot start: {describe_failure(exc, self._url)}") from exc
        self._connected = True
        self._listener = asyncio.create_task(self._listen(conn), name="roomcast-redis-listener")
        self._heartbeat_task = asyncio.create_task(
            self._heartbeat_loop(), name="roomcast-redis-heartbeat"
        )
        log.info("node %s joined Redis at %s (prefix %r)", node_id, self._safe_url,
                 self._keys.prefix)

    async def close(self) -> None:
        """Withdraw this node's presence, stop the tasks, close connections; idempotent."""
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (self._listener, self._heartbeat_task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        node = self._node
        if node is not None:
            try:
                await self._pipeliner.execute(
                    ("EVAL", _WITHDRAW_LUA, 1, self._keys.nodes, node,
                     self._keys.presence_prefix, self._keys.node_rooms(node))
                )
            except TRANSPORT_ERRORS as exc:
                log.warning(
                    "could not withdraw node %s's presence (%s); peers remove it within %.1f s",
                    node, describe_failure(exc, self._url),
                    self._presence_ttl + self._heartbeat_interval,
                )
        await self._pipeliner.drain()
        await self._publish_link.close()
        if self._conn is not None:
            await self._drop_link(self._conn)
        self._presence.clear()
        self._desired.clear()
        self._connected = False
        with contextlib.suppress(*TRANSPORT_ERRORS):
            await self._client.aclose()  # can time out if Redis is frozen

    # -- publishing ------------------------------------------------------------------

    async def publish(self, envelope: Envelope) -> None:
        """PUBLISH ``envelope`` on its one channel, pipelined with concurrent publishes.

        The command is written before this first suspends (``PublishLink``), so it leaves
        ahead of the local members' writes the hub queued just before. Raises
        PublishError (and counts it) if Redis did not take it.
        """
        self._require_running()
        if self._publish_down is not None:
            # Redis failed the last publish: fail at once until a heartbeat gets through,
            # rather than making every caller wait out the socket timeout (a frozen Redis
            # would otherwise stall each handler that awaits its broadcast).
            self.publish_failures += 1
            raise PublishError(self._publish_down)
        try:
            await publish_bytes(
                self._publish_link, self._url, self._keys.channel_for(envelope),
                encode(envelope),
            )
        except PublishError as exc:
            self.publish_failures += 1
            self._publish_down = f"{exc} (failing fast until Redis answers a heartbeat)"
            self._warn("publish", "cross-node publish failed (%d so far): %s",
                       self.publish_failures, exc)
            raise
        self.published += 1

    # -- subscriptions ---------------------------------------------------------------

    async def subscribe(self, room: Room) -> None:
        """Receive ``room``'s envelopes; returns once Redis confirmed (or the link is down)."""
        room = validate_room(room)
        self._desired.add(room)
        await self._sync_subscriptions()
        waiter = self._confirmations.get(self._keys.room_channel(room).encode())
        if waiter is not None:
            await asyncio.wait([waiter], timeout=self._socket_timeout)

    async def unsubscribe(self, room: Room) -> None:
        """Stop receiving ``room``'s envelopes; late ones still in flight are ignored."""
        room = validate_room(room)
        self._desired.discard(room)
        await self._sync_subscriptions()

    async def _sync_subscriptions(self) -> None:
        # The desired set was updated before this call, so whatever order the lock is
        # granted in, the link ends up matching the latest call for every room.
        async with self._sub_lock:
            conn = self._conn
            if conn is None or not conn.is_connected:
                return  # the listener re-subscribes every desired room on reconnect
            add = self._desired - self._subscribed
            drop = self._subscribed - self._desired
            try:
                if drop:
                    self._subscribed -= drop
                    await conn.send_command(
                        "UNSUBSCRIBE", *(self._keys.room_channel(r) for r in drop),
                        check_health=False,
                    )
                if add:
                    channels = [self._keys.room_channel(r) for r in add]
                    loop = asyncio.get_running_loop()
                    for channel in channels:
                        self._confirmations.setdefault(channel.encode(), loop.create_future())
                    self._subscribed |= add
                    await conn.send_command("SUBSCRIBE", *channels, check_health=False)
            except TRANSPORT_ERRORS as exc:
                # the send closed the link; the listener sees it and restores everything
                log.debug("subscription change not sent: %s", exc)

    # -- presence --------------------------------------------------------------------

    async def room_members(self, room: Room) -> set[ConnectionId]:
        """Every connection in ``room`` on a live node; BrokerError if Redis is unreachable."""
        if self._closed:
            raise BrokerError("this RedisBroker is closed")
        return await read_room_members(
            self._client, self._keys, validate_room(room), self._presence_ttl, self._url
        )

    async def _presence_changed(self, *commands: Command) -> None:
        if not self._connected:
            # Redis is known to be away: don't make the hub wait for a timeout; the
            # reconnect re-applies the whole local mirror anyway.
            self._presence_dirty = True
            return
        await self._write_presence(*commands)

    async def _write_presence(self, *commands: Command) -> None:
        try:
            replies = await self._pipeliner.execute(*commands)
        except TRANSPORT_ERRORS as exc:
            replies = [exc]
        failure = next((r for r in replies if isinstance(r, Exception)), None)
        if failure is not None:
            # remembered, and re-applied in full by the heartbeat or the reconnect
            self._presence_dirty = True
            self._warn("presence", "presence write deferred: %s",
                       describe_failure(failure, self._url))

    async def _resync_presence(self) -> None:
        """Replace this node's presence in Redis by the local mirror, atomically."""
        node = self._require_running()
        self._presence_dirty = False
        pairs: list[str] = []
        for room, members in self._presence.items():
            for connection in members:
                pairs += (room, connection)
        await self._write_presence(
            ("EVAL", _RESYNC_LUA, 0, node, self._keys.presence_prefix,
             self._keys.node_rooms(node), *pairs)
        )

    async def _heartbeat(self) -> None:
        """Refresh this node's score, sweep dead nodes, re-register if we were swept."""
        node = self._require_running()
        # through the pipeliner, so a beat still in flight can't land after close()'s
        # withdrawal and bring a closed node back
        (reply,) = await self._pipeliner.execute(
            ("EVAL", _HEARTBEAT_LUA, 1, self._keys.nodes, node, repr(self._presence_ttl),
             self._keys.presence_prefix, self._keys.node_rooms_prefix)
        )
        if isinstance(reply, Exception):
            raise reply
        added, dead = reply
        self._publish_down = None  # Redis answers again: publishes may try again
        if dead:
            log.info("removed the presence of dead nodes %s",
                     ", ".join(as_text(n) for n in dead))
        if added and self._presence:
            log.info("node %s was missing from Redis (swept or Redis restarted); "
                     "re-registering its presence", node)
            await self._resync_presence()
        elif self._presence_dirty:
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
            except TRANSPORT_ERRORS as exc:
                if not failing:
                    log.warning("heartbeat failed: %s", describe_failure(exc, self._url))
                failing = True
            except Exception:
                # a bug here must not silently stop the beats: peers would sweep us
                log.exception("heartbeat failed unexpectedly; retrying")
                failing = True
            else:
                if failing:
                    log.info("heartbeat to %s works again", self._safe_url)
                failing = False
            next_beat = max(next_beat, loop.time() - self._heartbeat_interval)

    # -- listening -------------------------------------------------------------------

    async def _open_pubsub(self) -> AbstractConnection:
        """A new pub/sub link, subscribed to this node's, everyone's and desired rooms."""
        node = self._require_running()
        conn = await open_connection(self._client)
        try:
            async with self._sub_lock:
                rooms = set(self._desired)
                channels = [self._keys.node_channel(node), self._keys.all_channel]
                channels += (self._keys.room_channel(r) for r in rooms)
                await conn.send_command("SUBSCRIBE", *channels, check_health=False)
                pending = {c.encode() for c in channels}
                while pending:
                    reply = await conn.read_response(disconnect_on_error=False)
                    if reply[0] == b"subscribe":
                        pending.discard(reply[1])
                    else:
                        self._on_reply(reply)
                self._conn = conn
                self._subscribed = rooms
        except BaseException:
            await _disconnect(conn)
            raise
        return conn

    async def _listen(self, conn: AbstractConnection | None) -> None:
        """Read the pub/sub link for ever; reconnect with backoff whenever it breaks."""
        while True:
            if conn is None:
                conn = await self._reconnect()
            try:
                await self._read(conn)
            except asyncio.CancelledError:
                raise
            except TRANSPORT_ERRORS as exc:
                log.warning("lost the pub/sub link to %s (%s); reconnecting",
                            self._safe_url, exc or type(exc).__name__)
            except Exception:
                log.exception("pub/sub listener failed; reconnecting")
            finally:
                await self._drop_link(conn)
            conn = None

    async def _read(self, conn: AbstractConnection) -> None:
        """Hand every reply to _on_reply; PING when idle, give up when the PING goes unanswered."""
        loop = asyncio.get_running_loop()
        idle, pong_wait = self._health_check_interval, self._socket_timeout
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
                        reply = await conn.read_response(
                            timeout=math.inf, disconnect_on_error=False
                        )
                        awaiting_pong = False  # any reply proves the server alive
                        self._on_reply(reply)
            except TimeoutError:
                if awaiting_pong:
                    raise TimeoutError(
                        f"no answer to PING within {pong_wait} s; is Redis frozen?"
                    ) from None
                await conn.send_command("PING", check_health=False)
                awaiting_pong = True

    async def _reconnect(self) -> AbstractConnection:
        attempt = 0
        while True:
            await asyncio.sleep(self._backoff(attempt))
            attempt += 1
            try:
                conn = await self._open_pubsub()
            except TRANSPORT_ERRORS as exc:
                log.warning("reconnect attempt %d to %s failed: %s", attempt, self._safe_url,
                            exc or type(exc).__name__)
                continue
            # Redis may have restarted empty: register the node and re-apply all its
            # presence; if that fails now, the heartbeat loop retries (still dirty).
            self._presence_dirty = True
            try:
                await self._heartbeat()
            except TRANSPORT_ERRORS as exc:
                log.warning("could not re-register presence after reconnect: %s",
                            describe_failure(exc, self._url))
            self.reconnects += 1
            self._connected = True
            log.info("pub/sub link to %s restored after %d attempt(s), %d room(s) "
                     "re-subscribed", self._safe_url, attempt, len(self._subscribed))
            return conn

    def _backoff(self, attempt: int) -> float:
        """Capped exponential delay with jitter, so restarted nodes don't stampede Redis."""
        ceiling = min(self._reconnect_max_delay, _FIRST_RECONNECT_DELAY * 2.0 ** min(attempt, 30))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    async def _drop_link(self, conn: AbstractConnection) -> None:
        if self._conn is conn:
            self._conn = None
            self._subscribed = set()
        self._connected = False
        for waiter in self._confirmations.values():
            if not waiter.done():
                waiter.set_result(None)
        self._confirmations.clear()
        await _disconnect(conn)

    def _on_reply(self, reply: Any) -> None:
        kind = reply[0]
        if kind == b"message":
            self._on_message(reply[2])
        elif kind == b"subscribe":
            waiter = self._confirmations.pop(reply[1], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)



async def _disconnect(conn: AbstractConnection) -> None:
    with contextlib.suppress(*TRANSPORT_ERRORS):
        await conn.disconnect(nowait=True)
