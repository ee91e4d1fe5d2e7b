"""The Python roomcast.v1 client: its parts without I/O, then the client against a fake
v1 server (tests/fake_v1.py) over real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import pytest
from aiohttp import WSMsgType, web
from yarl import URL

from roomcast.node.client import (
    Backoff,
    Client,
    ClientError,
    Closed,
    ConnectError,
    Error,
    Joined,
    Left,
    Lost,
    Message,
    NotConnected,
    Open,
    Position,
    PositionBook,
    Reconnecting,
    SubprotocolError,
    close_action,
    parse_binary,
    parse_text,
)
from tests.fake_v1 import FakeV1, Room, validate_since

Serve = Callable[[web.Application], Awaitable[str]]


class Delays(TypedDict):
    initial_delay: float
    max_delay: float
    going_away_delay: float


FAST = Delays(initial_delay=0.01, max_delay=0.05, going_away_delay=0.01)


# ---------------------------------------------------------------------------- parsing


def test_parse_text_reads_every_frame_type() -> None:
    """Each server frame of docs/protocol.md becomes its typed event, fields intact."""
    assert parse_text('{"type":"welcome","protocol":"roomcast.v1","node":"n1",'
                      '"connection":"n1.4"}') == [Open("n1", "n1.4")]
    assert parse_text('{"type":"message","room":"lobby","epoch":"f3k9q2","offset":42,'
                      '"data":"hello"}') == [Message("lobby", "hello", Position("f3k9q2", 42))]
    assert parse_text('{"type":"message","data":"just for you"}') == [
        Message(None, "just for you")]
    assert parse_text('{"type":"joined","room":"lobby","epoch":"k81zz0","offset":5,'
                      '"recovered":false,"reason":"epoch","replayed":0}') == [
        Joined("lobby", False, "epoch", 0, Position("k81zz0", 5))]
    assert parse_text('{"type":"joined","room":"plain"}') == [Joined("plain")]
    assert parse_text('{"type":"left","room":"lobby"}') == [Left("lobby")]
    assert parse_text('{"type":"lost","room":"r","epoch":"e","offset":57,"reason":"epoch"}'
                      ) == [Lost("r", Position("e", 57), "epoch")]
    assert parse_text('{"type":"error","code":"forbidden","message":"no","room":"admin"}'
                      ) == [Error("forbidden", "no", "admin")]


def test_parse_text_unpacks_a_batch_in_order() -> None:
    """A batch yields its messages in order, as if each had its own frame."""
    frame = {"type": "batch", "messages": [
        {"type": "message", "room": "r", "epoch": "e", "offset": 44, "data": "a"},
        {"type": "message", "room": "r", "epoch": "e", "offset": 45, "data": "b"}]}
    assert parse_text(json.dumps(frame)) == [Message("r", "a", Position("e", 44)),
                                             Message("r", "b", Position("e", 45))]


def test_parse_text_ignores_unknown_types_and_fields() -> None:
    """Later v1 versions may add frame types and fields: both are ignored, not errors."""
    assert parse_text('{"type":"presence","who":["ann"]}') == []
    assert parse_text('{"type":"left","room":"r","extra":{"x":1}}') == [Left("r")]


@pytest.mark.parametrize(("frame", "says"), [
    ("not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    ('{"type": 3}', "string 'type'"),
    ('{"type":"message","room":"r","data":7}', "'data' must be a string"),
    ('{"type":"message","room":"r","epoch":"bad epoch","offset":1,"data":"x"}', "bad epoch"),
    ('{"type":"message","room":"r","epoch":"e","offset":-1,"data":"x"}', "bad offset"),
    ('{"type":"message","room":"r","epoch":"e","offset":true,"data":"x"}', "bad offset"),
    ('{"type":"message","room":"r","epoch":"e","data":"x"}', "bad offset"),
    ('{"type":"message","epoch":"e","offset":1,"data":"x"}', "without a room"),
    ('{"type":"joined","room":"r","recovered":"yes"}', "'recovered'"),
    ('{"type":"welcome","node":"n"}', "'connection'"),
    ('{"type":"lost","room":"r"}', "bad epoch"),
    ('{"type":"batch","messages":"x"}', "must be a list"),
])
def test_parse_text_turns_a_broken_frame_into_an_error(frame: str, says: str) -> None:
    """A frame that breaks the protocol is one client-side bad_frame Error saying why."""
    [event] = parse_text(frame)
    assert isinstance(event, Error)
    assert (event.code, event.source) == ("bad_frame", "client")
    assert says in event.message


def test_a_broken_batch_entry_spoils_only_itself() -> None:
    """In a batch, a broken entry becomes an Error in its place; the others are kept."""
    frame = {"type": "batch", "messages": [
        {"type": "message", "data": "a"}, 5, {"type": "joined", "room": "r"},
        {"type": "message", "data": "b"}]}
    events = parse_text(json.dumps(frame))
    assert [type(e) for e in events] == [Message, Error, Error, Message]
    assert [e.data for e in events if isinstance(e, Message)] == ["a", "b"]


def test_parse_binary_splits_header_and_bytes() -> None:
    """A binary frame is a JSON header, 0x0A, then bytes (which may hold 0x0A too)."""
    frame = b'{"type":"message","room":"lobby","epoch":"f3k9q2","offset":43}\n\x00\n\xff'
    assert parse_binary(frame) == [Message("lobby", b"\x00\n\xff", Position("f3k9q2", 43))]
    assert parse_binary(b'{"type":"message"}\n') == [Message(None, b"")]
    assert parse_binary(b'{"type":"future"}\nxyz') == []


@pytest.mark.parametrize(("frame", "says"), [
    (b'{"type":"message"}', "no 0x0A"),
    (b'\xff\xfe\n', "header"),
    (b'{"type":"joined","room":"r"}\n', "only messages"),
    (b'[1]\nabc', "JSON object"),
])
def test_parse_binary_rejects_a_broken_frame(frame: bytes, says: str) -> None:
    """A binary frame without a header line, or with a bad header, is a bad_frame Error."""
    [event] = parse_binary(frame)
    assert isinstance(event, Error) and event.code == "bad_frame"
    assert says in event.message


# ---------------------------------------------------------------------------- positions


def test_position_book_drops_duplicates_within_an_epoch() -> None:
    """Same epoch and offset not after the held one is a duplicate; a new epoch is not."""
    book = PositionBook()
    assert book.accept("r", Position("e1", 5))
    assert not book.accept("r", Position("e1", 5))
    assert not book.accept("r", Position("e1", 3))
    assert book.accept("r", Position("e1", 7))  # a jump is not a duplicate (exclusions)
    assert book.accept("r", Position("e2", 1))
    assert book.get("r") == Position("e2", 1)


def test_position_book_is_bounded_and_evicts_the_least_recent() -> None:
    """A long session over many rooms keeps at most max_rooms, dropping the stalest."""
    book = PositionBook(max_rooms=3)
    for i in range(1000):
        book.accept(f"room{i % 10}", Position("e", i))
    assert len(book) == 3
    assert list(book.snapshot()) == ["room7", "room8", "room9"]
    book.accept("room7", Position("e", 5000))
    assert list(book.snapshot()) == ["room8", "room9", "room7"]
    book.forget("room8")
    assert list(book.snapshot()) == ["room9", "room7"]


def test_position_book_keeps_only_declarable_rooms() -> None:
    """A room the protocol would refuse in roomcast.since (over 200 characters) is not held."""
    book = PositionBook()
    assert book.accept("x" * 201, Position("e", 1))
    assert len(book) == 0


def test_since_is_valid_json_within_the_length_budget() -> None:
    """since() encodes rooms most recent first and leaves out what does not fit."""
    book = PositionBook(initial={"a": ("e1", 1), "b+c &d/é": ("e2", 2), "z" * 150: ("e3", 3)})
    assert validate_since(book.since(4096) or "") == {
        "a": ("e1", 1), "b+c &d/é": ("e2", 2), "z" * 150: ("e3", 3)}
    small = book.since(120)
    assert small is not None and validate_since(small) == {"b+c &d/é": ("e2", 2), "a": ("e1", 1)}
    assert PositionBook().since(4096) is None


@pytest.mark.parametrize("bad", [{"": ("e", 1)}, {"r": ("bad epoch", 1)}, {"r": ("e", -1)},
                                 {"r": ("e", 2**53)}])
def test_initial_positions_are_validated(bad: dict[str, tuple[str, int]]) -> None:
    """Positions given by the application are checked like the protocol checks them."""
    with pytest.raises(ValueError, match=r"positions|room name"):
        PositionBook(initial=bad)


def test_position_book_refuses_more_rooms_than_the_protocol_allows() -> None:
    """max_rooms above the protocol's 100 would earn a 400 on reconnect: refused early."""
    with pytest.raises(ValueError, match=r"1\.\.100"):
        PositionBook(max_rooms=101)


