"""Running roomcast like production: health, readiness, graceful stop, metrics of workers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection
from websockets.protocol import State

from roomcast.broker.publisher import Publisher
from tests.e2e.procs import NodeProcess
from tests.redis_server import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


async def until(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


async def status(url: str) -> int:
    """The HTTP status of a GET on a fresh connection."""
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status


async def scrape(url: str) -> tuple[str, dict[str, float]]:
    """One scrape on a new TCP connection: the node that answered, and unlabelled samples."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session, \
            session.get(url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
        node = resp.headers["X-Roomcast-Node"]
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }
    return node, samples


async def healthz(url: str) -> dict[str, Any]:
    """The JSON details of /healthz (which must answer 200)."""
    async with aiohttp.ClientSession() as session, session.get(url + "/healthz") as resp:
        assert resp.status == 200
        details: dict[str, Any] = await resp.json()
        return details


async def broker_state_metric(url: str) -> dict[str, float]:
    """roomcast_broker_state by state label, from one scrape."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        text = await resp.text()
    return {s.labels["state"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "roomcast_broker_state"}


async def test_readyz_stays_ready_while_redis_is_down_and_healthz_reports_it(
    redis_server: RedisServer,
) -> None:
    """Redis killed: /readyz stays 200 (the node still serves its local rooms, and an
    outage must not mark every node down at once), a local room keeps working, and
    /healthz (200 throughout) and the roomcast_broker_state metric report the broker
    disconnected, then connected again after Redis is back, with the time of the change.
    (Before issues 12/16, /readyz answered 503 during an outage; this test pinned that
    and now pins the opposite.)"""
    with NodeProcess("--redis", redis_server.url) as node:
        assert await status(node.url + "/readyz") == 200
        first = await healthz(node.url)
        assert first["ready"] is True and first["broker"]["state"] == "connected"
        assert first["node"] and first["broker"]["connected"] is True

        redis_server.kill()

        async def broker_down() -> bool:
            return (await healthz(node.url))["broker"]["state"] == "disconnected"

        await until(broker_down, 10, "/healthz reports the broker disconnected")
        assert await broker_state_metric(node.url) == {
            "connected": 0, "degraded": 0, "disconnected": 1}
        down = await healthz(node.url)
        assert down["broker"]["since"] > first["broker"]["since"]
        assert await status(node.url + "/readyz") == 200
        # a new client is served, and its local room works
        async with websockets.connect(f"{node.ws_url}/chat?room=local&name=a") as a:
            notice = json.loads(await asyncio.wait_for(a.recv(), 10))
            assert notice["type"] == "join" and notice["members"] is None
            await a.send("still here")
            while (data := await asyncio.wait_for(a.recv(), 10)) != "still here":
                assert json.loads(data)["type"] == "error", data  # not delivered elsewhere

        redis_server.start()

        async def broker_back() -> bool:
            return (await healthz(node.url))["broker"]["state"] == "connected"

        await until(broker_back, 15, "/healthz reports the broker connected again")
        assert await status(node.url + "/readyz") == 200
        assert (await broker_state_metric(node.url))["connected"] == 1
        assert node.proc is not None and node.proc.poll() is None


async def test_sigterm_fails_readiness_first_then_closes_clients_after_the_notice(
    redis_server: RedisServer,
) -> None:
    """--drain-notice-seconds: on SIGTERM /readyz answers 503 at once while clients stay
    connected and served; only after the notice do they get 1001; the exit is 0. A
    second SIGTERM skips what is left of the notice."""
    notice = 30.0
    node = NodeProcess("--redis", redis_server.url, "--drain-notice-seconds", str(notice))
    with node:
        async with websockets.connect(f"{node.ws_url}/chat?room=d&name=a") as ws:
            await asyncio.wait_for(ws.recv(), 5)  # its join notice
            assert node.proc is not None
            node.proc.send_signal(signal.SIGTERM)

            async def not_ready() -> bool:
                return await status(node.url + "/readyz") == 503

            await until(not_ready, 5, "/readyz 503 right after SIGTERM")
            details = await healthz(node.url)
            assert details["ready"] is False and details["readiness"] == "draining"
            assert details["draining_since"] is not None
            await ws.send("during the notice")  # still served
            assert await asyncio.wait_for(ws.recv(), 5) == "during the notice"

            node.proc.send_signal(signal.SIGTERM)  # do not wait out the 30 s
            with pytest.raises(websockets.ConnectionClosed) as info:
                while True:
                    await asyncio.wait_for(ws.recv(), notice / 2)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        code = await asyncio.to_thread(node.proc.wait, 15)
        assert code == 0, node.log()


async def test_sigterm_without_notice_drains_at_once(redis_server: RedisServer) -> None:
    """The default notice is 0: SIGTERM closes clients with 1001 without waiting."""
    with NodeProcess("--redis", redis_server.url) as node:
        async with websockets.connect(f"{node.ws_url}/echo") as ws:
            assert node.proc is not None
            node.proc.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        assert await asyncio.to_thread(node.proc.wait, 15) == 0


async def test_sigterm_closes_1001_withdraws_presence_and_exits_0(
    redis_server: RedisServer,
) -> None:
    """SIGTERM: clients get 1001, presence is gone from Redis at once (not after the TTL),
    exit 0; every log line of the node is a JSON object naming the node."""
    ttl_s = 30.0
    node = NodeProcess("--redis", redis_server.url, "--presence-ttl-ms", str(int(ttl_s * 1000)),
                       "--log-format", "json", "--log-level", "DEBUG")
    with node:
        async with Publisher(redis_server.url, presence_ttl=ttl_s) as pub, \
                websockets.connect(f"{node.ws_url}/chat?room=ops&name=a") as a, \
                websockets.connect(f"{node.ws_url}/chat?room=ops&name=b") as b:
            ids = set()
            for ws in (a, b):
                assert ws.response is not None
                ids.add(ws.response.headers["X-Roomcast-Connection"])
                node_id = ws.response.headers["X-Roomcast-Node"]

            async def both_present() -> bool:
                return await pub.room_members("ops") == ids

            await until(both_present, 5, "both members in Redis presence")
            assert node.proc is not None
            node.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            for ws in (a, b):
                with pytest.raises(websockets.ConnectionClosed) as info:
                    while True:
                        await asyncio.wait_for(ws.recv(), 10)
                assert info.value.rcvd is not None and info.value.rcvd.code == 1001
            code = await asyncio.to_thread(node.proc.wait, 15)
            assert code == 0
            # Withdrawn by the node itself before it exited: no waiting for the TTL.
            assert await pub.room_members("ops") == set()
            assert time.monotonic() - signalled < ttl_s / 3

    entries = []
    for line in node.log().splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
        else:  # only aiohttp's banner is printed rather than logged
            assert "Running on" in line or "CTRL+C" in line or not line.strip(), line
    assert any(e["msg"] == f"node {node_id} started" and e["node"] == node_id for e in entries)
    opened = {e["conn"] for e in entries if e["msg"].startswith("opened ")}
    assert opened == ids
    assert all(e["node"] == node_id for e in entries if e["logger"] == "roomcast.node")


async def test_workers_report_cluster_totals_on_every_scrape(redis_server: RedisServer) -> None:
    """--workers 2: any worker's /metrics has the connection total of both; counters of a
    killed worker stay in the totals, its gauges leave them; the metrics dir is removed."""
    node = NodeProcess("--workers", "2", "--redis", redis_server.url)
    clients: list[ClientConnection] = []
    with node:
        try:
            by_node: dict[str, list[ClientConnection]] = {}
            deadline = time.monotonic() + 20
            while len(by_node) < 2 or min(len(c) for c in by_node.values()) < 2:
                assert time.monotonic() < deadline, f"connections not spread: {by_node}"
                ws = await websockets.connect(f"{node.ws_url}/echo")
                clients.append(ws)
                assert ws.response is not None
                by_node.setdefault(ws.response.headers["X-Roomcast-Node"], []).append(ws)
            total = len(clients)
            for ws in clients:
                await ws.send("x")
                assert await asyncio.wait_for(ws.recv(), 5) == "x"

            answered: set[str] = set()

            async def totals_right() -> bool:
                who, samples = await scrape(node.url)
                answered.add(who)
                return (samples["roomcast_connections"] == total
                        and samples["roomcast_messages_received_total"] == total)

            await until(totals_right, 10, f"metrics show {total} connections and messages")
            for _ in range(8):
                who, samples = await scrape(node.url)
                answered.add(who)
                assert samples["roomcast_connections"] == total, (who, samples)
                assert samples["roomcast_messages_received_total"] == total
                assert samples["roomcast_connections_opened_total"] == total

            async def both_answered() -> bool:
                return await totals_right() and answered == set(by_node)

            await until(both_answered, 10, "scrapes answered by both workers")

            # SIGKILL one worker: its connections leave the gauge, its counts stay.
            # The latest pid of each worker slot (a worker the supervisor replaced
            # appears twice in its log).
            latest = dict(re.findall(r"worker (\d) started \(pid (\d+)\)", node.log()))
            pids = [int(p) for p in latest.values()]
            assert len(pids) == 2, node.log()
            os.kill(pids[0], signal.SIGKILL)

            async def one_node_gone() -> bool:
                return any(all(ws.state is State.CLOSED for ws in members)
                           for members in by_node.values())

            await until(one_node_gone, 10, "the killed worker's clients disconnected")
            survivors = sum(1 for ws in clients if ws.state is State.OPEN)

            async def gauge_dropped() -> bool:
                _, samples = await scrape(node.url)
                assert samples["roomcast_messages_received_total"] == total
                return samples["roomcast_connections"] == survivors

            await until(gauge_dropped, 10, f"metrics show {survivors} live connections")
        finally:
            for ws in clients:
                await ws.close()
        match = re.search(r"workers share metrics through (\S+)", node.log())
        assert match is not None
        metrics_dir = Path(match.group(1))
        assert await asyncio.to_thread(metrics_dir.is_dir)
        assert await asyncio.to_thread(node.terminate) == 0
        assert not await asyncio.to_thread(metrics_dir.exists)
