"""Guards on every route of the node app, found by enumerating its router.

The app is ``create_app`` (what ``roomcast serve`` runs) plus one route made with
``hub.route``, as an embedder would add it. Every route of its router must be in
exactly one of the tables below, and the tables are checked against behaviour (a
WebSocket route upgrades, nothing else does): a new WebSocket or /api route fails
``test_every_route_is_classified`` until it is added here, and from then on gets every
guard test below.

- WebSocket routes: a disallowed Origin gets 403; past max_connections, 503 with
  Retry-After; a message over max_message_size closes with 1009, one of exactly the
  limit is taken.
- /api routes: 401 without the key (or with a wrong one), 404 when no key is configured;
  the message routes answer 413 to a body over max_message_size and take one of
  exactly the limit. A full node (max_connections) still takes API calls.
- /healthz, /readyz, /metrics and the page need no key.
"""

from __future__ import annotations

import asyncio
import contextlib
import string
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final

import aiohttp
import pytest
import websockets
from aiohttp import web
from websockets.asyncio.client import ClientConnection

from roomcast.node import HUB, Connection, EventHandler, Hub, HubConfig, Message
from roomcast.node.app import NodeOptions, create_app
from roomcast.node.static_routes import VERSION

Serve = Callable[[web.Application], Awaitable[str]]

KEY: Final = "guard-key"
AUTH: Final = {"Authorization": f"Bearer {KEY}"}
EVIL: Final = "http://evil.example"
GOOD: Final = "https://good.example"
LIMIT: Final = 1024
ROOM: Final = "guarded"

WS_ROUTES: Final = {
    "/chat": "/chat?room=guarded&name=guard",
    "/echo": "/echo",
    "/custom": "/custom",  # made with hub.route, as an embedder would
}
"""Canonical path -> the URL (with query) a client opens."""
API_MESSAGE_ROUTES: Final = frozenset({
    ("POST", "/api/rooms/{room}/messages"),
    ("POST", "/api/connections/{conn_id}/messages"),
    ("POST", "/api/broadcast"),
    ("POST", "/api/users/{user}/messages"),
})
"""/api routes whose request body is a message (so max_message_size applies)."""
API_QUERY_ROUTES: Final = frozenset({
    ("GET", "/api/rooms/{room}"), ("HEAD", "/api/rooms/{room}"),
    ("GET", "/api/users/{user}"), ("HEAD", "/api/users/{user}"),
    ("DELETE", "/api/users/{user}/connections"),
})
"""/api routes that take no message."""
OPEN_ROUTES: Final = frozenset(
    (method, path) for path in (
        "/", "/healthz", "/readyz", "/metrics", "/roomcast.js", "/roomcast.d.ts",
        f"/roomcast-{VERSION}.js", f"/roomcast-{VERSION}.d.ts")
    for method in ("GET", "HEAD")
)
"""Plain HTTP routes that need no key."""
OTHER_VERSION_ROUTES: Final = frozenset(
    (method, path) for path in ("/roomcast-{version}.js", "/roomcast-{version}.d.ts")
    for method in ("GET", "HEAD")
)
"""The browser client at another version than this node's: 404 naming this one."""
WS_METHODS: Final = ("GET", "HEAD")  # HEAD: aiohttp's add_get adds it; it gets 405


async def _echo(conn: Connection, msg: Message) -> None:
    await conn.send(msg.data)


def node_app(config: HubConfig | None = None, *, api_key: str | None = KEY) -> web.Application:
    """create_app plus a route made with hub.route."""
    app = create_app(config, options=NodeOptions(api_key=api_key))
    app.router.add_get("/custom", app[HUB].route(EventHandler(on_message=_echo)))
    return app


def routes(app: web.Application) -> set[tuple[str, str]]:
    """(method, canonical path) of every route of the app's router."""
    return {(route.method, route.resource.canonical) for route in app.router.routes()
            if route.resource is not None}


def api_routes(app: web.Application) -> set[tuple[str, str]]:
    return {(method, path) for method, path in routes(app) if path.startswith("/api")}


def ws_url(base: str, path: str) -> str:
    return base.replace("http://", "ws://", 1) + WS_ROUTES.get(path, path)


def concrete(path: str, conn_id: str) -> str:
    """A request path for a canonical route path; KeyError names an unknown parameter."""
    values = {"room": ROOM, "conn_id": conn_id, "version": "0.0.0-other",
              "user": "guard-user"}
    fields = {name for _, name, _, _ in string.Formatter().parse(path) if name}
    unknown = fields - values.keys()
    if unknown:
        raise KeyError(f"route {path} has parameters {unknown} this test does not know")
    return path.format(**values)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# --- no route is missed ------------------------------------------------------------------


