"""Processing a unit of work (a shard of files) against the store: the part of a worker that
is not Celery, shared with in-process ``ichigo transcribe``.

For each claimed file: re-check the path against the allowed roots, hash its content, reuse an
existing transcript of the same content and model (unless forced), otherwise run the
remaining files together through the batched pipeline; write each sibling ``.txt``
atomically, then record the result. A lease is renewed in the background while the unit runs.

A database outage mid-unit (a PostgreSQL restart or fail-over) does not cost the unit: the
store writes go through ``PatientStore``, which retries them with backoff for up to
``STORE_PATIENCE_S`` while the transcripts wait in memory. Letting the shard fail and retry
instead would give back every file not yet recorded and transcribe it again; waiting costs
only the outage. The writes are idempotent (one transcript row per file, state changes
guarded), so a commit whose reply was lost is harmless to repeat.
"""

from __future__ import annotations

import glob
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ichigo_common.hashing import content_hash
from ichigo_common.paths import PathRefused, check_allowed
from ichigo_common.store.repo import Claim, PatientStore, Store, TranscriptData
from ichigo_common.variants import transcript_key

log = logging.getLogger(__name__)


@dataclass
class UnitReport:
    done: int = 0
    reused: int = 0
    failed: int = 0
    audio_s: float = 0.0


class LeaseKeeper:
    """Renews the leases of a unit's files (``file_ids``, which may grow while it runs)
    every third of a lease until stopped."""

    def __init__(self, store: Store, file_ids: list[int], owner: str, lease_s: float):
        self.store, self.file_ids, self.owner, self.lease_s = store, file_ids, owner, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ichigo-lease", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(max(1.0, self.lease_s / 3)):
            try:
                # a copy: a unit that extends itself appends to the list meanwhile
                self.store.renew(list(self.file_ids), self.owner, self.lease_s)
            except Exception as exc:  # noqa: BLE001 - a missed renewal is retried next time
                log.warning("lease renewal failed: %s", exc)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _txt_path(path: Path, output_dir: str | None) -> Path:
    from ichigo_pipeline.outputs import sibling_txt

    return sibling_txt(path, output_dir)


def _remove_stale_temps(txt: Path) -> None:
    """Delete the hidden temp files (``write_atomic``'s ``.<name>.<random>.tmp``) that an
    earlier attempt killed mid-write left next to ``txt``; only called once that attempt's
    lease has ended, so no live writer owns them."""
    try:
        for tmp in txt.parent.glob(f".{glob.escape(txt.name)}.*.tmp"):
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        log.debug("could not clean temp files of %s: %s", txt, exc)


class _Outcomes:
    """Reports each file's outcome: progress (``on_file``) and a JSON-ready dict (``on_result``)."""

    def __init__(self, report: UnitReport, on_file, on_result):
        self.report, self.on_file, self.on_result = report, on_file, on_result

    def __call__(
        self, path: str, text=None, tokens=None, chunks=(), duration=None, error=None,
        reused=False,
    ) -> None:
        if self.on_result:
            self.on_result(path, {"path": path, "text": text, "tokens": tokens,
                                  "chunks": list(chunks), "duration_s": duration,
                                  "error": error, "reused": reused})
        if self.on_file:
            self.on_file(self.report)


class _Intake:
    """Claimed files on their way into the pipeline: path check, hash, reuse of an existing
    transcript, dedupe by content among the files in flight."""

    def __init__(self, store, model_name, roots, output_dir, force, report, outcome):
        self.store, self.model_name, self.roots = store, model_name, roots
        self.output_dir, self.force, self.report, self.outcome = output_dir, force, report, outcome
        self.todo: dict[str, tuple[Claim, str, int]] = {}  # path -> (claim, hash, size)
        self.first_of: dict[str, str] = {}  # content hash -> path in flight for it
        self.copies: dict[str, list[tuple[Claim, Path, int]]] = {}  # path -> same content

    def _fail(self, claim: Claim, reason: str) -> None:
        self.store.record_failure(claim.id, reason)
        self.report.failed += 1
        self.outcome(claim.path, error=reason)

    def admit(self, claim: Claim) -> str | None:
        """Check, hash and dedupe one claimed file; its path if the model must run on it."""
        try:
            path = check_allowed(claim.path, self.roots) if self.roots is not None \
                else Path(claim.path)
            if claim.attempts > 1:  # an earlier attempt died: it may have left a temp file
                _remove_stale_temps(_txt_path(path, self.output_dir))
            digest, size = content_hash(path)
        except PathRefused as exc:
            self._fail(claim, f"refused: {exc}")
            return None
        except OSError as exc:
            self._fail(claim, f"{claim.path}: {exc.strerror or exc}")
            return None
        existing = None if self.force else self.store.find_transcript(digest, self.model_name)
        if existing is not None:
            _reuse(self.store, claim, path, size, existing, self.output_dir, self.report,
                   self.outcome)
            return None
        if digest in self.first_of:
            self.copies.setdefault(self.first_of[digest], []).append((claim, path, size))
            return None
        self.first_of[digest] = str(path)
        self.todo[str(path)] = (claim, digest, size)
        return str(path)

    def paths(self, claims: list[Claim], more_claims, low_water: int) -> Iterator[str | None]:
        """The files to transcribe, admitted lazily as the pipeline asks for more input.
        Once the claims run out, ``more_claims`` extends the unit, but only when fewer than
        ``low_water`` files are in flight (None meanwhile: "nothing yet"): two batches'
        worth keeps the batches full and the next one's audio decoding while the model
        runs, and the worker holds no more files than that."""
        batch: list[Claim] = list(claims)
        while True:
            for claim in batch:
                path = self.admit(claim)
                if path is not None:
                    yield path
            if more_claims is None:
                return
            while len(self.todo) >= low_water:
                yield None
            batch = more_claims()
            if not batch:
                return

    def take(self, path: str) -> tuple[Claim, str, int, list[tuple[Claim, Path, int]]]:
        """A finished file's claim, hash, size and the copies waiting on it; a copy admitted
        later finds the transcript (or, if this one failed, is tried again)."""
        claim, digest, size = self.todo.pop(path)
        self.first_of.pop(digest, None)
        return claim, digest, size, self.copies.pop(path, [])


