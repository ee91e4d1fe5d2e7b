"""The chat page in a real browser: headless Chromium, driven by playwright, against a
private redis-server, two node processes and haproxy (scripts/haproxy.cfg) in front.

Two pages, each in its own browser context with a fresh profile, join one room through
haproxy and land on different nodes (read from the X-Roomcast-Node header of each
page's WebSocket handshake, through the Chrome DevTools Protocol). Each sees the other's
messages, the member count and the join/leave notices; a message made of HTML is shown
as text. On failure, a screenshot of each page is saved and its path added to the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
from playwright.async_api import BrowserContext, Dialog, Page, Playwright, async_playwright, expect

from tests.e2e.haproxy import HAProxy
from tests.e2e.procs import NodeProcess
from tests.loops import ONE_LOOP
from tests.redis_server import RedisServer

pytestmark = ONE_LOOP  # a real browser through haproxy; one loop keeps it short

CHROMIUM: Final = "/usr/bin/chromium"
CHROMIUM_ARGS: Final = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
HTML: Final = "<img src=x onerror=alert(1)><b>bold</b>"
WAIT_MS: Final = 10_000


@pytest.fixture
def cluster() -> Iterator[HAProxy]:
    """redis-server, two nodes on it, haproxy in front with both nodes UP."""
    with RedisServer() as redis:
        nodes: list[NodeProcess] = []
        try:
            for _ in range(2):
                nodes.append(NodeProcess("--redis", redis.url).start())
            with HAProxy([f"127.0.0.1:{n.port}" for n in nodes], check_inter="200ms") as lb:
                lb.wait_states({"node1": "UP", "node2": "UP"})
                yield lb
        finally:
            for node in nodes:
                node.kill()


@dataclass
class ChatPage:
    """One browser context with the chat page open."""

    context: BrowserContext
    page: Page
    name: str
    nodes: list[str] = field(default_factory=list)
    """X-Roomcast-Node of each WebSocket handshake the page made, in order."""
    dialogs: list[str] = field(default_factory=list)

    @property
    def messages(self) -> Any:
        return self.page.locator("#messages li")

    async def join(self, room: str) -> str:
        """Fill in name and room, press Join; the node the WebSocket landed on."""
        handshakes = len(self.nodes)
        await self.page.fill("#name", self.name)
        await self.page.fill("#room", room)
        await self.page.click("#connect")
        await expect(self.page.locator("#status")).to_contain_text(f"in #{room}",
                                                                   timeout=WAIT_MS)
        async with asyncio.timeout(WAIT_MS / 1000):
            while len(self.nodes) == handshakes:  # noqa: ASYNC110 (a CDP event sets it)
                await asyncio.sleep(0.01)
        return self.nodes[-1]

    async def say(self, text: str) -> None:
        await self.page.fill("#input", text)
        await self.page.click("#send-button")

    async def sees_message(self, sender: str, text: str) -> None:
        """A message line ``sender: text``, its text exactly that."""
        line = self.messages.filter(has_text=f"{sender}:").filter(has_text=text).last
        await expect(line).to_have_text(f"{sender}:{text}", timeout=WAIT_MS)

    async def sees_notice(self, text: str) -> None:
        await expect(self.page.locator("#messages li.notice", has_text=text).last).to_be_visible(
            timeout=WAIT_MS)

    async def sees_members(self, count: int) -> None:
        await expect(self.page.locator("#members")).to_have_text(str(count), timeout=WAIT_MS)


@contextlib.asynccontextmanager
async def chat_page(pw: Playwright, url: str, name: str) -> AsyncIterator[ChatPage]:
    """A fresh browser (own user-data dir) showing the chat page at ``url``."""
    profile = tempfile.mkdtemp(prefix="roomcast-chromium-")
    try:
        context = await pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            chat = ChatPage(context, page, name)

            def on_handshake(params: dict[str, Any]) -> None:
                headers = {k.lower(): v for k, v in params["response"]["headers"].items()}
                chat.nodes.append(headers.get("x-roomcast-node", "?"))

            async def on_dialog(dialog: Dialog) -> None:
                chat.dialogs.append(f"{dialog.type}: {dialog.message}")
                await dialog.dismiss()

            cdp = await context.new_cdp_session(page)
            cdp.on("Network.webSocketHandshakeResponseReceived", on_handshake)
            await cdp.send("Network.enable")
            page.on("dialog", on_dialog)
            await page.goto(url + "/")
            yield chat
        finally:
            with contextlib.suppress(Exception):
                await context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


async def screenshots(pages: list[ChatPage]) -> str:
    """Save a screenshot of each open page; where they are."""
    directory = Path(tempfile.mkdtemp(prefix="roomcast-browser-failure-"))
    for chat in pages:
        with contextlib.suppress(Exception):
            await chat.page.screenshot(path=str(directory / f"{chat.name}.png"), full_page=True)
    return str(directory)


async def test_two_browsers_chat_across_nodes_through_haproxy(cluster: HAProxy) -> None:
    """ann and bob, on different nodes behind haproxy, chat in one room: messages both
    ways, member counts 2 then 1, join and leave notices, HTML shown as text."""
    room = f"lobby-{uuid.uuid4().hex[:8]}"
    async with async_playwright() as pw, contextlib.AsyncExitStack() as stack:
        ann = await stack.enter_async_context(chat_page(pw, cluster.url, "ann"))
        bob_stack = await stack.enter_async_context(contextlib.AsyncExitStack())
        bob = await bob_stack.enter_async_context(chat_page(pw, cluster.url, "bob"))
        try:
            ann_node = await ann.join(room)
            await ann.sees_notice("ann joined")
            await ann.sees_members(1)

            bob_node = await bob.join(room)
            for _ in range(5):  # leastconn should do it at once; make sure
                if bob_node != ann_node:
                    break
                await bob.page.reload()
                await ann.sees_members(1)  # bob's old socket has left
                bob_node = await bob.join(room)
            assert bob_node != ann_node, (ann.nodes, bob.nodes, cluster.log())
            assert "?" not in (ann_node, bob_node), "no X-Roomcast-Node on the handshake"

            for chat in (ann, bob):
                await chat.sees_notice("bob joined")
                await chat.sees_members(2)

            await ann.say("hello from ann")
            await bob.say("hi ann, bob here")
            for chat in (ann, bob):
                await chat.sees_message("ann", "hello from ann")
                await chat.sees_message("bob", "hi ann, bob here")

            await ann.say(HTML)
            for chat in (ann, bob):
                await chat.sees_message("ann", HTML)
                assert await chat.page.locator("#messages img, #messages b").count() == 0
                assert await chat.page.evaluate("document.images.length") == 0
                line = chat.messages.filter(has_text=HTML).last
                assert "&lt;img" in await line.inner_html()

            await bob_stack.aclose()  # bob closes his browser
            await ann.sees_notice("bob left")
            await ann.sees_members(1)
            assert ann.dialogs == [] and bob.dialogs == [], (ann.dialogs, bob.dialogs)
        except BaseException as exc:
            exc.add_note(f"screenshots: {await screenshots([ann, bob])}")
            raise
