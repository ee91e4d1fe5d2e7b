"""What node and broker both speak: config, ids, frames, handshake, envelope, history
positions. No I/O."""

from roomcast.shared.config import HubConfig
from roomcast.shared.envelope import Envelope, Kind, decode, encode
from roomcast.shared.errors import (
    BrokerError,
    ConnectionClosedError,
    EnvelopeError,
    HandshakeError,
    ProtocolError,
    PublishError,
    RoomcastError,
)
from roomcast.shared.frames import Frame, PreparedMessage, build_frame, parse_frame
from roomcast.shared.history import History, HistoryPage, HistoryPolicy, Position
from roomcast.shared.ids import ConnectionId, NodeId, Room, node_of
from roomcast.shared.rfc6455 import CloseCode, Data, Opcode

__all__ = [
    "BrokerError",
    "CloseCode",
    "ConnectionClosedError",
    "ConnectionId",
    "Data",
    "Envelope",
    "EnvelopeError",
    "Frame",
    "HandshakeError",
    "History",
    "HistoryPage",
    "HistoryPolicy",
    "HubConfig",
    "Kind",
    "NodeId",
    "Opcode",
    "Position",
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
