"""The cluster demo, run for real: both compose files on a Docker engine, checked as a
user would (issue 16).

Where the machine can run Docker (scripts/test installs Debian's docker.io,
docker-compose 1.29 and debootstrap), this starts an engine if none answers, builds the
stand-in images of python, redis and haproxy once (cached between runs, see
tests/e2e/compose/engine.py), builds the roomcast image offline, brings each compose file
up as its own project on free loopback ports, and checks: every node process runs on
uvloop (its start-up log line says so; the image installs roomcast[uvloop]), the page
and chat across the three nodes through HAProxy, join notices on fresh nodes, the
HAProxy stats page, ``stop`` of a node (HAProxy has marked it down before its clients
get 1001; they reconnect to the others), ``kill -9`` of a node (its clients reconnect;
the restart policy brings it back), stopping HAProxy with a WebSocket open, and under
Redis Cluster the kill of a room's master (other rooms, new connections and the page
keep working, every node stays in rotation). Then ``down -v``, the daemon it started is stopped by
its PID and the host's network is as it was. Elsewhere it is skipped with the reason.

Measured figures (reconnect times, failover times, durations) are printed, and written
as JSON to $ROOMCAST_COMPOSE_REPORT when set; scripts/compose-smoke runs this file and
shows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.e2e.compose.engine import (
    REPO,
    WHEELS_DIR,
    Engine,
    Project,
    Unavailable,
)
from tests.e2e.procs import free_port
from tests.loops import ONE_LOOP

# The containers run the image's own loop; the test's client loop is not the subject.
pytestmark = [pytest.mark.timeout(900), ONE_LOOP]

NODES = ("node1", "node2", "node3")
REPORT: dict[str, Any] = {}


def say(text: str) -> None:
    print(f"[compose-live] {text}", file=sys.stderr, flush=True)


def record(key: str, value: Any) -> None:
    """Keep a measured figure for the report."""
    REPORT[key] = value
    say(f"{key} = {value}")


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    """A Docker engine with the stand-in images and the offline wheels; afterwards the
    wheels are removed, a daemon started here is stopped, the network is as it was."""
    started = time.monotonic()
    try:
        eng = Engine.acquire(say)
    except Unavailable as exc:
        pytest.skip(f"the compose smoke test needs a Docker engine: {exc}")
    try:
        record("standin_images", eng.ensure_standins())
        eng.prepare_wheels()
        record("engine_ready_s", round(time.monotonic() - started, 1))
        yield eng
    finally:
        shutil.rmtree(REPO / WHEELS_DIR, ignore_errors=True)
        eng.release()
        record("engine_timings_s", {k: round(v, 1) for k, v in eng.timings.items()})
        record("total_s", round(time.monotonic() - started, 1))
        target = os.environ.get("ROOMCAST_COMPOSE_REPORT")
        if target:
            with open(target, "w") as out:
                json.dump(REPORT, out, indent=2)
        assert not eng.leftovers, f"the host's network is not as it was: {eng.leftovers}"


@contextlib.contextmanager
def project(engine: Engine, compose_file: str, name: str) -> Iterator[Project]:
    """The compose file up (built offline); always ``down -v`` after, leaving nothing."""
    proj = Project(engine, compose_file, name, NODES, free_port(), free_port())
    try:
        record(f"{name}.up_s", round(proj.up(), 1))
        yield proj
    except BaseException:
        # each roomcast node's own tail first: Redis' logs are long and would push
        # the nodes' warnings (failed publishes, resubscriptions) out of view
        for node in NODES:
            say(f"logs of {name} {node}:\n{proj.logs(node)[-4000:]}")
        say(f"logs of {name}:\n{proj.logs()[-12000:]}")
        raise
    finally:
        proj.down()
        left = proj.leftovers()
        assert not left, f"down -v left {left}"


# -- clients ----------------------------------------------------------------------------


@dataclass
class Member:
    """A chat member connected through HAProxy: where it landed and what it received."""

    ws: ClientConnection
    name: str
    node: str
    notices: list[dict[str, Any]] = field(default_factory=list)
    chat: list[tuple[float, str]] = field(default_factory=list)

    async def pump(self) -> None:
        """Read until the socket closes: notices and chat lines, with arrival times."""
        with contextlib.suppress(websockets.ConnectionClosed):
            async for data in self.ws:
                text = data if isinstance(data, str) else data.decode(errors="replace")
                if text.startswith('{"type": "'):
                    self.notices.append(json.loads(text))
                else:
                    self.chat.append((time.monotonic(), text))


_names = iter(range(10**9))


async def join(base: str, room: str, *, attempts: int = 30) -> tuple[Member, int]:
    """A member of ``room`` once its own join notice came back, and how many attempts
    it took (a refused or failed attempt is retried at once, as a client would)."""
    name = f"m{next(_names)}"
    last: BaseException | None = None
    for attempt in range(1, attempts + 1):
        try:
            ws = await websockets.connect(f"{base}/chat?room={room}&name={name}",
                                          open_timeout=10)
        except (OSError, websockets.InvalidStatus, websockets.InvalidHandshake,
                TimeoutError) as exc:
            last = exc
            await asyncio.sleep(0.05)
            continue
        assert ws.response is not None
        member = Member(ws, name, ws.response.headers["X-Roomcast-Node"])
        while True:
            data = await asyncio.wait_for(ws.recv(), 10)
            if not (isinstance(data, str) and data.startswith('{"type": "')):
                continue  # chat already flowing in the room
            notice = json.loads(data)
            member.notices.append(notice)
            if notice.get("type") == "join" and notice.get("name") == name:
                return member, attempt
    raise AssertionError(f"could not join {room} in {attempts} attempts: {last!r}")


async def until(condition: Callable[[], Awaitable[bool]], timeout: float, what: str,
                interval: float = 0.05) -> float:
    """Poll until ``condition``; the monotonic time it held; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(interval)
    return time.monotonic()


