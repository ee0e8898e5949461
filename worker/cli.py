"""``ichigo worker``: a Celery worker that transcribes queued shards, one per GPU.

The prefork pool with one child: the parent keeps heartbeats, remote control (Flower's
inspect) and time limits going while the child computes; the child loads the model on its
first shard. The parent never imports torch: ``--gpu`` sets ``CUDA_VISIBLE_DEVICES`` before
anything could, and CUDA does not survive fork.

Stopping: SIGTERM to the main process is a warm shutdown (the child finishes its shard).
Under systemd use ``KillMode=mixed``: the default sends SIGTERM to the child as well, which
kills the shard mid-way (its files then wait for their lease to end before another worker
takes them over).
"""

from __future__ import annotations

import argparse
import os
import sys

from ichigo_common.tasks import BULK_QUEUE, INTERACTIVE_QUEUE

LOGLEVELS = ("debug", "info", "warning", "error", "critical")


def _check_database(url: str) -> str | None:
    """None when the store is reachable and at the latest schema, else what is wrong."""
    from ichigo_common.store.db import get_engine
    from ichigo_common.store.migrate import ensure_schema

    try:
        ensure_schema(url)
    except RuntimeError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - cannot connect, no such database, ...
        where = url.split("@")[-1]
        return (
            f"cannot check the database schema at {where} ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); is it reachable? "
            "Run `ichigo db upgrade` once it is."
        )
    finally:
        # no connection of the parent may leak into the forked pool child
        get_engine(url).dispose()
    return None


def worker_argv(args: argparse.Namespace) -> list[str]:
    argv = [
        "worker",
        f"--loglevel={args.loglevel}",
        "--pool=prefork",
        f"--concurrency={args.concurrency}",
        f"--queues={args.queues}",
        "--without-gossip",
    ]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    return argv


def run(args: argparse.Namespace) -> int:
    if args.gpu is not None:
        if "torch" in sys.modules:  # never expected: nothing before here imports it
            print("ichigo: warning: torch was imported before --gpu took effect", file=sys.stderr)
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu
        os.environ["ICHIGO_DEVICE"] = "cuda"
    elif args.device:
        os.environ["ICHIGO_DEVICE"] = args.device
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        os.environ["ICHIGO_BATCH_SIZE"] = str(args.batch_size)
    if args.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")

    from ichigo_common.settings import get_settings

    get_settings.cache_clear()  # the environment just changed
    settings = get_settings()
    if not settings.allowed_roots:
        print(
            "ichigo: error: ICHIGO_ALLOWED_ROOTS is not set: a worker reads audio only under "
            "these folders (separated by ':'), and would refuse every file",
            file=sys.stderr,
        )
        return 2
    problem = _check_database(settings.database_url)
    if problem:
        print(f"ichigo: error: {problem}", file=sys.stderr)
        return 2

    from .celery_app import app  # configured from the settings above

    app.worker_main(worker_argv(args))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "worker",
        help="run a queue worker (Celery, prefork pool) that transcribes shards",
        description="Consume transcription shards from Redis and record results in the store. "
        "Settings come from ICHIGO_* variables (ICHIGO_BROKER_URL, ICHIGO_RESULT_BACKEND, "
        "ICHIGO_DATABASE_URL, ICHIGO_ALLOWED_ROOTS, ...). Run one worker per GPU.",
    )
    p.add_argument(
        "--gpu",
        default=None,
        metavar="N",
        help="the GPU to use (sets CUDA_VISIBLE_DEVICES=N; the worker then runs on cuda)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="torch device when no --gpu is given (default: cuda if available, else cpu)",
    )
    p.add_argument(
        "--queues",
        "-Q",
        default=f"{INTERACTIVE_QUEUE},{BULK_QUEUE}",
        help="comma-separated queues, polled in this order (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="chunks per padded batch (ICHIGO_BATCH_SIZE)"
    )
    p.add_argument(
        "--concurrency",
        "-c",
        type=int,
        default=1,
        help="pool children, each with its own model (default 1: one per GPU)",
    )
    p.add_argument("--loglevel", "-l", default="info", choices=LOGLEVELS)
    p.add_argument(
        "--hostname",
        "-n",
        default=None,
        help="Celery node name, e.g. gpu0@%%h (default: celery@host)",
    )
    p.set_defaults(func=run)
