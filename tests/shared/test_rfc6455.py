"""RFC 6455 constants and the rule for which close codes may go on the wire."""

from __future__ import annotations

import pytest
from websockets.exceptions import ProtocolError as WsProtocolError
from websockets.frames import Close

from roomcast.shared.rfc6455 import WS_GUID, CloseCode, Opcode, is_sendable_close_code


def test_opcode_values() -> None:
    """Opcodes carry RFC 6455's numbers."""
    assert [int(op) for op in Opcode] == [0x0, 0x1, 0x2, 0x8, 0x9, 0xA]


def test_is_control() -> None:
    """Only close, ping and pong are control opcodes."""
    assert {op for op in Opcode if op.is_control} == {Opcode.CLOSE, Opcode.PING, Opcode.PONG}


def test_guid() -> None:
    """The handshake GUID is RFC 6455's."""
    assert WS_GUID == b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@pytest.mark.parametrize(
    "code", [CloseCode.NO_STATUS, CloseCode.ABNORMAL, CloseCode.TLS_HANDSHAKE, 1004]
)
def test_local_only_codes_not_sendable(code: int) -> None:
    """1004, 1005, 1006 and 1015 may never appear in a close frame."""
    assert not is_sendable_close_code(code)


def test_sendable_codes_match_websockets() -> None:
    """Every code 0-5999 is sendable exactly when websockets accepts it in a close frame."""
    for code in range(6000):
        try:
            Close(code, "").check()
        except WsProtocolError:
            expected = False
        else:
            expected = True
        assert is_sendable_close_code(code) is expected, code
