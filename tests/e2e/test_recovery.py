"""Nothing lost on reconnect (issue 12), end to end, under faults.

Real redis-server processes (a Redis Cluster for the failover), real ``roomcast serve``
nodes with room history on, haproxy in front where clients reconnect through a
balancer, and real ``roomcast.v1`` clients (``roomcast.node.client``) that declare their
positions. A numbered burst is published straight into Redis during each fault; every
member must end with every number exactly once, in order, or be told honestly that
messages were lost (``lost`` / ``joined`` with ``recovered: false``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import pytest
from redis.crc import key_slot

from roomcast.broker.publisher import Publisher
from roomcast.node.client import Joined, Lost, Message, Position
from tests.e2e.haproxy import HAProxy
from tests.e2e.procs import NodeProcess
from tests.e2e.recovering import (
    NODE_HISTORY_ARGS,
    POLICY,
    Burst,
    Member,
    counter,
    exactly_once,
)
from tests.loops import ONE_LOOP
from tests.redis_cluster import LocalRedisCluster
from tests.redis_server import RedisServer

pytestmark = [ONE_LOOP, pytest.mark.timeout(240)]

AOF_ALWAYS = ("--appendonly", "yes", "--appendfsync", "always")
_names = itertools.count()


def name() -> str:
    return f"m{next(_names)}"


@contextlib.contextmanager
def nodes(url: str, count: int) -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    try:
        for _ in range(count):
            started.append(NodeProcess("--redis", url, *NODE_HISTORY_ARGS).start())
        yield started
    finally:
        for node in started:
            node.kill()


@contextlib.asynccontextmanager
async def members_on(urls: list[str], room: str) -> AsyncIterator[list[Member]]:
    """One recovering member of ``room`` per URL, all closed at the end."""
    made: list[Member] = []
    try:
        for url in urls:
            made.append(await Member(url, room, name()).start())
        yield made
    finally:
        for member in made:
            await member.close()


@contextlib.asynccontextmanager
async def publisher(url: str) -> AsyncIterator[Publisher]:
    made = Publisher(url, history=POLICY)
    try:
        yield made
    finally:
        await made.close()


async def run_burst(burst: Burst) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(burst.run())


async def node_id(node: NodeProcess) -> str:
    """The id a node announces (X-Roomcast-Node), asked directly, not through haproxy."""
    async with aiohttp.ClientSession() as http, http.get(node.url + "/metrics") as resp:
        return resp.headers["X-Roomcast-Node"]


async def links_up(started: list[NodeProcess], timeout: float = 60.0) -> None:
    """Until every node's /healthz says its broker links are up (bounded)."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(timeout):
        for node in started:
            while True:
                async with http.get(node.url + "/healthz") as resp:
                    if resp.status == 200 and (await resp.json())["broker"]["connected"]:
                        break
                await asyncio.sleep(0.05)  # poll interval: health has no event to await


def told_lost(member: Member) -> Callable[[], bool]:
    return lambda: bool(member.losses)


def at_position(member: Member, room: str, position: Position) -> Callable[[], bool]:
    """The member has RECORDED an event that puts it at ``position`` in ``room`` (the
    client's own position book runs ahead of the events still queued for the test)."""
    def reached() -> bool:
        for event in reversed(member.events):
            if isinstance(event, Message | Lost | Joined) and event.room == room \
                    and event.position is not None:
                return event.position == position
        return False
    return reached


def describe(nodes_: list[NodeProcess]) -> str:
    return "\n".join(f"--- node {n.port}\n{n.log()[-3000:]}" for n in nodes_)


# -- node catch-up: the pub/sub link killed during a burst ------------------------------


