"""The producer's operational edges: the API key on every endpoint, /healthz with the broker
up, down or silent, the schema check at start-up, and a large tree enqueued in bounded memory.
Same real services as ``test_producer`` (whose fixtures these tests use)."""

from __future__ import annotations

import dataclasses
import math
import socket
import time
import tracemalloc
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ichigo_common.settings import Settings
from producer.app import create_app
from producer.enqueue import submit_job
from tests.test_producer import (  # noqa: F401 - *_fixture: fixtures
    CLOSED_PORT_URL,
    REDIS_URL,
    Env,
    assert_nothing_created,
    audio_files,
    broker_fixture,
    env_fixture,
    flush,
    redis_client_fixture,
)

# -- API key, health, schema ------------------------------------------------------------------


@pytest.mark.queue
def test_api_key_guards_every_endpoint_but_healthz(env):
    key = "correct-horse-battery-staple-42"
    wrong = "x" * len(key)
    audio_files(env.root / "k", 1)
    app = env.app(api_key=key)
    # every operation the app serves (its OpenAPI schema is built even with the pages off)
    endpoints = [(method.upper(), path) for path, ops in app.openapi()["paths"].items()
                 for method in ops if path != "/healthz"]
    assert {("POST", "/v1/jobs"), ("GET", "/v1/jobs/{job_id}"), ("DELETE", "/v1/jobs/{job_id}"),
            ("POST", "/v1/audio/transcriptions"), ("POST", "/s2r"),
            ("POST", "/r2t"), ("GET", "/metrics"),
            ("GET", "/health/server-status")} <= set(endpoints), endpoints
    with TestClient(app) as client:
        good = {"Authorization": f"Bearer {key}"}
        job_id = client.post("/v1/jobs", json={"paths": [str(env.root / "k")]},
                             headers=good).json()["job_id"]
        for method, path in endpoints:
            url = path.format(job_id=job_id)
            for headers in ({}, {"Authorization": f"Bearer {wrong}"},
                            {"Authorization": f"Bearer {key[:-1]}"},
                            {"Authorization": f"Basic {key}"}, {"Authorization": key}):
                response = client.request(method, url, headers=headers, json={})
                assert response.status_code == 401, (method, url, headers)
                assert response.headers["www-authenticate"] == "Bearer"
            assert client.request(method, url, headers=good, json={}).status_code != 401
        assert client.get("/healthz?workers=false").status_code == 200
        # the pages outside the schema are behind the key too, and served with it
        for page in ("/openapi.json", "/docs", "/redoc", "/metrics", "/health/server-status"):
            assert client.get(page).status_code == 401, page
            assert client.get(page, headers={"Authorization": f"Bearer {wrong}"}
                              ).status_code == 401, page
            assert client.get(page, headers=good).status_code == 200, page
    assert len(env.job_ids()) == 1  # only the authorised submission


@pytest.mark.queue
def test_healthz_reports_database_broker_and_workers(env):
    with env.client() as client:
        full = client.get("/healthz")
        start = time.perf_counter()
        quick = client.get("/healthz", params={"workers": False})
        quick_s = time.perf_counter() - start
    assert full.status_code == 200
    body = full.json()
    assert body["status"] == "ok" and body["database"]["ok"] and body["broker"]["ok"]
    assert "names" in body["workers"]  # informational: ok only if a worker answered
    assert quick.status_code == 200 and "workers" not in quick.json() and quick_s < 1.0


@pytest.mark.queue
def test_broker_down_is_a_quick_503_and_nothing_is_created(env):
    audio_files(env.root / "b", 2)
    with env.client(broker_url=CLOSED_PORT_URL, result_backend=CLOSED_PORT_URL) as client:
        start = time.perf_counter()
        health = client.get("/healthz")
        health_s = time.perf_counter() - start
        submit = client.post("/v1/jobs", json={"paths": [str(env.root / "b")]})
    assert health.status_code == 503 and health_s < 2.5
    assert health.json()["broker"]["ok"] is False and health.json()["database"]["ok"] is True
    assert health.json()["workers"]["ok"] is False
    assert submit.status_code == 503 and "broker" in submit.json()["detail"]
    assert_nothing_created(env)


@pytest.mark.queue
def test_silent_broker_is_a_bounded_503(env):
    """A port that accepts connections and never answers (a hung Redis): no hang."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        with env.client(broker_url=url, result_backend=url) as client:
            start = time.perf_counter()
            health = client.get("/healthz")
            health_s = time.perf_counter() - start
    assert health.status_code == 503 and health_s < 4.0
    assert "no answer within" in health.json()["broker"]["error"]


def test_api_start_refuses_a_database_not_at_head(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    settings = dataclasses.replace(Settings.from_env(), database_url=url, broker_url=REDIS_URL,
                                   result_backend=REDIS_URL, allowed_roots=(tmp_path,))
    with pytest.raises(RuntimeError, match="ichigo db upgrade"):
        with TestClient(create_app(settings)):
            pass


# -- a large tree in bounded memory -----------------------------------------------------------


def _tree(folder: Path, n: int, per_dir: int = 500) -> None:
    for i in range(n):
        sub = folder / f"d{i // per_dir:03d}"
        if i % per_dir == 0:
            sub.mkdir(parents=True)
        (sub / f"{i:06d}.wav").touch()


def _submit_measured(env: Env, folder: Path, trace: bool) -> tuple[str, float, int]:
    celery = env.celery()
    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        job_id = submit_job(env.store, celery, env.settings, paths=[str(folder)],
                            recursive=True, source="cli")
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
    finally:
        if trace:
            tracemalloc.stop()
    return job_id, seconds, peak


@pytest.mark.slow
@pytest.mark.queue
def test_large_tree_enqueues_in_bounded_memory(env):
    n_small, n_large = 5_000, 20_000
    _tree(env.root / "small", n_small)
    _tree(env.root / "large", n_large)
    settings = env.settings = dataclasses.replace(env.settings, shard_files=32)

    job_id, seconds, _ = _submit_measured(env, env.root / "large", trace=False)
    rate = n_large / seconds
    messages = env.messages()
    assert len(messages) == math.ceil(n_large / settings.shard_files)
    assert sum(len(m["kwargs"]["file_ids"]) for m in messages) == n_large
    assert env.store.job_counts(job_id)["files"] == {"queued": n_large}
    flush(env.redis)

    _, _, peak_small = _submit_measured(env, env.root / "small", trace=True)
    flush(env.redis)
    _, _, peak_large = _submit_measured(env, env.root / "large", trace=True)
    print(f"\nenqueue: {n_large} files in {seconds:.2f} s = {rate:,.0f} files/s; "
          f"tracemalloc peak {peak_small / 2**20:.1f} MiB ({n_small} files), "
          f"{peak_large / 2**20:.1f} MiB ({n_large} files)")
    # 4x the files, (about) the same peak: nothing grows with the number of files
    assert peak_large < peak_small * 1.3 + 2 * 2**20
    assert peak_large < 64 * 2**20
    assert rate > 100_000 / 60  # a 100,000-file job enqueues in well under a minute
