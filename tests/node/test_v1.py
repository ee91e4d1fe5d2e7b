"""node/v1.py: the roomcast.v1 frames and upgrade parameters, as plain values.

Frames are checked against the protocol text and read back with the Python client's
parser (``node.client``), which was written to docs/protocol.md independently.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
from multidict import MultiDict

from roomcast.node import client
from roomcast.node.rooms import RoomIndex
from roomcast.node.v1 import (
    MAX_SINCE_LENGTH,
    PROTOCOL,
    error_frame,
    joined_frame,
    left_frame,
    lost_frame,
    message_frame,
    offers_v1,
    parse_since,
    parse_upgrade_params,
    welcome_frame,
)
from roomcast.shared.handshake import handshake_response
from roomcast.shared.history import Position
from roomcast.shared.ids import ConnectionId, Room


def text(frame: Any) -> dict[str, Any]:
    assert not frame.binary
    obj = json.loads(frame.payload)
    assert isinstance(obj, dict)
    return obj


def test_text_message_in_a_room_with_history() -> None:
    """A text message carries type, room, epoch, offset and data, as the spec's example."""
    frame = message_frame(b"hello", False, "lobby", Position("f3k9q2", 42))
    assert text(frame) == {"type": "message", "room": "lobby", "epoch": "f3k9q2",
                           "offset": 42, "data": "hello"}
    assert client.parse_text(frame.payload.decode()) == [
        client.Message("lobby", "hello", client.Position("f3k9q2", 42))]


def test_text_message_without_position_and_without_room() -> None:
    """No position outside rooms with history; no room for a direct send."""
    assert text(message_frame(b"hi", False, "lobby")) == {
        "type": "message", "room": "lobby", "data": "hi"}
    assert text(message_frame("é\n\u2028".encode(), False)) == {
        "type": "message", "data": "é\n\u2028"}
    assert text(message_frame(b"x", False, "r", ("ep", 1)))["offset"] == 1


def test_binary_message_header_has_no_raw_newline() -> None:
    """A binary frame is compact JSON, one 0x0A, then the bytes (which may hold 0x0A);
    the header escapes everything, so the first newline ends it."""
    data = b"\n\x00line\nbytes\n"
    frame = message_frame(data, True, "sal\u00f3n \"q\" \\", Position("e_-1", 7))
    assert frame.binary
    head, sep, rest = frame.payload.partition(b"\n")
    assert sep and rest == data
    assert json.loads(head) == {"type": "message", "room": "sal\u00f3n \"q\" \\",
                                "epoch": "e_-1", "offset": 7}
    assert head.startswith(b'{"type":"message","room":')  # compact separators
    assert client.parse_binary(frame.payload) == [
        client.Message("sal\u00f3n \"q\" \\", data, client.Position("e_-1", 7))]
    direct = message_frame(b"\n", True)
    assert direct.payload == b'{"type":"message"}\n\n'


def test_welcome_joined_left_lost_error_frames() -> None:
    """Every other frame type, as docs/protocol.md shows them."""
    assert text(welcome_frame("a1", "a1.4")) == {
        "type": "welcome", "protocol": "roomcast.v1", "node": "a1", "connection": "a1.4"}
    assert text(joined_frame("lobby")) == {"type": "joined", "room": "lobby"}
    assert text(joined_frame("lobby", Position("f3k9q2", 40), replayed=1)) == {
        "type": "joined", "room": "lobby", "epoch": "f3k9q2", "offset": 40, "replayed": 1}
    assert text(joined_frame("lobby", Position("f3k9q2", 42), recovered=True,
                             replayed=3)) == {
        "type": "joined", "room": "lobby", "epoch": "f3k9q2", "offset": 42,
        "recovered": True, "replayed": 3}
    assert text(joined_frame("lobby", Position("k81zz0", 5), recovered=False,
                             reason="epoch")) == {
        "type": "joined", "room": "lobby", "epoch": "k81zz0", "offset": 5,
        "recovered": False, "reason": "epoch", "replayed": 0}
    assert text(joined_frame("lobby", None, recovered=False, reason="unavailable")) == {
        "type": "joined", "room": "lobby", "recovered": False, "reason": "unavailable",
        "replayed": 0}
    assert text(left_frame("lobby")) == {"type": "left", "room": "lobby"}
    assert text(lost_frame("lobby", Position("k81zz0", 57), "epoch")) == {
        "type": "lost", "room": "lobby", "epoch": "k81zz0", "offset": 57, "reason": "epoch"}
    assert text(error_frame("forbidden", "not allowed to join room 'admin'", "admin")) == {
        "type": "error", "code": "forbidden", "message": "not allowed to join room 'admin'",
        "room": "admin"}
    assert text(error_frame("rate_limited", "slow down")) == {
        "type": "error", "code": "rate_limited", "message": "slow down"}
    events = client.parse_text(joined_frame("r", Position("e", 2), recovered=False,
                                            reason="window").payload.decode())
    assert events == [client.Joined("r", False, "window", 0, client.Position("e", 2))]


def test_error_frame_refuses_bad_arguments() -> None:
    """An error frame needs a code and a str message."""
    with pytest.raises(ValueError, match="non-empty"):
        error_frame("", "x")
    with pytest.raises(TypeError, match="must be a str"):
        error_frame("forbidden", b"x")  # type: ignore[arg-type]


