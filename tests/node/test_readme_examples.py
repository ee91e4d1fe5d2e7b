"""The Python examples in the README run as written (the seed's Quick Start and chat)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import websockets
from aiohttp import web

Serve = Callable[[web.Application], Awaitable[str]]
README = Path(__file__).resolve().parents[2] / "README.md"


def example(name: str) -> dict[str, Any]:
    """Execute the README's python block that starts with ``# example: name``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    for block in blocks:
        if block.startswith(f"# example: {name}\n"):
            namespace: dict[str, Any] = {"__name__": f"readme_{name}"}
            exec(compile(block, f"README:{name}", "exec"), namespace)
            return namespace
    raise AssertionError(f"no '# example: {name}' block in README.md")


async def test_quickstart_example_echoes(serve: Serve) -> None:
    """The Quick Start app accepts a WebSocket on /ws and echoes."""
    base = await serve(example("quickstart")["app"])
    async with websockets.connect(base.replace("http", "ws") + "/ws") as ws:
        await ws.send("Hello, World!")
        assert await ws.recv() == "Hello, World!"


async def test_chat_example_broadcasts_and_announces(serve: Serve) -> None:
    """The chat example announces joins and leaves and broadcasts to 'general'."""
    base = await serve(example("chat")["app"])
    url = base.replace("http", "ws") + "/chat"
    async with websockets.connect(url) as a:
        assert await a.recv() == "A new user joined!"
        async with websockets.connect(url, additional_headers={"X-User-Id": "7"}) as b:
            assert await a.recv() == "A new user joined!"
            assert await b.recv() == "A new user joined!"
            await b.send("hello everyone")
            assert await a.recv() == "hello everyone"
            assert await b.recv() == "hello everyone"
        assert await asyncio.wait_for(a.recv(), 5) == "A user left"
