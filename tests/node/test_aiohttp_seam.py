"""The aiohttp internals roomcast uses (node/_aiohttp.py), on whatever aiohttp is installed.

If an aiohttp release breaks the socket takeover, these fail first and say how: the
import-time check names what is missing, and the round trips say which promise broke
(bytes sent with the handshake, the handler let go, reading resumed).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import aiohttp._websocket.helpers
import aiohttp.web_urldispatcher
import pytest
import uvloop
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from roomcast.node import Connection, EventHandler, Hub, HubConfig, Message
from roomcast.node import _aiohttp as seam
from roomcast.shared import frames
from roomcast.shared.frames import build_frame
from roomcast.shared.rfc6455 import Opcode
from tests.e2e.procs import REPO
from tests.rawws import RawClient

MASK = b"\x0f\x1e\x2d\x3c"
BROKEN = f"on aiohttp {aiohttp.__version__}: "
TAKEOVER = " (node/_aiohttp.py, take_over)"


def _echo_app(**config: Any) -> web.Application:
    async def echo(conn: Connection, msg: Message) -> None:
        await conn.send(msg.data)

    hub = Hub(HubConfig(**config))
    app = web.Application()
    hub.attach(app)
    app.router.add_get("/echo", hub.route(EventHandler(on_message=echo)))
    return app


@pytest.fixture
async def runner() -> AsyncIterator[web.AppRunner]:
    """An echo hub (1 MiB messages) served on a free loopback port."""
    app_runner = web.AppRunner(_echo_app(max_message_size=1 << 20))
    await app_runner.setup()
    await web.TCPSite(app_runner, "127.0.0.1", 0).start()
    try:
        yield app_runner
    finally:
        await app_runner.cleanup()


def _port(app_runner: web.AppRunner) -> int:
    return int(app_runner.addresses[0][1])


async def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, BROKEN + what
        await asyncio.sleep(0.01)


def test_installed_aiohttp_has_everything_the_takeover_uses() -> None:
    """The import-time check passes on the installed aiohttp (else its message says why)."""
    try:
        seam._find_internals()
    except seam.AiohttpMismatchError as exc:
        pytest.fail(str(exc))


@pytest.mark.parametrize(
    ("target", "name", "named"),
    [
        (RequestHandler, "set_parser", "RequestHandler.set_parser"),
        (RequestHandler, "keep_alive", "RequestHandler.keep_alive"),
        (Server, "connection_lost", "Server.connection_lost"),
        (aiohttp._websocket.helpers, "websocket_mask", "websocket_mask"),
        (aiohttp.web_urldispatcher, "_default_expect_handler", "_default_expect_handler"),
    ],
    ids=["set_parser", "keep_alive", "connection_lost", "websocket_mask", "expect_handler"],
)
def test_a_missing_internal_is_named_with_the_releases_tested(
    monkeypatch: pytest.MonkeyPatch, target: object, name: str, named: str
) -> None:
    """An aiohttp without one of them fails the check with an ImportError that names the
    installed version, what is missing, the releases tested and what to install."""
    monkeypatch.delattr(target, name)
    with pytest.raises(ImportError) as info:
        seam._find_internals()
    message = str(info.value)
    assert isinstance(info.value, seam.AiohttpMismatchError)
    assert f"aiohttp {aiohttp.__version__}" in message
    assert named in message
    assert all(version in message for version in seam.TESTED_AIOHTTP)
    assert f"pip install 'aiohttp=={seam.TESTED_AIOHTTP[-1]}'" in message


def test_a_handler_without_its_manager_slot_or_a_wrong_mask_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A RequestHandler without ``_manager`` and a mask that does not unmask are named."""
    slots = tuple(s for s in RequestHandler.__slots__ if s != "_manager")
    monkeypatch.setattr(RequestHandler, "__slots__", slots)
    monkeypatch.setattr(aiohttp._websocket.helpers, "websocket_mask", lambda key, data: None)
    with pytest.raises(seam.AiohttpMismatchError) as info:
        seam._find_internals()
    assert "RequestHandler._manager" in str(info.value)
    assert "websocket_mask(key, bytearray) unmasking in place" in str(info.value)


@pytest.mark.skipif(bool(os.environ.get("AIOHTTP_NO_EXTENSIONS")),
                    reason="aiohttp's C extensions are turned off")
def test_client_frames_are_unmasked_by_aiohttps_compiled_xor() -> None:
    """Importing the node hands shared.frames aiohttp's compiled XOR (not the pure one)."""
    from aiohttp._websocket.helpers import websocket_mask

    assert seam.COMPILED_MASK, "aiohttp's websocket_mask is not compiled"
    current = frames.set_unmask(websocket_mask)
    assert current is websocket_mask


