"""The Python client (roomcast.node.client) against real node processes with history on
one real redis-server, haproxy in front (tests/e2e/chatcluster.py).

A bot on a node that goes away (SIGKILL, SIGTERM drain with 1001, Redis restarted on
its AOF and then the node killed) reconnects through haproxy to another node by itself,
declares its position, and ends with every message of the sender exactly once and in
order. Leaving ``async with`` and cancelling a task that uses the client (connected,
connecting, in its backoff) leave no task and no socket behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Final

import pytest

from roomcast.node.client import (
    Client,
    ConnectError,
    Joined,
    Message,
    Open,
    Position,
    Reconnecting,
)
from tests.e2e.chatcluster import DISRUPTIONS, ChatCluster, Disruption, chat_cluster
from tests.loops import ONE_LOOP

pytestmark = ONE_LOOP  # real processes; one loop keeps it short

WAIT: Final = 30.0
"""Bound on any one wait: generous, the machine is shared."""
GOING_AWAY_DELAY: Final = 0.5


def client(base: str, room: str, name: str, **options: object) -> Client:
    """A client of the chat route with short delays (tests wait in seconds, not 30)."""
    url = f"{base.replace('http', 'ws', 1)}/chat?room={room}&name={name}"
    return Client(url, initial_delay=0.1, max_delay=1.0,  # type: ignore[arg-type]
                  going_away_delay=GOING_AWAY_DELAY, **options)


@pytest.fixture(scope="module")
def cluster() -> Iterator[ChatCluster]:
    with chat_cluster(3) as made:
        yield made


@pytest.fixture
def fresh_cluster() -> Iterator[ChatCluster]:
    """A cluster of its own, for a test that takes a node (or Redis) away."""
    with chat_cluster(3) as made:
        yield made


def said(data: str | bytes, name: str) -> str | None:
    """The text of a chat message from ``name`` (None for notices and others)."""
    if not isinstance(data, str):
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    if isinstance(obj, dict) and obj.get("type") == "message" and obj.get("name") == name:
        text = obj.get("text")
        return text if isinstance(text, str) else None
    return None


async def say(bob: Client, text: str) -> Position:
    """bob says ``text`` and sees it come back from the room (so it is stored)."""
    await bob.send(json.dumps({"type": "message", "name": "bob", "text": text}))
    async with asyncio.timeout(WAIT):
        while True:
            event = await bob.next_message(timeout=WAIT)
            if said(event.data, "bob") == text:
                assert event.position is not None, "the room has no history"
                return event.position


class Inbox:
    """Everything a client yields, read by a task; bob's texts in arrival order."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.events: list[object] = []
        self.texts: list[str] = []
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for event in self.client:
            self.events.append(event)
            if isinstance(event, Message) and (text := said(event.data, "bob")) is not None:
                self.texts.append(text)
            self.changed.set()

    async def until(self, predicate: object, timeout: float = WAIT) -> None:
        assert callable(predicate)
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    def of(self, kind: type) -> list[object]:
        return [e for e in self.events if isinstance(e, kind)]

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.mark.parametrize("how", DISRUPTIONS)
async def test_a_bot_whose_node_goes_away_resumes_exactly_once(
    fresh_cluster: ChatCluster, how: Disruption,
) -> None:
    """ann (through haproxy) loses her node while bob, on another node, keeps talking:
    she reconnects to another node by herself, declaring her position, recovers what
    she missed, and ends with bob's 40 lines exactly once and in order."""
    await resume(fresh_cluster, how)


