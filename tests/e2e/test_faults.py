"""Failure behaviour of a real cluster under steady traffic: Redis killed or frozen,
a node killed, a client that vanishes, a slow consumer, Redis' own pub/sub buffer limit.

Real redis-server on a free port, real node processes (``InstrumentedNode``: the normal
``roomcast serve`` plus a debug route that reports the node's asyncio tasks and fds),
haproxy where clients must find another node. Every message is numbered and carries a
digest (``tests.e2e.soakkit``), so receivers can tell losses, duplicates, reordering and
damage apart. Measured times are printed (``pytest -s``) as ``MEASURED ...`` lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.e2e.soakkit import (
    API_KEY,
    ApiStream,
    Cluster,
    Ledger,
    Member,
    debug,
    order_problems,
    scrape,
    steady,
    until,
)
from tests.loops import BOTH_LOOPS, ONE_LOOP

# Redis faults are the subject of most tests here; those of the socket path run on both.
pytestmark = ONE_LOOP

TTL_MS = 1500
HEARTBEAT_MS = 300
PRESENCE_ARGS = ["--presence-ttl-ms", str(TTL_MS), "--heartbeat-ms", str(HEARTBEAT_MS)]
RECOVERY_BOUND = 10.0
"""Seconds from Redis answering again until cross-node delivery has resumed everywhere
(the README: reconnect backoff capped at 5 s, frozen Redis detected within ~3 s)."""
SEND_PERIOD = 0.05
"""Each chat sender sends 20 messages a second; the API stream 10."""
API_PERIOD = 0.1
GRACE = 2.0
"""A message acknowledged this long before a member left must have reached it."""


def measured(what: str, value: float, unit: str = "s") -> None:
    print(f"MEASURED {what}: {value:.3f} {unit}")


@contextlib.asynccontextmanager
async def members(*joins: tuple[str, str, str]) -> AsyncIterator[list[Member]]:
    """Join (ws base url, room, name) members in order; close them all on exit."""
    joined: list[Member] = []
    try:
        for base, room, name in joins:
            joined.append(await Member.join(base, room, name))
        yield joined
    finally:
        for member in joined:
            await member.close()


def resume_time(listener: Member, stream: str, after: float) -> float:
    """When ``listener`` got its first message of ``stream`` made after ``after``."""
    times = [r.at for r in listener.received if r.stream == stream and r.at > after
             and r.latency < r.at - after]
    return min(times) if times else math.inf


def probe_session() -> aiohttp.ClientSession:
    """A session for /metrics and /_soak/debug that leaves no idle keep-alive connection
    (and so no idle request handler task) on the node."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def redis_outage(fault: str, outage_seconds: float) -> None:
    """Three nodes, a sender and a listener on each, an HTTP API stream into node 0, all
    in room r at a steady rate; Redis is killed (``fault="kill"``, then restarted on the
    same port) or frozen (``"freeze"``, SIGSTOP then SIGCONT) for ``outage_seconds``."""
    with Cluster(3, PRESENCE_ARGS) as cluster:
        ids = await cluster.identify()
        nodes = cluster.nodes
        joins = [(n.ws_url, "r", f"s{i}") for i, n in enumerate(nodes)]
        joins += [(n.ws_url, "r", f"l{i}") for i, n in enumerate(nodes)]
        async with members(*joins) as joined, probe_session() as probe:
            senders, listeners = joined[:3], joined[3:]
            assert [m.node for m in senders] == ids == [m.node for m in listeners]
            http = aiohttp.ClientSession()
            api = ApiStream("api", nodes[0].url, ids[0], http)
            streams = [s.name for s in senders] + [api.name]
            # One round of every kind of traffic first, so that whatever a node sets up
            # lazily (connections, their tasks) exists before the idle baseline.
            for sender in senders:
                await sender.send_mixed()
            async with aiohttp.ClientSession() as once:
                primer = ApiStream("prime", nodes[0].url, ids[0], once)
                assert await primer.to_room("r") == 202
            first = [s.name for s in senders] + [primer.name]
            for listener in listeners:
                await listener.wait_for(lambda li=listener: all(
                    li.count_from(s) >= 1 for s in first), 10, "the first round")
            idle_before = [await debug(n.url, probe) for n in nodes]
            # the pairs that cross nodes: (listener, stream of another node)
            remote = [(li, s) for li in listeners for s in streams
                      if s != f"s{li.name[1:]}" and not (s == "api" and li.node == ids[0])]

            stop = asyncio.Event()
            traffic = [asyncio.create_task(steady(SEND_PERIOD, stop, s.send_mixed))
                       for s in senders]
            traffic.append(asyncio.create_task(
                steady(API_PERIOD, stop, lambda: api.mixed_to_room("r"))))
            try:
                # warm up: every listener hears every stream, for long enough that the
                # allocator has settled before the RSS baseline is taken
                for listener in listeners:
                    await listener.wait_for(
                        lambda li=listener: all(li.count_from(s) >= 40 for s in streams),
                        20, "warm-up traffic")
                before = [await scrape(n.url, probe) for n in nodes]

                fault_at = time.monotonic()
                if fault == "kill":
                    cluster.redis.kill()
                else:
                    cluster.redis.freeze()
                # The outage itself: its length is what is being tested.
                await asyncio.sleep(outage_seconds)
                reported_in_outage = [len(s.failed) for s in senders]
                api_503_in_outage = api.statuses[503]
                if fault == "kill":
                    cluster.redis.start()  # same port
                else:
                    cluster.redis.thaw()
                up_at = time.monotonic()

                async def resumed() -> bool:
                    return all(resume_time(li, s, up_at) < math.inf for li, s in remote)

                await until(resumed, 20, "cross-node delivery resumed for every pair")
                recovered_at = max(resume_time(li, s, up_at) for li, s in remote)
                # a little more steady traffic after recovery, then stop
                for listener in listeners:
                    mark = {s: listener.count_from(s) for s in streams}
                    await listener.wait_for(
                        lambda li=listener, m=mark: all(li.count_from(s) >= m[s] + 10
                                                        for s in streams),
                        20, "traffic after recovery")
            finally:
                stop.set()
                await asyncio.gather(*traffic, return_exceptions=True)
                await http.close()

            # drain: every sender's own copy of its last message (so every outcome is
            # known), and every listener has the last message of every stream
            for sender in senders:
                last = max(sender.sent)
                await sender.wait_for(lambda s=sender, n=last: n in s.acked, 10,
                                      "own copy of the last message")
            last_of = {s.name: max(s.sent) for s in senders}
            last_of[api.name] = api.seq
            for listener in listeners:
                await listener.wait_for(
                    lambda li=listener: all(last_of[s] in li.streams().get(s, ())
                                            for s in streams), 10, "the last messages")

            # -- no node crashed, no client was cut off ------------------------------
            assert all(n.alive for n in nodes), cluster.logs()
            assert all(m.open for m in joined), [(m.name, m.close_code) for m in joined]

            # -- the outage was reported to the callers, and counted ------------------
            assert all(count > 0 for count in reported_in_outage), reported_in_outage
            assert api_503_in_outage > 0, api.statuses
            assert set(api.statuses) <= {202, 503}, api.statuses
            if fault == "kill":
                # Every publish attempted while Redis was dead failed, and was reported.
                margin = 0.3
                for sender in senders:
                    inside = [q for q, at in sender.sent.items()
                              if fault_at + margin < at < up_at - margin]
                    assert inside and set(inside) <= sender.failed, (
                        sender.name, inside, sorted(sender.failed))
                inside_api = [s for s in api.sent if fault_at + margin < s.sent_at
                              and s.acked_at is not None and s.acked_at < up_at - margin]
                assert inside_api and all(s.status == "failed" for s in inside_api)
            after = [await scrape(n.url, probe) for n in nodes]
            told = [len(s.failed) for s in senders]
            told[0] += sum(1 for s in api.sent if s.status == "failed")
            for b, a, t in zip(before, after, told, strict=True):
                counted = (a["roomcast_broker_publish_failures_total"]
                           - b["roomcast_broker_publish_failures_total"])
                assert counted >= t, (counted, t)

            # -- local delivery never stopped: members on the sender's node got all ---
            for sender, listener in zip(senders, listeners, strict=True):
                assert listener.streams()[sender.name] == sorted(sender.sent), (
                    f"{listener.name} missed messages of {sender.name} (same node)")
                arrivals = [r.at for r in listener.received if r.stream == sender.name]
                gaps = [b - a for a, b in itertools.pairwise(arrivals)
                        if a >= fault_at - 1]
                measured(f"{fault}: longest gap in local delivery {sender.name}->"
                         f"{listener.name}", max(gaps))
                assert any(fault_at < at < up_at for at in arrivals)
            assert listeners[0].streams()[api.name] == list(range(1, api.seq + 1)), (
                "a member on the API's node missed messages, 503 or not")

            # -- cross-node delivery resumed in time ---------------------------------
            measured(f"{fault}: cross-node delivery resumed after Redis answered",
                     recovered_at - up_at)
            measured(f"{fault}: from fault to cross-node delivery resumed",
                     recovered_at - fault_at)
            assert recovered_at - up_at <= RECOVERY_BOUND

            # -- every message accounted for: nothing twice, nothing half ---------------
            ledger = Ledger()
            for member in joined:
                ledger.add_member(member)
            for sent in api.sent + primer.sent:
                ledger.add_sent(sent)
            ledger.add_fault(fault_at, recovered_at)
            report = ledger.evaluate(GRACE)
            print(f"MEASURED {fault}: ledger {dict(report.by_status)} expected="
                  f"{report.expected} delivered={report.delivered} "
                  f"reported={report.reported_undeliverable} "
                  f"lost_in_fault_window={report.fault_window_losses}")
            assert report.problems == [], report.problems
            assert report.expected > 1000 and report.reported_undeliverable > 0
            if fault == "kill":
                # Silent losses (at most once) only between Redis answering again and
                # the receiving node re-subscribing.
                early = [s for s in report.fault_window_lost if s.sent_at < up_at - 0.1]
                assert not early, [(s.stream, s.seq, s.sent_at - fault_at) for s in early]
                # A publish reported as failed never reaches another node.
                failed = {k for k, s in ledger.sent.items() if s.status == "failed"}
                for listener in listeners:
                    for stream, seqs in listener.streams().items():
                        if ledger.sent[(stream, seqs[0])].origin != listener.node:
                            late = [q for q in seqs if (stream, q) in failed]
                            assert not late, f"{listener.name} got failed {stream} {late}"

            # -- the nodes restored their links, and leaked nothing ---------------------
            for node, samples in zip(nodes, after, strict=True):
                assert samples["roomcast_broker_reconnects_total"] >= 1
                assert samples["roomcast_broker_connected"] == 1
                assert "lost the pub/sub link" in node.log()
            for node, idle in zip(nodes, idle_before, strict=True):
                async def settled(url: str = node.url, tasks: int = idle["tasks"]) -> bool:
                    return (await debug(url, probe))["tasks"] <= tasks

                try:
                    await until(settled, 10, "task count back to its idle value")
                except AssertionError:
                    raise AssertionError(
                        f"tasks before {idle}, after {await debug(node.url, probe)}"
                    ) from None
                now = await debug(node.url, probe)
                assert now["fds"] <= idle["fds"] + 1, (idle, now)
            rss_after = [(await scrape(n.url, probe))["process_resident_memory_bytes"]
                         for n in nodes]
            growth = max(a - b["process_resident_memory_bytes"]
                         for a, b in zip(rss_after, before, strict=True))
            measured(f"{fault}: largest RSS growth of a node across the outage",
                     growth / 2**20, "MiB")
            assert growth < 16 * 2**20, (before, rss_after)


