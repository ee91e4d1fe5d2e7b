"""Room history in Redis: the two Lua scripts, and the rules around them.

Per room with history (key names in ``broker/_keys.py``; one slot per room on a cluster):

- the meta hash: ``e`` epoch, ``o`` top offset, ``r`` the identity of the Redis server
  that wrote it last, ``d`` whether that server was durable then, ``x`` when its TTL
  was last set (ms, server clock). Expires ``meta_ttl`` after the last publish (its
  TTL is refreshed once ``meta_ttl / 16`` has passed, not on every publish), or after
  the read that made it.
- the stream: one entry per message, auto id (Redis time), fields ``o`` offset and ``m``
  the complete envelope with its position. Trimmed approximately (``MAXLEN ~ size`` on
  every publish, ``MINID ~ now - ttl`` on every 16th: whole stream nodes only; the
  script ran about a quarter faster than with exact trimming on every publish), so it
  may hold up to about a stream node (100 entries) more; expires ``ttl`` after the
  last publish. Reads are exact:
  they leave out entries of offset ``top - size`` or less and entries older than
  ``ttl`` by their id's time, so the window served is exactly the last ``size``
  messages of at most ``ttl`` age, with or without publishes.
- idempotency keys: ``epoch:offset`` of the publish that used the key.

PUBLISH_SCRIPT assigns the next offset, appends the envelope to the stream and publishes
it, all in one atomic script, so the position on the wire is the one stored. The
envelope bytes are ``encode_head(envelope)`` + ``cmsgpack.pack(epoch)`` +
``cmsgpack.pack(offset)``. READ_SCRIPT returns the position and the entries after an
offset, atomically.

Epochs that cannot lie. A server's identity is its ``run_id`` (new at every start) and
its ``master_replid`` (new whenever it is promoted). When the meta hash was written by
another identity, writes that were acknowledged may have been lost (a restart without
persistence or with AOF everysec, a failover to a replica that lagged, a failover and a
failback), so the room gets a new epoch; its offsets keep counting from the top, so an
offset is never reused within any epoch. Only when the writer was durable (appendonly
yes, appendfsync always, never promoted since it started) and the current server is
too, the epoch is kept: every acknowledged write is in the data the server loaded.

Durability is read with CONFIG GET (not allowed in scripts) and INFO, per part of Redis
(a server, a cluster master), and handed to the scripts with the identity it was read
from: the script trusts it only for that identity. A script that meets a durable
writer's meta on a server whose durability the caller has not read yet answers STALE;
the caller reads it and runs the script again (nothing was written). CONFIG renamed or
refused (managed Redis) reads as not durable: epochs then change at every restart.

The run id costs an ``INFO server`` inside the script (about 5 µs of Redis CPU). On one
server, publishes go through a connection of their own whose run id was read when it
connected (a connection never outlives a restart) and pass it in; ``master_replid`` is
always read in the script (``INFO replication``), because a connection does outlive a
demotion and a promotion.

Scripts run by EVALSHA; where the script may be missing (first use per part of Redis,
after a failure there) a SCRIPT LOAD goes first in the same pipeline. A NOSCRIPT
reply anyway (SCRIPT FLUSH, a restart not seen as a failure) is answered with EVAL:
publishes that were in flight together run again in the order they were made, though
one made later may be stored before them if another client loaded the script in
between (each still gets exactly one position).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from redis.exceptions import NoScriptError, ResponseError

from roomcast.broker._keys import Keys
from roomcast.broker._transport import REDIS_ERRORS, Command, Transport
from roomcast.shared.cache import ENTRY_OVERHEAD, BoundedCache
from roomcast.shared.envelope import Envelope, decode, encode_head
from roomcast.shared.errors import BrokerError, EnvelopeError
from roomcast.shared.history import History, HistoryPage, Position, new_epoch
from roomcast.shared.ids import Room

log = logging.getLogger("roomcast.broker.redis")

DECODED_CACHE_BYTES: Final = 4 * 2**20
"""About how much memory the envelopes decoded from history entries may hold, kept by the
entry's bytes (``shared.cache``): a room's clients recovering the same messages at once
decode each once, not once each."""

# room_position(): the room's epoch and top offset under the rules above, or nil when
# the caller's durability is stale. ARGV 1 run id ('' = read it here), 2 durable
# ('1'/'0'), 3 identity durability was read from, 4 may answer STALE ('1'/'0'), 5 epoch
# candidate, 6 meta ttl (ms).
_ROOM_POSITION: Final = """
local function room_position(meta, stream)
  local run = ARGV[1]
  if run == '' then
    run = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
  end
  local repl = redis.call('INFO', 'replication')
  local ident = run .. ':' .. string.match(repl, 'master_replid:(%w+)')
  local promoted = string.match(repl, 'second_repl_offset:(-?%d+)') ~= '-1'
  local durable = ARGV[2] == '1' and ARGV[3] == ident and not promoted
  local m = redis.call('HMGET', meta, 'e', 'o', 'r', 'd', 'x')
  local epoch, top, changed = m[1], tonumber(m[2]), false
  if not epoch or not top then
    epoch, top, changed = ARGV[5], 0, true
    redis.call('DEL', stream)
  elseif m[3] ~= ident then
    if m[4] == '1' and not promoted and ARGV[3] ~= ident and ARGV[4] == '1' then
      return nil
    end
    if not (m[4] == '1' and durable) then epoch = ARGV[5] end
    changed = true
  end
  return epoch, top, ident, durable and '1' or '0', changed, tonumber(m[5])
