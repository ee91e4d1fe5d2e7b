"""Write batching (``HubConfig.write_delay_ms``/``write_batch_bytes``): the core's cap,
the settings and their flags, and the hub's one timer over real sockets.

Nothing here measures time: the delay is checked through the timer the hub arms
(scripts/bench/batching.py measures CPU and latency).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from roomcast.node import cli
from roomcast.node.core import (
    CUT_OFF,
    FULL,
    NO_CAP,
    NOTHING,
    WRITE,
    ConnectionCore,
    ConnectionState,
    deliver,
)
from roomcast.shared.config import (
    DEFAULT_WRITE_BATCH_BYTES,
    MAX_WRITE_DELAY_MS,
    HubConfig,
)
from roomcast.shared.frames import (
    MessageReader,
    PreparedMessage,
    build_frame,
    parse_frame,
    text_frame,
)
from roomcast.shared.ids import ConnectionId
from roomcast.shared.rfc6455 import CloseCode, Opcode
from tests.node import test_write_path
from tests.node.test_write_path import ASYNCIO_ONLY, ROOM, Node, Writes, raw_client

make_node = test_write_path.make_node
"""The fixture of tests/node/test_write_path.py: a hub serving /ws, every client in ROOM."""

MakeNode = Callable[..., Awaitable[Node]]
WAIT = 10.0
LONG_DELAY = MAX_WRITE_DELAY_MS
"""A delay no test's loop turns come near, so what is collected does not depend on time."""

# -- the core: the cap -------------------------------------------------------------------


def _core(cap: int = NO_CAP, limit: int = 100_000) -> ConnectionCore:
    core = ConnectionCore(ConnectionId("n1.1"), MessageReader(4096), limit, cap)
    core.open(0, 1e12)
    return core


def test_without_a_cap_push_never_says_full() -> None:
    core = _core()
    assert core.push(b"x" * 50_000) == WRITE
    assert core.push(b"y" * 40_000) == NOTHING
    assert core.take_output() == b"x" * 50_000 + b"y" * 40_000


def test_push_says_full_once_the_batch_holds_the_cap() -> None:
    core = _core(cap=10)
    assert core.push(b"abcd") == WRITE
    assert core.push(b"efgh") == NOTHING
    assert core.push(b"ij") == FULL  # 10 bytes: at the cap
    assert core.take_output() == b"abcdefghij"
    assert core.push(b"k" * 12) == FULL  # one frame over the cap: write it alone, now
    assert core.take_output() == b"k" * 12


def test_the_slow_consumer_rule_comes_before_the_cap() -> None:
    core = _core(cap=10, limit=20)
    core.push(b"a" * 25)
    core.take_output()  # 25 bytes handed out, none sent: over the limit
    assert core.push(b"b") == CUT_OFF
    assert core.state is ConnectionState.CLOSING


def test_deliver_settles_members_whose_batch_reached_the_cap() -> None:
    frame_size = len(text_frame("m"))
    under, at = _core(cap=10 * frame_size), _core(cap=2 * frame_size)
    dirty: list[ConnectionCore] = []
    settle: list[ConnectionCore] = []
    prepared = PreparedMessage(b"m", binary=False)
    assert deliver([under, at], prepared, None, False, dirty, settle) == 2
    assert dirty == [under, at] and settle == []
    assert deliver([under, at], prepared, None, False, dirty, settle) == 2
    assert dirty == [under, at] and settle == [at]  # two frames: at's cap
    big = _core(cap=frame_size)
    dirty.clear()
    settle.clear()
    assert deliver([big], prepared, None, False, dirty, settle) == 1
    assert dirty == [] and settle == [big]  # its first frame fills it: no wait


# -- settings ----------------------------------------------------------------------------


def test_defaults_are_no_delay_and_a_64_kib_cap() -> None:
    config = HubConfig()
    assert config.write_delay_ms == 0 and config.write_delay == 0
    assert config.write_batch_bytes == DEFAULT_WRITE_BATCH_BYTES == 65536


@pytest.mark.parametrize(("kwargs", "error", "text"), [
    ({"write_delay_ms": -1}, ValueError, "write_delay_ms must be 0 (no delay) to 1000"),
    ({"write_delay_ms": 1001}, ValueError, "write_delay_ms must be 0 (no delay) to 1000"),
    ({"write_delay_ms": 2.5}, TypeError, "write_delay_ms must be an int"),
    ({"write_delay_ms": True}, TypeError, "write_delay_ms must be an int"),
    ({"write_batch_bytes": 0}, ValueError, "write_batch_bytes must be > 0"),
    ({"write_batch_bytes": "4096"}, TypeError, "write_batch_bytes must be an int"),
])
def test_bad_batching_settings_are_refused(
    kwargs: dict[str, Any], error: type[Exception], text: str
) -> None:
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        HubConfig(**kwargs)


