"""The ``TRANSCRIBE_SHARD`` task: claim a shard's files in the store, transcribe, record.

The message carries ids only (``job_id``, ``file_ids``); everything else (paths, model,
options, output folder) comes from the SQL store, the system of record, and every path is
re-checked against ``ICHIGO_ALLOWED_ROOTS`` before it is opened: anyone who can write to Redis
can enqueue anything.

A shard may run twice (late acks; Redis re-delivers a message older than the visibility
timeout even while it still runs): files are leased in the store, so a second copy claims
only what nobody holds, and results are written idempotently. When some of the shard's files
are leased by another worker, the task checks again once that lease could have expired
(``retry``): if the holder finished, there is nothing left to do; if it died (a killed pool
child is re-queued at once, long before its lease ends), the files are claimed again, their
attempts counted, and a poison file is failed after ``ICHIGO_MAX_ATTEMPTS``.

A database outage while a shard runs is waited out (``PatientStore``, see ``runner``); one
that outlasts that patience gives every file back and fails none of them (it says nothing
about the files), and the shard retries through the broker.

The model loads lazily in the pool child (never in the parent: CUDA does not survive fork)
and stays loaded for the next shards of the same model.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import time
from datetime import UTC, datetime
from typing import Any

from celery.exceptions import Reject, SoftTimeLimitExceeded
from kombu.exceptions import ChannelError
from sqlalchemy import select

from ichigo_common.settings import Settings, get_settings
from ichigo_common.store.models import File
from ichigo_common.store.repo import Claim, PatientStore, Store, aware_utc, is_transient
from ichigo_common.tasks import INTERACTIVE_QUEUE, TRANSCRIBE_SHARD

from .celery_app import SHUTTING_DOWN, app
from .runner import LeaseKeeper, UnitReport, process_claims

log = logging.getLogger(__name__)

MAX_FILE_IDS = 100_000  # a shard is bounded; a larger message is refused, not run
MAX_ERROR_RETRIES = 20  # failures outside any file (database down, ...) before giving up
PROGRESS_EVERY_S = 1.0

# the one model this pool child holds: (model name, device) -> IchigoModel
_loaded: dict[tuple[str, str | None], Any] = {}


def worker_device() -> str | None:
    """``ICHIGO_DEVICE`` (``ichigo worker --gpu N`` sets ``cuda``); None picks automatically."""
    return os.environ.get("ICHIGO_DEVICE") or None


def load_model(name: str):
    """The model for ``name``, loaded once per process; loading another one drops the first,
    so a worker serving several models never holds more than one on its GPU."""
    key = (name, worker_device())
    if key not in _loaded:
        if _loaded:
            _loaded.clear()
            gc.collect()
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        from transformers.utils import logging as hf_logging

        from ichigo_pipeline.model import IchigoModel, ModelSpec

        hf_logging.disable_progress_bar()  # no tqdm bars in worker logs
        started = time.perf_counter()
        _loaded[key] = IchigoModel(ModelSpec.resolve(name), device=key[1])
        log.info("loaded model %s in %.1f s", name, time.perf_counter() - started)
    return _loaded[key]


def _validate(job_id: Any, file_ids: Any) -> tuple[str, list[int]]:
    if not isinstance(job_id, str) or not 0 < len(job_id) <= 64 or not job_id.isalnum():
        raise Reject(f"invalid job_id {job_id!r:.80}", requeue=False)
    if not isinstance(file_ids, list) or len(file_ids) > MAX_FILE_IDS:
        raise Reject(f"file_ids must be a list of at most {MAX_FILE_IDS} ids", requeue=False)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in file_ids):
        raise Reject("file_ids must be integers", requeue=False)
    return job_id, list(dict.fromkeys(file_ids))


def _files_of_job(store: Store, job_id: str, file_ids: list[int]) -> list[int]:
    """The ids among ``file_ids`` that belong to ``job_id`` (a message naming another job's
    files must not run them with this job's model, options and output folder)."""
    with store.session() as s:
        rows = s.scalars(select(File.id).where(File.job_id == job_id, File.id.in_(file_ids)))
        return list(rows)


def _held_elsewhere(store: Store, file_ids: list[int], owner: str) -> float | None:
    """Seconds until the earliest lease on these files held by another owner ends (at least
    1), or None when no other worker holds any of them."""
    with store.session() as s:
        ends = s.scalars(
            select(File.lease_expires_at).where(
                File.id.in_(file_ids),
                File.state == "running",
                File.lease_owner != owner,
                File.lease_expires_at.is_not(None),
            )
        ).all()
    if not ends:
        return None
    now = datetime.now(UTC)
    return max(1.0, (min(aware_utc(t) for t in ends) - now).total_seconds() + 1.0)


def _give_back(
    store: Store, claims: list[Claim], owner: str, reason: str, max_attempts: int | None
) -> int:
    """After a failure outside any one file: fail the files still ours that have had their
    last attempt (with the real reason), release the others so they are claimable at once;
    ``max_attempts`` None fails none (the failure says nothing about the files). Returns how
    many were released."""
    ids = [c.id for c in claims]
    with store.session() as s:
        ours = set(
            s.scalars(
                select(File.id).where(
                    File.id.in_(ids), File.state == "running", File.lease_owner == owner
                )
            )
        )
    limit = max_attempts if max_attempts is not None else float("inf")
    last = [c for c in claims if c.id in ours and c.attempts >= limit]
    for c in last:
        store.record_failure(c.id, f"{reason} (attempt {c.attempts} of {max_attempts})")
    again = [c.id for c in claims if c.id in ours and c.attempts < limit]
    if again:
        store.release(again, owner)
    return len(again)


def _post_callback(url: str, payload: dict) -> None:
    import httpx

    try:
        resp = httpx.post(url, json=payload, timeout=httpx.Timeout(10.0, connect=5.0))
        resp.raise_for_status()
    except Exception as exc:  # noqa: BLE001 - a callback never fails the shard
        where = url.split("?", 1)[0]  # a query string may carry a token: not in the logs
        log.warning("callback for job %s to %s failed: %s", payload.get("job_id"), where, exc)


def finish_job(store: Store, job_id: str) -> bool:
    """Close the job if no file is open (once: True only for the call that did it), then
    post its callback."""
    if not store.finish_job_if_complete(job_id):
        return False
    log.info("job %s done", job_id)
    url = store.take_callback(job_id)
    if url:
        _post_callback(url, {"job_id": job_id, "state": "done", **store.job_counts(job_id)})
    return True


class _Progress:
    """Progress of a shard, to the result backend (``PROGRESS`` state, polled by clients;
    skipped when the sender asked for no result) and as a ``task-progress`` event (what Flower
    shows), at most once a second."""

    def __init__(self, task, job_id: str, total: int, exhausted: int):
        self.task, self.job_id, self.total, self.exhausted = task, job_id, total, exhausted
        self.last = 0.0

    def __call__(self, report: UnitReport, force: bool = False) -> None:
        finished = report.done + report.reused + report.failed
        now = time.monotonic()
        if not force and finished < self.total and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        meta = {
            "job_id": self.job_id,
            "total": self.total,
            "finished": finished,
            "done": report.done,
            "reused": report.reused,
            "failed": report.failed + self.exhausted,
            "audio_s": round(report.audio_s, 3),
        }
        if not self.task.request.id:
            return
        try:
            if not self.task.request.ignore_result:  # a sender that wants no result
                self.task.update_state(state="PROGRESS", meta=meta)
            # Flower keeps only known fields of a task: ``result`` carries the progress, so
            # its task list shows state PROGRESS with "finished/total" while a shard runs
            summary = (f"{finished}/{self.total} files ({report.done} done, "
                       f"{report.reused} reused, {meta['failed']} failed)")
            self.task.send_event("task-progress", result=summary, **meta)
        except Exception as exc:  # noqa: BLE001 - progress is best effort
            log.debug("progress not sent: %s", exc)


def _interactive_waiting() -> bool:
    """Whether a shard waits in the interactive queue (a user is waiting for it)."""
    try:
        with app.connection_for_read() as conn:
            ok = conn.default_channel.queue_declare(INTERACTIVE_QUEUE, passive=True)
            return ok.message_count > 0
    except ChannelError:  # no such queue: on Redis, a queue's list exists only while full
        return False
    except Exception as exc:  # noqa: BLE001 - unknown: do not hold the worker longer
        log.debug("could not look at the interactive queue: %s", exc)
        return True


class _Extension:
    """``more_claims`` for a shard: while the shard has run less than
    ``ICHIGO_SHARD_EXTEND_SECONDS``, no interactive shard waits and the worker is not
    shutting down, lease the next files of the same job that no one has tried (newest
    first, a batch at a time, when fewer than two batches are in flight), so the worker's
    batches stay full across shard boundaries instead of every shard ending on a small
    batch. The shards those files came from find them done when they run. The leased files
    join the shard's claims (lease renewal, give-back on failure, progress)."""

    def __init__(self, store: Store, settings: Settings, job_id: str, owner: str,
                 claims: list[Claim], exhausted: list[Claim], lease_ids: list[int],
                 progress: _Progress):
        self.store, self.settings, self.job_id, self.owner = store, settings, job_id, owner
        self.claims, self.exhausted, self.lease_ids = claims, exhausted, lease_ids
        self.progress = progress
        self.deadline = time.monotonic() + settings.shard_extend_seconds

    def __call__(self) -> list[Claim]:
        if SHUTTING_DOWN.value or time.monotonic() >= self.deadline or _interactive_waiting():
            return []
        s = self.settings
        try:
            claimed, exhausted = self.store.claim_queued(
                self.job_id, self.owner, s.lease_seconds, s.max_attempts, s.batch_size
            )
        except Exception as exc:  # noqa: BLE001 - the shard's own files go on regardless
            log.warning("job %s: could not extend the shard: %s", self.job_id, exc)
            return []
        for c in exhausted:
            log.warning("file %d of job %s failed: gave up after %d attempts", c.id,
                        self.job_id, c.attempts)
        self.lease_ids.extend(c.id for c in claimed)
        self.claims.extend(claimed)
        self.exhausted.extend(exhausted)
        self.progress.total += len(claimed)
        self.progress.exhausted += len(exhausted)
        return claimed


def _run_unit(
    task, store: Store, settings: Settings, job, claims: list[Claim], owner: str,
    exhausted: list[Claim],
) -> UnitReport:
    options = job.options or {}
    progress = _Progress(task, job.id, len(claims), len(exhausted))
    progress(UnitReport(), force=True)
    lease_ids = [c.id for c in claims]
    extend = (
        _Extension(store, settings, job.id, owner, claims, exhausted, lease_ids, progress)
        if settings.shard_extend_seconds > 0
        else None
    )
    # the leases are kept from the claim on: loading a model can outlast a lease
    with LeaseKeeper(store, lease_ids, owner, settings.lease_seconds):
        model = load_model(job.model)
        report = process_claims(
            store,
            model,
            job.model,
            claims,
            roots=settings.readable_roots,
            batch_size=settings.batch_size,
            output_dir=job.output_dir,
            force=bool(options.get("force", False)),
            language=options.get("language") or None,
            prompt=options.get("prompt") or None,
            on_file=progress,
            extra_provenance={
                "worker": task.request.hostname or socket.gethostname(),
                "task_id": task.request.id,
            },
            more_claims=extend,
        )
    progress(report, force=True)
    return report


def _backoff(retries: int) -> float:
    return float(min(300, 5 * 2 ** min(retries, 6)))


def _claim(task, store: Store, settings: Settings, job_id: str, file_ids: list[int], owner: str):
    """(job, ids of the shard in that job, claimed, exhausted); job None if unknown."""
    try:
        job = store.get_job(job_id)
        if job is None:
            return None, [], [], []
        ids = _files_of_job(store, job_id, file_ids)
        if len(ids) < len(file_ids):
            log.warning(
                "shard of job %s names %d files of no such job: ignored",
                job_id,
                len(file_ids) - len(ids),
            )
        claimed, exhausted = store.claim(ids, owner, settings.lease_seconds, settings.max_attempts)
    except Exception as exc:
        # the store is unreachable or broken: nothing is leased yet, try again later
        if task.request.retries >= MAX_ERROR_RETRIES:
            raise
        log.warning("shard of job %s could not be claimed (%s); retrying", job_id, exc)
        raise task.retry(exc=exc, countdown=_backoff(task.request.retries)) from exc
    for c in exhausted:
        log.warning("file %d of job %s failed: gave up after %d attempts", c.id, job_id, c.attempts)
    return job, ids, claimed, exhausted


def _process(
    task, store: Store, settings: Settings, job, claims: list[Claim], owner: str,
    exhausted: list[Claim],
) -> UnitReport | None:
    """Run the claimed files; on a failure that is no one file's, give them back and retry."""
    try:
        return _run_unit(task, store, settings, job, claims, owner, exhausted)
    except SoftTimeLimitExceeded as exc:
        left = _give_back(
            store, claims, owner, "shard ran past its time limit", settings.max_attempts
        )
        log.warning("shard of job %s hit its time limit; %d files released", job.id, left)
        if left:
            raise task.retry(exc=exc, countdown=1) from exc
    except Exception as exc:
        # not one file's fault (process_claims records each file's own errors): the model
        # did not load, the store failed... hand the files back and try again; the store's
        # attempt count ends this for a file that keeps failing. A database outage longer
        # than the store's patience fails no file: it says nothing about them.
        limit = None if is_transient(exc) else settings.max_attempts
        left = _give_back(store, claims, owner, f"worker error: {exc}"[:1500], limit)
        log.exception("shard of job %s failed; %d files released", job.id, left)
        if left:
            raise task.retry(exc=exc, countdown=_backoff(task.request.retries)) from exc
    except BaseException:
        # warm/cold shutdown (WorkerShutdown, WorkerTerminate, KeyboardInterrupt): give the
        # files back so that the re-delivered shard can claim them at once
        store.release([c.id for c in claims], owner)
        raise
    return None


@app.task(bind=True, name=TRANSCRIBE_SHARD, max_retries=None)
def transcribe_shard(self, job_id: str, file_ids: list[int]) -> dict:
    """Transcribe the claimable files among ``file_ids`` of job ``job_id``."""
    job_id, file_ids = _validate(job_id, file_ids)
    settings = get_settings()
    # result writes, give-backs and closing the job wait out a short database outage
    store = PatientStore(settings.database_url)
    host = self.request.hostname or socket.gethostname()
    owner = f"{host}:{os.getpid()}:{self.request.id}"
    summary: dict[str, Any] = {
        "job_id": job_id,
        "files": len(file_ids),
        "claimed": 0,
        "done": 0,
        "reused": 0,
        "failed": 0,
        "exhausted": 0,
        "audio_s": 0.0,
        "worker": host,
    }
    job, ids, claims, exhausted = _claim(self, store, settings, job_id, file_ids, owner)
    if job is None:
        log.warning("shard for unknown job %s: nothing to do", job_id)
        return dict(summary, error="unknown job")
    summary.update(claimed=len(claims), exhausted=len(exhausted), failed=len(exhausted))
    if claims:
        report = _process(self, store, settings, job, claims, owner, exhausted)
        # the shard may have grown (``_Extension``): claims and exhausted are the totals
        summary.update(claimed=len(claims), exhausted=len(exhausted), failed=len(exhausted))
        if report is not None:
            summary.update(
                done=report.done,
                reused=report.reused,
                failed=report.failed + len(exhausted),
                audio_s=round(report.audio_s, 3),
            )
    if claims or exhausted:
        summary["job_done"] = finish_job(store, job_id)
    wait = _held_elsewhere(store, ids, owner)
    if wait is not None:
        # another worker holds some of these files: look again once its lease could have
        # ended (it finished them, or it died and they are claimable again)
        log.info("shard of job %s: files leased elsewhere; checking again in %.0f s", job_id, wait)
        raise self.retry(countdown=wait)
    return summary