@pytest.mark.timeout(90)
async def test_redis_killed_and_restarted_under_traffic() -> None:
    """Redis SIGKILLed for 2 s during steady traffic on three nodes, then restarted on
    its port: no node crashes and no client is cut off; members on the publishing node
    get every message throughout; every publish made while Redis was dead is reported
    to its caller (chat error notice, HTTP 503) and counted, and never shows up on
    another node; cross-node delivery resumes within RECOVERY_BOUND of Redis answering;
    every receiver sees each sender's messages in order, once, intact; messages outside
    the outage reach everyone; tasks, fds and RSS are back to where they were."""
    await redis_outage("kill", 2.0)


@pytest.mark.timeout(90)
async def test_redis_frozen_longer_than_the_timeouts() -> None:
    """Redis SIGSTOPped for 5 s (longer than the 2 s socket timeout and the ~3 s
    health check), then SIGCONTed: the same expectations as a kill."""
    await redis_outage("freeze", 5.0)


class LocalDeliveryStalled(AssertionError):
    """Members on the sending node stopped getting a sender's messages."""


SOCKET_TIMEOUT = 2.0
"""broker._transport.DEFAULT_SOCKET_TIMEOUT: what one Redis call may wait."""
STALL_BOUND = 2 * SOCKET_TIMEOUT + 0.5
"""A publish to a frozen Redis fails within two socket timeouts (connect + reply)."""