end
"""

# KEYS meta, stream, idempotency key (or meta again: a key of the same slot). ARGV 1-6
# as room_position; 7 channel, 8 envelope head, 9 size, 10 ttl (ms), 11 PUBLISH or
# SPUBLISH, 12 idempotency key given ('1'/'0'), 13 its ttl (ms).
# Returns {epoch, offset, 0}, or {epoch, offset, 1} for a key seen before, or {'STALE'}.
PUBLISH_SCRIPT: Final = _ROOM_POSITION + """
if ARGV[12] == '1' then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local e, o = string.match(seen, '^(.*):(%d+)$')
    return {e, tonumber(o), 1}
  end
end
local epoch, top, ident, durable, changed, refreshed = room_position(KEYS[1], KEYS[2])
if not epoch then return {'STALE'} end
local offset = top + 1
local o = string.format('%d', offset)
local envelope = ARGV[8] .. cmsgpack.pack(epoch) .. cmsgpack.pack(offset)
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[9], '*', 'o', o, 'm', envelope)
local now = tonumber(string.match(id, '^(%d+)'))  -- the server's clock, in ms
if changed or not refreshed or now - refreshed > tonumber(ARGV[6]) / 16 then
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', o, 'r', ident, 'd', durable,
             'x', string.format('%d', now))
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
else
  redis.call('HSET', KEYS[1], 'o', o, 'd', durable)
end
if offset % 16 == 0 and now > tonumber(ARGV[10]) then
  redis.call('XTRIM', KEYS[2], 'MINID', '~', string.format('%d', now - tonumber(ARGV[10])))
end
redis.call('PEXPIRE', KEYS[2], ARGV[10])
redis.call(ARGV[11], ARGV[7], envelope)
if ARGV[12] == '1' then
  redis.call('SET', KEYS[3], epoch .. ':' .. o, 'PX', ARGV[13])
