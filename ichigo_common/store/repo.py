"""Store operations used by the producer, the workers and in-process runs.

Every write is idempotent where a unit can run twice (late acks): one transcript per file
(unique ``file_id``, insert-or-ignore), state changes guarded by the current state and lease.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from .db import get_engine, session_scope
from .models import File, Job, Transcript, utcnow

log = logging.getLogger(__name__)

OPEN_STATES = ("pending", "queued", "running")
FINAL_FILE_STATES = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class Claim:
    id: int
    job_id: str
    path: str
    attempts: int


@dataclass(frozen=True)
class TranscriptData:
    model: str
    content_hash: str
    text: str
    tokens: str | None
    chunks: list[dict[str, Any]]
    duration_s: float
    processing_s: float
    provenance: dict[str, Any]


def _batched(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def aware_utc(ts: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything stored is UTC
    if ts is not None and ts.tzinfo is None:
        return ts.replace(tzinfo=UTC)
    return ts


class Store:
    """The SQL store at ``url`` (SQLite file or PostgreSQL)."""

    def __init__(self, url: str):
        self.url = url

    def session(self, readonly: bool = False):
        return session_scope(self.url, readonly)

    @property
    def dialect(self) -> str:
        return get_engine(self.url).dialect.name

    # -- jobs and files ---------------------------------------------------------------

    def create_job(
        self,
        *,
        source: str,
        model: str,
        options: dict | None = None,
        name: str | None = None,
        priority: int = 0,
        output_dir: str | None = None,
        callback_url: str | None = None,
        state: str = "queued",
    ) -> str:
        with self.session() as s:
            job = Job(
                source=source,
                model=model,
                options=options or {},
                name=name,
                priority=priority,
                output_dir=output_dir,
                callback_url=callback_url,
                state=state,
            )
            s.add(job)
            s.flush()
            return job.id

    def set_job_state(self, job_id: str, state: str, error: str | None = None) -> None:
        with self.session() as s:
            values: dict[str, Any] = {"state": state}
            if error is not None:
                values["error"] = error
            if state in ("done", "cancelled", "failed"):
                values["finished_at"] = utcnow()
            s.execute(update(Job).where(Job.id == job_id).values(**values))

    def add_files(
        self, job_id: str, rows: Iterable[dict[str, Any]], batch: int = 1000, state: str = "queued"
    ) -> Iterator[list[tuple[int, int | None]]]:
        """Insert files (dicts with ``path`` and optional ``size``) in batches, yielding each
        batch's ``(file_id, size)`` as it is committed, so huge jobs stream in bounded memory."""
        for chunk in _batched(rows, batch):
            with self.session() as s:
                objs = [
                    File(job_id=job_id, path=r["path"], size=r.get("size"), state=state)
                    for r in chunk
                ]
                s.add_all(objs)
                s.flush()
                ids = [(o.id, o.size) for o in objs]
            yield ids  # committed: the caller may open other transactions now

    def get_job(self, job_id: str) -> Job | None:
        with self.session(readonly=True) as s:
            return s.get(Job, job_id)

    def list_jobs(self, limit: int = 50, offset: int = 0) -> list[Job]:
        with self.session(readonly=True) as s:
            q = select(Job).order_by(Job.created_at.desc()).limit(limit).offset(offset)
            return list(s.scalars(q))

    def list_files(
        self, job_id: str, state: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[tuple[File, Transcript | None]]:
        with self.session(readonly=True) as s:
            q = (
                select(File, Transcript)
                .outerjoin(Transcript, Transcript.id == File.transcript_id)
                .where(File.job_id == job_id)
                .order_by(File.id)
                .limit(limit)
                .offset(offset)
            )
            if state:
                q = q.where(File.state == state)
            return [(f, t) for f, t in s.execute(q).all()]

    def job_counts(self, job_id: str) -> dict[str, Any]:
        """Files per state and audio seconds done / known in total."""
        with self.session(readonly=True) as s:
            rows = s.execute(
                select(File.state, func.count(), func.coalesce(func.sum(File.duration_s), 0.0))
                .where(File.job_id == job_id)
                .group_by(File.state)
            ).all()
        counts = {state: n for state, n, _ in rows}
        seconds = {state: float(sec) for state, _, sec in rows}
        return {
            "files": counts,
            "total": sum(counts.values()),
            "audio_s_done": seconds.get("done", 0.0),
            "audio_s_known": sum(seconds.values()),
        }

    def cancel_job(self, job_id: str) -> int:
        """Cancel every file that has not started; running files finish. Returns how many."""
        with self.session() as s:
            res = s.execute(
                update(File)
                .where(File.job_id == job_id, File.state.in_(("pending", "queued")))
                .values(state="cancelled", finished_at=utcnow())
            )
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state.in_(("expanding", "queued", "running")))
                .values(state="cancelled", finished_at=utcnow())
            )
            return res.rowcount or 0

    def finish_job_if_complete(self, job_id: str) -> bool:
        """Mark the job done when no file is open; True only for the call that did it."""
        with self.session() as s:
            open_files = s.scalar(
                select(func.count())
                .select_from(File)
                .where(File.job_id == job_id, File.state.in_(OPEN_STATES))
            )
            if open_files:
                return False
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state.in_(("queued", "running")))
                .values(state="done", finished_at=utcnow())
            )
            return bool(res.rowcount)

    def take_callback(self, job_id: str) -> str | None:
        """The job's callback URL, once: the first caller gets it, later callers None."""
        with self.session() as s:
            res = s.execute(
                update(Job)
                .where(
                    Job.id == job_id, Job.callback_sent.is_(False), Job.callback_url.is_not(None)
                )
                .values(callback_sent=True)
            )
            if not res.rowcount:
                return None
            return s.scalar(select(Job.callback_url).where(Job.id == job_id))

    # -- work units: leases, results ----------------------------------------------------

    def claim(
        self, file_ids: list[int], owner: str, lease_seconds: float, max_attempts: int
    ) -> tuple[list[Claim], list[Claim]]:
        """Lease the claimable files among ``file_ids``: queued/pending ones, or running ones
        whose lease expired (their worker died). Files leased by a live worker, or finished,
        are skipped. Returns (claimed, exhausted): exhausted files had already been tried
        ``max_attempts`` times and are now failed."""
        now = utcnow()
        claimed, exhausted = [], []
        with self.session() as s:
            q = (
                select(File)
                .where(
                    File.id.in_(file_ids),
                    or_(
                        File.state.in_(("pending", "queued")),
                        (File.state == "running") & (File.lease_expires_at < now),
                    ),
                )
                .with_for_update(skip_locked=True)
            )
            for f in s.scalars(q):
                if f.attempts >= max_attempts:
                    f.state, f.finished_at = "failed", now
                    f.error = (
                        f"gave up after {f.attempts} attempts: the worker processing it "
                        "died each time"
                    )
                    f.lease_owner = f.lease_expires_at = None
                    exhausted.append(Claim(f.id, f.job_id, f.path, f.attempts))
                    continue
                f.state, f.attempts = "running", f.attempts + 1
                f.lease_owner, f.lease_expires_at = owner, now + timedelta(seconds=lease_seconds)
                f.started_at = f.started_at or now
                claimed.append(Claim(f.id, f.job_id, f.path, f.attempts))
            job_ids = {c.job_id for c in claimed}
            if job_ids:
                s.execute(
                    update(Job)
                    .where(Job.id.in_(job_ids), Job.state == "queued")
                    .values(state="running", started_at=now)
                )
        return claimed, exhausted

    def claim_queued(
        self, job_id: str, owner: str, lease_seconds: float, max_attempts: int, limit: int
    ) -> tuple[list[Claim], list[Claim]]:
        """Lease up to ``limit`` of the job's files that no one has tried yet, newest first
        (the far end from the shards workers take in order, so a worker extending its shard
        rarely meets another worker's claim). Files an earlier attempt left (their worker
        died) are not taken: they go back through their own shard, so one file is never
        charged an attempt by every worker that dies with it. Returns ``claim``'s result."""
        with self.session(readonly=True) as s:
            ids = list(
                s.scalars(
                    select(File.id)
                    .where(File.job_id == job_id, File.state.in_(("pending", "queued")),
                           File.attempts == 0)
                    .order_by(File.id.desc())
                    .limit(limit)
                )
            )
        if not ids:
            return [], []
        return self.claim(ids, owner, lease_seconds, max_attempts)

    def renew(self, file_ids: list[int], owner: str, lease_seconds: float) -> None:
        """Extend the leases ``owner`` holds among ``file_ids`` (in groups of 1000 ids: a
        long in-process run may name many, and SQLite bounds a statement's parameters)."""
        with self.session() as s:
            for group in _batched(file_ids, 1000):
                s.execute(
                    update(File)
                    .where(File.id.in_(group), File.lease_owner == owner,
                           File.state == "running")
                    .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
                )

    def find_transcript(self, content_hash: str, model: str) -> Transcript | None:
        with self.session(readonly=True) as s:
            return s.scalars(
                select(Transcript)
                .where(Transcript.content_hash == content_hash, Transcript.model == model)
                .order_by(Transcript.id)
                .limit(1)
            ).first()

    def _insert_ignore(self, s: Session, values: dict[str, Any]) -> None:
        dialect = sqlite if self.dialect == "sqlite" else postgresql
        s.execute(
            dialect.insert(Transcript)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["file_id"])
        )

    def record_result(self, file_id: int, data: TranscriptData, size: int | None = None) -> int:
        """Store the file's transcript (at most one row, whatever the retries) and mark it
        done. Returns the transcript id."""
        with self.session() as s:
            self._insert_ignore(
                s,
                {
                    "file_id": file_id,
                    "model": data.model,
                    "content_hash": data.content_hash,
                    "text": data.text,
                    "tokens": data.tokens,
                    "chunks": {"chunks": data.chunks},
                    "duration_s": data.duration_s,
                    "processing_s": data.processing_s,
                    "provenance": data.provenance,
                    "created_at": utcnow(),
                },
            )
            tid = s.scalar(select(Transcript.id).where(Transcript.file_id == file_id))
            self._close(
                s,
                file_id,
                "done",
                transcript_id=tid,
                duration_s=data.duration_s,
                content_hash=data.content_hash,
                size=size,
            )
            return tid

    def record_reuse(self, file_id: int, transcript: Transcript, size: int | None = None) -> None:
        """The same content was already transcribed with the same model: point at it."""
        with self.session() as s:
            self._close(
                s,
                file_id,
                "done",
                transcript_id=transcript.id,
                duration_s=transcript.duration_s,
                content_hash=transcript.content_hash,
                size=size,
            )

    def record_failure(self, file_id: int, error: str, duration_s: float | None = None) -> None:
        with self.session() as s:
            self._close(s, file_id, "failed", error=error[:2000], duration_s=duration_s)

    def release(self, file_ids: list[int], owner: str) -> None:
        """Give leased files back (warm shutdown): they are claimable again at once."""
        with self.session() as s:
            s.execute(
                update(File)
                .where(File.id.in_(file_ids), File.lease_owner == owner, File.state == "running")
                .values(state="queued", lease_owner=None, lease_expires_at=None)
            )

    # -- recovery: what a dead worker left behind ----------------------------------------

    def requeue_expired(self, limit: int = 10_000) -> list[tuple[str, int]]:
        """Files whose lease ended while running (their worker died with the unit's message,
        e.g. its main process was killed) back to ``queued``; returns (job_id, file_id) of
        those this call took, so two sweepers never take the same file. Attempts are kept:
        a file that keeps killing workers still fails after ICHIGO_MAX_ATTEMPTS."""
        now = utcnow()
        with self.session() as s:
            ids = list(
                s.scalars(
                    select(File.id)
                    .where(File.state == "running", File.lease_expires_at < now)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            )
            if not ids:
                return []
            rows = s.execute(
                update(File)
                .where(File.id.in_(ids), File.state == "running", File.lease_expires_at < now)
                .values(state="queued", lease_owner=None, lease_expires_at=None)
                .returning(File.job_id, File.id)
            ).all()
        return [(job_id, file_id) for job_id, file_id in rows]

    def expire(self, file_ids: list[int]) -> None:
        """Undo ``requeue_expired`` for files whose shard could not be sent: running with an
        ended lease again, so the next sweep takes them."""
        with self.session() as s:
            s.execute(
                update(File)
                .where(File.id.in_(file_ids), File.state == "queued")
                .values(state="running", lease_owner="sweeper",
                        lease_expires_at=utcnow() - timedelta(seconds=1))
            )

    def idle_queued_files(self, idle_seconds: float, limit: int = 10_000) -> list[tuple[str, int]]:
        """(job_id, file_id) of the queued files of queued/running jobs in which nothing has
        happened for ``idle_seconds``: created before, no file claimed or finished since, none
        leased right now. Jobs still ``expanding`` are left out (the producer has not sent
        all their shards yet). One query, whatever the number of jobs."""
        now = utcnow()
        cutoff = now - timedelta(seconds=idle_seconds)
        busy = (
            select(File.id)
            .where(
                File.job_id == Job.id,
                or_(
                    (File.state == "running") & (File.lease_expires_at >= now),
                    File.started_at >= cutoff,
                    File.finished_at >= cutoff,
                ),
            )
            .exists()
        )
        idle_jobs = select(Job.id).where(
            Job.state.in_(("queued", "running")), Job.created_at < cutoff, ~busy
        )
        with self.session(readonly=True) as s:
            rows = s.execute(
                select(File.job_id, File.id)
                .where(File.state == "queued", File.job_id.in_(idle_jobs))
                .order_by(File.job_id, File.id)
                .limit(limit)
            ).all()
        return [(job_id, file_id) for job_id, file_id in rows]

    def complete_jobs(self) -> list[str]:
        """Ids of queued/running jobs that no longer have an open file (the worker that
        finished their last file died before closing the job)."""
        with self.session(readonly=True) as s:
            open_file = (
                select(File.id)
                .where(File.job_id == Job.id, File.state.in_(OPEN_STATES))
                .exists()
            )
            return list(
                s.scalars(select(Job.id).where(Job.state.in_(("queued", "running")), ~open_file))
            )

    @staticmethod
    def _close(s: Session, file_id: int, state: str, **values: Any) -> None:
        values = {k: v for k, v in values.items() if v is not None or k == "error"}
        s.execute(
            update(File)
            .where(File.id == file_id, File.state != "done")
            .values(
                state=state, finished_at=utcnow(), lease_owner=None, lease_expires_at=None, **values
            )
        )


def is_transient(exc: BaseException) -> bool:
    """The database could not be reached or dropped the connection (a restart, a fail-over,
    SQLite's lock wait running out), as opposed to a bad query or a broken schema (SQLite
    reports "no such table" as an OperationalError too: not transient)."""
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return False
    if getattr(exc, "connection_invalidated", False):
        return True
    if type(exc.orig).__module__.startswith("sqlite3"):
        return any(word in str(exc.orig).lower() for word in ("locked", "busy", "i/o"))
    return True


#: how long a patient store call waits for the database before giving up
STORE_PATIENCE_S = 120.0


class PatientStore(Store):
    """A ``Store`` whose result writes wait out a short database outage instead of failing.

    Used while a unit of work runs: its transcripts are computed and its ``.txt`` files
    written, so waiting a few seconds for a restarting database beats giving the files back
    and transcribing them again. Only idempotent calls are patient (a write whose commit
    reply was lost may run twice): recording a result, a reuse or a failure, giving files
    back, looking up a transcript, closing the job. ``claim`` is not (a lost reply would
    leave files leased to nobody); the task retries it through the broker. Errors other
    than ``is_transient`` ones, and outages longer than ``patience_s``, are raised as before.
    """

    def __init__(self, url: str, patience_s: float = STORE_PATIENCE_S):
        super().__init__(url)
        self.patience_s = patience_s

    @classmethod
    def of(cls, store: Store, patience_s: float = STORE_PATIENCE_S) -> PatientStore:
        return store if isinstance(store, PatientStore) else cls(store.url, patience_s)

    def _patiently(self, method: Callable[..., Any], *args: Any) -> Any:
        """``method(self, *args)`` (a plain ``Store`` method), retried with backoff (0.5 s
        doubling to 5 s) while the error is transient and the patience lasts."""
        deadline = time.monotonic() + self.patience_s
        wait, failures = 0.5, 0
        while True:
            try:
                value = method(self, *args)
            except Exception as exc:
                if not is_transient(exc) or time.monotonic() + wait > deadline:
                    raise
                failures += 1
                if failures == 1:
                    log.warning("store unavailable during %s (%s); retrying for up to %.0f s",
                                method.__name__, str(exc).splitlines()[0][:200],
                                self.patience_s)
                time.sleep(wait)
                wait = min(wait * 2, 5.0)
                continue
            if failures:
                log.warning("store back: %s went through after %d retries", method.__name__,
                            failures)
            return value

    def find_transcript(self, content_hash: str, model: str) -> Transcript | None:
        return self._patiently(Store.find_transcript, content_hash, model)

    def record_result(self, file_id: int, data: TranscriptData, size: int | None = None) -> int:
        return self._patiently(Store.record_result, file_id, data, size)

    def record_reuse(self, file_id: int, transcript: Transcript, size: int | None = None) -> None:
        self._patiently(Store.record_reuse, file_id, transcript, size)

    def record_failure(self, file_id: int, error: str, duration_s: float | None = None) -> None:
        self._patiently(Store.record_failure, file_id, error, duration_s)

    def release(self, file_ids: list[int], owner: str) -> None:
        self._patiently(Store.release, file_ids, owner)

    def finish_job_if_complete(self, job_id: str) -> bool:
        return self._patiently(Store.finish_job_if_complete, job_id)


__all__ = ["Store", "PatientStore", "Claim", "TranscriptData", "aware_utc", "is_transient"]
