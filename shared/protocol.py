"""Deprecated alias of ``roomcast.shared.rfc6455`` (the module's name before issue 11).

Import ``Opcode``, ``CloseCode``, ``WS_GUID``, ``WS_VERSION`` and
``is_sendable_close_code`` from ``roomcast.shared.rfc6455`` (or ``roomcast.shared``).
"""

from roomcast.shared.rfc6455 import (
    WS_GUID,
    WS_VERSION,
    CloseCode,
    Opcode,
    is_sendable_close_code,
)

__all__ = ["WS_GUID", "WS_VERSION", "CloseCode", "Opcode", "is_sendable_close_code"]