# ---------------------------------------------------------------------------- backoff


def test_backoff_grows_by_factor_and_is_capped() -> None:
    """Ceilings double from initial_delay up to max_delay; delays are random * ceiling."""
    backoff = Backoff(initial_delay=0.5, max_delay=30.0, factor=2.0, random=lambda: 1.0)
    delays = [backoff.next(1006)[1] for _ in range(10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert backoff.attempt == 10
    backoff.attempt = 100_000
    assert backoff.next(1006)[1] == 30.0  # no overflow however long it retries


def test_backoff_full_jitter_stays_within_bounds() -> None:
    """With full jitter every delay lies in [0, ceiling] and they spread over it."""
    rng = random.Random(7)
    backoff = Backoff(initial_delay=0.5, max_delay=4.0, random=rng.random)
    for attempt in range(1, 8):
        ceiling = backoff.ceiling(attempt)
        samples = []
        for _ in range(200):
            backoff.attempt = attempt - 1
            samples.append(backoff.next(1011)[1])
        assert all(0 <= d <= ceiling for d in samples)
        assert min(samples) < ceiling * 0.1 and max(samples) > ceiling * 0.9


def test_backoff_after_going_away_is_prompt_then_grows() -> None:
    """1001 after a stable connection waits 0..going_away_delay; repeated failures back off."""
    backoff = Backoff(initial_delay=0.5, max_delay=30.0, going_away_delay=1.0,
                      random=lambda: 0.5)
    assert backoff.next(1001) == (1, 0.5)
    assert backoff.next(1001) == (2, 0.5)  # 0.5 * ceiling 1.0
    assert backoff.next(1006) == (3, 1.0)
    backoff.stable()
    assert backoff.next(1006) == (1, 0.25)


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"initial_delay": 0}, ValueError), ({"max_delay": 0.1}, ValueError),
    ({"factor": 0.5}, ValueError), ({"going_away_delay": -1}, ValueError),
    ({"initial_delay": "1"}, TypeError), ({"max_delay": float("nan")}, TypeError),
])
def test_backoff_settings_are_validated(kwargs: dict[str, object], error: type) -> None:
    """Nonsense backoff settings fail at construction with what is wrong."""
    with pytest.raises(error):
        Backoff(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("code", "action"), [
    (1000, "final"), (1002, "final"), (1003, "final"), (1007, "final"), (1008, "final"),
    (1009, "final"), (1010, "final"), (4000, "final"), (4003, "final"), (4499, "final"),
    (4001, "final"), (1001, "retry"), (1005, "retry"), (1006, "retry"), (1011, "retry"),
    (1012, "retry"), (1013, "retry"), (1014, "retry"), (4500, "retry"), (4999, "retry"),
    (None, "retry"),
])
def test_close_codes_follow_the_protocol(code: int | None, action: str) -> None:
    """The close codes docs/protocol.md calls final stop; the others reconnect."""
    assert close_action(code, can_refresh=False) == action


