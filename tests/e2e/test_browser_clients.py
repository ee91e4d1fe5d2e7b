"""The chat page and roomcast.js in real Chromium (Debian's, driven by playwright as in
tests/e2e/test_browser.py) through haproxy in front of three nodes with history on one
redis-server with AOF (tests/e2e/chatcluster.py).

- Two pages chatting; bob's node goes away (SIGKILL; SIGTERM drain with 1001; Redis
  SIGKILLed and restarted on its AOF, then the node SIGKILLed) while ann keeps sending:
  bob's page shows "reconnecting...", reconnects to another node by itself (shown on
  the page) and ends with every line of ann's exactly once, in order.
- A page that joins sees the room's recent history, once.
- A page closed with a "do not retry" code (1009: a message over the node's limit)
  stays closed; backoff delays grow and are capped, measured in the page.
- The README's browser example works pasted into a page served by a node.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Final

import pytest
from playwright.async_api import Playwright, async_playwright, expect

from tests.e2e.chatcluster import DISRUPTIONS, ChatCluster, Disruption, chat_cluster
from tests.e2e.test_browser import ChatPage, chat_page, screenshots
from tests.loops import ONE_LOOP

pytestmark = ONE_LOOP  # a real browser through haproxy; one loop keeps it short

REPO: Final = Path(__file__).resolve().parents[2]
WAIT_MS: Final = 30_000
MAX_MESSAGE_SIZE: Final = 4096
LINES: Final = 30


@pytest.fixture
def cluster() -> Iterator[ChatCluster]:
    with chat_cluster(3, "--max-message-size", str(MAX_MESSAGE_SIZE)) as made:
        yield made


@contextlib.asynccontextmanager
async def two_pages(pw: Playwright, cluster: ChatCluster, room: str
                    ) -> AsyncIterator[tuple[ChatPage, ChatPage]]:
    """ann and bob on the chat page, joined to ``room`` on different nodes."""
    async with chat_page(pw, cluster.lb.url, "ann") as ann, \
            chat_page(pw, cluster.lb.url, "bob") as bob:
        try:
            ann_node = await ann.join(room)
            bob_node = await bob.join(room)
            for _ in range(5):  # leastconn should do it at once; make sure
                if bob_node != ann_node:
                    break
                bob_node = await bob.join(room)  # a new client, a new handshake
            assert bob_node != ann_node, (ann.nodes, bob.nodes)
            for chat in (ann, bob):
                await expect(chat.page.locator("#node")).to_have_text(chat.nodes[-1])
                await chat.sees_members(2)
            yield ann, bob
        except BaseException as exc:
            exc.add_note(f"screenshots: {await screenshots([ann, bob])}")
            exc.add_note(cluster.logs())
            raise


async def lines_of(chat: ChatPage, sender: str) -> list[str]:
    """The texts of ``sender``'s chat lines on the page, in order."""
    texts: list[str] = await chat.page.locator("#messages li:not(.notice)").all_inner_texts()
    prefix = f"{sender}:"
    return [t.removeprefix(prefix) for t in texts if t.startswith(prefix)]


async def say_and_see(chat: ChatPage, text: str) -> None:
    """Say ``text`` once the page can send, and see it come back on the own page."""
    await expect(chat.page.locator("#send-button")).to_be_enabled(timeout=WAIT_MS)
    await chat.say(text)
    await chat.sees_message(chat.name, text)


async def record_states(chat: ChatPage) -> None:
    """Keep every text the page's status shows (window.stateLog), from now on."""
    await chat.page.evaluate("""() => {
        window.stateLog = [];
        const state = document.getElementById("state");
        new MutationObserver(() => window.stateLog.push(state.textContent))
            .observe(state, { childList: true, characterData: true, subtree: true });
    }""")


