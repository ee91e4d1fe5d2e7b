"""The packages work as installed, under one import root, from any working directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_PROBE = """
import asyncio, importlib, pkgutil, sys
import roomcast.broker, roomcast.node, roomcast.shared
for package in (roomcast.shared, roomcast.broker, roomcast.node):
    for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
from aiohttp.test_utils import make_mocked_request
from roomcast.node.demo import index
page = asyncio.run(index(make_mocked_request("GET", "/")))
assert "<html" in page.text.lower(), page.text[:200]
stray = sorted(name for name in ("node", "broker", "shared") if name in sys.modules)
assert not stray, f"top-level modules imported: {stray}"
print("ok")
"""


def test_every_module_imports_from_outside_the_checkout(tmp_path: Path) -> None:
    """Run from a directory without the repository's node/, broker/, shared/ folders on
    sys.path, every roomcast module imports and the chat page is found: nothing reaches
    for a top-level ``node``, ``broker`` or ``shared`` (which a checkout would hide)."""
    result = subprocess.run(
        [sys.executable, "-I", "-c", _PROBE], cwd=tmp_path, capture_output=True, text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok"
