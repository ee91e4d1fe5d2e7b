"""The minimal reference node of PERFORMANCE.md: aiohttp + Redis pub/sub, nothing else.

One room, frame bytes encoded once per message, one transport write per member per
message, one Redis publish per message. No hub, no envelope validation, no buffers.
It is the yardstick roomcast's node is measured against, not something to deploy.
GET /stats returns, per message received here, the seconds its local write loop took.

With ``--sink``, /sink is a WebSocket whose receive loop only counts the messages (no
room, no broadcast), for the inbound benchmark; /stats then also gives that count
(``sink_messages``), when it last moved (``sink_last``, ``time.perf_counter``) and the
worst event-loop lag since the last read (``sink_lag``, seconds): see ``Sink``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import AsyncIterator

import _gcprobe
import redis.asyncio as redis
from _sink import Sink
from aiohttp import WSMsgType, web

CHANNEL = "reference:room"


def frame(payload: bytes, opcode: int) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


def main() -> None:
    _gcprobe.install()
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--ping-interval", type=float, default=0.0,
                        help="aiohttp heartbeat seconds (0: none, aiohttp's default)")
    parser.add_argument("--sink", action="store_true",
                        help="serve /sink, whose receive loop only counts messages")
    args = parser.parse_args()
    members: set[asyncio.Transport] = set()
    me = os.urandom(4)
    client = redis.from_url(args.redis)
    timings: list[float] = []

    def deliver(data: bytes) -> None:
        for transport in members:
            transport.write(data)

    async def listen(app: web.Application) -> AsyncIterator[None]:
        pubsub = client.pubsub()
        await pubsub.subscribe(CHANNEL)

        async def loop() -> None:
            async for msg in pubsub.listen():
                data = msg.get("data")
                if msg["type"] == "message" and isinstance(data, bytes) and data[:4] != me:
                    deliver(data[4:])

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        await client.aclose()

    async def bench(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=args.ping_interval or None)
        await ws.prepare(request)
        transport = request.transport
        assert transport is not None
        members.add(transport)  # type: ignore[arg-type]
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    raw = msg.data.encode() if msg.type is WSMsgType.TEXT else msg.data
                    data = frame(raw, 1 if msg.type is WSMsgType.TEXT else 2)
                    start = time.perf_counter()
                    deliver(data)
                    timings.append(time.perf_counter() - start)
                    await client.publish(CHANNEL, me + data)
        finally:
            members.discard(transport)  # type: ignore[arg-type]
        return ws

    async def sink_route(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=args.ping_interval or None)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                Sink.messages += 1
        return ws

    async def stats(_: web.Request) -> web.Response:
        lag, Sink.lag = Sink.lag, 0.0
        if Sink.enabled:
            Sink.arm()
        return web.json_response({"broadcast_seconds": timings[-50:],
                                  "connections": len(members),
                                  "sink_messages": Sink.messages,
                                  "sink_last": Sink.last, "sink_lag": lag})

    app = web.Application()
    app.cleanup_ctx.append(listen)
    app.router.add_get("/bench", bench)
    app.router.add_get("/stats", stats)
    if args.sink:
        Sink.enabled = True
        app.router.add_get("/sink", sink_route)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None,
                backlog=4096)


if __name__ == "__main__":
    main()
