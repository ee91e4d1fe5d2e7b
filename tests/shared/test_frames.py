"""RFC 6455 frame bytes: build, parse, mask, close payloads and PreparedMessage.

websockets (an independent implementation) is the oracle for the wire bytes.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Close
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode as WsOpcode
from websockets.streams import StreamReader
from websockets.utils import apply_mask as ws_apply_mask

from roomcast.shared.errors import ProtocolError
from roomcast.shared.frames import (
    DEFLATE_MIN_SIZE,
    DEFLATE_TRAILER,
    Frame,
    MessageReader,
    PreparedMessage,
    apply_mask,
    binary_frame,
    build_frame,
    close_frame,
    close_payload,
    deflate_message,
    inflate_message,
    parse_close_payload,
    parse_frame,
    ping_frame,
    pong_frame,
    text_frame,
)
from roomcast.shared.rfc6455 import CloseCode, Opcode

MASK = b"\x37\xfa\x21\x3d"
COMPRESSIBLE = ("roomcast broadcast " * 40).encode()


def ws_parse(
    data: bytes, *, mask: bool, extensions: list[PerMessageDeflate] | None = None
) -> WsFrame:
    """Parse one complete frame with websockets' parser (``mask``: read as a server)."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = WsFrame.parse(reader.read_exact, mask=mask, extensions=extensions)
    try:
        next(parser)
    except StopIteration as done:
        frame: WsFrame = done.value
        return frame
    raise AssertionError("websockets wanted more bytes than the frame has")


def parse_one(data: bytes, **kwargs: object) -> Frame:
    """Our parse of exactly one complete frame that uses every byte of ``data``."""
    result = parse_frame(data, **kwargs)  # type: ignore[arg-type]
    assert result is not None
    frame, used = result
    assert used == len(data)
    return frame


def protocol_error(data: bytes, **kwargs: object) -> ProtocolError:
    """The ProtocolError parse_frame raises for ``data``."""
    with pytest.raises(ProtocolError) as info:
        parse_frame(data, **kwargs)  # type: ignore[arg-type]
    return info.value


# --- build_frame ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "header_size"), [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)]
)
@pytest.mark.parametrize("opcode", [Opcode.TEXT, Opcode.BINARY])
def test_build_frame_matches_websockets(opcode: Opcode, length: int, header_size: int) -> None:
    """Unmasked frames in the 7, 16 and 64-bit length forms are byte-identical to websockets'."""
    payload = b"a" * length
    data = build_frame(opcode, payload)
    assert data == WsFrame(WsOpcode(opcode), payload).serialize(mask=False)
    assert len(data) == header_size + length


@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536])
def test_masked_frame_parsed_by_websockets(length: int) -> None:
    """A masked frame we build is read by websockets (as a server) with the right payload."""
    payload = os.urandom(length)
    frame = ws_parse(build_frame(Opcode.BINARY, payload, mask_key=MASK), mask=True)
    assert frame.opcode is WsOpcode.BINARY
    assert frame.data == payload


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536])
def test_masked_frame_round_trip(length: int) -> None:
    """A masked frame parses back to its unmasked payload, mask bit and key."""
    payload = os.urandom(length)
    frame = parse_one(build_frame(Opcode.BINARY, payload, mask_key=MASK), expect_masked=True)
    assert frame == Frame(Opcode.BINARY, payload, masked=True, mask_key=MASK)


@pytest.mark.parametrize("length", [0, 3, 126, 70000])
def test_parse_websockets_masked_frame(length: int) -> None:
    """A client frame serialised by websockets (random mask) parses to its payload."""
    payload = os.urandom(length)
    wire = WsFrame(WsOpcode.TEXT, payload, fin=False).serialize(mask=True)
    frame = parse_one(wire, expect_masked=True)
    assert (frame.opcode, frame.payload, frame.fin, frame.masked) == (
        Opcode.TEXT,
        payload,
        False,
        True,
    )


def test_build_frame_flags() -> None:
    """fin=False and rsv1=True set the matching header bits."""
    data = build_frame(Opcode.TEXT, b"x", fin=False, rsv1=True)
    assert data[0] == 0x40 | 0x01
    frame = parse_one(data, allow_rsv1=True)
    assert not frame.fin and frame.rsv1


