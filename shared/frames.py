"""RFC 6455 frames as plain bytes: build, parse, mask, and prepare a broadcast once.

No I/O here. ``build_frame`` and ``parse_frame`` are the seed's ``Frame`` helpers;
``PreparedMessage`` is what a broadcast hands to every member: the frame bytes built
once (and, for members that negotiated permessage-deflate, compressed once).
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from typing import Final

from shared.errors import ProtocolError
from shared.protocol import CloseCode, Opcode, is_sendable_close_code

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


class ClientFrameChecker:
    """Follows frame boundaries in a client's byte stream and fails what aiohttp's reader
    lets through.

    RFC 6455 requires a server to fail the connection on: an unmasked client frame
    (section 5.1, checked as soon as the 2 header bytes are in), a 64-bit length with its
    top bit set (5.2), RSV1 on a control frame (5.2; RFC 7692 section 6), a data frame
    inside a fragmented message or a continuation outside one (5.4), and a close frame
    whose code may not be sent or whose reason is not UTF-8 (5.5.1, 7.4). Only headers
    and close payloads (at most 125 bytes) are read; other payload bytes are skipped.
    """

    __slots__ = ("_close", "_header", "_in_message", "_skip")

    def __init__(self) -> None:
        self._header = bytearray()
        self._skip = 0
        self._in_message = False
        self._close: bytearray | None = None
        """The mask key, then the masked payload so far, of the close frame being read."""

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Check the frames in ``data``; ProtocolError (with its close code) on a fault."""
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                if self._close is not None:
                    self._close += view[pos : pos + step]
                self._skip -= step
                pos += step
                if not self._skip and self._close is not None:
                    self._check_close()
                continue
            header = self._header
            if len(header) < 2:
                take = min(2 - len(header), end - pos)
                header += view[pos : pos + take]
                pos += take
                if len(header) < 2:
                    continue
                self._check_start(header[0], header[1])
            need = self._header_size()
            take = min(need - len(header), end - pos)
            header += view[pos : pos + take]
            pos += take
            if len(header) < need:
                continue
            length = header[1] & 0x7F
            if length == 126:
                length = _U16.unpack_from(header, 2)[0]
            elif length == 127:
                length = _U64.unpack_from(header, 2)[0]
                if length >> 63:
                    raise ProtocolError("payload length has the most significant bit set")
            if header[0] & 0x0F == Opcode.CLOSE and length:
                self._close = bytearray(header[-4:])
            self._skip = length
            header.clear()

    def _check_start(self, first: int, second: int) -> None:
        if not second & 0x80:
            raise ProtocolError("client frames must be masked")
        opcode = first & 0x0F
        if opcode not in _KNOWN_OPCODES:
            raise ProtocolError(f"unknown opcode {opcode:#x}")
        if opcode >= 0x8:
            if first & 0x40:
                raise ProtocolError("RSV1 set on a control frame")
            return  # control frames may come between the fragments of a message
        if opcode == Opcode.CONTINUATION:
            if not self._in_message:
                raise ProtocolError("continuation frame without a message to continue")
        elif self._in_message:
            raise ProtocolError("a new message began inside a fragmented one")
        self._in_message = not first & 0x80

    def _check_close(self) -> None:
        assert self._close is not None
        key, masked = bytes(self._close[:4]), bytes(self._close[4:])
        self._close = None
        parse_close_payload(apply_mask(key, masked))

    def _header_size(self) -> int:
        header = self._header
        if len(header) < 2:
            return 2
        length = header[1] & 0x7F
        extra = 2 if length == 126 else 8 if length == 127 else 0
        return 2 + extra + 4
