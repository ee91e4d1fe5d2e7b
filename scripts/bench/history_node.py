"""A roomcast node for the history benchmarks: /bench?room=R joins R; every message goes to R.

Like roomcast_node.py (the Hub API as a user writes it: no notices, no demo page), with
room history set by ``--history-size`` (0: off; every room otherwise) and
``--history-ttl``, and ``--recovery-max``. A client that offers ``roomcast.v1`` gets
framed messages with positions and may declare ``roomcast.since``; others get raw
messages. GET /stats returns the hub's counters.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from roomcast.broker import create_broker
from roomcast.node import Connection, EventHandler, Hub, HubConfig, Message, get_hub
from roomcast.shared.history import History, HistoryPolicy


async def on_message(conn: Connection, msg: Message) -> None:
    for room in conn.rooms:
        await conn.hub.broadcast_to_room(room, msg.data)


HANDLER = EventHandler(on_message=on_message)


async def bench(request: web.Request) -> web.StreamResponse:
    return await get_hub(request).upgrade(request, HANDLER, rooms=[request.query["room"]])


async def stats(request: web.Request) -> web.Response:
    hub = get_hub(request)
    return web.json_response({"connections": hub.connection_count, **hub.stats.as_dict()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--history-size", type=int, default=100)
    parser.add_argument("--history-ttl", type=float, default=300.0)
    parser.add_argument("--recovery-max", type=int, default=1000)
    parser.add_argument("--ping-interval", type=float, default=25.0)
    args = parser.parse_args()
    history = (HistoryPolicy(History(size=args.history_size, ttl=args.history_ttl))
               if args.history_size else None)
    config = HubConfig(max_connections=200_000, send_buffer_limit=16 * 1024 * 1024,
                       ping_interval_ms=int(args.ping_interval * 1000), history=history,
                       recovery_max=args.recovery_max)
    app = web.Application()
    hub = Hub(config, broker=create_broker(args.redis or None, prefix="bench"))
    hub.attach(app)
    app.router.add_get("/bench", bench)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None,
                backlog=4096)


if __name__ == "__main__":
    main()
