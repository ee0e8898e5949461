"""Job-state transitions and one aggregate the producer needs that ``Store`` lacks.

A job is created ``expanding`` while its files are found and queued: workers may already run
its first shards, but ``Store.finish_job_if_complete`` (queued|running only) cannot call it
done before the last file is in. Every transition here is conditional on the current state,
so a cancel racing with the end of the expansion is never overwritten.

These functions belong in ``ichigo_common.store.repo.Store`` (see the producer's hand-over
notes); they only use the store's own session and models.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, func, select, update

from ichigo_common.store.models import File, Job, utcnow
from ichigo_common.store.repo import Store

EXPANDING = "expanding"
FINAL_JOB_STATES = ("done", "cancelled", "failed")


def transition(store: Store, job_id: str, from_states: tuple[str, ...], to_state: str,
               **values: Any) -> bool:
    """Set the job's state to ``to_state`` only if it is in ``from_states``; True if it was."""
    if to_state in FINAL_JOB_STATES:
        values.setdefault("finished_at", utcnow())
    with store.session() as s:
        res = s.execute(update(Job).where(Job.id == job_id, Job.state.in_(from_states))
                        .values(state=to_state, **values))
        return bool(res.rowcount)


def end_expansion(store: Store, job_id: str) -> str | None:
    """``expanding`` -> ``running`` (started at its first file's start) when a worker already
    began, else ``queued``; then ``done`` if every file is already finished. Returns the new
    state, or None when the job was no longer expanding (cancelled meanwhile)."""
    first_start = (select(func.min(File.started_at)).where(File.job_id == job_id)
                   .scalar_subquery())
    with store.session() as s:
        res = s.execute(update(Job).where(Job.id == job_id, Job.state == EXPANDING).values(
            state=case((first_start.is_not(None), "running"), else_="queued"),
            started_at=first_start))
        if not res.rowcount:
            return None
    store.finish_job_if_complete(job_id)
    job = store.get_job(job_id)
    return job.state if job else None


def fail_expansion(store: Store, job_id: str, error: str) -> None:
    """The expansion broke off: cancel what has not started and mark the job failed."""
    transition(store, job_id, (EXPANDING,), "failed", error=error[:2000])
    store.cancel_job(job_id)  # files only now: a failed job is not cancelled again


def cancel(store: Store, job_id: str) -> int:
    """Cancel a job in any open state (expanding included); returns the files cancelled.

    The expanding job is marked first, so an expansion still running sees it at its next
    batch and sweeps the files it inserted meanwhile."""
    transition(store, job_id, (EXPANDING,), "cancelled")
    return store.cancel_job(job_id)


def bytes_by_state(store: Store, job_id: str) -> dict[str, int]:
    """Known file sizes summed per state (for ETA by bytes)."""
    with store.session() as s:
        rows = s.execute(select(File.state, func.coalesce(func.sum(File.size), 0))
                         .where(File.job_id == job_id).group_by(File.state)).all()
    return {state: int(total) for state, total in rows}
