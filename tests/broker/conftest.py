"""Broker test fixtures: a private redis-server or Redis Cluster per test, and brokers on it.

``backend`` runs a test once per transport: ``[redis]`` on a fresh redis-server,
``[cluster]`` on a 3-master cluster shared by the package's tests (a fresh prefix per
test). Tests that kill, freeze or reconfigure Redis take ``own_backend``: a fresh server
or cluster of their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.broker.helpers import Backend
from tests.redis_cluster import LocalRedisCluster
from tests.redis_server import RedisServer

TRANSPORTS = ["redis", "cluster"]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A started redis-server on a free loopback port, stopped after the test."""
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of this test's redis-server."""
    return redis_server.url


@pytest.fixture(scope="package")
def shared_cluster() -> Iterator[LocalRedisCluster]:
    """One 3-master cluster for the tests of this package that do not break it."""
    with LocalRedisCluster(masters=3) as local:
        yield local


@contextlib.asynccontextmanager
async def _backend(request: pytest.FixtureRequest, own: bool) -> AsyncIterator[Backend]:
    """The Redis of the transport the test is parametrized with; its brokers closed after."""
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "cluster":
            local = (stack.enter_context(LocalRedisCluster(masters=3)) if own
                     else request.getfixturevalue("shared_cluster"))
            made = Backend("cluster", local.servers, local)
        else:
            made = Backend("redis", [request.getfixturevalue("redis_server")])
        stack.push_async_callback(made.close)  # before the cluster stops
        yield made


@pytest.fixture(params=TRANSPORTS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """This test's Redis, once per transport; brokers made on it are closed after."""
    async with _backend(request, own=False) as made:
        yield made


@pytest.fixture(params=TRANSPORTS)
async def own_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Like ``backend``, on a server or cluster of this test's own, free to break."""
    async with _backend(request, own=True) as made:
        yield made