@pytest.mark.timeout(60)
async def test_redis_frozen_local_delivery_keeps_its_pace() -> None:
    """Redis frozen for 8 s: after the first publish has timed out (at most two socket
    timeouts), members on the sender's node get its messages at the sending rate again,
    each reported to the sender as not delivered to other nodes."""
    freeze_seconds = 8.0
    with Cluster(2, PRESENCE_ARGS) as cluster:
        nodes = cluster.nodes
        async with members((nodes[0].ws_url, "r", "s"), (nodes[0].ws_url, "r", "local"),
                           (nodes[1].ws_url, "r", "remote")) as (sender, local, remote):
            stop = asyncio.Event()
            traffic = asyncio.create_task(steady(SEND_PERIOD, stop, sender.send_mixed))
            try:
                await remote.wait_for(lambda: remote.count_from("s") >= 20, 10, "warm-up")
                fault_at = time.monotonic()
                cluster.redis.freeze()
                await asyncio.sleep(freeze_seconds)  # the freeze being tested
                cluster.redis.thaw()
                up_at = time.monotonic()
                await remote.wait_for(
                    lambda: any(r.at > up_at and r.stream == "s" for r in remote.received),
                    RECOVERY_BOUND, "cross-node delivery after the thaw")
            finally:
                stop.set()
                await asyncio.gather(traffic, return_exceptions=True)
            await sender.wait_for(lambda: max(sender.sent) in sender.acked, 10, "last ack")
            await local.wait_for(lambda: max(sender.sent) in local.streams()["s"], 10,
                                 "the last message on the sender's node")
            arrivals = [r.at for r in local.received if r.stream == "s"]
            window = (fault_at + STALL_BOUND, up_at)
            sent = sum(1 for at in sender.sent.values() if window[0] <= at <= window[1])
            got = sum(1 for at in arrivals if window[0] <= at <= window[1])
            gaps = [b - a for a, b in itertools.pairwise(arrivals)]
            measured("freeze: local messages delivered in the last part of the freeze",
                     got / max(sent, 1) * 100, "% of those sent")
            measured("freeze: longest gap in local delivery", max(gaps))
            assert all(n.alive for n in nodes)
            assert local.streams()["s"] == sorted(sender.sent)  # all of them, eventually
            if got < sent / 2 or max(gaps) > STALL_BOUND:
                raise LocalDeliveryStalled(
                    f"{got} of {sent} messages sent in the last {window[1] - window[0]:.1f}"
                    f" s of the freeze reached a member on the same node in that time; "
                    f"longest gap {max(gaps):.1f} s")
            assert sender.failed, "the sender was told nothing"


