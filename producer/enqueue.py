"""Submitting a job: check everything, create the job, then stream its files into the store
and its shards onto the queue.

``submit_job`` is the one entry point of the API, the CLI and (later) the folder watcher.
Its two halves are separate so the API can answer 202 between them:

- ``prepare_job`` validates every input against the allowed roots and probes the broker
  *before* anything is stored (a refused path raises PathRefused: no job, nothing queued),
  then creates the job in state ``expanding``;
- ``expand_job`` walks the inputs lazily, inserts files in committed batches
  (``Store.add_files``), cuts shards of at most ``shard_files`` files / ``shard_bytes`` bytes
  from the committed ids and sends each by name (``TRANSCRIBE_SHARD``). Memory is bounded by
  one batch, one shard and the depth of the tree, whatever the number of files.

Dedupe of content already transcribed with the same model is the worker's (content hash);
the producer passes ``force`` (and ``language``) in the job's options.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from celery import Celery

from ichigo_common.settings import Settings
from ichigo_common.store.repo import Store
from ichigo_common.tasks import BULK_QUEUE, INTERACTIVE_QUEUE

from . import jobstate
from .expand import Found, Inputs, Sharder, check_inputs, check_path, iter_found
from .queue import MAX_PRIORITY, ShardSender, check_broker

log = logging.getLogger(__name__)

#: files inserted per transaction; shards are cut from each committed batch
COMMIT_EVERY = 1000
#: refused or unreadable files are recorded (as failed rows) in groups of this size
ERRORS_EVERY = 100

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
LANGUAGE_PATTERN = r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})?$"
_LANGUAGE = re.compile(LANGUAGE_PATTERN)
SOURCES = ("api", "cli", "watch")
#: a Whisper prompt keeps its last 223 tokens; a longer text is refused, not silently cut
MAX_PROMPT_CHARS = 4000


class InvalidSubmission(ValueError):
    """Malformed input (HTTP 422)."""


@dataclass(frozen=True)
class JobSpec:
    """What a client asks for; paths and globs are absolute, as the server sees them."""

    paths: tuple[str, ...] = ()
    globs: tuple[str, ...] = ()
    recursive: bool = False
    model: str | None = None
    language: str | None = None
    output_dir: str | None = None
    priority: int = 0
    force: bool = False
    callback_url: str | None = None
    name: str | None = None
    source: str = "api"
    prompt: str | None = None
    interactive: bool = False  # one user waits on it: the interactive queue, ahead of bulk


@dataclass(frozen=True)
class Prepared:
    job_id: str
    inputs: Inputs
    priority: int
    queue: str = BULK_QUEUE


@dataclass
class Expansion:
    """What ``expand_job`` did."""

    job_id: str
    files: int = 0
    errors: int = 0
    shards: int = 0
    state: str | None = None
    seconds: float = 0.0


def submit_job(store: Store, celery_client: Celery, settings: Settings, *,
               paths: Iterable[str] = (), globs: Iterable[str] = (), recursive: bool = False,
               model: str | None = None, language: str | None = None,
               output_dir: str | None = None, priority: int = 0, force: bool = False,
               callback_url: str | None = None, name: str | None = None, source: str = "api",
               prompt: str | None = None, interactive: bool = False,
               defer: Callable[[Callable[[], Any]], Any] | None = None) -> str:
    """Validate, create the job and queue its files; returns the job id.

    Raises PathRefused, FileNotFoundError, InvalidSubmission or BrokerUnavailable before
    anything is stored. The expansion runs inline, or is handed to ``defer`` (e.g.
    ``BackgroundTasks.add_task``) so a caller can answer at once."""
    spec = JobSpec(paths=tuple(paths), globs=tuple(globs), recursive=recursive, model=model,
                   language=language, output_dir=output_dir, priority=priority, force=force,
                   callback_url=callback_url, name=name, source=source, prompt=prompt,
                   interactive=interactive)
    prepared = prepare_job(store, celery_client, settings, spec)
    if defer is None:
        expand_job(store, celery_client, settings, prepared)
    else:
        defer(partial(expand_in_background, store, celery_client, settings, prepared))
    return prepared.job_id


def _check_options(spec: JobSpec, settings: Settings) -> tuple[str, str | None]:
    """The model to store and the resolved output folder; raises on bad options."""
    roots = settings.allowed_roots
    model = spec.model or settings.model
    if model.endswith((".yaml", ".yml")) or model.startswith(("/", "~", ".")):
        model = str(check_path(model, roots))  # a model spec file is read by the workers
    elif not _MODEL_NAME.match(model):
        raise InvalidSubmission(f"model: {model!r} is neither a preset name nor a .yaml path")
    if spec.language is not None and not _LANGUAGE.match(spec.language):
        raise InvalidSubmission(f"language: {spec.language!r} is not a language code")
    if not 0 <= spec.priority <= MAX_PRIORITY:
        raise InvalidSubmission(f"priority must be between 0 and {MAX_PRIORITY}")
    if spec.prompt is not None and len(spec.prompt) > MAX_PROMPT_CHARS:
        raise InvalidSubmission(f"prompt: at most {MAX_PROMPT_CHARS} characters")
    if spec.name is not None and len(spec.name) > 200:
        raise InvalidSubmission("name: at most 200 characters")
    if spec.callback_url is not None and not spec.callback_url.startswith(("http://",
                                                                          "https://")):
        raise InvalidSubmission("callback_url: must be an http(s) URL")
    if spec.source not in SOURCES:
        raise InvalidSubmission(f"source must be one of {SOURCES}")
    output_dir = str(check_path(spec.output_dir, roots)) if spec.output_dir else None
    return model, output_dir


def prepare_job(store: Store, celery_client: Celery, settings: Settings,
                spec: JobSpec) -> Prepared:
    """Check every input and the broker, then create the job (state ``expanding``)."""
    try:
        # an interactive request reads its upload from the upload folder; nothing else may
        roots = settings.readable_roots if spec.interactive else settings.allowed_roots
        inputs = check_inputs(spec.paths, spec.globs, spec.recursive, roots)
    except ValueError as exc:
        if isinstance(exc, InvalidSubmission):
            raise
        raise InvalidSubmission(str(exc)) from exc
    model, output_dir = _check_options(spec, settings)
    check_broker(celery_client)  # a submission the queue cannot take is refused, not stored
    options = {
        "force": spec.force,
        "language": spec.language,
        "prompt": spec.prompt,
        "recursive": spec.recursive,
        "inputs": {"paths": [str(p) for p in inputs.files + inputs.dirs],
                   "globs": list(inputs.globs)},
    }
    job_id = store.create_job(source=spec.source, model=model, options=options, name=spec.name,
                              priority=spec.priority, output_dir=output_dir,
                              callback_url=spec.callback_url, state=jobstate.EXPANDING)
    return Prepared(job_id, inputs, spec.priority,
                    INTERACTIVE_QUEUE if spec.interactive else BULK_QUEUE)


class _ErrorRows:
    """Files that cannot be queued (refused symlink targets, unreadable entries) become
    failed rows with their reason, recorded in small groups so memory stays bounded."""

    def __init__(self, store: Store, job_id: str):
        self.store, self.job_id = store, job_id
        self.pending: list[Found] = []
        self.count = 0

    def divert(self, found: Iterable[Found]) -> Iterator[dict[str, Any]]:
        """Rows for ``Store.add_files``; errors are set aside. Runs between the store's
        transactions (``add_files`` reads a whole batch before it opens one)."""
        for item in found:
            if item.error is None:
                yield {"path": item.path, "size": item.size}
                continue
            self.pending.append(item)
            if len(self.pending) >= ERRORS_EVERY:
                self.flush()

    def flush(self) -> None:
        items, self.pending = self.pending, []
        if not items:
            return
        rows = ({"path": f.path, "size": f.size} for f in items)
        ids = [fid for batch in self.store.add_files(self.job_id, rows, state="failed")
               for fid, _ in batch]
        for fid, item in zip(ids, items, strict=True):
            self.store.record_failure(fid, item.error or "cannot be queued")
        self.count += len(items)


def _cancelled(store: Store, job_id: str) -> bool:
    job = store.get_job(job_id)
    return job is None or job.state == "cancelled"


def expand_job(store: Store, celery_client: Celery, settings: Settings, prepared: Prepared,
               *, commit_every: int = COMMIT_EVERY) -> Expansion:
    """Find, insert and queue the job's files; ends the ``expanding`` state.

    Stops at the next committed batch when the job is cancelled. On any error the files not
    yet started are cancelled, the job is marked failed with the reason, and the error is
    raised again."""
    report = Expansion(prepared.job_id)
    start = time.perf_counter()
    try:
        _expand(store, celery_client, settings, prepared, report, commit_every)
    except Exception as exc:
        try:
            jobstate.fail_expansion(store, prepared.job_id,
                                    f"expansion failed after {report.files} files: {exc}")
        except Exception:  # the store itself is down: the original error says more
            log.exception("job %s: could not record the failed expansion", prepared.job_id)
        raise
    finally:
        report.seconds = time.perf_counter() - start
    log.info("job %s: %d files (%d not queued) in %d shards, %.1f s, state %s",
             report.job_id, report.files, report.errors, report.shards, report.seconds,
             report.state)
    return report


def _expand(store: Store, celery_client: Celery, settings: Settings, prepared: Prepared,
            report: Expansion, commit_every: int) -> None:
    job_id = prepared.job_id
    errors = _ErrorRows(store, job_id)
    rows = errors.divert(iter_found(prepared.inputs, settings.allowed_roots))
    sharder = Sharder(settings.shard_files, settings.shard_bytes)
    sender = ShardSender(celery_client, prepared.priority, prepared.queue)
    for batch in store.add_files(job_id, rows, batch=commit_every):  # yields once committed
        report.files += len(batch)
        if _cancelled(store, job_id):
            break
        sender.send(job_id, sharder.add(batch))
    else:
        last = sharder.flush()
        sender.send(job_id, [last] if last else [])
    errors.flush()
    report.errors, report.shards = errors.count, sender.sent
    report.state = jobstate.end_expansion(store, job_id)
    if report.state is None:  # cancelled meanwhile: sweep files inserted after the cancel
        store.cancel_job(job_id)
        report.state = "cancelled"


def expand_in_background(store: Store, celery_client: Celery, settings: Settings,
                         prepared: Prepared) -> None:
    """``expand_job`` for a background task: the failure is on the job, and logged."""
    try:
        expand_job(store, celery_client, settings, prepared)
    except Exception:
        log.exception("job %s: expansion failed", prepared.job_id)

