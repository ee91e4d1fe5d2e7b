"""Broker test fixtures: a private redis-server per test, and started RedisBrokers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from roomcast.broker.redis import RedisBroker
from roomcast.shared.ids import NodeId
from tests.broker.helpers import Inbox, Node
from tests.redis_server import RedisServer

MakeNode = Callable[..., Awaitable[Node]]


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


@pytest.fixture
async def make_node(redis_url: str) -> AsyncIterator[MakeNode]:
    """Start RedisBrokers as nodes (``make_node("a", prefix=..., ...)``); all closed after."""
    nodes: list[Node] = []

    async def make(node_id: str, *, url: str | None = None, **options: Any) -> Node:
        options.setdefault("heartbeat_interval", 0.1)
        options.setdefault("presence_ttl", 0.5)
        options.setdefault("reconnect_max_delay", 0.5)
        broker = RedisBroker(url or redis_url, **options)
        inbox = Inbox()
        await broker.start(NodeId(node_id), inbox)
        node = Node(broker, inbox)
        nodes.append(node)
        return node

    yield make
    for node in reversed(nodes):
        await node.broker.close()
