"""Fixtures shared by every test package: a node served on a real loopback socket, and
the event loops the in-process tests run on."""

from __future__ import annotations

import asyncio
import encodings.idna  # noqa: F401  (see below)
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.loops import LOOPS, LoopFactory

Serve = Callable[[web.Application], Awaitable[str]]
# uvloop's getaddrinfo encodes host names with 'idna', importing encodings.idna on first
# use; on Python 3.11 that first import inside a running test once failed with a KeyError
# from importlib's module lock. Imported here, before any loop runs.

TESTS = Path(__file__).resolve().parent
PACKAGES_ON_EVERY_LOOP = frozenset({"node", "e2e"})
"""Test packages whose async tests run once per loop in ``LOOPS`` (the node's socket
path is what they exercise); the others run on asyncio's loop only."""


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, LoopFactory]:
    """Async tests under tests/node and tests/e2e run on each loop, with its name as id."""
    package = item.path.relative_to(TESTS).parts[0]
    return LOOPS if package in PACKAGES_ON_EVERY_LOOP else {"asyncio": asyncio.new_event_loop}


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start aiohttp apps on free loopback ports; returns their base ``http://`` URL."""
    servers: list[TestServer] = []

    async def start(app: web.Application) -> str:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in reversed(servers):
        await server.close()