async def http_get(url: str, timeout: float = 10) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, \
            http.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        return resp.status, await resp.text()


async def server_states(proj: Project) -> dict[str, str]:
    """HAProxy's view of the nodes, from its stats page (CSV)."""
    _, text = await http_get(f"http://127.0.0.1:{proj.stats_port}/;csv")
    rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
    return {row["svname"]: row["status"] for row in rows
            if row["pxname"] == "roomcast_nodes" and row["svname"].startswith("node")}


async def wait_all_up(proj: Project, timeout: float = 90) -> None:
    async def all_up() -> bool:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, KeyError):
            states = await server_states(proj)
            return all(states.get(n) == "UP" for n in NODES)
        return False

    await until(all_up, timeout, "every node UP in HAProxy", 0.2)


async def spread_members(base: str, room: str, per_node: int) -> dict[str, list[Member]]:
    """Join until every node holds ``per_node`` members of ``room`` (HAProxy balances by
    fewest connections, so sequential joins spread)."""
    by_node: dict[str, list[Member]] = {}
    for _ in range(per_node * len(NODES) * 3):
        member, _ = await join(base, room)
        by_node.setdefault(member.node, []).append(member)
        if len(by_node) == len(NODES) and all(len(m) >= per_node for m in by_node.values()):
            return by_node
    raise AssertionError(f"members not spread over the nodes: "
                         f"{ {k: len(v) for k, v in by_node.items()} }")


async def node_ids(proj: Project) -> dict[str, str]:
    """Service name -> node id, asked inside each node's container."""
    ids = {}
    for service in NODES:
        body = await asyncio.to_thread(
            proj.exec, service, "python", "-c",
            "import urllib.request; print(urllib.request.urlopen("
            "'http://127.0.0.1:8080/healthz', timeout=5).read().decode())")
        ids[service] = json.loads(body)["node"]
    return ids


_LOOP_LINE = re.compile(r"\broomcast\.node\b.* event loop: (.+?)\s*$", re.M)


def logged_loops(log_text: str) -> list[str]:
    """What each start-up line "event loop: ..." in a node's log names, oldest first:
    ``uvloop 0.23.0``, or ``asyncio (_UnixSelectorEventLoop)`` when uvloop is missing."""
    return _LOOP_LINE.findall(log_text)


async def nodes_on_uvloop(proj: Project, starts: dict[str, int] | None = None
                          ) -> dict[str, list[str]]:
    """Every node process of ``proj`` (``starts[service]`` of them, default 1, the
    restarted ones included) logged at start-up that it runs on uvloop: the image
    installs roomcast[uvloop] and ``--loop auto`` picks it. Fails naming the loops when
    any node runs on asyncio's loop (the image fell back)."""
    loops: dict[str, list[str]] = {}
    for service in NODES:
        want = (starts or {}).get(service, 1)

        async def logged(service: str = service, want: int = want) -> bool:
            loops[service] = logged_loops(await asyncio.to_thread(proj.logs, service))
            return len(loops[service]) >= want

        await until(logged, 15, f"{want} start-up line(s) of {service} naming its loop", 0.2)
    record(f"{proj.name}.event_loops", loops)
    assert all(loop.startswith("uvloop ") for found in loops.values() for loop in found), (
        f"a node does not run on uvloop: {loops}")
    return loops


