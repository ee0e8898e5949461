"""What clients see of jobs and files: JSON-ready dicts read from the store, shared by the REST
routes and the in-process CLI so both print the same thing. No web framework here.

Progress: ``throughput`` is audio seconds done per wall second since the job started; the
ETA scales the time spent by what is left, in bytes when file sizes are known, else in files.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ichigo_common.store.models import File, Job, Transcript
from ichigo_common.store.repo import Store

from . import jobstate

FILE_STATES = ("pending", "queued", "running", "done", "failed", "cancelled")
OPEN_FILE_STATES = ("pending", "queued", "running")
FINISHED_FILE_STATES = ("done", "failed")


class NotFound(LookupError):
    """No such job (HTTP 404)."""


def _utc(ts: datetime | None) -> datetime | None:
    if ts is not None and ts.tzinfo is None:  # SQLite gives naive datetimes, stored as UTC
        return ts.replace(tzinfo=UTC)
    return ts


def _iso(ts: datetime | None) -> str | None:
    ts = _utc(ts)
    return ts.isoformat() if ts else None


def job_summary(job: Job) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "name": job.name,
        "source": job.source,
        "model": job.model,
        "state": job.state,
        "priority": job.priority,
        "error": job.error,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
    }


def elapsed_s(job: Job, now: datetime) -> float | None:
    """Wall seconds since the job started (until it finished), None before it starts."""
    start = _utc(job.started_at)
    if start is None:
        return None
    end = _utc(job.finished_at) or now
    return max((end - start).total_seconds(), 0.0)


def eta_s(files: dict[str, int], sizes: dict[str, int], elapsed: float | None) -> float | None:
    """Seconds left at the pace so far: by bytes when known, else by files; 0 when nothing
    is open, None while nothing has finished."""
    left = sum(files.get(s, 0) for s in OPEN_FILE_STATES)
    if left == 0:
        return 0.0
    if not elapsed:
        return None
    bytes_done = sum(sizes.get(s, 0) for s in FINISHED_FILE_STATES)
    bytes_left = sum(sizes.get(s, 0) for s in OPEN_FILE_STATES)
    if bytes_done > 0 and bytes_left > 0:
        return bytes_left * elapsed / bytes_done
    finished = sum(files.get(s, 0) for s in FINISHED_FILE_STATES)
    return left * elapsed / finished if finished else None


def job_detail(store: Store, job_id: str, now: datetime | None = None) -> dict[str, Any]:
    """The job with its files per state, audio seconds, throughput and ETA."""
    job = store.get_job(job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    counts = store.job_counts(job_id)
    sizes = jobstate.bytes_by_state(store, job_id)
    files = {state: counts["files"].get(state, 0) for state in FILE_STATES}
    elapsed = elapsed_s(job, now or datetime.now(UTC))
    done_s = counts["audio_s_done"]
    return {
        **job_summary(job),
        "options": job.options,
        "output_dir": job.output_dir,
        "files": files,
        "total": counts["total"],
        "bytes": {state: sizes.get(state, 0) for state in FILE_STATES},
        "audio_s_done": done_s,
        "audio_s_known": counts["audio_s_known"],
        "elapsed_s": elapsed,
        "throughput": done_s / elapsed if elapsed else None,
        "eta_s": eta_s(files, sizes, elapsed),
    }


def job_list(store: Store, limit: int = 50, offset: int = 0,
             counts: bool = False) -> dict[str, Any]:
    jobs = store.list_jobs(limit=limit, offset=offset)
    items = []
    for job in jobs:
        item = job_summary(job)
        if counts:
            c = store.job_counts(job.id)
            item["files"] = {state: c["files"].get(state, 0) for state in FILE_STATES}
            item["total"] = c["total"]
        items.append(item)
    return {"jobs": items, "limit": limit, "offset": offset,
            "next_offset": offset + limit if len(items) == limit else None}


def file_view(f: File, t: Transcript | None, tokens: bool = True) -> dict[str, Any]:
    item: dict[str, Any] = {
        "file_id": f.id,
        "path": f.path,
        "state": f.state,
        "size": f.size,
        "duration_s": f.duration_s,
        "attempts": f.attempts,
        "started_at": _iso(f.started_at),
        "finished_at": _iso(f.finished_at),
    }
    if f.state == "failed":
        item["error"] = f.error
    if t is not None:
        item.update(text=t.text, model=t.model)
        if tokens:
            item["tokens"] = t.tokens
    return item


def file_list(store: Store, job_id: str, state: str | None = None, limit: int = 100,
              offset: int = 0, tokens: bool = True) -> dict[str, Any]:
    if store.get_job(job_id) is None:
        raise NotFound(f"no job {job_id}")
    rows = store.list_files(job_id, state=state, limit=limit, offset=offset)
    return {"job_id": job_id, "state": state, "limit": limit, "offset": offset,
            "files": [file_view(f, t, tokens) for f, t in rows],
            "next_offset": offset + limit if len(rows) == limit else None}


def cancel_job(store: Store, job_id: str) -> dict[str, Any]:
    if store.get_job(job_id) is None:
        raise NotFound(f"no job {job_id}")
    cancelled = jobstate.cancel(store, job_id)
    job = store.get_job(job_id)
    return {"job_id": job_id, "cancelled_files": cancelled, "state": job.state if job else None}
