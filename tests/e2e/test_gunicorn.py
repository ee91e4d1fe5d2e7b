"""A hub in a user's own aiohttp app, served by gunicorn with aiohttp's uvloop worker.

Real gunicorn, two workers (each a node), a real redis-server between them, real
WebSocket clients: every worker runs on uvloop, and a member's message reaches the
members on the other worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
import websockets

from tests.e2e.procs import REPO, free_port, wait_for_port
from tests.redis_server import RedisServer

pytest.importorskip("gunicorn", reason="gunicorn is a test dependency: pip install -e '.[test]'")
pytest.importorskip("uvloop", reason="the uvloop worker needs uvloop")

pytestmark = pytest.mark.timeout(90)

APP = "tests.e2e.apps.gunicorn_chat:make_app"


@pytest.fixture
def gunicorn() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """gunicorn with two uvloop workers on a free port, stopped (and, if it hangs,
    killed with its workers) when the test ends."""
    with RedisServer() as redis_server:
        port = free_port()
        cmd = [sys.executable, "-m", "gunicorn", APP, "--bind", f"127.0.0.1:{port}",
               "--workers", "2", "--worker-class", "aiohttp.GunicornUVLoopWebWorker",
               "--graceful-timeout", "5", "--log-level", "warning"]
        env = {**os.environ, "ROOMCAST_TEST_REDIS": redis_server.url}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
        try:
            wait_for_port(port, proc, timeout=30)
            yield port, proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)  # gunicorn and its workers
                    proc.wait(timeout=5)


async def _members(port: int, want_workers: int) -> list[tuple[int, websockets.ClientConnection]]:
    """Members of room ``lobby``, connected in concurrent waves until they sit on
    ``want_workers`` different workers; each with the pid its worker announced."""
    members: list[tuple[int, websockets.ClientConnection]] = []

    async def one() -> tuple[int, websockets.ClientConnection]:
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws?room=lobby")
        hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert hello["loop"].startswith("uvloop"), f"a worker runs on {hello['loop']}"
        return int(hello["pid"]), ws

    for _ in range(20):
        members += await asyncio.gather(*(one() for _ in range(8)))
        if len({pid for pid, _ in members}) >= want_workers:
            return members
    for _, ws in members:
        await ws.close()
    raise AssertionError(f"160 connections all went to {len({p for p, _ in members})} worker(s)")


def test_workers_of_gunicorns_uvloop_worker_share_rooms_through_redis(
    gunicorn: tuple[int, subprocess.Popen[bytes]],
) -> None:
    port, _ = gunicorn

    async def main() -> None:
        members = await _members(port, want_workers=2)
        try:
            by_worker: dict[int, websockets.ClientConnection] = {}
            for pid, ws in members:
                by_worker.setdefault(pid, ws)
            # The room is joined on every worker before on_open ran; a message from a
            # member on each worker reaches every member, on both workers, once.
            for text, sender in zip(("from one", "from two"), by_worker.values(), strict=False):
                await sender.send(text)
                got = await asyncio.wait_for(
                    asyncio.gather(*(ws.recv() for _, ws in members)), 15)
                assert got == [text] * len(members)
        finally:
            await asyncio.wait_for(
                asyncio.gather(*(ws.close() for _, ws in members), return_exceptions=True),
                15)

    asyncio.run(main())
