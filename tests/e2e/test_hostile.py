"""Hostile bytes against a real ``roomcast serve`` process, and the node keeps serving.

Every case of RFC 6455's failure matrix is sent by a raw-socket member of a chat room
(tests/rawws.py) to a node process. The node must answer with the close code RFC 6455
gives the case (1002 framing, 1007 invalid UTF-8, 1009 too big) and end the TCP
connection, or, for the few valid-but-unusual inputs, accept the message. Meanwhile two
well-behaved members of the same room stay connected: after every case they see the
hostile member leave (the room is cleaned up) and still chat, a fresh client is still
served, and the process is still running.

tests/node/test_raw_protocol.py pins a few of these codes in-process; here the whole
matrix runs against the process users run, with bystanders. Malformed upgrade requests
get an HTTP refusal (never 101, never a 5xx) under the same bystander check.

Where aiohttp's behaviour differs from RFC 6455 and roomcast does not correct it, or
roomcast itself is wrong, the case is ``xfail(strict=True)`` naming the section.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import websockets
from aiohttp import web
from websockets.asyncio.client import ClientConnection

from roomcast.node import EventHandler, Hub
from roomcast.shared.frames import apply_mask, deflate_message, inflate_message, parse_close_payload
from roomcast.shared.rfc6455 import Opcode
from tests.e2e.procs import NodePool, NodeProcess
from tests.rawws import RawClient

Serve = Callable[[web.Application], Awaitable[str]]

LIMIT = 4096
"""--max-message-size of the nodes under test (bytes, inclusive)."""
MASK = b"\x5a\x17\xc3\x3e"
TIMEOUT = 5.0

TEXT, BINARY, CONT = int(Opcode.TEXT), int(Opcode.BINARY), int(Opcode.CONTINUATION)
CLOSE, PING, PONG = int(Opcode.CLOSE), int(Opcode.PING), int(Opcode.PONG)
RSV1, RSV2, RSV3 = 0x40, 0x20, 0x10

# --- frames no polite client sends --------------------------------------------------------


def _length(n: int) -> bytes:
    if n < 126:
        return bytes((n,))
    if n < 0x10000:
        return bytes((126,)) + struct.pack("!H", n)
    return bytes((127,)) + struct.pack("!Q", n)


def frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True
) -> bytes:
    """Any client frame, including the ones build_frame refuses to make."""
    first = (0x80 if fin else 0) | rsv | opcode
    length = bytearray(_length(len(payload)))
    if not mask:
        return bytes((first,)) + bytes(length) + payload
    length[0] |= 0x80
    return bytes((first,)) + bytes(length) + MASK + apply_mask(MASK, payload)


def header(opcode: int, length: int, *, fin: bool = True) -> bytes:
    """A masked frame header announcing ``length`` in the 64-bit form, without payload."""
    first = (0x80 if fin else 0) | opcode
    return bytes((first, 0x80 | 127)) + struct.pack("!Q", length) + MASK


def close(code: int, reason: bytes = b"") -> bytes:
    return frame(CLOSE, struct.pack("!H", code) + reason)


# --- the cases ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """Bytes a hostile member sends, and what the node must do about them."""

    id: str
    data: bytes
    code: int | None
    """The close code the node must send; None: the input is valid and is served."""
    frames: tuple[tuple[int, bytes], ...] = ()
    """For a valid input, the node's answer. For one that fails the connection, frames
    the node may send first (answers to what came before the fault): aiohttp closes the
    transport at once, so whatever the hub queued in the same turn may be dropped."""
    xfail: str | None = None


def _cases() -> Iterator[Case]:
    # Unmasked client frames (RFC 6455 §5.1). A long unmasked text frame is pinned by
    # test_raw_protocol; these are the short ones, and unmasked frames after masked ones.
    yield Case("unmasked-short-text", frame(TEXT, b"hi", mask=False), 1002)
    yield Case("unmasked-empty-binary", frame(BINARY, mask=False), 1002)
    yield Case("unmasked-ping", frame(PING, b"p", mask=False), 1002)
    yield Case("unmasked-close", frame(CLOSE, struct.pack("!H", 1000), mask=False), 1002)
    yield Case("unmasked-short-continuation",
               frame(TEXT, b"a", fin=False) + frame(CONT, b"b", mask=False), 1002)
    yield Case("unmasked-continuation",
               frame(TEXT, b"part", fin=False) + frame(CONT, b"unmasked tail", mask=False), 1002)
    yield Case("unmasked-ping-mid-message",
               frame(TEXT, b"part", fin=False) + frame(PING, b"unmasked ping", mask=False), 1002)

    # Reserved bits without a negotiated extension (§5.2), on data and control frames.
    for name, bit in (("rsv1", RSV1), ("rsv2", RSV2), ("rsv3", RSV3)):
        yield Case(f"{name}-text", frame(TEXT, b"hi", rsv=bit), 1002)
        yield Case(f"{name}-ping", frame(PING, b"p", rsv=bit), 1002)
    yield Case("rsv1-continuation",
               frame(TEXT, b"a", fin=False) + frame(CONT, b"b", rsv=RSV1), 1002)

    # Unknown opcodes (§5.2): reserved data opcodes 0x3-0x7, control opcodes 0xB-0xF.
    for opcode in (*range(0x3, 0x8), *range(0xB, 0x10)):
        yield Case(f"opcode-{opcode:#x}", frame(opcode, b"?"), 1002)
    yield Case("unknown-opcode-mid-message",
               frame(TEXT, b"a", fin=False) + frame(0xB, b"?"), 1002)

    # Control frames: never fragmented, at most 125 bytes (§5.5).
    yield Case("fragmented-close", frame(CLOSE, struct.pack("!H", 1000), fin=False), 1002)
    yield Case("fragmented-ping", frame(PING, b"p", fin=False), 1002)
    yield Case("fragmented-pong", frame(PONG, b"p", fin=False), 1002)
    yield Case("ping-126", frame(PING, b"p" * 126), 1002)
    yield Case("pong-126", frame(PONG, b"p" * 126), 1002)
    yield Case("close-126", close(1000, b"r" * 124), 1002)
    yield Case("ping-70000", frame(PING, b"p" * 70_000), 1002)
    yield Case("ping-125-is-fine", frame(PING, b"p" * 125), None, ((PONG, b"p" * 125),))

    # Close frames (§5.5.1, §7.4): the status code, the payload, the reason.
    yield Case("close-1-byte", frame(CLOSE, b"\x03"), 1002)
    yield Case("close-reason-not-utf8", close(1000, b"bye \xff\xfe"), 1007)
    yield Case("close-reason-surrogate", close(1000, b"\xed\xa0\x80"), 1007)
    for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535):
        yield Case(f"close-code-{code}", close(code), 1002)

    # Fragmentation (§5.4).
    yield Case("continuation-without-start", frame(CONT, b"x", fin=False), 1002)
    yield Case("continuation-after-complete-message",
               frame(TEXT, b"done") + frame(CONT, b"more"), 1002, ((TEXT, b"done"),))
    yield Case("text-in-fragmented-message",
               frame(TEXT, b"a", fin=False) + frame(TEXT, b"b"), 1002)
    yield Case("binary-in-fragmented-message",
               frame(TEXT, b"a", fin=False) + frame(BINARY, b"b", fin=False), 1002)
    yield Case("text-after-continuation",
               frame(BINARY, b"a", fin=False) + frame(CONT, b"b", fin=False) + frame(TEXT, b"c"),
               1002)
    yield Case("binary-after-interleaved-ping",
               frame(TEXT, b"a", fin=False) + frame(PING, b"p") + frame(BINARY, b"b"),
               1002, ((PONG, b"p"),))
    yield Case("text-after-empty-first-fragment",
               frame(TEXT, b"", fin=False) + frame(TEXT, b"b"), 1002)

    # Size limit across fragments (inclusive; README "Limits and bad input").
    third = LIMIT // 3
    rest = LIMIT - 2 * third
    yield Case("over-limit-in-three-fragments",
               frame(BINARY, b"a" * third, fin=False) + frame(CONT, b"b" * third, fin=False)
               + frame(CONT, b"c" * (rest + 1)), 1009)
    yield Case("over-limit-announced-by-last-fragment",
               frame(BINARY, b"a" * 10, fin=False) + header(CONT, 1 << 40), 1009)
    yield Case("limit-exactly-in-three-fragments",
               frame(BINARY, b"a" * third, fin=False) + frame(CONT, b"b" * third, fin=False)
               + frame(CONT, b"c" * rest), None,
               ((BINARY, b"a" * third + b"b" * third + b"c" * rest),))

    # UTF-8 checked on the whole message (§8.1): invalid when split, valid when split.
    for name, first, second in (
        ("surrogate", b"\xed", b"\xa0\x80"),
        ("overlong", b"\xc0", b"\xaf"),
        ("above-u10ffff", b"\xf4", b"\x90\x80\x80"),
        ("truncated-at-end", b"ok \xe2\x82", b""),
        ("lone-continuation-byte", b"ok ", b"\x80"),
    ):
        yield Case(f"invalid-utf8-split-{name}",
                   frame(TEXT, first, fin=False) + frame(CONT, second), 1007)
    euro = "€".encode()
    yield Case("valid-utf8-split-mid-character",
               frame(TEXT, euro[:1], fin=False) + frame(CONT, euro[1:2], fin=False)
               + frame(CONT, euro[2:]), None, ((TEXT, euro),))
    emoji = "a💬b".encode()
    yield Case("valid-utf8-split-with-ping-between",
               frame(TEXT, emoji[:2], fin=False) + frame(PING, b"p")
               + frame(CONT, emoji[2:4], fin=False) + frame(CONT, emoji[4:]), None,
               ((PONG, b"p"), (TEXT, emoji)))

    # A 64-bit length with the most significant bit set (§5.2).
    yield Case("length-msb-set", header(BINARY, 1 << 63), 1002)
    yield Case("length-all-ones", header(TEXT, (1 << 64) - 1), 1002)


def _deflate_cases() -> Iterator[Case]:
    """Against a node with --compression, to a member that negotiated permessage-deflate."""
    good = deflate_message(b"compressed hello")
    yield Case("deflate-message-is-served", frame(TEXT, good, rsv=RSV1), None,
               ((TEXT, b"compressed hello"),))
    yield Case("deflate-rsv1-on-ping", frame(PING, b"p", rsv=RSV1), 1002)
    yield Case("deflate-rsv1-on-continuation",
               frame(TEXT, good[:2], fin=False, rsv=RSV1) + frame(CONT, good[2:], rsv=RSV1), 1002)
    yield Case("deflate-rsv2", frame(TEXT, good, rsv=RSV1 | RSV2), 1002)
    bomb = deflate_message(b"\0" * (LIMIT * 64))
    yield Case("deflate-inflates-over-limit-in-fragments",
               frame(BINARY, bomb[:8], fin=False, rsv=RSV1) + frame(CONT, bomb[8:]), 1009)
    yield Case("deflate-inflates-to-invalid-utf8",
               frame(TEXT, deflate_message(b"\xff\xfe" * 40), rsv=RSV1), 1007)
    yield Case("deflate-garbage", frame(BINARY, b"\xff" * 16, rsv=RSV1), 1002)


def _params(cases: Iterable[Case | Refusal]) -> list[Any]:
    """pytest params named by id, xfail(strict) where the case says why it fails."""
    return [
        pytest.param(case, id=case.id, marks=[pytest.mark.xfail(strict=True, reason=case.xfail)]
                     if case.xfail else [])
        for case in cases
    ]


# --- nodes and bystanders ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pool() -> Iterator[NodePool]:
    """The node processes under attack, one per event loop, kept for the whole module."""
    nodes = NodePool()
    try:
        yield nodes
    finally:
        nodes.close()


@pytest.fixture
def node(pool: NodePool) -> NodeProcess:
    return pool.get("--max-message-size", str(LIMIT))


@pytest.fixture
def deflate_node(pool: NodePool) -> NodeProcess:
    return pool.get("--max-message-size", str(LIMIT), "--compression", "on")


_ids = itertools.count()


@dataclass
class Bystanders:
    """Two well-behaved members of one room on the node under attack."""

    node: NodeProcess
    room: str
    members: list[ClientConnection] = field(default_factory=list)


def _is_notice(data: str | bytes, kind: str, name: str) -> dict[str, Any] | None:
    if not isinstance(data, str) or not data.startswith('{"type": '):
        return None
    notice: dict[str, Any] = json.loads(data)
    return notice if (notice.get("type"), notice.get("name")) == (kind, name) else None


async def _until(ws: ClientConnection, want: Callable[[str | bytes], Any]) -> Any:
    """Read ``ws`` until ``want`` returns something truthy; return that."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            found = want(await ws.recv())
            if found:
                return found


