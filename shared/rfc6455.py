"""RFC 6455 constants: opcodes, close codes, the handshake GUID, and what a message carries.

The names follow the seed's ``Opcode`` and ``CloseCode`` enums; the values are the
numbers RFC 6455 assigns. ``Data`` is what every send and broadcast takes: a ``str`` goes
out as a text message, bytes-like data as a binary one.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final, TypeAlias

WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
"""The fixed GUID that RFC 6455 section 1.3 appends to Sec-WebSocket-Key."""

WS_VERSION: Final = "13"

Data: TypeAlias = str | bytes | bytearray | memoryview
"""A message to send: ``str`` is sent as text (UTF-8), bytes-like data as binary."""


class Opcode(IntEnum):
    """Frame opcodes (RFC 6455 section 5.2)."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA

    @property
    def is_control(self) -> bool:
        """Control frames (close, ping, pong) have the high bit of the opcode set."""
        return self >= 0x8


class CloseCode(IntEnum):
    """Close status codes (RFC 6455 section 7.4.1, and 1012-1014 from IANA's registry),
    named as in the seed."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED = 1003
    NO_STATUS = 1005
    ABNORMAL = 1006
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    EXTENSION_REQUIRED = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    """IANA registry: the server is restarting."""
    TRY_AGAIN_LATER = 1013
    """IANA registry: a temporary condition; roomcast cuts off a slow reader with it."""
    BAD_GATEWAY = 1014
    """IANA registry: a gateway got an invalid response upstream."""
    TLS_HANDSHAKE = 1015


_RESERVED_ON_WIRE: Final = frozenset({1004, 1005, 1006, 1015})


def is_sendable_close_code(code: int) -> bool:
    """True if ``code`` may appear in a close frame on the wire.

    1005, 1006 and 1015 only ever describe a closure locally, 1004 is reserved, and
    codes below 1000 or in 1016-2999 are unassigned; 3000-4999 are for applications.
    """
    if code in _RESERVED_ON_WIRE:
        return False
    return 1000 <= code <= 1014 or 3000 <= code <= 4999
