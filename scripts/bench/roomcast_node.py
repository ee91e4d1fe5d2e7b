"""A roomcast node for benchmarks: /bench?room=R joins R; every message goes to R.

Written as a user would with the Hub API (no notices, no demo page), so benchmarks
measure the hub and broker, not the demo.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from broker import create_broker
from node import Connection, EventHandler, Hub, HubConfig, Message, get_hub


async def on_message(conn: Connection, msg: Message) -> None:
    hub = get_hub(conn.request)
    for room in conn.rooms:
        await hub.broadcast_to_room(room, msg.data)


HANDLER = EventHandler(on_message=on_message)


async def bench(request: web.Request) -> web.StreamResponse:
    return await get_hub(request).upgrade(request, HANDLER, rooms=[request.query["room"]])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--compression", action="store_true")
    args = parser.parse_args()
    config = HubConfig(max_connections=200_000, enable_compression=args.compression,
                       send_buffer_limit=16 * 1024 * 1024)
    app = web.Application()
    Hub(config, broker=create_broker(args.redis, prefix="bench")).attach(app)
    app.router.add_get("/bench", bench)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
