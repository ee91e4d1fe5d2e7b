"""The browser client, served by every node: ``/roomcast.js`` and its types.

- ``GET /roomcast.js`` and ``/roomcast.d.ts``: the files of this node's roomcast, with
  ``Cache-Control: no-cache`` and a strong ``ETag`` (a browser revalidates each time and
  gets a 304 while the file is unchanged).
- ``GET /roomcast-<version>.js`` and ``/roomcast-<version>.d.ts``, ``<version>`` this
  node's roomcast version (``VERSION``, also ``Roomcast.VERSION`` in the file): the same
  bytes, cacheable for a year (``immutable``). Another version answers 404 with a body
  naming the version this node serves: during a rolling deploy a page may ask a node of
  the other version, and a year-long cache must never hold the wrong file.

The files are read once, when ``add_static_routes`` runs. Both are public code: any
origin may load them (``Access-Control-Allow-Origin: *``, as ES module imports across
origins need).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import metadata, resources
from typing import Final

from aiohttp import web

PACKAGE: Final = "roomcast.node"
VERSION: Final = metadata.version("roomcast")
"""The version of roomcast this node runs: the versioned URLs carry it."""

YEAR: Final = 365 * 24 * 3600
NO_CACHE: Final = "no-cache"
"""Unversioned URLs: revalidate every time (a 304 while the ETag matches)."""
IMMUTABLE: Final = f"public, max-age={YEAR}, immutable"
"""Versioned URLs: the bytes behind them never change."""

_FILES: Final = {
    "roomcast.js": "application/javascript",
    "roomcast.d.ts": "application/typescript",
}
_JS_VERSION: Final = re.compile(r'const VERSION = "([^"]+)";')


@dataclass(frozen=True, slots=True)
class StaticFile:
    """One file as served: its bytes, type and entity tag."""

    name: str
    body: bytes
    content_type: str
    etag: str
    """The quoted strong ETag: a hash of the bytes."""

    @classmethod
    def load(cls, name: str) -> StaticFile:
        """The packaged file ``static/<name>``; FileNotFoundError names what is missing."""
        path = resources.files(PACKAGE).joinpath("static", name)
        try:
            body = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{PACKAGE}/static/{name} is missing: the install lacks its package data "
                f"(pyproject.toml [tool.setuptools.package-data]); reinstall roomcast"
            ) from None
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        return cls(name, body, _FILES[name], etag)


def script_version(script: bytes) -> str | None:
    """The ``Roomcast.VERSION`` a roomcast.js declares, or None."""
    match = _JS_VERSION.search(script.decode("utf-8"))
    return match.group(1) if match else None


def _matches(header: str | None, etag: str) -> bool:
    """Whether an If-None-Match value names ``etag`` (weak comparison, RFC 9110 13.1.2)."""
    if header is None:
        return False
    if header.strip() == "*":
        return True
    tags = (tag.strip().removeprefix("W/") for tag in header.split(","))
    return etag in tags


def _respond(request: web.Request, file: StaticFile, cache_control: str) -> web.Response:
    headers = {
        "ETag": file.etag,
        "Cache-Control": cache_control,
        "X-Content-Type-Options": "nosniff",
        "Access-Control-Allow-Origin": "*",
    }
    if _matches(request.headers.get("If-None-Match"), file.etag):
        return web.Response(status=304, headers=headers)
    return web.Response(body=file.body, content_type=file.content_type, charset="utf-8",
                        headers=headers)


def add_static_routes(app: web.Application, version: str = VERSION) -> None:
    """Serve roomcast.js and roomcast.d.ts from ``app``, plain and versioned."""
    for name in _FILES:
        file = StaticFile.load(name)
        stem, dot, ext = name.partition(".")
        versioned = f"{stem}-{version}{dot}{ext}"

        async def current(request: web.Request, file: StaticFile = file) -> web.Response:
            return _respond(request, file, NO_CACHE)

        async def pinned(request: web.Request, file: StaticFile = file) -> web.Response:
            return _respond(request, file, IMMUTABLE)

        async def other(request: web.Request, name: str = name,
                        versioned: str = versioned) -> web.Response:
            return web.Response(
                status=404, headers={"Cache-Control": "no-store"},
                text=f"this node serves roomcast {version}: /{versioned} (or /{name})\n")

        app.router.add_get(f"/{name}", current)
        app.router.add_get(f"/{versioned}", pinned)
        app.router.add_get(f"/{stem}-{{version}}{dot}{ext}", other)