async def _join(stack: contextlib.AsyncExitStack, node: NodeProcess, room: str,
                name: str) -> ClientConnection:
    ws = await stack.enter_async_context(
        websockets.connect(f"{node.ws_url}/chat?room={room}&name={name}"))
    await _until(ws, lambda data: _is_notice(data, "join", name))
    return ws


@contextlib.asynccontextmanager
async def bystanders(node: NodeProcess) -> AsyncIterator[Bystanders]:
    room = f"room{next(_ids)}"
    async with contextlib.AsyncExitStack() as stack:
        group = Bystanders(node, room)
        for name in ("ann", "bob"):
            group.members.append(await _join(stack, node, room, f"{name}-{room}"))
        yield group


async def everyone_else_still_served(group: Bystanders, hostile: str | None, what: str) -> None:
    """The bystanders saw ``hostile`` leave their room and still chat; a new client is
    served; the process runs."""
    if hostile is not None:
        for ws in group.members:
            notice = await _until(ws, lambda data: _is_notice(data, "leave", hostile))
            assert notice["members"] == len(group.members), notice
    text = f"still chatting after {what}"
    await group.members[0].send(text)
    for ws in group.members:
        await _until(ws, lambda data: data == text)
    async with websockets.connect(group.node.ws_url + "/echo") as fresh:
        await fresh.send(b"\x00fresh")
        assert await asyncio.wait_for(fresh.recv(), TIMEOUT) == b"\x00fresh"
    assert group.node.proc is not None and group.node.proc.poll() is None, group.node.log()