async def close_all(members: list[Member]) -> None:
    for member in members:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(member.ws.close(), 5)


# -- the single-Redis demo --------------------------------------------------------------


async def test_demo_with_one_redis(engine: Engine) -> None:
    """docker-compose.yml as a user runs it: page and chat across nodes through HAProxy,
    join notices in order with the right count on fresh nodes, stop and kill -9 of a
    node with the reconnect time through the balancer, the restart policy, and HAProxy
    stopped with a WebSocket open; down -v leaves nothing."""
    with project(engine, "docker-compose.yml", "roomcast-smoke") as proj:
        base_http = f"http://127.0.0.1:{proj.http_port}"
        base = f"ws://127.0.0.1:{proj.http_port}"
        await wait_all_up(proj)
        await nodes_on_uvloop(proj)
        status, page = await http_get(base_http + "/")
        assert status == 200 and "roomcast chat" in page

        # Fresh nodes: members join one after another (each once it saw its own join);
        # everyone sees every later join, in order, with the count at that join.
        members: list[Member] = []
        for _ in range(6):
            member, _ = await join(base, "lobby")
            members.append(member)
        pumps = [asyncio.create_task(m.pump()) for m in members]
        assert len({m.node for m in members}) == 3, [m.node for m in members]
        await members[0].ws.send("hello from the first")
        await members[5].ws.send(b"binary from the last")

        async def everyone_has_chat() -> bool:
            return all(len(m.chat) >= 2 for m in members)

        await until(everyone_has_chat, 10, "both chat lines at every member")
        for index, member in enumerate(members):
            joins = [(n["name"], n["members"]) for n in member.notices if n["type"] == "join"]
            expected = [(m.name, i + 1) for i, m in enumerate(members)][index:]
            assert joins == expected, (member.name, member.node, joins)
            assert sorted(text for _, text in member.chat) == [
                "binary from the last", "hello from the first"]
        for task in pumps:
            task.cancel()
        await close_all(members)

        ids = await node_ids(proj)
        states = await server_states(proj)
        assert states == {n: "UP" for n in NODES}, states

        # docker-compose stop node2: HAProxy marks it down (its /readyz fails at once)
        # before the node closes its clients with 1001; they reconnect to the others.
        by_node = await spread_members(base, "ops", 3)
        pumps = [asyncio.create_task(m.pump()) for ms in by_node.values() for m in ms]
        doomed = by_node[ids["node2"]]
        stopping = asyncio.create_task(asyncio.to_thread(proj.compose, "stop", "node2"))
        stop_sent = time.monotonic()

        async def node2_down() -> bool:
            return (await server_states(proj)).get("node2", "").startswith("DOWN")

        marked_down = await until(node2_down, 15, "node2 DOWN in HAProxy", 0.05)
        closes = []
        for member in doomed:
            with contextlib.suppress(websockets.ConnectionClosed):
                await asyncio.wait_for(member.ws.wait_closed(), 20)
            closes.append(time.monotonic())
            assert member.ws.close_code == 1001, member.ws.close_code
        assert marked_down < min(closes), "clients were closed before HAProxy took the node out"
        reconnects = []
        for closed_at, _ in zip(closes, doomed, strict=True):
            rejoined, attempts = await join(base, "ops")
            reconnects.append((time.monotonic() - closed_at, attempts))
            assert rejoined.node != ids["node2"], "reconnected to the stopped node"
            assert attempts == 1
            await rejoined.ws.close()
        await stopping
        record("stop.node_marked_down_after_stop_s", round(marked_down - stop_sent, 2))
        record("stop.first_1001_after_stop_s", round(min(closes) - stop_sent, 2))
        record("stop.reconnect_s", [round(t, 3) for t, _ in reconnects])
        assert proj.inspect("node2", "{{.State.ExitCode}}") == "0"
        for task in pumps:
            task.cancel()
        await close_all([m for ms in by_node.values() for m in ms])
        proj.compose("start", "node2")
        await wait_all_up(proj)

        # kill -9 of a node process (a crash): its clients are cut off, reconnect through
        # HAProxy to live nodes; the restart policy brings the node back into rotation.
        by_node = await spread_members(base, "crash", 2)
        victim = by_node[ids["node3"]]
        restarts = int(proj.inspect("node3", "{{.RestartCount}}"))
        pid = int(proj.inspect("node3", "{{.State.Pid}}"))
        os.kill(pid, signal.SIGKILL)  # the node process this test's compose up started
        killed = time.monotonic()
        reconnects = []
        for member in victim:
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    await asyncio.wait_for(member.ws.recv(), 20)
            cut = time.monotonic()
            rejoined, attempts = await join(base, "crash")
            reconnects.append((round(time.monotonic() - cut, 3), attempts))
            assert rejoined.node != ids["node3"]
            await rejoined.ws.close()
        record("kill9.reconnect_s_and_attempts", reconnects)
        record("kill9.clients_cut_after_s", round(cut - killed, 2))

        async def restarted() -> bool:
            return int(await asyncio.to_thread(
                proj.inspect, "node3", "{{.RestartCount}}")) > restarts

        back = await until(restarted, 60, "node3 restarted by its restart policy", 0.2)
        await wait_all_up(proj)
        record("kill9.restarted_after_s", round(back - killed, 1))
        record("kill9.back_in_rotation_after_s", round(time.monotonic() - killed, 1))
        survivors = [m for ms in by_node.values() for m in ms if m not in victim]
        await close_all(survivors)
        assert ids != await node_ids(proj), "node3 came back as a new node"
        # the processes started again (node2 by start, node3 by its restart policy) too
        await nodes_on_uvloop(proj, {"node2": 2, "node3": 2})

        # HAProxy stopped with a WebSocket open: it ends the tunnel itself within its
        # hard-stop-after and exits by itself, not SIGKILLed at the end of the grace.
        member, _ = await join(base, "last")
        started = time.monotonic()
        await asyncio.to_thread(proj.compose, "stop", "haproxy")
        record("haproxy_stop_with_open_websocket_s", round(time.monotonic() - started, 1))
        with contextlib.suppress(websockets.ConnectionClosed):
            await asyncio.wait_for(member.ws.recv(), 20)
        assert member.ws.close_code == 1006
        code = proj.inspect("haproxy", "{{.State.ExitCode}}")
        assert code != "137", "haproxy was SIGKILLed at the end of its stop_grace_period"
        record("haproxy_exit_code_after_stop", int(code))
        # each server state change is printed once (it used to come twice: logged and
        # printed as a [WARNING])
        changes = [line for line in proj.logs("haproxy").splitlines()
                   if re.search(r"Server roomcast_nodes/node\d is (UP|DOWN)", line)]
        assert any("node2 is DOWN" in line for line in changes), changes
        assert all("[WARNING]" in line for line in changes), changes


