"""Every node serves the browser client (/roomcast.js, /roomcast.d.ts) with caching
headers: revalidated by ETag at the plain URL, a year at the versioned one."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import aiohttp
import pytest

from roomcast.node.app import create_app
from roomcast.node.static_routes import IMMUTABLE, VERSION, StaticFile, script_version
from tests.conftest import Serve

REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "node" / "static"
TIMEOUT = aiohttp.ClientTimeout(total=10)


def test_one_version_everywhere() -> None:
    """The version in the URL, in roomcast.js (Roomcast.VERSION) and in the package's
    metadata are pyproject.toml's."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert VERSION == metadata.version("roomcast") == project["version"]
    assert script_version((STATIC / "roomcast.js").read_bytes()) == VERSION
    assert f"roomcast.js {VERSION}, " in (STATIC / "roomcast.d.ts").read_text().splitlines()[0]


@pytest.mark.parametrize(("name", "content_type"), [
    ("roomcast.js", "application/javascript"),
    ("roomcast.d.ts", "application/typescript"),
])
async def test_plain_url_revalidates_by_etag(serve: Serve, name: str, content_type: str) -> None:
    """GET /<name>: the packaged bytes, no-cache with a strong ETag; If-None-Match with
    it (also weak, in a list, or *) answers 304 without a body; another tag gets 200."""
    base = await serve(create_app())
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async with session.get(f"{base}/{name}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == f"{content_type}; charset=utf-8"
            assert resp.headers["Cache-Control"] == "no-cache"
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            etag = resp.headers["ETag"]
            assert etag.startswith('"') and etag.endswith('"') and len(etag) > 10
            assert await resp.read() == (STATIC / name).read_bytes()
        for header in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
            async with session.get(f"{base}/{name}", headers={"If-None-Match": header}) as resp:
                assert resp.status == 304, header
                assert resp.headers["ETag"] == etag
                assert resp.headers["Cache-Control"] == "no-cache"
                assert await resp.read() == b""
        async with session.get(f"{base}/{name}", headers={"If-None-Match": '"other"'}) as resp:
            assert resp.status == 200
            assert await resp.read() == (STATIC / name).read_bytes()
        async with session.head(f"{base}/{name}") as resp:
            assert resp.status == 200
            assert resp.headers["ETag"] == etag


@pytest.mark.parametrize("name", ["roomcast.js", "roomcast.d.ts"])
async def test_versioned_url_is_cacheable_for_a_year(serve: Serve, name: str) -> None:
    """GET /roomcast-<version>.js: the same bytes and ETag, public for a year, immutable."""
    base = await serve(create_app())
    stem, _, ext = name.partition(".")
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async with session.get(f"{base}/{name}") as resp:
            etag = resp.headers["ETag"]
        async with session.get(f"{base}/{stem}-{VERSION}.{ext}") as resp:
            assert resp.status == 200
            assert resp.headers["Cache-Control"] == IMMUTABLE
            assert "max-age=31536000" in IMMUTABLE
            assert resp.headers["ETag"] == etag
            assert await resp.read() == (STATIC / name).read_bytes()
        async with session.get(f"{base}/{stem}-{VERSION}.{ext}",
                               headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304
            assert resp.headers["Cache-Control"] == IMMUTABLE


@pytest.mark.parametrize("path", ["/roomcast-0.0.1.js", "/roomcast-9.9.9.d.ts",
                                  "/roomcast-latest.js"])
async def test_another_version_is_404_naming_this_one(serve: Serve, path: str) -> None:
    """A version this node does not run (a rolling deploy's other half): 404, not cached,
    the body names the version served and its URL."""
    base = await serve(create_app())
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, \
            session.get(base + path) as resp:
        assert resp.status == 404
        assert resp.headers["Cache-Control"] == "no-store"
        text = await resp.text()
        assert f"this node serves roomcast {VERSION}" in text
        assert f"-{VERSION}." in text


def test_the_etag_follows_the_bytes() -> None:
    """Two loads of one file agree; the tag is a hash of the bytes, not a timestamp."""
    first, second = StaticFile.load("roomcast.js"), StaticFile.load("roomcast.js")
    assert first.etag == second.etag
    assert first.body == (STATIC / "roomcast.js").read_bytes()
    assert StaticFile.load("roomcast.d.ts").etag != first.etag


def test_script_version_reads_the_constant() -> None:
    assert script_version(b'  const VERSION = "1.2.3";\n') == "1.2.3"
    assert script_version(b"no version here") is None
