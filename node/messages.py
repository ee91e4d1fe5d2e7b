"""A message received from a client (the seed's ``Message`` and its ``type``)."""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple


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
