"""An aiohttp application with a roomcast hub, as a user runs it under gunicorn.

``gunicorn tests.e2e.apps.gunicorn_chat:make_app --worker-class
aiohttp.GunicornUVLoopWebWorker --workers 2``: each worker is a node of its own, and the
workers reach each other through the Redis named by ``ROOMCAST_TEST_REDIS``.

- ``GET /ws?room=R``: joins room R; the first frame says which worker took it
  (``{"pid": ..., "loop": ...}``); what a member sends is broadcast to R.
- ``GET /loop``: the worker's pid and the module of its running event loop.
"""

from __future__ import annotations

import asyncio
import json
import os

from aiohttp import web

from roomcast.broker import create_broker
from roomcast.node import Connection, EventHandler, Hub, HubConfig, Message, get_hub


def _worker() -> dict[str, object]:
    return {"pid": os.getpid(), "loop": type(asyncio.get_running_loop()).__module__}


async def _on_open(conn: Connection) -> None:
    await conn.send(json.dumps(_worker()))


async def _on_message(conn: Connection, msg: Message) -> None:
    for room in conn.rooms:
        await conn.hub.broadcast_to_room(room, msg.data)


_CHAT = EventHandler(on_open=_on_open, on_message=_on_message)


async def _ws(request: web.Request) -> web.StreamResponse:
    return await get_hub(request).upgrade(request, _CHAT, rooms=[request.query["room"]])


async def _loop(request: web.Request) -> web.Response:
    return web.json_response(_worker())


async def make_app() -> web.Application:
    """The app factory gunicorn's aiohttp worker awaits (in the worker, on its loop)."""
    app = web.Application()
    Hub(HubConfig(), broker=create_broker(os.environ["ROOMCAST_TEST_REDIS"])).attach(app)
    app.router.add_get("/ws", _ws)
    app.router.add_get("/loop", _loop)
    return app