def process_claims(
    store: Store,
    model,  # ichigo_pipeline.model.IchigoModel
    model_name: str,
    claims: list[Claim],
    *,
    roots: tuple[Path, ...] | None,
    batch_size: int,
    output_dir: str | None = None,
    force: bool = False,
    language: str | None = None,
    prompt: str | None = None,
    on_file: Callable[[UnitReport], None] | None = None,
    on_result: Callable[[str, dict], None] | None = None,
    extra_provenance: dict | None = None,
    more_claims: Callable[[], list[Claim]] | None = None,
) -> UnitReport:
    """Transcribe claimed files and record every outcome; never raises for one bad file.

    ``on_file(report)`` runs after each file (progress); ``on_result(path, outcome)`` gets a
    JSON-ready dict per file (path, text, tokens, chunks, duration_s, error, reused).
    ``extra_provenance`` is merged into each new transcript's provenance (e.g. which worker).
    ``more_claims()``, called once the claims are all under way and fewer than two batches
    of files are in flight (again each time), returns further claimed files to run in the
    same stream; an empty list ends it.
    ``language`` / ``prompt`` override the preset's; transcripts are shared only between
    requests with the same overrides (``transcript_key``). A language the model does not
    know fails every file with that reason.
    """

    store = PatientStore.of(store)  # a database outage waits; it does not fail the unit
    report = UnitReport()
    outcome = _Outcomes(report, on_file, on_result)
    from ichigo_pipeline import __version__
    from ichigo_pipeline.outputs import write_atomic
    from ichigo_pipeline.pipeline import BatchPipeline

    try:
        pipeline = BatchPipeline(model, batch_size=batch_size, language=language, prompt=prompt)
    except ValueError as exc:  # the request's options, not the files, are wrong
        _fail_all(store, claims, f"invalid options: {exc}", report, outcome)
        return report
    model_name = transcript_key(model_name, language, prompt,
                                int8=bool(getattr(model, "int8_linear", False)))
    intake = _Intake(store, model_name, roots, output_dir, force, report, outcome)
    provenance = dict(
        model.provenance,
        language=language,
        prompt=prompt,
        package_version=__version__,
        chunking=pipeline.chunking.as_dict(),  # the parameters actually used
        **(extra_provenance or {}),
    )
    for result in pipeline.run(intake.paths(claims, more_claims, 2 * batch_size)):
        claim, digest, size, copies = intake.take(result.path)
        if result.ok:
            write_atomic(_txt_path(Path(result.path), output_dir), result.text + "\n")
            store.record_result(
                claim.id,
                TranscriptData(
                    model=model_name,
                    content_hash=digest,
                    text=result.text,
                    tokens=result.tokens,
                    chunks=[c.to_json() for c in result.chunks],
                    duration_s=result.duration_s,
                    processing_s=result.processing_s,
                    provenance=provenance,
                ),
                size,
            )
            report.done += 1
            report.audio_s += result.duration_s
            outcome(
                result.path,
                result.text,
                result.tokens,
                [c.to_json() for c in result.chunks],
                result.duration_s,
            )
        else:
            store.record_failure(claim.id, result.error or "unknown error")
            report.failed += 1
            outcome(result.path, error=result.error)
        _settle_copies(
            store,
            model_name,
            digest,
            copies,
            result,
            output_dir,
            report,
            outcome,
        )
    return report


def _fail_all(store, claims, reason, report, outcome) -> None:
    for claim in claims:
        store.record_failure(claim.id, reason)
        report.failed += 1
        outcome(claim.path, error=reason)


def _settle_copies(store, model_name, digest, copies, result, output_dir, report, outcome) -> None:
    """Files with the same content as ``result``'s, met in the same unit: share its outcome."""
    if not copies:
        return
    transcript = store.find_transcript(digest, model_name) if result.ok else None
    for claim, path, size in copies:
        if transcript is None:
            store.record_failure(claim.id, result.error or "unknown error")
            report.failed += 1
            outcome(str(path), error=result.error)
            continue
        _reuse(store, claim, path, size, transcript, output_dir, report, outcome)


def _reuse(store, claim, path, size, transcript, output_dir, report, outcome) -> None:
    """Serve a file from an existing transcript of the same content and model."""
    from ichigo_pipeline.outputs import write_atomic

    write_atomic(_txt_path(path, output_dir), transcript.text + "\n")
    store.record_reuse(claim.id, transcript, size)
    report.reused += 1
    report.audio_s += transcript.duration_s
    chunks = transcript.chunks.get("chunks", [])
    outcome(
        str(path), transcript.text, transcript.tokens, chunks, transcript.duration_s, reused=True
    )
