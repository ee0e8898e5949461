"""``/metrics``, ``/health/server-status`` and the OpenAPI pages.

Metrics are read from a real store (SQLite and PostgreSQL) filled through the ``Store`` API
and from real kombu Redis lists filled by ``producer.queue.ShardSender`` at several
priorities, then parsed with prometheus_client's own parser and checked value by value. A
broker or database that is down, refusing or silent makes ``ichigo_up{component} 0`` in a
scrape that still answers 200 within its deadline. The Redis database is one of our own
(``queue_helpers.own_redis_db``), so a concurrent run of ``test_producer`` (db 13) is left
alone.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event, update

from ichigo_common.store.db import get_engine
from ichigo_common.store.models import File, Transcript, utcnow
from ichigo_common.store.repo import Store, TranscriptData
from ichigo_common.tasks import BULK_QUEUE, INTERACTIVE_QUEUE
from producer import jobstate
from producer.app import create_app
from producer.metrics import SCRAPE_TIMEOUT_S
from producer.queue import ShardSender, make_celery
from tests.queue_helpers import RedisDb, own_redis_db
from tests.test_producer import Env, db_url, make_env, pg_url  # noqa: F401 - fixtures

pytestmark = [pytest.mark.queue]

KEY = "metrics-test-key-0123456789"
Samples = dict[tuple[str, tuple], float]


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_redis() -> Iterator[RedisDb]:
    with own_redis_db() as db:
        yield db


@pytest.fixture
def menv(db_url, tmp_path, metrics_redis) -> Env:  # noqa: F811 - the fixture
    """test_producer's environment (SQLite or PostgreSQL), on our own Redis database."""
    metrics_redis.flush()
    env = make_env(db_url, tmp_path, metrics_redis.client())
    env.settings = dataclasses.replace(env.settings, broker_url=metrics_redis.url,
                                       result_backend=metrics_redis.url)
    yield env
    env.redis.close()
    metrics_redis.flush()


def parse(body: str) -> Samples:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def scrape(client: TestClient, **headers: str) -> tuple[Samples, float]:
    """(samples, seconds the scrape took); fails unless it is a 200 in the text format."""
    start = time.perf_counter()
    resp = client.get("/metrics", headers=headers)
    took = time.perf_counter() - start
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=")
    return parse(resp.text), took


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: v for (n, labels), v in samples.items() if n == name}


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def transcript(duration: float, tag: str) -> TranscriptData:
    return TranscriptData(model="m", content_hash=tag.rjust(64, "0"), text="hi", tokens=None,
                          chunks=[], duration_s=duration, processing_s=duration / 4,
                          provenance={})


def add_job(store: Store, n: int, state: str = "queued") -> tuple[str, list[int]]:
    job = store.create_job(source="api", model="m")
    rows = ({"path": f"/corpus/{job}/{i}.wav"} for i in range(n))
    return job, [fid for batch in store.add_files(job, rows, state=state) for fid, _ in batch]


@contextmanager
def counting_statements(url: str) -> Iterator[list[str]]:
    """The SQL statements run on ``url``'s (real) engine meanwhile."""
    seen: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:
        seen.append(statement)

    engine = get_engine(url)
    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


@contextmanager
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


# -- what a scrape reports --------------------------------------------------------------------


def fill_store(store: Store) -> None:
    """Jobs and files in every state; three transcripts made (one an hour ago), two reused.

    files: 2 pending, 2 queued, 1 running, 5 done, 1 failed, 3 cancelled;
    jobs: one expanding, queued, running, done and cancelled."""
    store.set_job_state(add_job(store, 2, state="pending")[0], "expanding")
    add_job(store, 2)
    _, ids = add_job(store, 6)
    claimed, _ = store.claim(ids, "w@h:1:t", lease_seconds=300, max_attempts=3)
    assert len(claimed) == 6  # the job is running now
    store.record_result(ids[0], transcript(10.0, "a"), 100)
    store.record_result(ids[1], transcript(20.5, "b"), 100)
    store.record_reuse(ids[2], store.find_transcript("a".rjust(64, "0"), "m"))
    store.record_result(ids[3], transcript(100.0, "old"), 100)
    store.record_failure(ids[4], "broken", duration_s=3.0)
    with store.session() as s:  # the third transcript and its file: an hour ago
        hour_ago = utcnow() - timedelta(hours=1)
        s.execute(update(File).where(File.id == ids[3]).values(finished_at=hour_ago))
        s.execute(update(Transcript).where(Transcript.file_id == ids[3])
                  .values(created_at=hour_ago))
    done_job, ids = add_job(store, 1)
    store.claim(ids, "w@h:1:t", lease_seconds=300, max_attempts=3)
    store.record_reuse(ids[0], store.find_transcript("b".rjust(64, "0"), "m"))
    assert store.finish_job_if_complete(done_job)
    assert jobstate.cancel(store, add_job(store, 3)[0]) == 3