def test_build_control_frame_limits() -> None:
    """Control frames over 125 bytes or not final are refused with ValueError."""
    build_frame(Opcode.PING, b"x" * 125)
    with pytest.raises(ValueError, match="125"):
        build_frame(Opcode.PING, b"x" * 126)
    with pytest.raises(ValueError, match="fragmented"):
        build_frame(Opcode.CLOSE, b"", fin=False)


@pytest.mark.parametrize(
    ("make", "opcode", "payload"),
    [
        (lambda mask: text_frame("héllo", mask=mask), Opcode.TEXT, "héllo".encode()),
        (lambda mask: binary_frame(b"\x00\xff", mask=mask), Opcode.BINARY, b"\x00\xff"),
        (lambda mask: ping_frame(b"p", mask=mask), Opcode.PING, b"p"),
        (lambda mask: pong_frame(b"q", mask=mask), Opcode.PONG, b"q"),
    ],
    ids=["text", "binary", "ping", "pong"],
)
@pytest.mark.parametrize("mask", [False, True])
def test_frame_helpers(
    make: Callable[[bool], bytes], opcode: Opcode, payload: bytes, mask: bool
) -> None:
    """text/binary/ping/pong helpers build a final frame, masked only when asked."""
    frame = parse_one(make(mask), expect_masked=mask)
    assert (frame.opcode, frame.payload, frame.fin, frame.masked) == (opcode, payload, True, mask)


def test_parse_consumes_one_frame_at_a_time() -> None:
    """parse_frame reports the bytes used so back-to-back frames parse in turn."""
    first, second = text_frame("one"), binary_frame(b"two" * 100)
    data = first + second
    result = parse_frame(data)
    assert result is not None
    frame, used = result
    assert (frame.payload, used) == (b"one", len(first))
    rest = parse_frame(memoryview(data)[used:])
    assert rest is not None
    assert rest[0].payload == b"two" * 100 and rest[1] == len(second)


# --- apply_mask ----------------------------------------------------------------------


@given(st.binary(min_size=4, max_size=4), st.binary(max_size=300))
def test_apply_mask_involution_and_oracle(key: bytes, data: bytes) -> None:
    """Masking twice restores the data, and one masking equals websockets' apply_mask."""
    masked = apply_mask(key, data)
    assert masked == ws_apply_mask(data, key)
    assert apply_mask(key, masked) == data


@pytest.mark.parametrize("key", [b"", b"abc", b"abcde"])
def test_apply_mask_key_length(key: bytes) -> None:
    """A mask key that is not 4 bytes is a ValueError."""
    with pytest.raises(ValueError, match="4 bytes"):
        apply_mask(key, b"data")


# --- truncation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "wire",
    [
        build_frame(Opcode.TEXT, b""),
        build_frame(Opcode.TEXT, b"hello"),
        build_frame(Opcode.BINARY, b"x" * 126, mask_key=MASK),
        build_frame(Opcode.BINARY, b"y" * 300),
        close_frame(CloseCode.GOING_AWAY, "bye", mask=True),
        ping_frame(b"", mask=True),
    ],
    ids=["empty", "short", "masked-16bit", "16bit", "masked-close", "masked-empty-ping"],
)
def test_every_truncated_prefix_is_none(wire: bytes) -> None:
    """parse_frame returns None for every proper prefix of a valid frame, never an error."""
    for end in range(len(wire)):
        assert parse_frame(wire[:end], expect_masked=None) is None, end
    assert parse_frame(wire) is not None


def test_truncated_64bit_frame_is_none() -> None:
    """Prefixes of a 64-bit-length masked frame (header, key, payload) are incomplete."""
    wire = build_frame(Opcode.BINARY, b"z" * 65536, mask_key=MASK)
    for end in [*range(15), 100, 65535, len(wire) - 1]:
        assert parse_frame(wire[:end]) is None, end
    assert parse_one(wire).payload == b"z" * 65536


# --- protocol errors -----------------------------------------------------------------


@pytest.mark.parametrize("bits", [0x40, 0x20, 0x10])
def test_reserved_bits_rejected(bits: int) -> None:
    """RSV1/2/3 without a negotiated extension is a 1002 protocol error."""
    error = protocol_error(bytes((0x81 | bits, 0x00)))
    assert error.close_code == CloseCode.PROTOCOL_ERROR


