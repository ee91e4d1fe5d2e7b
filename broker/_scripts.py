"""The Lua scripts roomcast runs in Redis, the commands that call them, and their replies.

Every script touches presence keys only, and every presence key shares the slot of
``Keys.nodes`` (on a cluster the prefix is their hash tag), so each script declares a key
of that slot as ``KEYS[1]``: a Redis Cluster runs it atomically on the one master of the
presence slot, and a single server does not care. Scripts reach the other presence keys
through the prefixes passed in ARGV. Scores use the Redis clock, so nodes on different
hosts need no clock agreement.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from roomcast.broker._keys import Keys
from roomcast.broker._transport import Command, Transport, call
from roomcast.shared.ids import ConnectionId, NodeId, Room

# clear_node(): delete every presence entry of one node and its connections' info (the
# hash people_key); returns the removed entries as a flat {room, connection, info, ...}.
# A helper of the scripts below.
_CLEAR_NODE: Final = """
local function clear_node(node, presence_prefix, rooms_key, people_key)
  local removed = {}
  for _, room in ipairs(redis.call('SMEMBERS', rooms_key)) do
    local hash = presence_prefix .. room
    local flat = redis.call('HGETALL', hash)
    for i = 1, #flat, 2 do
      if flat[i + 1] == node then
        redis.call('HDEL', hash, flat[i])
        local info = redis.call('HGET', people_key, flat[i])
        removed[#removed + 1] = room
        removed[#removed + 1] = flat[i]
        removed[#removed + 1] = info or ''
      end
    end
  end
  redis.call('DEL', rooms_key)
  redis.call('DEL', people_key)
  return removed
end
"""

# KEYS[1] nodes zset; ARGV node, ttl, presence prefix, node-rooms prefix, people prefix.
# Returns {1 if the node was missing (swept, or Redis lost it), the dead nodes removed,
# the presence entries removed with them as {room, connection, info, ...}}.
HEARTBEAT: Final = _CLEAR_NODE + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local added = redis.call('ZADD', KEYS[1], string.format('%.6f', now), ARGV[1])
local cutoff = string.format('(%.6f', now - tonumber(ARGV[2]))
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff)
local departed = {}
for _, node in ipairs(dead) do
  for _, item in ipairs(clear_node(node, ARGV[3], ARGV[4] .. node, ARGV[5] .. node)) do
    departed[#departed + 1] = item
  end
  redis.call('ZREM', KEYS[1], node)
end
return {added, dead, departed}
"""

# KEYS[1] this node's rooms set, KEYS[2] its people hash; ARGV node, presence prefix,
# the number of room/connection pairs, the pairs, then connection/info pairs.
RESYNC: Final = _CLEAR_NODE + """
clear_node(ARGV[1], ARGV[2], KEYS[1], KEYS[2])
local pairs_end = 3 + 2 * tonumber(ARGV[3])
for i = 4, pairs_end, 2 do
  redis.call('HSET', ARGV[2] .. ARGV[i], ARGV[i + 1], ARGV[1])
  redis.call('SADD', KEYS[1], ARGV[i])
end
for i = pairs_end + 1, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
return 1
"""

# KEYS[1] nodes zset, KEYS[2] this node's rooms set, KEYS[3] its people hash; ARGV node,
# presence prefix.
WITHDRAW: Final = _CLEAR_NODE + """
clear_node(ARGV[1], ARGV[2], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""

# KEYS[1] nodes zset, KEYS[2] one room's presence hash; ARGV people prefix. The members
# with their info ({connection, node, info, ...}), the scores and the server time.
READ_PRESENCE: Final = """
local t = redis.call('TIME')
local flat = redis.call('HGETALL', KEYS[2])
local out = {}
for i = 1, #flat, 2 do
  out[#out + 1] = flat[i]
  out[#out + 1] = flat[i + 1]
  out[#out + 1] = redis.call('HGET', ARGV[1] .. flat[i + 1], flat[i]) or ''
end
return {t[1], t[2], out, redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')}
"""

# KEYS[1] nodes zset, KEYS[2] one room's presence hash: the scores, the members and the
# server time, read together.
READ_MEMBERS: Final = """
local t = redis.call('TIME')
return {t[1], t[2], redis.call('HGETALL', KEYS[2]),
        redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')}
"""


def heartbeat(keys: Keys, node: NodeId, presence_ttl: float) -> Command:
    """Refresh ``node``'s score and sweep nodes silent for longer than ``presence_ttl``."""
    return ("EVAL", HEARTBEAT, 1, keys.nodes, node, repr(presence_ttl),
            keys.presence_prefix, keys.node_rooms_prefix, keys.people_prefix)


def resync(
    keys: Keys, node: NodeId, presence: Mapping[Room, Iterable[ConnectionId]],
    people: Mapping[ConnectionId, bytes] | None = None,
) -> Command:
    """Replace everything Redis holds for ``node`` by ``presence`` (room -> members) and
    ``people`` (connection -> info)."""
    pairs: list[str | bytes] = []
    for room, members in presence.items():
        for connection in members:
            pairs += (room, connection)
    count = len(pairs) // 2
    for connection, info in (people or {}).items():
        pairs += (connection, info)
    return ("EVAL", RESYNC, 2, keys.node_rooms(node), keys.people(node), node,
            keys.presence_prefix, str(count), *pairs)


def withdraw(keys: Keys, node: NodeId) -> Command:
    """Delete ``node``'s presence entries, its people and its score (a clean shutdown)."""
    return ("EVAL", WITHDRAW, 3, keys.nodes, keys.node_rooms(node), keys.people(node), node,
            keys.presence_prefix)


def departed_entries(flat: Sequence[Any]) -> list[tuple[Room, ConnectionId, bytes]]:
    """The heartbeat's removed entries as (room, connection, info) triples."""
    return [(Room(as_text(room)), ConnectionId(as_text(conn)), _as_bytes(info))
            for room, conn, info in zip(flat[::3], flat[1::3], flat[2::3], strict=True)]


async def room_presence(
    transport: Transport, keys: Keys, room: Room, presence_ttl: float
) -> dict[ConnectionId, bytes]:
    """Members of ``room`` on live nodes with the info their node stored (b"": none)."""
    reply = await call(transport, keys.nodes,
                       ("EVAL", READ_PRESENCE, 2, keys.nodes, keys.presence(room),
                        keys.people_prefix))
    seconds, micros, flat, flat_scores = reply
    now = float(seconds) + float(micros) / 1e6
    alive = {as_text(node) for node, score in _pairs(flat_scores)
             if float(score) >= now - presence_ttl}
    return {ConnectionId(as_text(conn)): _as_bytes(info)
            for conn, node, info in zip(flat[::3], flat[1::3], flat[2::3], strict=True)
            if as_text(node) in alive}


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


async def room_members(
    transport: Transport, keys: Keys, room: Room, presence_ttl: float
) -> set[ConnectionId]:
    """Members of ``room`` whose node heartbeated within ``presence_ttl`` (Redis clock).

    One script on the presence slot, so members of a dead node are left out even before
    a peer sweeps them. Raises what the transport raises.
    """
    reply = await call(transport, keys.nodes,
                       ("EVAL", READ_MEMBERS, 2, keys.nodes, keys.presence(room)))
    seconds, micros, flat_members, flat_scores = reply
    members = dict(_pairs(flat_members))
    scores = [(node, float(score)) for node, score in _pairs(flat_scores)]
    return filter_alive(members, scores, float(seconds) + float(micros) / 1e6, presence_ttl)


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


def as_text(value: Any) -> str:
    """A Redis reply item as ``str`` (replies are bytes unless decoded)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: Sequence[Any]) -> list[tuple[Any, Any]]:
    return list(zip(flat[::2], flat[1::2], strict=True))