@pytest.mark.parametrize("how", DISRUPTIONS)
async def test_page_reconnects_and_shows_every_line_once(cluster: ChatCluster,
                                                         how: Disruption) -> None:
    """bob's node goes away while ann keeps sending: bob's page says it is reconnecting,
    lands on another node (shown), and shows ann's lines exactly once and in order;
    ann's page too. Nothing could not be recovered."""
    room = f"resume-{uuid.uuid4().hex[:8]}"
    expected = [f"line {i}" for i in range(LINES)]
    async with async_playwright() as pw, two_pages(pw, cluster, room) as (ann, bob):
        await record_states(bob)
        await bob.page.evaluate("""() => {
            window.joins = [];
            window.chat.client.on("joined", (j) => { window.joins.push(j); });
        }""")  # a function: evaluating on()'s result would call it (and stop listening)
        bob_node = bob.nodes[-1]
        for text in expected[:10]:
            await say_and_see(ann, text)
        await expect(bob.messages.filter(has_text="ann:line 9")).to_have_count(1)

        await cluster.disrupt(how, bob_node)
        for text in expected[10:20]:  # while bob is away (or coming back)
            await say_and_see(ann, text)
        await expect(bob.page.locator("#status")).to_contain_text(f"in #{room}",
                                                                  timeout=WAIT_MS)
        for text in expected[20:]:
            await say_and_see(ann, text)
        await say_and_see(ann, "end")
        await bob.sees_message("ann", "end")

        for chat in (ann, bob):
            assert await lines_of(chat, "ann") == [*expected, "end"], chat.name
        assert len(bob.nodes) >= 2 and bob.nodes[-1] != bob_node, bob.nodes
        await expect(bob.page.locator("#node")).to_have_text(bob.nodes[-1])
        states: list[str] = await bob.page.evaluate("window.stateLog")
        assert any(re.fullmatch(r"reconnecting\.\.\. \(attempt 1, in \d+\.\d s\)", s)
                   for s in states), states
        joins: list[dict[str, Any]] = await bob.page.evaluate("window.joins")
        assert [(j["room"], j["recovered"]) for j in joins] == [(room, True)], joins
        reconnects: list[dict[str, Any]] = await bob.page.evaluate("window.chat.reconnects")
        first = reconnects[0]
        if how == "drain":
            assert first["code"] == 1001 and first["delay"] <= 1000, reconnects
        else:
            assert first["code"] in (1006, None), reconnects
        for chat in (ann, bob):
            warnings = await chat.page.locator("#messages li.warning").all_inner_texts()
            assert warnings == [], warnings
        assert ann.dialogs == [] and bob.dialogs == []


async def test_a_page_that_joins_sees_recent_history_once(cluster: ChatCluster) -> None:
    """ann says three lines; bob's page, joining after, shows them (the node replays
    the room's recent history) once, before the live ones."""
    room = f"history-{uuid.uuid4().hex[:8]}"
    async with async_playwright() as pw, chat_page(pw, cluster.lb.url, "ann") as ann:
        await ann.join(room)
        for text in ("one", "two", "three"):
            await say_and_see(ann, text)
        async with chat_page(pw, cluster.lb.url, "bob") as bob:
            await bob.join(room)
            await bob.sees_message("ann", "three")
            await say_and_see(ann, "four")
            await bob.sees_message("ann", "four")
            assert await lines_of(bob, "ann") == ["one", "two", "three", "four"]
            notices = await bob.page.locator("#messages li.notice").all_inner_texts()
            assert notices[0] == "ann joined" and "bob joined" in notices, notices


async def test_a_do_not_retry_close_is_final(cluster: ChatCluster) -> None:
    """A message over the node's limit gets the page closed with 1009, a code the
    protocol says not to retry: the page says so and makes no new connection."""
    room = f"final-{uuid.uuid4().hex[:8]}"
    async with async_playwright() as pw, chat_page(pw, cluster.lb.url, "ann") as ann:
        await ann.join(room)
        handshakes = len(ann.nodes)
        await ann.page.evaluate(f"window.chat.client.send('x'.repeat({MAX_MESSAGE_SIZE * 2}))")
        await expect(ann.page.locator("#state")).to_have_text(re.compile(r"disconnected \(1009"),
                                                              timeout=WAIT_MS)
        closed = await ann.page.evaluate("window.chat.client.state")
        assert closed == "closed"
        await expect(ann.page.locator("#send-button")).to_be_disabled()
        # Bounded observation: longer than the page's first two backoff ceilings.
        await ann.page.wait_for_timeout(2_000)
        assert len(ann.nodes) == handshakes, ann.nodes
        assert await ann.page.evaluate("window.chat.reconnects.length") == 0


