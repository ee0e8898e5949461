"""The ``ichigo`` command: subcommands registered by each package, heavy imports deferred.

- ``ichigo transcribe``, ``ichigo models``: in-process (``ichigo_pipeline``; ``transcribe``
  records into the store, see ``worker.inprocess``);
- ``ichigo db upgrade``: migrations;
- ``ichigo worker``: a Celery worker (``worker.cli``);
- ``ichigo submit``, ``ichigo jobs``, ``ichigo api``: the producer (``producer.cli``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys


def _db_upgrade(args: argparse.Namespace) -> int:
    from .settings import get_settings
    from .store.migrate import upgrade

    url = args.url or get_settings().database_url
    upgrade(url)
    print(f"database at head: {url.split('@')[-1]}", file=sys.stderr)
    return 0


def _register_db(sub) -> None:
    db = sub.add_parser("db", help="database migrations")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    up = dbsub.add_parser("upgrade", help="apply migrations up to the latest schema")
    up.add_argument("--url", default=None, help="database URL (default: ICHIGO_DATABASE_URL)")
    up.set_defaults(func=_db_upgrade)


def build_parser() -> argparse.ArgumentParser:
    from ichigo_pipeline import cli as pipeline_cli

    parser = argparse.ArgumentParser(
        prog="ichigo", description="Batch transcription with Ichigo-ASR"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    pipeline_cli.register(sub)
    _register_db(sub)
    for name in ("worker.inprocess", "worker.cli", "producer.cli"):
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # a package not installed in this deployment
            logging.getLogger(__name__).debug("no %s: %s", name, exc)
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ichigo_pipeline.cli import run

    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