def _cli_config(*args: str) -> HubConfig:
    parser = cli._build_parser()
    return cli.build_config(cli._resolve(parser, parser.parse_args(["serve", *args])))


def test_flags_and_environment_set_batching(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROOMCAST_WRITE_DELAY_MS", raising=False)
    monkeypatch.delenv("ROOMCAST_WRITE_BATCH_BYTES", raising=False)
    config = _cli_config()
    assert (config.write_delay_ms, config.write_batch_bytes) == (0, 65536)
    config = _cli_config("--write-delay-ms", "10", "--write-batch-bytes", "8192")
    assert (config.write_delay_ms, config.write_batch_bytes) == (10, 8192)
    monkeypatch.setenv("ROOMCAST_WRITE_DELAY_MS", "5")
    monkeypatch.setenv("ROOMCAST_WRITE_BATCH_BYTES", "1000")
    assert _cli_config().write_delay_ms == 5
    assert _cli_config().write_batch_bytes == 1000
    assert _cli_config("--write-delay-ms", "20").write_delay_ms == 20  # the flag wins


@pytest.mark.parametrize(("args", "text"), [
    (("--write-delay-ms", "-1"), "--write-delay-ms: invalid value '-1': must be 0"),
    (("--write-delay-ms", "5000"), "--write-delay-ms: invalid value '5000': must be 0"),
    (("--write-delay-ms", "1.5"), "--write-delay-ms: invalid value '1.5'"),
    (("--write-batch-bytes", "0"), "--write-batch-bytes: invalid value '0': must be > 0"),
    (("--write-batch-bytes", "lots"), "--write-batch-bytes: invalid value 'lots'"),
])
def test_bad_batching_flags_exit_2_naming_the_flag(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], text: str
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--check", *args])
    assert info.value.code == 2
    assert text in capsys.readouterr().err


def test_a_bad_environment_value_exits_2_naming_the_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROOMCAST_WRITE_DELAY_MS", "soon")
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--check"])
    assert info.value.code == 2
    assert "ROOMCAST_WRITE_DELAY_MS: invalid value 'soon'" in capsys.readouterr().err


# -- the hub over real sockets -----------------------------------------------------------


class FlushTimers:
    """Counts the loop's ``call_later``/``call_soon`` calls that schedule the hub's flush."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, node: Node) -> None:
        loop: Any = asyncio.get_running_loop()
        self.later: list[float] = []
        self.soon = 0
        real_later, real_soon = loop.call_later, loop.call_soon
        flush = node.hub._flush_all

        def call_later(delay: float, callback: Any, *args: Any, **kw: Any) -> Any:
            if callback == flush:
                self.later.append(delay)
            return real_later(delay, callback, *args, **kw)

        def call_soon(callback: Any, *args: Any, **kw: Any) -> Any:
            if callback == flush:
                self.soon += 1
            return real_soon(callback, *args, **kw)

        monkeypatch.setattr(loop, "call_later", call_later)
        monkeypatch.setattr(loop, "call_soon", call_soon)


def _frames(data: bytes) -> list[bytes]:
    view = bytearray(data)
    payloads = []
    while view:
        parsed = parse_frame(view, expect_masked=False)
        assert parsed is not None
        payloads.append(parsed[0].payload)
        del view[: parsed[1]]
    return payloads


@ASYNCIO_ONLY
async def test_frames_of_several_turns_leave_in_one_write_after_the_delay(
    make_node: MakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broadcasts and sends over many loop turns, to many members, arm one timer for the
    whole hub with the delay; until it fires nothing is written, then each member gets
    one write with its frames in order."""
    node = await make_node(write_delay_ms=LONG_DELAY)
    writes = Writes()
    async with aiohttp.ClientSession() as session:
        clients = [await session.ws_connect(node.base + "/ws") for _ in range(3)]
        conns = [await asyncio.wait_for(node.opened.get(), 5) for _ in clients]
        for conn in conns:
            writes.watch(conn)
        timers = FlushTimers(monkeypatch, node)
        loop = asyncio.get_running_loop()
        before = loop.time()
        for i in range(10):
            await node.hub.broadcast_to_room(ROOM, f"m{i}")
            await asyncio.sleep(0)  # a new loop turn
        await conns[0].send_text("just for 0")
        after = loop.time()
        assert timers.later == [LONG_DELAY / 1000] and timers.soon == 0
        timer = node.hub._flush_timer
        assert timer is not None
        # written at most the delay after the first frame
        assert before + LONG_DELAY / 1000 <= timer.when() <= after + LONG_DELAY / 1000
        assert all(not writes.calls[c.id] for c in conns)
        for client in clients:
            got = [(await client.receive(timeout=WAIT)).data for _ in range(10)]
            assert got == [f"m{i}" for i in range(10)]
        assert (await clients[0].receive(timeout=WAIT)).data == "just for 0"
        expected = b"".join(text_frame(f"m{i}") for i in range(10))
        assert writes.calls[conns[1].id] == [expected]
        assert writes.calls[conns[2].id] == [expected]
        assert writes.calls[conns[0].id] == [expected + text_frame("just for 0")]
        assert node.hub._flush_timer is None
        # the next frame arms the next timer
        await node.hub.broadcast_to_room(ROOM, "later")
        assert timers.later == [LONG_DELAY / 1000] * 2
        assert (await clients[2].receive(timeout=WAIT)).data == "later"
        assert writes.calls[conns[2].id][1] == text_frame("later")
        for client in clients:
            await client.close()


@ASYNCIO_ONLY
async def test_a_batch_leaves_early_at_the_cap_and_order_is_kept(
    make_node: MakeNode,
) -> None:
    """With a cap of three frames, ten frames in one turn leave as 3 + 3 + 3 at once and
    the last one when the delay is over; the stream is in order."""
    frame_size = len(text_frame("f0"))
    node = await make_node(write_delay_ms=LONG_DELAY, write_batch_bytes=3 * frame_size)
    writes = Writes()
    async with aiohttp.ClientSession() as session:
        client = await session.ws_connect(node.base + "/ws")
        conn = await asyncio.wait_for(node.opened.get(), 5)
        writes.watch(conn)
        for i in range(9):
            await node.hub.broadcast_to_room(ROOM, f"f{i}")
        await conn.send_text("f9")
        calls = writes.calls[conn.id]
        assert [len(c) for c in calls] == [3 * frame_size] * 3  # before the timer
        got = [(await client.receive(timeout=WAIT)).data for _ in range(10)]
        assert got == [f"f{i}" for i in range(10)]
        assert [len(c) for c in calls] == [3 * frame_size] * 3 + [frame_size]
        assert [p.decode() for c in calls for p in _frames(c)] == [f"f{i}" for i in range(10)]
        await client.close()


async def test_a_member_that_reads_gets_everything_in_order_with_a_delay(
    make_node: MakeNode,
) -> None:
    """Many turns of broadcasts and direct sends with a 5 ms delay: nothing lost, nothing
    reordered, on every loop."""
    node = await make_node(write_delay_ms=5, write_batch_bytes=1000)
    async with aiohttp.ClientSession() as session:
        client = await session.ws_connect(node.base + "/ws")
        conn = await asyncio.wait_for(node.opened.get(), 5)
        expected = []
        for i in range(300):
            if i % 7 == 0:
                await conn.send_text(f"d{i}")
                expected.append(f"d{i}")
            else:
                await node.hub.broadcast_to_room(ROOM, f"b{i}" + "x" * (i % 50))
                expected.append(f"b{i}" + "x" * (i % 50))
            if i % 10 == 0:
                await asyncio.sleep(0)
        async with asyncio.timeout(WAIT):
            got = [(await client.receive()).data for _ in expected]
        assert got == expected
        await client.close()


@ASYNCIO_ONLY
async def test_no_delay_is_one_write_per_turn_and_no_timer(
    make_node: MakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default: every turn's frames leave at the end of that turn (call_soon), with
    no cap and no timer."""
    node = await make_node()
    writes = Writes()
    async with aiohttp.ClientSession() as session:
        client = await session.ws_connect(node.base + "/ws")
        conn = await asyncio.wait_for(node.opened.get(), 5)
        assert conn._batch_cap == NO_CAP
        writes.watch(conn)
        timers = FlushTimers(monkeypatch, node)
        for turn in range(3):
            for i in range(4):
                await node.hub.broadcast_to_room(ROOM, f"t{turn}m{i}")
            for i in range(4):
                assert (await client.receive(timeout=WAIT)).data == f"t{turn}m{i}"
        assert timers.later == [] and timers.soon == 3
        assert node.hub._flush_timer is None
        assert [len(_frames(c)) for c in writes.calls[conn.id]] == [4, 4, 4]
        await client.close()


async def test_close_writes_the_batch_before_the_close_frame(make_node: MakeNode) -> None:
    """Closing a connection does not wait for the delay: what was batched goes first,
    then the close frame; the hub's close does the same for every client (1001)."""
    node = await make_node(write_delay_ms=LONG_DELAY)
    async with aiohttp.ClientSession() as session:
        one = await session.ws_connect(node.base + "/ws")
        conn = await asyncio.wait_for(node.opened.get(), 5)
        two = await session.ws_connect(node.base + "/ws")
        await asyncio.wait_for(node.opened.get(), 5)
        await node.hub.broadcast_to_room(ROOM, "before close")
        closing = asyncio.ensure_future(conn.close(CloseCode.NORMAL, "bye"))
        assert (await one.receive(timeout=WAIT)).data == "before close"
        msg = await one.receive(timeout=WAIT)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == CloseCode.NORMAL
        await asyncio.wait_for(closing, WAIT)
        assert (await two.receive(timeout=WAIT)).data == "before close"
        await node.hub.broadcast_to_room(ROOM, "before shutdown")
        shutdown = asyncio.ensure_future(node.hub.close(drain_seconds=WAIT))
        assert (await two.receive(timeout=WAIT)).data == "before shutdown"
        msg = await two.receive(timeout=WAIT)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == CloseCode.GOING_AWAY
        await asyncio.wait_for(shutdown, WAIT)
        assert node.hub._flush_timer is None


async def test_a_raw_client_sees_the_batch_as_one_read(make_node: MakeNode) -> None:
    """On the wire: a batch is ordinary frames back to back (no new framing)."""
    node = await make_node(write_delay_ms=LONG_DELAY)
    sock, conn = await raw_client(node)
    try:
        loop = asyncio.get_running_loop()
        for i in range(5):
            await node.hub.broadcast_to_room(ROOM, f"w{i}")
        stream = bytearray()
        async with asyncio.timeout(WAIT):
            while True:
                stream += await loop.sock_recv(sock, 65536)
                head = stream.find(b"\r\n\r\n")
                if head >= 0 and len(stream) - head - 4 >= 5 * len(text_frame("w0")):
                    break
        del stream[: stream.index(b"\r\n\r\n") + 4]
        assert [p.decode() for p in _frames(bytes(stream))] == [f"w{i}" for i in range(5)]
        assert conn.state is ConnectionState.OPEN
    finally:
        sock.close()


@ASYNCIO_ONLY
async def test_a_direct_send_that_fills_the_batch_is_written_at_once(
    make_node: MakeNode,
) -> None:
    """``Connection.send_text`` (the enqueue path) also writes a batch that reached the
    cap at once, with what was collected before it, in order."""
    node = await make_node(write_delay_ms=LONG_DELAY, write_batch_bytes=100)
    writes = Writes()
    async with aiohttp.ClientSession() as session:
        client = await session.ws_connect(node.base + "/ws")
        conn = await asyncio.wait_for(node.opened.get(), 5)
        writes.watch(conn)
        await conn.send_text("small")
        assert writes.calls.get(conn.id) == []  # waits for the delay
        await conn.send_text("b" * 120)
        assert writes.calls[conn.id] == [text_frame("small") + text_frame("b" * 120)]
        assert (await client.receive(timeout=WAIT)).data == "small"
        assert (await client.receive(timeout=WAIT)).data == "b" * 120
        await client.close()


@ASYNCIO_ONLY
async def test_a_message_from_the_client_does_not_cut_its_batch_short(
    make_node: MakeNode, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reading from a client writes its batch only when the client pinged (the pong goes
    out at once, after the frames before it); otherwise the batch waits for the timer."""
    from roomcast.node.asyncio_protocol import WebSocketProtocol

    reads: asyncio.Queue[None] = asyncio.Queue()
    real = WebSocketProtocol._received

    def received(self: WebSocketProtocol, events: Any) -> None:
        real(self, events)
        reads.put_nowait(None)

    monkeypatch.setattr(WebSocketProtocol, "_received", received)
    node = await make_node(write_delay_ms=LONG_DELAY)
    writes = Writes()
    async with aiohttp.ClientSession() as session:
        client = await session.ws_connect(node.base + "/ws", autoping=False)
        conn = await asyncio.wait_for(node.opened.get(), 5)
        writes.watch(conn)
        await node.hub.broadcast_to_room(ROOM, "batched")
        await client.send_str("hello")
        await asyncio.wait_for(reads.get(), WAIT)
        assert writes.calls[conn.id] == []
        await client.ping(b"p")
        await asyncio.wait_for(reads.get(), WAIT)
        assert writes.calls[conn.id] == [
            text_frame("batched") + build_frame(Opcode.PONG, b"p")]
        assert (await client.receive(timeout=WAIT)).data == "batched"
        assert (await client.receive(timeout=WAIT)).type is aiohttp.WSMsgType.PONG
        await client.close()
