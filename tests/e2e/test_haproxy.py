"""Nodes behind a real haproxy with scripts/haproxy.cfg, and scripts/cluster as users run it.

Real redis-server, real node processes, real haproxy; free ports only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.e2e import procs
from tests.e2e.haproxy import HAPROXY_CFG, HAProxy
from tests.e2e.procs import REPO, NodeProcess, free_port
from tests.redis_server import RedisServer

CLUSTER = REPO / "scripts" / "cluster"
CHECK_INTER_MS = 200  # haproxy: fall 2 → a dead node is DOWN after ~2-3 intervals


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def nodes(redis_server: RedisServer) -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    try:
        for _ in range(3):
            started.append(NodeProcess("--redis", redis_server.url).start())
        yield started
    finally:
        for node in started:
            node.kill()


@pytest.fixture
def lb(nodes: list[NodeProcess]) -> Iterator[HAProxy]:
    with HAProxy([f"127.0.0.1:{n.port}" for n in nodes],
                 check_inter=f"{CHECK_INTER_MS}ms") as proxy:
        proxy.wait_states({f"node{i}": "UP" for i in range(1, len(nodes) + 1)})
        yield proxy


class Member:
    """A chat member connected through the balancer, and the node it landed on."""

    def __init__(self, ws: ClientConnection, name: str) -> None:
        self.ws = ws
        self.name = name
        assert ws.response is not None
        self.node = ws.response.headers["X-Roomcast-Node"]

    async def recv_chat(self, timeout: float = 5.0) -> Any:
        """The next message that is not a join/leave notice."""
        while True:
            data = await asyncio.wait_for(self.ws.recv(), timeout)
            if isinstance(data, str) and data.startswith('{"type": "'):
                continue
            return data


_names = iter(range(10**9))


async def join(stack: contextlib.AsyncExitStack, base_ws_url: str, room: str = "r") -> Member:
    """A member of ``room`` that has seen its own join notice (so it is fully joined)."""
    name = f"m{next(_names)}"
    ws = await stack.enter_async_context(
        websockets.connect(f"{base_ws_url}/chat?room={room}&name={name}"))
    while True:
        notice = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if notice.get("type") == "join" and notice.get("name") == name:
            return Member(ws, name)


async def node_id(node: NodeProcess) -> str:
    """The id a node announces in X-Roomcast-Node (asked directly, not through haproxy)."""
    async with websockets.connect(node.ws_url + "/echo") as ws:
        assert ws.response is not None
        return ws.response.headers["X-Roomcast-Node"]


async def test_clients_spread_over_nodes_and_share_a_room(lb: HAProxy) -> None:
    """Three clients through haproxy land on three nodes; a room broadcast reaches all."""
    async with contextlib.AsyncExitStack() as stack:
        members = [await join(stack, lb.ws_url) for _ in range(3)]
        assert len({m.node for m in members}) == 3, lb.log()
        await members[0].ws.send("hello through haproxy")
        for member in members:
            assert await member.recv_chat() == "hello through haproxy"
        await members[2].ws.send(b"\x00bin")
        for member in members:
            assert await member.recv_chat() == b"\x00bin"
        # the page is served through the balancer too
        async with aiohttp.ClientSession() as http, http.get(lb.url + "/") as resp:
            assert resp.status == 200
            assert "roomcast chat" in await resp.text()


async def test_killed_node_loses_only_its_clients_who_reconnect_to_live_nodes(
    lb: HAProxy, nodes: list[NodeProcess]
) -> None:
    """SIGKILL one node: only its clients are cut off, the others keep chatting, haproxy
    marks it DOWN, and the cut-off clients reconnect through haproxy to live nodes."""
    ids = [await node_id(n) for n in nodes]
    victim_index = 1
    victim_id = ids[victim_index]
    async with contextlib.AsyncExitStack() as stack:
        members = [await join(stack, lb.ws_url) for _ in range(6)]
        by_node = {i: [m for m in members if m.node == i] for i in ids}
        assert all(len(ms) == 2 for ms in by_node.values()), (by_node, lb.log())
        doomed = by_node[victim_id]
        survivors = [m for m in members if m.node != victim_id]

        victim = nodes[victim_index].proc
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        victim.wait(5)

        for member in doomed:
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await asyncio.wait_for(member.ws.recv(), 5)
        for member in survivors:
            assert member.ws.close_code is None, "a client of a live node was cut off"

        await survivors[0].ws.send("after the kill")
        for member in survivors:
            assert await member.recv_chat() == "after the kill"

        # Reconnect at once, as a browser would: even before the health check has seen the
        # death, a refused connection is redispatched to a live node.
        rejoined = [await join(stack, lb.ws_url) for _ in doomed]
        assert all(m.node in ids and m.node != victim_id for m in rejoined)

        # The health checks take the dead node out.
        await asyncio.to_thread(lb.wait_states, {f"node{victim_index + 1}": "DOWN"}, 5.0)
        newcomers = [await join(stack, lb.ws_url) for _ in range(4)]
        assert {m.node for m in newcomers} <= set(ids) - {victim_id}

        everyone = survivors + rejoined + newcomers
        await rejoined[0].ws.send("all together")
        for member in everyone:
            assert await member.recv_chat() == "all together"
        for index, node in enumerate(nodes):
            if index != victim_index:
                assert node.proc is not None and node.proc.poll() is None


# -- scripts/cluster ------------------------------------------------------------------


def _children(pid: int) -> dict[int, str]:
    """The live child processes of ``pid`` (from /proc) with their command lines."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces, so split after ")"
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextlib.contextmanager
def run_cluster(*args: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """scripts/cluster in a child process (output to a file); killed if the test fails."""
    fd, out_name = tempfile.mkstemp(prefix="roomcast-cluster-test-", suffix=".log")
    out_path = Path(out_name)
    env = dict(os.environ)
    if procs.test_loop is not None:  # its nodes run on the test's event loop
        env["ROOMCAST_LOOP"] = procs.test_loop
    with os.fdopen(fd, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(CLUSTER), *args], cwd=REPO, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    children: dict[int, str] = {}
    try:
        yield proc, out_path
    finally:
        if proc.poll() is None:  # the test failed midway: let it clean up, else kill
            children = _children(proc.pid)
            proc.terminate()
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            for pid in children:  # only what our launcher started
                if _alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        out_path.unlink(missing_ok=True)


def _text(path: Path) -> str:
    """A small local log file (read synchronously: it is tiny)."""
    return path.read_text(errors="replace")


async def _wait_for_page(url: str, proc: subprocess.Popen[bytes], out: Path) -> None:
    deadline = time.monotonic() + 40
    async with aiohttp.ClientSession() as http:
        while True:
            assert proc.poll() is None, f"scripts/cluster exited:\n{_text(out)}"
            assert time.monotonic() < deadline, f"page not served:\n{_text(out)}"
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    page_ok = resp.status == 200 and "roomcast chat" in await resp.text()
                    if page_ok and "Ctrl-C stops everything" in _text(out):  # banner printed
                        return
            await asyncio.sleep(0.1)


def _what_it_started(proc: subprocess.Popen[bytes], out: Path,
                     port: int) -> tuple[dict[int, str], Path]:
    """Its child processes (redis, the nodes, haproxy with scripts/haproxy.cfg), each
    announced with its PID, and its temp dir."""
    output = _text(out)
    assert f"http://127.0.0.1:{port}/" in output
    children = _children(proc.pid)
    kinds = sorted(
        "haproxy" if "haproxy" in cmd.split()[0] else
        "redis" if "redis-server" in cmd.split()[0] else
        "node" if "roomcast.node.cli serve" in cmd else cmd
        for cmd in children.values()
    )
    assert kinds == ["haproxy", "node", "node", "redis"], children
    haproxy_cmd = next(c for c in children.values() if "haproxy" in c.split()[0])
    assert f"-f {HAPROXY_CFG}" in haproxy_cmd  # the very file compose mounts
    for pid in children:
        assert f"pid {pid} " in output, output  # it tells the user what it started
    match = re.search(r"temp dir\s+(\S+)", output)
    assert match is not None, output
    temp_dir = Path(match.group(1))
    assert temp_dir.is_dir()
    return children, temp_dir


def _check_all_gone(code: int, children: dict[int, str], temp_dir: Path, out: Path) -> None:
    """Exit 0; nodes stopped first, then haproxy, then redis; nothing left; no temp dir."""
    output = _text(out)
    assert code == 0, output
    for pid, cmd in children.items():
        assert not _alive(pid), f"left running: {pid} {cmd}"
    assert not temp_dir.exists()
    order = [output.index(f"stopping {name}") for name in ("node1", "node2", "haproxy",
                                                             "redis-server")]
    assert order == sorted(order), output
    assert output.rstrip().endswith("stopped"), output


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
async def test_cluster_script_serves_through_haproxy_and_stops_everything(
    stop_signal: signal.Signals,
) -> None:
    """scripts/cluster -n 2: redis, two nodes and haproxy with scripts/haproxy.cfg; the
    page and a cross-node room work through it; on SIGINT/SIGTERM the nodes drain (clients
    get 1001 through haproxy), then haproxy and redis stop; nothing it started is left, its
    temp dir is gone, and it exits 0."""
    port = free_port()
    with run_cluster("-n", "2", "--port", str(port), "--check-inter", "200ms") as (proc, out):
        await _wait_for_page(f"http://127.0.0.1:{port}/", proc, out)
        children, temp_dir = _what_it_started(proc, out, port)

        async with contextlib.AsyncExitStack() as stack:
            ws_url = f"ws://127.0.0.1:{port}"
            members = [await join(stack, ws_url) for _ in range(2)]
            assert len({m.node for m in members}) == 2
            await members[0].ws.send("across the local cluster")
            for member in members:
                assert await member.recv_chat() == "across the local cluster"

            proc.send_signal(stop_signal)
            for member in members:  # nodes drain before haproxy goes
                with pytest.raises(websockets.ConnectionClosed) as info:
                    while True:
                        await asyncio.wait_for(member.ws.recv(), 20)
                assert info.value.rcvd is not None and info.value.rcvd.code == 1001

        code = await asyncio.to_thread(proc.wait, 45)
        _check_all_gone(code, children, temp_dir, out)

def test_cluster_script_refuses_more_nodes_than_the_cfg_has() -> None:
    """-n above the cfg's server lines is refused with a clear message; nothing starts."""
    limit = len(re.findall(r'^\s*server\s+node\d+\s+"\$\{ROOMCAST_LB_NODE\d+\}"',
                           HAPROXY_CFG.read_text(), re.M))
    result = subprocess.run(
        [sys.executable, str(CLUSTER), "-n", str(limit + 1), "--port", str(free_port())],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert f"{limit} nodes" in result.stderr and "haproxy.cfg" in result.stderr
    assert result.stdout == ""


def test_cluster_script_reports_a_taken_port() -> None:
    """--port in use: a clear message and exit 1, before anything is started."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(CLUSTER), "-n", "1", "--port", str(port)],
            cwd=REPO, capture_output=True, text=True, timeout=30,
        )
    assert result.returncode == 1
    assert f"port {port}" in result.stderr and "in use" in result.stderr
    assert "redis-server" not in result.stdout