async def test_pubsub_link_killed_during_a_burst_every_member_gets_every_message_once() -> None:
    """CLIENT KILL TYPE pubsub on Redis while 400 messages are published to a room with
    members on 3 nodes: every node re-subscribes and reads the gap from the history, so
    every member gets every message exactly once, in order, with no loss reported."""
    count = 400
    with RedisServer() as redis_, nodes(redis_.url, 3) as started:
        async with members_on([n.ws_url for n in started for _ in range(2)], "fire") as members, \
                publisher(redis_.url) as pub:
            burst = Burst(pub, "fire", count, tag="p")
            task = await run_burst(burst)
            async with asyncio.timeout(60):
                await burst.reached(100).wait()
            with redis_.client() as client:
                killed = client.client_kill_filter(_type="pubsub")
            assert killed >= 3, f"killed {killed} pub/sub links, expected one per node"
            async with asyncio.timeout(120):
                await task
            for member in members:
                await member.wait_for_number("p", count)
            try:
                for member in members:
                    exactly_once(member, "p", count)
            except AssertionError:
                print(describe(started))
                raise
            filled = [await counter(n.url, "roomcast_catchup_gaps_total", outcome="filled")
                      for n in started]
            lost = [await counter(n.url, "roomcast_catchup_gaps_total", outcome="lost")
                    for n in started]
            assert sum(filled) >= 1, f"no node filled a gap: nothing was tested ({filled})"
            assert sum(lost) == 0, lost


# -- Redis restarts ---------------------------------------------------------------------


async def test_redis_restarted_without_persistence_is_a_new_epoch_and_members_are_told() -> None:
    """Redis SIGKILLed and restarted empty: members still connected are told ``lost``
    (reason epoch) or, reconnecting with their old position, ``recovered: false``; the
    messages after the restart come in a new epoch; no (epoch, offset) names two
    messages."""
    with RedisServer() as redis_, nodes(redis_.url, 2) as started:
        async with members_on([n.ws_url for n in started], "reset") as members, \
                publisher(redis_.url) as pub:
            before = Burst(pub, "reset", 20, tag="a")
            await before.run()
            for member in members:
                await member.wait_for_number("a", 20)
            old = members[0].client.positions["reset"]
            redis_.kill()
            redis_.start()
            # each node, back, reads the room's history (resumed) and finds the epoch
            # changed: its members are told at once, before any new message (publishing
            # before that read: test_history_lost_while_the_link_was_down)
            await links_up(started)
            for member in members:
                await member.wait(told_lost(member), timeout=60,
                                  what=f"{member.name} told lost")
            after = Burst(pub, "reset", 20, tag="z")
            await after.run()
            assert after.positions[1].epoch != before.positions[1].epoch
            assert after.positions[1].offset == 1, "the room's history is gone: offsets restart"
            for member in members:
                await member.wait_for_number("z", 20)
                assert member.numbers("z") == list(range(1, 21))
                assert [lost.reason for lost in member.losses] == ["epoch"], member.events
                assert member.client.positions["reset"].epoch == after.positions[1].epoch
            # a client coming back with a position of the lost epoch is told so
            late = await Member(started[0].ws_url, "reset", name(),
                                positions={"reset": old}).start()
            try:
                joined = late.joins[0]
                assert joined.recovered is False and joined.reason == "epoch", joined
                assert late.numbers("a") == [] and late.numbers("z") == []
            finally:
                await late.close()
            seen: dict[tuple[str, int], str | bytes] = {}
            for member in [*members, late]:
                for message in member.messages():
                    assert message.position is not None
                    key = (message.position.epoch, message.position.offset)
                    assert seen.setdefault(key, message.data) == message.data, (
                        f"{key} names both {seen[key]!r} and {message.data!r}")


async def test_redis_restarted_with_aof_positions_continue_and_clients_recover() -> None:
    """Redis with appendonly yes + appendfsync always, SIGKILLed and restarted: the
    room keeps its epoch and offsets go on; connected members get everything exactly
    once; a member that was away across the restart comes back with its position and
    recovers exactly what it missed."""
    with RedisServer(extra_args=AOF_ALWAYS) as redis_, nodes(redis_.url, 2) as started:
        async with members_on([n.ws_url for n in started], "kept") as members, \
                publisher(redis_.url) as pub:
            away = await Member(started[1].ws_url, "kept", name()).start()
            burst = Burst(pub, "kept", 200, tag="k")
            task = await run_burst(burst)
            async with asyncio.timeout(60):
                await burst.reached(40).wait()
            await away.wait_for_number("k", 30)
            await away.close()
            saved = away.client.positions
            async with asyncio.timeout(60):
                await burst.reached(80).wait()
            redis_.kill()
            redis_.start()
            async with asyncio.timeout(120):
                await task
            assert {p.epoch for p in burst.positions.values()} == {burst.positions[1].epoch}
            offsets = [burst.positions[n].offset for n in range(1, 201)]
            assert offsets == sorted(set(offsets)), "offsets go on in one epoch"
            back = await Member(started[0].ws_url, "kept", name(),
                                positions=dict(saved)).start()
            try:
                joined = back.joins[0]
                assert joined.recovered is True, joined
                got = away.numbers("k") + back.numbers("k")
                assert got == list(range(1, 201)), (away.numbers("k")[-3:],
                                                    back.numbers("k")[:3])
                assert back.client.duplicates == 0
            finally:
                await back.close()
            for member in members:
                await member.wait_for_number("k", 200)
                exactly_once(member, "k", 200)