def test_rsv1_allowed_only_when_negotiated() -> None:
    """allow_rsv1 admits RSV1 on data frames, never RSV2/RSV3 or a compressed control frame."""
    assert parse_one(bytes((0xC1, 0x00)), allow_rsv1=True).rsv1
    assert protocol_error(bytes((0xA1, 0x00)), allow_rsv1=True).close_code == 1002
    assert protocol_error(bytes((0xC9, 0x00)), allow_rsv1=True).close_code == 1002


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcodes_rejected(opcode: int) -> None:
    """Reserved opcodes are a 1002 protocol error."""
    error = protocol_error(bytes((0x80 | opcode, 0x00)))
    assert error.close_code == CloseCode.PROTOCOL_ERROR
    assert "opcode" in str(error)


@pytest.mark.parametrize("opcode", [Opcode.CLOSE, Opcode.PING, Opcode.PONG])
def test_fragmented_control_frame_rejected(opcode: Opcode) -> None:
    """A control frame without FIN is a 1002 protocol error."""
    error = protocol_error(bytes((int(opcode), 0x00)))
    assert error.close_code == CloseCode.PROTOCOL_ERROR
    assert "fragmented" in str(error)


def test_control_payload_over_125_rejected() -> None:
    """A ping announcing 126 bytes is a 1002 error, even before the payload arrives."""
    wire = bytes((0x89, 126)) + struct.pack("!H", 126)
    assert protocol_error(wire).close_code == CloseCode.PROTOCOL_ERROR
    assert protocol_error(wire + b"x" * 126).close_code == CloseCode.PROTOCOL_ERROR


def test_masking_must_match_expectation() -> None:
    """An unmasked frame where masking is expected, and the reverse, are 1002 errors."""
    unmasked = build_frame(Opcode.TEXT, b"hi")
    masked = build_frame(Opcode.TEXT, b"hi", mask_key=MASK)
    assert protocol_error(unmasked, expect_masked=True).close_code == 1002
    assert protocol_error(masked, expect_masked=False).close_code == 1002
    assert parse_one(unmasked, expect_masked=False).payload == b"hi"
    assert parse_one(masked, expect_masked=True).payload == b"hi"


def test_payload_over_max_is_1009() -> None:
    """A frame announcing more than max_payload bytes is 1009, before the payload arrives."""
    header = bytes((0x82, 126)) + struct.pack("!H", 4096)
    assert protocol_error(header, max_payload=4095).close_code == CloseCode.MESSAGE_TOO_BIG
    assert parse_frame(header, max_payload=4096) is None
    assert parse_one(header + b"x" * 4096, max_payload=4096).payload == b"x" * 4096


def test_64bit_length_with_msb_rejected() -> None:
    """A 64-bit length with the top bit set is a protocol error."""
    wire = bytes((0x82, 127)) + struct.pack("!Q", 1 << 63)
    assert protocol_error(wire).close_code == CloseCode.PROTOCOL_ERROR


def test_close_payload_of_one_byte_rejected() -> None:
    """A close frame with a 1-byte payload is a 1002 error."""
    assert protocol_error(bytes((0x88, 0x01, 0x03))).close_code == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_invalid_close_code_rejected(code: int) -> None:
    """A close frame carrying a code that may not be sent is a 1002 error."""
    wire = build_frame(Opcode.CLOSE, struct.pack("!H", code))
    error = protocol_error(wire)
    assert error.close_code == CloseCode.PROTOCOL_ERROR
    assert str(code) in str(error)


def test_non_utf8_close_reason_is_1007() -> None:
    """A close reason that is not UTF-8 is a 1007 invalid-data error."""
    wire = build_frame(Opcode.CLOSE, struct.pack("!H", 1000) + b"\xff\xfe")
    assert protocol_error(wire).close_code == CloseCode.INVALID_DATA


def test_valid_close_frame_parses() -> None:
    """A close frame with code and reason parses; its payload decodes back."""
    frame = parse_one(close_frame(CloseCode.GOING_AWAY, "server going down"))
    assert frame.opcode is Opcode.CLOSE
    assert parse_close_payload(frame.payload) == (1001, "server going down")


def test_empty_close_payload_is_no_status() -> None:
    """An empty close payload means 1005 (no status) with no reason."""
    assert parse_close_payload(b"") == (CloseCode.NO_STATUS, "")


def test_close_payload_matches_websockets() -> None:
    """close_payload gives the same bytes as websockets' Close serialisation."""
    assert close_payload(4000, "ünï") == Close(4000, "ünï").serialize()


