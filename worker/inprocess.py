"""``ichigo transcribe`` in-process, recording into the same store the queue uses.

The files become a job (source ``cli``) with one row each; they are claimed and processed
exactly as a worker would (same dedupe by content and model, same idempotent writes), only
without Redis, as one stream: rows are inserted and claimed a unit at a time as the
pipeline asks for more input. ``--no-store`` runs the bare pipeline instead.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time


def _prepare_store(url: str):
    from ichigo_common.store.migrate import ensure_schema, is_at_head, upgrade
    from ichigo_common.store.repo import Store

    if url.startswith("sqlite") and not is_at_head(url):
        upgrade(url)  # the embedded default database is created on first use
    ensure_schema(url)
    return Store(url)


def _emit(args, path: str, outcome: dict) -> None:
    if args.json:
        print(json.dumps(outcome, ensure_ascii=False), flush=True)
    elif outcome["error"] is None:
        print(f"{path}\t{outcome['text']}", flush=True)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ichigo_common.settings import get_settings
    from ichigo_pipeline.api import expand_inputs, get_model
    from ichigo_pipeline.model import ModelSpec

    from .runner import LeaseKeeper, process_claims

    paths = [p.resolve() for p in expand_inputs(args.paths, recursive=args.recursive)]
    if not paths:
        print("ichigo: no audio files found in the given paths", file=sys.stderr)
        return 2
    settings = get_settings()
    store = _prepare_store(settings.database_url)
    model_name = ModelSpec.resolve(args.model or settings.model).name
    model = get_model(model_name, args.device)
    job_id = store.create_job(
        source="cli", model=model_name, options={"force": args.force}, output_dir=args.output_dir
    )
    owner = f"{socket.gethostname()}:{os.getpid()}:cli"
    bar = tqdm(total=len(paths), unit="file", file=sys.stderr, disable=args.quiet)
    start = time.perf_counter()
    # files are inserted and claimed a unit at a time, as the pipeline asks for more input:
    # one stream of batches for the whole run (no small batch at the end of every unit)
    unit = max(args.batch_size * 8, 32)
    rows = ({"path": str(p), "size": None} for p in paths)
    added = store.add_files(job_id, rows, batch=unit)
    leased: list[int] = []

    def next_unit():
        for batch in added:
            claims, _ = store.claim([fid for fid, _ in batch], owner, settings.lease_seconds,
                                    10**6)
            leased.extend(c.id for c in claims)
            if claims:
                return claims
        return []

    with LeaseKeeper(store, leased, owner, settings.lease_seconds):
        report = process_claims(
            store,
            model,
            model_name,
            [],
            roots=None,
            batch_size=args.batch_size,
            output_dir=args.output_dir,
            force=args.force,
            on_result=lambda path, outcome: (_emit(args, path, outcome), bar.update(1)),
            more_claims=next_unit,
        )
    store.finish_job_if_complete(job_id)
    bar.close()
    wall = time.perf_counter() - start
    r = report
    n = r.done + r.reused + r.failed
    print(
        f"job {job_id}: files: {n} ({r.done} transcribed, {r.reused} already transcribed, "
        f"{r.failed} failed) | audio: {r.audio_s / 3600:.3f} h | wall: {wall:.1f} s | "
        f"throughput: {r.audio_s / wall if wall else 0:.1f} audio s/s",
        file=sys.stderr,
    )
    return 1 if r.failed and not (r.done + r.reused) else 0


def register(sub) -> None:
    """Make ``ichigo transcribe`` record into the store (``--no-store`` for the bare pipeline)."""
    from ichigo_pipeline.cli import _transcribe

    parser = sub.choices["transcribe"]
    parser.add_argument(
        "--force",
        action="store_true",
        help="transcribe again even if the same content was done with this model",
    )
    parser.add_argument(
        "--no-store", action="store_true", help="do not record into the database (pipeline only)"
    )
    parser.set_defaults(func=lambda a: _transcribe(a) if a.no_store else run(a))