# --- the hostile member ------------------------------------------------------------------


async def hostile_member(node: NodeProcess, room: str, name: str,
                         extra: dict[str, str] | None = None) -> RawClient:
    """A raw-socket member of ``room`` that has seen its own join notice."""
    client = await RawClient.connect("127.0.0.1", node.port, f"/chat?room={room}&name={name}",
                                     extra)
    assert client.status == 101
    while True:
        got = await client.recv_frame(TIMEOUT)
        assert got is not None and got.opcode is Opcode.TEXT, got
        payload = inflate_message(got.payload) if got.rsv1 else got.payload
        if _is_notice(payload.decode(), "join", name):
            return client


Outcome = tuple[list[tuple[int, bytes]], int | None]


async def observe(client: RawClient, case: Case) -> Outcome:
    """What the node sent back: the frames before its close, and the close code.

    Stops at the close frame, at the end of the stream, at the first frame the case does
    not expect, or (for a valid input) once the expected answer arrived.
    """
    got: list[tuple[int, bytes]] = []
    while True:
        try:
            server_frame = await client.recv_frame(TIMEOUT)
        except ConnectionResetError:
            return got, None
        except TimeoutError:
            got.append((-1, b"<nothing within the timeout>"))
            return got, None
        if server_frame is None:
            return got, None
        if server_frame.opcode is Opcode.CLOSE:
            return got, parse_close_payload(server_frame.payload)[0]
        payload = server_frame.payload
        if server_frame.rsv1:
            payload = inflate_message(payload)
        if payload.startswith((b'{"type": "join"', b'{"type": "leave"')):
            continue  # other members coming and going
        got.append((int(server_frame.opcode), payload))
        if case.code is None and len(got) == len(case.frames):
            return got, None
        if got[-1] not in case.frames or len(got) > len(case.frames):
            return got, None


