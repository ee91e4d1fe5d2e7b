"""docker-compose.yml, the Dockerfile and scripts/haproxy.cfg stay consistent with the code.

This reads the files (tests/e2e/test_compose_live.py runs them on a real engine where the
machine can run one): every node service's command and
environment pass ``roomcast serve --check``; haproxy mounts the cfg scripts/cluster uses,
gets every variable the cfg needs, and points at every node on its port; ``haproxy -c``
accepts the cfg with the compose and the local environments; the Dockerfile's build
context holds what the package needs and its command is the package's console script;
a real redis-server run with the Redis service's arguments keeps rooms' positions across
a crash.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.e2e.compose.engine import IMAGE_EXTRAS
from tests.e2e.haproxy import HAPROXY_CFG, LB_PREFIX, haproxy_executable, lb_env
from tests.e2e.procs import REPO, free_port

COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CFG_IN_IMAGE = "/usr/local/etc/haproxy/haproxy.cfg"  # the official image's default config


# -- reading the files ------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_]\w*)")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}. Run with an empty ``env``, so the file's own defaults apply."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3) or ""
        current = env.get(name)
        if op in (":-", ":?") and not current:
            current = None
        if current is not None:
            return current
        if op in (":-", "-"):
            return arg
        raise AssertionError(f"docker-compose.yml needs ${name} set ({arg or 'no default'})")

    return _VAR.sub(replace, value)


def _interpolate_all(node: Any) -> Any:
    if isinstance(node, str):
        return interpolate(node, {})
    if isinstance(node, list):
        return [_interpolate_all(v) for v in node]
    if isinstance(node, dict):
        return {k: _interpolate_all(v) for k, v in node.items()}
    return node


def load_compose() -> dict[str, Any]:
    doc = _interpolate_all(yaml.safe_load(COMPOSE_FILE.read_text()))
    assert isinstance(doc, dict)
    return doc


COMPOSE = load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
NODE_SERVICES = sorted(name for name, svc in SERVICES.items() if "build" in svc)


def _service_by_image(prefix: str) -> str:
    found = [n for n, s in SERVICES.items() if str(s.get("image", "")).startswith(prefix)]
    assert len(found) == 1, f"one service with image {prefix}*, found {found}"
    return found[0]


def service_env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, mapping or list form, values as strings."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends in a continuation"
    result = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        result.append((instruction.upper(), args.strip()))
    return result


INSTRUCTIONS = dockerfile_instructions()


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def dockerfile_last(instruction: str) -> str | None:
    found = [args for instr, args in INSTRUCTIONS if instr == instruction]
    return found[-1] if found else None


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, args in INSTRUCTIONS:
        if instr == "ENV":
            for pair in shlex.split(args):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {args!r}: use KEY=value"
                env[key] = value
    return env


def image_command(service: dict[str, Any]) -> list[str]:
    """What the container runs: ENTRYPOINT + (the service's command, else CMD)."""
    entrypoint = dockerfile_last("ENTRYPOINT")
    assert entrypoint is not None, "the Dockerfile has an ENTRYPOINT (exec form)"
    command = service.get("command")
    if command is None:
        cmd = dockerfile_last("CMD")
        command = _exec_form(cmd) if cmd else []
    elif isinstance(command, str):
        command = shlex.split(command)
    return _exec_form(entrypoint) + list(command)


def console_script(name: str) -> list[str]:
    """argv that runs the pyproject console script ``name`` as pip would install it."""
    target = PYPROJECT["project"]["scripts"].get(name)
    assert target, f"{name!r} is not a console script of pyproject.toml"
    module, func = target.split(":")
    return [sys.executable, "-c",
            f"import sys; from {module} import {func}; sys.exit({func}())"]


def load_cluster_script() -> ModuleType:
    """scripts/cluster as a module (it has no .py suffix), without running it."""
    path = REPO / "scripts" / "cluster"
    loader = importlib.machinery.SourceFileLoader("roomcast_cluster_script", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def cfg_variables() -> tuple[set[str], set[str]]:
    """(required, optional) variables of scripts/haproxy.cfg: optional ones have a
    "${VAR-default}" or sit in an ".if defined(VAR)" block."""
    required: set[str] = set()
    optional: set[str] = set()
    guards: list[str | None] = []
    for line in HAPROXY_CFG.read_text().splitlines():
        stripped = line.split("#", 1)[0].strip()
        if stripped.startswith(".if"):
            match = re.fullmatch(r"\.if\s+defined\((\w+)\)", stripped)
            guards.append(match.group(1) if match else None)
            optional.update(m for m in [match and match.group(1)] if m)
            continue
        if stripped.startswith(".endif"):
            guards.pop()
            continue
        for name, default in re.findall(r"\$\{(\w+)(-[^}]*)?\}", stripped):
            guarded = any(g == name for g in guards)
            (optional if default or guarded else required).add(name)
    assert not guards, "unbalanced .if/.endif in haproxy.cfg"
    return required - optional, optional


def run_haproxy_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    executable = haproxy_executable()
    assert executable, "haproxy is not installed (scripts/test installs it)"
    return subprocess.run([executable, "-c", "-f", str(HAPROXY_CFG)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=30)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ROOMCAST_") and k not in ("PYTHONPATH",)}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", str(duration))
    assert match, f"duration {duration!r}"
    return float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)]


