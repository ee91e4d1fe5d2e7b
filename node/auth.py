"""Who a connection is, and which rooms it may join: authentication at the upgrade.

``Hub(auth=Auth(...))`` runs, for every WebSocket request, before the 101:

1. the ``Authenticator`` (``authenticate(request)``): an ``Identity`` (user id, a small
   info mapping, the rooms it may join, when it expires), None when the request carries
   no credentials, or ``AuthRefused`` with its HTTP status (401: the credentials are
   missing or invalid; 403: valid, but this request is not allowed). With
   ``Auth(require=True)`` a request without credentials is refused with 401;
2. the room check of every room the upgrade joins: the identity's rooms (names or
   ``*`` patterns, compared exactly: no case folding, no percent-decoding) and the
   ``authorize(conn, room)`` hook; a refusal answers 403.

After the 101 the same room check runs on every ``Hub.join_room``: a refusal raises
``RoomForbidden`` (a ``PermissionError``) and a ``roomcast.v1`` client gets an ``error``
frame with code ``forbidden``. A connection whose identity expires is closed with 4001
"token expired" (docs/protocol.md: refresh the token, then reconnect).

``JWTAuthenticator`` is the built-in authenticator: JSON Web Tokens checked with PyJWT,
HS256 with a shared secret or RS256/ES256 with a public key or a JWKS file. The token
comes from ``Authorization: Bearer``, a cookie, or the query string (browsers cannot
set headers on a WebSocket). It is never logged: refusals name what is wrong with it,
not its text, and ``RedactingAccessLogger`` keeps it out of aiohttp's access log.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import unquote_plus

import jwt
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.types import Options

from roomcast.shared.errors import RoomcastError
from roomcast.shared.ids import Room

if TYPE_CHECKING:
    from roomcast.node.connection import Connection

__all__ = [
    "Auth",
    "AuthRefused",
    "Authenticator",
    "Authorize",
    "Identity",
    "JWTAuthenticator",
    "RedactingAccessLogger",
    "RoomForbidden",
    "room_allowed",
]

log = logging.getLogger("roomcast.node")

TOKEN_EXPIRED: Final = 4001
"""Close code of a connection whose token expired (refresh it, then reconnect)."""
TOKEN_EXPIRED_REASON: Final = "token expired"
MIN_SECRET_BYTES: Final = 32
"""Shortest HS256 secret accepted: shorter HMAC keys can be guessed offline from one
token (RFC 7518 section 3.2 asks for at least the hash size)."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection belongs to.

    ``user_id``: the user (a JWT's ``sub``). ``info``: a small mapping the application
    shows (a name, an avatar; a JWT's ``info`` claim). ``rooms``: the room names or
    ``*`` patterns it may join; None: any room (the ``authorize`` hook still runs).
    ``expires_at``: ``time.time()`` when the credentials expire (the connection is then
    closed with 4001); None: never.
    """

    user_id: str
    info: Mapping[str, Any] = field(default_factory=dict)
    rooms: tuple[str, ...] | None = None
    expires_at: float | None = None


class AuthRefused(RoomcastError):
    """A WebSocket request refused before the upgrade: answer it with ``status``.

    401: no credentials, or invalid ones (the message says what is wrong, never the
    token). 403: valid credentials, but not for this request.
    """

    def __init__(self, message: str, status: int = 401) -> None:
        if status not in (401, 403):
            raise ValueError(f"AuthRefused status must be 401 or 403, got {status}")
        super().__init__(message)
        self.status = status


class RoomForbidden(PermissionError):
    """``Hub.join_room`` refused: this connection may not join ``room``."""

    def __init__(self, room: str, conn_id: str, why: str) -> None:
        super().__init__(f"connection {conn_id} may not join room {room!r}: {why}")
        self.room = room
        self.why = why


class Authenticator(Protocol):
    """Turns an upgrade request into an ``Identity``."""

    async def authenticate(self, request: web.Request) -> Identity | None:
        """The request's identity; None if it carries no credentials at all;
        ``AuthRefused`` if they are invalid or not allowed."""
        ...


Authorize = Callable[["Connection", Room], "bool | Awaitable[bool]"]
"""``authorize(conn, room)``: True if ``conn`` may join ``room`` (may be a coroutine)."""


def room_allowed(patterns: Iterable[str], room: str) -> bool:
    """True if ``room`` is one of ``patterns`` or matches one of them.

    A pattern is a room name, compared exactly (case and every character count; nothing
    is decoded), in which ``*`` stands for any run of characters, including none:
    ``team-*`` matches ``team-a`` and ``team-``, not ``Team-a``. No other character
    is special.
    """
    for pattern in patterns:
        if pattern == room:
            return True
        if "*" in pattern and _glob(pattern, room):
            return True
    return False


def _glob(pattern: str, text: str) -> bool:
    head, *middle, tail = pattern.split("*")
    if len(head) + len(tail) > len(text) or not text.startswith(head) or not text.endswith(
            tail):
        return False
    pos, end = len(head), len(text) - len(tail)
    for part in middle:
        found = text.find(part, pos, end)
        if found < 0:
            return False
        pos = found + len(part)
    return True


@dataclass(frozen=True, slots=True)
class Auth:
    """Authentication and room authorization of a hub (``Hub(auth=...)``).

    ``authenticator``: who a request is (None: everyone is anonymous). ``require``:
    refuse requests without credentials with 401 (without it they connect anonymously,
    ``conn.user_id`` None). ``authorize``: ``authorize(conn, room)`` is asked on every
    join after the identity's own rooms allowed it; for the rooms of ``Hub.upgrade`` it
    is asked before the 101 (``conn`` not open yet, its identity set) and again as the
    hub joins them, and is expected to answer the same.
    """

    authenticator: Authenticator | None = None
    require: bool = False
    authorize: Authorize | None = None

    def __post_init__(self) -> None:
        if self.require and self.authenticator is None:
            raise ValueError("Auth(require=True) needs an authenticator (for example "
                             "JWTAuthenticator.from_secret(...))")

    async def identify(self, request: web.Request) -> Identity | None:
        """The request's identity (None: anonymous); ``AuthRefused`` to refuse it."""
        identity = None
        if self.authenticator is not None:
            identity = await self.authenticator.authenticate(request)
        if identity is None and self.require:
            raise AuthRefused("authentication required: send a token (Authorization: "
                              "Bearer, a cookie or the query string)")
        return identity

    async def refusal(self, conn: Connection, room: Room) -> str | None:
        """Why ``conn`` may not join ``room``, or None if it may."""
        identity = conn.identity
        if identity is not None and identity.rooms is not None and not room_allowed(
                identity.rooms, room):
            return "not in the token's rooms"
        if self.authorize is not None:
            allowed = self.authorize(conn, room)
            if inspect.isawaitable(allowed):
                allowed = await allowed
            if not allowed:
                return "refused by the authorize hook"
        return None


def arm_expiry(conn: Connection, expires_at: float) -> None:
    """Close ``conn`` with 4001 "token expired" at ``expires_at`` (``time.time()``),
    counted in ``tokens_expired``. The connection cancels the timer when it goes."""

    def expire() -> None:
        conn.expiry_timer = None
        if conn.begin_close(TOKEN_EXPIRED, TOKEN_EXPIRED_REASON):
            conn.hub.stats.tokens_expired += 1
            log.info("closing %s: token expired", conn.id, extra={"conn_id": conn.id})
            conn.settle()

    delay = max(0.0, expires_at - time.time())
    conn.expiry_timer = asyncio.get_running_loop().call_later(delay, expire)


# -- JSON Web Tokens -----------------------------------------------------------------

_HMAC: Final = ("HS256",)
_KEY_ALGORITHMS: Final = {"RSA": "RS256", "EC": "ES256"}


def _read_file(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {str(path)!r}: {exc.strerror}") from None


def _public_key_algorithm(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"RSA public key of {key.key_size} bits: RS256 needs at least "
                             "2048")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"EC public key on {key.curve.name}: ES256 needs P-256 "
                             "(secp256r1)")
        return "ES256"
    raise ValueError(f"unsupported public key type {type(key).__name__}: give an RSA "
                     "(RS256) or P-256 EC (ES256) public key in PEM")


class JWTAuthenticator:
    """JSON Web Tokens, checked with PyJWT, as the connection's ``Identity``.

    Build one with ``from_secret`` (HS256), ``from_public_key`` (RS256 or ES256, from
    the key's type) or ``from_jwks`` (a JWKS document of RSA/EC keys picked by ``kid``).
    Only that one algorithm (per key) is accepted: ``alg: none``, HS256 signed with a
    public key (algorithm confusion) and any other algorithm are refused.

    The token is read from ``Authorization: Bearer <token>``, else the cookie
    ``cookie`` , else the query parameter ``query`` (each may be None to skip it).
    Claims: ``sub`` (the user id; required) and ``exp`` (required unless
    ``require_exp=False``) are checked with ``nbf``, ``aud`` (``audience``; then
    required) and ``iss`` (``issuer``; then required), with ``leeway`` seconds for
    clocks apart. ``info`` (a JSON object) becomes ``Identity.info`` and the claim
    ``rooms_claim`` (a list of room names or ``*`` patterns) ``Identity.rooms``.
    """

    def __init__(
        self,
        key: Any,
        algorithms: tuple[str, ...],
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        require_exp: bool = True,
        rooms_claim: str = "rooms",
        cookie: str | None = "roomcast_token",
        query: str | None = "token",
        jwks: jwt.PyJWKSet | None = None,
    ) -> None:
        if not algorithms or "none" in (a.lower() for a in algorithms):
            raise ValueError("JWTAuthenticator needs a signing algorithm; 'none' is refused")
        self._key = key
        self._jwks = jwks
        self.algorithms = algorithms
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self.rooms_claim = rooms_claim
        self.cookie = cookie
        self.query = query
        required = ["sub"]
        if require_exp:
            required.append("exp")
        if audience is not None:
            required.append("aud")
        if issuer is not None:
            required.append("iss")
        self._options: Options = {"require": required}

    @classmethod
    def from_secret(cls, secret: str | bytes, **kwargs: Any) -> JWTAuthenticator:
        """HS256 with a shared secret of at least 32 bytes."""
        key = secret.encode() if isinstance(secret, str) else bytes(secret)
        if len(key) < MIN_SECRET_BYTES:
            raise ValueError(f"the JWT secret is {len(key)} bytes; HS256 needs at least "
                             f"{MIN_SECRET_BYTES} (make one with: openssl rand -hex 32)")
        return cls(key, _HMAC, **kwargs)

    @classmethod
    def from_public_key(cls, pem: str | bytes, **kwargs: Any) -> JWTAuthenticator:
        """RS256 (an RSA key) or ES256 (a P-256 EC key) with a PEM public key."""
        data = pem.encode() if isinstance(pem, str) else pem
        try:
            key = load_pem_public_key(data)
        except ValueError:
            raise ValueError("the JWT public key is not a PEM public key (-----BEGIN "
                             "PUBLIC KEY-----); give the public half, not a certificate "
                             "or a private key") from None
        return cls(key, (_public_key_algorithm(key),), **kwargs)

    @classmethod
    def from_public_key_file(cls, path: str | Path, **kwargs: Any) -> JWTAuthenticator:
        """``from_public_key`` with the PEM read from ``path``."""
        return cls.from_public_key(_read_file(path, "JWT public key file"), **kwargs)

    @classmethod
    def from_jwks(cls, document: str | bytes | Mapping[str, Any], **kwargs: Any
                  ) -> JWTAuthenticator:
        """A JWKS (``{"keys": [...]}``) of RSA (RS256) and P-256 EC (ES256) public keys."""
        try:
            data = dict(document) if isinstance(document, Mapping) else json.loads(document)
            keyset = jwt.PyJWKSet.from_dict(data)
        except (ValueError, TypeError, jwt.PyJWKSetError, jwt.PyJWKError) as exc:
            raise ValueError(f"the JWKS is not a valid key set: {exc}") from None
        algorithms: list[str] = []
        for jwk in keyset.keys:
            expected = _KEY_ALGORITHMS.get(jwk.key_type or "")
            if expected is None or jwk.algorithm_name != expected:
                raise ValueError(
                    f"JWKS key {jwk.key_id!r} is {jwk.key_type} with {jwk.algorithm_name}: "
                    "only RSA keys (RS256) and P-256 EC keys (ES256) are accepted; "
                    "symmetric keys do not belong in a published key set")
            _public_key_algorithm(jwk.key)
            algorithms.append(expected)
        return cls(None, tuple(sorted(set(algorithms))), jwks=keyset, **kwargs)

    @classmethod
    def from_jwks_file(cls, path: str | Path, **kwargs: Any) -> JWTAuthenticator:
        """``from_jwks`` with the document read from ``path``."""
        return cls.from_jwks(_read_file(path, "JWKS file"), **kwargs)

    def token_of(self, request: web.BaseRequest) -> str | None:
        """The token the request carries, or None. AuthRefused for an Authorization
        header that is not ``Bearer <token>``."""
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, value = header.strip().partition(" ")
            value = value.strip()
            if scheme.lower() != "bearer" or not value:
                raise AuthRefused("the Authorization header must be 'Bearer <token>'")
            return value
        if self.cookie is not None:
            cookie = request.cookies.get(self.cookie)
            if cookie:
                return cookie
        if self.query is not None:
            values = request.query.getall(self.query, [])
            if len(values) > 1:
                raise AuthRefused(f"the query string has {len(values)} {self.query!r} "
                                  "parameters; send one token")
            if values and values[0]:
                return values[0]
        return None

    async def authenticate(self, request: web.Request) -> Identity | None:
        """The identity in the request's token; None without a token."""
        token = self.token_of(request)
        if token is None:
            return None
        return self.decode(token)

    def decode(self, token: str) -> Identity:
        """The identity in ``token``; AuthRefused (401) saying what is wrong with it."""
        key: Any = self._key
        algorithms = list(self.algorithms)
        try:
            if self._jwks is not None:
                header = jwt.get_unverified_header(token)
                key = self._jwk_for(header.get("kid"))
                algorithms = [key.algorithm_name]
            claims = jwt.decode(
                token, key, algorithms=algorithms, audience=self.audience,
                issuer=self.issuer, leeway=self.leeway, options=self._options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthRefused("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthRefused("token not yet valid (nbf is in the future)") from None
        except jwt.InvalidAudienceError:
            raise AuthRefused("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise AuthRefused("token issuer not accepted") from None
        except jwt.InvalidAlgorithmError:
            raise AuthRefused(
                f"token algorithm not accepted (this node takes {', '.join(algorithms)})"
            ) from None
        except jwt.InvalidSignatureError:
            raise AuthRefused("token signature invalid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthRefused(f"token lacks the {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            raise AuthRefused(f"token invalid ({type(exc).__name__})") from None
        return self._identity(claims)

    def _jwk_for(self, kid: object) -> jwt.PyJWK:
        assert self._jwks is not None
        keys = self._jwks.keys
        if kid is None:
            if len(keys) == 1:
                return keys[0]
            raise AuthRefused("token has no 'kid' header; the key set has several keys")
        for jwk in keys:
            if jwk.key_id == kid:
                return jwk
        raise AuthRefused("token 'kid' names no key of the key set")

    def _identity(self, claims: Mapping[str, Any]) -> Identity:
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub:
            raise AuthRefused("token 'sub' claim must be a non-empty string")
        info = claims.get("info", {})
        if not isinstance(info, dict):
            raise AuthRefused("token 'info' claim must be a JSON object")
        rooms: tuple[str, ...] | None = None
        if self.rooms_claim in claims:
            raw = claims[self.rooms_claim]
            if not isinstance(raw, list) or not all(isinstance(r, str) for r in raw):
                raise AuthRefused(f"token {self.rooms_claim!r} claim must be a list of room "
                                  "names or patterns")
            rooms = tuple(raw)
        exp = claims.get("exp")
        expires_at = float(exp) + self.leeway if isinstance(exp, int | float) else None
        return Identity(sub, info, rooms, expires_at)


# -- keeping tokens out of the access log ---------------------------------------------

class RedactingAccessLogger(AbstractAccessLogger):
    """aiohttp's access log line without the query string's token.

    ``method path?query status bytes time remote``, where the value of every query
    parameter named ``token`` (``JWTAuthenticator.query``'s default) is replaced by
    ``[redacted]``. Give it to ``web.run_app(access_log_class=...)``; ``roomcast serve``
    does.
    """

    REDACTED: Final = "[redacted]"
    PARAMETER: Final = "token"

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float
            ) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        self.logger.info(
            '%s "%s %s" %s %s %.6fs', request.remote, request.method,
            redact_query(request.rel_url.raw_path, request.rel_url.raw_query_string,
                         self.PARAMETER),
            response.status, response.body_length, time,
        )


def redact_query(path: str, query: str, parameter: str) -> str:
    """``path?query`` with the value of every ``parameter`` replaced by ``[redacted]``."""
    if not query:
        return path
    parts = []
    for item in query.split("&"):
        name, eq, _ = item.partition("=")
        secret = eq and unquote_plus(name) == parameter
        parts.append(f"{name}={RedactingAccessLogger.REDACTED}" if secret else item)
    return f"{path}?{'&'.join(parts)}"
