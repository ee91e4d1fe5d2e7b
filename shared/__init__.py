"""What node and broker both speak: config, ids, frames, handshake, envelope. No I/O."""

from shared.config import HubConfig
from shared.envelope import Envelope, Kind, decode, encode
from shared.errors import (
    BrokerError,
    ConnectionClosedError,
    EnvelopeError,
    HandshakeError,
    ProtocolError,
    PublishError,
    RoomcastError,
)
from shared.frames import Frame, PreparedMessage, build_frame, parse_frame
from shared.ids import ConnectionId, NodeId, Room, node_of
from shared.protocol import CloseCode, Opcode

__all__ = [
    "BrokerError",
    "CloseCode",
    "ConnectionClosedError",
    "ConnectionId",
    "Envelope",
    "EnvelopeError",
    "Frame",
    "HandshakeError",
    "HubConfig",
    "Kind",
    "NodeId",
    "Opcode",
    "PreparedMessage",
    "ProtocolError",
    "PublishError",
    "Room",
    "RoomcastError",
    "build_frame",
    "decode",
    "encode",
    "node_of",
    "parse_frame",
]
