"""`roomcast serve` with JSON Web Tokens and limits: a real process, real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
import websockets

from tests.e2e.procs import REPO, NodeProcess

SECRET = "e2e-secret-0123456789abcdef0123456789"


def token(**claims: object) -> str:
    body = {"sub": "u1", "aud": "chat", "exp": int(time.time()) + 300,
            "info": {"name": "Ann"}, "rooms": ["lobby", "team-*"], **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


async def refused(url: str, **kwargs: object) -> int:
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(url, **kwargs):  # type: ignore[arg-type]
            pass
    return info.value.response.status_code


async def test_serve_with_jwt_secret_and_limits() -> None:
    """--jwt-secret (from its variable), --require-auth, --jwt-audience: 401 without or
    with a bad token, 403 outside the token's rooms, the chat name from the token; the
    rate limit closes a flood with 1008; tokens never reach the log."""
    good = token()
    with NodeProcess("--require-auth", "--jwt-audience", "chat",
                     "--max-messages-per-second", "20", "--handshake-timeout", "2",
                     env={"ROOMCAST_JWT_SECRET": SECRET}) as node:
        async with asyncio.timeout(60):
            assert await refused(node.ws_url + "/chat?room=lobby") == 401
            bad = token(aud="other")
            assert await refused(node.ws_url + f"/chat?room=lobby&token={bad}") == 401
            assert await refused(node.ws_url + f"/chat?room=admin&token={good}") == 403
            assert await refused(node.ws_url + f"/chat?room=%61dmin&token={good}") == 403
            url = node.ws_url + "/chat?room=lobby&name=Mallory"
            async with websockets.connect(
                    url, additional_headers={"Authorization": f"Bearer {good}"}) as ws:
                notice = json.loads(await ws.recv())
                assert notice == {"type": "join", "name": "Ann", "members": 1}
                got = 0
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    for i in range(200):  # 10x the limit, at once
                        await ws.send(f"m{i}")
                    while True:
                        await ws.recv()
                        got += 1
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 1008
                assert got <= 20
            # A socket that never finishes its request is closed after 2 s.
            reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
            writer.write(b"GET /chat HTTP/1.1\r\n")
            assert await reader.read() == b""
            writer.close()
        code = await asyncio.to_thread(node.terminate)
        log = node.log()
    assert code == 0, log
    assert "token=[redacted]" in log
    for secret in (good, bad, SECRET):
        for part in secret.split("."):
            assert part not in log


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--jwt-secret", "short"], {}, "--jwt-secret"),
        (["--require-auth"], {}, "--require-auth needs --jwt-secret"),
        (["--jwt-audience", "x"], {}, "--jwt-audience needs"),
        (["--burst", "5"], {}, "--burst needs"),
        (["--jwt-public-key", "/nonexistent.pem"], {}, "--jwt-public-key"),
        ([], {"ROOMCAST_JWT_JWKS": "/nonexistent.json"}, "ROOMCAST_JWT_JWKS"),
        (["--jwt-secret", SECRET, "--jwt-jwks", __file__], {}, "give only one"),
        (["--jwt-jwks", __file__], {}, "--jwt-jwks: the JWKS is not a valid key set"),
        (["--handshake-timeout", "-1"], {}, "--handshake-timeout"),
        (["--max-messages-per-second", "0"], {}, "--max-messages-per-second"),
        (["--max-connects-per-address", "x"], {}, "--max-connects-per-address"),
    ],
)
def test_bad_auth_and_limit_settings_exit_2(args: list[str], env: dict[str, str],
                                            named: str) -> None:
    """Each bad value or combination exits 2 naming the setting."""
    result = subprocess.run(
        [sys.executable, "-m", "roomcast.node.cli", "serve", "--check", *args], cwd=REPO,
        env={**os.environ, **env}, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert named in result.stderr


def test_public_key_and_jwks_files_configure(tmp_path: Path) -> None:
    """--jwt-public-key with an RSA PEM and --jwt-jwks with an EC key set: --check 0."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    pem = tmp_path / "key.pem"
    pem.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048)
                    .public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo))
    jwks = tmp_path / "keys.json"
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(
        ec.generate_private_key(ec.SECP256R1()).public_key()))
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "ES256"}]}))
    for args in (["--jwt-public-key", str(pem)], ["--jwt-jwks", str(jwks), "--require-auth",
                                                  "--jwt-issuer", "me"]):
        result = subprocess.run(
            [sys.executable, "-m", "roomcast.node.cli", "serve", "--check", *args], cwd=REPO,
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 0, result.stderr