def test_token_expired_refreshes_only_with_a_hook() -> None:
    """4001 asks for a refreshed URL when the application gave a refresh hook."""
    assert close_action(4001, can_refresh=True) == "refresh"
    assert close_action(4003, can_refresh=True) == "final"


# ---------------------------------------------------------------------------- live


@dataclass
class Live:
    fake: FakeV1
    url: str


@pytest.fixture
async def live(serve: Serve) -> AsyncIterator[Live]:
    """The fake v1 server on a real loopback port."""
    fake = FakeV1()
    base = await serve(fake.app)
    yield Live(fake, base.replace("http", "ws") + "/chat")


def client_tasks() -> list[asyncio.Task[object]]:
    """Tasks of the client side (our loop, aiohttp's client internals); the fake server's
    own handler tasks end on their own schedule and are not the client's to clean up."""
    found = []
    for task in asyncio.all_tasks():
        if task is asyncio.current_task():
            continue
        code = getattr(task.get_coro(), "cr_code", None)
        filename = code.co_filename.replace(os.sep, "/") if code is not None else ""
        if filename.endswith("node/client.py") or (
                "/aiohttp/" in filename and "/aiohttp/web" not in filename):
            found.append(task)
    return found


async def test_connect_welcome_and_messages(live: Live) -> None:
    """The client offers roomcast.v1, keeps the app's query, and yields the welcome, text
    and binary messages with positions, room-less messages, and joined."""
    await live.fake.publish("lobby", "old")
    async with Client(live.url + "?room=lobby&name=ann", **FAST) as client:
        conn = await live.fake.accept()
        assert conn.ws.ws_protocol == "roomcast.v1"
        assert live.fake.handshakes[0] == {"room": "lobby", "name": "ann"}
        assert client.node == "fake" and client.connection_id == conn.id
        assert await client.next_event() == Open("fake", conn.id)
        epoch = live.fake.room("lobby").epoch
        assert await client.next_event() == Joined("lobby", None, None, 0, Position(epoch, 1))
        await live.fake.publish("lobby", "hello")
        await live.fake.publish("lobby", b"\x00\n\x01")
        await conn.send({"type": "message", "data": "just for you"})
        assert await client.next_event() == Message("lobby", "hello", Position(epoch, 2))
        assert await client.next_event() == Message("lobby", b"\x00\n\x01", Position(epoch, 3))
        assert await client.next_event() == Message(None, "just for you")
        assert client.positions == {"lobby": Position(epoch, 3)}