# -- the Redis Cluster demo -------------------------------------------------------------


REDIS = tuple(f"redis{i}" for i in range(1, 7))


def cluster_view(proj: Project, service: str) -> list[list[str]]:
    """CLUSTER NODES as seen by ``service``: one list of fields per node."""
    text = proj.exec(service, "redis-cli", "cluster", "nodes")
    return [line.split() for line in text.splitlines() if line.strip()]


def master_of_slot(proj: Project, slot: int) -> tuple[str, str]:
    """(service, node id) of the master serving ``slot``."""
    for service in REDIS:
        for fields in cluster_view(proj, service):
            if "myself" in fields[2] and "master" in fields[2]:
                for part in fields[8:]:
                    low, _, high = part.partition("-")
                    if low.isdigit() and int(low) <= slot <= int(high or low):
                        return service, fields[0]
    raise AssertionError(f"no master serves slot {slot}")


def room_slot(proj: Project, room: str) -> int:
    return int(proj.exec("redis1", "redis-cli", "cluster", "keyslot",
                         f"roomcast:room:{room}").strip())


async def test_demo_with_redis_cluster(engine: Engine) -> None:
    """docker-compose.cluster.yml: killing the master of one room's slot pauses only
    that room: every node stays ready and in HAProxy's rotation, another room keeps
    delivering without a loss, new connections and the page are served; the replica
    takes over and the room resumes by itself. Promotion and delivery-back times and
    the messages lost in the paused room are measured; down -v leaves no volume."""
    with project(engine, "docker-compose.cluster.yml", "roomcast-smoke-cluster") as proj:
        base_http = f"http://127.0.0.1:{proj.http_port}"
        base = f"ws://127.0.0.1:{proj.http_port}"
        await wait_all_up(proj)
        await nodes_on_uvloop(proj)
        # one room on a master (the victim), another room on another master
        rooms: dict[str, tuple[str, str]] = {}
        for i in range(200):
            room = f"r{i}"
            master = await asyncio.to_thread(master_of_slot, proj, room_slot(proj, room))
            if not rooms or (len(rooms) == 1 and master[0] != next(iter(rooms.values()))[0]):
                rooms[room] = master
            if len(rooms) == 2:
                break
        (paused_room, (victim, victim_id)), (steady_room, _) = rooms.items()

        members: dict[str, list[Member]] = {}
        for room in rooms:
            members[room] = [(await join(base, room))[0] for _ in range(3)]
            assert len({m.node for m in members[room]}) >= 2
        everyone = [m for ms in members.values() for m in ms]
        pumps = [asyncio.create_task(m.pump()) for m in everyone]
        sent: dict[str, dict[int, float]] = {room: {} for room in rooms}
        stop = asyncio.Event()

        async def publish(room: str) -> None:
            sender = members[room][0]
            seq = 0
            while not stop.is_set():
                seq += 1
                sent[room][seq] = time.monotonic()
                await sender.ws.send(f"{room}#{seq}")
                await asyncio.sleep(0.1)

        publishers = [asyncio.create_task(publish(room)) for room in rooms]
        await asyncio.sleep(2)
        replica = next(f[0] for f in await asyncio.to_thread(cluster_view, proj, "redis1")
                       if len(f) > 3 and f[3] == victim_id)
        observer = next(s for s in REDIS if s != victim)
        proj.compose("kill", victim)  # SIGKILL
        killed = time.monotonic()
        unready: list[dict[str, str]] = []
        served_during: list[int] = []
        broker_states: set[str] = set()

        async def promoted() -> bool:
            states = await server_states(proj)
            # "UP 1/2" (a check failed, e.g. on a busy machine) is still in rotation
            if any(not states.get(n, "").startswith("UP") for n in NODES):
                unready.append(states)
            status, _ = await http_get(base_http + "/")
            served_during.append(status)
            status, body = await http_get(base_http + "/healthz")
            if status == 200:
                broker_states.add(json.loads(body)["broker"]["state"])
            view = await asyncio.to_thread(cluster_view, proj, observer)
            return any(f[0] == replica and "master" in f[2] for f in view)

        promotion = await until(promoted, 60, "the replica promoted", 0.2)
        newcomer, attempts = await join(base, steady_room)
        assert attempts == 1
        await newcomer.ws.close()

        receivers = [m for m in members[paused_room] if m.node != members[paused_room][0].node]

        def back_at() -> float | None:
            after = [t for m in receivers for t, text in m.chat
                     if text.startswith(paused_room + "#")
                     and sent[paused_room][int(text.split("#")[1])] > killed]
            return min(after) if after else None

        async def delivering_again() -> bool:
            return back_at() is not None

        await until(delivering_again, 60, f"{paused_room} delivering again", 0.1)
        await asyncio.sleep(2)
        stop.set()
        await asyncio.gather(*publishers)
        await asyncio.sleep(1)
        for task in pumps:
            task.cancel()

        def lost(room: str) -> int:
            others = [m for m in members[room] if m is not members[room][0]]
            got = [{int(text.split("#")[1]) for _, text in m.chat if text.startswith(room + "#")}
                   for m in others]
            return max(len(set(sent[room]) - g) for g in got)

        back = back_at()
        assert back is not None
        record("cluster.promotion_after_kill_s", round(promotion - killed, 1))
        record("cluster.delivery_back_after_kill_s", round(back - killed, 1))
        record("cluster.lost_in_paused_room", lost(paused_room))
        record("cluster.broker_states_seen_in_healthz", sorted(broker_states))
        assert lost(steady_room) == 0, "the room on a healthy master lost messages"
        assert not unready, f"nodes left HAProxy's rotation during the failover: {unready}"
        assert served_during and set(served_during) == {200}, served_during
        await close_all(everyone)
