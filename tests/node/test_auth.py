"""Authentication at the upgrade and room authorization, over real sockets (node.auth)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from roomcast.node import Connection, EventHandler, Hub, Message
from roomcast.node.auth import (
    Auth,
    AuthRefused,
    Identity,
    JWTAuthenticator,
    RedactingAccessLogger,
    RoomForbidden,
    redact_query,
    room_allowed,
)
from roomcast.shared.ids import validate_room

SECRET = "s3cret-for-tests-only-0123456789abcdef"
AUDIENCE = "roomcast-tests"
ISSUER = "https://issuer.example"

Start = Callable[[web.Application], Awaitable[str]]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "user-1", "aud": AUDIENCE, "iss": ISSUER, "exp": now + 300,
                            "info": {"name": "Ann"}}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def hs256(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def forged(payload: dict[str, Any], alg: str, key: bytes | None) -> str:
    """A token PyJWT would not make: ``alg: none``, or HS256 keyed with public key bytes."""
    header = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    signing_input = f"{header}.{body}".encode()
    signature = b"" if key is None else hmac.new(key, signing_input, hashlib.sha256).digest()
    return f"{header}.{body}.{b64(signature)}"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


class Events:
    """What the server side saw: opened connections and join results."""

    def __init__(self) -> None:
        self.opened: asyncio.Queue[Connection] = asyncio.Queue()
        self.closed: asyncio.Queue[tuple[str, int, str]] = asyncio.Queue()


def make_app(hub: Hub, events: Events) -> web.Application:
    """``/ws?room=R`` joins R at the upgrade; a message ``join:R`` joins R later and
    answers ``joined:R`` or ``forbidden:R``."""

    async def on_open(conn: Connection) -> None:
        await events.opened.put(conn)

    async def on_message(conn: Connection, msg: Message) -> None:
        text = str(msg.data)
        if text.startswith("join:"):
            room = text[5:]
            try:
                await hub.join_room(conn, room)
            except RoomForbidden as exc:
                assert exc.room == room
                await conn.send_text(f"forbidden:{room}")
            else:
                await conn.send_text(f"joined:{room}")

    def on_close(conn: Connection, code: int, reason: str) -> None:
        events.closed.put_nowait((conn.id, code, reason))

    handler = EventHandler(on_open=on_open, on_message=on_message, on_close=on_close)

    async def ws(request: web.Request) -> web.StreamResponse:
        rooms = request.query.getall("room", [])
        try:
            for room in rooms:
                validate_room(room)
        except ValueError as exc:
            return web.Response(status=400, text=f"bad room: {exc}\n")
        return await hub.upgrade(request, handler, rooms=rooms)

    app = web.Application()
    hub.attach(app)
    app.router.add_get("/ws", ws)
    return app


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Serve apps as ``roomcast serve`` does: with the access log that redacts tokens."""
    servers: list[TestServer] = []

    async def run(app: web.Application) -> str:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server(access_log_class=RedactingAccessLogger)
        servers.append(server)
        return str(server.make_url("")).rstrip("/").replace("http://", "ws://")

    yield run
    for server in reversed(servers):
        await server.close()


def jwt_hub(authenticator: JWTAuthenticator | None = None, **auth: Any) -> Hub:
    if authenticator is None:
        authenticator = JWTAuthenticator.from_secret(SECRET, audience=AUDIENCE, issuer=ISSUER)
    return Hub(auth=Auth(authenticator, require=True, **auth))


