"""Properties over the byte-level code, beyond the examples of test_frames/test_envelope.

- MessageReader (the node's reader of client bytes) on arbitrary bytes in arbitrary
  chunkings raises nothing and stops only with a ProtocolError; a valid stream (text,
  binary, compressed, fragmented, control frames between fragments) gives exactly its
  messages however it is chunked, and the reader still knows where frames begin (an
  unmasked frame after the stream is caught on its first two bytes).
- parse_frame on near-valid frames (every header bit pattern, every length form) raises
  nothing but ProtocolError and never returns a frame RFC 6455 forbids; on a stream of
  frames that arrives in arbitrary pieces it finds the same frames.
- Envelope decode of corrupted valid encodings raises nothing but EnvelopeError.
- PreparedMessage.frame_for parses back, inflated where RSV1 is set, to the payload,
  for every window size, and websockets' client decodes it the same.
"""

from __future__ import annotations

import contextlib
import itertools
import struct

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode as WsOpcode
from websockets.streams import StreamReader

from roomcast.shared.envelope import Envelope, Kind, decode, encode
from roomcast.shared.errors import EnvelopeError, ProtocolError
from roomcast.shared.frames import (
    MAX_CONTROL_PAYLOAD,
    Frame,
    MessageReader,
    PreparedMessage,
    build_frame,
    deflate_message,
    inflate_message,
    parse_close_payload,
    parse_frame,
)
from roomcast.shared.rfc6455 import Opcode, is_sendable_close_code

RELAXED = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
"""Timing is no part of these properties, and the suite also runs busy node processes."""


def _chunks(data: bytes, cuts: set[int]) -> list[bytes]:
    """``data`` split at the given offsets (those inside it)."""
    points = sorted({0, len(data), *(c for c in cuts if 0 < c < len(data))})
    return [data[a:b] for a, b in itertools.pairwise(points)]


_cuts = st.sets(st.integers(1, 600) | st.integers(600, 70_000), max_size=12)
"""Offsets to split a stream at: mostly small, some deep inside 64 KiB payloads."""
_boundary_payloads = st.sampled_from([125, 126, 127, 65_535, 65_536]).map(lambda n: b"\x5a" * n)


def _mask_keys() -> st.SearchStrategy[bytes]:
    return st.binary(min_size=4, max_size=4)


@st.composite
def _control_frames(draw: st.DrawFn) -> bytes:
    """A masked ping or pong (close would end the stream)."""
    opcode = draw(st.sampled_from([Opcode.PING, Opcode.PONG]))
    return build_frame(opcode, draw(st.binary(max_size=MAX_CONTROL_PAYLOAD)),
                       mask_key=draw(_mask_keys()))


@st.composite
def _messages(draw: st.DrawFn) -> list[bytes]:
    """The masked frames of one valid message: a control frame, or a data message in one
    or more fragments (RSV1 on the first only) with control frames between them."""
    if draw(st.integers(0, 3)) == 0:
        return [draw(_control_frames())]
    opcode = draw(st.sampled_from([Opcode.TEXT, Opcode.BINARY]))
    parts = draw(st.lists(st.binary(max_size=300) | _boundary_payloads, min_size=1, max_size=3))
    rsv1 = draw(st.booleans())
    frames = []
    for i, part in enumerate(parts):
        if i:
            frames += draw(st.lists(_control_frames(), max_size=1))
        frames.append(build_frame(opcode if i == 0 else Opcode.CONTINUATION, part,
                                  fin=i == len(parts) - 1, rsv1=rsv1 and i == 0,
                                  mask_key=draw(_mask_keys())))
    return frames


_frame_lists = st.lists(_messages(), max_size=4).map(lambda ms: [f for m in ms for f in m])
_masked_streams = _frame_lists.map(b"".join)
"""Valid client streams: whole messages, every frame masked, any length form."""


# --- MessageReader ---------------------------------------------------------------------------


