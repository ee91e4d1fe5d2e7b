"""The demo chat in rooms with history, on real sockets: a ``roomcast.v1`` client sees
the room's recent messages on join and, reconnecting, exactly what it missed; a raw
client sees the chat exactly as before."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import websockets
from aiohttp import web

from roomcast.node import HUB, Hub, HubConfig
from roomcast.node.app import create_app
from roomcast.node.client import Client, Joined, Message, Position
from roomcast.node.demo import CHAT_REPLAY
from roomcast.shared.history import History, HistoryPolicy
from roomcast.shared.ids import Room
from roomcast.shared.rfc6455 import CloseCode

Serve = Callable[[web.Application], Awaitable[str]]

FAST = {"initial_delay": 0.01, "max_delay": 0.05, "going_away_delay": 0.01}
HISTORY = HubConfig(history=HistoryPolicy(History(200, 60)))


class Chat:
    """A demo node with history on, and raw chat members talking in it."""

    def __init__(self, url: str, hub: Hub) -> None:
        self.ws_url = url.replace("http://", "ws://")
        self.hub = hub

    def chat(self, name: str, room: str = "lobby") -> str:
        return f"{self.ws_url}/chat?room={room}&name={name}"

    async def history(self, room: str = "lobby") -> list[tuple[str, int, str]]:
        """Every message of the room's history: (epoch, offset, text)."""
        page = await self.hub.room_history(Room(room), since=0, limit=1000)
        return [(e.epoch, e.offset, e.payload.decode()) for e in page.envelopes]


@pytest.fixture
async def node(serve: Serve) -> AsyncIterator[Chat]:
    app = create_app(HISTORY)
    yield Chat(await serve(app), app[HUB])


def notice(kind: str, name: str, members: int | None) -> str:
    return json.dumps({"type": kind, "name": name, "members": members})


async def recv(ws: websockets.ClientConnection) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), 5)


async def test_raw_chat_client_is_unchanged_in_a_room_with_history(node: Chat) -> None:
    """A client without the subprotocol gets no replay: its own join notice first, then the
    room's live messages as plain text, as before history."""
    async with websockets.connect(node.chat("ann")) as ann:
        assert ann.subprotocol is None
        assert await recv(ann) == notice("join", "ann", 1)
        await ann.send("hello")
        assert await recv(ann) == "hello"
        async with websockets.connect(node.chat("bob")) as bob:
            assert await recv(bob) == notice("join", "bob", 2)  # nothing from before
            assert await recv(ann) == notice("join", "bob", 2)
            await bob.send(b"\x01bin")
            assert await recv(bob) == b"\x01bin"
            assert await recv(ann) == b"\x01bin"


async def test_v1_client_sees_recent_history_on_join(node: Chat) -> None:
    """A roomcast.v1 client that joins the chat gets what the room said before it came, in
    order with positions, then joined (no recovery asked), then live messages."""
    async with websockets.connect(node.chat("ann")) as ann:
        assert await recv(ann) == notice("join", "ann", 1)
        for text in ("one", "two"):
            await ann.send(text)
            assert await recv(ann) == text
        before = await node.history()
        assert [t for _, _, t in before] == [notice("join", "ann", 1), "one", "two"]
        epoch = before[0][0]
        async with Client(node.chat("bob"), **FAST) as bob:
            replayed = [await bob.next_message() for _ in before]
            assert replayed == [Message("lobby", text, Position(e, o)) for e, o, text in before]
            joined = await bob.wait_for(Joined)
            assert joined == Joined("lobby", None, None, len(before),
                                    Position(epoch, before[-1][1]))
            own = await bob.next_message()
            assert own == Message("lobby", notice("join", "bob", 2),
                                  Position(epoch, before[-1][1] + 1))
            assert bob.duplicates == 0


async def test_replay_on_join_is_the_last_chat_replay_messages(node: Chat) -> None:
    """More than CHAT_REPLAY messages before the join: the newest CHAT_REPLAY, in order."""
    total = CHAT_REPLAY + 7
    async with websockets.connect(node.chat("carol")) as carol:
        assert await recv(carol) == notice("join", "carol", 1)
        async with websockets.connect(node.chat("ann")) as ann:
            assert await recv(ann) == notice("join", "ann", 2)
            for i in range(total):
                await ann.send(f"m{i}")
            for i in range(total):
                assert await recv(ann) == f"m{i}"
        for expected in [notice("join", "ann", 2), *(f"m{i}" for i in range(total))]:
            assert await recv(carol) == expected
        assert json.loads(await recv(carol))["type"] == "leave"  # stored by now
        everything = await node.history()
        assert len(everything) == total + 3
        async with Client(node.chat("bob"), **FAST) as bob:
            replayed = [await bob.next_message() for _ in range(CHAT_REPLAY)]
            assert [m.data for m in replayed] == [t for _, _, t in everything[-CHAT_REPLAY:]]
            joined = await bob.wait_for(Joined)
            assert joined.replayed == CHAT_REPLAY and joined.recovered is None


async def test_reconnect_shows_nothing_twice_and_nothing_missing(node: Chat) -> None:
    """A v1 chat client whose connection the node closes reconnects declaring its
    position: it gets exactly the messages it missed, once, in order (recovered), and
    over both connections it has seen every message of the room exactly once."""
    async with websockets.connect(node.chat("ann")) as ann:
        assert await recv(ann) == notice("join", "ann", 1)
        async with Client(node.chat("bob"), **FAST) as bob:
            seen: list[Message] = []
            seen += [await bob.next_message() for _ in range(1)]  # ann's join, replayed
            first = await bob.wait_for(Joined)
            assert first.recovered is None
            seen.append(await bob.next_message())  # bob's own join notice
            for i in range(3):
                await ann.send(f"before {i}")
            seen += [await bob.next_message() for _ in range(3)]
            old = node.hub.get_connection(bob.connection_id or "")
            assert old is not None
            await old.close(CloseCode.SERVICE_RESTART, "test: node restarts")
            for i in range(4):  # while bob is away (or reconnecting)
                await ann.send(f"during {i}")
            async with asyncio.timeout(10):
                while True:
                    event = await bob.next_event()
                    if isinstance(event, Joined):
                        break
                    if isinstance(event, Message):
                        seen.append(event)
            assert event.recovered is True, event
            await ann.send("after")
            while (message := await bob.next_message()).data != "after":
                seen.append(message)
            seen.append(message)
            assert bob.duplicates == 0
    history = await node.history()  # holds the whole room: offsets 1, 2, ... in one epoch
    assert [o for _, o, _ in history] == list(range(1, len(history) + 1))
    assert seen[-1].data == "after"
    assert [(m.position, m.data) for m in seen] == [
        (Position(e, o), t) for e, o, t in history[:len(seen)]]
    texts = [m.data for m in seen]
    for text in ("before 0", "before 2", "during 0", "during 3", "after"):
        assert texts.count(text) == 1, text