async def hang_up(client: RawClient) -> None:
    """Answer (or start) the closing handshake; the node must then end the TCP connection."""
    with contextlib.suppress(OSError):
        client.send(close(1000))
    async with asyncio.timeout(TIMEOUT):
        while True:
            try:
                if await client.recv_frame(TIMEOUT) is None:
                    return
            except ConnectionResetError:
                return  # it closed with our unread bytes in its buffer: RST, still closed


async def run_case(node: NodeProcess, case: Case,
                   extra: dict[str, str] | None = None) -> None:
    async with bystanders(node) as group:
        name = f"hostile-{group.room}"
        client = await hostile_member(node, group.room, name, extra)
        try:
            client.send(case.data)
            got, code = await observe(client, case)
            await hang_up(client)
        finally:
            await client.close()
        await everyone_else_still_served(group, name, case.id)
    assert_outcome(case, (got, code))


def assert_outcome(case: Case, outcome: Outcome) -> None:
    got, code = outcome
    if case.code is None:
        assert (got, code) == (list(case.frames), None), "a valid input was not served as is"
    else:
        assert code == case.code, f"closed with {code}, not {case.code}; got {got}"
        assert all(f in case.frames for f in got), f"served {got} before failing"


@pytest.mark.parametrize("case", _params(_cases()))
async def test_hostile_frame_gets_its_close_code_and_others_carry_on(
    node: NodeProcess, case: Case
) -> None:
    """The node answers each input with RFC 6455's close code (or serves a valid one),
    ends the connection, and its other members never notice."""
    await run_case(node, case)


