"""``ichigo flower``: the real Flower on the service's broker, with basic auth, reading a real
worker's events: the worker, the shard with its progress and final result, read back through
Flower's REST API (``/api/workers``, ``/api/tasks``, ``/api/task/info/<id>``)."""

from __future__ import annotations

import ast
import dataclasses
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import soundfile as sf

from ichigo_common.settings import Settings
from ichigo_common.store.repo import Store
from producer.enqueue import submit_job
from producer.monitor import basic_auth_problem, flower_command
from producer.queue import make_celery

from .conftest import REPO
from .queue_helpers import (  # noqa: F401 - fixtures
    WorkerProcess,
    make_clips,
    queue_model,
    redis_db,
    running_workers,
    sqlite_store_url,
    wait_for,
    worker_env,
)

AUTH = ("ops", "s3cret-flower")
SHARD = "ichigo.transcribe_shard"
PROGRESS_RESULT = re.compile(r"(\d+)/(\d+) files \((\d+) done, (\d+) reused, (\d+) failed\)")


def _settings(**changes) -> Settings:
    return dataclasses.replace(Settings.from_env(), **changes)


def test_flower_command_keeps_secrets_off_the_command_line():
    """Broker URL (maybe with a Redis password) and basic auth reach Flower through its
    environment: ``ps`` shows the command line to every local user."""
    settings = _settings(broker_url="redis://:redispw@redis:6379/0",
                         result_backend="redis://:redispw@redis:6379/1",
                         flower_basic_auth="ops:pw1,viewer:pw2")
    argv, env = flower_command(settings, 5556, "0.0.0.0", "/flower/", 500,
                               ["--purge_offline_workers=60"])
    assert argv[1:4] == ["-m", "celery", "flower"]
    assert "--url_prefix=flower" in argv and "--max_tasks=500" in argv
    assert "--persistent=False" in argv and argv[-1] == "--purge_offline_workers=60"
    assert not any("redispw" in a or "pw1" in a for a in argv)
    assert env["CELERY_BROKER_URL"] == settings.broker_url
    assert env["CELERY_RESULT_BACKEND"] == settings.result_backend
    assert env["FLOWER_BASIC_AUTH"] == "ops:pw1,viewer:pw2"
    _, env = flower_command(_settings(flower_basic_auth=None), 5555, "127.0.0.1", None, 1)
    assert "FLOWER_BASIC_AUTH" not in env  # an inherited one would be a surprise
    assert basic_auth_problem("ops:pw:with:colons,b:c") is None
    for bad in ("ops", "ops:", ":pw", "a:b,,c:d"):
        assert basic_auth_problem(bad), bad
    assert repr(_settings(flower_basic_auth="ops:pw1")).count("pw1") == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_flower(env: dict[str, str], log: Path) -> Iterator[tuple[str, int]]:
    """``ichigo flower`` on a free loopback port until it answers; (base URL, pid)."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ichigo_common.cli", "flower", "--port", str(port)],
        env=env, cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        stdin=subprocess.DEVNULL, start_new_session=True)

    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"flower exited with {proc.returncode}\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{base}/healthcheck", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 60, "Flower to answer", on_timeout=lambda: log.read_text()[-3000:])
        yield base, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _get(url: str, **params):
    response = httpx.get(url, auth=AUTH, params=params, timeout=15)
    response.raise_for_status()
    return response.json()


def _shards(base: str, state: str) -> list[dict]:
    tasks = _get(f"{base}/api/tasks", taskname=SHARD).values()
    return [t for t in tasks if t["state"] == state]


def _check_process(pid: int, redis_url: str) -> None:
    """The process is Flower itself (exec'd, not wrapped), with no secret in its argv."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert cmdline[1:4] == ["-m", "celery", "flower"], cmdline
    assert not any(AUTH[1] in a or redis_url in a for a in cmdline), cmdline


def _check_auth(base: str) -> None:
    for path in ("/api/workers", "/api/tasks", "/"):
        assert httpx.get(f"{base}{path}", timeout=10).status_code == 401, path
    assert httpx.get(f"{base}/api/tasks", auth=(AUTH[0], "wrong"), timeout=10).status_code == 401


@pytest.mark.queue
@pytest.mark.slow
def test_flower_shows_the_worker_and_shard_progress(tmp_path, redis_db, queue_model):  # noqa: F811
    redis_db.flush()
    url = sqlite_store_url(tmp_path)
    clips = make_clips(tmp_path / "corpus", 40, seed=31, min_s=1.0, max_s=3.0)
    audio_s = sum(sf.info(str(p)).duration for p in clips)
    env = worker_env(redis_url=redis_db.url, database_url=url,
                     roots=[tmp_path, queue_model.parent],
                     ICHIGO_FLOWER_BASIC_AUTH=f"{AUTH[0]}:{AUTH[1]}")
    worker = WorkerProcess("flowered", env, tmp_path / "worker.log")
    store = Store(url)
    settings = _settings(database_url=url, broker_url=redis_db.url, result_backend=redis_db.url,
                         allowed_roots=(tmp_path.resolve(), queue_model.parent.resolve()),
                         shard_files=len(clips), api_key=None)
    # Flower first: it knows only the tasks whose events it receives
    with running_flower(env, tmp_path / "flower.log") as (base, pid), running_workers(worker):
        _check_process(pid, redis_db.url)
        _check_auth(base)
        job_id = submit_job(store, make_celery(settings), settings,
                            paths=[str(p) for p in clips], model=str(queue_model))
        # while the shard runs: state PROGRESS, "finished/total files (...)" as its result
        (running,) = wait_for(lambda: _shards(base, "PROGRESS"), 120, "a shard in PROGRESS",
                              interval=0.05, on_timeout=worker.tail)
        finished, total, done, reused, failed = map(
            int, PROGRESS_RESULT.fullmatch(running["result"]).groups())
        assert total == len(clips) and finished == done + reused + failed <= total, running
        assert running["worker"] == worker.nodename
        wait_for(lambda: store.get_job(job_id).state == "done", 180, "the job",
                 on_timeout=worker.tail)
        (succeeded,) = wait_for(lambda: _shards(base, "SUCCESS"), 60, "a shard in SUCCESS")
        workers = _get(f"{base}/api/workers", refresh=1)
        info = _get(f"{base}/api/task/info/{succeeded['uuid']}")
    assert succeeded["uuid"] == running["uuid"]
    node = workers[worker.nodename]
    assert SHARD in node["registered"]
    assert [q["name"] for q in node["active_queues"]] == ["bulk"]
    assert info["state"] == "SUCCESS" and info["worker"] == worker.nodename
    assert job_id in info["kwargs"]
    summary = ast.literal_eval(info["result"])  # the task's return value, as Flower got it
    assert summary["job_id"] == job_id and summary["worker"] == worker.nodename
    assert (summary["files"], summary["done"], summary["failed"]) == (len(clips), len(clips), 0)
    assert summary["audio_s"] == pytest.approx(audio_s, abs=0.05)
    redis_db.flush()