end
return {epoch, offset, 0}
"""

# KEYS meta, stream. ARGV 1-6 as room_position; 7 since (-1: the latest), 8 limit,
# 9 ttl (ms), 10 size. Returns {epoch, top, more (0/1), envelope...} (oldest first, at
# most limit, offsets after since, none older than ttl, none of the size window), or
# {'STALE'}.
READ_SCRIPT: Final = _ROOM_POSITION + """
local epoch, top, ident, durable, changed = room_position(KEYS[1], KEYS[2])
if not epoch then return {'STALE'} end
if changed then
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', string.format('%d', top), 'r', ident,
             'd', durable)
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
end
local since, limit = tonumber(ARGV[7]), tonumber(ARGV[8])
local oldest = math.max(since, top - tonumber(ARGV[10]))
local want = math.min(limit + 1, top - oldest)
local out = {epoch, top, 0}
if want <= 0 then return out end
local t = redis.call('TIME')
local cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[9])
local found = {}
for _, entry in ipairs(redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', want)) do
  if tonumber(string.match(entry[1], '^(%d+)')) < cutoff then break end
  local fields, o, m = entry[2], nil, nil
  for i = 1, #fields, 2 do
    if fields[i] == 'o' then o = tonumber(fields[i + 1])
    elseif fields[i] == 'm' then m = fields[i + 1] end
  end
  if not o or not m or o <= oldest then break end
  found[#found + 1] = m
end
if #found > limit then out[3] = 1 end
for i = math.min(#found, limit), 1, -1 do out[#out + 1] = found[i] end
return out
"""

_DURABILITY_REFRESH: Final = 1.0
"""Seconds after which a part of Redis' durability is read again (in the background):
how long a lowered ``appendfsync`` may go unnoticed."""


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script and its SHA1, for EVALSHA (hashed once, not on every call)."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


PUBLISH: Final = Script(PUBLISH_SCRIPT)
READ: Final = Script(READ_SCRIPT)


@dataclass(frozen=True, slots=True)
class Durability:
    """What was read from one part of Redis: its identity and whether it is durable."""

    identity: str
    durable: bool
    read_at: float


class RedisHistory:
    """Publishes with history and reads history through ``transport``; shared by
    RedisBroker and Publisher. Raises what the transport raises (REDIS_ERRORS), and
    BrokerError for a reply it cannot understand."""

    def __init__(self, transport: Transport, keys: Keys, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._transport = transport
        self._keys = keys
        self._clock = clock
        self._durability: dict[str, Durability] = {}
        self._probes: dict[str, asyncio.Task[Durability]] = {}
        self._loaded: dict[str, set[str]] = {}
        """Failure domain -> SHAs loaded there since the last failure seen there."""
        self.dropped = 0
        """Stored entries that did not decode (left out of pages)."""
        self._decoded: BoundedCache[bytes, Envelope] = BoundedCache(DECODED_CACHE_BYTES)
        self.pass_run_id = True
        """Hand the publish link's run id to the script (False: the script reads it with
        INFO server; the benchmark compares the two)."""

    async def publish(
        self, envelope: Envelope, history: History, idempotency_key: str | None
    ) -> tuple[Position, bool]:
        """Store and publish ``envelope``: its position, and whether the key was seen."""
        room = envelope.target
        keys = self._keys
        meta = keys.history_meta(room)
        idem = keys.idempotency(room, idempotency_key) if idempotency_key else meta
        tail = (keys.room_channel(room), encode_head(envelope), str(history.size),
                str(history.ttl_ms), self._transport.publish_command,
                "1" if idempotency_key else "0",
                str(round(history.idempotency_ttl * 1000)))
        reply = await self._run(PUBLISH, meta, (meta, keys.history_stream(room), idem),
                                history, tail, now=True)
        try:
            epoch, offset, seen = reply
            return Position(_text(epoch), int(offset)), bool(int(seen))
        except (TypeError, ValueError) as exc:
            raise BrokerError(f"unexpected reply from the history script: {reply!r}") from exc

    async def read(
        self, room: Room, history: History, since: int | None, limit: int
    ) -> HistoryPage:
        """The room's position and up to ``limit`` messages after ``since``."""
        keys = self._keys
        meta = keys.history_meta(room)
        tail = ("-1" if since is None else str(since), str(limit), str(history.ttl_ms),
                str(history.size))
        reply = await self._run(READ, meta, (meta, keys.history_stream(room)), history,
                                tail, now=False)
        try:
            epoch, top, more, *entries = reply
            epoch, top, more = _text(epoch), int(top), bool(int(more))
        except (TypeError, ValueError) as exc:
            raise BrokerError(f"unexpected reply from the history script: {reply!r}") from exc
        envelopes: list[Envelope] = []
        decoded = self._decoded
        for data in entries:
            cached = type(data) is bytes  # anything else fails to decode (and may not hash)
            envelope = decoded.get(data) if cached else None
            if envelope is None:
                try:
                    envelope = decode(data)
                except EnvelopeError as exc:
                    # not ours (someone wrote into the key): left out, the page shows a gap
                    self.dropped += 1
                    log.warning("room %r: a history entry is not a valid envelope (%s); "
                                "left out", room, exc)
                    continue
                if cached:  # counted: the entry's bytes (the key), the payload, the objects
                    decoded.put(data, envelope, 2 * len(data) + ENTRY_OVERHEAD)
            envelopes.append(envelope)
        return HistoryPage(room, epoch, top, tuple(envelopes), since, more)

    async def _run(self, script: Script, route: str, keys: tuple[str, ...],
                   history: History, tail: tuple[str | bytes, ...], *, now: bool) -> Any:
        """Run ``script`` on ``route``'s slot: EVALSHA (SCRIPT LOAD first where it may be
        missing), EVAL after NOSCRIPT, again after STALE with durability read anew."""
        transport = self._transport
        domain = transport.failure_domain(route)
        durability = await self._durability_for(domain, route)
        may_stale = True
        use_eval = False
        for _ in range(3):
            candidate = new_epoch()
            loaded = self._loaded.setdefault(domain, set())
            preload = not use_eval and script.sha not in loaded

            def bind(run_id: str, durability: Durability = durability,
                     may_stale: bool = may_stale, use_eval: bool = use_eval,
                     preload: bool = preload, candidate: str = candidate,
                     ) -> tuple[Command, ...]:
                args = (run_id if self.pass_run_id else "",
                        "1" if durability.durable else "0", durability.identity,
                        "1" if may_stale else "0", candidate,
                        str(round(history.meta_ttl * 1000)), *tail)
                call: Command = (
                    ("EVAL", script.source, len(keys), *keys, *args) if use_eval
                    else ("EVALSHA", script.sha, len(keys), *keys, *args))
                if preload:
                    return (("SCRIPT", "LOAD", script.source), call)
                return (call,)

            try:
                replies = await (transport.execute_bound(route, bind) if now
                                 else transport.execute(route, *bind("")))
            except REDIS_ERRORS:
                loaded.clear()  # the server may have restarted: load again next time
                raise
            reply = replies[-1]
            if preload and not isinstance(replies[0], Exception):
                loaded.add(script.sha)
            if isinstance(reply, NoScriptError) or (
                    isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT")):
                loaded.clear()
                use_eval = True
                continue
            if isinstance(reply, Exception):
                raise reply
            if isinstance(reply, list) and len(reply) == 1 and _text(reply[0]) == "STALE":
                durability = await self._read_durability(domain, route)
                may_stale = False
                continue
            return reply
        raise BrokerError(f"the history script did not complete on {domain or 'Redis'} "
                          "after reloading it and reading the server's durability")

    async def _durability_for(self, domain: str, route: str) -> Durability:
        """The durability of ``domain``: read now if never read, in the background if
        older than a second."""
        known = self._durability.get(domain)
        if known is None:
            return await self._read_durability(domain, route)
        if self._clock() - known.read_at > _DURABILITY_REFRESH:
            self._probe_task(domain, route)
        return known

    async def _read_durability(self, domain: str, route: str) -> Durability:
        """Read ``domain``'s durability, sharing a read already under way."""
        return await asyncio.shield(self._probe_task(domain, route))

    def _probe_task(self, domain: str, route: str) -> asyncio.Task[Durability]:
        task = self._probes.get(domain)
        if task is None or task.done():
            task = self._probes[domain] = asyncio.create_task(
                self._probe(domain, route), name="roomcast-redis-durability")
            task.add_done_callback(_retrieve)
        return task

    async def _probe(self, domain: str, route: str) -> Durability:
        """Read ``route``'s server identity and durability (one pipelined call)."""
        replies = await self._transport.execute(
            route, ("INFO", "server"), ("INFO", "replication"),
            ("CONFIG", "GET", "appendonly"), ("CONFIG", "GET", "appendfsync"))
        server, replication, appendonly, appendfsync = replies
        if isinstance(server, Exception):
            raise server
        if isinstance(replication, Exception):
            raise replication
        identity = f"{_info(server, 'run_id')}:{_info(replication, 'master_replid')}"
        promoted = str(_info(replication, "second_repl_offset")) != "-1"
        durable = (
            not promoted
            and _config(appendonly, "appendonly") == "yes"
            and _config(appendfsync, "appendfsync") == "always"
        )
        found = Durability(identity, durable, self._clock())
        previous = self._durability.get(domain)
        if previous is None or previous.durable != durable:
            log.info("Redis %s: history positions %s", domain or "server",
                     "survive a restart (appendonly yes, appendfsync always)" if durable
                     else "get a new epoch after a restart or failover (not appendfsync "
                          "always, or CONFIG unavailable, or a promoted replica)")
        self._durability[domain] = found
        return found

    async def close(self) -> None:
        """Stop background durability reads."""
        tasks = [t for t in self._probes.values() if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)


def _retrieve(task: asyncio.Task[Durability]) -> None:
    """A durability read nobody awaited failed: logged, never left unretrieved."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("reading Redis durability failed: %s", task.exception())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _info(reply: Any, field: str) -> str:
    """One field of an INFO reply (parsed by redis-py into a dict, or raw text)."""
    if isinstance(reply, dict):
        value = reply.get(field)
        if value is None:
            raise BrokerError(f"INFO has no {field}: is this Redis 7 or later?")
        return _text(value)
    for line in _text(reply).splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return value.strip()
    raise BrokerError(f"INFO has no {field}: is this Redis 7 or later?")


def _config(reply: Any, name: str) -> str:
    """One value of a CONFIG GET reply; "" when CONFIG was refused or renamed."""
    if isinstance(reply, Exception):
        return ""
    if isinstance(reply, dict):
        for key, value in reply.items():
            if _text(key) == name:
                return _text(value)
        return ""
    if isinstance(reply, list | tuple) and len(reply) == 2:
        return _text(reply[1])
    return ""
