"""``ichigo submit``, ``ichigo jobs``, ``ichigo api``: the producer's commands.

``submit`` and ``jobs`` talk to the API at ``--api`` / ``ICHIGO_API_URL`` when given, else
work in-process on the store and broker from the settings (``ICHIGO_DATABASE_URL``,
``ICHIGO_BROKER_URL``); both end in ``producer.enqueue.submit_job``. Heavy imports wait
until a command runs, so registering these commands costs nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

API_URL_ENV = "ICHIGO_API_URL"
FINAL_JOB_STATES = ("done", "cancelled", "failed")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def absolute(text: str) -> str:
    """A command-line path as the server must see it: ``~`` expanded and made absolute, not
    resolved (the server resolves symlinks and checks the allowed roots itself)."""
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else Path.cwd() / path)


def _model_arg(model: str | None) -> str | None:
    if model and (model.endswith((".yaml", ".yml")) or os.sep in model):
        return absolute(model)
    return model


def _fail(message: str, code: int) -> int:
    print(f"ichigo: error: {message}", file=sys.stderr)
    return code


def _reports_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """Refusals and unreachable services become one line and an exit status, not a trace."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from .client import ClientError
        from .queue import BrokerUnavailable

        try:
            return fn(args)
        except ClientError as exc:
            return _fail(str(exc), 2 if 400 <= exc.status < 500 else 1)
        except BrokerUnavailable as exc:
            return _fail(str(exc), 1)

    return run


def _client(api: str | None):
    """HttpJobs for an API URL, else LocalJobs on the configured store and broker."""
    from ichigo_common.settings import get_settings

    from .client import ClientError, HttpJobs, LocalJobs

    settings = get_settings()
    url = api or os.environ.get(API_URL_ENV)
    if url:
        return HttpJobs(url, settings.api_key)
    try:
        return LocalJobs(settings)
    except RuntimeError as exc:  # schema not at head
        raise ClientError(0, str(exc)) from None


# -- ichigo submit --------------------------------------------------------------------------


@_reports_errors
def _submit(args: argparse.Namespace) -> int:
    if not args.paths and not args.globs:
        raise ValueError("give at least one PATH or --glob")
    spec = {
        "paths": [absolute(p) for p in args.paths],
        "globs": [absolute(g) for g in args.globs],
        "recursive": args.recursive,
        "model": _model_arg(args.model),
        "language": args.language,
        "output_dir": absolute(args.output_dir) if args.output_dir else None,
        "priority": args.priority,
        "force": args.force,
        "callback_url": args.callback_url,
        "name": args.name,
    }
    client = _client(args.api)
    try:
        job_id = client.submit(**spec)
        print(job_id, flush=True)
        job = client.get(job_id)
        print(f"job {job_id}: {job['total']} files so far, {job['state']}", file=sys.stderr)
        return follow(client, job_id, args.poll, quiet=args.quiet) if args.wait else 0
    finally:
        client.close()


def summary(job: dict[str, Any]) -> str:
    files = job["files"]
    elapsed, rate = job.get("elapsed_s"), job.get("throughput")
    return (f"job {job['job_id']}: {job['state']} | files: {job['total']} ({files['done']} done, "
            f"{files['failed']} failed, {files['cancelled']} cancelled) | audio: "
            f"{job['audio_s_done'] / 3600:.3f} h | wall: {elapsed or 0:.1f} s | throughput: "
            f"{rate or 0:.1f} audio s/s")


def exit_status(job: dict[str, Any]) -> int:
    """0 for a finished job with something transcribed (or nothing failed), else 1."""
    files = job["files"]
    if job["state"] != "done":
        return 1
    return 1 if files["failed"] and not files["done"] else 0


def follow(client, job_id: str, poll: float = 2.0, quiet: bool = False) -> int:
    """A progress bar (files; audio seconds and throughput alongside) until the job ends."""
    from tqdm import tqdm

    bar = tqdm(total=0, unit="file", file=sys.stderr, disable=quiet, dynamic_ncols=True,
               desc=f"job {job_id[:8]}")
    try:
        while True:
            job = client.get(job_id)
            files = job["files"]
            bar.total = job["total"]
            bar.n = files["done"] + files["failed"] + files["cancelled"]
            rate = job.get("throughput") or 0.0
            bar.set_postfix_str(f"{job['state']}, audio {job['audio_s_done']:.0f} s, "
                                f"{rate:.1f} s/s", refresh=True)
            if job["state"] in FINAL_JOB_STATES:
                break
            time.sleep(poll)
    except KeyboardInterrupt:
        bar.close()
        print(f"stopped following; the job goes on: ichigo jobs {job_id}", file=sys.stderr)
        return 130
    bar.close()
    print(summary(job), file=sys.stderr)
    return exit_status(job)


# -- ichigo jobs --------------------------------------------------------------------------


def _short(ts: str | None) -> str:
    return ts[:19].replace("T", " ") if ts else "-"


def jobs_table(items: list[dict[str, Any]]) -> str:
    header = f"{'JOB':32}  {'STATE':9}  {'DONE/TOTAL':>13}  {'FAILED':>6}  {'CREATED':19}  NAME"
    lines = [header]
    for job in items:
        files = job.get("files", {})
        progress = f"{files.get('done', 0)}/{job.get('total', 0)}"
        lines.append(f"{job['job_id']:32}  {job['state']:9}  {progress:>13}  "
                     f"{files.get('failed', 0):>6}  {_short(job['created_at']):19}  "
                     f"{job['name'] or ''}")
    return "\n".join(lines)