async def test_send_text_and_binary(live: Live) -> None:
    """send() delivers str as a text frame and bytes as a binary frame."""
    async with Client(live.url, **FAST) as client:
        conn = await live.fake.accept()
        await client.send("hi")
        await client.send(b"\x00\xff")
        first, second = await conn.receive(), await conn.receive()
        assert (first.type, first.data) == (WSMsgType.TEXT, "hi")
        assert (second.type, second.data) == (WSMsgType.BINARY, b"\x00\xff")
        with pytest.raises(TypeError):
            await client.send(3)  # type: ignore[arg-type]


async def test_first_connect_without_subprotocol_fails_clearly(live: Live) -> None:
    """A route that answers without roomcast.v1 raises SubprotocolError and leaves nothing."""
    live.fake.subprotocol = False
    client = Client(live.url, **FAST)
    with pytest.raises(SubprotocolError, match=r"server does not speak roomcast\.v1"):
        await client.connect()
    conn = await live.fake.accept()
    assert await conn.wait_closed() == 1000
    assert not client_tasks()
    assert client.state == "closed"


async def test_first_connect_refused_fails_with_status(live: Live) -> None:
    """An upgrade refused with an HTTP status raises ConnectError carrying it."""
    live.fake.refuse = [403]
    client = Client(live.url, **FAST)
    with pytest.raises(ConnectError) as info:
        await client.connect()
    assert info.value.status == 403
    closed = await client.next_event(timeout=1)  # iterating it later ends, never hangs
    assert isinstance(closed, Closed) and closed.status == 403
    with pytest.raises(StopAsyncIteration):
        await client.__anext__()


async def test_first_connect_to_nothing_fails(live: Live) -> None:
    """Nobody listening: ConnectError at once, no retry loop left running."""
    with pytest.raises(ConnectError, match="cannot connect"):
        await Client("ws://127.0.0.1:1/chat", **FAST).connect()
    assert not client_tasks()


async def test_reconnect_resumes_exactly_once(serve: Serve) -> None:
    """After a dropped socket the client reconnects, declares its position, and gets the
    missed messages once: the replayed overlap is dropped as duplicates."""
    fake = FakeV1(overlap=2)
    url = (await serve(fake.app)).replace("http", "ws") + "/chat?room=lobby"
    async with Client(url, **FAST) as client:
        conn = await fake.accept()
        for i in range(3):
            await fake.publish("lobby", f"m{i}")
        assert [(await client.next_message()).data for _ in range(3)] == ["m0", "m1", "m2"]
        conn.kill()
        for i in range(3, 5):  # published while the client is away
            await fake.publish("lobby", f"m{i}")
        reconnecting = await client.wait_for(Reconnecting)
        assert (reconnecting.attempt, reconnecting.code) == (1, 1006)
        assert 0 <= reconnecting.delay <= FAST["initial_delay"]
        await fake.accept()
        epoch = fake.room("lobby").epoch
        assert validate_since(fake.handshakes[1]["roomcast.since"]) == {"lobby": (epoch, 3)}
        assert fake.handshakes[1]["roomcast.previous"] == conn.id, "the positions' connection"
        assert "roomcast.previous" not in fake.handshakes[0]
        assert fake.handshakes[1]["room"] == "lobby"
        assert (await client.wait_for(Open)).reconnect
        missed = [await client.next_event(), await client.next_event()]
        assert missed == [Message("lobby", "m3", Position(epoch, 4)),
                          Message("lobby", "m4", Position(epoch, 5))]
        assert await client.next_event() == Joined("lobby", True, None, 4, Position(epoch, 5))
        assert client.duplicates == 2
        await fake.publish("lobby", "live")
        assert await client.next_message() == Message("lobby", "live", Position(epoch, 6))


