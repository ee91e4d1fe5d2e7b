"""The msgpack envelope between nodes: round trips, and decode rejecting anything invalid."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from roomcast.shared.envelope import (
    ENVELOPE_VERSION,
    POSITIONED_VERSION,
    Envelope,
    Kind,
    decode,
    encode,
    encode_head,
    room_envelope,
)
from roomcast.shared.errors import EnvelopeError

ALL_BYTES = bytes(range(256))


def _wire(**fields: Any) -> bytes:
    """Envelope bytes built by hand from a valid ROOM envelope with ``fields`` replaced."""
    values: dict[str, Any] = {
        "version": ENVELOPE_VERSION,
        "kind": int(Kind.ROOM),
        "origin": "node1",
        "target": "lobby",
        "exclude": "",
        "binary": False,
        "payload": b"hi",
        "sent_at": 1.5,
    }
    values.update(fields)
    data: bytes = msgpack.packb(list(values.values()), use_bin_type=True)
    return data


@pytest.mark.parametrize(
    "env",
    [
        Envelope(Kind.ROOM, "lobby", b"hello", False, "node1", "node1.a", 1700000000.25),
        Envelope(Kind.CONNECTION, "node2.ff", ALL_BYTES, True, "node1"),
        Envelope(Kind.ALL, "", "ünïcode 💬".encode(), False, "", "node3.1"),
    ],
    ids=lambda env: env.kind.name,
)
def test_round_trip_each_kind(env: Envelope) -> None:
    """encode then decode gives back an equal envelope for every Kind."""
    assert decode(encode(env)) == env


def test_binary_payload_preserved_exactly() -> None:
    """A binary payload with all 256 byte values comes back byte for byte, as bytes."""
    out = decode(encode(Envelope(Kind.ROOM, "r", ALL_BYTES, True)))
    assert type(out.payload) is bytes
    assert out.payload == ALL_BYTES
    assert out.binary is True


def test_room_envelope_helper() -> None:
    """room_envelope builds a ROOM envelope with the given fields."""
    env = room_envelope("lobby", b"x", binary=True, origin="n", exclude="n.1", sent_at=2.0)
    assert env == Envelope(Kind.ROOM, "lobby", b"x", True, "n", "n.1", 2.0)


def test_hand_built_wire_form_decodes() -> None:
    """The documented array form [version, kind, origin, target, exclude, binary, payload,
    sent_at] decodes to the matching envelope."""
    assert decode(_wire()) == Envelope(Kind.ROOM, "lobby", b"hi", False, "node1", "", 1.5)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x92\x01", _wire() + b"\x00", "text"],
    ids=["empty", "reserved-byte", "truncated", "extra-data", "str"],
)
def test_not_msgpack_rejected(data: Any) -> None:
    """Bytes that are not one msgpack object raise EnvelopeError."""
    with pytest.raises(EnvelopeError):
        decode(data)


@pytest.mark.parametrize(
    "obj", [{"kind": 1}, "lobby", 1, None, (1, 2, 3)], ids=["map", "str", "int", "nil", "short"]
)
def test_wrong_type_or_length_rejected(obj: object) -> None:
    """Anything but an array of exactly 8 (or 10) items raises EnvelopeError."""
    with pytest.raises(EnvelopeError):
        decode(msgpack.packb(obj, use_bin_type=True))


def test_too_long_array_rejected() -> None:
    """An array with a ninth item raises EnvelopeError."""
    data = [*msgpack.unpackb(_wire()), 0]
    with pytest.raises(EnvelopeError, match="8 items"):
        decode(msgpack.packb(data, use_bin_type=True))


@pytest.mark.parametrize("version", [0, 3, True, 1.0, 2.0, "1", None])
def test_wrong_version_rejected(version: object) -> None:
    """Only the integer versions 1 and 2 are accepted."""
    with pytest.raises(EnvelopeError, match="version"):
        decode(_wire(version=version))


def test_version_must_match_the_length() -> None:
    """Version 1 has 8 items and version 2 has 10: a mismatch is EnvelopeError."""
    with pytest.raises(EnvelopeError, match="version 2 envelope has 10 items"):
        decode(_wire(version=POSITIONED_VERSION))
    v1_with_position = [*msgpack.unpackb(_wire()), "e1", 5]
    with pytest.raises(EnvelopeError, match="version 1 envelope has 8 items"):
        decode(msgpack.packb(v1_with_position, use_bin_type=True))


def _wire2(epoch: object = "f3k9q2", offset: object = 42, **fields: Any) -> bytes:
    """Version 2 envelope bytes built by hand: ``_wire``'s fields, then epoch and offset."""
    items = [*msgpack.unpackb(_wire(version=POSITIONED_VERSION, **fields)), epoch, offset]
    data: bytes = msgpack.packb(items, use_bin_type=True)
    return data


