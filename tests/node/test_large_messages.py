"""Large messages through /echo with a 16 MiB limit: Autobahn|Testsuite case group 9.

The demo node's /echo, served by ``create_app`` with ``max_message_size`` 16 MiB and the
default ``send_buffer_limit`` (1 MiB), must echo every message it accepted, whole, to a
client that reads, and then complete a clean close handshake (the client's 1000 echoed,
the TCP connection ended by the server).

Each case of Autobahn's group 9 is reproduced with its own sizes, payload bytes, fragment
sizes and TCP chop sizes (autobahntestsuite/case/case9_*.py), by a raw-socket client
against a real node on a loopback socket:

- 9.1.x / 9.2.x: one text / binary frame of 64 KiB, 256 KiB, 1, 4, 8 and 16 MiB.
- 9.3.x / 9.4.x: a 4 MiB text / binary message in fragments of 64 B ... 4 MiB.
- 9.5.x / 9.6.x: one 1 MiB text / binary frame written in TCP chunks of 64 ... 2048 B,
  one chunk per event-loop turn.
- 9.7.x / 9.8.x: 1,000 text / binary messages of 0 ... 4096 B, each sent after the
  echo of the one before (round trips).

The real suite is Python 2 software run by hand (wstest in fuzzingclient mode against
``roomcast serve --max-message-size 16777216``); it and this module agree case by case.
This module is what CI runs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import pytest
import websockets
from aiohttp import web

from roomcast.node.app import create_app
from roomcast.shared.config import HubConfig
from roomcast.shared.frames import build_frame, parse_close_payload
from roomcast.shared.rfc6455 import CloseCode, Opcode
from tests.rawws import RawClient

Serve = Callable[[web.Application], Awaitable[str]]

KIB, MIB = 1024, 1024 * 1024
LIMIT = 16 * MIB
WAIT = 30.0
"""Upper bound of each wait for an echo (a 16 MiB one included) on a busy machine."""

TEXT_PAYLOAD = b"BAsd7&jh23"
BINARY_PAYLOAD = b"\x00\xfe\x23\xfa\xf0"


def repeat(pattern: bytes, length: int) -> bytes:
    """``pattern`` repeated to exactly ``length`` bytes (Autobahn's ``payload_len``)."""
    return (pattern * (length // len(pattern) + 1))[:length]


async def echo_node(serve: Serve) -> tuple[str, int]:
    """A node app serving /echo with a 16 MiB message limit; its host and port."""
    base = await serve(create_app(HubConfig(max_message_size=LIMIT)))
    host, port = base.removeprefix("http://").split(":")
    return host, int(port)


def masked(opcode: Opcode, payload: bytes, *, fin: bool = True) -> bytes:
    """A client frame: masked with a fresh key."""
    return build_frame(opcode, payload, fin=fin, mask_key=os.urandom(4))


async def expect_echo(client: RawClient, opcode: Opcode, payload: bytes) -> None:
    """The next frame is one unfragmented message equal to what was sent."""
    frame = await client.recv_frame(WAIT)
    assert frame is not None, "the server closed the connection instead of echoing"
    assert frame.opcode is opcode, f"expected {opcode.name}, got {frame.opcode.name}"
    assert frame.fin
    assert len(frame.payload) == len(payload)
    assert frame.payload == payload


async def close_cleanly(client: RawClient) -> None:
    """Close with 1000 (Autobahn: closedByMe, 1000, requireClean): echoed, then EOF."""
    client.send(masked(Opcode.CLOSE, CloseCode.NORMAL.to_bytes(2, "big")))
    frame = await client.recv_frame(WAIT)
    assert frame is not None and frame.opcode is Opcode.CLOSE
    assert parse_close_payload(frame.payload)[0] == CloseCode.NORMAL
    assert await client.recv_frame(WAIT) is None, "the server did not end the TCP connection"
    await client.close()


# -- the defect: a message over send_buffer_limit was taken for a slow consumer --------


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
async def test_a_1_mib_message_is_echoed_with_a_16_mib_limit(serve: Serve, binary: bool) -> None:
    """A 1 MiB message (the default send_buffer_limit is 1 MiB) comes back whole to a
    client that reads, and the connection closes cleanly with 1000 (it was cut off
    without a close frame: 1006)."""
    host, port = await echo_node(serve)
    data: str | bytes = b"\x01" * MIB if binary else "a" * MIB
    async with websockets.connect(f"ws://{host}:{port}/echo", max_size=None) as ws:
        await ws.send(data)
        assert await asyncio.wait_for(ws.recv(), WAIT) == data
        await ws.close(1000)
    assert ws.close_code == 1000


# -- Autobahn|Testsuite case group 9 ---------------------------------------------------


SIZES_9_1 = [64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB, 8 * MIB, 16 * MIB]
FRAGMENTS_9_3 = [64, 256, 1 * KIB, 4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB]
CHOPS_9_5 = [64, 128, 256, 512, 1024, 2048]
ROUND_TRIPS_9_7 = [0, 16, 64, 256, 1024, 4096]


def _cases() -> list[object]:
    cases: list[object] = []
    for group, opcode in ((1, Opcode.TEXT), (2, Opcode.BINARY)):
        cases += [pytest.param("whole", opcode, size, 0, id=f"9.{group}.{i}")
                  for i, size in enumerate(SIZES_9_1, 1)]
    for group, opcode in ((3, Opcode.TEXT), (4, Opcode.BINARY)):
        cases += [pytest.param("fragmented", opcode, 4 * MIB, frag, id=f"9.{group}.{i}")
                  for i, frag in enumerate(FRAGMENTS_9_3, 1)]
    for group, opcode in ((5, Opcode.TEXT), (6, Opcode.BINARY)):
        cases += [pytest.param("chopped", opcode, 1 * MIB, chop, id=f"9.{group}.{i}")
                  for i, chop in enumerate(CHOPS_9_5, 1)]
    for group, opcode in ((7, Opcode.TEXT), (8, Opcode.BINARY)):
        cases += [pytest.param("round-trips", opcode, size, 1000, id=f"9.{group}.{i}")
                  for i, size in enumerate(ROUND_TRIPS_9_7, 1)]
    return cases


@pytest.mark.parametrize(("kind", "opcode", "size", "step"), _cases())
async def test_autobahn_case_group_9(
    serve: Serve, kind: str, opcode: Opcode, size: int, step: int
) -> None:
    """The group-9 case echoes what was sent, as one message of the same type and bytes,
    and closes cleanly with 1000."""
    host, port = await echo_node(serve)
    client = await RawClient.connect(host, port, "/echo")
    assert client.status == 101
    try:
        if kind == "whole":  # 9.1 / 9.2
            payload = repeat(TEXT_PAYLOAD if opcode is Opcode.TEXT else BINARY_PAYLOAD, size)
            client.send(masked(opcode, payload))
            await expect_echo(client, opcode, payload)
        elif kind == "fragmented":  # 9.3 / 9.4
            payload = (b"*" if opcode is Opcode.TEXT else b"\xfe") * size
            pieces = [payload[i : i + step] for i in range(0, size, step)]
            frames = [
                masked(opcode if i == 0 else Opcode.CONTINUATION, piece,
                       fin=i == len(pieces) - 1)
                for i, piece in enumerate(pieces)
            ]
            client.send(b"".join(frames))
            await expect_echo(client, opcode, payload)
        elif kind == "chopped":  # 9.5 / 9.6
            payload = repeat(TEXT_PAYLOAD if opcode is Opcode.TEXT else BINARY_PAYLOAD, size)
            wire = masked(opcode, payload)
            for i in range(0, len(wire), step):
                client.send(wire[i : i + step])
                await asyncio.sleep(0)  # one chunk per loop turn: the node reads each alone
            await expect_echo(client, opcode, payload)
        else:  # 9.7 / 9.8: ``step`` round trips of ``size`` bytes
            payload = (b"*" if opcode is Opcode.TEXT else b"\xfe") * size
            for _ in range(step):
                client.send(masked(opcode, payload))
                await expect_echo(client, opcode, payload)
        await close_cleanly(client)
    finally:
        await client.close()
