"""The deployment files: ``docker compose config`` validates docker/docker-compose.yml (with
the compose v2 plugin when the docker client has it, else Debian's docker-compose 1.29, which
validates the same compose-spec file), and the resolved configuration holds what operators
rely on. No daemon is needed (none runs here, so images are not built in tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from .conftest import REPO

COMPOSE_FILE = REPO / "docker" / "docker-compose.yml"
ENV = {"ICHIGO_FLOWER_BASIC_AUTH": "ops:test-only"}


def _compose() -> list[str]:
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed "
                "(scripts/test installs Debian's docker-compose)")


def _config(extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICHIGO_")}
    env.update(extra_env or {})
    return subprocess.run([*_compose(), "-f", str(COMPOSE_FILE), "config"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.fixture(scope="module")
def config() -> dict:
    done = _config(ENV)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_compose_file_validates_with_the_expected_services(config):
    services = config["services"]
    assert {"redis", "postgres", "migrate", "api", "watcher", "worker-gpu0", "worker-gpu1",
            "flower"} <= set(services)
    migrate = services["migrate"]
    assert migrate["command"] == ["ichigo", "db", "upgrade"]
    for name in ("api", "watcher", "worker-gpu0", "worker-gpu1"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == "service_healthy", name


def test_one_worker_per_gpu_with_a_device_reservation(config):
    seen = set()
    for name in ("worker-gpu0", "worker-gpu1"):
        service = config["services"][name]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        seen.update(device["device_ids"])
        assert service["command"][:4] == ["ichigo", "worker", "--gpu", "0"]
        assert service["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert seen == {"0", "1"}


def _mounts(service: dict) -> dict[str, str]:
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = v.get("source", "")
        else:
            source, target = v.split(":")[:2]
            out[target] = source
    return out


def test_paths_are_shared_where_workers_read_them(config):
    services = config["services"]
    worker, watcher, api = (_mounts(services[n]) for n in ("worker-gpu0", "watcher", "api"))
    # workers open the paths the watcher and the API enqueue: same source, same target
    assert watcher["/data/watch"] == worker["/data/watch"]
    assert api["/data/uploads"] == worker["/data/uploads"]
    env = services["worker-gpu0"]["environment"]
    assert env["ICHIGO_UPLOAD_DIR"] == "/data/uploads"
    assert "/data/watch" in env["ICHIGO_ALLOWED_ROOTS"].split(":")
    assert services["watcher"]["command"][:3] == ["ichigo", "watch", "/data/watch"]
    assert env["ICHIGO_DATABASE_URL"].startswith("postgresql+psycopg://")


def test_flower_requires_basic_auth(config):
    flower = config["services"]["flower"]
    assert flower["environment"]["ICHIGO_FLOWER_BASIC_AUTH"] == "ops:test-only"
    done = _config({})
    assert done.returncode != 0
    assert "ICHIGO_FLOWER_BASIC_AUTH" in done.stderr


def test_every_command_in_the_compose_file_exists(config):
    """Each service's `ichigo ...` command parses with this checkout's CLI."""
    for name, service in config["services"].items():
        command = service.get("command")
        if not command or command[0] != "ichigo":
            continue
        args = [a for a in command[1:]]
        done = subprocess.run([sys.executable, "-m", "ichigo_common.cli", args[0], "--help"],
                              capture_output=True, text=True, timeout=120, cwd=REPO)
        assert done.returncode == 0, (name, done.stderr)
        for flag in (a for a in args if a.startswith("--")):
            assert flag in done.stdout, (name, flag)


def test_the_api_image_has_no_model_stack():
    api = (REPO / "docker" / "api.Dockerfile").read_text()
    worker = (REPO / "docker" / "worker.Dockerfile").read_text()
    install = [line for line in api.splitlines() if "pip install" in line]
    assert install and all("[pipeline" not in line for line in install)
    assert "find_spec('torch') is None" in api  # the image build fails if torch sneaks in
    assert 'pip install ".[pipeline' in worker
