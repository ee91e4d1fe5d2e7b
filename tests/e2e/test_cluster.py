"""Three real node processes and a real redis-server: the cluster as users run it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from roomcast.broker.publisher import Publisher
from tests.e2e.procs import NodeProcess
from tests.redis_server import RedisServer

TTL_MS = 1500
HEARTBEAT_MS = 300


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


def node_args(redis_url: str) -> list[str]:
    return ["--redis", redis_url, "--presence-ttl-ms", str(TTL_MS),
            "--heartbeat-ms", str(HEARTBEAT_MS)]


@pytest.fixture
def nodes(redis_server: RedisServer) -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    try:
        for _ in range(3):
            started.append(NodeProcess(*node_args(redis_server.url)).start())
        yield started
    finally:
        for node in started:
            node.kill()


@pytest.fixture
async def publisher(redis_server: RedisServer) -> AsyncIterator[Publisher]:
    async with Publisher(redis_server.url, presence_ttl=TTL_MS / 1000) as pub:
        yield pub


class Client:
    """A chat member: its socket, and the node and connection ids the node announced."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.joined: dict[str, Any] = {}
        assert ws.response is not None
        self.node = ws.response.headers["X-Roomcast-Node"]
        self.id = ws.response.headers["X-Roomcast-Connection"]

    async def recv(self, timeout: float = 5.0) -> Any:
        return await asyncio.wait_for(self.ws.recv(), timeout)

    async def recv_chat(self, timeout: float = 5.0) -> Any:
        """The next message that is not a join/leave notice."""
        while True:
            data = await self.recv(timeout)
            if isinstance(data, str) and data.startswith('{"type": "'):
                continue
            return data


_names = iter(range(10**9))


@contextlib.asynccontextmanager
async def chat(node: NodeProcess, room: str = "r", name: str = "") -> AsyncIterator[Client]:
    """A chat member that has seen its own join notice (so it is fully joined)."""
    name = name or f"m{next(_names)}"
    async with websockets.connect(f"{node.ws_url}/chat?room={room}&name={name}") as ws:
        client = Client(ws)
        while client.joined.get("name") != name:
            client.joined = json.loads(await client.recv())
        yield client


async def until(condition: Any, timeout: float, what: str) -> None:
    """Poll an async condition until it holds; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


async def test_room_broadcast_spans_three_nodes(nodes: list[NodeProcess]) -> None:
    """A member's message reaches members on the two other nodes; counts are cluster-wide."""
    async with (
        chat(nodes[0], name="a") as a,
        chat(nodes[1], name="b") as b,
        chat(nodes[2], name="c") as c,
    ):
        assert len({a.node, b.node, c.node}) == 3
        assert c.joined == {"type": "join", "name": "c", "members": 3}
        await a.ws.send("hello cluster")
        for member in (a, b, c):
            assert await member.recv_chat() == "hello cluster"
        await c.ws.send(b"\x00bin")
        for member in (a, b, c):
            assert await member.recv_chat() == b"\x00bin"


async def test_publisher_except_everyone_and_targeted(
    nodes: list[NodeProcess], publisher: Publisher
) -> None:
    """Except, everyone and one-connection sends reach exactly whom they name."""
    async with chat(nodes[0]) as a, chat(nodes[1]) as b, chat(nodes[2], room="other") as c:
        assert await publisher.room_members("r") == {a.id, b.id}
        await publisher.publish_to_room("r", "not b", exclude=b.id)
        await publisher.broadcast("everyone")
        await publisher.send_to_connection(b.id, "only b")
        assert [await a.recv_chat(), await a.recv_chat()] == ["not b", "everyone"]
        assert [await b.recv_chat(), await b.recv_chat()] == ["everyone", "only b"]
        assert await c.recv_chat() == "everyone"


async def test_sigkilled_node_leaves_rooms_within_ttl(
    nodes: list[NodeProcess], publisher: Publisher
) -> None:
    """A node killed with SIGKILL has its members gone from room_size within the TTL."""
    async with chat(nodes[0]) as a, chat(nodes[1]) as b:
        assert await publisher.room_members("r") == {a.id, b.id}
        assert nodes[1].proc is not None
        nodes[1].proc.send_signal(signal.SIGKILL)
        nodes[1].proc.wait(5)
        killed_at = time.monotonic()

        async def b_gone() -> bool:
            return await publisher.room_members("r") == {a.id}

        await until(b_gone, (TTL_MS + HEARTBEAT_MS) / 1000 + 2, "killed member vanishes")
        assert time.monotonic() - killed_at <= (TTL_MS + HEARTBEAT_MS) / 1000 + 1
        await publisher.publish_to_room("r", "still working")
        assert await a.recv_chat() == "still working"