@pytest.mark.parametrize("code", [999, 1004, 1005, 1006, 1015, 2999, 5000])
def test_close_payload_rejects_unsendable_codes(code: int) -> None:
    """close_payload and close_frame refuse codes that may not be sent, with ValueError."""
    with pytest.raises(ValueError, match=str(code)):
        close_payload(code)
    with pytest.raises(ValueError, match=str(code)):
        close_frame(code)


def test_close_reason_length_limit() -> None:
    """A reason of 123 bytes fits a close frame; 124 is a ValueError."""
    assert len(close_payload(1000, "r" * 123)) == 125
    with pytest.raises(ValueError, match="123"):
        close_payload(1000, "r" * 124)


# --- deflate -------------------------------------------------------------------------


@pytest.mark.parametrize("wbits", [9, 12, 15])
def test_deflate_round_trip(wbits: int) -> None:
    """deflate_message output, without the sync trailer, inflates back to the payload."""
    body = deflate_message(COMPRESSIBLE, wbits)
    assert not body.endswith(DEFLATE_TRAILER)
    assert len(body) < len(COMPRESSIBLE)
    assert inflate_message(body, wbits) == COMPRESSIBLE


@pytest.mark.parametrize("wbits", [0, 8, 16])
def test_deflate_wbits_range(wbits: int) -> None:
    """Window bits outside 9-15 are a ValueError."""
    with pytest.raises(ValueError, match="9-15"):
        deflate_message(b"x", wbits)


def test_inflate_over_max_size_is_1009() -> None:
    """Inflating past max_size is a 1009 error; exactly max_size is fine."""
    body = deflate_message(b"\x00" * 100_000)
    assert inflate_message(body, max_size=100_000) == b"\x00" * 100_000
    with pytest.raises(ProtocolError) as info:
        inflate_message(body, max_size=99_999)
    assert info.value.close_code == CloseCode.MESSAGE_TOO_BIG


def test_inflate_garbage_is_protocol_error() -> None:
    """Bytes that are not deflate data raise ProtocolError, not zlib.error."""
    with pytest.raises(ProtocolError, match="deflate"):
        inflate_message(b"\xff\xff\xff\xff")


def test_deflated_message_decodes_with_context_takeover() -> None:
    """A decompressor that kept context from earlier messages still decodes each message."""
    decompressor = zlib.decompressobj(-15)
    messages = [COMPRESSIBLE, COMPRESSIBLE, b"another " * 30 + COMPRESSIBLE]
    for payload in messages:
        body = deflate_message(payload)
        assert decompressor.decompress(body + DEFLATE_TRAILER) == payload
        assert not decompressor.unused_data and not decompressor.eof


def test_deflated_messages_are_independent() -> None:
    """Each message decodes with a fresh decompressor (no reference to earlier messages)."""
    deflate_message(COMPRESSIBLE)
    body = deflate_message(COMPRESSIBLE)
    assert zlib.decompressobj(-15).decompress(body + DEFLATE_TRAILER) == COMPRESSIBLE


# --- PreparedMessage -----------------------------------------------------------------


def test_prepared_text_and_binary() -> None:
    """of(str) is a text frame of the UTF-8 bytes; of(bytes-like) is a binary frame."""
    text = PreparedMessage.of("héllo")
    assert (text.binary, text.payload) == (False, "héllo".encode())
    assert text.frame == text_frame("héllo")
    for data in (b"\x00\x01", bytearray(b"\x00\x01"), memoryview(b"\x00\x01")):
        binary = PreparedMessage.of(data)
        assert binary.binary and type(binary.payload) is bytes
        assert binary.frame == binary_frame(b"\x00\x01")


def test_prepared_rejects_other_types() -> None:
    """of() of anything but str or bytes-like is a TypeError."""
    with pytest.raises(TypeError, match="str or bytes"):
        PreparedMessage.of(123)  # type: ignore[arg-type]


def test_prepared_frame_reused() -> None:
    """frame_for(0) hands back the same frame object every time."""
    message = PreparedMessage.of(COMPRESSIBLE)
    assert message.frame_for(0) is message.frame
    assert message.frame_for(0) is message.frame


@pytest.mark.parametrize("binary", [False, True])
def test_prepared_compressed_frame(binary: bool) -> None:
    """frame_for(15) is an RSV1 frame with the message's opcode that inflates to the payload."""
    message = PreparedMessage(COMPRESSIBLE, binary=binary)
    wire = message.frame_for(15)
    frame = parse_one(wire, allow_rsv1=True, expect_masked=False)
    assert frame.rsv1 and frame.fin
    assert frame.opcode is (Opcode.BINARY if binary else Opcode.TEXT)
    assert len(frame.payload) < len(COMPRESSIBLE)
    assert inflate_message(frame.payload, 15) == COMPRESSIBLE


