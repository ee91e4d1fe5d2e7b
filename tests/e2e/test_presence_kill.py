"""Presence events across real `roomcast serve` processes: a SIGKILLed node's users leave.

Two hubs run in the test process (each with a member in the room, watching
``on_presence``) and one `roomcast serve` process with tokens, all on a private
redis-server with a short presence TTL. A user joins the room on the process and is seen
joining once on each hub; the process is SIGKILLed, and within the presence TTL (plus
one heartbeat) the hub whose heartbeat sweeps it raises the user's leave and publishes
it for the other: each hub sees it exactly once, with the user's info.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator

import aiohttp
import jwt
import pytest
from aiohttp import web

from roomcast.broker import RedisBroker
from roomcast.node import Connection, EventHandler, Hub
from roomcast.shared.presence import PresenceEvent
from tests.e2e.procs import NodeProcess
from tests.redis_server import RedisServer

Serve = Callable[[web.Application], Awaitable[str]]

SECRET = "e2e-presence-secret-0123456789abcdef"
HEARTBEAT = 0.5
TTL = 3.0


@pytest.fixture
def redis_url() -> Iterator[str]:
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.cleanup()


async def _observer(serve: Serve, url: str, session: aiohttp.ClientSession
                    ) -> tuple[Hub, asyncio.Queue[PresenceEvent], aiohttp.ClientWebSocketResponse]:
    hub = Hub(broker=RedisBroker(url, heartbeat_interval=HEARTBEAT, presence_ttl=TTL))
    events: asyncio.Queue[PresenceEvent] = asyncio.Queue()
    hub.on_presence(events.put_nowait)
    opened: asyncio.Queue[Connection] = asyncio.Queue()
    app = web.Application()
    hub.attach(app)
    app.router.add_get("/ws", hub.route(EventHandler(on_open=opened.put)))
    base = await serve(app)
    ws = await session.ws_connect(base.replace("http", "ws") + "/ws")
    conn = await asyncio.wait_for(opened.get(), 10)
    await hub.join_room(conn, "r")
    event = await asyncio.wait_for(events.get(), 10)  # its own member's join
    assert (event.kind, event.connection) == ("join", conn.id)
    return hub, events, ws


async def test_sigkilled_node_users_leave_once_on_every_node(
    serve: Serve, redis_url: str
) -> None:
    token = jwt.encode({"sub": "ann", "exp": int(time.time()) + 300,
                        "info": {"name": "Ann"}}, SECRET, algorithm="HS256")
    async with aiohttp.ClientSession() as session:
        a, a_events, a_ws = await _observer(serve, redis_url, session)
        b, b_events, b_ws = await _observer(serve, redis_url, session)
        assert (await asyncio.wait_for(a_events.get(), 10)).kind == "join"  # b's member
        node = NodeProcess("--redis", redis_url, "--heartbeat-ms", str(int(HEARTBEAT * 1000)),
                           "--presence-ttl-ms", str(int(TTL * 1000)),
                           env={"ROOMCAST_JWT_SECRET": SECRET})
        # started in a thread: the hubs here must go on heartbeating meanwhile
        await asyncio.to_thread(node.start)
        try:
            async with session.ws_connect(node.ws_url + f"/chat?room=r&token={token}") as ann:
                for events in (a_events, b_events):
                    event = await asyncio.wait_for(events.get(), 15)
                    assert (event.kind, event.user_id, dict(event.info)) == (
                        "join", "ann", {"name": "Ann"})
                joined = event.connection
                assert {p.user_id for p in await a.room_presence("r")} == {None, "ann"}
                killed_at = time.monotonic()
                await asyncio.to_thread(node.kill)
                for events in (a_events, b_events):
                    event = await asyncio.wait_for(events.get(), 15)
                    assert (event.kind, event.connection, event.user_id, dict(event.info)) \
                        == ("leave", joined, "ann", {"name": "Ann"})
                waited = time.monotonic() - killed_at
                assert not ann.closed or ann.close_code is not None
        finally:
            await asyncio.to_thread(node.kill)
        # once: nothing else came, and the room is down to the two observers
        await asyncio.sleep(3 * HEARTBEAT)  # further sweeps would have come by now
        assert a_events.empty() and b_events.empty()
        assert {p.user_id for p in await b.room_presence("r")} == {None}
        print(f"leave seen {waited:.2f} s after SIGKILL (presence TTL {TTL} s)")
        await a_ws.close()
        await b_ws.close()
        await a.close()
        await b.close()