def fill_queues(env: Env) -> None:
    """Shards at API priorities 0, 5 and 9 (kombu lists ``bulk\\x06\\x169``,
    ``bulk\\x06\\x163`` and ``bulk``) and two interactive messages."""
    celery = env.celery()
    ShardSender(celery, priority=0).send("job", [[1], [2]])
    ShardSender(celery, priority=5).send("job", [[3]])
    ShardSender(celery, priority=9).send("job", [[4], [5], [6]])
    ShardSender(celery, priority=9, queue=INTERACTIVE_QUEUE).send("job", [[7], [8]])
    lists = {key: env.redis.llen(key) for key in env.redis.scan_iter(match=f"{BULK_QUEUE}*")}
    assert lists == {b"bulk\x06\x169": 2, b"bulk\x06\x163": 1, b"bulk": 3}


def test_a_scrape_reports_what_the_store_and_the_queues_hold(menv):
    fill_store(menv.store)
    fill_queues(menv)
    with menv.client() as client:
        m, _ = scrape(client)
    assert by_label(m, "ichigo_up", "component") == {"database": 1, "broker": 1}
    assert by_label(m, "ichigo_files", "state") == {
        "pending": 2, "queued": 2, "running": 1, "done": 5, "failed": 1, "cancelled": 3}
    assert by_label(m, "ichigo_jobs", "state") == {
        "expanding": 1, "queued": 1, "running": 1, "done": 1, "failed": 0, "cancelled": 1}
    assert m[("ichigo_files_done_total", ())] == 5
    assert m[("ichigo_files_failed_total", ())] == 1
    assert m[("ichigo_files_done_audio_seconds_total", ())] == pytest.approx(
        10.0 + 20.5 + 10.0 + 100.0 + 20.5)  # reused transcripts count again here
    assert m[("ichigo_transcripts_total", ())] == 3
    assert m[("ichigo_audio_seconds_total", ())] == pytest.approx(130.5)  # model runs only
    assert m[("ichigo_processing_seconds_total", ())] == pytest.approx(130.5 / 4)
    assert m[("ichigo_files_done_last_5m", ())] == 4  # not the one finished an hour ago
    assert m[("ichigo_audio_seconds_last_5m", ())] == pytest.approx(30.5)
    assert by_label(m, "ichigo_queue_depth", "queue") == {"bulk": 6, "interactive": 2}
    assert by_label(m, "ichigo_build_info", "version") == {menv.app().version: 1}
    assert 0 <= m[("ichigo_scrape_seconds", ())] < SCRAPE_TIMEOUT_S


def test_an_empty_service_reports_zeros(menv):
    with menv.client() as client:
        m, _ = scrape(client)
    assert set(by_label(m, "ichigo_files", "state").values()) == {0}
    assert set(by_label(m, "ichigo_jobs", "state").values()) == {0}
    assert m[("ichigo_audio_seconds_total", ())] == 0
    assert m[("ichigo_files_done_last_5m", ())] == 0
    assert by_label(m, "ichigo_queue_depth", "queue") == {"bulk": 0, "interactive": 0}


def test_a_scrape_runs_the_same_few_queries_whatever_the_size_of_the_store(menv):
    with menv.client() as client:
        fill_store(menv.store)
        with counting_statements(menv.store.url) as small:
            scrape(client)
        for _ in range(5):
            _, ids = add_job(menv.store, 200)
            menv.store.claim(ids[:50], "w@h:1:t", lease_seconds=300, max_attempts=3)
        with counting_statements(menv.store.url) as large:
            m, _ = scrape(client)
    assert m[("ichigo_files", (("state", "queued"),))] == 2 + 5 * 150
    assert len(small) == len(large) <= 5, large  # 3 aggregates (+ BEGIN / SET LOCAL)


