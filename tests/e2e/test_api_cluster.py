"""The HTTP API on a real cluster: two `roomcast serve --api-key` processes and redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Final

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.e2e.procs import NodeProcess
from tests.loops import ONE_LOOP
from tests.redis_server import RedisServer

pytestmark = ONE_LOOP  # the HTTP API is its subject, not the WebSocket path

KEY: Final = "e2e-api-key"
AUTH: Final = {"Authorization": f"Bearer {KEY}"}


class Client:
    """A WebSocket client and the connection id its node announced."""

    def __init__(self, ws: ClientConnection) -> None:
        assert ws.response is not None
        self.ws = ws
        self.id = ws.response.headers["X-Roomcast-Connection"]

    async def recv(self) -> str | bytes:
        return await asyncio.wait_for(self.ws.recv(), 5)

    async def recv_chat(self) -> str | bytes:
        """The next message that is not a chat join/leave notice."""
        while True:
            data = await self.recv()
            if isinstance(data, str) and data.startswith('{"type": "'):
                continue
            return data


@pytest.fixture
def nodes() -> Iterator[tuple[NodeProcess, NodeProcess]]:
    """Nodes A and B on one private redis-server, the API on."""
    with RedisServer() as redis_server:
        args = ("--redis", redis_server.url, "--api-key", KEY)
        with NodeProcess(*args) as a, NodeProcess(*args) as b:
            yield a, b


@pytest.fixture
async def clients() -> AsyncIterator[contextlib.AsyncExitStack]:
    async with contextlib.AsyncExitStack() as stack:
        yield stack


async def chat_member(stack: contextlib.AsyncExitStack, node: NodeProcess, room: str,
                      name: str) -> Client:
    """A chat member, in ``room`` on every node once its own join notice arrived."""
    client = Client(await stack.enter_async_context(
        connect(f"{node.ws_url}/chat?room={room}&name={name}")
    ))
    notice = json.loads(await client.recv())
    assert (notice["type"], notice["name"]) == ("join", name)
    return client


async def echo_member(stack: contextlib.AsyncExitStack, node: NodeProcess) -> Client:
    """A connection in no room, open and served once its echo came back."""
    client = Client(await stack.enter_async_context(connect(f"{node.ws_url}/echo")))
    await client.ws.send("ready?")
    assert await client.recv() == "ready?"
    return client


async def test_posts_to_one_node_reach_members_on_the_other(
    nodes: tuple[NodeProcess, NodeProcess], clients: contextlib.AsyncExitStack
) -> None:
    """Room messages, connection messages and broadcasts posted to A reach members on B."""
    a, b = nodes
    on_b = await chat_member(clients, b, "lobby", "bee")
    solo_b = await echo_member(clients, b)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{a.url}/api/rooms/lobby/messages", data=b"from A",
                             headers={**AUTH, "Content-Type": "text/plain"}) as resp:
            assert resp.status == 202, a.log()
        assert await on_b.recv_chat() == "from A"

        async with http.post(f"{a.url}/api/connections/{solo_b.id}/messages",
                             data=b"\x00only you", headers=AUTH) as resp:
            assert resp.status == 202
            assert resp.request_info.headers["Content-Type"] == "application/octet-stream"
        assert await solo_b.recv() == b"\x00only you"

        async with http.post(f"{a.url}/api/broadcast", data=b"everyone",
                             headers={**AUTH, "Content-Type": "text/plain"}) as resp:
            assert resp.status == 202
        assert await on_b.recv_chat() == "everyone"
        assert await solo_b.recv() == "everyone"


async def test_room_lookup_on_one_node_lists_members_of_both(
    nodes: tuple[NodeProcess, NodeProcess], clients: contextlib.AsyncExitStack
) -> None:
    """GET /api/rooms/{room} on A lists members on A and B; without the key it is 401."""
    a, b = nodes
    on_a = await chat_member(clients, a, "lobby", "ay")
    on_b = await chat_member(clients, b, "lobby", "bee")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{a.url}/api/rooms/lobby", headers=AUTH) as resp:
            assert resp.status == 200, a.log()
            assert await resp.json() == {
                "room": "lobby", "size": 2, "members": sorted([on_a.id, on_b.id])
            }
        async with http.get(f"{a.url}/api/rooms/lobby") as resp:
            assert resp.status == 401