BACKOFF_PROBE: Final = """async ({ url, random }) => {
  // A client on the page whose WebSocket class notes when each connection starts and
  // ends; its reconnecting events say which delay it chose.
  const log = { opens: [], closes: [], reconnecting: [] };
  class Noted extends WebSocket {
    constructor(u, p) {
      super(u, p);
      log.opens.push(performance.now());
      this.addEventListener("close", () => log.closes.push(performance.now()));
    }
  }
  const options = { initialDelay: 200, maxDelay: 1600, factor: 2, WebSocket: Noted };
  if (random !== null) options.random = () => random;
  const client = new Roomcast.Client(url, options);
  client.on("reconnecting", (r) => log.reconnecting.push(
    { attempt: r.attempt, delay: r.delay, at: performance.now() }));
  window.probes = window.probes || [];
  window.probes.push({ client, log });
  const opened = new Promise((resolve) => { client.on("open", resolve); });
  client.connect();
  await opened;
  return window.probes.length - 1;
}"""


async def test_backoff_grows_and_is_capped_in_the_page() -> None:
    """With every node gone, a page's client retries: the delays its reconnecting events
    report, and the gaps measured in the page between a failed connection and the next
    attempt, double from 200 ms and stop at the 1600 ms cap; with jitter each delay
    stays under its ceiling."""
    with chat_cluster(1) as cluster:
        async with async_playwright() as pw, chat_page(pw, cluster.lb.url, "ann") as ann:
            url = cluster.lb.url + "/chat?room=probe&name=ann"
            exact = await ann.page.evaluate(BACKOFF_PROBE, {"url": url, "random": 1})
            jittered = await ann.page.evaluate(BACKOFF_PROBE, {"url": url, "random": None})
            await asyncio.to_thread(cluster.nodes[0].kill)
            await ann.page.wait_for_function(
                "window.probes.every((p) => p.log.reconnecting.length >= 7)", timeout=WAIT_MS)
            logs: list[dict[str, Any]] = await ann.page.evaluate(
                "window.probes.map((p) => p.log)")
            await ann.page.evaluate("window.probes.forEach((p) => p.client.close())")

    log = logs[exact]
    delays = [r["delay"] for r in log["reconnecting"][:7]]
    assert delays == [200, 400, 800, 1600, 1600, 1600, 1600], log["reconnecting"]
    for event in log["reconnecting"][:6]:
        # the attempt this event announced started no sooner than its delay after it
        started = [t for t in log["opens"] if t >= event["at"]]
        assert started, log
        gap = started[0] - event["at"]
        assert gap >= event["delay"] - 20, (event, gap)
    for event in logs[jittered]["reconnecting"][:7]:
        ceiling = min(1600, 200 * 2 ** (event["attempt"] - 1))
        assert 0 <= event["delay"] <= ceiling, event


def browser_example() -> str:
    readme = (REPO / "README.md").read_text()
    match = re.search(r"```html\n(<!-- example: browser -->\n.*?)```", readme, re.S)
    assert match, "no '<!-- example: browser -->' html block in README.md"
    return match.group(1)


async def test_readme_example_works_in_a_page_served_by_a_node(cluster: ChatCluster) -> None:
    """The README's browser example, written as the whole document of a page at a
    node's origin (through haproxy): it loads /roomcast.js from the node, connects,
    says which node, and shows its own hello coming back, as text."""
    html = f"<!DOCTYPE html><html><body>{browser_example()}</body></html>"
    async with async_playwright() as pw, chat_page(pw, cluster.lb.url, "ann") as ann:
        # A page of the node's origin that is not the chat page (its script would
        # clash with the example's names): any path, here a 404, then the example as
        # its document. (A page made up by playwright's routing is not "local" to
        # Chromium's local network access checks, which then block the WebSocket.)
        await ann.page.goto(cluster.lb.url + "/example.html")
        await ann.page.evaluate(
            "(html) => { document.open(); document.write(html); document.close(); }", html)
        log = ann.page.locator("#log li")
        await expect(log.first).to_have_text(re.compile(r"^on node [0-9a-f]+$"),
                                             timeout=WAIT_MS)
        assert (await log.first.inner_text()).removeprefix("on node ") == ann.nodes[-1]
        await expect(log.filter(has_text='"text":"hello"')).to_have_count(1, timeout=WAIT_MS)
        assert await ann.page.evaluate("document.querySelectorAll('#log *:not(li)').length") == 0
        assert ann.dialogs == []


async def test_versioned_script_is_what_the_page_runs(cluster: ChatCluster) -> None:
    """The page's Roomcast.VERSION is the one in the versioned URL the node serves."""
    async with async_playwright() as pw, chat_page(pw, cluster.lb.url, "ann") as ann:
        version = await ann.page.evaluate("Roomcast.VERSION")
        response = await ann.page.request.get(f"{cluster.lb.url}/roomcast-{version}.js")
        assert response.status == 200
        assert "immutable" in response.headers["cache-control"]

