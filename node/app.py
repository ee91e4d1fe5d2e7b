"""The node application: the hub, the demo routes and the operations endpoints.

``create_app`` is what ``roomcast serve`` runs; tests and embedders call it too.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from roomcast.broker import Broker
from roomcast.node.api import setup_api
from roomcast.node.demo import add_demo_routes
from roomcast.node.hub import Hub
from roomcast.node.metrics import setup_metrics
from roomcast.shared.config import HubConfig


@dataclass(frozen=True, slots=True)
class NodeOptions:
    """Node settings beyond the hub's own ``HubConfig``."""

    api_key: str | None = None
    """Bearer key for the HTTP API under /api; None leaves the API off (404)."""
    drain_seconds: float = 10.0
    """On shutdown, how long clients get to receive their 1001 close."""
    metrics: bool = True
    """Serve Prometheus metrics at /metrics."""


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.Response(text="ok\n")


def create_app(
    config: HubConfig | None = None,
    *,
    broker: Broker | None = None,
    options: NodeOptions | None = None,
) -> web.Application:
    """An aiohttp Application with a hub, the demo routes and /healthz, /readyz, /metrics."""
    options = options if options is not None else NodeOptions()
    app = web.Application()
    hub = Hub(config, broker=broker)
    hub.attach(app, drain_seconds=options.drain_seconds)

    async def readyz(request: web.Request) -> web.Response:
        """Readiness: accepting connections and the broker connected."""
        if not hub.accepting:
            return web.Response(status=503, text="not accepting connections\n")
        if not hub.broker.connected:
            return web.Response(status=503, text="broker disconnected\n")
        return web.Response(text="ready\n")

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    add_demo_routes(app)
    if options.metrics:
        setup_metrics(app, hub)
    setup_api(app, hub, options.api_key)
    return app
