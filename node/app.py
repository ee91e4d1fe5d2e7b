"""The node application: the hub, the demo routes and the operations endpoints.

``create_app`` is what ``roomcast serve`` runs; tests and embedders call it too.

- ``/healthz`` (liveness): 200 while the process answers, with JSON details: readiness,
  draining, connections and the broker's state (connected, degraded or disconnected,
  since when; see ``roomcast.node.health``).
- ``/readyz`` (readiness): 200 while this node can serve new clients (accepting, not
  draining), whatever Redis does; 503 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from roomcast.broker import Broker
from roomcast.node.api import setup_api
from roomcast.node.auth import Auth
from roomcast.node.demo import add_demo_routes
from roomcast.node.health import BrokerHealth, Drain, sampling
from roomcast.node.hub import HUB, Hub
from roomcast.node.limits import Limits
from roomcast.node.metrics import setup_metrics
from roomcast.node.static_routes import add_static_routes
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
    drain_notice: float = 0.0
    """On SIGTERM, seconds /readyz fails before clients are closed (``install_drain``)."""
    auth: Auth | None = None
    """Authentication and room rules of the WebSocket routes (``node.auth``)."""
    limits: Limits | None = None
    """Rate limits, connect limit, handshake timeout (``node.limits``; None: defaults)."""


BROKER_HEALTH = web.AppKey("roomcast_broker_health", BrokerHealth)
"""The node's view of its broker's state (``roomcast.node.health``)."""
DRAIN = web.AppKey("roomcast_drain", Drain)
"""The node's drain: readiness fails from ``DRAIN.since`` on."""


def ready(app: web.Application) -> tuple[bool, str]:
    """Whether this node can serve new clients, and why not."""
    if app[DRAIN].draining:
        return False, "draining"
    if not app[HUB].accepting:
        return False, "not accepting connections"
    return True, "ready"


def create_app(
    config: HubConfig | None = None,
    *,
    broker: Broker | None = None,
    options: NodeOptions | None = None,
) -> web.Application:
    """An aiohttp Application with a hub, the demo routes and /healthz, /readyz, /metrics."""
    options = options if options is not None else NodeOptions()
    app = web.Application()
    hub = Hub(config, broker=broker, auth=options.auth, limits=options.limits)
    hub.attach(app, drain_seconds=options.drain_seconds)
    health = BrokerHealth(hub)
    app[BROKER_HEALTH] = health
    app[DRAIN] = Drain(options.drain_notice)
    app.cleanup_ctx.append(sampling(health))

    async def readyz(request: web.Request) -> web.Response:
        """Readiness: this node can serve new clients (accepting, not draining). Redis
        being unreachable does not count: the node still serves its local rooms."""
        ok, why = ready(request.app)
        return web.Response(status=200 if ok else 503, text=why + "\n")

    async def healthz(request: web.Request) -> web.Response:
        """Liveness: 200 while the process answers; the body says how the node is."""
        drain = request.app[DRAIN]
        ok, why = ready(request.app)
        details: dict[str, Any] = {
            "status": "ok",
            "node": hub.node_id,
            "ready": ok,
            "readiness": why,
            "draining_since": drain.since,
            "connections": len(hub.connections()),
            "broker": health.details(),
        }
        return web.json_response(details)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    add_demo_routes(app)
    add_static_routes(app)
    if options.metrics:
        setup_metrics(app, hub, health)
    setup_api(app, hub, options.api_key)
    return app


def install_drain(app: web.Application) -> None:
    """Let SIGTERM/SIGINT drain this app the load-balancer way (``Drain``): call before
    ``web.run_app``. Not done by ``create_app``, whose apps may run inside other
    programs (tests, embedders) that own their signals."""
    app[DRAIN].install(app)
