"""Waiting on workers for one user: is anyone consuming, request/reply tasks over the result
backend (``/s2r``, ``/r2t``), and a one-file job followed in the store until it ends
(``/v1/audio/transcriptions``). Everything blocks: call it from a worker thread."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery
from sqlalchemy import select

from ichigo_common.store.models import File, Transcript
from ichigo_common.store.repo import Store
from ichigo_common.tasks import INTERACTIVE_QUEUE

from .queue import BrokerUnavailable, check_broker

#: a worker seen this recently is assumed still there (a ping costs up to a second)
WORKER_SEEN_TTL_S = 15.0
PING_TIMEOUT_S = 1.0
POLL_S = 0.1


class NoWorker(RuntimeError):
    """No worker answers (HTTP 503): a request would only wait for its timeout."""


class WorkerTimeout(TimeoutError):
    """No answer within the request timeout (HTTP 504); the work may still finish."""


class _LastSeen:
    def __init__(self) -> None:
        self.at = float("-inf")
        self.lock = threading.Lock()


_seen: dict[int, _LastSeen] = {}


def require_worker(app: Celery) -> None:
    """Raise BrokerUnavailable or NoWorker unless a worker answered a ping lately."""
    seen = _seen.setdefault(id(app), _LastSeen())
    if time.monotonic() - seen.at < WORKER_SEEN_TTL_S:
        return
    with seen.lock:
        if time.monotonic() - seen.at < WORKER_SEEN_TTL_S:
            return
        check_broker(app)
        try:
            replies = app.control.ping(timeout=PING_TIMEOUT_S, limit=1) or []
        except Exception as exc:  # noqa: BLE001 - the broker went away mid-ping
            raise BrokerUnavailable(f"broker unreachable: {exc}") from exc
        if not replies:
            raise NoWorker("no worker is running: start one with `ichigo worker`")
        seen.at = time.monotonic()


def call(app: Celery, task: str, kwargs: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send ``task`` to the interactive queue (ahead of every bulk shard) and wait for its
    reply; the reply is removed from the backend once read."""
    try:
        result = app.send_task(task, kwargs=kwargs, queue=INTERACTIVE_QUEUE, priority=0)
    except Exception as exc:  # noqa: BLE001 - kombu wraps transport errors
        raise BrokerUnavailable(f"broker unreachable: {exc}") from exc
    try:
        value = result.get(timeout=timeout, propagate=False, interval=POLL_S)
    except TimeoutError as exc:  # celery.exceptions.TimeoutError subclasses the builtin
        result.revoke()  # nobody waits for it any more
        raise WorkerTimeout(f"no answer from a worker within {timeout:g} s") from exc
    try:
        if result.failed():
            raise RuntimeError(f"the worker failed: {value!r}"[:500])
        return value
    finally:
        result.forget()


@dataclass(frozen=True)
class FileOutcome:
    state: str
    error: str | None
    text: str | None = None
    chunks: list[dict[str, Any]] | None = None
    duration_s: float = 0.0


def _outcome(store: Store, job_id: str) -> FileOutcome | None:
    with store.session(readonly=True) as s:
        row = s.execute(
            select(File.state, File.error, Transcript.text, Transcript.chunks,
                   Transcript.duration_s)
            .outerjoin(Transcript, Transcript.id == File.transcript_id)
            .where(File.job_id == job_id)
        ).first()
    if row is None or row.state not in ("done", "failed", "cancelled"):
        return None
    chunks = (row.chunks or {}).get("chunks", []) if row.text is not None else None
    return FileOutcome(row.state, row.error, row.text, chunks, row.duration_s or 0.0)


def wait_for_file(store: Store, job_id: str, timeout: float) -> FileOutcome:
    """The end state of the one file of ``job_id``; WorkerTimeout after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        outcome = _outcome(store, job_id)
        if outcome is not None:
            return outcome
        if time.monotonic() > deadline:
            raise WorkerTimeout(f"no result within {timeout:g} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