async def test_a_replay_overlapping_what_the_bot_has_is_dropped(
    fresh_cluster: ChatCluster, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reconnect that declares a position 5 lines behind what the client holds (as a
    bot restarted from an older save would): the node replays those 5 again, the client
    drops them by position (``duplicates``), and the lines still come exactly once."""
    await resume(fresh_cluster, "kill", monkeypatch=monkeypatch, behind=5)


async def resume(cluster: ChatCluster, how: Disruption, *,
                 monkeypatch: pytest.MonkeyPatch | None = None, behind: int = 0) -> None:
    room = f"bots-{uuid.uuid4().hex[:8]}"
    expected = [f"line {i}" for i in range(40)]
    async with contextlib.AsyncExitStack() as stack:
        ann = await stack.enter_async_context(
            client(cluster.lb.url, room, "ann"))
        inbox = Inbox(ann)
        stack.push_async_callback(inbox.stop)
        assert ann.node is not None
        first_node, first_connection = ann.node, ann.connection_id
        bob = await stack.enter_async_context(
            client(cluster.other(first_node).url, room, "bob"))
        assert bob.node != first_node
        try:
            positions = [await say(bob, text) for text in expected[:10]]
            await inbox.until(lambda: len(inbox.texts) == 10)
            assert ann.positions[room] == positions[-1]
            if monkeypatch is not None:
                stale = positions[-1 - behind]
                book = ann._positions  # what a reconnect declares
                monkeypatch.setattr(book, "since", lambda limit: json.dumps(
                    {room: [stale.epoch, stale.offset]}))

            await cluster.disrupt(how, first_node)
            for text in expected[10:30]:  # while ann is away (or coming back)
                await say(bob, text)
            await inbox.until(lambda: len(inbox.of(Open)) == 2)
            for text in expected[30:]:
                await say(bob, text)
            await say(bob, "end")  # anything still in flight to ann would come before it
            await inbox.until(lambda: "end" in inbox.texts)

            assert inbox.texts == [*expected, "end"], inbox.texts
            assert ann.duplicates == behind
            first = inbox.of(Reconnecting)[0]
            assert isinstance(first, Reconnecting)
            if how == "drain":
                assert first.code == 1001 and first.delay <= GOING_AWAY_DELAY, first
            else:
                assert first.code in (None, 1006), first
            opened = inbox.of(Open)[1]
            assert isinstance(opened, Open) and opened.reconnect
            assert opened.node != first_node
            joined = [e for e in inbox.of(Joined) if isinstance(e, Joined) and e.room == room]
            assert len(joined) == 2 and joined[1].recovered is True, joined
            assert ann.connection_id != first_connection
        except BaseException as exc:
            exc.add_note(cluster.logs())
            raise


def socket_fds() -> set[str]:
    """This process's open sockets (their inodes)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:"):
                found.add(target)
    return found


def client_tasks() -> set[asyncio.Task[object]]:
    """Tasks of the client (its loop) and of aiohttp's client internals."""
    found = set()
    for task in asyncio.all_tasks():
        if task is asyncio.current_task():
            continue
        code = getattr(task.get_coro(), "cr_code", None)
        filename = code.co_filename.replace(os.sep, "/") if code is not None else ""
        if filename.endswith("node/client.py") or "/aiohttp/" in filename:
            found.add(task)
    return found


@contextlib.asynccontextmanager
async def nothing_left_behind() -> AsyncIterator[None]:
    """The block leaves no client task and no socket open (bounded wait for the close
    handshakes' last bytes)."""
    sockets, tasks = socket_fds(), client_tasks()
    yield
    async with asyncio.timeout(WAIT):
        while client_tasks() - tasks or socket_fds() - sockets:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # closing sockets have no event to await
    assert not client_tasks() - tasks


async def test_async_with_leaves_nothing_behind(cluster: ChatCluster) -> None:
    """Open, talk, leave the block: no task, no socket; the node saw the 1000."""
    room = f"clean-{uuid.uuid4().hex[:8]}"
    async with nothing_left_behind():
        async with client(cluster.lb.url, room, "ann") as ann:
            await say_as(ann, "hello")
        assert ann.state == "closed" and not ann.connected


async def say_as(client: Client, text: str) -> None:
    await client.send(json.dumps({"type": "message", "name": "bob", "text": text}))
    async with asyncio.timeout(WAIT):
        while said((await client.next_message(timeout=WAIT)).data, "bob") != text:
            pass


@pytest.mark.parametrize("where", ["reading", "connecting"])
async def test_cancelled_task_leaves_nothing_behind(cluster: ChatCluster, where: str) -> None:
    """A task inside ``async with Client`` cancelled while it reads (``async for``) or
    while entering (the upgrade in flight): CancelledError out, no task, no socket."""
    room = f"cancel-{uuid.uuid4().hex[:8]}"
    entered = asyncio.Event()

    async def bot() -> None:
        async with client(cluster.lb.url, room, "ann") as ann:
            entered.set()
            async for _ in ann:
                pass

    async with nothing_left_behind():
        task = asyncio.create_task(bot())
        if where == "reading":
            async with asyncio.timeout(WAIT):
                await entered.wait()
        else:
            await asyncio.sleep(0)  # the task starts its upgrade
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_cancelled_in_backoff_leaves_nothing_behind(fresh_cluster: ChatCluster) -> None:
    """Every node gone: the client is reconnecting (in its backoff, upgrades refused by
    haproxy); cancelling the task that reads it leaves no task and no socket."""
    cluster = fresh_cluster
    room = f"backoff-{uuid.uuid4().hex[:8]}"

    async def bot(reconnecting: asyncio.Event) -> None:
        async with client(cluster.lb.url, room, "ann") as ann:
            async for event in ann:
                if isinstance(event, Reconnecting) and event.attempt >= 3:
                    reconnecting.set()

    async with nothing_left_behind():
        reconnecting = asyncio.Event()
        task = asyncio.create_task(bot(reconnecting))
        await asyncio.sleep(0)
        for node in cluster.nodes:
            await asyncio.to_thread(node.kill)
        async with asyncio.timeout(WAIT):
            await reconnecting.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_first_connect_to_nothing_fails_fast(cluster: ChatCluster) -> None:
    """A wrong port is a ConnectError at once, not a retry loop; nothing left behind."""
    async with nothing_left_behind():
        with pytest.raises(ConnectError):
            async with Client("ws://127.0.0.1:9/chat", initial_delay=0.1):
                raise AssertionError("connected to nothing")