async def status_of(url: str, **kwargs: Any) -> tuple[int, str]:
    """The HTTP status of a refused upgrade and its body (101 and '' if it opened)."""
    async with aiohttp.ClientSession() as session:
        try:
            async with asyncio.timeout(10):
                ws = await session.ws_connect(url, **kwargs)
        except aiohttp.WSServerHandshakeError as exc:
            async with session.get(url.replace("ws://", "http://"), headers={
                    **kwargs.get("headers", {}), "Connection": "Upgrade",
                    "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as resp:
                return exc.status, await resp.text()
        await ws.close()
        return 101, ""


async def test_valid_token_opens_with_identity(start: Start, caplog: pytest.LogCaptureFixture
                                               ) -> None:
    """A valid HS256 token in the query string: 101; conn.user_id and user_info from it."""
    caplog.set_level(logging.DEBUG)
    events = Events()
    hub = jwt_hub()
    base = await start(make_app(hub, events))
    token = hs256(claims())
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{base}/ws?token={token}&room=lobby")
        async with asyncio.timeout(5):
            conn = await events.opened.get()
        assert conn.user_id == "user-1"
        assert conn.user_info == {"name": "Ann"}
        assert conn.identity is not None and conn.identity.rooms is None
        assert conn.in_room("lobby")
        await ws.close()
    assert token not in caplog.text
    assert "token=[redacted]" in caplog.text  # the access log line, without the token


@pytest.mark.parametrize("where", ["header", "cookie"])
async def test_token_from_header_or_cookie(start: Start, where: str) -> None:
    """Authorization: Bearer and the roomcast_token cookie are read too."""
    events = Events()
    base = await start(make_app(jwt_hub(), events))
    token = hs256(claims(sub=f"via-{where}"))
    headers = ({"Authorization": f"Bearer {token}"} if where == "header"
               else {"Cookie": f"roomcast_token={token}"})
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{base}/ws", headers=headers)
        async with asyncio.timeout(5):
            assert (await events.opened.get()).user_id == f"via-{where}"
        await ws.close()


def refused_tokens(rsa_key: rsa.RSAPrivateKey) -> dict[str, tuple[str, str]]:
    """Each bad token, with what the 401's body says."""
    now = int(time.time())
    return {
        "expired": (hs256(claims(exp=now - 30)), "token expired"),
        "nbf-in-future": (hs256(claims(nbf=now + 300)), "not yet valid"),
        "wrong-signature": (hs256(claims(), "another-secret-of-enough-length-0123456789"),
                            "signature invalid"),
        "alg-none": (forged(claims(), "none", None), "algorithm not accepted"),
        "rs256-not-accepted": (jwt.encode(claims(), rsa_key, algorithm="RS256"),
                               "algorithm not accepted"),
        "wrong-audience": (hs256(claims(aud="someone-else")), "audience not accepted"),
        "wrong-issuer": (hs256(claims(iss="https://evil.example")), "issuer not accepted"),
        "no-exp": (hs256(claims(exp=None)), "lacks the 'exp' claim"),
        "no-sub": (hs256(claims(sub=None)), "lacks the 'sub' claim"),
        "garbage": ("not.a.token", "token invalid"),
        "rooms-not-a-list": (hs256(claims(rooms="lobby")), "must be a list"),
    }


async def test_bad_tokens_are_refused_with_401_and_never_logged(
    start: Start, rsa_key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    """Every bad token: 401 before the 101, a body saying what is wrong, nothing in the
    logs that contains the token (access log included)."""
    caplog.set_level(logging.DEBUG)
    hub = jwt_hub()
    base = await start(make_app(hub, Events()))
    cases = refused_tokens(rsa_key)
    for name, (token, why) in cases.items():
        status, body = await status_of(f"{base}/ws?token={token}")
        assert (status, why in body) == (401, True), (name, body)
        assert token not in caplog.text, name
        for part in token.split("."):  # nor any part of it (header, claims, signature)
            assert len(part) < 8 or part not in caplog.text, name
    assert hub.stats.refused_auth == 2 * len(cases)  # status_of asks twice
    assert hub.stats.connections_opened == 0


async def test_missing_token_is_401_with_www_authenticate(start: Start) -> None:
    """No credentials with require: 401 and WWW-Authenticate: Bearer."""
    base = await start(make_app(jwt_hub(), Events()))
    async with aiohttp.ClientSession() as session:
        async with session.get(base.replace("ws://", "http://") + "/ws", headers={
                "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert "authentication required" in await resp.text()
        async with session.get(base.replace("ws://", "http://") + "/ws", headers={
                "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Authorization": "Basic dXNlcjpwYXNz"}) as resp:
            assert resp.status == 401
            assert "must be 'Bearer <token>'" in await resp.text()


async def test_algorithm_confusion_is_refused(start: Start, rsa_key: rsa.RSAPrivateKey) -> None:
    """A node on RS256 refuses an HS256 token whose HMAC key is the RSA public key (the
    classic confusion); the genuine RS256 token opens."""
    pem = public_pem(rsa_key)
    auth = JWTAuthenticator.from_public_key(pem, audience=AUDIENCE, issuer=ISSUER)
    assert auth.algorithms == ("RS256",)
    base = await start(make_app(jwt_hub(auth), Events()))
    confused = forged(claims(), "HS256", pem)
    status, body = await status_of(f"{base}/ws?token={confused}")
    assert status == 401 and "algorithm not accepted" in body
    status, body = await status_of(f"{base}/ws?token={forged(claims(), 'none', None)}")
    assert status == 401 and "algorithm not accepted" in body
    genuine = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert (await status_of(f"{base}/ws?token={genuine}"))[0] == 101


async def test_es256_public_key_and_jwks(start: Start, rsa_key: rsa.RSAPrivateKey) -> None:
    """ES256 from a P-256 public key; a JWKS picks the key by kid (RSA and EC)."""
    ec_key = ec.generate_private_key(ec.SECP256R1())
    es = JWTAuthenticator.from_public_key(public_pem(ec_key))
    assert es.algorithms == ("ES256",)
    assert es.decode(jwt.encode({"sub": "e", "exp": time.time() + 60}, ec_key,
                                algorithm="ES256")).user_id == "e"
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    jwks = {"keys": [{**rsa_jwk, "kid": "r1", "alg": "RS256", "use": "sig"},
                     {**ec_jwk, "kid": "e1", "alg": "ES256", "use": "sig"}]}
    auth = JWTAuthenticator.from_jwks(json.dumps(jwks), audience=AUDIENCE, issuer=ISSUER)
    base = await start(make_app(jwt_hub(auth), Events()))
    by_rsa = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "r1"})
    by_ec = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "e1"})
    assert (await status_of(f"{base}/ws?token={by_rsa}"))[0] == 101
    assert (await status_of(f"{base}/ws?token={by_ec}"))[0] == 101
    # The RSA key's token claiming the EC key's kid: wrong algorithm for that key.
    crossed = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "e1"})
    status, body = await status_of(f"{base}/ws?token={crossed}")
    assert status == 401 and "algorithm not accepted" in body
    unknown = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "zz"})
    status, body = await status_of(f"{base}/ws?token={unknown}")
    assert status == 401 and "names no key" in body
    confused = forged(claims(), "HS256", public_pem(rsa_key))
    assert (await status_of(f"{base}/ws?token={confused}"))[0] == 401


