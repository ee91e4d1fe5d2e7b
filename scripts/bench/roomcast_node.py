"""A roomcast node for benchmarks: /bench?room=R joins R; every message goes to R.

Written as a user would with the Hub API (no notices, no demo page), so benchmarks
measure the hub and broker, not the demo. ``--redis ""`` runs one node with no broker.
GET /stats returns the hub's counters and, per broadcast made here, the seconds from
the broadcast call to the end of the write pass that sent it to the last local member.

With ``--sink``, /sink is a route whose handler only counts the messages it gets (no
room, no broadcast), for the inbound benchmark; /stats then also gives that count
(``sink_messages``), when it last moved (``sink_last``, ``time.perf_counter``) and the
worst event-loop lag since the last read (``sink_lag``, seconds): see ``Sink``.

``--write-delay-ms``/``--write-batch-bytes`` set write batching (``HubConfig``);
``--loop auto|asyncio|uvloop`` picks the event loop (``auto``, as ``roomcast serve``:
uvloop when it is installed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import _gcprobe
from _sink import Sink

from roomcast.broker import create_broker
from roomcast.node import Connection, EventHandler, Hub, HubConfig, Message, get_hub
from roomcast.node.cli import LOOPS, new_event_loop, resolve_loop

TIMINGS: list[float] = []
_STARTED: list[float] = []


async def on_message(conn: Connection, msg: Message) -> None:
    hub = conn.hub
    for room in conn.rooms:
        _STARTED.append(time.perf_counter())
        await hub.broadcast_to_room(room, msg.data)


HANDLER = EventHandler(on_message=on_message)


async def count_message(conn: Connection, msg: Message) -> None:
    Sink.messages += 1


SINK = EventHandler(on_message=count_message)


async def bench(request: web.Request) -> web.StreamResponse:
    return await get_hub(request).upgrade(request, HANDLER, rooms=[request.query["room"]])


async def stats(request: web.Request) -> web.Response:
    hub = get_hub(request)
    lag, Sink.lag = Sink.lag, 0.0
    if Sink.enabled:
        Sink.arm()
    return web.json_response({"broadcast_seconds": TIMINGS[-50:],
                              "connections": hub.connection_count,
                              "sink_messages": Sink.messages, "sink_last": Sink.last,
                              "sink_lag": lag, **hub.stats.as_dict()})


def instrument(hub: Hub) -> None:
    """Time broadcasts to the end of the write pass that follows them.

    The first local member of a broadcast schedules ``hub._flush_all`` for the end
    of the turn, so the next pass to end is the one that wrote to its last member.
    """
    flush_all = hub._flush_all

    def timed_flush_all() -> None:
        flush_all()
        if _STARTED:
            end = time.perf_counter()
            TIMINGS.extend(end - start for start in _STARTED)
            _STARTED.clear()

    hub._flush_all = timed_flush_all  # type: ignore[method-assign]


def main() -> None:
    _gcprobe.install()
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--compression", action="store_true")
    parser.add_argument("--ping-interval", type=float, default=30.0)
    parser.add_argument("--sink", action="store_true",
                        help="serve /sink, whose handler only counts messages")
    parser.add_argument("--write-delay-ms", type=int, default=0)
    parser.add_argument("--write-batch-bytes", type=int, default=64 * 1024)
    parser.add_argument("--loop", choices=LOOPS, default="auto")
    args = parser.parse_args()
    config = HubConfig(max_connections=200_000, enable_compression=args.compression,
                       send_buffer_limit=16 * 1024 * 1024,
                       ping_interval_ms=int(args.ping_interval * 1000),
                       write_delay_ms=args.write_delay_ms,
                       write_batch_bytes=args.write_batch_bytes)
    app = web.Application()
    hub = Hub(config, broker=create_broker(args.redis or None, prefix="bench"))
    instrument(hub)
    hub.attach(app)
    app.router.add_get("/bench", bench)
    app.router.add_get("/stats", stats)
    if args.sink:
        app.router.add_get("/sink", hub.route(SINK))
        Sink.enabled = True
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None,
                backlog=4096, loop=new_event_loop(resolve_loop(args.loop)))


if __name__ == "__main__":
    main()
