"""Recovery of work a dead worker left behind, run by every worker's main process.

A pool child that dies is covered by Celery (reject-on-worker-lost re-queues its shard at
once). A worker whose *main* process dies (SIGKILL, OOM killer, lost host) takes the shard's
message with it: Redis gives it back only after the visibility timeout (hours). Its files
stay ``running`` with a lease nobody renews. Every ``ICHIGO_SWEEP_SECONDS`` this sweeper
takes such files (atomically: one sweeper per file), puts them back to ``queued`` and sends
new shards for them; when the old message comes back later it finds them done. It also
closes jobs whose last file was finished by a worker that died before closing the job.

Sending a shard twice is safe by design (files are leased in the store), so the sweeper
needs no lock of its own. No torch here: this runs in the worker's parent process.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass

from celery import Celery

from ichigo_common.settings import Settings
from ichigo_common.store.repo import Store
from ichigo_common.tasks import BULK_QUEUE, TRANSCRIBE_SHARD, shard_payload

log = logging.getLogger(__name__)

MAX_PRIORITY = 9  # the API's scale; Redis serves 0 first (see producer.queue)


@dataclass
class SweepReport:
    files: int = 0
    shards: int = 0
    jobs_closed: int = 0


def _send(app: Celery, store: Store, job_id: str, ids: list[int], size: int) -> int:
    job = store.get_job(job_id)
    priority = MAX_PRIORITY - (job.priority if job is not None else 0)
    sent = 0
    for i in range(0, len(ids), size):
        app.send_task(TRANSCRIBE_SHARD, kwargs=shard_payload(job_id, ids[i : i + size]),
                      queue=BULK_QUEUE, priority=priority, ignore_result=True)
        sent += 1
    return sent


def sweep(store: Store, app: Celery, settings: Settings) -> SweepReport:
    """One pass: re-send the files of dead workers, close jobs left open."""
    report = SweepReport()
    by_job: dict[str, list[int]] = defaultdict(list)
    for job_id, file_id in store.requeue_expired():
        by_job[job_id].append(file_id)
    for job_id, ids in by_job.items():
        try:
            report.shards += _send(app, store, job_id, sorted(ids), settings.shard_files)
            report.files += len(ids)
        except Exception as exc:  # noqa: BLE001 - the broker is down: try next time
            store.expire(ids)
            log.warning("sweeper: could not re-send %d files of job %s: %s", len(ids), job_id,
                        exc)
    if report.files:
        log.warning("sweeper: %d files of %d jobs left by dead workers re-sent in %d shards",
                    report.files, len(by_job), report.shards)
    for job_id in store.complete_jobs():
        from .tasks import finish_job

        if finish_job(store, job_id):
            report.jobs_closed += 1
    return report


class Sweeper:
    """``sweep`` every ``interval`` seconds in a daemon thread until stopped."""

    def __init__(self, store: Store, app: Celery, settings: Settings, interval: float):
        self.store, self.app, self.settings, self.interval = store, app, settings, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ichigo-sweeper", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                sweep(self.store, self.app, self.settings)
            except Exception as exc:  # noqa: BLE001 - a store outage must not end the thread
                log.warning("sweeper: pass failed: %s", exc)
