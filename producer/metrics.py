"""Prometheus metrics, read from the system of record at scrape time.

Nothing is counted in this process: the store and Redis hold the truth, so every API
replica answers the same and a restart loses nothing. A scrape runs three aggregate queries
(GROUP BY / SUM, never one per file or job) and one pipelined LLEN per queue list. The
database and the broker are read side by side, each in a thread of its own under one
deadline; a component that does not answer in time is ``ichigo_up{component=...} 0``, never
a failed scrape. Counters are sums over rows that are never deleted, so they only grow.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select, text
from sqlalchemy.orm import Session

from ichigo_common.store.models import File, Job, Transcript, utcnow
from ichigo_common.store.repo import Store
from ichigo_common.tasks import BULK_QUEUE, INTERACTIVE_QUEUE

log = logging.getLogger(__name__)

#: how long a scrape waits for the database and the broker (together, not one after the other)
SCRAPE_TIMEOUT_S = 2.5
RECENT_S = 300  # the window of the ``*_last_5m`` gauges
#: kombu's Redis transport keeps each priority step of a queue in a list of its own
#: (``bulk``, ``bulk\x06\x163``, ...); every priority sent maps to one of these steps
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEP = "\x06\x16"
QUEUES = (BULK_QUEUE, INTERACTIVE_QUEUE)
FILE_STATES = ("pending", "queued", "running", "done", "failed", "cancelled")
JOB_STATES = ("expanding", "queued", "running", "done", "failed", "cancelled")
NO_FILES = (0, 0.0, 0)  # a file state without rows: count, audio seconds, recently finished


# -- reads under a deadline ------------------------------------------------------------------


class OneAtATime:
    """Runs one component's read in a daemon thread, at most one at a time.

    A read still hung from an earlier scrape (a black-holed database) makes the next scrape
    report the component down at once: threads never pile up, and a stuck database cannot
    starve the broker's read (a shared pool could). Daemon threads: a hung read never
    blocks the API's shutdown."""

    def __init__(self, what: str):
        self.what = what
        self._busy = threading.Lock()

    def start(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        if not self._busy.acquire(blocking=False):
            future.set_exception(RuntimeError("an earlier read has not returned yet"))
            return future

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting scrape
                future.set_exception(exc)
            finally:
                self._busy.release()

        threading.Thread(target=run, name=f"ichigo-metrics-{self.what}", daemon=True).start()
        return future


def outcome(future: Future, deadline: float, what: str) -> Any | None:
    """The read's value, or None (logged) if it failed or is still running at ``deadline``."""
    try:
        return future.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        log.warning("metrics: %s gave no answer within %g s", what, SCRAPE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - a component down is a value, not an error
        log.warning("metrics: %s unavailable: %s", what, exc or type(exc).__name__)
    return None


# -- the store -------------------------------------------------------------------------------


def _file_rows(s: Session, since: datetime) -> dict[str, tuple[int, float, int]]:
    """Per file state: count, audio seconds, how many finished since ``since``."""
    recent = func.sum(case((File.finished_at >= since, 1), else_=0))
    rows = s.execute(
        select(File.state, func.count(), func.coalesce(func.sum(File.duration_s), 0.0),
               func.coalesce(recent, 0))
        .group_by(File.state)
    ).all()
    return {state: (int(n), float(audio), int(new)) for state, n, audio, new in rows}


def _transcript_sums(s: Session, since: datetime) -> tuple[int, float, float, float]:
    """Transcripts (model runs): count, audio seconds, compute seconds, audio seconds since."""
    recent = func.sum(case((Transcript.created_at >= since, Transcript.duration_s), else_=0.0))
    n, audio, processing, new = s.execute(
        select(func.count(), func.coalesce(func.sum(Transcript.duration_s), 0.0),
               func.coalesce(func.sum(Transcript.processing_s), 0.0),
               func.coalesce(recent, 0.0))
    ).one()
    return int(n), float(audio), float(processing), float(new)


def store_figures(store: Store) -> dict[str, Any]:
    """Every store figure of a scrape: three aggregate queries in one read-only transaction
    (PostgreSQL cancels them itself past the deadline, so a slow scan stops costing)."""
    since = utcnow() - timedelta(seconds=RECENT_S)
    with store.session(readonly=True) as s:
        if s.get_bind().dialect.name == "postgresql":
            s.execute(text(f"SET LOCAL statement_timeout = {int(SCRAPE_TIMEOUT_S * 1000)}"))
        files = _file_rows(s, since)
        jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        transcripts = _transcript_sums(s, since)
    return {"files": files, "jobs": jobs, "transcripts": transcripts}


# -- the broker ------------------------------------------------------------------------------


def queue_keys(queue: str) -> list[str]:
    """The Redis lists kombu keeps ``queue``'s messages in, one per priority step."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


def is_redis(url: str | None) -> bool:
    return str(url or "").startswith(("redis://", "rediss://"))


def queue_depths(broker_url: str, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting per queue (all its priority lists), in one pipelined round trip.
    Messages a worker has fetched but not yet acknowledged are not waiting: not counted."""
    import redis

    queues = list(queues)
    client = redis.Redis.from_url(broker_url, socket_timeout=SCRAPE_TIMEOUT_S,
                                  socket_connect_timeout=SCRAPE_TIMEOUT_S)
    try:
        with client.pipeline(transaction=False) as pipe:
            for queue in queues:
                for key in queue_keys(queue):
                    pipe.llen(key)
            counts = iter(pipe.execute())
        return {queue: sum(next(counts) for _ in queue_keys(queue)) for queue in queues}
    finally:
        client.close()


# -- the collector ---------------------------------------------------------------------------


class IchigoCollector(Collector):
    """The service's figures, read afresh on every scrape of ``/metrics``."""

    def __init__(self, store: Store, celery: Celery, version: str):
        self.store, self.version = store, version
        self.broker_url = celery.conf.broker_url
        self._database = OneAtATime("database")
        self._broker = OneAtATime("broker")

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        deadline = started + SCRAPE_TIMEOUT_S
        figures = self._database.start(lambda: store_figures(self.store))
        # queue depth is read from Redis only; another broker has no ichigo_queue_depth
        depths = (self._broker.start(lambda: queue_depths(self.broker_url, QUEUES))
                  if is_redis(self.broker_url) else None)
        figures = outcome(figures, deadline, "database")
        depths = outcome(depths, deadline, "broker") if depths is not None else None
        yield from self._status(figures is not None, depths, is_redis(self.broker_url))
        if figures is not None:
            yield from store_metrics(figures)
        yield GaugeMetricFamily("ichigo_scrape_seconds", "Time this scrape took to collect",
                                value=time.monotonic() - started)

    def _status(self, db_up: bool, depths: dict[str, int] | None,
                redis_broker: bool) -> Iterator[Metric]:
        up = GaugeMetricFamily("ichigo_up", "1 when the component answered this scrape in "
                               "time, else 0", labels=["component"])
        up.add_metric(["database"], float(db_up))
        if redis_broker:
            up.add_metric(["broker"], float(depths is not None))
        yield up
        yield InfoMetricFamily("ichigo_build", "The ichigo-batch version serving this API",
                               value={"version": self.version})
        if depths is not None:
            depth = GaugeMetricFamily("ichigo_queue_depth", "Messages (shards of files, "
                                      "interactive requests) waiting in the broker",
                                      labels=["queue"])
            for queue, n in depths.items():
                depth.add_metric([queue], float(n))
            yield depth


def store_metrics(f: dict[str, Any]) -> Iterator[Metric]:
    """The families read from the store (``f``: what ``store_figures`` returned)."""
    files = f["files"]
    n_transcripts, audio_s, processing_s, recent_audio_s = f["transcripts"]
    count = GaugeMetricFamily("ichigo_files", "Files by state", labels=["state"])
    for state in FILE_STATES:
        count.add_metric([state], float(files.get(state, NO_FILES)[0]))
    yield count
    jobs = GaugeMetricFamily("ichigo_jobs", "Jobs by state", labels=["state"])
    for state in JOB_STATES:
        jobs.add_metric([state], float(f["jobs"].get(state, 0)))
    yield jobs
    done, done_audio_s, recent_done = files.get("done", NO_FILES)
    yield CounterMetricFamily("ichigo_files_done", "Files done (transcribed, or served "
                              "from an earlier transcript of the same audio)", value=done)
    yield CounterMetricFamily("ichigo_files_failed", "Files that failed (the reason is "
                              "stored with the file)", value=files.get("failed", NO_FILES)[0])
    yield CounterMetricFamily("ichigo_files_done_audio_seconds", "Audio seconds of the files "
                              "done, reused transcripts included", value=done_audio_s)
    yield CounterMetricFamily("ichigo_transcripts", "Transcripts made (model runs)",
                              value=n_transcripts)
    yield CounterMetricFamily("ichigo_audio_seconds", "Audio seconds the model transcribed "
                              "(sum over transcripts)", value=audio_s)
    yield CounterMetricFamily("ichigo_processing_seconds", "Seconds the workers spent "
                              "transcribing that audio", value=processing_s)
    yield GaugeMetricFamily("ichigo_files_done_last_5m", "Files done in the last 5 minutes",
                            value=recent_done)
    yield GaugeMetricFamily("ichigo_audio_seconds_last_5m", "Audio seconds transcribed in the "
                            "last 5 minutes", value=recent_audio_s)
