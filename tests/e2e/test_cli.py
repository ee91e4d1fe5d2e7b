"""`roomcast serve` as a user runs it: a real process, real sockets, real signals."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import websockets

from roomcast.node.client import Client, Joined, Position
from tests.e2e.procs import REPO, NodeProcess


async def test_serve_runs_chat_demo_and_drains_on_sigterm() -> None:
    """The default node serves the page and chat; SIGTERM closes clients with 1001, exit 0."""
    with NodeProcess() as node:
        async with aiohttp.ClientSession() as session, session.get(node.url + "/") as resp:
            assert resp.status == 200
            assert "roomcast chat" in await resp.text()
        async with websockets.connect(node.ws_url + "/chat?room=lobby&name=ann") as ws:
            notice = json.loads(await ws.recv())
            assert notice == {"type": "join", "name": "ann", "members": 1}
            await ws.send("hi")
            assert await ws.recv() == "hi"
            code = await asyncio.to_thread(node.terminate)
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        assert code == 0, node.log()


async def test_flags_and_environment_configure_the_node() -> None:
    """--max-message-size and ROOMCAST_MAX_CONNECTIONS reach the hub."""
    with NodeProcess("--max-message-size", "100", env={"ROOMCAST_MAX_CONNECTIONS": "1"}) as node:
        async with websockets.connect(node.ws_url + "/echo") as ws:
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(node.ws_url + "/echo"):
                    pass
            assert refused.value.response.status_code == 503
            await ws.send("x" * 101)
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--port", "http"], {}, "--port"),
        (["--max-connections", "0"], {}, "--max-connections"),
        ([], {"ROOMCAST_PING_INTERVAL_MS": "-5"}, "ROOMCAST_PING_INTERVAL_MS"),
        (["--compression", "maybe"], {}, "--compression"),
        (["--allowed-origin", "example.com"], {}, "allowed origin"),
        (["--redis", "http://x"], {}, "broker URL"),
        (["--loop", "trio"], {}, "--loop"),
        ([], {"ROOMCAST_LOOP": "tokio"}, "ROOMCAST_LOOP"),
        (["--history-size", "-1"], {}, "--history-size"),
        ([], {"ROOMCAST_HISTORY_TTL": "0"}, "ROOMCAST_HISTORY_TTL"),
        (["--recovery-max", "0"], {}, "--recovery-max"),
    ],
)
def test_invalid_settings_stop_startup_naming_the_setting(
    args: list[str], env: dict[str, str], named: str
) -> None:
    """A bad value exits with status 2 and a message that names the setting."""
    result = subprocess.run(
        [sys.executable, "-m", "roomcast.node.cli", "serve", *args], cwd=REPO,
        env={**os.environ, **env}, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert named in result.stderr


def test_help_documents_every_setting_with_its_variable() -> None:
    """serve --help names each ROOMCAST_* variable."""
    result = subprocess.run(
        [sys.executable, "-m", "roomcast.node.cli", "serve", "--help"], cwd=REPO,
        capture_output=True, text=True, timeout=30,
    )
    for var in ("ROOMCAST_PORT", "ROOMCAST_MAX_CONNECTIONS", "ROOMCAST_ALLOWED_ORIGINS",
                "ROOMCAST_COMPRESSION", "ROOMCAST_PONG_TIMEOUT_MS", "ROOMCAST_REDIS",
                "ROOMCAST_HISTORY_SIZE", "ROOMCAST_HISTORY_TTL", "ROOMCAST_RECOVERY_MAX"):
        assert var in result.stdout


def test_unreachable_redis_fails_fast_with_a_clear_message() -> None:
    """A node whose Redis cannot be reached exits 1 naming the URL, password hidden."""
    from tests.e2e.procs import free_port

    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    result = subprocess.run(
        [sys.executable, "-m", "roomcast.node.cli", "serve", "--port", "0", "--redis", url],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert "Redis is unreachable" in result.stderr
    assert "hunter2" not in result.stderr


def test_empty_api_key_is_refused() -> None:
    """An empty API key is a configuration error, not an API without a key."""
    result = subprocess.run(
        [sys.executable, "-m", "roomcast.node.cli", "serve", "--check"], cwd=REPO,
        env={**os.environ, "ROOMCAST_API_KEY": ""}, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "ROOMCAST_API_KEY" in result.stderr


@pytest.fixture
def without_uvloop(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import uvloop`` fails, as where it is not installed."""
    package = tmp_path / "uvloop"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise ImportError('uvloop is hidden by the test', name='uvloop')\n")
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path}


