"""Prometheus metrics at /metrics (to be filled in)."""

from __future__ import annotations

from aiohttp import web

from node.hub import Hub


def setup_metrics(app: web.Application, hub: Hub) -> None:
    """Serve the hub's and broker's counters at ``GET /metrics``."""
