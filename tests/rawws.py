"""A deliberately minimal raw-socket WebSocket client, for sending what real clients won't."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os

from roomcast.shared.frames import Frame, parse_frame
from roomcast.shared.handshake import accept_key


class RawClient:
    """Speaks bytes: a hand-written handshake, then frames built by the test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buffer = bytearray()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""

    @classmethod
    async def connect(
        cls, host: str, port: int, path: str = "/echo", extra: dict[str, str] | None = None,
        *, version: str = "13", early: bytes = b"",
    ) -> RawClient:
        """Open a TCP connection and send an upgrade request; read the response head."""
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket",
            "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
            f"Sec-WebSocket-Version: {version}",
        ]
        lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + early)
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode().split("\r\n")
        client.status = int(status_line.split()[1])
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                client.headers[name.strip().lower()] = value.strip()
        if client.status == 101:
            assert client.headers["sec-websocket-accept"] == accept_key(key)
        return client

    def send(self, data: bytes) -> None:
        """Write raw bytes."""
        self.writer.write(data)

    async def recv_frame(self, timeout: float = 5.0) -> Frame | None:
        """The next server frame, or None when the server closed the socket."""
        async with asyncio.timeout(timeout):
            while True:
                parsed = parse_frame(self.buffer, expect_masked=False, allow_rsv1=True)
                if parsed is not None:
                    frame, used = parsed
                    del self.buffer[:used]
                    return frame
                chunk = await self.reader.read(65536)
                if not chunk:
                    return None
                self.buffer += chunk

    async def close(self) -> None:
        """Close the socket."""
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