async def test_history_lost_while_the_link_was_down_new_epoch_messages_still_come() -> None:
    """The room's keys vanish (evicted, expired) while the nodes' pub/sub links are down
    and messages are published meanwhile, in a new epoch: once back, every member is
    told ``lost`` (reason epoch) at the start of the new epoch, then gets every message
    of it, exactly once, in order: they are all in the history.

    Deterministic: the links are killed and kept from coming back by a password set
    meanwhile (connections already made stay authenticated; the Publisher has it)."""
    room = "evicted"
    with RedisServer() as redis_, nodes(redis_.url, 2) as started:
        async with members_on([n.ws_url for n in started], room) as members:
            async with publisher(redis_.url) as pub:
                await Burst(pub, room, 10, tag="a").run()
            for member in members:
                await member.wait_for_number("a", 10)
            redis_.config_set("requirepass", "s3cret")
            with redis_.client() as client:
                assert client.client_kill_filter(_type="pubsub") >= 2
                client.delete(f"roomcast:hmeta:{{roomcast:room:{room}}}",
                              f"roomcast:hist:{{roomcast:room:{room}}}")
            url = f"redis://:s3cret@127.0.0.1:{redis_.port}/0"
            async with publisher(url) as pub:
                later = Burst(pub, room, 20, tag="z")
                await later.run()
            redis_.config_set("requirepass", "")
            new = later.positions[1]
            assert new.offset == 1, "the keys were gone: a new epoch from offset 1"
            for member in members:
                await member.wait(at_position(member, room, later.positions[20]),
                                  timeout=60, what=f"{member.name} at the new top")
                assert [(lost.reason, lost.position) for lost in member.losses] == [
                    ("epoch", Position(new.epoch, 0))], member.losses
                assert member.numbers("z") == list(range(1, 21)), member.numbers("z")
                assert member.client.duplicates == 0


async def test_redis_frozen_during_publishes_local_members_get_each_message_once() -> None:
    """Redis SIGSTOPped for 5 s (past the 2 s socket timeout) while a member sends: the
    publishes time out and are delivered on the sender's node at once; when Redis
    thaws it runs the ones it had received. No member gets a message twice."""
    with RedisServer() as redis_, nodes(redis_.url, 1) as started:
        async with members_on([started[0].ws_url] * 2, "frozen") as (sender, listener):
            async def send(n: int) -> None:
                await sender.client.send(f"f:{n}")

            for n in range(1, 6):
                await send(n)
            await listener.wait_for_number("f", 5)
            redis_.freeze()
            try:
                for n in range(6, 11):
                    await send(n)
                await listener.wait_for_number("f", 10, timeout=30)  # local delivery
            finally:
                redis_.thaw()
            await links_up(started)
            for n in range(11, 16):
                await send(n)
            for member in (sender, listener):
                await member.wait_for_number("f", 15, timeout=60)
            got = listener.numbers("f")
            assert sorted(set(got)) == list(range(1, 16))
            assert len(got) == len(set(got)), f"duplicates: {got}"


# -- a node killed behind haproxy -------------------------------------------------------