def test_without_aiohttps_extensions_the_node_says_so_and_still_unmasks() -> None:
    """AIOHTTP_NO_EXTENSIONS: the node imports, warns that unmasking runs in pure Python,
    and reads masked frames correctly."""
    code = (
        "from roomcast.node import _aiohttp as seam\n"
        "from roomcast.shared.frames import MessageReader, build_frame\n"
        "from roomcast.shared.rfc6455 import Opcode\n"
        "frame = build_frame(Opcode.TEXT, b'x' * 3000, mask_key=b'abcd')\n"
        "assert MessageReader(4096).feed(frame) == [(Opcode.TEXT, 'x' * 3000)]\n"
        "print('compiled' if seam.COMPILED_MASK else 'pure')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "pure"
    assert "without its C extensions" in result.stderr
    assert "pure Python" in result.stderr


def test_set_unmask_refuses_a_function_that_gets_it_wrong() -> None:
    """shared.frames checks an injected XOR on a sample before using it."""
    def wrong(key: bytes, data: bytearray) -> None:
        data.reverse()

    with pytest.raises(ValueError, match="does not unmask"):
        frames.set_unmask(wrong)


async def test_takeover_round_trip(runner: web.AppRunner) -> None:
    """A frame sent in the packet of the upgrade request and one sent after the 101 are
    both echoed; then aiohttp's server no longer counts the connection as its own."""
    early = build_frame(Opcode.TEXT, b"with the handshake", mask_key=MASK)
    client = await RawClient.connect("127.0.0.1", _port(runner), "/echo", early=early)
    try:
        assert client.status == 101, BROKEN + (
            f"the upgrade got {client.status}, not 101 (the log has the server's traceback)")
        client.send(build_frame(Opcode.TEXT, b"after the 101", mask_key=MASK))
        for expected in (b"with the handshake", b"after the 101"):
            frame = await client.recv_frame()
            assert frame is not None, BROKEN + "the socket closed instead of echoing"
            assert frame.payload == expected, (
                BROKEN + "bytes sent with the handshake were lost" + TAKEOVER)
        server = runner.server
        assert server is not None
        await _until(lambda: not server.connections, 5,
                     "aiohttp's server still holds the connection's RequestHandler" + TAKEOVER)
        client.send(build_frame(Opcode.TEXT, b"still served", mask_key=MASK))
        frame = await client.recv_frame()
        assert frame is not None and frame.payload == b"still served"
    finally:
        await client.close()


async def test_a_socket_aiohttp_paused_is_read_again_after_the_takeover(
    serve: Callable[[web.Application], Awaitable[str]],
) -> None:
    """A route that awaits before upgrading (say, to check a token) while the client
    sends 600 KB after its request: aiohttp buffers the bytes and pauses the socket;
    after the takeover the socket is read again and the message is echoed whole."""
    async def echo(conn: Connection, msg: Message) -> None:
        await conn.send(msg.data)

    hub = Hub(HubConfig(max_message_size=1 << 20))

    async def route(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        await _until(lambda: not transport.is_reading(), 10,
                     "aiohttp no longer pauses a socket whose buffer is full (update the test)")
        return await hub.upgrade(request, EventHandler(on_message=echo))

    app = web.Application()
    hub.attach(app)
    app.router.add_get("/echo", route)
    host, port = (await serve(app)).removeprefix("http://").split(":")
    payload = os.urandom(600_000)
    early = build_frame(Opcode.BINARY, payload, mask_key=MASK)
    client = await RawClient.connect(host, int(port), "/echo", early=early)
    try:
        assert client.status == 101
        frame = await client.recv_frame(timeout=20)
        assert frame is not None, BROKEN + "the paused socket was not read again" + TAKEOVER
        assert frame.payload == payload, (
            BROKEN + "the bytes sent after the request changed" + TAKEOVER)
    finally:
        await client.close()


def test_a_transport_without_the_methods_used_is_refused_by_name() -> None:
    """take_over checks the transport by the methods the node calls, not by class."""

    class Datagrams:
        def is_closing(self) -> bool:
            return False

        def write(self, data: bytes) -> None:
            raise AssertionError("nothing may be written")

    class Request:
        protocol = object()
        transport = Datagrams()

    with pytest.raises(TypeError) as info:
        seam.take_over(Request(), asyncio.Protocol())  # type: ignore[arg-type]
    assert "Datagrams" in str(info.value)
    assert "set_protocol" in str(info.value) and "pause_reading" in str(info.value)
    assert "write," not in str(info.value)


def test_a_hub_in_an_app_running_on_uvloop_accepts_websockets() -> None:
    """An aiohttp app that runs on uvloop (as gunicorn's uvloop worker does) upgrades and
    echoes; its transports are not asyncio.Transport (they were answered with 500)."""

    async def main() -> tuple[str, int, bytes | None]:
        app_runner = web.AppRunner(_echo_app())
        await app_runner.setup()
        await web.TCPSite(app_runner, "127.0.0.1", 0).start()
        try:
            client = await RawClient.connect("127.0.0.1", _port(app_runner), "/echo")
            try:
                if client.status != 101:
                    return type(asyncio.get_running_loop()).__module__, client.status, None
                client.send(build_frame(Opcode.TEXT, b"on uvloop", mask_key=MASK))
                frame = await client.recv_frame()
                payload = frame.payload if frame is not None else None
            finally:
                await client.close()
        finally:
            await app_runner.cleanup()
        return type(asyncio.get_running_loop()).__module__, client.status, payload

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as loop_runner:
        module, status, payload = loop_runner.run(main())
    assert module.startswith("uvloop")
    assert status == 101
    assert payload == b"on uvloop"