@st.composite
def _reader_streams(draw: st.DrawFn) -> tuple[bytes, list[tuple[Opcode, bytes | str]]]:
    """A valid client stream and the events a reader must make of it: text (UTF-8),
    binary and compressed messages, fragmented anywhere, control frames between
    fragments."""
    frames: list[bytes] = []
    expected: list[tuple[Opcode, bytes | str]] = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 3)) == 0:
            opcode = draw(st.sampled_from([Opcode.PING, Opcode.PONG]))
            payload = draw(st.binary(max_size=MAX_CONTROL_PAYLOAD))
            frames.append(build_frame(opcode, payload, mask_key=draw(_mask_keys())))
            expected.append((opcode, payload))
            continue
        text = draw(st.booleans())
        data: bytes = (draw(st.text(max_size=200)).encode() if text
                       else draw(st.binary(max_size=300) | _boundary_payloads))
        compressed = draw(st.booleans())
        body = deflate_message(data) if compressed else data
        cuts = sorted(draw(st.sets(st.integers(0, len(body)), max_size=2)) | {0, len(body)})
        parts = [body[a:b] for a, b in itertools.pairwise(cuts)] or [b""]
        opcode = Opcode.TEXT if text else Opcode.BINARY
        for n, part in enumerate(parts):
            if n:
                for control in draw(st.lists(st.binary(max_size=10), max_size=1)):
                    frames.append(build_frame(Opcode.PING, control, mask_key=b"\1\2\3\4"))
                    expected.append((Opcode.PING, control))
            frames.append(build_frame(opcode if n == 0 else Opcode.CONTINUATION, part,
                                      fin=n == len(parts) - 1, rsv1=compressed and n == 0,
                                      mask_key=draw(_mask_keys())))
        expected.append((opcode, data.decode() if text else data))
    return b"".join(frames), expected


@RELAXED
@given(st.binary(max_size=512), _cuts, st.booleans())
def test_reader_on_random_bytes_stops_with_a_protocol_error_or_reads_on(
    data: bytes, cuts: set[int], deflate: bool
) -> None:
    """Whatever bytes arrive, in whatever pieces, the reader raises nothing: it returns
    events or stops with a ProtocolError carrying a close code a server may send."""
    reader = MessageReader(1000, deflate=deflate)
    for chunk in _chunks(data, cuts):
        reader.feed(chunk)
    if reader.error is not None:
        assert reader.done
        assert reader.error.close_code in (1002, 1007, 1009)
        assert reader.feed(b"\x81\x80abcd") == []


@RELAXED
@given(_reader_streams(), _cuts, st.binary(min_size=4, max_size=40))
def test_reader_reads_a_valid_stream_the_same_in_any_chunking(
    stream: tuple[bytes, list[tuple[Opcode, bytes | str]]], cuts: set[int],
    unmasked_payload: bytes,
) -> None:
    """A valid stream gives exactly its messages however it is split, and the reader is
    at a frame boundary at the end: an unmasked frame after it is caught."""
    data, expected = stream
    reader = MessageReader(1 << 20, deflate=True)
    events = []
    for chunk in _chunks(data, cuts):
        events += reader.feed(memoryview(chunk))
    assert reader.error is None
    assert events == expected
    assert reader.feed(build_frame(Opcode.TEXT, unmasked_payload)) == []
    assert reader.error is not None and "masked" in str(reader.error)


@RELAXED
@given(_masked_streams, _cuts, st.sampled_from([Opcode.TEXT, Opcode.BINARY, Opcode.PING,
                                                 Opcode.PONG, Opcode.CLOSE]),
       st.binary(max_size=3))
@example(b"", set(), Opcode.PING, b"")
def test_reader_catches_short_unmasked_frames(
    stream: bytes, cuts: set[int], opcode: Opcode, payload: bytes
) -> None:
    """An unmasked frame of any size is caught as soon as its first two bytes are in."""
    if opcode is Opcode.CLOSE and len(payload) == 1:
        payload = b""
    reader = MessageReader(1 << 20, deflate=True)
    for chunk in _chunks(stream, cuts):
        reader.feed(chunk)
    if reader.error is not None:  # random "compressed" payloads need not inflate
        return
    reader.feed(build_frame(opcode, payload)[:2])
    assert reader.error is not None and "masked" in str(reader.error)