# -- node services ----------------------------------------------------------------------


def test_compose_has_redis_nodes_and_haproxy() -> None:
    assert len(NODE_SERVICES) >= 3, NODE_SERVICES
    for name in NODE_SERVICES:
        assert SERVICES[name]["build"] in (".", {"context": "."}), name
    _service_by_image("redis:")
    _service_by_image("haproxy:")


@pytest.mark.parametrize("name", NODE_SERVICES)
def test_node_service_passes_roomcast_serve_check(name: str) -> None:
    """The node's command, with the Dockerfile's and the service's environment, is a valid
    `roomcast serve` (run here with --check, which validates and exits 0)."""
    service = SERVICES[name]
    argv = image_command(service)
    assert argv[:2] == ["roomcast", "serve"], argv
    env = _clean_env(**{**dockerfile_env(), **service_env(service)})
    result = subprocess.run([*console_script(argv[0]), *argv[1:], "--check"], env=env,
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "configuration ok" in result.stderr


def test_check_sees_the_environment() -> None:
    """Control: a bad ROOMCAST_* value makes the same check fail, so the one above did read
    the service's environment."""
    service = SERVICES[NODE_SERVICES[0]]
    argv = image_command(service)
    env = _clean_env(**{**dockerfile_env(), **service_env(service), "ROOMCAST_PORT": "http"})
    result = subprocess.run([*console_script(argv[0]), *argv[1:], "--check"], env=env,
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "ROOMCAST_PORT" in result.stderr


@pytest.mark.parametrize("name", NODE_SERVICES)
def test_node_service_reaches_redis_restarts_and_drains(name: str) -> None:
    from roomcast.node.cli import _SERVE_OPTIONS

    service = SERVICES[name]
    env = {**dockerfile_env(), **service_env(service)}
    redis_service = _service_by_image("redis:")
    url = env.get("ROOMCAST_REDIS", "")
    assert re.fullmatch(rf"redis://{redis_service}:6379/\d+", url), url
    assert service["depends_on"][redis_service]["condition"] == "service_healthy"
    assert "healthcheck" in SERVICES[redis_service]
    # a node exits 1 when Redis is unreachable at start-up: it must be restarted
    assert service.get("restart") in ("on-failure", "always", "unless-stopped")
    # docker stop waits long enough for the node's notice and drain (SIGTERM → /readyz
    # 503, then 1001 to clients)
    drain = next(o.default for o in _SERVE_OPTIONS if o.flag == "--drain-seconds")
    drain = float(env.get("ROOMCAST_DRAIN_SECONDS", drain))
    notice = float(env.get("ROOMCAST_DRAIN_NOTICE_SECONDS", 0))
    assert notice > 0, "the balancer gets a notice before the node closes its clients"
    assert _seconds(service.get("stop_grace_period", "10s")) > notice + drain
    # ... and the notice covers HAProxy's time to mark the node down: one check interval,
    # then fall-1 more at fastinter
    lb_env = service_env(_haproxy_service())
    inter = _seconds(lb_env.get(LB_PREFIX + "CHECK_INTER", "1s"))
    assert notice >= inter + 0.25 * (2 - 1) + 0.5, (notice, inter)


def test_redis_service_keeps_history_in_an_fsynced_append_only_file() -> None:
    """Rooms have history by default: Redis writes an AOF fsynced on every write (the only
    setting under which a restart keeps the rooms' epochs), no RDB snapshots."""
    command = SERVICES[_service_by_image("redis:")]["command"]
    assert command[0] == "redis-server"
    assert "--save" in command and command[command.index("--save") + 1] == ""
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes"
    assert "--appendfsync" in command
    assert command[command.index("--appendfsync") + 1] == "always"


# -- haproxy service and scripts/haproxy.cfg ---------------------------------------------


def _haproxy_service() -> dict[str, Any]:
    return SERVICES[_service_by_image("haproxy:")]


def test_haproxy_mounts_the_cfg_scripts_cluster_uses() -> None:
    mounts = []
    for volume in _haproxy_service().get("volumes", []):
        source, target = (volume["source"], volume["target"]) if isinstance(volume, dict) \
            else volume.split(":")[:2]
        if target == CFG_IN_IMAGE:
            mounts.append((REPO / source).resolve())
    assert mounts == [HAPROXY_CFG.resolve()]
    assert load_cluster_script().HAPROXY_CFG.resolve() == HAPROXY_CFG.resolve()


def test_haproxy_env_gives_every_cfg_variable_and_every_node() -> None:
    env = service_env(_haproxy_service())
    required, optional = cfg_variables()
    assert required, "haproxy.cfg reads its addresses from the environment"
    assert required <= set(env), f"compose does not set {required - set(env)}"
    lb_names = {k for k in env if k.startswith(LB_PREFIX)}
    unread = lb_names - required - optional
    assert not unread, f"haproxy.cfg never reads {unread}"

    # every node service, on the port it listens on, exactly once
    listed = [v for k, v in sorted(env.items()) if re.fullmatch(rf"{LB_PREFIX}NODE\d+", k)]
    expected = []
    for name in NODE_SERVICES:
        node_env = {**dockerfile_env(), **service_env(SERVICES[name])}
        expected.append(f"{name}:{node_env.get('ROOMCAST_PORT', '8080')}")
    assert sorted(listed) == sorted(expected)
    numbers = sorted(int(k.removeprefix(LB_PREFIX + "NODE")) for k in env
                     if re.fullmatch(rf"{LB_PREFIX}NODE\d+", k))
    assert numbers == list(range(1, len(numbers) + 1)), "NODE1..N without gaps"
    cluster = load_cluster_script()
    assert len(numbers) <= cluster.max_nodes(HAPROXY_CFG.read_text())


def test_haproxy_publishes_the_port_it_binds_and_waits_for_healthy_nodes() -> None:
    service = _haproxy_service()
    env = service_env(service)
    bind_port = env[LB_PREFIX + "BIND"].rsplit(":", 1)[1]
    container_ports = [str(p).rsplit(":", 1)[-1].split("/")[0] for p in service["ports"]]
    assert bind_port in container_ports
    assert any(str(p).split(":")[-2] == "8080" for p in service["ports"]), "published on 8080"
    for name in NODE_SERVICES:
        assert service["depends_on"][name]["condition"] == "service_healthy"


def test_haproxy_stop_grace_outlasts_its_hard_stop() -> None:
    """docker stop gives HAProxy longer than the cfg's hard-stop-after, so that with
    WebSockets open it ends them itself and exits, instead of being SIGKILLed (137)."""
    match = re.search(r"^\s*hard-stop-after\s+(\S+)", HAPROXY_CFG.read_text(), re.M)
    assert match is not None
    grace = _seconds(_haproxy_service().get("stop_grace_period", "10s"))
    assert grace >= _seconds(match.group(1)) + 2


def test_redis_data_is_a_named_volume() -> None:
    """The AOF in /data (the image's VOLUME) is a named volume of the project: it survives
    a restarted or recreated container, and ``down -v`` removes it (no anonymous volume
    is left behind)."""
    service = SERVICES[_service_by_image("redis:")]
    assert "tmpfs" not in service
    mounts = [v.split(":")[:2] if isinstance(v, str) else [v["source"], v["target"]]
              for v in service["volumes"]]
    assert len(mounts) == 1 and mounts[0][1] == "/data", mounts
    assert mounts[0][0] in COMPOSE["volumes"], mounts


def test_haproxy_cfg_passes_haproxy_check_with_compose_env() -> None:
    """The compose environment; node host names only resolve inside compose (the cfg
    starts without them and resolves later), so that warning alone is expected."""
    env = _clean_env(**service_env(_haproxy_service()))
    result = run_haproxy_check(env)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "[WARNING]" in line]
    assert all("could not resolve address" in w for w in warnings), warnings


@pytest.mark.parametrize("nodes", [1, 3, "max"])
def test_haproxy_cfg_passes_haproxy_check_with_local_env(nodes: int | str) -> None:
    """The environment scripts/cluster and tests/e2e/haproxy.py give: loopback addresses."""
    count = load_cluster_script().max_nodes(HAPROXY_CFG.read_text()) if nodes == "max" \
        else int(nodes)
    env = lb_env(f"127.0.0.1:{free_port()}", [f"127.0.0.1:{free_port()}"] * count,
                 check_inter="200ms", stats=f"127.0.0.1:{free_port()}")
    result = run_haproxy_check(env)
    assert result.returncode == 0, result.stderr
    assert "[WARNING]" not in result.stderr and "[ALERT]" not in result.stderr, result.stderr


def test_haproxy_cfg_without_its_variables_is_refused() -> None:
    """Control: without ROOMCAST_LB_NODE1 the cfg does not pass, so the checks above mean
    something."""
    env = {k: v for k, v in lb_env("127.0.0.1:1", []).items()}
    result = run_haproxy_check(env)
    assert result.returncode != 0


def test_haproxy_cfg_is_websocket_friendly() -> None:
    text = HAPROXY_CFG.read_text()
    assert re.search(r"^\s*timeout tunnel\s+(\d+h|\d{4,}s)", text, re.M)
    assert re.search(r"^\s*timeout client-fin\s", text, re.M)
    assert re.search(r"^\s*timeout server-fin\s", text, re.M)
    assert re.search(r"^\s*balance\s+(leastconn|roundrobin)", text, re.M)
    assert re.search(r"^\s*http-check send .*uri /readyz", text, re.M)
    assert not re.search(r"^\s*(cookie|stick)\b", text, re.M), "no sticky sessions"


# -- Dockerfile -------------------------------------------------------------------------


def test_dockerfile_base_user_healthcheck_and_command() -> None:
    assert dockerfile_last("FROM") == "python:3.11-slim"
    requires = PYPROJECT["project"]["requires-python"]
    assert requires == ">=3.11"
    user = dockerfile_last("USER")
    assert user and user.split(":")[0] not in ("root", "0"), "runs as a non-root user"
    healthcheck = dockerfile_last("HEALTHCHECK")
    assert healthcheck and "/healthz" in healthcheck
    env = dockerfile_env()
    assert dockerfile_last("EXPOSE") == env.get("ROOMCAST_PORT", "8080")
    entry = _exec_form(dockerfile_last("ENTRYPOINT") or "[]")
    assert entry and entry[0] in PYPROJECT["project"]["scripts"]
    # the healthcheck's python snippet at least parses
    command = _exec_form(healthcheck.split("CMD", 1)[1].strip())
    assert command[:2] == ["python", "-c"]
    compile(command[2], "HEALTHCHECK", "exec")


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rules, near enough: a path (or a parent of it) matching the
    last matching pattern is left out; '!' re-includes; ** spans directories."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        regex = re.escape(body.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def _expand(word: str, args: dict[str, str]) -> str:
    """The Dockerfile's ${NAME}, ${NAME:-default} in a COPY source, with ``args``."""

    def replace(match: re.Match[str]) -> str:
        value = args.get(match.group(1), "")
        return value or (match.group(3) or "") if match.group(2) == ":-" else value

    return re.sub(r"\$\{(\w+)(?:(:-)([^}]*))?\}", replace, word)


def _pip_install_targets(run: str) -> list[tuple[str, frozenset[str]]]:
    """What every ``pip install`` in a RUN installs: (local path, extras) per target, as
    the shell passes it (quotes removed, option values left out):
    ``'/tmp/roomcast[uvloop]'`` is ("/tmp/roomcast", {"uvloop"})."""
    targets = []
    for segment in re.findall(r"\bpip install\b([^;&|]*)", run):
        words = shlex.split(segment)
        skip = False
        for word in words:
            if skip:
                skip = False
            elif word in ("--find-links", "-f", "--index-url", "-i"):
                skip = True
            elif not word.startswith("-"):
                found = re.fullmatch(r"([^\[\]]+)(?:\[([^\]]*)\])?", word)
                assert found, f"pip install target {word!r}"
                extras = frozenset(e.strip() for e in (found.group(2) or "").split(",")
                                   if e.strip())
                targets.append((found.group(1), extras))
    return targets


def build_context_image(root: Path, build_args: dict[str, str] | None = None) -> Path:
    """Replay the Dockerfile's COPY steps from the build context (.dockerignore applied)
    into ``root``, with ``build_args`` (none: a user's default build); the directory its
    `pip install` installs from."""
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    args: dict[str, str] = {}
    workdir = PurePosixPath("/")
    install_dir: PurePosixPath | None = None
    for instr, text in INSTRUCTIONS:
        if instr == "ARG":
            name, _, default = text.partition("=")
            args[name] = (build_args or {}).get(name, default)
        elif instr == "WORKDIR":
            workdir = workdir / text
        elif instr == "COPY":
            words = shlex.split(text)
            assert not any(w.startswith("--from") for w in words), "single-stage COPY"
            *sources, dest = [_expand(w, args) for w in words if not w.startswith("--")]
            target = workdir / dest
            for source in sources:
                src = REPO / source
                assert src.exists(), f"COPY {source}: not in the repository"
                assert not _ignored(source, patterns), f"COPY {source}: .dockerignore drops it"
                if src.is_dir():
                    for file in src.rglob("*"):
                        rel = file.relative_to(REPO).as_posix()
                        if file.is_file() and not _ignored(rel, patterns):
                            out = root / str(target).lstrip("/") / file.relative_to(src)
                            out.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy(file, out)
                else:
                    into_dir = dest.endswith("/") or len(sources) > 1
                    out = root / str(target).lstrip("/")
                    out = out / src.name if into_dir else out
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(src, out)
        elif instr == "RUN" and re.search(r"\bpip install\b", text):
            paths = {path for path, _ in _pip_install_targets(text)}
            assert len(paths) == 1, f"RUN pip install of one local directory: {text}"
            install_dir = workdir / paths.pop()
    assert install_dir is not None, "the Dockerfile pip-installs the package"
    return root / str(install_dir).lstrip("/")


def test_dockerfile_default_build_installs_from_the_index_and_wheels_only_when_asked() -> None:
    """Users' builds are unchanged: without ROOMCAST_WHEELS, pip installs the package from
    the index; with it, only from the wheels folder (no index), which .dockerignore keeps
    in the build context."""
    assert ("ARG", "ROOMCAST_WHEELS=") in INSTRUCTIONS
    run = next(text for instr, text in INSTRUCTIONS if instr == "RUN" and "pip install" in text)
    offline, default = run.split("else", 1)
    assert '[ -n "$ROOMCAST_WHEELS" ]' in offline
    assert "--no-index --find-links /tmp/wheels" in offline
    assert "--no-index" not in default and "--find-links" not in default, default
    assert _pip_install_targets(default) == [("/tmp/roomcast", frozenset({"uvloop"}))], default
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    assert not _ignored(".compose-wheels/x.whl", patterns)


def test_dockerfile_installs_the_uvloop_extra_online_and_offline() -> None:
    """The image runs on the faster loop: both builds (package index, and the offline
    wheels of the compose smoke test) install roomcast[uvloop], quoted so that the shell
    cannot take the brackets for a glob; the extra exists and requires uvloop; the offline
    wheel set (tests/e2e/compose/engine.py) holds the wheels of exactly those extras."""
    run = next(text for instr, text in INSTRUCTIONS if instr == "RUN" and "pip install" in text)
    targets = _pip_install_targets(run)
    assert len(targets) == 2, targets
    assert all(extras == {"uvloop"} for _, extras in targets), targets
    assert not re.search(r"(?<=\s)[^'\"\s]+\[", run), f"unquoted extras in: {run}"
    assert set(IMAGE_EXTRAS) == {"uvloop"}
    requirements = PYPROJECT["project"]["optional-dependencies"]["uvloop"]
    assert any(re.match(r"uvloop\b", req) for req in requirements), requirements


def test_dockerfile_build_context_has_what_the_package_needs(tmp_path: Path) -> None:
    project = build_context_image(tmp_path)
    assert (project / "pyproject.toml").read_text() == (REPO / "pyproject.toml").read_text()
    assert (project / PYPROJECT["project"]["readme"]).is_file()
    setuptools_cfg = PYPROJECT["tool"]["setuptools"]
    folders = setuptools_cfg["package-dir"]
    for package in setuptools_cfg["packages"]:
        folder = folders[package]
        assert (project / folder / "__init__.py").is_file(), package
        for source in (REPO / folder).glob("*.py"):
            assert (project / folder / source.name).is_file(), source
    for package, files in setuptools_cfg.get("package-data", {}).items():
        for name in files:
            # a glob (static/*) must match at least one file, as setuptools reads it
            found = [p for p in (project / folders[package]).glob(name) if p.is_file()]
            expected = [p for p in (REPO / folders[package]).glob(name) if p.is_file()]
            assert found and len(found) == len(expected), f"{package}/{name}"
    assert not list(project.rglob("__pycache__"))


def test_dockerfile_build_context_packages_the_command_and_the_page(tmp_path: Path) -> None:
    """setuptools, run on exactly what the Dockerfile copies (offline, as pip's build step
    would): the console script and the chat page are in the package."""
    pytest.importorskip("setuptools")
    project = build_context_image(tmp_path / "image")
    lib, meta = tmp_path / "lib", tmp_path / "meta"
    meta.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", "import setuptools; setuptools.setup()",
         "egg_info", "--egg-base", str(meta), "build_py", "--build-lib", str(lib)],
        cwd=project, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (lib / "roomcast" / "node" / "chat.html").is_file()
    assert (lib / "roomcast" / "node" / "static" / "roomcast.js").is_file()
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        assert (lib / package.replace(".", "/") / "__init__.py").is_file(), package
    entry_points = (meta / "roomcast.egg-info" / "entry_points.txt").read_text()
    assert re.search(r"^roomcast\s*=\s*roomcast\.node\.cli:main$", entry_points, re.M), (
        entry_points)


