"""``pip install .`` ships what the nodes serve: the browser client, its types and the
chat page, byte for byte (not only the editable checkout has them)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["chat.html", "static/roomcast.js", "static/roomcast.d.ts", "py.typed"]


def test_a_regular_install_contains_the_static_files(tmp_path: Path) -> None:
    """A non-editable install of a clean copy of this checkout (no build/ or egg-info
    left by earlier installs, which setuptools would reuse) into a fresh target
    directory has roomcast/node/<file> for every file the nodes serve."""
    source, target = tmp_path / "src", tmp_path / "site"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
        "node_modules", ".hypothesis", ".compose-wheels"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-cache-dir", "--target", str(target), str(source)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    installed = target / "roomcast" / "node"
    for name in SHIPPED:
        path = installed / name
        assert path.is_file(), f"{name} is not in the installed package"
        assert path.read_bytes() == (REPO / "node" / name).read_bytes(), name
