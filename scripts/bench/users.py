"""Users and presence across three nodes on a private redis-server: what they cost.

Three hubs run in this process (each on its own real socket, RedisBroker on one
redis-server), with a test authenticator that takes the user from ``?user=``.

- joins: ``--members`` clients (users u0, u1, ...) open a socket on node i % 3 and join
  one room at the upgrade; reported: joins per second, and the presence events every
  node raised (each node should see every join made after it had a member).
- send_to_user: one user with a tab on each node; ``--messages`` sends from node 0, one
  at a time; reported: p50/p99 until the last tab has it. The same for
  ``broadcast_to_room`` to a room of those three tabs, for comparison.

    python scripts/bench/users.py [--members 300] [--messages 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import _lib  # noqa: F401  (puts the repository on sys.path)
import aiohttp
from aiohttp import web

from roomcast.broker import RedisBroker
from roomcast.node import EventHandler, Hub
from roomcast.node.auth import Auth, Identity
from roomcast.shared.presence import PresenceEvent
from tests.redis_server import RedisServer, free_port


class QueryUser:
    async def authenticate(self, request: web.Request) -> Identity | None:
        user = request.query.get("user")
        return None if user is None else Identity(user, {"name": user})


async def _node(url: str, events: list[PresenceEvent], seen: asyncio.Queue[None]
                ) -> tuple[Hub, str, web.AppRunner]:
    hub = Hub(broker=RedisBroker(url), auth=Auth(QueryUser()))

    def raised(event: PresenceEvent) -> None:
        events.append(event)
        seen.put_nowait(None)

    hub.on_presence(raised)
    app = web.Application()
    hub.attach(app)

    async def ws(request: web.Request) -> web.StreamResponse:
        return await hub.upgrade(request, EventHandler(), rooms=request.query.getall("room", []))

    app.router.add_get("/ws", ws)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return hub, f"ws://127.0.0.1:{port}/ws", runner


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _latency(send: Any, tabs: list[aiohttp.ClientWebSocketResponse], count: int
                   ) -> list[float]:
    out = []
    for i in range(count):
        start = time.perf_counter()
        await send(f"m{i}")
        for tab in tabs:
            while (await tab.receive_str(timeout=10)) != f"m{i}":
                pass
        out.append(time.perf_counter() - start)
    return out


async def run(members: int, messages: int) -> None:
    server = RedisServer().start()
    runners: list[web.AppRunner] = []
    hubs: list[Hub] = []
    try:
        events: list[list[PresenceEvent]] = [[], [], []]
        seen: asyncio.Queue[None] = asyncio.Queue()
        urls = []
        for i in range(3):
            hub, url, runner = await _node(server.url, events[i], seen)
            hubs.append(hub)
            urls.append(url)
            runners.append(runner)
        # limit=0: aiohttp's client holds at most 100 sockets by default
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            start = time.perf_counter()
            sockets = [await http.ws_connect(f"{urls[i % 3]}?user=u{i}&room=lobby")
                       for i in range(members)]
            took = time.perf_counter() - start
            async with asyncio.timeout(30):
                for _ in range(3 * members - 3):  # node i sees joins from member i on
                    await seen.get()
            print(f"joins: {members} users over 3 nodes in {took:.2f} s, "
                  f"{members / took:.0f} joins/s (upgrade + user room + room + presence); "
                  f"presence events raised per node: {[len(e) for e in events]}")
            tabs = [await http.ws_connect(f"{urls[i]}?user=ann&room=trio") for i in range(3)]
            by_user = await _latency(lambda m: hubs[0].send_to_user("ann", m), tabs, messages)
            by_room = await _latency(lambda m: hubs[0].broadcast_to_room("trio", m), tabs,
                                     messages)
            for name, values in (("send_to_user", by_user), ("broadcast_to_room", by_room)):
                print(f"{name}: 3 tabs on 3 nodes, {messages} messages: p50 "
                      f"{_pct(values, 0.5):.2f} ms, p99 {_pct(values, 0.99):.2f} ms, mean "
                      f"{statistics.mean(values) * 1000:.2f} ms")
            for ws in [*sockets, *tabs]:
                await ws.close()
    finally:
        for hub in hubs:
            await hub.close()
        for runner in runners:
            await runner.cleanup()
        server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=300)
    parser.add_argument("--messages", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(run(args.members, args.messages))


if __name__ == "__main__":
    main()

