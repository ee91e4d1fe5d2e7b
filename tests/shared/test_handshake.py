"""The opening handshake: upgrade validation with HTTP statuses, accept key, 101, origins."""

from __future__ import annotations

import base64

import pytest
from multidict import CIMultiDict
from websockets.utils import accept_key as ws_accept_key

from roomcast.shared.errors import HandshakeError, ProtocolError
from roomcast.shared.handshake import (
    accept_key,
    handshake_response,
    origin_allowed,
    validate_upgrade_request,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def _headers(**overrides: str | None) -> CIMultiDict[str]:
    """A valid upgrade request's headers; an override of None drops that header."""
    values: dict[str, str | None] = {
        "Host": "example.com",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
    }
    values.update({name.replace("_", "-"): value for name, value in overrides.items()})
    return CIMultiDict((k, v) for k, v in values.items() if v is not None)


def test_valid_request_returns_key() -> None:
    """A well-formed GET upgrade is accepted and its key returned."""
    assert validate_upgrade_request("GET", _headers()) == KEY


def test_header_names_and_tokens_case_insensitive() -> None:
    """Header names and the Upgrade/Connection tokens match in any case, in lists."""
    headers = CIMultiDict(
        {
            "upgrade": "WebSocket",
            "connection": "keep-alive, UPGRADE",
            "sec-websocket-key": KEY,
            "sec-websocket-version": " 13 ",
        }
    )
    assert validate_upgrade_request("get", headers) == KEY


def test_post_is_405() -> None:
    """A non-GET method is refused with 405."""
    with pytest.raises(HandshakeError) as info:
        validate_upgrade_request("POST", _headers())
    assert info.value.status == 405


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"Upgrade": None}, "Upgrade: websocket"),
        ({"Upgrade": "h2c"}, "Upgrade: websocket"),
        ({"Connection": None}, "Connection"),
        ({"Connection": "keep-alive"}, "Connection"),
        ({"Sec_WebSocket_Key": None}, "16 random bytes"),
        ({"Sec_WebSocket_Key": "not base64!!"}, "16 random bytes"),
        ({"Sec_WebSocket_Key": base64.b64encode(b"x" * 15).decode()}, "16 random bytes"),
        ({"Sec_WebSocket_Key": base64.b64encode(b"x" * 17).decode()}, "16 random bytes"),
        ({"Sec_WebSocket_Key": "dGhlIHNhbXBsZSBub25jZQ"}, "16 random bytes"),
    ],
)
def test_malformed_request_is_400(overrides: dict[str, str | None], match: str) -> None:
    """Missing Upgrade/Connection/key, or a key that is not 16 base64 bytes, is 400."""
    with pytest.raises(HandshakeError, match=match) as info:
        validate_upgrade_request("GET", _headers(**overrides))
    assert info.value.status == 400


@pytest.mark.parametrize("version", ["8", None, "14"])
def test_wrong_version_is_426(version: str | None) -> None:
    """A Sec-WebSocket-Version other than 13 is 426, naming the version we speak."""
    with pytest.raises(HandshakeError, match="13") as info:
        validate_upgrade_request("GET", _headers(Sec_WebSocket_Version=version))
    assert info.value.status == 426


def test_handshake_error_is_protocol_error() -> None:
    """HandshakeError sits under ProtocolError in the exception tree."""
    assert issubclass(HandshakeError, ProtocolError)


def test_accept_key_rfc_example() -> None:
    """accept_key gives RFC 6455's worked example (section 1.3)."""
    assert accept_key(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_accept_key_matches_websockets() -> None:
    """accept_key agrees with websockets' computation for other keys."""
    for raw in (b"\x00" * 16, bytes(range(16)), b"\xff" * 16):
        key = base64.b64encode(raw).decode()
        assert accept_key(key) == ws_accept_key(key)


def test_handshake_response() -> None:
    """The 101 response has the status line, upgrade headers and accept key, CRLF-framed."""
    response = handshake_response(KEY)
    head, sep, rest = response.partition(b"\r\n\r\n")
    assert sep and rest == b""
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 101 Switching Protocols"
    assert b"Upgrade: websocket" in lines
    assert b"Connection: Upgrade" in lines
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in lines
    assert not any(line.startswith(b"Sec-WebSocket-Extensions") for line in lines)


def test_handshake_response_with_extensions() -> None:
    """Negotiated extensions are echoed in Sec-WebSocket-Extensions."""
    response = handshake_response(KEY, "permessage-deflate")
    assert b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\n" in response


def test_handshake_response_with_headers() -> None:
    """Extra headers (the node's X-Roomcast-*) are added; CR or LF in one is refused, so
    a value can never split the response."""
    response = handshake_response(KEY, None, {"X-Roomcast-Node": "abc"})
    assert response.endswith(b"\r\nX-Roomcast-Node: abc\r\n\r\n")
    with pytest.raises(ValueError, match="CR or LF"):
        handshake_response(KEY, None, {"X-Evil": "a\r\nSet-Cookie: x"})


def test_no_origin_allowed() -> None:
    """A client that sends no Origin (not a browser) is allowed under every rule."""
    assert origin_allowed(None, "example.com", ())
    assert origin_allowed(None, None, ("https://other.org",))


def test_star_allows_any_origin() -> None:
    """'*' allows any origin, whatever the Host."""
    assert origin_allowed("https://evil.example", "example.com", ("*",))


def test_explicit_list() -> None:
    """An explicit list allows exactly its origins, compared normalised."""
    allowed = ("https://app.example.com", "http://localhost:8080")
    assert origin_allowed("https://app.example.com", "x", allowed)
    assert origin_allowed("HTTPS://App.Example.com/", "x", allowed)
    assert origin_allowed("http://localhost:8080", "x", allowed)
    assert not origin_allowed("http://app.example.com", "x", allowed)
    assert not origin_allowed("http://localhost:8081", "x", allowed)
    assert not origin_allowed("https://app.example.com", "app.example.com", ("https://b.com",))


def test_empty_list_is_same_origin_by_host() -> None:
    """With no list, an Origin whose host[:port] equals the Host header is allowed."""
    assert origin_allowed("http://example.com", "example.com", ())
    assert origin_allowed("https://Example.com:8443", "example.com:8443", ())


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://evil.com", "example.com"),
        ("http://example.com:8080", "example.com"),
        ("http://example.com", None),
        ("null", "example.com"),
    ],
)
def test_empty_list_refuses_other_hosts(origin: str, host: str | None) -> None:
    """With no list, a different host or port, no Host, or an opaque origin is refused."""
    assert not origin_allowed(origin, host, ())


def test_connection_header_sent_twice_is_read_whole() -> None:
    """'Connection: keep-alive' and 'Connection: Upgrade' as two headers are accepted."""
    from multidict import CIMultiDict

    from roomcast.shared.handshake import validate_upgrade_request as validate

    headers = CIMultiDict(
        [("Upgrade", "websocket"), ("Connection", "keep-alive"), ("Connection", "Upgrade"),
         ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")]
    )
    assert validate("GET", headers) == "dGhlIHNhbXBsZSBub25jZQ=="
