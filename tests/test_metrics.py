"""``/metrics``: figures read from the real store and the real Redis queues at scrape time,
parsed with prometheus_client's own parser; a broker that is down is a 0 in ``ichigo_up``,
answered quickly, never a failed scrape. And upstream's ``/health/server-status``."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ichigo_common.store.repo import TranscriptData
from ichigo_common.tasks import INTERACTIVE_QUEUE
from producer.queue import ShardSender
from tests.test_producer import (  # noqa: F401 - *_fixture: fixtures
    CLOSED_PORT_URL,
    broker_fixture,
    db_url,
    env_db,
    env_fixture,
    pg_url,
    redis_client_fixture,
)

pytestmark = [pytest.mark.queue]


def _scrape(client) -> dict[tuple[str, tuple], float]:
    resp = client.get("/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _transcript(duration: float) -> TranscriptData:
    return TranscriptData(model="m", content_hash=f"{duration:064.3f}"[-64:], text="hi",
                          tokens=None, chunks=[], duration_s=duration, processing_s=duration / 4,
                          provenance={})


def test_metrics_count_what_the_store_and_queues_hold(env_db):  # noqa: F811 - fixture
    env = env_db
    store = env.store
    job = store.create_job(source="api", model="m", options={})
    ids = [fid for batch in store.add_files(job, ({"path": f"/x/{i}.wav"} for i in range(7)))
           for fid, _ in batch]
    claimed, _ = store.claim(ids[:5], "w@h:1:t", lease_seconds=300, max_attempts=3)
    assert len(claimed) == 5
    store.record_result(ids[0], _transcript(10.0), 100)
    store.record_result(ids[1], _transcript(20.5), 100)
    store.record_failure(ids[2], "broken")
    # shards waiting: 3 in bulk (two priorities), 2 interactive
    celery = env.celery()
    ShardSender(celery, priority=0).send(job, [[1], [2]])
    ShardSender(celery, priority=9).send(job, [[3]])
    ShardSender(celery, priority=9, queue=INTERACTIVE_QUEUE).send(job, [[4], [5]])
    with env.client() as client:
        m = _scrape(client)
    assert m[("ichigo_up", (("component", "database"),))] == 1
    assert m[("ichigo_up", (("component", "broker"),))] == 1
    files = {state: m[("ichigo_files", (("state", state),))]
             for state in ("pending", "queued", "running", "done", "failed", "cancelled")}
    assert files == {"pending": 0, "queued": 2, "running": 2, "done": 2, "failed": 1,
                     "cancelled": 0}
    assert m[("ichigo_jobs", (("state", "running"),))] == 1
    assert m[("ichigo_files_done_total", ())] == 2
    assert m[("ichigo_files_failed_total", ())] == 1
    assert m[("ichigo_audio_seconds_total", ())] == pytest.approx(30.5)
    assert m[("ichigo_processing_seconds_total", ())] == pytest.approx(30.5 / 4)
    assert m[("ichigo_transcripts", ())] == 2
    assert m[("ichigo_files_done_last_5m", ())] == 2
    assert m[("ichigo_audio_seconds_last_5m", ())] == pytest.approx(30.5)
    assert m[("ichigo_queue_depth", (("queue", "bulk"),))] == 3
    assert m[("ichigo_queue_depth", (("queue", "interactive"),))] == 2
    assert any(name == "ichigo_build_info" for name, _ in m)


def test_metrics_with_the_broker_down_still_answer_quickly(env):
    import dataclasses

    from producer.app import create_app
    from producer.queue import make_celery

    settings = dataclasses.replace(env.settings, broker_url=CLOSED_PORT_URL,
                                   result_backend=CLOSED_PORT_URL)
    from fastapi.testclient import TestClient

    with TestClient(create_app(settings, env.store, make_celery(settings))) as client:
        start = time.perf_counter()
        m = _scrape(client)
        took = time.perf_counter() - start
        status = client.get("/health/server-status")
    assert took < 5, took
    assert m[("ichigo_up", (("component", "broker"),))] == 0
    assert m[("ichigo_up", (("component", "database"),))] == 1
    assert not any(name == "ichigo_queue_depth" for name, _ in m)
    assert status.status_code == 503
    assert status.json()["broker"]["ok"] is False


def test_server_status_as_upstream(env):
    with env.client() as client:
        resp = client.get("/health/server-status")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "ok" and body["database"]["ok"] and body["broker"]["ok"]
    assert "workers" in body
