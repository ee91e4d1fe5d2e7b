"""History on Redis beyond the contract: key names and slots, the commands on the wire,
the durability read, and the Publisher's history, on a redis-server and a Redis Cluster."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from roomcast.broker._history import PUBLISH, READ, _config, _info
from roomcast.broker._keys import Keys
from roomcast.shared.envelope import Kind, decode
from roomcast.shared.errors import PublishError
from roomcast.shared.history import History, HistoryPolicy, Position
from roomcast.shared.ids import Room
from tests.broker.helpers import Backend, envelope
from tests.redis_server import RedisServer

H = History(size=100, ttl=60)
_rooms = itertools.count()


def fresh_room() -> Room:
    return Room(f"hr{next(_rooms)}")


# -- names (no Redis) ------------------------------------------------------------------


def test_history_keys_of_a_plain_room_use_its_channel_as_hash_tag() -> None:
    """A room without braces keeps its channel; its keys hash-tag the channel's name."""
    for cluster in (False, True):
        keys = Keys("app1", cluster=cluster)
        assert keys.room_channel("lobby") == "app1:room:lobby"
        assert keys.history_meta("lobby") == "app1:hmeta:{app1:room:lobby}"
        assert keys.history_stream("lobby") == "app1:hist:{app1:room:lobby}"
        assert keys.idempotency("lobby", "k-1") == "app1:idem:{app1:room:lobby}:k-1"


def test_rooms_with_braces_get_a_digest_tag_and_channel_on_a_cluster() -> None:
    """A room with braces: keys tagged by a digest; on a cluster its channel carries the
    same tag, on one server the channel is unchanged."""
    tag = Keys("p").history_tag("a{b}c")
    assert tag.startswith("~") and len(tag) == 33 and "{" not in tag and "}" not in tag
    assert Keys("p").room_channel("a{b}c") == "p:room:a{b}c"
    assert Keys("p", cluster=True).room_channel("a{b}c") == f"p:room:{{{tag}}}"
    assert Keys("p").history_tag("a{b}d") != tag


@given(st.text(min_size=1, max_size=60).filter(lambda r: all(ord(c) >= 0x20 for c in r)),
       st.from_regex(r"[\x21-\x7e]{1,20}", fullmatch=True))
def test_a_rooms_channel_and_keys_share_one_slot(room: str, key: str) -> None:
    """For any room name, its cluster channel, meta, stream and idempotency keys hash to
    one slot (so one script can touch them all and publish)."""
    keys = Keys("rc", cluster=True)
    names = [keys.room_channel(room), keys.history_meta(room), keys.history_stream(room),
             keys.idempotency(room, key)]
    assert len({key_slot(n.encode()) for n in names}) == 1


def test_history_keys_of_two_rooms_never_meet() -> None:
    """Distinct rooms (with and without braces, with colons) get distinct keys."""
    rooms = ["a", "a:b", "a}", "a{", "{a}", "p:room:a", "~x", "a:hmeta"]
    keys = Keys("p")
    assert len({keys.history_meta(r) for r in rooms}) == len(rooms)
    assert len({keys.idempotency(r, "k") for r in rooms}) == len(rooms)


def test_info_and_config_replies_are_read_in_either_form() -> None:
    """Parsed (dict) and raw INFO replies give the field; CONFIG refused reads as ""."""
    assert _info({"run_id": "abc"}, "run_id") == "abc"
    assert _info(b"# Server\r\nrun_id:abc\r\n", "run_id") == "abc"
    assert _config({"appendfsync": "always"}, "appendfsync") == "always"
    assert _config([b"appendfsync", b"always"], "appendfsync") == "always"
    assert _config(Exception("unknown command 'CONFIG'"), "appendfsync") == ""


# -- on the wire -----------------------------------------------------------------------


async def test_history_publish_is_one_evalsha_and_plain_publish_unchanged(
    redis_server: RedisServer,
) -> None:
    """After the first call (SCRIPT LOAD), each history publish is one EVALSHA (its
    PUBLISH inside), and a room without history is still one bare PUBLISH; the stored
    entry is the very envelope the subscribers got."""
    backend = Backend("redis", [redis_server])
    try:
        a = await backend.node("a")
        room = fresh_room()
        await a.broker.publish(envelope(Kind.ROOM, room, b"warm"), history=H)
        with redis_server.client() as client:
            client.config_resetstat()
        for i in range(5):
            await a.broker.publish(envelope(Kind.ROOM, room, b"%d" % i), history=H)
        await a.broker.publish(envelope(Kind.ROOM, "plain", b"p"))
        with redis_server.client() as client:
            stats = client.info("commandstats")
            stored = client.xrevrange(backend.keys.history_stream(room), count=1)
            assert client.script_exists(PUBLISH.sha, READ.sha) == [True, False]
        assert stats["cmdstat_evalsha"]["calls"] == 5
        assert "cmdstat_eval" not in stats and "cmdstat_script|load" not in stats
        assert stats["cmdstat_publish"]["calls"] == 6  # five inside the script, one bare
        entry = stored[0][1]
        assert decode(entry[b"m"]).offset == int(entry[b"o"]) == 6
    finally:
        await backend.close()