def test_prepared_compresses_once_per_wbits() -> None:
    """A second frame_for with the same wbits returns the same bytes object."""
    message = PreparedMessage.of(COMPRESSIBLE)
    first = message.frame_for(15)
    assert message.frame_for(15) is first
    other = message.frame_for(10)
    assert message.frame_for(10) is other
    assert other is not first


def test_prepared_small_payload_not_compressed() -> None:
    """Payloads under DEFLATE_MIN_SIZE are sent as the plain frame."""
    message = PreparedMessage.of(b"a" * (DEFLATE_MIN_SIZE - 1))
    assert message.frame_for(15) is message.frame


def test_prepared_incompressible_payload_sent_plain() -> None:
    """A payload that deflate would not shrink goes out as the plain frame."""
    message = PreparedMessage.of(os.urandom(1000))
    assert message.frame_for(15) is message.frame


@pytest.mark.parametrize("wbits", [15, 10])
def test_prepared_frames_decode_in_websockets_client(wbits: int) -> None:
    """A websockets client with permessage-deflate and context takeover decodes a series
    of our compressed frames, plain frames in between."""
    extension = PerMessageDeflate(False, False, wbits, 15)
    payloads = [COMPRESSIBLE, b"short", COMPRESSIBLE[::-1], COMPRESSIBLE]
    for payload in payloads:
        wire = PreparedMessage(payload, binary=True).frame_for(wbits)
        frame = ws_parse(wire, mask=False, extensions=[extension])
        assert frame.data == payload
        assert frame.opcode is WsOpcode.BINARY


# --- properties ----------------------------------------------------------------------


@given(st.binary(max_size=64), st.booleans(), st.none() | st.booleans(), st.integers(0, 200))
def test_parse_random_bytes(data: bytes, allow_rsv1: bool, masked: bool | None, limit: int) -> None:
    """parse_frame on arbitrary bytes returns None or a frame, or raises ProtocolError only."""
    try:
        result = parse_frame(data, allow_rsv1=allow_rsv1, expect_masked=masked, max_payload=limit)
    except ProtocolError as exc:
        assert exc.close_code in (1002, 1007, 1009)
        return
    if result is not None:
        frame, used = result
        assert isinstance(frame, Frame)
        assert 2 <= used <= len(data)


_data_opcodes = st.sampled_from([Opcode.CONTINUATION, Opcode.TEXT, Opcode.BINARY])
_control_opcodes = st.sampled_from([Opcode.PING, Opcode.PONG])


