"""``ichigo flower``: Flower, the Celery monitor, on the service's own broker.

It replaces this process with ``python -m celery --broker <ICHIGO_BROKER_URL> flower ...``
(the real Flower, nothing wrapped), so what Flower documents holds. Flower sees workers and
units of work from their events: workers send them (``worker_send_task_events``), the
producer sends ``task-sent``, and every shard sends ``task-progress`` events whose fields
(job_id, total, finished, done, reused, failed, audio_s) Flower shows on the task.

Basic auth comes from ``ICHIGO_FLOWER_BASIC_AUTH`` (``user:password[,user2:pw2]``), handed
to Flower through its environment (``FLOWER_BASIC_AUTH``), never on the command line where
``ps`` would show it. Without it Flower listens on loopback only unless ``--address`` says
otherwise, with a warning.
"""

from __future__ import annotations

import argparse
import os
import sys

from ichigo_common.settings import Settings, get_settings

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def flower_command(settings: Settings, port: int, address: str, url_prefix: str | None,
                   max_tasks: int) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of the Flower process."""
    argv = [sys.executable, "-m", "celery", f"--broker={settings.broker_url}", "flower",
            f"--port={port}", f"--address={address}", "--persistent=False",
            f"--max_tasks={max_tasks}"]
    if url_prefix:
        argv.append(f"--url_prefix={url_prefix.strip('/')}")
    env = dict(os.environ)
    env.pop("FLOWER_BASIC_AUTH", None)
    if settings.flower_basic_auth:
        env["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
    return argv, env


def run_flower(args: argparse.Namespace) -> int:
    settings = get_settings()
    for pair in (settings.flower_basic_auth or "").split(","):
        if pair and ":" not in pair:
            print("ichigo: ICHIGO_FLOWER_BASIC_AUTH must be user:password[,user:password]",
                  file=sys.stderr)
            return 2
    if not settings.flower_basic_auth and args.address not in LOOPBACK:
        print(f"ichigo: warning: Flower on {args.address} without ICHIGO_FLOWER_BASIC_AUTH "
              "can cancel and inspect everything", file=sys.stderr)
    argv, env = flower_command(settings, args.port, args.address, args.url_prefix,
                               args.max_tasks)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)
    return 0  # not reached


def register(sub) -> None:
    f = sub.add_parser("flower", help="monitor workers and units of work in Flower")
    f.add_argument("--port", type=int, default=5555)
    f.add_argument("--address", default="127.0.0.1")
    f.add_argument("--url-prefix", default=None, help="serve under this path (reverse proxy)")
    f.add_argument("--max-tasks", type=int, default=10_000,
                   help="units of work kept in Flower's memory")
    f.set_defaults(func=run_flower)
