"""``ichigo flower``: Flower, the Celery monitor, on the service's own broker.

This process is replaced by ``python -m celery flower ...`` (the real Flower, nothing wrapped),
so what Flower documents holds, and stopping the container stops Flower itself. Flower sees
workers and units of work from their events: workers send them (``worker_send_task_events``),
the producer sends ``task-sent``, and every shard sends ``task-progress`` events; Flower keeps
only its known task fields, so the shard's progress is in its ``result``
("finished/total files (done, reused, failed)") while its state is ``PROGRESS``.

Secrets stay off the command line, where ``ps`` shows them to every local user: the broker
and result-backend URLs (which may hold a Redis password) go through the variables Celery's
``--broker`` / ``--result-backend`` options read (``CELERY_BROKER_URL``,
``CELERY_RESULT_BACKEND``), the basic-auth pairs of ``ICHIGO_FLOWER_BASIC_AUTH`` through
Flower's ``FLOWER_BASIC_AUTH``. Without credentials Flower listens on loopback only unless
``--address`` says otherwise, with a warning: whoever reaches it can revoke tasks and shut
workers down.
"""

from __future__ import annotations

import argparse
import os
import sys

from ichigo_common.settings import Settings, get_settings

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def basic_auth_problem(raw: str | None) -> str | None:
    """Why ``ICHIGO_FLOWER_BASIC_AUTH`` is unusable, or None. Flower itself would fail on a
    malformed pair only at its first request, so check before it starts."""
    if raw is None:
        return None
    for pair in raw.split(","):
        user, sep, password = pair.partition(":")
        if not (user and sep and password):
            return "ICHIGO_FLOWER_BASIC_AUTH must be user:password[,user2:password2]"
    return None


def flower_command(settings: Settings, port: int, address: str, url_prefix: str | None,
                   max_tasks: int, extra: list[str] | None = None,
                   ) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of the Flower process: options on the command line, secrets in
    the environment. ``--persistent=False``: Flower's state file is no record (the SQL store
    is), and a stale one would show dead workers and shards after a restart."""
    argv = [sys.executable, "-m", "celery", "flower", f"--port={port}", f"--address={address}",
            "--persistent=False", f"--max_tasks={max_tasks}"]
    if url_prefix and url_prefix.strip("/"):
        argv.append(f"--url_prefix={url_prefix.strip('/')}")
    argv.extend(extra or ())
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    env["CELERY_BROKER_URL"] = settings.broker_url
    env["CELERY_RESULT_BACKEND"] = settings.result_backend
    if settings.flower_basic_auth:
        env["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
    return argv, env


def run_flower(args: argparse.Namespace) -> int:
    settings = get_settings()
    problem = basic_auth_problem(settings.flower_basic_auth)
    if problem:
        print(f"ichigo: error: {problem}", file=sys.stderr)
        return 2
    if not settings.flower_basic_auth and args.address not in LOOPBACK:
        print(f"ichigo: warning: Flower on {args.address} without ICHIGO_FLOWER_BASIC_AUTH: "
              "anyone who reaches it can revoke tasks and stop workers", file=sys.stderr)
    extra = [a for a in args.flower_options if a != "--"]
    argv, env = flower_command(settings, args.port, args.address, args.url_prefix,
                               args.max_tasks, extra)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)
    return 0  # not reached: the process is Flower now


def register(sub) -> None:
    f = sub.add_parser(
        "flower", help="monitor workers and units of work in Flower",
        description="Run Flower on ICHIGO_BROKER_URL, with basic auth from "
        "ICHIGO_FLOWER_BASIC_AUTH (user:password[,user2:password2]). Further Flower options "
        "go after `--`, e.g. `ichigo flower -- --purge_offline_workers=3600`.")
    f.add_argument("--port", type=int, default=5555, help="default: %(default)s")
    f.add_argument("--address", default="127.0.0.1", help="listen address (default: %(default)s)")
    f.add_argument("--url-prefix", default=None, help="serve under this path (reverse proxy)")
    f.add_argument("--max-tasks", type=int, default=10_000,
                   help="units of work kept in Flower's memory (default: %(default)s)")
    f.add_argument("flower_options", nargs="*", metavar="-- FLOWER_OPTION",
                   help="passed to Flower as they are")
    f.set_defaults(func=run_flower)
