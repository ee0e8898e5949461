"""The deployment files: ``docker compose config`` validates docker/docker-compose.yml (with
the compose v2 plugin when the docker client has it, else Debian's docker-compose 1.29, which
validates the same compose-spec file; scripts/test installs it), and the resolved
configuration holds what operators rely on. No daemon runs here, so images are not built in
tests: what the images run is checked by running the same commands here, the API image's
with torch made unimportable, as it is in that image."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO

DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
ENV = {"ICHIGO_FLOWER_BASIC_AUTH": "ops:test-only"}
API_IMAGE_SERVICES = ("migrate", "api", "watcher", "flower")
WORKERS = ("worker-gpu0", "worker-gpu1")
# runs `ichigo ARGS...` as the API image would: torch and the model stack cannot be imported
NO_TORCH = """
import sys
class NoModelStack:
    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] in ('torch', 'torchaudio', 'transformers', 'numpy'):
            raise ModuleNotFoundError(f'no {name} in the API image')
sys.meta_path.insert(0, NoModelStack())
from ichigo_common.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _compose() -> list[str]:
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` nor `docker-compose` is installed "
                "(scripts/test installs Debian's docker-compose)")


def _config(tmp: Path, extra_env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """``compose config`` with only ``extra_env`` as ICHIGO_* variables and an empty env file
    (a developer's docker/.env must not change the result)."""
    env_file = tmp / "empty.env"
    env_file.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICHIGO_")}
    env.update(extra_env)
    return subprocess.run(
        [*_compose(), "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config", *args],
        env=env, capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("compose")
    quiet = _config(tmp, ENV, "-q")
    assert quiet.returncode == 0 and not quiet.stdout, quiet.stderr
    done = _config(tmp, ENV)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_compose_file_validates_with_the_expected_services(config):
    services = config["services"]
    assert {"redis", "postgres", "migrate", *API_IMAGE_SERVICES, *WORKERS} <= set(services)
    assert services["migrate"]["command"] == ["ichigo", "db", "upgrade"]
    assert services["postgres"]["healthcheck"]["test"][0] == "CMD-SHELL"
    for name in ("api", "watcher", *WORKERS):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert deps["redis"]["condition"] == "service_healthy", name
    for name in ("api", "flower"):
        assert services[name]["healthcheck"]["test"][:2] == ["CMD", "python"], name


def test_images_are_built_from_the_repository(config):
    """Every service on a project image can build it (none is pulled from a registry)."""
    services = config["services"]
    for names, dockerfile in ((API_IMAGE_SERVICES, "docker/api.Dockerfile"),
                              (WORKERS, "docker/worker.Dockerfile")):
        images = {services[n]["image"] for n in names}
        assert len(images) == 1, images
        for name in names:
            build = services[name]["build"]
            assert build["dockerfile"] == dockerfile, name
            assert Path(build["context"]).resolve() == REPO, name


def test_one_worker_per_gpu_with_a_device_reservation(config):
    seen, nodes = set(), set()
    for name in WORKERS:
        service = config["services"][name]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        seen.update(device["device_ids"])
        # the one reserved GPU is device 0 inside the container
        assert service["command"][:4] == ["ichigo", "worker", "--gpu", "0"]
        nodes.add((service["hostname"], service["command"][-1]))
    assert seen == {"0", "1"}
    assert len(nodes) == len(WORKERS)


def _mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """target -> (source, read-only), from v1's short or v2's long volume syntax."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = (v.get("source", ""), bool(v.get("read_only")))
        else:
            source, target, *mode = v.split(":")
            out[target] = (source, mode == ["ro"])
    return out


def test_paths_are_shared_where_workers_read_them(config):
    services = config["services"]
    worker, watcher, api = (_mounts(services[n]) for n in ("worker-gpu0", "watcher", "api"))
    # workers open the paths the watcher and the API enqueue: same source, same target;
    # only workers write there (the .txt files)
    assert watcher["/data/watch"] == api["/data/watch"] == (worker["/data/watch"][0], True)
    assert api["/data/corpora"] == (worker["/data/corpora"][0], True)
    assert api["/data/uploads"] == worker["/data/uploads"] == ("uploads", False)
    assert not worker["/data/watch"][1] and not worker["/data/corpora"][1]
    assert worker["/var/cache/ichigo"] == ("model-cache", False)
    for name in ("api", "watcher", *WORKERS):
        env = services[name]["environment"]
        assert env["ICHIGO_UPLOAD_DIR"] == "/data/uploads"
        assert set(env["ICHIGO_ALLOWED_ROOTS"].split(":")) == {"/data/watch", "/data/corpora"}
        assert env["ICHIGO_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["ICHIGO_BROKER_URL"] == "redis://redis:6379/0"
        assert env["ICHIGO_RESULT_BACKEND"] == "redis://redis:6379/1"
    assert services["watcher"]["command"][:3] == ["ichigo", "watch", "/data/watch"]
    assert "ICHIGO_API_KEY" not in services["worker-gpu0"]["environment"]


def _published(service: dict) -> list[tuple[str, str]]:
    """(host address, published port) of each port, from v1's short or v2's long syntax."""
    out = []
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out.append((p.get("host_ip", ""), str(p["published"])))
        else:
            host_ip, published, _ = p.rsplit(":", 2)
            out.append((host_ip, published))
    return out


def test_ports_are_published_on_loopback_unless_asked(config, tmp_path):
    services = config["services"]
    assert _published(services["api"]) == [("127.0.0.1", "8000")]
    assert _published(services["flower"]) == [("127.0.0.1", "5555")]
    assert not any(_published(services[n]) for n in ("redis", "postgres", *WORKERS))
    done = _config(tmp_path, {**ENV, "ICHIGO_PUBLISH_ADDRESS": "0.0.0.0"})
    assert done.returncode == 0, done.stderr
    assert _published(yaml.safe_load(done.stdout)["services"]["api"]) == [("0.0.0.0", "8000")]


def test_flower_requires_basic_auth(config, tmp_path):
    flower = config["services"]["flower"]
    assert flower["environment"]["ICHIGO_FLOWER_BASIC_AUTH"] == "ops:test-only"
    assert flower["command"][:2] == ["ichigo", "flower"]
    done = _config(tmp_path, {})
    assert done.returncode != 0
    assert "ICHIGO_FLOWER_BASIC_AUTH" in done.stderr


def _run_ichigo(args: list[str], no_torch: bool) -> subprocess.CompletedProcess:
    code = NO_TORCH if no_torch else "import sys; from ichigo_common.cli import main; " \
                                     "sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_every_command_in_the_compose_file_exists(config):
    """Each service's `ichigo ...` command parses with this checkout's CLI and takes the flags
    it is given; on the API image's services with no torch, numpy or transformers."""
    for name, service in config["services"].items():
        command = service.get("command")
        if not command or command[0] != "ichigo":
            continue
        words = [a for a in command[1:] if not a.startswith("-")][:2]
        sub = words[:2] if words[:2] == ["db", "upgrade"] else words[:1]
        done = _run_ichigo([*sub, "--help"], no_torch=name in API_IMAGE_SERVICES)
        assert done.returncode == 0, (name, done.stderr)
        for flag in (a for a in command[1:] if a.startswith("--")):
            assert flag in done.stdout, (name, flag)


def test_the_no_torch_guard_is_real():
    """The check above would pass vacuously if the guard blocked nothing."""
    probe = subprocess.run([sys.executable, "-c", NO_TORCH.replace(
        "from ichigo_common.cli import main", "import torch.nn"), "x"],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert probe.returncode != 0 and "no torch in the API image" in probe.stderr


def _install_lines(dockerfile: str) -> list[str]:
    text = (DOCKER / dockerfile).read_text().replace("\\\n", " ")
    return [line for line in text.splitlines() if "install_deps.py" in line and "RUN" in line]


def test_the_api_image_has_no_model_stack():
    """The API image installs the base dependencies only (no extras): torch, transformers
    and numpy are not among them; the worker image adds [pipeline] and the offline models."""
    sys.path.insert(0, str(DOCKER))
    try:
        from install_deps import requirements
    finally:
        sys.path.remove(str(DOCKER))
    names = {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower() for r in requirements([])}
    assert not names & {"torch", "torchaudio", "transformers", "numpy"}, names
    assert "flower" in names and "celery" in names
    assert any(r.startswith("torch==") for r in requirements(["pipeline"]))
    (api,) = _install_lines("api.Dockerfile")
    assert api.rstrip().endswith("python docker/install_deps.py"), api
    (worker,) = _install_lines("worker.Dockerfile")
    assert worker.rstrip().endswith("install_deps.py pipeline offline-models"), worker
    for dockerfile in ("api.Dockerfile", "worker.Dockerfile"):
        text = (DOCKER / dockerfile).read_text()
        assert "pip install --no-deps /src" in text
        # one image serves several compose services: each declares its own health check
        assert not re.search(r"^HEALTHCHECK", text, re.M), dockerfile
        assert re.search(r"^FROM python:3\.11-slim-bookworm$", text, re.M), dockerfile
    assert "assert not u.find_spec('torch')" in (DOCKER / "api.Dockerfile").read_text()


def test_dockerignore_lets_through_what_the_dockerfiles_copy():
    """The ignore file is an allow-list (the compose file's default bind folders live under
    docker/): every COPY source must be let through again."""
    allowed = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for dockerfile in ("api.Dockerfile", "worker.Dockerfile"):
        for line in (DOCKER / dockerfile).read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert source.rstrip("/") in allowed, (dockerfile, source)
                    assert (REPO / source).exists(), (dockerfile, source)