# --- parse_frame ---------------------------------------------------------------------------


@st.composite
def _near_valid_frames(draw: st.DrawFn) -> bytes:
    """A frame with any first byte, either mask bit and any length form (including lengths
    that do not match the payload, 64-bit lengths with the top bit set, control frames
    over 125 and close payloads of every shape)."""
    plausible = st.builds(lambda fin, rsv1, op: fin << 7 | rsv1 << 6 | op,
                          st.booleans(), st.booleans(), st.sampled_from([int(o) for o in Opcode]))
    first = draw(plausible | st.integers(0, 255))
    masked = draw(st.booleans())
    opcode = first & 0x0F
    if opcode == Opcode.CLOSE and draw(st.booleans()):
        code = draw(st.sampled_from([999, 1000, 1004, 1005, 1006, 1014, 2999, 3000, 4999, 5000])
                    | st.integers(0, 0xFFFF))
        payload = struct.pack("!H", code) + draw(st.binary(max_size=8) | st.text(max_size=8)
                                                  .map(str.encode))
    else:
        payload = draw(st.binary(max_size=140))
    form = draw(st.sampled_from(["exact", "16", "64", "64-msb", "lie"]))
    n = len(payload)
    if form == "exact":
        length = build_frame(Opcode.BINARY, payload)[1:-n or None]
    elif form == "16":
        length = bytes((126,)) + struct.pack("!H", n)
    elif form == "64":
        length = bytes((127,)) + struct.pack("!Q", n)
    elif form == "64-msb":
        length = bytes((127,)) + struct.pack("!Q", n | 1 << 63)
    else:
        length = bytes((draw(st.integers(0, 125)),))
    mask_key = draw(st.binary(min_size=4, max_size=4)) if masked else b""
    if masked:
        length = bytes((length[0] | 0x80,)) + length[1:]
        payload = bytes(b ^ mask_key[i % 4] for i, b in enumerate(payload))
    return bytes((first,)) + length + mask_key + payload


@RELAXED
@given(_near_valid_frames(), st.booleans(), st.none() | st.booleans())
def test_parse_frame_never_returns_a_forbidden_frame(
    wire: bytes, allow_rsv1: bool, expect_masked: bool | None
) -> None:
    """parse_frame raises ProtocolError or returns a frame RFC 6455 allows: known opcode,
    no RSV2/RSV3, RSV1 only if allowed and not on a control frame, control frames final
    and at most 125 bytes, masking as expected, a close payload that parses."""
    try:
        result = parse_frame(wire, allow_rsv1=allow_rsv1, expect_masked=expect_masked)
    except ProtocolError as exc:
        assert exc.close_code in (1002, 1007)
        return
    if result is None:
        return
    frame, used = result
    assert 2 <= used <= len(wire)
    assert not (frame.rsv2 or frame.rsv3)
    assert allow_rsv1 or not frame.rsv1
    if expect_masked is not None:
        assert frame.masked is expect_masked
    if frame.opcode.is_control:
        assert frame.fin and not frame.rsv1 and len(frame.payload) <= MAX_CONTROL_PAYLOAD
    if frame.opcode is Opcode.CLOSE and frame.payload:
        code, _ = parse_close_payload(frame.payload)
        assert is_sendable_close_code(code)
    assert wire[1] & 0x7F != 127 or not wire[2] & 0x80, "64-bit length with the top bit set"


@RELAXED
@given(_frame_lists, _cuts)
def test_parse_frame_finds_the_same_frames_however_the_stream_arrives(
    frames: list[bytes], cuts: set[int]
) -> None:
    """Fed a growing buffer in arbitrary pieces, parse_frame yields each frame exactly
    once, as it would from the frame's own bytes."""
    expected = []
    for wire in frames:
        parsed = parse_frame(wire, expect_masked=True, allow_rsv1=True)
        assert parsed is not None and parsed[1] == len(wire)
        expected.append(parsed[0])
    found: list[Frame] = []
    buffer = bytearray()
    for chunk in _chunks(b"".join(frames), cuts):
        buffer += chunk
        while (parsed := parse_frame(buffer, expect_masked=True, allow_rsv1=True)) is not None:
            found.append(parsed[0])
            del buffer[: parsed[1]]
    assert found == expected
    assert not buffer


