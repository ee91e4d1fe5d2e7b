"""One roomcast node: the Hub, its connections and the aiohttp integration."""

from roomcast.node.connection import Connection, ConnectionState
from roomcast.node.handlers import EventHandler
from roomcast.node.hub import HUB, Hub, HubStats, get_hub
from roomcast.node.messages import Message, MessageType
from roomcast.shared.config import HubConfig
from roomcast.shared.rfc6455 import CloseCode

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