def test_key_material_is_checked() -> None:
    """Short secrets, symmetric keys in a JWKS, private keys and small RSA keys refuse
    to configure, each saying what to do."""
    with pytest.raises(ValueError, match="at least 32"):
        JWTAuthenticator.from_secret("short")
    with pytest.raises(ValueError, match="symmetric keys do not belong"):
        JWTAuthenticator.from_jwks({"keys": [{"kty": "oct", "k": b64(b"k" * 32), "kid": "x"}]})
    with pytest.raises(ValueError, match="not a valid key set"):
        JWTAuthenticator.from_jwks("{not json")
    with pytest.raises(ValueError, match="not a PEM public key"):
        JWTAuthenticator.from_public_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="at least 2048"):
        JWTAuthenticator.from_public_key(public_pem(small))
    with pytest.raises(ValueError, match="cannot read"):
        JWTAuthenticator.from_public_key_file("/nonexistent/key.pem")
    with pytest.raises(ValueError, match="needs an authenticator"):
        Auth(require=True)
    with pytest.raises(ValueError, match="401 or 403"):
        AuthRefused("x", status=500)


async def test_token_expiring_during_the_connection_closes_it_with_4001(start: Start) -> None:
    """exp is enforced after the upgrade too: close 4001 "token expired", counted."""
    events = Events()
    hub = jwt_hub()
    base = await start(make_app(hub, events))
    token = hs256(claims(exp=int(time.time()) + 2))
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{base}/ws?token={token}")
        async with asyncio.timeout(10):
            msg = await ws.receive()
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (4001, "token expired")
        async with asyncio.timeout(10):
            _, code, reason = await events.closed.get()
        assert (code, reason) == (4001, "token expired")
    assert hub.stats.tokens_expired == 1


async def test_closed_connection_cancels_its_expiry_timer(start: Start) -> None:
    """A connection that goes before its token expires leaves no timer behind."""
    events = Events()
    hub = jwt_hub()
    base = await start(make_app(hub, events))
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{base}/ws?token={hs256(claims())}")
        async with asyncio.timeout(5):
            conn = await events.opened.get()
        assert conn.expiry_timer is not None
        timer = conn.expiry_timer
        await ws.close()
        async with asyncio.timeout(5):
            await events.closed.get()
    assert timer.cancelled() and conn.expiry_timer is None
    assert hub.stats.tokens_expired == 0


# -- authorization --------------------------------------------------------------------

def test_room_patterns_are_exact() -> None:
    """Names compare exactly; '*' is the only wildcard."""
    rooms = ("lobby", "team-*", "a*b*c")
    assert room_allowed(rooms, "lobby")
    assert room_allowed(rooms, "team-a") and room_allowed(rooms, "team-")
    assert room_allowed(rooms, "abc") and room_allowed(rooms, "a-b-c") and room_allowed(
        rooms, "abbc")
    for room in ("Lobby", "LOBBY", "lobby ", " lobby", "%6Cobby", "lobb%79", "lobby\u200b",
                 "\uff4cobby", "Team-a", "team", "xteam-a", "ab", "acb", "admin", "a*b"):
        assert not room_allowed(rooms, room), room
    assert not room_allowed((), "lobby")
    assert room_allowed(("*",), "anything")
    assert not room_allowed(("team-?",), "team-a")  # no other metacharacters
    assert not room_allowed(("team-[ab]",), "team-a")