def job_text(job: dict[str, Any]) -> str:
    files = "  ".join(f"{state} {n}" for state, n in job["files"].items())
    eta = job.get("eta_s")
    lines = [
        f"job      {job['job_id']}  ({job['source']}, {job['model']}, priority {job['priority']})",
        f"state    {job['state']}" + (f": {job['error']}" if job.get("error") else ""),
        f"files    {job['total']}:  {files}",
        f"audio    {job['audio_s_done']:.1f} s done of {job['audio_s_known']:.1f} s known",
        f"pace     {job.get('throughput') or 0:.2f} audio s/s, elapsed "
        f"{job.get('elapsed_s') or 0:.0f} s, ETA " + (f"{eta:.0f} s" if eta is not None else "-"),
        f"created  {_short(job['created_at'])}  started {_short(job['started_at'])}  "
        f"finished {_short(job['finished_at'])}",
    ]
    return "\n".join(lines)


@_reports_errors
def _jobs(args: argparse.Namespace) -> int:
    client = _client(args.api)
    try:
        if args.job_id is None:
            listing = client.list(limit=args.limit, offset=args.offset, counts=True)
            print(json.dumps(listing, indent=1) if args.json else jobs_table(listing["jobs"]))
            return 0
        if args.cancel:
            done = client.cancel(args.job_id)
            print(f"cancelled {done['cancelled_files']} files", file=sys.stderr)
        if args.files is not None:
            page = client.files(args.job_id, state=args.files or None, limit=args.limit,
                                offset=args.offset)
            _print_files(page, args.json)
            return 0
        job = client.get(args.job_id)
        print(json.dumps(job, indent=1) if args.json else job_text(job))
        return 0
    finally:
        client.close()


def _print_files(page: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(page, indent=1))
        return
    for f in page["files"]:
        detail = f.get("text") if f["state"] == "done" else f.get("error") or ""
        print(f"{f['file_id']}\t{f['state']}\t{f['path']}\t{detail or ''}")


# -- ichigo api -----------------------------------------------------------------------------


def _api(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from ichigo_common.settings import get_settings
    from ichigo_common.store.migrate import ensure_schema

    settings = get_settings()
    try:
        ensure_schema(settings.database_url)
    except (RuntimeError, SQLAlchemyError) as exc:
        return _fail(str(exc).splitlines()[0], 2)
    if settings.api_key is None and args.host not in LOOPBACK:
        print(f"ichigo: warning: serving on {args.host} without ICHIGO_API_KEY", file=sys.stderr)
    import uvicorn

    from .app import create_app

    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


# -- registration -------------------------------------------------------------------------


def _add_api_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api", metavar="URL", default=None,
                        help=f"the REST API to use (default: ${API_URL_ENV}; unset: in-process "
                             "on ICHIGO_DATABASE_URL and ICHIGO_BROKER_URL)")


def register(sub) -> None:
    """Add ``submit``, ``jobs``, ``api``, ``flower`` (``monitor``) and ``watch`` to an ``ichigo``
    subparsers object."""
    p = sub.add_parser("submit", help="queue files or folders for the workers")
    p.add_argument("paths", nargs="*", metavar="PATH", help="audio files or folders")
    p.add_argument("--glob", action="append", default=[], dest="globs", metavar="G",
                   help="files matching a glob (quote it; ** spans folders); repeatable")
    p.add_argument("-r", "--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument("-m", "--model", default=None, help="preset name or .yaml (default: settings)")
    p.add_argument("--language", default=None, help="language code passed to the workers")
    p.add_argument("--output-dir", default=None, help="write .txt files here, not beside audio")
    p.add_argument("--priority", type=int, default=0, choices=range(10), metavar="0-9",
                   help="9 runs first (default 0)")
    p.add_argument("--force", action="store_true",
                   help="transcribe again content already transcribed with this model")
    p.add_argument("--name", default=None, help="a label for the job")
    p.add_argument("--callback-url", default=None, help="POSTed to when the job ends")
    p.add_argument("--wait", action="store_true", help="follow the job with a progress bar")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between polls (--wait)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _add_api_option(p)
    p.set_defaults(func=_submit)

    j = sub.add_parser("jobs", help="list jobs, or show one job")
    j.add_argument("job_id", nargs="?", metavar="ID")
    j.add_argument("--cancel", action="store_true", help="cancel the job's files not started")
    j.add_argument("--files", nargs="?", const="", default=None, metavar="STATE",
                   help="list the job's files (optionally in one state)")
    j.add_argument("--limit", type=int, default=50)
    j.add_argument("--offset", type=int, default=0)
    j.add_argument("--json", action="store_true", help="print JSON")
    _add_api_option(j)
    j.set_defaults(func=_jobs)

    a = sub.add_parser("api", help="serve the REST API (uvicorn)")
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, default=8000)
    a.add_argument("--log-level", default="info")
    a.set_defaults(func=_api)

    from .monitor import register as register_monitor
    from .watch import register as register_watch

    register_monitor(sub)
    register_watch(sub)
