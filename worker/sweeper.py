"""Recovery of work nobody holds a message for any more, run by every worker's main process.

Two ways a file can be left with no shard message to run it:

1. **A dead worker's leases.** A pool child that dies is covered by Celery (reject-on-worker-
   lost re-queues its shard at once). A worker whose *main* process dies (SIGKILL, OOM killer,
   lost host) takes the shard's message with it: Redis gives it back only after the
   visibility timeout (hours). Its files stay ``running`` with a lease nobody renews. Every
   ``ICHIGO_SWEEP_SECONDS`` this sweeper takes such files (atomically: one sweeper per file),
   puts them back to ``queued`` and sends new shards for them; when the old message comes
   back later it finds them done.

2. **Lost queued messages.** A Redis restarted without persistence (or failed over, or
   flushed) forgets every waiting shard; a publish can also fail half-way (a retry sent while
   the broker was down). Their files stay ``queued`` for ever. Rule: when the broker's queues
   (bulk, interactive and any other this app knows) hold *no* message at all, and a queued or
   running job still has queued files while nothing has happened in it for
   ``STALL_SWEEPS x ICHIGO_SWEEP_SECONDS`` (no file claimed or finished, none leased now, job
   not created since), shards are sent again for those files. An empty queue means no
   message waits for them; the idle time covers what the queue does not show: a message a
   worker has just taken and not yet claimed, a retry held with a countdown. A false alarm
   only costs a shard that finds its files leased or done. Jobs still ``expanding`` are left
   alone (the producer has not sent all their shards yet). Once re-sent, the queue is not
   empty any more, so the next passes send nothing until it drains. Limits: while another
   job keeps the queues busy, or a worker holds a file of the same job, nothing is re-sent;
   it happens once they are idle. With persistence (AOF, fsync always) waiting messages
   survive a restart; only a shard a worker was fetching at the crash can still be lost
   (kombu pops a message, then records it as unacknowledged in a second round trip), and this
   rule re-sends it.

It also closes jobs whose last file was finished by a worker that died before closing them.

Each pass costs O(1) queries: one ``LLEN`` pipeline per queue, one SQL query per rule (plus
one per job actually re-sent). Sending a shard twice is safe by design (files are leased in
the store), so the sweeper needs no lock of its own. No torch here: this runs in the worker's
parent process.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from celery import Celery

from ichigo_common.settings import Settings
from ichigo_common.store.repo import Store
from ichigo_common.tasks import BULK_QUEUE, INTERACTIVE_QUEUE, TRANSCRIBE_SHARD, shard_payload

log = logging.getLogger(__name__)

MAX_PRIORITY = 9  # the API's scale; Redis serves 0 first (see producer.queue)
#: a job idle for this many sweep intervals, with empty queues, has lost its messages
STALL_SWEEPS = 3


@dataclass
class SweepReport:
    files: int = 0  # files of dead workers re-sent
    shards: int = 0
    jobs_closed: int = 0
    orphans: int = 0  # queued files re-sent because the broker held no message for them
    orphan_shards: int = 0


def _send(app: Celery, store: Store, job_id: str, ids: list[int], size: int) -> int:
    job = store.get_job(job_id)
    priority = MAX_PRIORITY - (job.priority if job is not None else 0)
    sent = 0
    for i in range(0, len(ids), size):
        app.send_task(TRANSCRIBE_SHARD, kwargs=shard_payload(job_id, ids[i : i + size]),
                      queue=BULK_QUEUE, priority=priority, ignore_result=True)
        sent += 1
    return sent


def _by_job(rows: Iterable[tuple[str, int]]) -> dict[str, list[int]]:
    by_job: dict[str, list[int]] = defaultdict(list)
    for job_id, file_id in rows:
        by_job[job_id].append(file_id)
    return by_job


def _resend_expired(
    store: Store, app: Celery, settings: Settings, report: SweepReport
) -> set[str]:
    """Rule 1: files whose lease ended (their worker died) back to the queue. Returns the
    jobs concerned."""
    by_job = _by_job(store.requeue_expired())
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
    return set(by_job)


def waiting_messages(app: Celery) -> int:
    """Messages waiting in every queue this app knows (bulk and interactive always), all
    priority levels; messages taken by a worker and not yet acknowledged are not counted."""
    names = {BULK_QUEUE, INTERACTIVE_QUEUE, *app.amqp.queues.keys()}
    with app.connection_or_acquire() as conn:
        channel = conn.default_channel
        # on Redis a declare writes nothing and answers the summed LLEN of the queue's lists
        return sum(channel.queue_declare(queue=name).message_count for name in sorted(names))


def _resend_orphans(
    store: Store, app: Celery, settings: Settings, report: SweepReport, skip: set[str]
) -> None:
    """Rule 2: queued files of idle jobs, when the broker holds no message at all. Jobs in
    ``skip`` were just re-sent by rule 1: an idle worker may already hold that message (and
    not have claimed its files yet), which the empty queue would not show."""
    idle_s = STALL_SWEEPS * settings.sweep_seconds
    try:
        if waiting_messages(app):
            return
        rows = store.idle_queued_files(idle_s)
        by_job = _by_job((job_id, fid) for job_id, fid in rows if job_id not in skip)
        for job_id, ids in by_job.items():
            report.orphan_shards += _send(app, store, job_id, ids, settings.shard_files)
            report.orphans += len(ids)
    except Exception as exc:  # noqa: BLE001 - broker or store down: the files stay queued
        log.warning("sweeper: could not look for lost messages: %s", exc)
        return
    if report.orphans:
        log.warning("sweeper: %d queued files of %d jobs had no message in the broker (the "
                    "queues were empty, the jobs idle for %.0f s): re-sent in %d shards",
                    report.orphans, len(by_job), idle_s, report.orphan_shards)


def sweep(store: Store, app: Celery, settings: Settings) -> SweepReport:
    """One pass: re-send the files of dead workers and lost messages, close jobs left open."""
    report = SweepReport()
    resent = _resend_expired(store, app, settings, report)
    _resend_orphans(store, app, settings, report, skip=resent)
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