def test_positioned_envelope_is_version_2_and_round_trips() -> None:
    """A room envelope with a position encodes as version 2 (10 items) and decodes equal;
    without one it stays version 1 (8 items), as nodes of earlier releases read it."""
    plain = Envelope(Kind.ROOM, "lobby", b"hi", False, "node1", "node1.a", 1.5)
    positioned = plain.with_position("f3k9q2", 42)
    assert positioned.positioned and not plain.positioned
    assert msgpack.unpackb(encode(plain))[0] == ENVELOPE_VERSION
    items = msgpack.unpackb(encode(positioned))
    assert items[0] == POSITIONED_VERSION and items[8:] == ["f3k9q2", 42]
    assert decode(encode(positioned)) == positioned
    assert decode(_wire2()) == Envelope(Kind.ROOM, "lobby", b"hi", False, "node1", "", 1.5,
                                        "f3k9q2", 42)


@pytest.mark.parametrize("offset", [1, 127, 128, 2**16, 2**32, 2**53 - 1])
def test_head_plus_position_is_the_envelope(offset: int) -> None:
    """encode_head, then the msgpack of the epoch and of the offset, is exactly the
    version 2 envelope (what the Redis script builds), for offsets of every width."""
    env = Envelope(Kind.ROOM, "lobby", "ü".encode(), False, "node1", "node1.a", 2.5)
    wire = encode_head(env) + msgpack.packb("Ab_-9") + msgpack.packb(offset)
    assert wire == encode(env.with_position("Ab_-9", offset))
    assert decode(wire) == env.with_position("Ab_-9", offset)
    assert encode_head(env.with_position("x", 3)) == encode_head(env)


def test_position_in_other_msgpack_widths_decodes() -> None:
    """An epoch packed as str8 and an offset as uint64 (as another packer may write them,
    Redis's cmsgpack for one) decode to the same position."""
    head = encode_head(Envelope(Kind.ROOM, "lobby", b"hi", False))
    wire = head + b"\xd9\x02e1" + b"\xcf" + (7).to_bytes(8, "big")
    assert decode(wire).epoch == "e1"
    assert decode(wire).offset == 7


@pytest.mark.parametrize(
    ("epoch", "offset", "fields", "match"),
    [
        ("", 5, {}, "epoch"),
        ("x" * 33, 5, {}, "epoch"),
        ("a b", 5, {}, "epoch"),
        (7, 5, {}, "epoch"),
        ("e1", 0, {}, "offset"),
        ("e1", -1, {}, "offset"),
        ("e1", 2**53, {}, "offset"),
        ("e1", 5.0, {}, "offset"),
        ("e1", True, {}, "offset"),
        ("", 0, {}, "must carry a position"),
        ("e1", 5, {"kind": int(Kind.ALL), "target": ""}, "only a room envelope"),
        ("e1", 5, {"kind": int(Kind.CONNECTION), "target": "n.1"}, "only a room envelope"),
    ],
)
def test_bad_positions_rejected(epoch: object, offset: object, fields: dict[str, Any],
                                match: str) -> None:
    """A version 2 envelope whose epoch or offset is out of the protocol's range, or that
    is not a room message, or that carries no position, is EnvelopeError."""
    with pytest.raises(EnvelopeError, match=match):
        decode(_wire2(epoch, offset, **fields))


def test_position_checked_when_built_in_code() -> None:
    """with_position validates too: a bad offset or a position on a send is refused."""
    with pytest.raises(EnvelopeError, match="offset"):
        room_envelope("lobby", b"x", binary=True).with_position("e1", 0)
    with pytest.raises(EnvelopeError, match="only a room envelope"):
        Envelope(Kind.CONNECTION, "n.1", b"x", True).with_position("e1", 1)


@pytest.mark.parametrize("kind", [0, 6, -1, True, 1.0, "1", None, [1], {"a": 1}])
def test_unknown_kind_rejected(kind: object) -> None:
    """A kind that is not the integer of a Kind (bool, float, list, map...) is EnvelopeError."""
    with pytest.raises(EnvelopeError, match="kind"):
        decode(_wire(kind=kind))


@pytest.mark.parametrize("target", ["", "x" * 201, "a\nb", 7])
def test_bad_room_rejected(target: object) -> None:
    """A ROOM envelope whose target is not a valid room name is EnvelopeError."""
    with pytest.raises(EnvelopeError):
        decode(_wire(target=target))


@pytest.mark.parametrize("target", ["", "lobby", "node.", "NODE.1", "n.zz"])
def test_bad_connection_target_rejected(target: str) -> None:
    """A CONNECTION envelope whose target is not a connection id is EnvelopeError."""
    with pytest.raises(EnvelopeError):
        decode(_wire(kind=int(Kind.CONNECTION), target=target))


def test_all_with_target_rejected() -> None:
    """An ALL envelope must not carry a target."""
    with pytest.raises(EnvelopeError, match="no target"):
        decode(_wire(kind=int(Kind.ALL), target="lobby"))


