"""RFC 6455 frames as plain bytes: build, parse, mask, and prepare a broadcast once.

No I/O here. ``build_frame`` and ``parse_frame`` are the seed's ``Frame`` helpers;
``PreparedMessage`` is what a broadcast hands to every member: the frame bytes built
once (and, for members that negotiated permessage-deflate, compressed once).
``MessageReader`` unmasks client payloads in pure Python until the node hands it a
compiled XOR (``set_unmask``); this module imports no aiohttp.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from roomcast.shared.errors import ProtocolError
from roomcast.shared.rfc6455 import CloseCode, Opcode, is_sendable_close_code

MAX_CONTROL_PAYLOAD: Final = 125
DEFLATE_TRAILER: Final = b"\x00\x00\xff\xff"
DEFLATE_MIN_SIZE: Final = 64
"""Payloads shorter than this are sent uncompressed even where deflate was negotiated."""

_U16: Final = struct.Struct("!H")
_U64: Final = struct.Struct("!Q")
_KNOWN_OPCODES: Final = frozenset(int(op) for op in Opcode)


@dataclass(frozen=True, slots=True)
class Frame:
    """One WebSocket frame, the seed's ``Frame`` struct. ``payload`` is unmasked."""

    opcode: Opcode
    payload: bytes = b""
    fin: bool = True
    rsv1: bool = False
    rsv2: bool = False
    rsv3: bool = False
    masked: bool = False
    mask_key: bytes | None = None