def _filler(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


@st.composite
def _frames(draw: st.DrawFn) -> tuple[Opcode, bytes, bool, bool, bytes | None]:
    if draw(st.booleans()):
        opcode = draw(_control_opcodes)
        payload = draw(st.binary(max_size=125))
        fin, rsv1 = True, False
    else:
        opcode = draw(_data_opcodes)
        # Small payloads, plus lengths around the 16/64-bit length boundary.
        payload = draw(st.binary(max_size=300) | st.integers(65_530, 65_540).map(_filler))
        fin, rsv1 = draw(st.booleans()), draw(st.booleans())
    mask_key = draw(st.none() | st.binary(min_size=4, max_size=4))
    return opcode, payload, fin, rsv1, mask_key


@given(_frames(), st.binary(max_size=8))
def test_build_parse_round_trip(
    spec: tuple[Opcode, bytes, bool, bool, bytes | None], trailing: bytes
) -> None:
    """Any frame we build parses back to the same fields, using exactly its own bytes."""
    opcode, payload, fin, rsv1, mask_key = spec
    wire = build_frame(opcode, payload, fin=fin, rsv1=rsv1, mask_key=mask_key)
    result = parse_frame(wire + trailing, allow_rsv1=True, expect_masked=mask_key is not None)
    assert result is not None
    frame, used = result
    assert used == len(wire)
    assert frame == Frame(
        opcode, payload, fin, rsv1, masked=mask_key is not None, mask_key=mask_key
    )
    if not rsv1:
        ws_frame = WsFrame(WsOpcode(opcode), payload, fin=fin)
        if mask_key is None:
            assert wire == ws_frame.serialize(mask=False)
        else:
            assert ws_parse(wire, mask=True) == ws_frame


# --- MessageReader: the node's reader of client bytes -----------------------------------

KEY = b"\x11\x22\x33\x44"


def _client(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv1: bool = False) -> bytes:
    """A client frame as websockets' client would write it (masked)."""
    return build_frame(Opcode(opcode), payload, fin=fin, rsv1=rsv1, mask_key=KEY)


def _raw(first: int, payload: bytes, *, masked: bool = True) -> bytes:
    """A frame with any first byte (reserved bits, unknown opcodes)."""
    head = bytes([first, (0x80 if masked else 0) | len(payload)])
    return head + (KEY + apply_mask(KEY, payload) if masked else payload)


def test_reader_reads_messages_and_control_frames_in_order() -> None:
    reader = MessageReader(1000)
    data = (_client(Opcode.TEXT, "grüße".encode()) + _client(Opcode.PING, b"p")
            + _client(Opcode.BINARY, b"\x00\x01") + _client(Opcode.PONG, b"q"))
    assert reader.feed(data) == [(Opcode.TEXT, "grüße"), (Opcode.PING, b"p"),
                                 (Opcode.BINARY, b"\x00\x01"), (Opcode.PONG, b"q")]
    assert reader.error is None and not reader.done


def test_reader_joins_fragments_around_control_frames_byte_by_byte() -> None:
    reader = MessageReader(1000)
    data = (_client(Opcode.TEXT, b"ab", fin=False) + _client(Opcode.PING, b"x")
            + _client(Opcode.CONTINUATION, b"cd", fin=False)
            + _client(Opcode.CONTINUATION, b"ef"))
    events = [e for i in range(len(data)) for e in reader.feed(data[i:i + 1])]
    assert events == [(Opcode.PING, b"x"), (Opcode.TEXT, "abcdef")]


def test_reader_stops_after_a_close_frame() -> None:
    reader = MessageReader(1000)
    events = reader.feed(_client(Opcode.CLOSE, close_payload(1001, "bye"))
                         + _client(Opcode.TEXT, b"after"))
    assert events == [(Opcode.CLOSE, close_payload(1001, "bye"))]
    assert reader.done and reader.error is None
    assert reader.feed(_client(Opcode.TEXT, b"more")) == []


def test_reader_returns_the_events_before_a_fault() -> None:
    reader = MessageReader(1000)
    events = reader.feed(_client(Opcode.TEXT, b"ok") + _raw(0x81, b"unmasked", masked=False))
    assert events == [(Opcode.TEXT, "ok")]
    assert reader.error is not None and reader.error.close_code == 1002 and reader.done


@pytest.mark.parametrize(("data", "code", "words"), [
    (_raw(0x81, b"x", masked=False)[:2], 1002, "masked"),
    (_raw(0xC1, b"x"), 1002, "RSV1"),  # without deflate negotiated
    (_raw(0xA1, b"x"), 1002, "reserved"),  # RSV2
    (_raw(0x91, b"x"), 1002, "reserved"),  # RSV3
    (_raw(0x83, b"x"), 1002, "opcode"),
    (_raw(0x8B, b"x"), 1002, "opcode"),
    (_raw(0x09, b"x"), 1002, "fragmented control"),
    (b"\x89\xfe\x00\x7e", 1002, "125"),  # a ping header announcing 126 bytes
    (_client(Opcode.CONTINUATION, b"x"), 1002, "continuation"),
    (_client(Opcode.TEXT, b"a", fin=False) + _client(Opcode.BINARY, b"b"), 1002, "inside"),
    (_client(Opcode.CLOSE, b"\x03"), 1002, "1 byte"),
    (_client(Opcode.CLOSE, struct.pack("!H", 1005)), 1002, "close code"),
    (_client(Opcode.CLOSE, struct.pack("!H", 1000) + b"\xff"), 1007, "UTF-8"),
    (_client(Opcode.TEXT, b"\xc3"), 1007, "UTF-8"),
    (_client(Opcode.TEXT, b"\xc3", fin=False) + _client(Opcode.CONTINUATION, b"("), 1007,
     "UTF-8"),
    (b"\x82\xff" + struct.pack("!Q", 1 << 63), 1002, "most significant"),
    (_client(Opcode.BINARY, b"x" * 101)[:4], 1009, "limit"),
    (_client(Opcode.BINARY, b"x" * 60, fin=False) + _client(Opcode.CONTINUATION, b"y" * 41)[:4],
     1009, "limit"),
])
def test_reader_fails_what_rfc_6455_forbids(data: bytes, code: int, words: str) -> None:
    """Each fault stops the reader with its close code, as soon as the bytes that show it
    are in (a frame over the limit is refused from its header, its payload never read)."""
    reader = MessageReader(100)
    assert reader.feed(data) == [], "the faulty frame was handed on"
    assert reader.error is not None, "accepted"
    assert reader.error.close_code == code
    assert words in str(reader.error)


def test_reader_accepts_exactly_the_limit() -> None:
    reader = MessageReader(100)
    assert reader.feed(_client(Opcode.BINARY, b"x" * 100)) == [(Opcode.BINARY, b"x" * 100)]


def test_reader_inflates_with_context_takeover_and_checks_the_limit_after() -> None:
    """A client that keeps its deflate context across messages (the default of RFC 7692)
    is read correctly; the limit applies to the inflated size (a small bomb is 1009)."""
    compressor = zlib.compressobj(wbits=-15)
    reader = MessageReader(1000, deflate=True)
    for text in ("hello hello hello", "hello hello hello again", "x" * 1000):
        body = compressor.compress(text.encode()) + compressor.flush(zlib.Z_SYNC_FLUSH)
        assert reader.feed(_client(Opcode.TEXT, body[:-4], rsv1=True)) == [(Opcode.TEXT, text)]
    bomb = deflate_message(b"\0" * 1001)
    assert reader.feed(_client(Opcode.BINARY, bomb, rsv1=True)) == []
    assert reader.error is not None and reader.error.close_code == 1009


@pytest.mark.parametrize(("data", "words"), [
    (_client(Opcode.TEXT, b"not deflate at all", rsv1=True), "deflate"),
    (_client(Opcode.TEXT, b"a", fin=False) + _client(Opcode.CONTINUATION, b"b", rsv1=True),
     "continuation"),
    (_raw(0xC9, b"p"), "control"),
])
def test_reader_with_deflate_fails_misplaced_or_corrupt_compression(data: bytes,
                                                                    words: str) -> None:
    reader = MessageReader(1000, deflate=True)
    reader.feed(data)
    assert reader.error is not None and reader.error.close_code == 1002
    assert words in str(reader.error)


def test_reader_matches_websockets_client_frames() -> None:
    """Frames written by websockets' own client code (random masks, every length form,
    compressed) read back as their messages."""
    from websockets.frames import Frame as WFrame

    extension = PerMessageDeflate(False, False, 15, 15)
    sizes = (0, 125, 126, 65_535, 65_536)
    data = b""
    expected: list[tuple[Opcode, bytes | str]] = []
    for n in sizes:
        payload = os.urandom(n)
        frame = WFrame(WsOpcode.BINARY, payload)
        data += frame.serialize(mask=True, extensions=[extension])
        expected.append((Opcode.BINARY, payload))
    reader = MessageReader(1 << 20, deflate=True)
    assert reader.feed(data) == expected


@given(st.binary(min_size=4, max_size=4), st.binary(max_size=3000))
def test_reader_unmasking_fallback_matches(key: bytes, data: bytes) -> None:
    """The pure-Python unmasking (used if aiohttp's compiled one cannot be imported)
    gives what the compiled one gives, and what apply_mask gives."""
    from aiohttp._websocket.helpers import websocket_mask

    from roomcast.shared.frames import _unmask_python

    ours, theirs = bytearray(data), bytearray(data)
    _unmask_python(key, ours)
    websocket_mask(key, theirs)
    assert ours == theirs == apply_mask(key, data)


def test_reader_limit_leaves_the_rest_buffered() -> None:
    """feed(data, limit) returns at most ``limit`` events; the rest stays buffered
    (``pending``) and feed(b"", limit) reads on, in order, to the last frame."""
    frames = [_client(Opcode.TEXT, str(i).encode()) for i in range(10)]
    reader = MessageReader(100)
    assert reader.feed(b"".join(frames), 4) == [(Opcode.TEXT, str(i)) for i in range(4)]
    assert reader.pending
    assert reader.feed(b"", 4) == [(Opcode.TEXT, str(i)) for i in range(4, 8)]
    assert reader.feed(b"", 4) == [(Opcode.TEXT, "8"), (Opcode.TEXT, "9")]
    assert not reader.pending
    assert reader.feed(b"") == []