def test_openmetrics_when_asked_for(menv):
    fill_store(menv.store)
    with menv.client() as client:
        resp = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert resp.headers["content-type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in openmetrics_families(resp.text)}
    assert families["ichigo_files_done"].type == "counter"
    assert families["ichigo_files_done"].samples[0].value == 5
    assert resp.text.endswith("# EOF\n")


# -- components down --------------------------------------------------------------------------


def test_with_the_broker_refusing_metrics_still_answer_at_once(menv):
    fill_store(menv.store)
    closed = "redis://127.0.0.1:1/0"
    with menv.client(broker_url=closed, result_backend=closed) as client:
        m, took = scrape(client)
        status = client.get("/health/server-status")
    assert took < 2.0, took
    assert by_label(m, "ichigo_up", "component") == {"database": 1, "broker": 0}
    assert "ichigo_queue_depth" not in names(m)
    assert m[("ichigo_files_done_total", ())] == 5  # the store's figures are still there
    assert status.status_code == 503
    body = status.json()
    assert body["status"] == "unavailable" and body["broker"]["ok"] is False
    assert body["database"]["ok"] is True and body["workers"]["ok"] is False


def test_with_the_broker_silent_a_scrape_ends_at_its_deadline(menv):
    with silent_port() as port, menv.client(broker_url=f"redis://127.0.0.1:{port}/0") as client:
        m, took = scrape(client)
    assert took < SCRAPE_TIMEOUT_S + 1.5, took
    assert by_label(m, "ichigo_up", "component") == {"database": 1, "broker": 0}


def test_with_the_database_down_metrics_still_answer(menv):
    """A refused and then a hung PostgreSQL (no start-up: the app's schema check would
    refuse it). A read still hung from one scrape makes the next one answer at once."""
    celery = make_celery(menv.settings)
    refused = create_app(menv.settings, Store("postgresql+psycopg://postgres@127.0.0.1:1/x"),
                         celery)
    m, took = scrape(TestClient(refused))
    assert took < 2.0, took
    assert by_label(m, "ichigo_up", "component") == {"database": 0, "broker": 1}
    assert "ichigo_files" not in names(m) and "ichigo_queue_depth" in names(m)
    status = TestClient(refused).get("/health/server-status")
    assert status.status_code == 503 and status.json()["database"]["ok"] is False
    with silent_port() as port:
        hung = create_app(menv.settings,
                          Store(f"postgresql+psycopg://postgres@127.0.0.1:{port}/x"), celery)
        first, first_s = scrape(TestClient(hung))
        second, second_s = scrape(TestClient(hung))
    assert first_s < SCRAPE_TIMEOUT_S + 1.5, first_s
    assert second_s < 1.0, second_s
    for m in (first, second):
        assert by_label(m, "ichigo_up", "component") == {"database": 0, "broker": 1}


# -- /health/server-status --------------------------------------------------------------------


def test_server_status_answers_like_healthz(menv):
    with menv.client() as client:
        resp = client.get("/health/server-status")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "ok" and body["database"]["ok"] and body["broker"]["ok"]
    assert body["workers"]["names"] == []  # no worker runs here: information, not a 503


# -- the API key ------------------------------------------------------------------------------

GUARDED = ("/metrics", "/health/server-status", "/docs", "/redoc", "/openapi.json")


def test_with_a_key_everything_but_healthz_needs_it(menv):
    with menv.client(api_key=KEY) as client:
        assert client.get("/healthz", params={"workers": False}).status_code == 200
        for path in GUARDED:
            for headers in ({}, {"Authorization": f"Bearer {KEY[:-1]}x"}):
                resp = client.get(path, headers=headers)
                assert resp.status_code == 401, (path, headers)
                assert resp.headers["www-authenticate"] == "Bearer"
            resp = client.get(path, headers={"Authorization": f"Bearer {KEY}"})
            assert resp.status_code == 200, (path, resp.text)
        m, _ = scrape(client, Authorization=f"Bearer {KEY}")
    assert m[("ichigo_up", (("component", "database"),))] == 1


def test_without_a_key_the_pages_are_open(menv):
    with menv.client() as client:
        for path in GUARDED:
            assert client.get(path).status_code == 200, path
        schema = client.get("/openapi.json").json()
        docs = client.get("/docs").text
    assert {"/metrics", "/health/server-status", "/healthz"} <= set(schema["paths"])
    assert not {"/docs", "/redoc", "/openapi.json"} & set(schema["paths"])
    assert "/openapi.json" in docs and "swagger-ui" in docs