@pytest.mark.parametrize(
    "fields",
    [{"origin": "Not A Node"}, {"origin": 5}, {"exclude": "lobby"}, {"exclude": None}],
)
def test_bad_origin_or_exclude_rejected(fields: dict[str, object]) -> None:
    """origin must be a node id or empty; exclude a connection id or empty."""
    with pytest.raises(EnvelopeError):
        decode(_wire(**fields))


def test_non_utf8_text_payload_rejected() -> None:
    """A text envelope whose payload is not UTF-8 is EnvelopeError; as binary it is fine."""
    with pytest.raises(EnvelopeError, match="UTF-8"):
        decode(_wire(payload=b"\xff\xfe", binary=False))
    assert decode(_wire(payload=b"\xff\xfe", binary=True)).payload == b"\xff\xfe"


@pytest.mark.parametrize("payload", ["text", 1, None, [b"x"]])
def test_non_bytes_payload_rejected(payload: object) -> None:
    """A payload that is not msgpack bin (e.g. a str) is EnvelopeError."""
    with pytest.raises(EnvelopeError, match="payload"):
        decode(_wire(payload=payload))


@pytest.mark.parametrize("fields", [{"binary": 1}, {"sent_at": "now"}, {"sent_at": True}])
def test_bad_flag_or_timestamp_rejected(fields: dict[str, object]) -> None:
    """binary must be a bool and sent_at a number (not a bool)."""
    with pytest.raises(EnvelopeError):
        decode(_wire(**fields))


def test_constructor_validates() -> None:
    """Building an invalid Envelope in code raises EnvelopeError too."""
    with pytest.raises(EnvelopeError):
        Envelope(Kind.ROOM, "", b"x", True)
    with pytest.raises(EnvelopeError):
        Envelope(1, "lobby", b"x", True)  # type: ignore[arg-type]


@given(st.binary(max_size=512))
def test_decode_random_bytes_only_envelope_error(data: bytes) -> None:
    """decode of arbitrary bytes returns an Envelope or raises EnvelopeError, nothing else."""
    with contextlib.suppress(EnvelopeError):
        assert isinstance(decode(data), Envelope)


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)


# Each field is either plausible or arbitrary, so decoding gets past the early checks.
_near_envelopes = st.tuples(
    st.just(ENVELOPE_VERSION) | _values,
    st.sampled_from([int(k) for k in Kind]) | _values,
    st.sampled_from(["", "node1"]) | _values,
    st.sampled_from(["", "lobby", "node1.a"]) | _values,
    st.sampled_from(["", "node1.b"]) | _values,
    st.booleans() | _values,
    st.binary(max_size=20) | _values,
    st.floats() | _values,
)


@given(_near_envelopes)
def test_decode_random_arrays_only_envelope_error(items: tuple[object, ...]) -> None:
    """decode of any 8-item msgpack array gives an Envelope or raises only EnvelopeError."""
    with contextlib.suppress(EnvelopeError):
        assert isinstance(decode(msgpack.packb(list(items), use_bin_type=True)), Envelope)


@given(
    st.sampled_from([Kind.ROOM, Kind.CONNECTION, Kind.ALL]),
    st.binary(max_size=300),
    st.floats(allow_nan=False),
    st.from_regex(r"[0-9a-z]{0,12}", fullmatch=True),
)
def test_round_trip_property(kind: Kind, payload: bytes, sent_at: float, origin: str) -> None:
    """Any valid binary envelope survives encode/decode unchanged."""
    target = {Kind.ROOM: "room", Kind.CONNECTION: "abc.1", Kind.ALL: ""}[kind]
    env = Envelope(kind, target, payload, True, origin, "", sent_at)
    assert decode(encode(env)) == env


@given(
    st.binary(max_size=300),
    st.from_regex(r"[0-9A-Za-z_-]{1,32}", fullmatch=True),
    st.integers(1, 2**53 - 1),
)
def test_positioned_round_trip_property(payload: bytes, epoch: str, offset: int) -> None:
    """Any valid room envelope with any valid position survives encode/decode, and
    encode_head plus the packed position is the same bytes."""
    env = Envelope(Kind.ROOM, "room", payload, True, "n1", "", 1.0).with_position(epoch, offset)
    assert decode(encode(env)) == env
    assert encode_head(env) + msgpack.packb(epoch) + msgpack.packb(offset) == encode(env)


@given(_near_envelopes, st.sampled_from(["", "e1", "x" * 33]) | _values,
       st.sampled_from([0, 1, 2**53]) | _values)
def test_decode_random_positioned_arrays_only_envelope_error(
    items: tuple[object, ...], epoch: object, offset: object
) -> None:
    """decode of any 10-item msgpack array (a version 2 envelope with a position of any
    shape) gives an Envelope or raises only EnvelopeError."""
    data = msgpack.packb([POSITIONED_VERSION, *items[1:], epoch, offset], use_bin_type=True)
    with contextlib.suppress(EnvelopeError):
        assert isinstance(decode(data), Envelope)
