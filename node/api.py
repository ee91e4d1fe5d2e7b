"""The HTTP API for backends under /api (to be filled in)."""

from __future__ import annotations

from aiohttp import web

from node.hub import Hub


def setup_api(app: web.Application, hub: Hub, api_key: str | None) -> None:
    """Add the /api routes when ``api_key`` is set."""