def apply_mask(mask_key: bytes, data: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask_key``; masking and unmasking are the same."""
    if len(mask_key) != 4:
        raise ValueError("mask key must be exactly 4 bytes")
    n = len(data)
    if n == 0:
        return b""
    key = (mask_key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def build_frame(
    opcode: Opcode,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv1: bool = False,
    mask_key: bytes | None = None,
) -> bytes:
    """The wire bytes of one frame. Servers send unmasked frames (``mask_key=None``)."""
    if opcode.is_control:
        if len(payload) > MAX_CONTROL_PAYLOAD:
            raise ValueError(f"control frame payload is {len(payload)} bytes, limit is 125")
        if not fin:
            raise ValueError("control frames cannot be fragmented")
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | int(opcode)
    mask_bit = 0x80 if mask_key is not None else 0
    n = len(payload)
    if n < 126:
        header = bytes((first, mask_bit | n))
    elif n < 0x10000:
        header = bytes((first, mask_bit | 126)) + _U16.pack(n)
    else:
        header = bytes((first, mask_bit | 127)) + _U64.pack(n)
    if mask_key is not None:
        return header + mask_key + apply_mask(mask_key, payload)
    return header + payload


def text_frame(text: str, *, mask: bool = False) -> bytes:
    """A final text frame (``Frame.text`` in the seed)."""
    return build_frame(Opcode.TEXT, text.encode(), mask_key=os.urandom(4) if mask else None)


def binary_frame(data: bytes, *, mask: bool = False) -> bytes:
    """A final binary frame (``Frame.binary``)."""
    return build_frame(Opcode.BINARY, bytes(data), mask_key=os.urandom(4) if mask else None)


def ping_frame(payload: bytes = b"", *, mask: bool = False) -> bytes:
    """A ping frame (``Frame.ping``)."""
    return build_frame(Opcode.PING, payload, mask_key=os.urandom(4) if mask else None)


def pong_frame(payload: bytes = b"", *, mask: bool = False) -> bytes:
    """A pong frame."""
    return build_frame(Opcode.PONG, payload, mask_key=os.urandom(4) if mask else None)


def close_payload(code: int, reason: str = "") -> bytes:
    """The payload of a close frame; ValueError for a code that may not be sent."""
    if not is_sendable_close_code(code):
        raise ValueError(f"close code {code} may not be sent in a close frame")
    data = _U16.pack(code) + reason.encode()
    if len(data) > MAX_CONTROL_PAYLOAD:
        raise ValueError("close reason is longer than 123 bytes when encoded")
    return data


def close_frame(code: int = CloseCode.NORMAL, reason: str = "", *, mask: bool = False) -> bytes:
    """A close frame (``Frame.close``)."""
    payload = close_payload(code, reason)
    return build_frame(Opcode.CLOSE, payload, mask_key=os.urandom(4) if mask else None)


def parse_close_payload(payload: bytes) -> tuple[int, str]:
    """Code and reason of a close frame; ProtocolError (1002 or 1007) if invalid."""
    if not payload:
        return CloseCode.NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError("close frame payload of 1 byte")
    (code,) = _U16.unpack_from(payload)
    if not is_sendable_close_code(code):
        raise ProtocolError(f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise ProtocolError("close reason is not UTF-8", CloseCode.INVALID_DATA) from None
    return code, reason


def parse_frame(
    data: bytes | bytearray | memoryview,
    *,
    expect_masked: bool | None = None,
    allow_rsv1: bool = False,
    max_payload: int | None = None,
) -> tuple[Frame, int] | None:
    """Parse one frame from the start of ``data``.

    Returns the frame and the number of bytes it used, or None if ``data`` holds only
    part of a frame. Raises ProtocolError with the close code to send for a frame that
    breaks RFC 6455: reserved bits, unknown opcode, bad control frame, a masking that
    is not ``expect_masked``, or a payload over ``max_payload`` (1009).
    """
    view = memoryview(data)
    if len(view) < 2:
        return None
    b0, b1 = view[0], view[1]
    fin = bool(b0 & 0x80)
    rsv1, rsv2, rsv3 = bool(b0 & 0x40), bool(b0 & 0x20), bool(b0 & 0x10)
    if rsv2 or rsv3 or (rsv1 and not allow_rsv1):
        raise ProtocolError("reserved bits set without a negotiated extension")
    raw_opcode = b0 & 0x0F
    if raw_opcode not in _KNOWN_OPCODES:
        raise ProtocolError(f"unknown opcode {raw_opcode:#x}")
    opcode = Opcode(raw_opcode)
    masked = bool(b1 & 0x80)
    if expect_masked is not None and masked != expect_masked:
        raise ProtocolError("client frames must be masked" if expect_masked else
                            "server frames must not be masked")
    length = b1 & 0x7F
    pos = 2
    if length == 126:
        if len(view) < 4:
            return None
        (length,) = _U16.unpack_from(view, 2)
        pos = 4
    elif length == 127:
        if len(view) < 10:
            return None
        (length,) = _U64.unpack_from(view, 2)
        if length >> 63:
            raise ProtocolError("payload length has the most significant bit set")
        pos = 10
    if opcode.is_control:
        if not fin:
            raise ProtocolError("fragmented control frame")
        if length > MAX_CONTROL_PAYLOAD:
            raise ProtocolError("control frame payload over 125 bytes")
        if rsv1:
            raise ProtocolError("compressed control frame")
    if max_payload is not None and length > max_payload:
        raise ProtocolError(
            f"frame payload of {length} bytes is over the limit of {max_payload}",
            CloseCode.MESSAGE_TOO_BIG,
        )
    mask_key: bytes | None = None
    if masked:
        if len(view) < pos + 4:
            return None
        mask_key = bytes(view[pos : pos + 4])
        pos += 4
    end = pos + length
    if len(view) < end:
        return None
    payload = bytes(view[pos:end])
    if mask_key is not None:
        payload = apply_mask(mask_key, payload)
    if opcode is Opcode.CLOSE:
        parse_close_payload(payload)
    frame = Frame(opcode, payload, fin, rsv1, rsv2, rsv3, masked, mask_key)
    return frame, end


def deflate_message(payload: bytes, wbits: int = 15) -> bytes:
    """permessage-deflate (RFC 7692) body of one message, compressed with a fresh context.

    A fresh context per message needs no agreement with the peer: it never refers back
    to earlier messages, so it is valid with or without context takeover, and one
    compressed body serves every member of a broadcast.
    """
    if not 9 <= wbits <= 15:
        raise ValueError(f"deflate window bits must be 9-15, got {wbits}")
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -wbits)
    body = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return body[: -len(DEFLATE_TRAILER)] if body.endswith(DEFLATE_TRAILER) else body


def inflate_message(body: bytes, wbits: int = 15, max_size: int | None = None) -> bytes:
    """Undo ``deflate_message``; ProtocolError 1009 if the result exceeds ``max_size``."""
    decompressor = zlib.decompressobj(-wbits)
    limit = 0 if max_size is None else max_size + 1
    try:
        out = decompressor.decompress(body + DEFLATE_TRAILER, limit)
    except zlib.error as exc:
        raise ProtocolError(f"invalid deflate data: {exc}") from None
    if max_size is not None and (len(out) > max_size or decompressor.unconsumed_tail):
        raise ProtocolError("inflated message is over the limit", CloseCode.MESSAGE_TOO_BIG)
    return out


class PreparedMessage:
    """A message framed once for many recipients (gorilla's PreparedMessage).

    ``frame`` is the plain frame; ``frame_for(wbits)`` is the frame for a member that
    negotiated permessage-deflate with that window, compressed at most once per window
    size however many members use it.
    """

    __slots__ = ("_deflated", "binary", "frame", "payload")

    def __init__(self, payload: bytes, *, binary: bool) -> None:
        self.payload = payload
        self.binary = binary
        self.frame = build_frame(Opcode.BINARY if binary else Opcode.TEXT, payload)
        self._deflated: dict[int, bytes] = {}

    @classmethod
    def of(cls, data: str | bytes | bytearray | memoryview) -> PreparedMessage:
        """Text for ``str``, binary for bytes-like; TypeError for anything else."""
        if isinstance(data, str):
            return cls(data.encode(), binary=False)
        if isinstance(data, bytes | bytearray | memoryview):
            return cls(bytes(data), binary=True)
        raise TypeError(f"message data must be str or bytes, got {type(data).__name__}")

    def frame_for(self, wbits: int) -> bytes:
        """The frame to send to a member; ``wbits`` 0 means no compression negotiated."""
        if not wbits or len(self.payload) < DEFLATE_MIN_SIZE:
            return self.frame
        frame = self._deflated.get(wbits)
        if frame is None:
            body = deflate_message(self.payload, wbits)
            if len(body) >= len(self.payload):
                frame = self.frame
            else:
                opcode = Opcode.BINARY if self.binary else Opcode.TEXT
                frame = build_frame(opcode, body, rsv1=True)
            self._deflated[wbits] = frame
        return frame


class MessageReader:
    """Reads a client's byte stream into whole messages, failing what RFC 6455 forbids.

    ``feed(data)`` takes bytes as they arrive, in any chunking, and returns the events
    completed by them: ``(Opcode.TEXT, str)``, ``(Opcode.BINARY, bytes)``,
    ``(Opcode.PING | Opcode.PONG, bytes)`` and ``(Opcode.CLOSE, payload)``, the close
    payload checked by ``parse_close_payload``. Fragments are joined; with
    permessage-deflate negotiated (``deflate=True``) compressed messages are inflated
    with one context per connection, so clients may use context takeover.

    A fault stops reading and is kept in ``error`` (a ProtocolError with the close
    code to send): an unmasked frame (section 5.1, checked on the first two header
    bytes), reserved bits or an unknown opcode, a fragmented, compressed or
    over-125-byte control frame, a 64-bit length with its top bit set (5.2), a data
    frame inside a fragmented message or a continuation outside one (5.4), a close
    frame with a code that may not be sent or a reason that is not UTF-8 (5.5.1, 7.4),
    deflate data that does not inflate; 1007 for a text message that is not UTF-8;
    1009 for a message of more than ``max_size`` bytes, compressed or inflated
    (checked from the frame header, before its payload is buffered).
    Nothing is read after a close frame or an error.
    """

    __slots__ = (
        "_buf", "_deflate", "_done", "_error", "_inflater", "_max", "_parts",
        "_parts_compressed", "_parts_opcode", "_parts_size", "_pending",
    )

    def __init__(self, max_size: int, *, deflate: bool = False) -> None:
        self._max = max_size
        self._deflate = deflate
        self._buf = bytearray()
        self._done = False
        self._error: ProtocolError | None = None
        self._inflater: zlib._Decompress | None = None
        self._parts: list[bytes] = []
        self._parts_opcode = 0
        """Opcode of the fragmented message being joined; 0 when there is none."""
        self._parts_size = 0
        self._parts_compressed = False
        self._pending = False

    @property
    def done(self) -> bool:
        """True after a close frame or an error: nothing more will be read."""
        return self._done

    @property
    def error(self) -> ProtocolError | None:
        """The fault that stopped reading, if one did."""
        return self._error

    def feed(
        self, data: bytes | bytearray | memoryview, limit: int = 0
    ) -> list[tuple[Opcode, bytes | str]]:
        """The events completed by ``data``, in order; at most ``limit`` if it is set.

        Bytes past the ``limit``-th event stay buffered (``pending`` is then True):
        ``feed(b"", limit)`` reads on. On a fault, the events before it are returned
        and ``error`` says what broke (with the close code to send); ``done`` is then
        True and nothing more is read.
        """
        events: list[tuple[Opcode, bytes | str]] = []
        if self._done:
            return events
        buf: bytes | bytearray
        if self._buf:
            self._buf += data
            buf = self._buf
        else:
            buf = data if isinstance(data, bytes) else bytes(data)
        try:
            pos = self._read(buf, events, limit or -1)
        except ProtocolError as exc:
            self._error = exc
            self._done = True
            self._buf = bytearray()
            self._parts = []
            self._pending = False
            return events
        if buf is self._buf:
            del self._buf[:pos]
        elif pos < len(buf):
            self._buf = bytearray(buf[pos:])
        return events

    @property
    def pending(self) -> bool:
        """True if the last ``feed`` stopped at its limit with bytes still to read."""
        return self._pending

    def _read(
        self, buf: bytes | bytearray, events: list[tuple[Opcode, bytes | str]], limit: int
    ) -> int:
        pos, end = 0, len(buf)
        maximum = self._max
        append = events.append
        self._pending = False
        while end - pos >= 2:
            if not limit:
                self._pending = True
                break
            b0, b1 = buf[pos], buf[pos + 1]
            if not b1 & 0x80:
                raise ProtocolError("client frames must be masked")
            length = b1 & 0x7F
            if (
                length < 126
                and (b0 == 0x81 or b0 == 0x82 or (self._deflate and (b0 == 0xC1 or b0 == 0xC2)))
                and not self._parts_opcode
            ):
                # The common case: a whole small text or binary message in one frame.
                if length > maximum:
                    self._check_data_frame(b0 & 0x0F, 0, length)  # raises 1009
                start = pos + 6
                if end < start + length:
                    break
                data = bytearray(buf[start : start + length])
                _mask_in_place(bytes(buf[start - 4 : start]), data)
                pos = start + length
                limit -= 1
                message: bytes | bytearray = self._inflate(bytes(data)) if b0 & 0x40 else data
                if b0 & 0x0F == 0x2:
                    append((Opcode.BINARY, bytes(message)))
                    continue
                try:
                    append((Opcode.TEXT, message.decode()))
                except UnicodeDecodeError:
                    raise ProtocolError(
                        "text message is not valid UTF-8", CloseCode.INVALID_DATA
                    ) from None
                continue
            if b0 & 0x30:
                raise ProtocolError("reserved bits set without a negotiated extension")
            opcode = b0 & 0x0F
            if opcode not in _KNOWN_OPCODES:
                raise ProtocolError(f"unknown opcode {opcode:#x}")
            fin = b0 & 0x80
            rsv1 = b0 & 0x40
            head = 6
            if length == 126:
                if end - pos < 4:
                    break
                length = _U16.unpack_from(buf, pos + 2)[0]
                head = 8
            elif length == 127:
                if end - pos < 10:
                    break
                length = _U64.unpack_from(buf, pos + 2)[0]
                if length >> 63:
                    raise ProtocolError("payload length has the most significant bit set")
                head = 14
            if opcode >= 0x8:
                if not fin:
                    raise ProtocolError("fragmented control frame")
                if length > MAX_CONTROL_PAYLOAD:
                    raise ProtocolError("control frame payload over 125 bytes")
                if rsv1:
                    raise ProtocolError("RSV1 set on a control frame")
            else:
                self._check_data_frame(opcode, rsv1, length)
            if end - pos < head + length:
                break
            start = pos + head
            payload = _unmask(buf, start, start + length)
            pos = start + length
            if opcode >= 0x8:
                if opcode == Opcode.CLOSE:
                    parse_close_payload(payload)  # a bad one raises before it is an event
                    self._done = True
                limit -= 1
                append((Opcode(opcode), payload))
                if self._done:
                    break
            elif opcode != Opcode.CONTINUATION and fin:
                limit -= 1
                append(self._message(opcode, payload, bool(rsv1)))
            else:
                if opcode != Opcode.CONTINUATION:
                    self._parts_opcode = opcode
                    self._parts_compressed = bool(rsv1)
                self._parts.append(payload)
                self._parts_size += length
                if fin:
                    parts, self._parts = self._parts, []
                    op, self._parts_opcode, self._parts_size = self._parts_opcode, 0, 0
                    limit -= 1
                    append(self._message(op, b"".join(parts), self._parts_compressed))
        return pos

    def _check_data_frame(self, opcode: int, rsv1: int, length: int) -> None:
        """What a data frame's header alone can break (so a huge payload is never read)."""
        if opcode == Opcode.CONTINUATION:
            if not self._parts_opcode:
                raise ProtocolError("continuation frame without a message to continue")
            if rsv1:
                raise ProtocolError("RSV1 set on a continuation frame")
        elif self._parts_opcode:
            raise ProtocolError("a new message began inside a fragmented one")
        elif rsv1 and not self._deflate:
            raise ProtocolError("RSV1 set but permessage-deflate was not negotiated")
        if self._parts_size + length > self._max:
            raise ProtocolError(
                f"message of more than {self._max} bytes (the limit)",
                CloseCode.MESSAGE_TOO_BIG,
            )

    def _message(
        self, opcode: int, payload: bytes, compressed: bool
    ) -> tuple[Opcode, bytes | str]:
        if compressed:
            payload = self._inflate(payload)
        if opcode == Opcode.BINARY:
            return Opcode.BINARY, payload
        try:
            return Opcode.TEXT, payload.decode()
        except UnicodeDecodeError:
            raise ProtocolError("text message is not valid UTF-8", CloseCode.INVALID_DATA) from None

    def _inflate(self, body: bytes) -> bytes:
        inflater = self._inflater
        if inflater is None:
            inflater = self._inflater = zlib.decompressobj(-15)
        try:
            out = inflater.decompress(body + DEFLATE_TRAILER, self._max + 1)
        except zlib.error as exc:
            raise ProtocolError(f"invalid deflate data: {exc}") from None
        if len(out) > self._max or inflater.unconsumed_tail:
            raise ProtocolError(
                f"inflated message of more than {self._max} bytes (the limit)",
                CloseCode.MESSAGE_TOO_BIG,
            )
        return out


def _unmask_python(key: bytes, data: bytearray) -> None:
    n = len(data)
    full = (key * (n // 4 + 1))[:n]
    data[:] = (int.from_bytes(data, "little") ^ int.from_bytes(full, "little")).to_bytes(
        n, "little"
    )


Unmask = Callable[[bytes, bytearray], None]
"""XORs a payload in place with a 4-byte key: unmasks (or masks) a client frame."""

_mask_in_place: Unmask = _unmask_python


def set_unmask(unmask: Unmask) -> Unmask:
    """Unmask client frames with ``unmask`` from now on; return the one it replaces.

    This module does no I/O and imports no aiohttp; the node hands it aiohttp's
    compiled XOR (roomcast.node._aiohttp): a 16 KB message is read about 14 times faster
    than with the pure-Python one used until then. ValueError if ``unmask`` gets a sample wrong.
    """
    global _mask_in_place
    key, sample = b"\x01\x02\x04\x08", bytes(range(1, 12))
    expected, got = bytearray(sample), bytearray(sample)
    _unmask_python(key, expected)
    unmask(key, got)
    if got != expected:
        raise ValueError(f"{unmask!r} does not unmask a WebSocket payload correctly")
    previous, _mask_in_place = _mask_in_place, unmask
    return previous


def _unmask(buf: bytes | bytearray, start: int, end: int) -> bytes:
    """The payload at ``buf[start:end]`` unmasked with the 4 bytes before it."""
    if start == end:
        return b""
    data = bytearray(memoryview(buf)[start:end])
    _mask_in_place(bytes(buf[start - 4 : start]), data)
    return bytes(data)
