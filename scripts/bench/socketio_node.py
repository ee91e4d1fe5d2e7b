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
import asyncio
import json
import time
from urllib.parse import parse_qs

import _gcprobe
import socketio
from aiohttp import web


class Sink:
    """What the sink route received, and when the count last moved.

    Every /stats call arms a 5 ms timer that notes when the count moves, until it has
    not moved for 2 s (a timer always on would cost the idle node 3% CPU here). The
    timer also keeps ``lag``: how late it ran at worst since /stats was last read,
    i.e. the longest the event loop kept everything else (other sockets, Redis
    replies) waiting.
    """

    enabled = False
    messages = 0
    last = 0.0
    lag = 0.0
    _due = 0.0
    _seen = 0
    _still = 0
    _armed = False

    @classmethod
    def arm(cls) -> None:
        cls._still = 0
        if not cls._armed:
            cls._armed = True
            cls._due = time.perf_counter() + 0.005
            asyncio.get_running_loop().call_later(0.005, cls._tick)

    @classmethod
    def _tick(cls) -> None:
        now = time.perf_counter()
        cls.lag = max(cls.lag, now - cls._due)
        cls._due = now + 0.005
        if cls.messages != cls._seen:
            cls._seen = cls.messages
            cls.last = now
            cls._still = 0
        else:
            cls._still += 1
        if cls._still < 400:
            asyncio.get_running_loop().call_later(0.005, cls._tick)
        else:
            cls._armed = False


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