async def test_redis_restart_resumes_cross_node_delivery(
    nodes: list[NodeProcess], redis_server: RedisServer
) -> None:
    """Redis killed and restarted on its port: nodes live on, local chat works throughout,
    cross-node delivery comes back by itself."""
    async with chat(nodes[0], name="a") as a, chat(nodes[1], name="b") as b:
        await a.ws.send("before")
        assert await b.recv_chat() == "before"
        assert await a.recv_chat() == "before"
        redis_server.kill()
        async with chat(nodes[0], name="a2") as a2:
            await a.ws.send("during outage")
            assert await a.recv_chat() == "during outage"  # local delivery goes on
            assert await a2.recv_chat() == "during outage"
            assert json.loads(await a.recv())["type"] == "error"  # and the sender is told
        redis_server.start()
        deadline = time.monotonic() + 20
        received = None
        i = 0
        while received is None:
            assert time.monotonic() < deadline, "cross-node delivery did not resume"
            i += 1
            await a.ws.send(f"after {i}")
            with contextlib.suppress(TimeoutError):
                received = await b.recv_chat(timeout=0.5)
        assert received.startswith("after ")
        for node in nodes:
            assert node.proc is not None and node.proc.poll() is None


async def test_garbage_on_room_channel_is_dropped(
    nodes: list[NodeProcess], redis_server: RedisServer
) -> None:
    """Bytes that are not an envelope are dropped and logged; the node keeps serving."""
    async with chat(nodes[0], name="a") as a, chat(nodes[1], name="b") as b:
        client = redis_server.client()
        try:
            assert client.publish("roomcast:room:r", b"\xc1 not msgpack") >= 1
            assert client.publish("roomcast:room:r", b"\x93\x01\x02\x03") >= 1
        finally:
            client.close()
        await a.ws.send("after garbage")
        assert await b.recv_chat() == "after garbage"
    for node in nodes[:2]:
        assert node.proc is not None and node.proc.poll() is None
    assert "dropped" in nodes[0].log() + nodes[1].log()


def test_workers_without_redis_are_refused() -> None:
    """--workers 2 without --redis stops with a message that says why."""
    import subprocess
    import sys

    from tests.e2e.procs import REPO

    result = subprocess.run(
        [sys.executable, "-m", "roomcast.node.cli", "serve", "--workers", "2"], cwd=REPO,
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "--redis" in result.stderr and "share rooms" in result.stderr


async def test_two_workers_share_one_port_and_a_room(redis_server: RedisServer) -> None:
    """--workers 2: connections land on both workers, and a room spans them."""
    with NodeProcess("--workers", "2", *node_args(redis_server.url)) as node:
        kept: dict[str, Client] = {}  # the first member on each worker
        async with contextlib.AsyncExitStack() as stack:
            deadline = time.monotonic() + 20
            while len(kept) < 2:
                assert time.monotonic() < deadline, "all connections went to one worker"
                # Until the second worker listens, every connection lands on the first:
                # those leave at once (members that stayed, unread notices piling up,
                # would each take websockets' close timeout to leave).
                async with contextlib.AsyncExitStack() as probe:
                    client = await probe.enter_async_context(chat(node))
                    if client.node not in kept:
                        kept[client.node] = client
                        await stack.enter_async_context(probe.pop_all())
            members = list(kept.values())
            await members[0].ws.send("across workers")
            for client in members:
                assert await client.recv_chat() == "across workers"
        assert await asyncio.to_thread(node.terminate) == 0, node.log()
        assert len(re.findall(f"event loop: {node.loop or ''}", node.log())) == 2, node.log()


def test_workers_die_with_a_killed_supervisor(redis_server: RedisServer) -> None:
    """SIGKILL of the --workers supervisor takes its workers down too: no orphans."""
    import os
    import re
    from pathlib import Path

    with NodeProcess("--workers", "2", *node_args(redis_server.url)) as node:
        deadline = time.monotonic() + 20
        pids: list[int] = []
        while len(pids) < 2:
            assert time.monotonic() < deadline, node.log()
            pids = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", node.log())]
            time.sleep(0.05)
        assert node.proc is not None
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(5)

        def alive(pid: int) -> bool:
            # a worker whose new parent does not reap it lingers as a zombie: that is dead
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except FileNotFoundError:
                return False
            return stat.rsplit(")", 1)[1].split()[0] != "Z"

        deadline = time.monotonic() + 15
        while any(alive(p) for p in pids):
            if time.monotonic() > deadline:
                for p in pids:  # leave nothing behind even when the test fails
                    if alive(p):
                        os.kill(p, signal.SIGKILL)
                raise AssertionError(f"workers outlived their supervisor: {pids}")
            time.sleep(0.05)
