"""The peer for benchmarks: python-socketio on aiohttp with AsyncRedisManager.

The same room fan-out as roomcast_node.py: every client joins the room named in the
query (``?room=R``, default ``fanout``) when it connects; a ``msg`` event is emitted to
that room on every node through Redis. Written as its documentation shows, nothing
tuned, so the numbers are what a user of it gets.
"""

from __future__ import annotations

import argparse
import json
import time
from urllib.parse import parse_qs

import _gcprobe
import socketio
from aiohttp import web


def main() -> None:
    _gcprobe.install()
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--ping-interval", type=float, default=25.0)
    args = parser.parse_args()
    manager = socketio.AsyncRedisManager(args.redis, channel="bench-socketio")
    sio = socketio.AsyncServer(
        async_mode="aiohttp", client_manager=manager, ping_interval=args.ping_interval,
        ping_timeout=max(args.ping_interval, 20.0), cors_allowed_origins="*",
    )
    rooms: dict[str, str] = {}
    timings: list[float] = []

    @sio.event
    async def connect(sid: str, environ: dict[str, object], auth: object = None) -> None:
        query = parse_qs(str(environ.get("QUERY_STRING", "")))
        room = query.get("room", ["fanout"])[0]
        rooms[sid] = room
        await sio.enter_room(sid, room)

    @sio.event
    async def disconnect(sid: str, *_: object) -> None:
        rooms.pop(sid, None)

    @sio.on("msg")
    async def msg(sid: str, data: str) -> None:
        start = time.perf_counter()
        await sio.emit("msg", data, room=rooms.get(sid, "fanout"))
        timings.append(time.perf_counter() - start)

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"broadcast_seconds": timings[-50:],
                                  "connections": len(rooms)}, dumps=json.dumps)

    app = web.Application()
    sio.attach(app)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None,
                backlog=4096)


if __name__ == "__main__":
    main()