def test_installed_package_serves_the_chat_page_from_any_directory(tmp_path: Path) -> None:
    """The image runs roomcast from /home/roomcast, not from a checkout: the page is read
    from the installed roomcast.node package (it once asked for a top-level ``node``
    package, which only a checkout's working directory has: GET / failed with 500)."""
    script = (
        "import asyncio\n"
        "from aiohttp.test_utils import TestClient, TestServer\n"
        "from roomcast.node.app import create_app\n"
        "async def main() -> None:\n"
        "    async with TestClient(TestServer(create_app())) as client:\n"
        "        resp = await client.get('/')\n"
        "        assert resp.status == 200, resp.status\n"
        "        assert 'roomcast chat' in await resp.text()\n"
        "asyncio.run(main())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


async def test_redis_service_settings_keep_positions_across_a_crash() -> None:
    """A real redis-server run with the compose file's Redis arguments: after a SIGKILL and
    a restart on the same data, a room's positions go on in the same epoch (the settings
    are the durable ones, README "Delivery guarantees")."""
    from roomcast.broker import Publisher
    from roomcast.shared.history import History, HistoryPolicy
    from tests.redis_server import RedisServer

    command = SERVICES[_service_by_image("redis:")]["command"]
    policy = HistoryPolicy(History(10, 60))
    with RedisServer(extra_args=tuple(command[1:])) as server:
        with server.client() as client:
            assert client.config_get("appendfsync") == {"appendfsync": "always"}
        async with Publisher(server.url, prefix="compose", history=policy) as pub:
            first = await pub.publish_to_room("lobby", "before the crash")
        server.kill()
        server.start()
        async with Publisher(server.url, prefix="compose", history=policy) as pub:
            second = await pub.publish_to_room("lobby", "after the crash")
            page = await pub.room_history("lobby", since=0)
    assert first is not None and second is not None
    assert (second.epoch, second.offset) == (first.epoch, first.offset + 1)
    assert [e.payload for e in page.envelopes] == [b"before the crash", b"after the crash"]
