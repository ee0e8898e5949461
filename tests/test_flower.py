"""``ichigo flower``: the real Flower on the service's broker, with basic auth, reading a real
worker's events: the worker, the shards with their progress fields and final result, read
back through Flower's REST API."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys

import httpx
import pytest

from ichigo_common.settings import Settings
from ichigo_common.store.migrate import upgrade
from ichigo_common.store.repo import Store
from producer.enqueue import submit_job
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

pytestmark = [pytest.mark.queue, pytest.mark.slow]

AUTH = ("ops", "s3cret-flower")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flower_shows_the_worker_and_shard_progress(tmp_path, redis_db, queue_model):  # noqa: F811
    redis_db.flush()
    url = sqlite_store_url(tmp_path)
    upgrade(url)
    store = Store(url)
    clips = make_clips(tmp_path / "corpus", 40, seed=31, min_s=1.0, max_s=3.0)
    env = worker_env(redis_url=redis_db.url, database_url=url,
                     roots=[tmp_path, queue_model.parent],
                     ICHIGO_FLOWER_BASIC_AUTH=f"{AUTH[0]}:{AUTH[1]}")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    flower = subprocess.Popen(
        [sys.executable, "-m", "ichigo_common.cli", "flower", "--port", str(port)],
        env=env, cwd=REPO, stdout=open(tmp_path / "flower.log", "wb"),
        stderr=subprocess.STDOUT, start_new_session=True)
    worker = WorkerProcess("flowered", env, tmp_path / "worker.log")
    try:
        def flower_up():
            if flower.poll() is not None:
                pytest.fail((tmp_path / "flower.log").read_text()[-3000:])
            try:
                return httpx.get(f"{base}/healthcheck", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(flower_up, 60, "Flower to answer")
        # its own credentials are not on the command line
        assert AUTH[1] not in " ".join(flower.args if isinstance(flower.args, list) else [])
        assert AUTH[1] not in open(f"/proc/{flower.pid}/cmdline", "rb").read().decode()
        assert httpx.get(f"{base}/api/workers", timeout=10).status_code == 401
        assert httpx.get(f"{base}/api/tasks", auth=("ops", "wrong"),
                         timeout=10).status_code == 401
        with running_workers(worker):
            settings = dataclasses.replace(
                Settings.from_env(), database_url=url, broker_url=redis_db.url,
                result_backend=redis_db.url, allowed_roots=(tmp_path.resolve(),
                                                            queue_model.parent.resolve()),
                shard_files=40, api_key=None)
            job_id = submit_job(store, make_celery(settings), settings,
                                paths=[str(p) for p in clips], model=str(queue_model))

            def running_shard():
                tasks = httpx.get(f"{base}/api/tasks", auth=AUTH, timeout=10).json()
                return [t for t in tasks.values() if t["state"] == "PROGRESS"
                        and t.get("name") == "ichigo.transcribe_shard"]

            # while it runs: state PROGRESS and "finished/total" in the task's result
            (progress,) = wait_for(running_shard, 120, "a shard in PROGRESS in Flower",
                                   interval=0.05, on_timeout=worker.tail)
            assert progress["result"].split(" ", 1)[0].endswith(f"/{len(clips)}"), progress
            assert progress["worker"] == worker.nodename
            wait_for(lambda: store.get_job(job_id).state == "done", 180, "the job",
                     on_timeout=worker.tail)

            def shard_done():
                tasks = httpx.get(f"{base}/api/tasks", auth=AUTH, timeout=10).json()
                done = [t for t in tasks.values()
                        if t.get("name") == "ichigo.transcribe_shard" and t["state"] == "SUCCESS"]
                return done or None

            (task,) = wait_for(shard_done, 60, "Flower to see the shard succeed")
            workers = wait_for(lambda: httpx.get(f"{base}/api/workers", auth=AUTH,
                                                 params={"refresh": 1}, timeout=15).json(),
                               60, "Flower to list the worker")
        assert worker.nodename in workers, workers
        assert task["uuid"] == progress["uuid"]
        info = httpx.get(f"{base}/api/task/info/{task['uuid']}", auth=AUTH, timeout=10).json()
        assert info["worker"] == worker.nodename and info["state"] == "SUCCESS"
        assert f"'done': {len(clips)}" in info["result"], info["result"]
        assert job_id in info["result"] and job_id in str(info["kwargs"])
    finally:
        flower.terminate()
        try:
            flower.wait(15)
        except subprocess.TimeoutExpired:
            flower.kill()
    redis_db.flush()