def test_every_route_is_classified() -> None:
    """Each route of the app is a WebSocket route, an /api route or an open route, and
    nothing else: a new route must be added to a table here (and so to every test)."""
    classified = (
        {(method, path) for path in WS_ROUTES for method in WS_METHODS}
        | API_MESSAGE_ROUTES | API_QUERY_ROUTES | OPEN_ROUTES | OTHER_VERSION_ROUTES
    )
    found = routes(node_app())
    assert found - classified == set(), "routes no guard test covers"
    assert classified - found == set(), "routes this test expects but the app lacks"
    assert {p for _, p in API_MESSAGE_ROUTES | API_QUERY_ROUTES} == {p for _, p in api_routes(
        node_app())}
    assert all(p.startswith("/api/") for _, p in API_MESSAGE_ROUTES | API_QUERY_ROUTES)


async def test_only_websocket_routes_upgrade(serve: Serve) -> None:
    """A valid upgrade request upgrades exactly on the WebSocket routes (so the tables
    above say what the routes do, not just what they are called)."""
    app = node_app()
    base = await serve(app)
    for method, path in sorted(routes(app)):
        if method != "GET":
            continue
        url = base.replace("http://", "ws://", 1) + concrete(path, "n.1")
        if path in WS_ROUTES:
            async with websockets.connect(ws_url(base, path)):
                pass
        else:
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(url):
                    pass
            assert refused.value.response.status_code != 101, path


# --- origins -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(WS_ROUTES))
@pytest.mark.parametrize(
    ("allowed", "origin", "status"),
    [
        ((), EVIL, 403),
        ((), "same", 101),
        ((), None, 101),
        ((GOOD,), EVIL, 403),
        ((GOOD,), "same", 403),
        ((GOOD,), GOOD, 101),
    ],
    ids=["default-evil", "default-same-origin", "default-no-origin", "listed-evil",
         "listed-same-origin-not-listed", "listed-good"],
)
async def test_origin_is_checked_on_every_websocket_route(
    serve: Serve, path: str, allowed: tuple[str, ...], origin: str | None, status: int
) -> None:
    """Each WebSocket route applies allowed_origins before the upgrade."""
    app = node_app(HubConfig(allowed_origins=allowed))
    base = await serve(app)
    headers = {} if origin is None else {"Origin": base if origin == "same" else origin}
    if status == 101:
        async with websockets.connect(ws_url(base, path), additional_headers=headers):
            pass
    else:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(ws_url(base, path), additional_headers=headers):
                pass
        assert refused.value.response.status_code == status
        assert app[HUB].stats.refused_origin == 1
        assert app[HUB].connection_count == 0


# --- the API key -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def member(base: str, path: str = "/echo") -> AsyncIterator[tuple[ClientConnection, str]]:
    """A connected client and its connection id."""
    async with websockets.connect(ws_url(base, path), max_size=None) as ws:
        assert ws.response is not None
        yield ws, ws.response.headers["X-Roomcast-Connection"]


@pytest.mark.parametrize("route", sorted(API_MESSAGE_ROUTES | API_QUERY_ROUTES), ids=" ".join)
async def test_key_is_required_on_every_api_route(
    serve: Serve, http: aiohttp.ClientSession, route: tuple[str, str]
) -> None:
    """No key or a wrong one: 401 with a Bearer challenge. The right key: served."""
    method, path = route
    base = await serve(node_app())
    async with member(base) as (_, conn_id):
        url = base + concrete(path, conn_id)
        for headers in ({}, {"Authorization": "Bearer not-the-key"}):
            async with http.request(method, url, headers=headers, data=b"x") as resp:
                assert resp.status == 401, (route, headers)
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.request(method, url, headers=AUTH, data=b"x") as resp:
            assert resp.status in (200, 202), route


@pytest.mark.parametrize("route", sorted(API_MESSAGE_ROUTES | API_QUERY_ROUTES), ids=" ".join)
async def test_api_is_absent_without_a_key(
    serve: Serve, http: aiohttp.ClientSession, route: tuple[str, str]
) -> None:
    """With no key configured no /api route exists: 404, key or not."""
    app = node_app(api_key=None)
    assert api_routes(app) == set()
    base = await serve(app)
    method, path = route
    for headers in ({}, AUTH):
        async with http.request(method, base + concrete(path, "n.1"), headers=headers,
                                data=b"x") as resp:
            assert resp.status == 404, (route, headers)