async def test_going_away_reconnects_promptly_with_jitter(live: Live) -> None:
    """1001 (a draining node) reconnects after random() * going_away_delay, attempt 1."""
    async with Client(live.url, initial_delay=5, max_delay=30, going_away_delay=0.2,
                      stable_after=1e-9, random=lambda: 0.25) as client:
        conn = await live.fake.accept()
        await client.wait_for(Open)
        await conn.close(1001, "node draining")
        event = await client.wait_for(Reconnecting)
        assert event == Reconnecting(1, 0.05, 1001, "node draining")
        await live.fake.accept()
        assert (await client.wait_for(Open)).reconnect


@pytest.mark.parametrize("code", [1000, 1008, 4003])
async def test_final_close_codes_stop_for_good(live: Live, code: int) -> None:
    """A final close code ends the client: a Closed event, no task, no new handshake."""
    async with Client(live.url, **FAST) as client:
        conn = await live.fake.accept()
        await client.wait_for(Open)
        await conn.close(code, "no more")
        assert await client.wait_for(Closed) == Closed(code, "no more")
        with pytest.raises(StopAsyncIteration):
            await client.__anext__()
        assert client.state == "closed"
        assert not client_tasks()
        assert len(live.fake.handshakes) == 1
        with pytest.raises(NotConnected):
            await client.send("late")


async def test_backoff_grows_while_reconnects_fail(live: Live) -> None:
    """Failing reconnects (503) back off by factor with the attempt counted up; a refusal
    is reported as an Error; the first success resets nothing until it is stable."""
    async with Client(live.url, initial_delay=0.01, max_delay=0.04, factor=2.0,
                      stable_after=60, random=lambda: 0.5) as client:
        conn = await live.fake.accept()
        live.fake.refuse = [503, 503, 503, 503]
        conn.kill()
        attempts = []
        for _ in range(5):
            event = await client.wait_for(Reconnecting)
            attempts.append((event.attempt, event.delay))
            if event.attempt > 1:
                assert event.code is None and "HTTP 503" in event.reason
        assert attempts == [(1, 0.005), (2, 0.01), (3, 0.02), (4, 0.02), (5, 0.02)]
        await live.fake.accept()
        assert (await client.wait_for(Open)).reconnect


async def test_refused_reconnect_with_a_client_error_status_is_final(live: Live) -> None:
    """A reconnect refused with 404 will not get better: Closed with the HTTP status."""
    async with Client(live.url, **FAST) as client:
        conn = await live.fake.accept()
        live.fake.refuse = [404]
        conn.kill()
        error = await client.wait_for(Error)
        assert error.code == "handshake" and "HTTP 404" in error.message
        closed = await client.wait_for(Closed)
        assert (closed.code, closed.status, closed.by_client) == (None, 404, False)


async def test_token_expired_calls_refresh_and_uses_its_url(live: Live) -> None:
    """4001 awaits the refresh hook and reconnects with the URL it returns."""
    calls = 0

    async def refresh() -> str:
        nonlocal calls
        calls += 1
        return "?room=lobby&token=fresh"

    async with Client(live.url + "?room=lobby&token=old", refresh=refresh, **FAST) as client:
        conn = await live.fake.accept()
        await conn.close(4001, "token expired")
        assert (await client.wait_for(Reconnecting)).code == 4001
        await live.fake.accept()
        assert calls == 1
        assert live.fake.handshakes[-1]["token"] == "fresh"
        assert client.url.query["token"] == "fresh"


async def test_token_expired_without_refresh_or_when_refresh_gives_up(live: Live) -> None:
    """4001 with no hook, or a hook returning None, closes for good with 4001."""
    async def give_up() -> None:
        return None

    for refresh in (None, give_up):
        async with Client(live.url, refresh=refresh, **FAST) as client:
            conn = await live.fake.accept()
            await conn.close(4001, "token expired")
            assert await client.wait_for(Closed) == Closed(4001, "token expired")


async def test_a_failing_refresh_hook_is_reported_and_retried(live: Live) -> None:
    """A refresh hook that raises is an Error event; the client backs off and retries."""
    async def broken() -> str:
        raise RuntimeError("auth service down")

    async with Client(live.url, refresh=broken, **FAST) as client:
        conn = await live.fake.accept()
        await conn.close(4001, "token expired")
        error = await client.wait_for(Error)
        assert error.code == "refresh" and "auth service down" in error.message
        await live.fake.accept()
        assert (await client.wait_for(Open)).reconnect