# -- a node killed ---------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_node_killed_behind_haproxy() -> None:
    """SIGKILL one of three nodes behind haproxy while members on all three chat at a
    steady rate: its members vanish from the room (cluster-wide presence) within the
    presence TTL + one heartbeat; its clients reconnect through haproxy to live nodes
    and rejoin the room; nobody else notices: every other connection stays open and
    every message between survivors arrives, in order, without a gap."""
    with Cluster(3, PRESENCE_ARGS, haproxy=True, check_inter="200ms") as cluster:
        ids = await cluster.identify()
        assert cluster.haproxy is not None
        lb = cluster.haproxy.ws_url
        async with members(*[(lb, "r", f"m{i}") for i in range(6)]) as joined, \
                probe_session() as probe:
            by_node = {i: [m for m in joined if m.node == i] for i in ids}
            assert all(len(ms) == 2 for ms in by_node.values()), by_node
            victim_index = 1
            victim = cluster.nodes[victim_index]
            doomed = by_node[ids[victim_index]]
            survivors = [m for m in joined if m.node != ids[victim_index]]
            api_url = cluster.nodes[0].url

            async def room_members() -> set[str]:
                async with probe.get(api_url + "/api/rooms/r", headers={
                        "Authorization": f"Bearer {API_KEY}"}) as resp:
                    assert resp.status == 200
                    return set((await resp.json())["members"])

            assert await room_members() == {m.conn_id for m in joined}
            stop = asyncio.Event()
            traffic = [asyncio.create_task(steady(SEND_PERIOD, stop, m.send_mixed))
                       for m in joined]
            rejoined: list[Member] = []
            try:
                for m in survivors:
                    await m.wait_for(lambda m=m: all(m.count_from(o.name) >= 10
                                                     for o in joined), 20, "warm-up")
                assert victim.proc is not None
                victim.proc.kill()
                victim.proc.wait(5)
                killed_at = time.monotonic()
                for m in doomed:  # their sockets end (no close frame: the node is gone)
                    await m.wait_for(lambda m=m: not m.open, 10, "socket closed")
                measured("node kill: its clients saw their sockets close after",
                         max(m.closed_at for m in doomed) - killed_at)

                expected_after = {m.conn_id for m in survivors}

                async def presence_gone() -> bool:
                    return await room_members() == expected_after

                gone = await until(presence_gone, (TTL_MS + HEARTBEAT_MS) / 1000 + 3,
                                   "the killed node's members gone from the room")
                measured("node kill: its members gone from room presence after", gone)
                assert gone <= (TTL_MS + HEARTBEAT_MS) / 1000 + 0.5

                # reconnect through haproxy, as a browser would, at once
                for m in doomed:
                    again = await Member.join(lb, "r", m.name + "b")
                    rejoined.append(again)
                    traffic.append(asyncio.create_task(
                        steady(SEND_PERIOD, stop, again.send_mixed)))
                assert all(m.node in ids and m.node != ids[victim_index] for m in rejoined)
                everyone = survivors + rejoined
                assert await room_members() == {m.conn_id for m in everyone}
                for m in everyone:
                    await m.wait_for(lambda m=m: all(m.count_from(o.name) >= 10
                                                     for o in rejoined), 20,
                                     "messages of the reconnected clients")
            finally:
                stop.set()
                await asyncio.gather(*traffic, return_exceptions=True)
            try:
                for m in survivors + rejoined:
                    await m.wait_for(lambda m=m: max(m.sent) in m.acked, 10, "last ack")
                last = {m.name: max(m.sent) for m in survivors + rejoined}
                for m in survivors + rejoined:
                    await m.wait_for(lambda m=m: all(
                        last[n] in m.streams().get(n, ()) for n in last), 10, "last messages")

                # nobody else noticed: open, and no gap in any survivor's stream
                assert all(m.open for m in survivors + rejoined)
                for m in survivors:
                    got = m.streams()
                    for other in survivors:
                        assert got[other.name] == list(range(1, max(other.sent) + 1)), (
                            f"{m.name} has a gap in {other.name}'s messages")
                    arrivals = [r.at for r in m.received if r.at > killed_at - 1]
                    worst = max(b - a for a, b in itertools.pairwise(arrivals))
                    assert worst < 1.0, f"{m.name}: {worst:.2f} s without any message"
                for m in rejoined:
                    for other in survivors + rejoined:
                        seqs = m.streams()[other.name]
                        assert seqs == list(range(seqs[0], max(other.sent) + 1))
                # the doomed clients got what they got in order, once, intact
                for m in joined + rejoined:
                    assert not m.corrupt
                    for seqs in m.streams().values():
                        assert order_problems(seqs) == (0, 0)
                for i, node in enumerate(cluster.nodes):
                    assert node.alive == (i != victim_index)
                assert "removed the presence of dead nodes" in "".join(
                    n.log() for n in cluster.nodes)
            finally:
                for m in rejoined:
                    await m.close()