@pytest.mark.parametrize("route", sorted(OPEN_ROUTES), ids=" ".join)
async def test_open_routes_need_no_key(
    serve: Serve, http: aiohttp.ClientSession, route: tuple[str, str]
) -> None:
    """/healthz, /readyz, /metrics and the page answer 200 without a key, or with a wrong
    one, while the API is on."""
    method, path = route
    base = await serve(node_app())
    for headers in ({}, {"Authorization": "Bearer not-the-key"}):
        async with http.request(method, base + path, headers=headers) as resp:
            assert resp.status == 200, (route, headers)


@pytest.mark.parametrize("route", sorted(OTHER_VERSION_ROUTES), ids=" ".join)
async def test_other_client_versions_are_not_found_without_a_key(
    serve: Serve, http: aiohttp.ClientSession, route: tuple[str, str]
) -> None:
    """The browser client at a version this node does not run: 404 (no key needed)."""
    method, path = route
    base = await serve(node_app())
    async with http.request(method, base + path.format(version="0.0.0-other")) as resp:
        assert resp.status == 404, route


# --- limits ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(WS_ROUTES))
async def test_max_connections_on_every_websocket_route(
    serve: Serve, http: aiohttp.ClientSession, path: str
) -> None:
    """A full node refuses the upgrade on each route with 503 and Retry-After; the API
    still takes messages for the members it has; a freed slot is usable again."""
    app = node_app(HubConfig(max_connections=1))
    hub: Hub = app[HUB]
    base = await serve(app)
    async with member(base) as (ws, _):
        for target in sorted(WS_ROUTES):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(ws_url(base, target)):
                    pass
            assert refused.value.response.status_code == 503, target
            assert refused.value.response.headers["Retry-After"] == "1"
        async with http.post(base + "/api/broadcast", headers=AUTH, data="still served") as resp:
            assert resp.status == 202
        assert await asyncio.wait_for(ws.recv(), 5) == "still served"
    async with asyncio.timeout(5):
        while hub.connection_count:  # noqa: ASYNC110 (hub state; no event to wait on)
            await asyncio.sleep(0.01)  # the node forgets the member that left
    async with websockets.connect(ws_url(base, path)):
        pass
    assert hub.stats.refused_full == len(WS_ROUTES)


async def _closed_with(ws: ClientConnection) -> int | None:
    """Read until the connection closes; the close code the node sent."""
    with pytest.raises(websockets.ConnectionClosed) as closed:
        async with asyncio.timeout(5):
            while True:
                await ws.recv()
    return closed.value.rcvd.code if closed.value.rcvd is not None else None


@pytest.mark.parametrize("path", sorted(WS_ROUTES))
@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
async def test_max_message_size_on_every_websocket_route(
    serve: Serve, path: str, binary: bool
) -> None:
    """On each route a message of exactly max_message_size is taken and one byte more
    closes the connection with 1009."""
    base = await serve(node_app(HubConfig(max_message_size=LIMIT)))

    def message(size: int) -> str | bytes:
        return b"b" * size if binary else "t" * size

    async with websockets.connect(ws_url(base, path), max_size=None) as ws:
        await ws.send(message(LIMIT))
        await asyncio.wait_for(await ws.ping(), 5)  # still open after the message
        await ws.send(message(LIMIT + 1))
        assert await _closed_with(ws) == 1009


@pytest.mark.parametrize("route", sorted(API_MESSAGE_ROUTES), ids=" ".join)
async def test_max_message_size_on_every_api_message_route(
    serve: Serve, http: aiohttp.ClientSession, route: tuple[str, str]
) -> None:
    """Each API route that takes a message takes exactly max_message_size bytes and
    answers 413 to one byte more (nothing of it is delivered)."""
    method, path = route
    base = await serve(node_app(HubConfig(max_message_size=LIMIT)))
    async with member(base, "/chat") as (ws, conn_id):
        url = base + concrete(path, conn_id)
        async with http.request(method, url, headers=AUTH, data=b"x" * (LIMIT + 1)) as resp:
            assert resp.status == 413
        async with http.request(method, url, headers=AUTH, data=b"x" * LIMIT) as resp:
            assert resp.status == 202
        if "{user}" in path:
            return  # the member is anonymous: tests/node/test_users.py delivers to users
        async with asyncio.timeout(5):
            while (data := await ws.recv()) != b"x" * LIMIT:  # octet-stream: binary
                assert isinstance(data, str) and data.startswith('{"type": '), data