# --- envelopes -----------------------------------------------------------------------------


_valid_envelopes = st.builds(
    Envelope,
    kind=st.just(Kind.ROOM),
    target=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF,
                                 exclude_categories=["Cc"]), min_size=1, max_size=20),
    payload=st.text(max_size=40).map(str.encode),
    binary=st.booleans(),
    origin=st.sampled_from(["", "node1", "abc123"]),
    exclude=st.sampled_from(["", "node1.a", "z.ff"]),
    sent_at=st.floats(allow_nan=False, allow_infinity=False),
)


@st.composite
def _corrupted(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with bytes flipped, inserted, removed or cut off."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if not out:
            out.append(draw(st.integers(0, 255)))
            continue
        i = draw(st.integers(0, len(out) - 1))
        if action == "flip":
            out[i] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            out[i] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4,
                                           0xD4, 0xD9, 0xDC, 0xDE, 0xFF, 0x93, 0x99]))
        elif action == "insert":
            out[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif action == "delete":
            del out[i]
        else:
            del out[i:]
    return bytes(out)


@RELAXED
@given(st.data(), _valid_envelopes)
def test_decode_of_corrupted_envelopes_raises_only_envelope_error(
    data: st.DataObject, env: Envelope
) -> None:
    """A valid envelope decodes to itself; the same bytes corrupted decode to a valid
    Envelope or raise EnvelopeError, never anything else."""
    wire = encode(env)
    assert decode(wire) == env
    damaged = data.draw(_corrupted(wire))
    with contextlib.suppress(EnvelopeError):
        assert isinstance(decode(damaged), Envelope)


# --- PreparedMessage -----------------------------------------------------------------------


_payloads = (
    st.binary(max_size=400)
    | st.text(max_size=200).map(str.encode)
    | st.tuples(st.binary(min_size=1, max_size=16), st.integers(4, 200)).map(lambda t: t[0] * t[1])
)


def _ws_decode(wire: bytes, wbits: int) -> WsFrame:
    reader = StreamReader()
    reader.feed_data(wire)
    reader.feed_eof()
    extensions = [PerMessageDeflate(False, False, wbits, 15)] if wbits else None
    parser = WsFrame.parse(reader.read_exact, mask=False, extensions=extensions)
    try:
        next(parser)
    except StopIteration as done:
        frame: WsFrame = done.value
        return frame
    raise AssertionError("websockets wanted more bytes than the frame has")


@RELAXED
@given(_payloads, st.booleans(), st.sampled_from([0, *range(9, 16)]))
def test_frame_for_parses_back_to_the_payload(payload: bytes, binary: bool, wbits: int) -> None:
    """Every frame a member can be sent is one final unmasked frame of the message's type
    whose payload (inflated with the member's window if RSV1 is set) is the message;
    websockets' client, with the same window, decodes the same bytes."""
    if not binary:
        payload = payload.decode("utf-8", "replace").encode()
    message = PreparedMessage(payload, binary=binary)
    wire = message.frame_for(wbits)
    parsed = parse_frame(wire, expect_masked=False, allow_rsv1=True)
    assert parsed is not None
    frame, used = parsed
    assert used == len(wire)
    assert frame.fin and frame.opcode is (Opcode.BINARY if binary else Opcode.TEXT)
    assert frame.rsv1 is (wire is not message.frame)
    if not wbits:
        assert not frame.rsv1
    body = inflate_message(frame.payload, wbits) if frame.rsv1 else frame.payload
    assert body == payload
    assert message.frame_for(wbits) is wire  # compressed at most once per window
    ws_frame = _ws_decode(wire, wbits)
    assert ws_frame.data == payload
    assert ws_frame.opcode is (WsOpcode.BINARY if binary else WsOpcode.TEXT)
