"""docker-compose.cluster.yml stays consistent with the code (read statically here;
tests/e2e/test_compose_live.py runs it on a real engine).

Read like docker-compose.yml is in test_compose.py: six cluster-enabled Redis without
persistence, a one-shot container that creates 3 masters + 3 replicas from all six and
that the nodes wait for, node services whose command and environment pass
``roomcast serve --check`` with a ``redis+cluster://`` URL naming every Redis service,
and HAProxy pointing at every node through the shared scripts/haproxy.cfg.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest
import yaml

from roomcast.broker._urls import parse_cluster_url
from tests.e2e.haproxy import HAPROXY_CFG
from tests.e2e.procs import REPO
from tests.e2e.test_compose import (
    CFG_IN_IMAGE,
    console_script,
    dockerfile_env,
    image_command,
    interpolate,
    service_env,
)

COMPOSE_FILE = REPO / "docker-compose.cluster.yml"


def _interpolate_all(node: Any) -> Any:
    if isinstance(node, str):
        return interpolate(node, {})
    if isinstance(node, list):
        return [_interpolate_all(v) for v in node]
    if isinstance(node, dict):
        return {k: _interpolate_all(v) for k, v in node.items()}
    return node


COMPOSE: dict[str, Any] = _interpolate_all(yaml.safe_load(COMPOSE_FILE.read_text()))
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
NODE_SERVICES = sorted(name for name, svc in SERVICES.items() if "build" in svc)
REDIS_SERVICES = sorted(
    name for name, svc in SERVICES.items()
    if str(svc.get("image", "")).startswith("redis:") and "redis-server" in svc["command"]
)
CREATE_SERVICE = next(
    name for name, svc in SERVICES.items()
    if str(svc.get("image", "")).startswith("redis:") and name not in REDIS_SERVICES
)


def _node_env(name: str) -> dict[str, str]:
    return {**dockerfile_env(), **service_env(SERVICES[name])}


def _create_script() -> str:
    command = SERVICES[CREATE_SERVICE]["command"]
    assert command[:2] == ["sh", "-ec"], command
    return str(command[2])


def test_six_cluster_enabled_redis_with_an_fsynced_append_only_file() -> None:
    """Six Redis services, each cluster-enabled, an AOF fsynced on every write (a
    restarted master keeps its rooms' epochs), no RDB snapshots, with a healthcheck."""
    assert len(REDIS_SERVICES) == 6, REDIS_SERVICES
    for name in REDIS_SERVICES:
        command = SERVICES[name]["command"]
        assert command[command.index("--cluster-enabled") + 1] == "yes"
        assert command[command.index("--save") + 1] == ""
        assert command[command.index("--appendonly") + 1] == "yes"
        assert command[command.index("--appendfsync") + 1] == "always"
        assert "healthcheck" in SERVICES[name]
    # Compose v1 refuses a top-level "name:" (issue 16): the README passes -p instead
    assert "name" not in COMPOSE


def test_one_shot_create_joins_all_six_as_three_masters_with_replicas() -> None:
    """The create service waits for six healthy Redis, names each one, asks for one
    replica per master, runs once, and its script is valid sh."""
    service = SERVICES[CREATE_SERVICE]
    assert service.get("restart") == "no"
    assert {n: d["condition"] for n, d in service["depends_on"].items()} == {
        n: "service_healthy" for n in REDIS_SERVICES
    }
    script = _create_script()
    assert "--cluster create" in script
    assert "--cluster-replicas 1" in script and "--cluster-yes" in script
    for name in REDIS_SERVICES:
        assert name in script
    assert "cluster_state:ok" in script
    result = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True,
                            timeout=10)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", NODE_SERVICES)
def test_node_service_passes_roomcast_serve_check(name: str) -> None:
    """The node's command and environment (a redis+cluster:// URL) are a valid
    `roomcast serve` (run here with --check, which validates and exits 0)."""
    argv = image_command(SERVICES[name])
    assert argv[:2] == ["roomcast", "serve"], argv
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ROOMCAST_") and k != "PYTHONPATH"}
    env.update(_node_env(name), PYTHONPATH=str(REPO))
    result = subprocess.run([*console_script(argv[0]), *argv[1:], "--check"], env=env,
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "configuration ok" in result.stderr


@pytest.mark.parametrize("name", NODE_SERVICES)
def test_node_service_uses_every_redis_and_waits_for_the_cluster(name: str) -> None:
    """ROOMCAST_REDIS is a cluster URL listing all six Redis services; the node starts
    after the cluster was created and is restarted when it exits 1."""
    service = SERVICES[name]
    nodes, options = parse_cluster_url(_node_env(name)["ROOMCAST_REDIS"])
    assert sorted(host for host, _ in nodes) == REDIS_SERVICES
    assert {port for _, port in nodes} == {6379} and options == {}
    condition = service["depends_on"][CREATE_SERVICE]["condition"]
    assert condition == "service_completed_successfully"
    assert service.get("restart") in ("on-failure", "always", "unless-stopped")


def test_haproxy_fronts_every_node_with_the_shared_cfg() -> None:
    """HAProxy mounts scripts/haproxy.cfg and names every node service once, on its port."""
    haproxy = next(s for s in SERVICES.values() if str(s.get("image", "")).startswith("haproxy:"))
    mounts = [v.split(":")[:2] for v in haproxy["volumes"]]
    assert [(REPO / src).resolve() for src, dst in mounts if dst == CFG_IN_IMAGE] == [
        HAPROXY_CFG.resolve()
    ]
    env = service_env(haproxy)
    listed = sorted(v for k, v in env.items() if k.startswith("ROOMCAST_LB_NODE"))
    expected = sorted(f"{n}:{_node_env(n).get('ROOMCAST_PORT', '8080')}" for n in NODE_SERVICES)
    assert listed == expected
    for name in NODE_SERVICES:
        assert haproxy["depends_on"][name]["condition"] == "service_healthy"
