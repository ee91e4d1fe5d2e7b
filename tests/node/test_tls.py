"""A hub inside an aiohttp app served over TLS: the hub takes the TLS transport over
after the handshake as it does a plain one, and messages cross it both ways."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from roomcast.node import Connection, EventHandler, Hub, Message

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made by the openssl command."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@pytest.fixture
async def tls_url(certificate: tuple[Path, Path]) -> AsyncIterator[str]:
    cert, key = certificate

    async def echo(conn: Connection, msg: Message) -> None:
        await conn.send(msg.data)

    hub = Hub()
    app = web.Application()
    hub.attach(app)
    app.router.add_get("/ws", hub.route(EventHandler(on_message=echo)))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        port = runner.addresses[0][1]
        yield f"https://127.0.0.1:{port}/ws"
    finally:
        await runner.cleanup()


async def test_messages_cross_a_tls_connection_both_ways(
    tls_url: str, certificate: tuple[Path, Path]
) -> None:
    """Text (one over 64 KB) and binary cross a TLS socket the hub took over, both ways,
    on asyncio's TLS transport and on uvloop's."""
    client_context = ssl.create_default_context(cafile=str(certificate[0]))
    async with asyncio.timeout(20), aiohttp.ClientSession() as http, http.ws_connect(
        tls_url, ssl=client_context
    ) as ws:
        for text in ("over tls", "x" * 70_000):
            await ws.send_str(text[:65_536])
            assert (await ws.receive_str()) == text[:65_536]
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive_bytes()) == b"\x00\x01"
        await ws.close()
        assert ws.close_code == 1000
