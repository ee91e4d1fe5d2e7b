"""One roomcast node: the Hub, its connections and the aiohttp integration."""

from node.connection import Connection, ConnectionState
from node.events import EventHandler, Message, MessageType
from node.hub import HUB, Hub, HubStats, get_hub
from shared.config import HubConfig
from shared.protocol import CloseCode

__all__ = [
    "HUB",
    "CloseCode",
    "Connection",
    "ConnectionState",
    "EventHandler",
    "Hub",
    "HubConfig",
    "HubStats",
    "Message",
    "MessageType",
    "get_hub",
]