@pytest.mark.parametrize(("values", "offered"), [
    (["roomcast.v1"], True),
    (["chat, roomcast.v1"], True),
    (["chat", " roomcast.v1 "], True),
    (["Roomcast.V1"], False),
    (["roomcast.v2, roomcast"], False),
    ([], False),
])
def test_offers_v1(values: list[str], offered: bool) -> None:
    """The subprotocol is found among comma-separated, repeated header values, exactly."""
    assert offers_v1(values) is offered


def test_handshake_response_names_the_subprotocol() -> None:
    """The 101 answers Sec-WebSocket-Protocol when one was chosen, and only then."""
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    assert b"Sec-WebSocket-Protocol: roomcast.v1\r\n" in handshake_response(
        key, protocol=PROTOCOL)
    assert b"Sec-WebSocket-Protocol" not in handshake_response(key)
    with pytest.raises(ValueError, match="single token"):
        handshake_response(key, protocol="a,b")


def test_parse_since_valid() -> None:
    """Positions by room; boundaries of the limits are accepted."""
    assert parse_since('{"lobby": ["f3k9q2", 41], "news": ["a0b1c2", 7]}') == {
        Room("lobby"): Position("f3k9q2", 41), Room("news"): Position("a0b1c2", 7)}
    assert parse_since("{}") == {}
    edge = {"r" * 200: ["e" * 32, 2**53 - 1], "é": ["_-", 0]}
    assert len(parse_since(json.dumps(edge))) == 2


@pytest.mark.parametrize(("value", "match"), [
    ("{", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"r": ["e", 1, 2]}', "must be \\[epoch, offset\\]"),
    ('{"r": "e:1"}', "must be \\[epoch, offset\\]"),
    ('{"": ["e", 1]}', "room name must be 1-200"),
    (json.dumps({"r" * 201: ["e", 1]}), "room name must be 1-200"),
    ('{"a\\u0001": ["e", 1]}', "control characters"),
    ('{"r": ["", 1]}', "epoch of room 'r' must be 1-32"),
    (json.dumps({"r": ["e" * 33, 1]}), "epoch of room 'r' must be 1-32"),
    ('{"r": ["e.1", 1]}', "epoch of room 'r'"),
    ('{"r": [7, 1]}', "epoch of room 'r'"),
    ('{"r": ["e", -1]}', "offset of room 'r' must be an integer from 0 to 2\\^53-1"),
    ('{"r": ["e", 1.0]}', "offset of room 'r'"),
    ('{"r": ["e", true]}', "offset of room 'r'"),
    ('{"r": ["e", "1"]}', "offset of room 'r'"),
    (json.dumps({"r": ["e", 2**53]}), "offset of room 'r'"),
    (json.dumps({f"{i}": ["e", 1] for i in range(101)}, separators=(",", ":")),
     "101 rooms, at most 100"),
])
def test_parse_since_refusals_say_what_is_wrong(value: str, match: str) -> None:
    """Each malformed value gets a specific message (the body of the HTTP 400)."""
    with pytest.raises(ValueError, match=match):
        parse_since(value)


def test_parse_since_length_is_counted_percent_encoded() -> None:
    """4096 characters percent-encoded is the limit, as the client counts them."""
    room = "x" * 48
    positions = {f"{room}{i:02d}": ["e", 1] for i in range(60)}
    value = json.dumps(positions, separators=(",", ":"))
    assert len(value) < MAX_SINCE_LENGTH < len(quote(value, safe=""))
    with pytest.raises(ValueError, match="percent-encoded, at most 4096"):
        parse_since(value)
    fits = json.dumps(dict(list(positions.items())[:10]), separators=(",", ":"))
    assert len(parse_since(fits)) == 10


def test_parse_upgrade_params() -> None:
    """since and previous from the query; previous must be a connection id; neither may
    be repeated; absent ones are empty."""
    query = MultiDict({"roomcast.since": '{"r": ["e", 3]}', "roomcast.previous": "3f2a.1c",
                       "room": "r"})
    params = parse_upgrade_params(query, query.getall)
    assert params.since == {Room("r"): Position("e", 3)}
    assert params.previous == ConnectionId("3f2a.1c")
    empty = parse_upgrade_params(MultiDict(), MultiDict().getall)
    assert empty.since == {} and empty.previous is None
    with pytest.raises(ValueError, match=r"roomcast\.previous is not a connection id"):
        parse_upgrade_params({"roomcast.previous": "nodot"})
    twice: MultiDict[str] = MultiDict([("roomcast.since", "{}"), ("roomcast.since", "{}")])
    with pytest.raises(ValueError, match="given more than once"):
        parse_upgrade_params(twice, twice.getall)


def test_room_index_keeps_plain_framed_and_pending_apart() -> None:
    """Plain and framed members are separate views; a pending member is in the room
    (size, contains) but in neither until activated; leaving clears every view."""
    index: RoomIndex[str] = RoomIndex()
    a, b, c = ConnectionId("n.1"), ConnectionId("n.2"), ConnectionId("n.3")
    room = Room("r")
    assert index.join(room, a, "a") is True
    index.join(room, b, "b", framed=True)
    index.join(room, c, "c", pending=True)
    assert dict(index.plain(room)) == {a: "a"}
    assert dict(index.framed(room)) == {b: "b"}
    assert index.size(room) == 3 and index.contains(room, c)
    index.activate(room, c)
    assert dict(index.framed(room)) == {b: "b", c: "c"}
    index.activate(room, ConnectionId("n.9"))  # not a member: nothing
    assert len(index.framed(room)) == 2
    index.leave(room, b)
    assert dict(index.framed(room)) == {c: "c"}
    index.leave_all(c)
    assert not index.framed(room)
    assert index.leave(room, a) is True
    assert not index.plain(room)