async def test_recovery_failure_lost_and_left_update_positions(serve: Serve) -> None:
    """joined recovered=false and lost move the position to the frame's; left forgets the
    room so the next reconnect does not declare it."""
    fake = FakeV1()
    url = (await serve(fake.app)).replace("http", "ws") + "/chat?room=a&room=b"
    async with Client(url, **FAST) as client:
        conn = await fake.accept()
        await fake.publish("a", "1")
        await fake.publish("b", "1")
        await client.wait_for(Message, room="b")
        conn.kill()
        fake.rooms["a"] = Room(log=["x", "y"])  # the room's history was lost: a new epoch
        joined = await client.wait_for(Joined, room="a")
        new_epoch = fake.room("a").epoch
        assert joined == Joined("a", False, "epoch", 0, Position(new_epoch, 2))
        assert client.positions["a"] == Position(new_epoch, 2)
        conn = await fake.accept()
        await conn.send({"type": "lost", "room": "b", "epoch": "k81zz0", "offset": 57,
                         "reason": "window"})
        assert await client.wait_for(Lost) == Lost("b", Position("k81zz0", 57), "window")
        assert client.positions["b"] == Position("k81zz0", 57)
        await conn.send({"type": "left", "room": "b"})
        await client.wait_for(Left)
        assert "b" not in client.positions
        conn.kill()
        await fake.accept()
        assert set(validate_since(fake.handshakes[-1]["roomcast.since"])) == {"a"}


async def test_a_bad_frame_is_an_error_event_not_a_crash(live: Live) -> None:
    """Garbage from the server becomes Error events; the connection and loop go on."""
    async with Client(live.url, **FAST) as client:
        conn = await live.fake.accept()
        await conn.send("{not json")
        await conn.send_bytes(b"no header line")
        await conn.send({"type": "message", "data": "still here"})
        first, second = await client.wait_for(Error), await client.wait_for(Error)
        assert "not JSON" in first.message and "0x0A" in second.message
        assert (await client.next_message()).data == "still here"
        assert client.connected


async def test_server_error_frame_is_surfaced(live: Live) -> None:
    """An error frame from the server is an Error event with source "server"."""
    async with Client(live.url, **FAST) as client:
        conn = await live.fake.accept()
        await conn.send({"type": "error", "code": "forbidden", "message": "no",
                         "room": "admin"})
        assert await client.wait_for(Error) == Error("forbidden", "no", "admin", "server")


async def test_batch_frames_are_unpacked_with_duplicates_dropped(live: Live) -> None:
    """A batch's messages come out in order, each checked against the position held."""
    async with Client(live.url, **FAST) as client:
        conn = await live.fake.accept()
        await conn.send({"type": "batch", "messages": [
            {"type": "message", "room": "r", "epoch": "e", "offset": n, "data": str(n)}
            for n in (1, 2, 2, 3, 1)]})
        got = [(await client.next_message()).data for _ in range(3)]
        assert got == ["1", "2", "3"]
        assert client.duplicates == 2


async def test_send_while_reconnecting_raises(live: Live) -> None:
    """Between connections send() raises NotConnected: nothing is queued to go out late."""
    async with Client(live.url, initial_delay=5, max_delay=5, random=lambda: 0.99) as client:
        conn = await live.fake.accept()
        conn.kill()
        await client.wait_for(Reconnecting)
        assert not client.connected
        with pytest.raises(NotConnected, match="reconnecting"):
            await client.send("x")


async def test_async_with_exit_leaves_no_task_and_closes_cleanly(live: Live) -> None:
    """Leaving async with closes 1000 (the server sees it) and leaves no task behind."""
    async with Client(live.url, **FAST) as client:
        conn = await live.fake.accept()
        await client.wait_for(Open)
    assert await conn.wait_closed() == 1000
    assert not client_tasks()
    assert client.state == "closed"
    assert await client.next_event() == Closed(1000, "", by_client=True)


async def test_cancelling_a_consumer_leaves_no_task_or_socket(live: Live) -> None:
    """A task iterating the client, cancelled mid-wait, closes the socket and its loop."""
    started = asyncio.Event()

    async def consume() -> None:
        async with Client(live.url, **FAST) as client:
            started.set()
            async for _ in client:
                pass

    task = asyncio.create_task(consume())
    conn = await live.fake.accept()
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await conn.wait_closed() == 1000
    assert not client_tasks()


