"""A Docker engine for the compose smoke test, and the stand-in images it needs.

``Engine.acquire()`` uses a Docker daemon that already answers, or starts ``dockerd``
itself (as root) with no iptables rules, no docker0 bridge and no change to IP
forwarding, so that the only network changes are the compose projects' own bridges,
which ``down`` removes. ``Engine.release()`` stops a daemon it started by its PID and
puts back whatever network state differs from the snapshot taken before it started
(links, nftables tables, forwarding sysctls), then checks that nothing differs.

No image registry is reachable here, so the images the compose files name are built
locally when they are missing: Debian bookworm (``debootstrap --variant=minbase``,
``docker import``) with Debian's python3, redis-server and haproxy, and one small
Dockerfile per image in ``standins/`` tagged with the exact name the compose files use.
Stand-ins carry the label ``org.roomcast.standin`` with a hash of their sources; they are
kept between runs (the cache) and rebuilt when the sources change. An image of that name
that is not a stand-in (a real one, pulled by the user) is used as it is.

The roomcast image is built without network inside containers: wheels of every
dependency (those of the extras the image installs, uvloop, included) are downloaded on
the host for the image's Python, into a folder of the build context that the
Dockerfile's ``ROOMCAST_WHEELS`` argument names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.redis_server import free_port

REPO = Path(__file__).resolve().parents[3]
STANDINS = Path(__file__).resolve().with_name("standins")
BASE_IMAGE = "roomcast-standin/bookworm"
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-pip", "python-is-python3", "redis-server", "redis-tools",
                 "haproxy", "ca-certificates")
STANDIN_DOCKERFILES = {
    "python:3.11-slim": "python.Dockerfile",
    "redis:7.0": "redis.Dockerfile",
    "haproxy:2.6": "haproxy.Dockerfile",
}
"""Image name the compose files use -> its stand-in's Dockerfile in standins/."""
LABEL = "org.roomcast.standin"
WHEELS_DIR = ".compose-wheels"
"""Folder of the build context (git-ignored) that the offline image build installs from."""
IMAGE_EXTRAS = ("uvloop",)
"""The extras of roomcast the Dockerfile installs (``roomcast[uvloop]``): their wheels are
in the offline set too. tests/e2e/test_compose.py checks this against the Dockerfile."""
DEBIAN_PACKAGES = ("docker.io", "docker-compose", "debootstrap")
"""What scripts/test installs for this test where apt-get exists."""

Log = Callable[[str], None]


class Unavailable(Exception):
    """This machine cannot run the smoke test; the message says why (the skip reason)."""


