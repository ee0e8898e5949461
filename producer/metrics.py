"""Prometheus metrics, read from the system of record at scrape time.

Nothing is counted in this process: the store and Redis hold the truth, so every API
replica answers the same, and a restart loses nothing. Each scrape runs a handful of
aggregate queries (GROUP BY, SUM; never one per file or job) and one LLEN per queue list,
each under a deadline; a component that does not answer turns into ``ichigo_up 0`` for it,
never a failed scrape.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from celery import Celery
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from ichigo_common.store.models import File, Job, Transcript, utcnow
from ichigo_common.store.repo import Store
from ichigo_common.tasks import BULK_QUEUE, INTERACTIVE_QUEUE

log = logging.getLogger(__name__)

QUERY_TIMEOUT_S = 2.5
RECENT_S = 300  # the window of the "last 5 minutes" gauges
#: kombu's Redis transport keeps a queue's priorities in separate lists: name, name\x06\x16N
PRIORITY_STEPS = (0, 3, 6, 9)
FILE_STATES = ("pending", "queued", "running", "done", "failed", "cancelled")
JOB_STATES = ("expanding", "queued", "running", "done", "failed", "cancelled")

_pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="ichigo-metrics")


def _bounded(fn: Callable[[], Any], what: str) -> Any | None:
    """``fn()`` under a deadline, or None (logged) if it fails or is late."""
    future = _pool.submit(fn)
    try:
        return future.result(timeout=QUERY_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - a component down is a value, not an error
        log.warning("metrics: %s unavailable: %s", what, exc or type(exc).__name__)
        return None


def store_figures(store: Store) -> dict[str, Any]:
    """Every store figure of a scrape, in one read-only transaction."""
    since = utcnow() - timedelta(seconds=RECENT_S)
    with store.session(readonly=True) as s:
        files = dict(s.execute(select(File.state, func.count()).group_by(File.state)).all())
        jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        audio, processing, transcripts = s.execute(
            select(func.coalesce(func.sum(Transcript.duration_s), 0.0),
                   func.coalesce(func.sum(Transcript.processing_s), 0.0), func.count())
        ).one()
        done_audio, done_files = s.execute(
            select(func.coalesce(func.sum(File.duration_s), 0.0), func.count())
            .where(File.state == "done")
        ).one()
        recent_files, recent_audio = s.execute(
            select(func.count(), func.coalesce(func.sum(File.duration_s), 0.0))
            .where(File.state == "done", File.finished_at >= since)
        ).one()
    return {"files": files, "jobs": jobs, "audio_s": float(audio),
            "processing_s": float(processing), "transcripts": int(transcripts),
            "done_audio_s": float(done_audio), "done_files": int(done_files),
            "recent_files": int(recent_files), "recent_audio_s": float(recent_audio)}


def queue_keys(queue: str) -> list[str]:
    return [queue] + [f"{queue}\x06\x16{p}" for p in PRIORITY_STEPS if p]


def queue_depths(celery: Celery, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting per queue (all priority lists), read straight from Redis."""
    import redis

    client = redis.Redis.from_url(celery.conf.broker_url, socket_timeout=QUERY_TIMEOUT_S,
                                  socket_connect_timeout=QUERY_TIMEOUT_S)
    try:
        with client.pipeline(transaction=False) as pipe:
            for queue in queues:
                for key in queue_keys(queue):
                    pipe.llen(key)
            counts = iter(pipe.execute())
        return {q: sum(next(counts) for _ in queue_keys(q)) for q in queues}
    finally:
        client.close()


class IchigoCollector(Collector):
    """Collects the service's figures on each scrape (``/metrics``)."""

    def __init__(self, store: Store, celery: Celery, version: str):
        self.store, self.celery, self.version = store, celery, version

    def collect(self):
        started = time.perf_counter()
        figures = _bounded(lambda: store_figures(self.store), "database")
        depths = None
        if str(self.celery.conf.broker_url or "").startswith(("redis://", "rediss://")):
            depths = _bounded(lambda: queue_depths(self.celery,
                                                   (BULK_QUEUE, INTERACTIVE_QUEUE)), "broker")
        up = GaugeMetricFamily("ichigo_up", "1 when the component answered this scrape",
                               labels=["component"])
        up.add_metric(["database"], 1.0 if figures is not None else 0.0)
        up.add_metric(["broker"], 1.0 if depths is not None else 0.0)
        yield up
        yield InfoMetricFamily("ichigo_build", "ichigo-batch version",
                               value={"version": self.version})
        if figures is not None:
            yield from self._store_metrics(figures)
        if depths is not None:
            depth = GaugeMetricFamily("ichigo_queue_depth", "messages (shards or requests) "
                                      "waiting in the broker", labels=["queue"])
            for queue, n in depths.items():
                depth.add_metric([queue], float(n))
            yield depth
        yield GaugeMetricFamily("ichigo_scrape_seconds", "time this scrape took",
                                value=time.perf_counter() - started)

    @staticmethod
    def _store_metrics(f: dict[str, Any]):
        files = GaugeMetricFamily("ichigo_files", "files by state", labels=["state"])
        for state in FILE_STATES:
            files.add_metric([state], float(f["files"].get(state, 0)))
        yield files
        jobs = GaugeMetricFamily("ichigo_jobs", "jobs by state", labels=["state"])
        for state in JOB_STATES:
            jobs.add_metric([state], float(f["jobs"].get(state, 0)))
        yield jobs
        yield CounterMetricFamily("ichigo_files_done", "files transcribed (incl. served from "
                                  "an earlier transcript)", value=f["done_files"])
        yield CounterMetricFamily("ichigo_files_failed", "files that failed, with a reason "
                                  "stored", value=f["files"].get("failed", 0))
        yield CounterMetricFamily("ichigo_audio_seconds", "seconds of audio in done files",
                                  value=f["done_audio_s"])
        yield CounterMetricFamily("ichigo_transcribed_audio_seconds", "seconds of audio the "
                                  "model actually ran on (one per transcript)",
                                  value=f["audio_s"])
        yield CounterMetricFamily("ichigo_processing_seconds", "model compute seconds spent",
                                  value=f["processing_s"])
        yield GaugeMetricFamily("ichigo_transcripts", "transcripts stored",
                                value=f["transcripts"])
        yield GaugeMetricFamily("ichigo_files_done_last_5m", "files finished in the last "
                                "5 minutes", value=f["recent_files"])
        yield GaugeMetricFamily("ichigo_audio_seconds_last_5m", "audio seconds finished in "
                                "the last 5 minutes", value=f["recent_audio_s"])
