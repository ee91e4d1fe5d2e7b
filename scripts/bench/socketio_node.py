"""The peer for benchmarks: python-socketio on aiohttp with AsyncRedisManager.

The same room fan-out as roomcast_node.py: every client joins the room named in the
query (``?room=R``, default ``fanout``) when it connects; a ``msg`` event is emitted to
that room on every node through Redis. Written as its documentation shows, nothing
tuned, so the numbers are what a user of it gets.

With ``--sink``, a ``sink`` event has a handler that only counts (no emit), for the
inbound benchmark; /stats then also gives that count (``sink_messages``), when it
last moved (``sink_last``, ``time.perf_counter``) and the worst event-loop lag since
the last read (``sink_lag``, seconds): see ``Sink``.
"""

from __future__ import annotations

import argparse
import json
import time
from urllib.parse import parse_qs

import _gcprobe
import socketio
from _sink import Sink
from aiohttp import web


def main() -> None:
    _gcprobe.install()
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--ping-interval", type=float, default=25.0)
    parser.add_argument("--sink", action="store_true",
                        help="handle a 'sink' event that only counts")
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

    async def count_sink(sid: str, data: str) -> None:
        Sink.messages += 1

    async def stats(_: web.Request) -> web.Response:
        lag, Sink.lag = Sink.lag, 0.0
        if Sink.enabled:
            Sink.arm()
        return web.json_response({"broadcast_seconds": timings[-50:],
                                  "connections": len(rooms),
                                  "sink_messages": Sink.messages,
                                  "sink_last": Sink.last, "sink_lag": lag}, dumps=json.dumps)

    app = web.Application()
    sio.attach(app)
    app.router.add_get("/stats", stats)
    if args.sink:
        Sink.enabled = True
        sio.on("sink", count_sink)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None,
                backlog=4096)


if __name__ == "__main__":
    main()