def run(argv: Sequence[str], *, timeout: float, env: dict[str, str] | None = None,
        check: bool = True, cwd: Path | None = None,
        stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command to completion within ``timeout``; raise with its output on failure."""
    result = subprocess.run(list(argv), capture_output=True, timeout=timeout, env=env,
                            cwd=cwd, input=stdin.decode() if stdin is not None else None,
                            text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}:\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _sources_hash(*extra: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(STANDINS.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for item in extra:
        digest.update(item.encode() + b"\0")
    return digest.hexdigest()[:16]


# -- network state ----------------------------------------------------------------------


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


_FORWARDING = ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")


@dataclass(frozen=True)
class NetworkState:
    """What a Docker daemon may change on the host's network."""

    links: frozenset[str]
    nft_tables: frozenset[str]
    sysctls: dict[str, str] = field(hash=False)

    @classmethod
    def read(cls) -> NetworkState:
        links = frozenset(os.listdir("/sys/class/net"))
        tables: frozenset[str] = frozenset()
        if shutil.which("nft"):
            listing = run(["nft", "list", "tables"], timeout=10, check=False).stdout
            tables = frozenset(line.removeprefix("table ").strip()
                               for line in listing.splitlines() if line.startswith("table "))
        sysctls = {name: _sysctl_path(name).read_text().strip() for name in _FORWARDING
                   if _sysctl_path(name).exists()}
        return cls(links, tables, sysctls)

    def restore(self, log: Log) -> NetworkState:
        """Undo what differs from this snapshot; the state afterwards."""
        now = NetworkState.read()
        for link in sorted(now.links - self.links):
            log(f"removing network link {link} left behind")
            run(["ip", "link", "delete", link], timeout=10, check=False)
        for table in sorted(now.nft_tables - self.nft_tables):
            log(f"removing nftables table {table} left behind")
            run(["nft", "delete", "table", *table.split()], timeout=10, check=False)
        for name, value in self.sysctls.items():
            if now.sysctls.get(name) != value:
                log(f"restoring {name} = {value}")
                _sysctl_path(name).write_text(value + "\n")
        return NetworkState.read()


# -- the engine -------------------------------------------------------------------------


def _docker_cli() -> str | None:
    """The docker client that comes with Debian's dockerd when there is one (another, e.g.
    a newer client in /usr/local/bin, may be first on PATH), else the one on PATH."""
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def compose_command(docker: str) -> list[str] | None:
    """Compose v1 (``docker-compose``, what Debian ships) if installed, else v2 (``docker
    compose``); ROOMCAST_COMPOSE overrides, e.g. "docker compose"."""
    chosen = os.environ.get("ROOMCAST_COMPOSE")
    if chosen:
        return chosen.split()
    v1 = shutil.which("docker-compose")
    if v1:
        return [v1]
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    return [docker, "compose"] if probe.returncode == 0 else None


class Engine:
    """A Docker daemon to run the demo on: found running, or started (and stopped) here."""

    def __init__(self, docker: str, compose: list[str], log: Log) -> None:
        self.docker = docker
        self.compose = compose
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.before: NetworkState | None = None
        self._tmp = Path(tempfile.mkdtemp(prefix="roomcast-compose-"))
        self._created_run_dirs: list[Path] = []
        self.timings: dict[str, float] = {}
        self.leftovers: list[str] = []
        """What differs on the host's network after release (empty: as it was)."""

    # -- acquire / release ---------------------------------------------------------

    @classmethod
    def acquire(cls, log: Log) -> Engine:
        """An engine that answers, or Unavailable with the reason."""
        if os.environ.get("ROOMCAST_SKIP_COMPOSE"):
            raise Unavailable("ROOMCAST_SKIP_COMPOSE is set")
        if not sys.platform.startswith("linux"):
            raise Unavailable(f"needs Linux to start a Docker engine (this is {sys.platform})")
        docker = _docker_cli()
        if docker is None:
            raise Unavailable("no docker client (scripts/test installs Debian's docker.io "
                              "where apt-get exists)")
        compose = compose_command(docker)
        if compose is None:
            raise Unavailable("neither docker-compose (v1) nor the docker compose plugin (v2) "
                              "is installed (scripts/test installs Debian's docker-compose)")
        engine = cls(docker, compose, log)
        if engine._answers():
            log("using the Docker engine that is already running")
            return engine
        try:
            engine._start_daemon()
        except BaseException:
            engine.release()
            raise
        return engine

    def _answers(self) -> bool:
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            return run([self.docker, "info"], timeout=20, check=False).returncode == 0
        return False

    def _start_daemon(self) -> None:
        dockerd = shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin:/sbin")
        if dockerd is None:
            raise Unavailable("no Docker engine answers and dockerd is not installed")
        if os.geteuid() != 0:
            raise Unavailable("no Docker engine answers and starting dockerd needs root")
        for path in (Path("/run/docker"), Path("/run/containerd"),
                     Path("/var/run/docker.sock")):
            if not path.exists():
                self._created_run_dirs.append(path)
        self.before = NetworkState.read()
        started = time.monotonic()
        log_path = self._tmp / "dockerd.log"
        with open(log_path, "wb") as out:
            # No iptables rules, no docker0 bridge, no forwarding: the demo's containers
            # only talk to each other on their compose network, and its published ports
            # are served by docker-proxy on loopback.
            self.proc = subprocess.Popen(
                [dockerd, "--pidfile", str(self._tmp / "dockerd.pid"), "--iptables=false",
                 "--ip-forward=false", "--ip-masq=false", "--bridge=none"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise Unavailable(f"dockerd did not come up on this machine:\n{tail}")
            time.sleep(0.1)
        self.timings["dockerd_start_s"] = time.monotonic() - started
        self.log(f"started dockerd (pid {self.proc.pid}) in "
                 f"{self.timings['dockerd_start_s']:.1f} s")

    def release(self) -> None:
        """Stop the daemon started here (by its PID) and put the network back."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                self.log(f"dockerd (pid {proc.pid}) did not stop in 40 s: SIGKILL")
                proc.kill()
                proc.wait(10)
        self.proc = None
        if self.before is not None:
            after = self.before.restore(self.log)
            self.leftovers = _difference(self.before, after)
            mounted = Path("/proc/mounts").read_text()
            for path in self._created_run_dirs:
                if str(path) not in mounted:
                    with contextlib.suppress(OSError):
                        shutil.rmtree(path) if path.is_dir() else path.unlink()
        shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def started_here(self) -> bool:
        return self.before is not None

    # -- images ---------------------------------------------------------------------

    def image_labels(self, name: str) -> dict[str, str] | None:
        """The labels of a local image, or None if there is no such image."""
        result = run([self.docker, "image", "inspect", "--format",
                      "{{json .Config.Labels}}", name], timeout=30, check=False)
        if result.returncode != 0:
            return None
        return json.loads(result.stdout.strip() or "null") or {}

    def ensure_standins(self) -> dict[str, str]:
        """Each image the compose files name: "real" (not ours, used as it is), "cached"
        (our stand-in, up to date) or "built" (built now)."""
        started = time.monotonic()
        outcome: dict[str, str] = {}
        base_hash = hashlib.sha256(" ".join((BASE_SUITE, *BASE_PACKAGES)).encode()).hexdigest()
        base_tag = f"{BASE_IMAGE}:{base_hash[:16]}"
        want = _sources_hash(base_hash)
        for name, dockerfile in STANDIN_DOCKERFILES.items():
            labels = self.image_labels(name)
            if labels is not None and LABEL not in labels:
                outcome[name] = "real"
                continue
            if labels is not None and labels.get(LABEL) == want:
                outcome[name] = "cached"
                continue
            if self.image_labels(base_tag) is None:
                self._build_base(base_tag)
            run([self.docker, "tag", base_tag, BASE_IMAGE], timeout=30)
            run([self.docker, "build", "--quiet", "--label", f"{LABEL}={want}", "-f",
                 str(STANDINS / dockerfile), "-t", name, str(STANDINS)],
                timeout=300, env=self.build_env())
            outcome[name] = "built"
        self.timings["standins_s"] = time.monotonic() - started
        return outcome

    def _build_base(self, tag: str) -> None:
        debootstrap = shutil.which("debootstrap") or shutil.which(
            "debootstrap", path="/usr/sbin:/sbin")
        if debootstrap is None:
            raise Unavailable(f"no image {tag} and debootstrap is not installed to build it "
                              "(scripts/test installs it where apt-get exists)")
        root = self._tmp / "rootfs"
        started = time.monotonic()
        self.log(f"debootstrap {BASE_SUITE} into {root} (once; the image is cached)")
        run([debootstrap, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
             BASE_SUITE, str(root)], timeout=900)
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(
                [self.docker, "import", "--change", 'CMD ["bash"]', "-", tag],
                stdin=tar.stdout, capture_output=True, timeout=300, text=True)
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            tar.wait(60)
        if imported.returncode != 0:
            raise RuntimeError(f"docker import failed: {imported.stderr}")
        shutil.rmtree(root, ignore_errors=True)
        self.timings["debootstrap_s"] = time.monotonic() - started

    def build_env(self) -> dict[str, str]:
        """Builds through the engine API with the classic builder: neither buildx nor the
        CLI first on PATH matters."""
        return {**os.environ, "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"}

    # -- wheels for the offline roomcast build -----------------------------------------

    def prepare_wheels(self, python_image: str = "python:3.11-slim") -> Path:
        """Wheels of roomcast's dependencies, those of the extras the image installs
        (IMAGE_EXTRAS) and setuptools, for ``python_image``'s Python, in
        REPO/.compose-wheels, complete by that image's own pip (asked with no network,
        round by round, what it still misses)."""
        started = time.monotonic()
        wheels = REPO / WHEELS_DIR
        wheels.mkdir(exist_ok=True)
        target = json.loads(run(
            [self.docker, "run", "--rm", "--network", "none", python_image, "python", "-c",
             "import json, sys, sysconfig; print(json.dumps({'version': "
             "'.'.join(map(str, sys.version_info[:3])), 'platform': sysconfig.get_platform(),"
             " 'abi': 'cp%d%d' % sys.version_info[:2]}))"],
            timeout=120).stdout)
        project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
        extras = [req for extra in IMAGE_EXTRAS
                  for req in project["optional-dependencies"][extra]]
        wanted = [*project["dependencies"], *extras, "setuptools>=68"]
        source = self._tmp / "source"
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / name, source / name)
        for folder in ("node", "broker", "shared"):
            shutil.copytree(REPO / folder, source / folder,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for _ in range(8):
            self._download(wheels, wanted, target)
            missing = self._missing(wheels, source, python_image)
            if not missing:
                self.timings["wheels_s"] = time.monotonic() - started
                return wheels
            self.log(f"the image's pip also needs {missing}")
            wanted = [missing]
        raise RuntimeError("could not complete the wheels for the offline build")

    def _download(self, wheels: Path, wanted: list[str], target: dict[str, str]) -> None:
        arch = target["platform"].rsplit("-", 1)[-1]
        platforms = [f"manylinux_2_{minor}_{arch}" for minor in (36, 35, 34, 31, 28, 17, 5)]
        platforms += [f"manylinux2014_{arch}", f"manylinux1_{arch}"]
        argv = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(wheels),
                "--only-binary=:all:", "--python-version", target["version"],
                "--implementation", "cp", "--abi", target["abi"]]
        for platform in platforms:
            argv += ["--platform", platform]
        run([*argv, *wanted], timeout=600)

    def _missing(self, wheels: Path, source: Path, python_image: str) -> str | None:
        """The first requirement the image's pip cannot satisfy from ``wheels`` alone."""
        result = run(
            [self.docker, "run", "--rm", "--network", "none", "-v", f"{wheels}:/wheels:ro",
             "-v", f"{source}:/src", python_image, "pip", "install", "--dry-run",
             "--no-index", "--find-links", "/wheels", "--quiet",
             f"/src[{','.join(IMAGE_EXTRAS)}]"],
            timeout=300, check=False)
        if result.returncode == 0:
            return None
        found = re.search(r"satisfies the requirement ([^;(\s]+)", result.stderr)
        if found is None:
            raise RuntimeError(f"the offline install check failed:\n{result.stderr[-3000:]}")
        return found.group(1)


def _difference(before: NetworkState, after: NetworkState) -> list[str]:
    """What still differs from the snapshot (empty: the machine is as it was)."""
    diff = [f"link {name}" for name in sorted(after.links ^ before.links)]
    diff += [f"nftables {name}" for name in sorted(after.nft_tables ^ before.nft_tables)]
    diff += [f"{k}={after.sysctls.get(k)} (was {v})" for k, v in before.sysctls.items()
             if after.sysctls.get(k) != v]
    return diff


# -- compose projects -------------------------------------------------------------------


class Project:
    """One compose file brought up as a project of its own on free loopback ports, with
    the node services built offline (the ROOMCAST_WHEELS build argument)."""

    def __init__(self, engine: Engine, compose_file: str, name: str, nodes: Sequence[str],
                 http_port: int, stats_port: int) -> None:
        self.engine = engine
        self.file = REPO / compose_file
        self.name = name
        self.http_port = http_port
        self.stats_port = stats_port
        self.override = engine._tmp / f"{name}.override.yml"
        build = {"context": str(REPO), "args": {"ROOMCAST_WHEELS": WHEELS_DIR}}
        self.override.write_text(json.dumps({"services": {n: {"build": build} for n in nodes}}))
        self.env = engine.build_env()
        self.env.pop("COMPOSE_PROJECT_NAME", None)
        self.env.pop("COMPOSE_FILE", None)
        self.set_ports(http_port, stats_port)

    def compose(self, *args: str, timeout: float = 120,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [*self.engine.compose, "--ansi", "never", "-p", self.name,
                "-f", str(self.file), "-f", str(self.override), *args]
        return run(argv, timeout=timeout, env=self.env, check=check, cwd=REPO)

    def up(self) -> float:
        """Build and start every service, detached; the seconds it took."""
        started = time.monotonic()
        # --force-rm: a failed build leaves no intermediate container behind
        self.compose("build", "--force-rm", timeout=900)
        for attempt in range(3):
            result = self.compose("up", "-d", timeout=600, check=attempt == 2)
            if result.returncode == 0:
                break
            if "address already in use" not in result.stdout + result.stderr:
                raise RuntimeError(f"compose up failed:\n{result.stdout}\n{result.stderr}")
            # another process took a free port picked earlier: publish on new ones
            self.set_ports(free_port(), free_port())
        return time.monotonic() - started

    def set_ports(self, http_port: int, stats_port: int) -> None:
        """Publish HAProxy's port and stats page on these loopback ports."""
        self.http_port, self.stats_port = http_port, stats_port
        self.env["ROOMCAST_HTTP_PORT"] = f"127.0.0.1:{http_port}"
        self.env["ROOMCAST_STATS_PORT"] = str(stats_port)

    def down(self) -> None:
        """Remove containers, networks, volumes and the images built for the project."""
        self.compose("down", "-v", "--rmi", "local", "--remove-orphans", timeout=300)

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-a", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def inspect(self, service: str, template: str) -> str:
        return run([self.engine.docker, "inspect", "--format", template,
                    self.container(service)], timeout=30).stdout.strip()

    def exec(self, service: str, *argv: str, timeout: float = 30) -> str:
        return run([self.engine.docker, "exec", self.container(service), *argv],
                   timeout=timeout).stdout

    def logs(self, service: str = "") -> str:
        result = self.compose("logs", "--no-color", *([service] if service else []),
                              check=False, timeout=60)
        return result.stdout + result.stderr

    def leftovers(self) -> list[str]:
        """Containers, volumes and networks of this project still present."""
        label = f"label=com.docker.compose.project={self.name}"
        found = []
        for kind in ("container", "volume", "network"):
            argv = [self.engine.docker, kind, "ls", "-q", "--filter", label]
            if kind == "container":
                argv.insert(3, "-a")
            found += [f"{kind} {x}" for x in run(argv, timeout=30).stdout.split()]
        return found