@pytest.mark.parametrize("case", _params(_deflate_cases()))
async def test_hostile_compressed_frame(deflate_node: NodeProcess, case: Case) -> None:
    """The same with permessage-deflate negotiated: RSV1 only where RFC 7692 puts it,
    the limit applies after inflating, UTF-8 is checked on the inflated text."""
    extension = {"Sec-WebSocket-Extensions": "permessage-deflate"}
    probe = await RawClient.connect("127.0.0.1", deflate_node.port, "/echo", extension)
    await probe.close()
    assert probe.headers.get("sec-websocket-extensions", "").startswith("permessage-deflate")
    await run_case(deflate_node, case, extension)


async def test_hostile_members_in_a_row_do_not_wear_the_node_down(node: NodeProcess) -> None:
    """Fifty hostile members, forty one after another and ten at once, each get their close
    code and leave nothing behind: the room holds only the bystanders afterwards."""
    cases = [c for c in _cases() if c.xfail is None and c.code is not None]
    async with bystanders(node) as group:
        names = [f"h{i}-{group.room}" for i in range(50)]

        async def one(i: int, among: list[Case] = cases) -> None:
            case = among[i % len(among)]
            client = await hostile_member(node, group.room, names[i])
            try:
                client.send(case.data)
                assert_outcome(case, await observe(client, case))
                await hang_up(client)
            finally:
                await client.close()

        for i in range(40):
            await one(i)
        # At once, only cases that send nothing the room would hear: a valid message
        # before the fault (echoed to the whole room) could reach another member
        # before its own close frame, which observe() would take as its answer.
        quiet = [c for c in cases if not c.frames]
        await asyncio.gather(*(one(i, quiet) for i in range(40, 50)))
        left: set[str] = set()

        def all_left(data: str | bytes) -> bool:
            if isinstance(data, str) and data.startswith('{"type": "leave"'):
                left.add(json.loads(data)["name"])
            return left >= set(names)

        await _until(group.members[0], all_left)
        await everyone_else_still_served(group, None, "fifty hostile members")
        late = f"late-{group.room}"
        async with contextlib.AsyncExitStack() as stack:
            await _join(stack, node, group.room, late)
            notice = await _until(group.members[1], lambda data: _is_notice(data, "join", late))
        assert notice["members"] == 3, notice


# --- a close frame without a status code -------------------------------------------------


async def test_close_without_status_reports_1005(serve: Serve) -> None:
    """An empty close frame is valid: the node answers it, and on_close gets 1005."""
    closed: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    hub = Hub()
    app = web.Application()
    hub.attach(app)
    app.router.add_get("/ws", hub.route(EventHandler(
        on_close=lambda conn, code, reason: closed.put_nowait((code, reason)))))
    host, port = (await serve(app)).removeprefix("http://").split(":")
    client = await RawClient.connect(host, int(port), "/ws")
    try:
        client.send(frame(CLOSE))
        answer = await client.recv_frame(TIMEOUT)
        assert answer is not None and answer.opcode is Opcode.CLOSE
        assert parse_close_payload(answer.payload)[0] == 1000
    finally:
        await client.close()
    assert await asyncio.wait_for(closed.get(), TIMEOUT) == (1005, "")


# --- malformed upgrade requests ----------------------------------------------------------