async def test_nodes_run_on_the_loop_they_are_given(node_loop: str) -> None:
    """--loop asyncio and --loop uvloop: the node says at start which loop runs, and serves."""
    with NodeProcess() as node:
        assert node.loop == node_loop
        assert f"event loop: {node_loop}" in node.log()
        async with websockets.connect(node.ws_url + "/echo") as ws:
            await ws.send("on " + node_loop)
            assert await ws.recv() == "on " + node_loop


def test_loop_uvloop_without_uvloop_says_what_to_install(without_uvloop: dict[str, str]) -> None:
    """--loop uvloop where uvloop cannot be imported exits 2 naming the extra to install."""
    for args, env in ((["--loop", "uvloop"], {}), ([], {"ROOMCAST_LOOP": "uvloop"})):
        result = subprocess.run(
            [sys.executable, "-m", "roomcast.node.cli", "serve", "--check", *args], cwd=REPO,
            env={**os.environ, **without_uvloop, **env}, capture_output=True, text=True,
            timeout=30,
        )
        assert result.returncode == 2, result.stderr
        assert "pip install 'roomcast[uvloop]'" in result.stderr
        assert ("--loop" if args else "ROOMCAST_LOOP") in result.stderr


def test_auto_loop_is_uvloop_when_installed_else_asyncio(
    without_uvloop: dict[str, str],
) -> None:
    """The default (--loop auto) runs on uvloop where it is installed, else on asyncio."""
    with NodeProcess(loop="auto") as node:
        assert "event loop: uvloop" in node.log(), node.log()
    with NodeProcess(env=without_uvloop) as node:
        assert "event loop: asyncio" in node.log(), node.log()


async def _metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        text = await resp.text()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match is not None, f"{name} not in /metrics"
    return float(match.group(1))


async def test_history_flags_reach_the_node() -> None:
    """--history-size/--history-ttl/--recovery-max configure the running node: /metrics
    shows them, a roomcast.v1 chat client gets positions and recovers what it missed."""
    with NodeProcess("--history-size", "7", "--history-ttl", "90",
                     "--recovery-max", "3") as node:
        assert await _metric(node.url, "roomcast_history_size") == 7
        assert await _metric(node.url, "roomcast_history_ttl_seconds") == 90
        assert await _metric(node.url, "roomcast_recovery_max") == 3
        chat = node.ws_url + "/chat?room=lobby&name="
        async with Client(chat + "ann") as ann:
            joined = await ann.wait_for(Joined, room="lobby")
            assert joined.position is not None and joined.recovered is None
            start = joined.position
            own = await ann.next_message()  # her join notice, the room's first message
            assert own.position == Position(start.epoch, start.offset + 1)
            async with websockets.connect(chat + "bob") as bob:  # raw: no positions
                await bob.send("one")
                await bob.send("two")
                seen = {}
                while "two" not in seen:
                    message = await ann.next_message()
                    seen[message.data] = message.position
                # one message after "one": recovered
                async with Client(chat + "cy", positions={"lobby": tuple(seen["one"])}) as cy:
                    joined = await cy.wait_for(Joined, room="lobby")
                    assert (joined.recovered, joined.replayed) == (True, 1), joined
                    assert joined.position == seen["two"]
                # four or more after the room's start: past --recovery-max 3
                async with Client(chat + "di", positions={"lobby": tuple(start)}) as di:
                    joined = await di.wait_for(Joined, room="lobby")
                    assert (joined.recovered, joined.reason) == (False, "limit"), joined


async def test_history_size_zero_runs_rooms_without_history() -> None:
    """--history-size 0: the chat's rooms keep no history; a v1 client gets no positions."""
    with NodeProcess("--history-size", "0") as node:
        assert await _metric(node.url, "roomcast_history_size") == 0
        async with Client(node.ws_url + "/chat?room=lobby&name=ann") as ann:
            joined = await ann.wait_for(Joined, room="lobby")
            assert joined.position is None
            assert (await ann.next_message()).position is None
