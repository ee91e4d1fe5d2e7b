"""Messages and event handlers (the seed's ``Message`` and ``EventHandler``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

if TYPE_CHECKING:
    from roomcast.node.connection import Connection


class MessageType(Enum):
    """Text frames carry UTF-8 (``str``); binary frames carry ``bytes``."""

    TEXT = "text"
    BINARY = "binary"


class Message(NamedTuple):
    """One complete data message: ``data`` is ``str`` for text and ``bytes`` for binary.

    Immutable. A named tuple rather than a frozen dataclass: one is made per message
    received, and a tuple is made in half the time.
    """

    data: str | bytes
    type: MessageType

    @classmethod
    def of(cls, data: str | bytes) -> Message:
        """Text for ``str``, binary for ``bytes``."""
        return cls(data, MessageType.TEXT if isinstance(data, str) else MessageType.BINARY)

    @property
    def is_text(self) -> bool:
        """True for a text message."""
        return self.type is MessageType.TEXT


_Result: TypeAlias = Awaitable[None] | None
OnOpen: TypeAlias = Callable[["Connection"], _Result]
OnMessage: TypeAlias = Callable[["Connection", Message], _Result]
OnClose: TypeAlias = Callable[["Connection", int, str], _Result]
OnError: TypeAlias = Callable[["Connection", BaseException], _Result]
OnPing: TypeAlias = Callable[["Connection", bytes], _Result]


@dataclass(frozen=True, slots=True)
class EventHandler:
    """Callbacks for one kind of connection; each may be a coroutine or a plain function.

    An exception raised by a callback is logged and passed to ``on_error``; it never
    closes the connection or touches any other.
    """

    on_open: OnOpen | None = None
    on_message: OnMessage | None = None
    on_close: OnClose | None = None
    on_error: OnError | None = None
    on_ping: OnPing | None = None
    on_pong: OnPing | None = None


Callback: TypeAlias = Callable[..., Any]