async def test_rooms_claim_at_upgrade_and_join_room(start: Start) -> None:
    """A join outside the token's rooms: 403 at the upgrade; RoomForbidden at
    join_room (the client is told); percent-encoding and case do not get around it."""
    events = Events()
    hub = jwt_hub()
    base = await start(make_app(hub, events))
    token = hs256(claims(rooms=["lobby", "team-*"]))
    ok = f"{base}/ws?token={token}"
    assert (await status_of(f"{ok}&room=lobby&room=team-red"))[0] == 101
    assert (await status_of(f"{ok}&room=%6Cobby"))[0] == 101  # decoded once: it is "lobby"
    for trick in ("admin", "%61dmin", "Lobby", "LOBBY", "%256Cobby", "lobby%20", "lobby%E2%80%8B",
                  "Team-red", "team", "lobby/..%2Fadmin"):
        status, body = await status_of(f"{ok}&room=lobby&room={trick}")
        assert status == 403, trick
        assert "may not join room" in body and "not in the token's rooms" in body
    assert hub.stats.refused_forbidden >= 10
    while not events.opened.empty():
        events.opened.get_nowait()  # the connections status_of opened
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(ok)
        async with asyncio.timeout(5):
            conn = await events.opened.get()
            await ws.send_str("join:team-blue")
            assert await ws.receive_str() == "joined:team-blue"
            await ws.send_str("join:admin")
            assert await ws.receive_str() == "forbidden:admin"
            await ws.send_str("join:LOBBY")
            assert await ws.receive_str() == "forbidden:LOBBY"
        assert conn.rooms == {"team-blue"}
        assert hub.stats.joins_forbidden == 2
        await ws.close()


async def test_authorize_hook_for_anonymous_and_authenticated(start: Start) -> None:
    """authorize(conn, room) is asked on every join: 403 at the upgrade, RoomForbidden
    in join_room; anonymous connections (no require) have user_id None."""
    asked: list[tuple[str | None, str]] = []

    async def authorize(conn: Connection, room: str) -> bool:
        asked.append((conn.user_id, room))
        return not room.startswith("private-") or conn.user_id == "owner"

    events = Events()
    hub = Hub(auth=Auth(JWTAuthenticator.from_secret(SECRET), authorize=authorize))
    base = await start(make_app(hub, events))
    assert (await status_of(f"{base}/ws?room=public"))[0] == 101
    assert (await status_of(f"{base}/ws?room=private-x"))[0] == 403
    owner = hs256({"sub": "owner", "exp": int(time.time()) + 60})
    assert (await status_of(f"{base}/ws?room=private-x&token={owner}"))[0] == 101
    assert (None, "private-x") in asked and ("owner", "private-x") in asked
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{base}/ws")
        async with asyncio.timeout(5):
            while (conn := await events.opened.get()).rooms:
                pass  # the earlier connections'
            assert conn.user_id is None and conn.user_info == {}
            await ws.send_str("join:private-y")
            assert await ws.receive_str() == "forbidden:private-y"
        await ws.close()


def test_access_log_redaction() -> None:
    """The access log's query redaction (a percent-encoded name too)."""
    assert redact_query("/ws", "room=a&token=abc.def&%74oken=x&tokens=keep", "token") == (
        "/ws?room=a&token=[redacted]&%74oken=[redacted]&tokens=keep")
    assert redact_query("/ws", "", "token") == "/ws"


def test_identity_defaults() -> None:
    ident = Identity("u")
    assert ident.info == {} and ident.rooms is None and ident.expires_at is None


async def test_v1_client_gets_a_forbidden_error_frame(start: Start) -> None:
    """A roomcast.v1 connection refused a join gets {"type": "error", "code":
    "forbidden", "room": ...}, and stays open."""
    events = Events()
    base = await start(make_app(jwt_hub(), events))
    token = hs256(claims(rooms=["lobby"]))
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{base}/ws?token={token}", protocols=["roomcast.v1"])
        assert ws.protocol == "roomcast.v1"
        async with asyncio.timeout(5):
            assert (await ws.receive_json())["type"] == "welcome"
            await ws.send_str("join:admin")
            error = await ws.receive_json()
            assert error == {"type": "error", "code": "forbidden",
                             "message": "not allowed to join room 'admin'", "room": "admin"}
            assert await ws.receive_json() == {"type": "message", "data": "forbidden:admin"}
            await ws.send_str("join:lobby")
            assert await ws.receive_json() == {"type": "joined", "room": "lobby"}
            assert await ws.receive_json() == {"type": "message", "data": "joined:lobby"}
        await ws.close()