async def test_history_reads_decode_each_entry_once_and_leave_garbage_out(
    redis_server: RedisServer,
) -> None:
    """Two reads of the same messages give the very same envelopes (decoded once, as a
    reconnect storm's many reads of one page are); an entry that is not an envelope
    (written into the stream by someone else) is left out of every read and counted
    each time, so the page shows the gap."""
    backend = Backend("redis", [redis_server])
    try:
        a = await backend.node("a")
        room = fresh_room()
        for i in range(3):
            await a.broker.publish(envelope(Kind.ROOM, room, b"%d" % i), history=H)
        with redis_server.client() as client:  # an entry of the next offset's number
            client.xadd(backend.keys.history_stream(room), {"o": 4, "m": b"\xc1garbage"})
        await a.broker.publish(envelope(Kind.ROOM, room, b"after"), history=H)
        first = await a.broker.read_history(room, H, since=0)
        second = await a.broker.read_history(room, H, since=0)
        # the foreign entry took the place of one of the four it counted back: a gap
        assert [e.payload for e in first.envelopes] == [b"1", b"2", b"after"]
        assert [e.offset for e in first.envelopes] == [2, 3, 4]
        assert first.gap(Position(first.epoch, 0)) is not None
        assert all(x is y for x, y in zip(first.envelopes, second.envelopes, strict=True))
        assert a.broker._history.dropped == 2  # once per read (and logged)
    finally:
        await backend.close()


async def test_publish_link_knows_its_servers_run_id(redis_server: RedisServer) -> None:
    """The single server's publish link reads the run id of the server it reached, so
    the script need not (INFO server costs about 5 µs of Redis CPU per call)."""
    backend = Backend("redis", [redis_server])
    try:
        a = await backend.node("a")
        with redis_server.client() as client:
            run_id = client.info("server")["run_id"]
        assert a.broker._transport._publish_link.run_id == run_id  # type: ignore[attr-defined]
    finally:
        await backend.close()


@pytest.mark.parametrize(
    ("args", "durable"),
    [((), False), (("--appendonly", "yes", "--appendfsync", "everysec"), False),
     (("--appendonly", "yes", "--appendfsync", "always"), True)],
)
async def test_durability_is_read_from_the_server(args: tuple[str, ...], durable: bool) -> None:
    """Only appendonly yes + appendfsync always on a never-promoted server reads as
    durable; the identity read is run_id:master_replid."""
    with RedisServer(extra_args=args) as server:
        backend = Backend("redis", [server])
        try:
            a = await backend.node("a")
            await a.broker.publish(envelope(Kind.ROOM, "r", b"x"), history=H)
            (found,) = a.broker._history._durability.values()
            assert found.durable is durable
            with server.client() as client:
                run_id = client.info("server")["run_id"]
                replid = client.info("replication")["master_replid"]
                meta = client.hgetall(backend.keys.history_meta("r"))
            assert found.identity == f"{run_id}:{replid}"
            assert meta[b"r"].decode() == found.identity
            assert meta[b"d"] == (b"1" if durable else b"0")
        finally:
            await backend.close()


async def test_lowered_durability_is_noticed(redis_server: RedisServer) -> None:
    """appendfsync lowered at run time: the broker reads it again (every second while it
    publishes) and the room's meta says not durable, so a crash then is a new epoch."""
    redis_server.config_set("appendonly", "yes")
    redis_server.config_set("appendfsync", "always")
    backend = Backend("redis", [redis_server])
    try:
        a = await backend.node("a")
        await a.broker.publish(envelope(Kind.ROOM, "r", b"x"), history=H)
        history = a.broker._history
        (domain,) = history._durability
        assert history._durability[domain].durable
        redis_server.config_set("appendfsync", "everysec")
        await history._probe(domain, backend.keys.history_meta("r"))
        await a.broker.publish(envelope(Kind.ROOM, "r", b"y"), history=H)
        with redis_server.client() as client:
            assert client.hget(backend.keys.history_meta("r"), "d") == b"0"
    finally:
        await backend.close()


# -- the Publisher ---------------------------------------------------------------------


async def test_publisher_publishes_with_the_nodes_history(backend: Backend) -> None:
    """A Publisher with the nodes' policy stores messages of history rooms and returns
    their positions (shared with the nodes' own publishes), retries with a key return
    the first position, and rooms without history work as before."""
    room = fresh_room()
    policy = HistoryPolicy(None, {f"{room}*": H})
    a, b = await backend.node("a"), await backend.node("b")
    await b.broker.subscribe(room)
    async with backend.publisher(history=policy) as pub:
        first = await pub.publish_to_room(room, "one", idempotency_key="job-1")
        again = await pub.publish_to_room(room, "one", idempotency_key="job-1")
        assert first is not None and again == first
        node = await a.broker.publish(envelope(Kind.ROOM, room, b"two"), history=H)
        assert node == Position(first.epoch, 2)
        assert await pub.publish_to_room(room, b"\x00three") == Position(first.epoch, 3)
        assert pub.published == 2
        assert await pub.publish_to_room("elsewhere", "plain") is None
        with pytest.raises(ValueError, match="needs a room with history"):
            await pub.publish_to_room("elsewhere", "plain", idempotency_key="k")
        with pytest.raises(ValueError, match="visible ASCII"):
            await pub.publish_to_room(room, "x", idempotency_key="")
        page = await pub.room_history(room, since=1)
        assert [e.payload for e in page.envelopes] == [b"two", b"\x00three"]
        assert page.envelopes[1].binary
        with pytest.raises(ValueError, match="no history"):
            await pub.room_history("elsewhere")
    await b.inbox.wait_until(lambda: len(b.inbox.envelopes) == 3)
    assert [e.offset for e in b.inbox.envelopes] == [1, 2, 3]


async def test_publisher_history_failure_is_a_publish_error(own_backend: Backend) -> None:
    """With Redis gone, a history publish raises PublishError and is counted."""
    room = fresh_room()
    async with own_backend.publisher(history=HistoryPolicy(H), socket_timeout=2.0) as pub:
        await pub.publish_to_room(room, "x")
        own_backend.kill()
        with pytest.raises(PublishError):
            await pub.publish_to_room(room, "y")
        assert pub.publish_failures == 1