async def test_node_killed_behind_haproxy_its_clients_recover_on_other_nodes() -> None:
    """A node SIGKILLed during a 400-message burst: its members reconnect through
    haproxy to the other nodes, declare their positions, and every member of every node
    ends with every message exactly once, in order."""
    count = 400
    with RedisServer() as redis_, nodes(redis_.url, 3) as started, \
            HAProxy([f"127.0.0.1:{n.port}" for n in started], check_inter="200ms") as lb:
        lb.wait_states({f"node{i}": "UP" for i in range(1, 4)})
        async with members_on([lb.ws_url] * 9, "lb") as members, publisher(redis_.url) as pub:
            by_node: dict[str, list[Member]] = {}
            for member in members:
                assert member.client.node is not None
                by_node.setdefault(member.client.node, []).append(member)
            assert len(by_node) == 3, f"members not spread over the nodes: {by_node.keys()}"
            victim_id = members[0].client.node
            victims = by_node[victim_id]  # type: ignore[index]
            ids = [await node_id(n) for n in started]
            victim = started[ids.index(victim_id)]  # type: ignore[arg-type]
            burst = Burst(pub, "lb", count, tag="h")
            task = await run_burst(burst)
            async with asyncio.timeout(60):
                await burst.reached(100).wait()
            victim.kill()
            async with asyncio.timeout(120):
                await task
            for member in members:
                await member.wait_for_number("h", count, timeout=90)
            for member in victims:
                assert member.client.node != victim_id
                assert len(member.opens) >= 2
                assert any(j.recovered is True for j in member.joins), member.joins
            for member in members:
                exactly_once(member, "h", count)


# -- a Redis Cluster master failover ----------------------------------------------------


async def test_cluster_master_failover_during_a_burst() -> None:
    """A 3-master cluster with replicas; the master of the room's slot is SIGKILLed
    during a burst and its replica promoted. A promoted replica may lack the writes the
    master acknowledged last, so the room gets a new epoch: every member gets every
    message published before the failover's gap exactly once and in order up to it, is
    told ``lost`` (reason epoch) once, then gets every later message exactly once, in
    order; no member gets a message twice."""
    count = 300
    room = "fail"
    with LocalRedisCluster(masters=3, replicas=1) as local, nodes(local.url, 2) as started:
        async with members_on([n.ws_url for n in started for _ in range(2)], room) as members, \
                publisher(local.url) as pub:
            channel = f"roomcast:room:{room}"  # the room's keys hash as its channel
            slot = key_slot(channel.encode())
            victim = local.master_of(channel)
            burst = Burst(pub, room, count, tag="c")
            task = await run_burst(burst)
            async with asyncio.timeout(60):
                await burst.reached(100).wait()
            local.server(victim).kill()
            await asyncio.to_thread(local.wait_for_new_master, slot, victim)
            async with asyncio.timeout(120):
                await task
            epochs = [burst.positions[n].epoch for n in range(1, count + 1)]
            first_new = next((n for n in range(1, count + 1)
                              if burst.positions[n].epoch != epochs[0]), None)
            last = burst.positions[count]
            for member in members:
                # at the last position: by the last message, or by a lost frame past it
                await member.wait(at_position(member, room, last), timeout=90,
                                  what=f"{member.name} at {last}")
                got = member.numbers("c")
                assert member.client.duplicates == 0
                assert len(got) == len(set(got)), f"{member.name} got a message twice"
                assert got == sorted(got), f"{member.name}: out of order"
                if first_new is None:  # the replica had every write: nothing to tell
                    exactly_once(member, "c", count)
                    continue
                # told once: a `lost` frame, or `joined` recovered false after a reconnect
                told = [lost.reason for lost in member.losses] + [
                    j.reason for j in member.joins if j.recovered is False]
                assert told == ["epoch"], (
                    f"{member.name} on {member.client.node}: losses {member.losses}, joins "
                    f"{member.joins}, opens {member.opens}, new epoch from c:{first_new} "
                    f"{burst.positions[first_new]}, old epoch's last "
                    f"{burst.positions[first_new - 1]}")
                # everything published in the new epoch arrives exactly once
                missing = sorted(set(range(first_new, count + 1)) - set(got))
                assert not missing, (
                    f"{member.name} on {member.client.node}: new epoch from "
                    f"c:{first_new} {burst.positions[first_new]} (last of the old: "
                    f"{burst.positions[first_new - 1]}), missing {missing[:5]}..{missing[-3:]}"
                    f" ({len(missing)}), lost {member.losses}, got around: "
                    f"{[n for n in got if first_new - 5 < n < first_new + 60]}")