async def test_cancelled_while_reconnecting_leaves_nothing(live: Live) -> None:
    """Closing during a backoff wait ends the sleeping loop task too."""
    client = Client(live.url, initial_delay=5, max_delay=5, random=lambda: 0.99)
    await client.connect()
    conn = await live.fake.accept()
    conn.kill()
    await client.wait_for(Reconnecting)
    await client.close()
    assert not client_tasks()
    assert len(live.fake.handshakes) == 1


async def test_a_slow_consumer_gets_back_pressure_not_loss(live: Live) -> None:
    """With max_queue=2 the client stops reading while events wait; none is dropped."""
    async with Client(live.url, max_queue=2, **FAST) as client:
        conn = await live.fake.accept()
        for n in range(1, 51):
            await conn.send({"type": "message", "room": "r", "epoch": "e", "offset": n,
                             "data": str(n)})
        got = [int((await client.next_message()).data) for _ in range(50)]
        assert got == list(range(1, 51))


async def test_a_crash_in_the_loop_ends_iteration_with_it(live: Live,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the client's loop is raised from the iterator, not a silent hang."""
    async with Client(live.url, **FAST) as client:
        conn = await live.fake.accept()
        await client.wait_for(Open)

        async def boom(event: object) -> None:
            raise RuntimeError("bug")

        monkeypatch.setattr(client, "_handle", boom)
        await conn.send({"type": "message", "data": "x"})
        with pytest.raises(ClientError, match="loop failed") as info:
            await client.next_event()
        assert isinstance(info.value.__cause__, RuntimeError)


async def test_declared_positions_on_the_first_connect(live: Live) -> None:
    """Positions given to the constructor (e.g. saved by a tool) are declared at once,
    with room names that need percent-encoding intact."""
    room = "b+c &d/é"
    async with Client(live.url, positions={room: ("e9", 4)}, **FAST):
        await live.fake.accept()
        assert validate_since(live.fake.handshakes[0]["roomcast.since"]) == {room: ("e9", 4)}


async def test_each_reconnect_names_the_connection_before_it(serve: Serve) -> None:
    """roomcast.previous is the id from the last welcome (not the first connection's),
    and a stale one in the application's URL is never sent."""
    fake = FakeV1()
    base = (await serve(fake.app)).replace("http", "ws")
    url = base + "/chat?room=lobby&roomcast.previous=n0.1&roomcast.since=%7B%7D"
    async with Client(url, **FAST) as client:
        ids = []
        for _ in range(3):
            conn = await fake.accept()
            await client.wait_for(Open)
            assert client.connection_id == conn.id
            ids.append(conn.id)
            conn.kill()
        await fake.accept()
        await client.wait_for(Open)
    previous = [handshake.get("roomcast.previous") for handshake in fake.handshakes]
    assert previous == [None, *ids]
    assert "roomcast.since" not in fake.handshakes[0], "the stale one is not sent"
    assert all(h["room"] == "lobby" for h in fake.handshakes)


async def test_no_welcome_in_time_is_a_connect_error(serve: Serve) -> None:
    """A server that upgrades with roomcast.v1 but never welcomes: ConnectError in time."""
    async def silent(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("roomcast.v1",))
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/", silent)
    url = (await serve(app)).replace("http", "ws") + "/"
    with pytest.raises(ConnectError, match="no welcome"):
        await Client(url, connect_timeout=0.2).connect()
    assert not client_tasks()


def test_constructor_validates_settings() -> None:
    """Bad settings fail at construction with the name of the setting."""
    with pytest.raises(ValueError, match="url"):
        Client("ftp://x/")
    with pytest.raises(ValueError, match="max_queue"):
        Client("ws://x/", max_queue=0)
    with pytest.raises(ValueError, match="stable_after"):
        Client("ws://x/", stable_after=0)
    with pytest.raises(ValueError, match="1000 or 3000-4999"):
        asyncio.run(Client("ws://x/").close(1001))


# ---------------------------------------------------------------------------- roomcast.js, live

DRIVER = Path(__file__).resolve().parents[1] / "js" / "live_driver.mjs"


@pytest.fixture(scope="module")
def node_websocket() -> list[str]:
    """The command that runs Node with a WHATWG WebSocket (a flag on Node 20, built in
    from 22); skips when there is none."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (scripts/test requires it)")
    probe = "process.exit(typeof WebSocket === 'function' ? 0 : 1)"
    for command in ([node], [node, "--experimental-websocket"]):
        if subprocess.run([*command, "-e", probe], capture_output=True, timeout=30).returncode == 0:
            return command
    pytest.skip("this node has no WebSocket, not even behind --experimental-websocket")


async def test_browser_client_against_the_fake_server(serve: Serve,
                                                      node_websocket: list[str]) -> None:
    """roomcast.js over a real WebSocket against the fake server: roomcast.v1 negotiated,
    roomcast.since encoded so that aiohttp reads it back, text and binary both ways,
    resume after a dropped socket with the replayed duplicate dropped, a final close."""
    fake = FakeV1(overlap=1)
    room = "lobby é+&"
    base = (await serve(fake.app)).replace("http", "ws")
    url = URL(base + "/chat").with_query({"room": room, "name": "ann"})
    proc = await asyncio.create_subprocess_exec(
        *node_websocket, str(DRIVER), str(url), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None

    async def event() -> dict[str, Any]:
        assert proc.stdout is not None and proc.stderr is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        if not line:
            raise AssertionError((await proc.stderr.read()).decode())
        parsed: dict[str, Any] = json.loads(line)
        return parsed

    async def command(obj: dict[str, Any]) -> None:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(obj).encode() + b"\n")
        await proc.stdin.drain()

    try:
        conn = await fake.accept()
        assert conn.ws.ws_protocol == "roomcast.v1"
        assert fake.handshakes[0] == {"room": room, "name": "ann"}
        assert (await event())["type"] == "open"
        epoch = fake.room(room).epoch
        joined = await event()
        assert (joined["type"], joined["room"], joined["position"]) == (
            "joined", room, {"epoch": epoch, "offset": 0})
        await fake.publish(room, "m1")
        await fake.publish(room, b"\x00\n\x01")
        first, second = await event(), await event()
        assert (first["data"], first["position"]) == ("m1", {"epoch": epoch, "offset": 1})
        assert (second["data"], second["position"]) == ([0, 10, 1], {"epoch": epoch, "offset": 2})
        await command({"send": "hi"})
        await command({"sendBytes": [1, 2]})
        text, binary = await conn.receive(), await conn.receive()
        assert (text.type, text.data) == (WSMsgType.TEXT, "hi")
        assert (binary.type, binary.data) == (WSMsgType.BINARY, b"\x01\x02")

        conn.kill()
        await fake.publish(room, "m3")  # missed while away
        reconnecting = await event()
        assert (reconnecting["type"], reconnecting["attempt"], reconnecting["code"]) == (
            "reconnecting", 1, 1006)
        conn = await fake.accept()
        assert validate_since(fake.handshakes[1]["roomcast.since"]) == {room: (epoch, 2)}
        assert fake.handshakes[1]["room"] == room
        assert (await event())["reconnect"] is True
        missed, joined = await event(), await event()
        assert (missed["data"], missed["position"]["offset"]) == ("m3", 3)
        assert (joined["type"], joined["recovered"], joined["replayed"]) == ("joined", True, 2)

        await conn.close(1008, "policy")
        closed = await event()
        assert closed == {"type": "closed", "code": 1008, "reason": "policy", "byClient": False,
                          "duplicates": 1}
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# ---------------------------------------------------------------------------- docs


DOCS = Path(__file__).resolve().parents[2] / "README.md"


async def test_the_python_example_in_the_docs_runs(serve: Serve,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """README.md's Python example, run as written against a v1 server, sends,
    prints messages and a lost history, and ends when the server closes for good."""
    blocks = re.findall(r"```python\n(# example: client\n.*?)```", DOCS.read_text(), re.S)
    assert len(blocks) == 1, "no '# example: client' block in README.md"
    fake = FakeV1()
    namespace: dict[str, Any] = {"__name__": "docs_client"}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    namespace["URL"] = (await serve(fake.app)).replace("http", "ws") + "/chat?room=lobby&name=bot"
    task = asyncio.create_task(namespace["main"]())
    try:
        conn = await fake.accept()
        sent = await conn.receive()
        assert json.loads(sent.data) == {"type": "message", "name": "bot", "text": "hello"}
        await fake.publish("lobby", "hi bot")
        await conn.send({"type": "joined", "room": "lobby", "epoch": "k8", "offset": 3,
                         "recovered": False, "reason": "epoch"})
        await conn.close(1000)
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    out = capsys.readouterr().out.splitlines()
    assert out == ["on node fake", "lobby hi bot",
                   "missed messages in lobby are gone: reload its state"]
