"""Bytes no polite client sends, over a raw socket: each gets its RFC 6455 close code."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web

from roomcast.node.app import create_app
from roomcast.shared.frames import build_frame, parse_close_payload
from roomcast.shared.rfc6455 import Opcode
from tests.rawws import RawClient

Serve = Callable[[web.Application], Awaitable[str]]
MASK = b"\x11\x22\x33\x44"


async def connect(serve: Serve, path: str = "/echo", **kw: object) -> RawClient:
    base = await serve(create_app())
    host, port = base.removeprefix("http://").split(":")
    return await RawClient.connect(host, int(port), path, **kw)  # type: ignore[arg-type]


async def expect_close(client: RawClient, code: int) -> None:
    frame = await client.recv_frame()
    assert frame is not None and frame.opcode is Opcode.CLOSE
    assert parse_close_payload(frame.payload)[0] == code


async def test_valid_masked_frames_are_echoed(serve: Serve) -> None:
    """The raw client itself works: a masked text frame comes back unmasked."""
    client = await connect(serve)
    client.send(build_frame(Opcode.TEXT, b"ok", mask_key=MASK))
    frame = await client.recv_frame()
    assert frame is not None and frame.payload == b"ok" and not frame.masked
    await client.close()


async def test_invalid_utf8_text_closes_1007(serve: Serve) -> None:
    """A text message that is not UTF-8 closes the connection with 1007."""
    client = await connect(serve)
    client.send(build_frame(Opcode.TEXT, b"\xff\xfe bad", mask_key=MASK))
    await expect_close(client, 1007)
    await client.close()


async def test_invalid_utf8_split_across_fragments_closes_1007(serve: Serve) -> None:
    """Invalid UTF-8 across fragments is caught on the whole message."""
    client = await connect(serve)
    client.send(build_frame(Opcode.TEXT, b"ok \xe2\x82", fin=False, mask_key=MASK))
    client.send(build_frame(Opcode.CONTINUATION, b"\x28", mask_key=MASK))
    await expect_close(client, 1007)
    await client.close()


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(build_frame(Opcode.TEXT, b"unmasked"), id="unmasked"),
        pytest.param(bytes([0x80 | 0x20 | 0x1, 0x80 | 2]) + MASK + b"hi", id="rsv2"),
        pytest.param(bytes([0x80 | 0x3, 0x80]) + MASK, id="unknown-opcode"),
        pytest.param(bytes([0x09, 0x80]) + MASK, id="fragmented-ping"),
        pytest.param(build_frame(Opcode.CONTINUATION, b"x", mask_key=MASK), id="orphan-cont"),
        pytest.param(bytes([0x89, 0x80 | 126, 0, 126]) + MASK + b"p" * 126, id="big-ping"),
    ],
)
async def test_protocol_errors_close_1002(serve: Serve, frame: bytes) -> None:
    """Frames that break RFC 6455 framing close the connection with 1002."""
    client = await connect(serve)
    client.send(frame)
    await expect_close(client, 1002)
    await client.close()


async def test_oversized_message_split_across_fragments_closes_1009(serve: Serve) -> None:
    """A message over the limit is caught even when each fragment is small."""
    client = await connect(serve)
    chunk = b"a" * 40_000
    client.send(build_frame(Opcode.BINARY, chunk, fin=False, mask_key=MASK))
    client.send(build_frame(Opcode.CONTINUATION, chunk, mask_key=MASK))
    await expect_close(client, 1009)
    await client.close()


@pytest.mark.parametrize(
    ("version", "status"), [("8", 426), ("13", 101)]
)
async def test_handshake_version(serve: Serve, version: str, status: int) -> None:
    """Only version 13 is accepted; others get 426 naming the version we speak."""
    client = await connect(serve, version=version)
    assert client.status == status
    if status == 426:
        assert client.headers["sec-websocket-version"] == "13"
    await client.close()


async def test_unmasked_frame_sent_with_the_handshake_closes_1002(serve: Serve) -> None:
    """A frame in the same packet as the upgrade request is checked for masking too."""
    client = await connect(serve, early=build_frame(Opcode.TEXT, b"sneaky"))
    assert client.status == 101
    await expect_close(client, 1002)
    await client.close()


async def test_masked_frame_sent_with_the_handshake_is_served(serve: Serve) -> None:
    """A masked frame in the upgrade packet is parsed and echoed, not lost."""
    client = await connect(serve, early=build_frame(Opcode.TEXT, b"early", mask_key=MASK))
    frame = await client.recv_frame()
    assert frame is not None and frame.payload == b"early"
    await client.close()
