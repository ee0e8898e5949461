"""End to end on the real queue with real weights: REST submit -> Redis -> `ichigo worker` ->
store -> sibling .txt, whisper-tiny.en on real speech (SQLite store)."""

from __future__ import annotations

import dataclasses
import shutil
import time

import pytest
from fastapi.testclient import TestClient

from ichigo_common.settings import Settings
from ichigo_common.store.repo import Store
from producer.app import create_app
from producer.queue import make_celery

from .conftest import read_manifest
from .queue_helpers import (  # noqa: F401 - redis_db is a fixture
    WorkerProcess,
    redis_db,
    running_workers,
    sqlite_store_url,
    wait_for,
    worker_env,
)

pytestmark = [pytest.mark.queue, pytest.mark.slow, pytest.mark.realspeech]


def test_real_speech_through_the_queue(tmp_path, speech_dir, redis_db):  # noqa: F811 - the fixture
    from ichigo_pipeline.evaluation import english_normalizer, wer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = [r for r in read_manifest(speech_dir) if r["language"] == "en"][:12]
    for r in rows:
        shutil.copy(speech_dir / r["file"], corpus / r["file"])
    url = sqlite_store_url(tmp_path)
    env = worker_env(redis_url=redis_db.url, database_url=url, roots=[tmp_path])
    settings = dataclasses.replace(
        Settings.from_env(), database_url=url, broker_url=redis_db.url,
        result_backend=redis_db.url, allowed_roots=(tmp_path.resolve(),), api_key=None,
        shard_files=4,
    )
    store = Store(url)
    worker = WorkerProcess("e2e", env, tmp_path / "worker.log", queues="interactive,bulk")
    with running_workers(worker), TestClient(
        create_app(settings, store, make_celery(settings))
    ) as api:
        start = time.perf_counter()
        resp = api.post("/v1/jobs", json={"paths": [str(corpus)], "model": "whisper-tiny.en"})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["job_id"]

        def finished():
            body = api.get(f"/v1/jobs/{job_id}").json()
            return body if body["state"] in ("done", "failed", "cancelled") else None

        body = wait_for(finished, 600, "the job to finish", on_timeout=worker.tail)
        wall = time.perf_counter() - start
        assert body["state"] == "done", body
        files = api.get(f"/v1/jobs/{job_id}/files", params={"limit": 100}).json()
    items = files["files"]
    assert len(items) == len(rows)
    texts = {}
    for item in items:
        assert item["state"] == "done", item
        name = item["path"].rsplit("/", 1)[-1]
        texts[name] = item["text"]
        txt = (corpus / name).with_suffix(".txt")
        assert txt.read_text().strip() == item["text"]
    refs = [r["reference_text"] for r in rows]
    hyps = [texts[r["file"]] for r in rows]
    score = wer(refs, hyps, english_normalizer())
    audio_s = sum(float(r["duration_s"]) for r in rows)
    print(f"queue path: {len(rows)} files, {audio_s:.1f} s audio in {wall:.1f} s; WER {score:.2f}%")
    assert score < 8.0  # tiny.en measures 3.75% on the 30 English clips in-process
    assert not [p for p in corpus.iterdir() if p.name.startswith(".")]
