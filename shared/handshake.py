"""The opening handshake as plain values (the seed's ``Handshake``): validate an upgrade
request, compute Sec-WebSocket-Accept, and write the 101 response.

aiohttp parses and routes the upgrade request; the hub decides with these functions
whether it is an upgrade we accept (a refusal carries a clear HTTP status and reason)
and writes the 101 made by ``handshake_response`` on the socket itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping

from roomcast.shared.errors import HandshakeError
from roomcast.shared.rfc6455 import WS_GUID, WS_VERSION


def _tokens(value: str) -> set[str]:
    return {part.strip().lower() for part in value.split(",") if part.strip()}


def validate_upgrade_request(method: str, headers: Mapping[str, str]) -> str:
    """Return the Sec-WebSocket-Key of a valid upgrade request, else raise HandshakeError.

    ``headers`` must look up names case-insensitively (aiohttp's CIMultiDict does).
    Wrong method is 405; a wrong version is 426 with the version we speak; anything
    else missing or malformed is 400.
    """
    if method.upper() != "GET":
        raise HandshakeError(f"WebSocket upgrade needs GET, not {method}", status=405)
    if "websocket" not in _tokens(headers.get("Upgrade", "")):
        raise HandshakeError(
            "this is a WebSocket endpoint: send 'Upgrade: websocket' and "
            "'Connection: Upgrade' (use a WebSocket client)"
        )
    getall = getattr(headers, "getall", None)  # a header may be sent more than once
    connection = ", ".join(getall("Connection", ())) if getall else headers.get("Connection", "")
    if "upgrade" not in _tokens(connection):
        raise HandshakeError("the Connection header must contain 'Upgrade'")
    if headers.get("Transfer-Encoding") or headers.get("Content-Length", "0").strip() != "0":
        raise HandshakeError("a WebSocket upgrade request has no body")
    version = headers.get("Sec-WebSocket-Version", "").strip()
    if version != WS_VERSION:
        raise HandshakeError(
            f"unsupported Sec-WebSocket-Version {version!r}; this server speaks 13",
            status=426,
        )
    key = headers.get("Sec-WebSocket-Key", "").strip()
    try:
        decoded = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != 16:
        raise HandshakeError("Sec-WebSocket-Key must be 16 random bytes in base64")
    return key


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for ``key``: base64(SHA-1(key + GUID)) (``generateAcceptKey``)."""
    digest = hashlib.sha1(key.encode("ascii") + WS_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def handshake_response(
    key: str, extensions: str | None = None, headers: Mapping[str, str] | None = None,
    protocol: str | None = None,
) -> bytes:
    """The bytes of the HTTP 101 response to an upgrade with ``key`` (``createResponse``).

    ``extensions`` is the Sec-WebSocket-Extensions value agreed on; ``protocol`` the
    subprotocol chosen from the client's offer (Sec-WebSocket-Protocol, none when None);
    ``headers`` are added as they are (names and values must be ASCII without CR or LF).
    """
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_key(key)}",
    ]
    if extensions:
        lines.append(f"Sec-WebSocket-Extensions: {extensions}")
    if protocol:
        if any(c in protocol for c in "\r\n,"):
            raise ValueError(f"subprotocol {protocol!r} is not a single token")
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    for name, value in (headers or {}).items():
        if any(c in f"{name}{value}" for c in "\r\n"):
            raise ValueError(f"header {name!r} contains CR or LF")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a browser ``Origin`` may connect, by the rule HubConfig documents.

    No Origin (not a browser) is allowed; ``"*"`` allows all; an empty ``allowed``
    means same-origin only (the Origin's host[:port] equals the Host header).
    """
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if "*" in allowed:
        return True
    if allowed:
        return origin in allowed
    if not host:
        return False
    _, sep, origin_host = origin.partition("://")
    return bool(sep) and origin_host == host.strip().lower()