def _upgrade(method: str = "GET", *, drop: tuple[str, ...] = (),
             headers: dict[str, str] | None = None, extra: bytes = b"",
             body: bytes = b"") -> Callable[[str, int], bytes]:
    """(path, port) -> the bytes of an upgrade request to ``path``, changed as given."""

    def build(path: str, port: int) -> bytes:
        fields = {
            "Host": f"127.0.0.1:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
            "Sec-WebSocket-Version": "13",
        }
        for name in drop:
            del fields[name]
        fields.update(headers or {})
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in fields.items())
        return head.encode() + extra + b"\r\n" + body

    return build


@dataclass(frozen=True)
class Refusal:
    """A malformed upgrade request and the refusal a client can rely on."""

    id: str
    build: Callable[[str, int], bytes]
    status: int | None
    """The exact status where roomcast decides; None: any 4xx (aiohttp's parser decides)."""
    headers: tuple[tuple[str, str], ...] = ()
    xfail: str | None = None


_FLOOD = b"".join(b"X-Flood-%d: %d\r\n" % (i, i) for i in range(300))
_LONG_LINE = b"X-Long: " + b"a" * 65536 + b"\r\n"
_H2C = {"Upgrade": "h2c", "Connection": "Upgrade, HTTP2-Settings",
        "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"}
VERSION_13 = (("sec-websocket-version", "13"),)

REFUSALS = [
    Refusal("missing-key", _upgrade(drop=("Sec-WebSocket-Key",)), 400),
    Refusal("key-not-16-bytes", _upgrade(headers={"Sec-WebSocket-Key": "c2hvcnQ="}), 400),
    Refusal("version-8", _upgrade(headers={"Sec-WebSocket-Version": "8"}), 426, VERSION_13),
    Refusal("no-version", _upgrade(drop=("Sec-WebSocket-Version",)), 426, VERSION_13),
    Refusal("post", _upgrade("POST"), 405),
    Refusal("put", _upgrade("PUT"), 405),
    Refusal("no-upgrade-header", _upgrade(drop=("Upgrade",)), 400),
    Refusal("upgrade-h2c", _upgrade(headers=_H2C), 400),
    Refusal("no-connection-upgrade", _upgrade(headers={"Connection": "keep-alive"}), 400),
    Refusal("header-flood-300", _upgrade(extra=_FLOOD), None),
    Refusal("header-line-64k", _upgrade(extra=_LONG_LINE), None),
    Refusal("body-content-length",
            _upgrade(headers={"Content-Length": "11"}, body=b"hello there"), None),
    Refusal("body-chunked",
            _upgrade(headers={"Transfer-Encoding": "chunked"}, body=b"5\r\nhello\r\n0\r\n\r\n"),
            None),
]

NOT_HTTP = {
    "tls-client-hello": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32) + b"\r\n\r\n",
    "garbage-request-line": b"HELLO THERE\r\n\r\n",
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "binary-noise": bytes(range(256)) + b"\r\n\r\n",
    "http-0.9": b"GET /echo\r\n\r\n",
}


async def http_exchange(port: int, data: bytes) -> tuple[int, dict[str, str]]:
    """Send raw bytes; the status and headers of the answer (0 if none came)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        except asyncio.IncompleteReadError as exc:
            head = exc.partial
        status_line, *lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split()
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        headers = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return status, headers
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.parametrize("path", ["/chat?room=r&name=n", "/echo"])
@pytest.mark.parametrize("case", _params(REFUSALS))
async def test_malformed_upgrade_is_refused(node: NodeProcess, path: str, case: Refusal) -> None:
    """A malformed upgrade gets a 4xx (the exact one where roomcast decides), never 101 or a
    5xx, and the node's members carry on."""
    async with bystanders(node) as group:
        status, headers = await http_exchange(node.port, case.build(path, node.port))
        await everyone_else_still_served(group, None, case.id)
    assert status != 101, "the node switched protocols"
    if case.status is None:
        assert 400 <= status < 500, status
    else:
        assert status == case.status
    for name, value in case.headers:
        assert headers.get(name) == value, headers


@pytest.mark.parametrize("data", list(NOT_HTTP.values()), ids=list(NOT_HTTP))
async def test_not_http_is_refused(node: NodeProcess, data: bytes) -> None:
    """Bytes that are not an HTTP request get a 4xx (or nothing), and the node carries on."""
    async with bystanders(node) as group:
        status, _ = await http_exchange(node.port, data)
        await everyone_else_still_served(group, None, repr(data[:16]))
    assert status == 0 or 400 <= status < 500, status