# -- a client that vanishes without a close ----------------------------------------------

PING_MS = 500
PONG_TIMEOUT_MS = 1000
KEEPALIVE_ARGS = ["--ping-interval-ms", str(PING_MS), "--pong-timeout-ms",
                  str(PONG_TIMEOUT_MS), "--log-level", "DEBUG"]
KEEPALIVE_BOUND = (PING_MS + PONG_TIMEOUT_MS) / 1000 + 0.5
"""From the client's last answer: the next ping (within the interval), the pong timeout,
then one keepalive tick (a quarter of the shorter of the two) and slack."""

# A real client library (websockets, which answers pings) in a process of its own: it
# prints its connection id, then reads until the end. SIGSTOP freezes it whole.
_FROZEN_CLIENT = """
import asyncio, sys, websockets
async def main():
    async with websockets.connect(sys.argv[1]) as ws:
        print(ws.response.headers["X-Roomcast-Connection"], flush=True)
        async for _ in ws:
            pass
asyncio.run(main())
"""


async def api_room(session: aiohttp.ClientSession, base_url: str, room: str) -> set[str]:
    """The room's members across the cluster, from GET /api/rooms/{room}."""
    async with session.get(f"{base_url}/api/rooms/{room}",
                           headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
        assert resp.status == 200, await resp.text()
        return set((await resp.json())["members"])


@contextlib.asynccontextmanager
async def vanishing_client(how: str, ws_url: str) -> AsyncIterator[tuple[str, float, Any]]:
    """A chat member that stops answering: (its connection id, when it went silent, the
    raw client or None). ``raw``: a hand-made socket that never reads and never pongs;
    ``sigstop``: a websockets client process, frozen with SIGSTOP once joined."""
    import signal
    import sys

    from tests.rawws import RawClient

    host, port = ws_url.removeprefix("ws://").split(":")
    if how == "raw":
        raw = await RawClient.connect(host, int(port), "/chat?room=r&name=ghost")
        try:
            assert raw.status == 101
            yield raw.headers["x-roomcast-connection"], time.monotonic(), raw
        finally:
            await raw.close()
        return
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _FROZEN_CLIENT, f"{ws_url}/chat?room=r&name=ghost",
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        conn_id = line.decode().strip()
        assert conn_id, "the client process printed no connection id"
        proc.send_signal(signal.SIGSTOP)
        yield conn_id, time.monotonic(), None
    finally:
        if proc.returncode is None:
            proc.kill()  # by PID; SIGKILL works on a stopped process too
        await asyncio.wait_for(proc.wait(), 10)


@pytest.mark.parametrize("how", ["raw", "sigstop"])
@pytest.mark.timeout(60)
@BOTH_LOOPS
async def test_vanished_client_is_closed_by_the_pong_timeout(how: str) -> None:
    """A member that stops answering pings without closing (a socket nobody reads, or a
    SIGSTOPped client process) is closed with 1011 by the pong timeout: it leaves the
    room on its node and in cluster-wide presence, the others are told, the pong-timeout
    metric counts it, and the members who answer pings stay connected throughout."""
    with Cluster(2, [*PRESENCE_ARGS, *KEEPALIVE_ARGS]) as cluster:
        n0, n1 = cluster.nodes
        async with members((n0.ws_url, "r", "near"), (n1.ws_url, "r", "far")) as (near, far), \
                probe_session() as probe:
            async with vanishing_client(how, n0.ws_url) as (ghost, silent_at, raw):
                await far.wait_for(lambda: any(
                    n.get("type") == "join" and n.get("name") == "ghost"
                    for _, n in far.notices), 10, "the ghost's join notice")
                assert await api_room(probe, n1.url, "r") == {near.conn_id, far.conn_id,
                                                             ghost}
                stop = asyncio.Event()
                traffic = [asyncio.create_task(steady(0.1, stop, m.send_mixed))
                           for m in (near, far)]
                try:
                    async def ghost_gone() -> bool:
                        return ghost not in await api_room(probe, n1.url, "r")

                    await until(ghost_gone, KEEPALIVE_BOUND + 3,
                                "the silent member gone from the room")
                    took = time.monotonic() - silent_at
                    await far.wait_for(lambda: any(
                        n.get("type") == "leave" and n.get("name") == "ghost"
                        for _, n in far.notices), 5, "the ghost's leave notice")
                    leave = next(n for _, n in far.notices if n.get("type") == "leave")
                    # the keepalive keeps working for the others
                    mark = time.monotonic()
                    await far.wait_for(lambda: far.count_from("near") >= 3 and
                                       time.monotonic() - mark > 2 * PING_MS / 1000,
                                       10, "more traffic over several ping intervals")
                finally:
                    stop.set()
                    await asyncio.gather(*traffic, return_exceptions=True)
                if raw is not None:
                    # what the node wrote last, behind everything the client never read
                    frames = []
                    while (frame := await raw.recv_frame(10)) is not None:
                        frames.append(frame)
                    assert frames[-1].opcode == 8
                    assert int.from_bytes(frames[-1].payload[:2], "big") == 1011
                    assert frames[-1].payload[2:] == b"keepalive pong timeout"

            measured(f"pong timeout ({how}): silent member gone from the room "
                     "(cluster-wide) after it went silent", took)
            assert took <= KEEPALIVE_BOUND, took
            assert leave == {"type": "leave", "name": "ghost", "members": 2}
            assert near.open and far.open
            samples = await scrape(n0.url, probe)
            assert samples["roomcast_pong_timeouts_total"] == 1
            assert samples["roomcast_connections"] == 1
            assert samples["roomcast_rooms"] == 1
            log = n0.log()
            assert f"closing {ghost}: no pong within 1.0s" in log
            assert f"closed {ghost} with 1011 keepalive pong timeout" in log
            assert await api_room(probe, n0.url, "r") == {near.conn_id, far.conn_id}


# -- a slow consumer in a busy room ------------------------------------------------------

SEND_BUFFER_LIMIT = 256 * 1024


@pytest.mark.timeout(60)
@BOTH_LOOPS
async def test_slow_consumer_is_cut_off_without_slowing_the_room() -> None:
    """A member that stops reading in a room busy with 8 KB messages (~800 KB/s) is cut
    off once more than --send-buffer-limit bytes wait for it: close code 1013 in the log
    and on_close (the room is told it left), the slow-consumer metric counts it; the
    other member on its node gets every message meanwhile, its latency within bounds."""
    import socket

    from tests.rawws import RawClient

    with Cluster(2, [*PRESENCE_ARGS, "--send-buffer-limit", str(SEND_BUFFER_LIMIT),
                     "--log-level", "DEBUG"]) as cluster:
        n0, n1 = cluster.nodes
        async with members((n1.ws_url, "busy", "talker"),
                           (n0.ws_url, "busy", "reader")) as (talker, reader), \
                probe_session() as probe:
            stop = asyncio.Event()

            async def talk() -> None:
                await talker.send_numbered(8_000, binary=talker._seq % 2 == 0)

            traffic = asyncio.create_task(steady(0.01, stop, talk))
            raw: RawClient | None = None
            try:
                await reader.wait_for(lambda: reader.count_from("talker") >= 200, 20,
                                      "baseline traffic")
                joined_at = time.monotonic()
                # A client that never reads: a small receive buffer, so the node's
                # buffer for it fills soon.
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", n0.port))
                r, w = await asyncio.open_connection(sock=sock)
                raw = RawClient(r, w)
                slow_id = await _raw_upgrade(raw, n0.port, "/chat?room=busy&name=slow")
                await reader.wait_for(lambda: any(
                    n.get("type") == "leave" and n.get("name") == "slow"
                    for _, n in reader.notices), 30, "the slow member cut off")
                cut_at = time.monotonic()
                mark = reader.count_from("talker")
                await reader.wait_for(lambda: reader.count_from("talker") >= mark + 100,
                                      10, "traffic after the cut")
            finally:
                stop.set()
                await asyncio.gather(traffic, return_exceptions=True)
                if raw is not None:
                    await raw.close()
            await reader.wait_for(
                lambda: max(talker.sent) in reader.streams()["talker"], 10, "last message")

            lat = {"before": [], "filling": [], "after": []}
            for rec in reader.received:
                made = rec.at - rec.latency
                phase = ("before" if made < joined_at else "filling" if made < cut_at
                         else "after")
                lat[phase].append(rec.latency)
            from tests.e2e.soakkit import percentile

            for phase, values in lat.items():
                measured(f"slow consumer: reader latency p50 {phase}",
                         percentile(values, 0.5) * 1000, "ms")
                measured(f"slow consumer: reader latency p99 {phase}",
                         percentile(values, 0.99) * 1000, "ms")
                measured(f"slow consumer: reader latency max {phase}", max(values) * 1000,
                         "ms")
            measured("slow consumer: cut off after", cut_at - joined_at)
            assert reader.streams()["talker"] == sorted(talker.sent)  # no gap at all
            assert len(lat["filling"]) > 50
            assert percentile(lat["filling"], 0.99) < 0.25
            assert max(lat["filling"]) < 1.0
            assert reader.open
            samples = await scrape(n0.url, probe)
            assert samples["roomcast_slow_consumer_disconnects_total"] == 1
            assert f"closed {slow_id} with 1013 slow consumer" in n0.log()
            assert slow_id not in await api_room(probe, n1.url, "busy")


async def _raw_upgrade(raw: Any, port: int, path: str) -> str:
    """Send a WebSocket upgrade on an already connected RawClient; the connection id."""
    import base64
    import os

    key = base64.b64encode(os.urandom(16)).decode()
    raw.send((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
              f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
              "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = await asyncio.wait_for(raw.reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    for line in head.decode().split("\r\n"):
        if line.lower().startswith("x-roomcast-connection:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no connection id in {head!r}")


# -- Redis' pub/sub output buffer limit --------------------------------------------------


@pytest.mark.timeout(60)
async def test_redis_output_buffer_limit_drops_a_node_link_which_recovers() -> None:
    """Redis' client-output-buffer-limit for pub/sub set low (CONFIG SET), then a message
    bigger than it is published to a room: Redis closes the subscriber links of the
    nodes in that room. Each notices (a warning about the lost link), reconnects and
    re-subscribes (roomcast_broker_reconnects_total counts it), and delivery resumes:
    the member keeps getting the steady messages, in order, intact."""
    with Cluster(2, PRESENCE_ARGS) as cluster:
        n0, n1 = cluster.nodes
        async with members((n1.ws_url, "r", "talker"), (n0.ws_url, "r", "far")) as \
                (talker, far), probe_session() as probe:
            stop = asyncio.Event()
            traffic = asyncio.create_task(steady(SEND_PERIOD, stop, talker.send_mixed))
            try:
                await far.wait_for(lambda: far.count_from("talker") >= 20, 10, "warm-up")
                before = await scrape(n0.url, probe)
                assert before["roomcast_broker_reconnects_total"] == 0
                cluster.redis.config_set("client-output-buffer-limit", "pubsub 32kb 16kb 1")
                big_at = time.monotonic()
                await talker.ws.send("x" * 60_000)  # > the limit once queued for a node

                async def reconnected() -> bool:
                    samples = await scrape(n0.url, probe)
                    return (samples["roomcast_broker_reconnects_total"] >= 1
                            and samples["roomcast_broker_connected"] == 1)

                took = await until(reconnected, RECOVERY_BOUND, "node 0 reconnected")
                await far.wait_for(lambda: any(r.at - r.latency > big_at + took
                                               for r in far.received),
                                   RECOVERY_BOUND, "delivery after the reconnect")
                resumed = max(r.at for r in far.received) - big_at
            finally:
                stop.set()
                await asyncio.gather(traffic, return_exceptions=True)
            await far.wait_for(lambda: max(talker.sent) in far.streams()["talker"], 10,
                               "last message")
            measured("output buffer limit: link restored after", took)
            measured("output buffer limit: delivery resumed after", resumed)
            assert "overcoming of output buffer limits" in cluster.redis.log_tail(200)
            lines = n0.log().splitlines()
            assert any("WARNING roomcast.broker.redis" in line and
                       "lost the pub/sub link" in line for line in lines), lines
            assert any("restored" in line and "re-subscribed" in line for line in lines)
            seqs = far.streams()["talker"]
            assert order_problems(seqs) == (0, 0) and not far.corrupt
            lost = sorted(set(talker.sent) - set(seqs))
            measured("output buffer limit: messages lost to the member", len(lost), "")
            assert all(n.alive for n in cluster.nodes)
            assert far.open and talker.open


# -- a burst of joins and Redis connections ------------------------------------------------


class TooManyRedisConnections(AssertionError):
    """A node kept a connection to Redis per member of a past burst."""


BURST = 60
REDIS_CONNECTION_BOUND = 18
"""A pub/sub link, the publish link and a command pool of at most 16 connections."""


@pytest.mark.timeout(60)
async def test_burst_of_joins_leaves_no_pile_of_redis_connections() -> None:
    """60 members join one node at once (as the clients of a dead node reconnect), then
    leave: once they are gone the node holds at most a pub/sub link and a bounded command
    pool of connections to Redis, not one per member of the burst."""
    from tests.e2e.soakkit import fd_count, redis_sockets

    with Cluster(1, PRESENCE_ARGS) as cluster:
        node = cluster.nodes[0]
        before = redis_sockets(node.pid, cluster.redis.port)
        burst = await asyncio.gather(*(Member.join(node.ws_url, "r", f"b{i}", timeout=20)
                                       for i in range(BURST)))
        assert len({m.conn_id for m in burst}) == BURST
        await asyncio.gather(*(m.close() for m in burst))

        async def all_gone() -> bool:
            return (await scrape(node.url))["roomcast_connections"] == 0

        await until(all_gone, 10, "every member of the burst gone")
        after = redis_sockets(node.pid, cluster.redis.port)
        measured("burst: connections to Redis before / after a burst of "
                 f"{BURST} joins", after, f"(before {before}; fds now {fd_count(node.pid)})")
        assert node.alive
        if after > REDIS_CONNECTION_BOUND:
            raise TooManyRedisConnections(
                f"{after} connections to Redis after a burst of {BURST} joins "
                f"(before: {before}); bound {REDIS_CONNECTION_BOUND}")
