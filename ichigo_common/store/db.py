"""Engines and sessions. SQLite: WAL, a busy timeout and BEGIN IMMEDIATE for every transaction
(a deferred transaction that reads then writes fails at once under concurrent writers);
PostgreSQL: pre-ping. Engines are made lazily, per process, so forked workers get their own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

_engines: dict[tuple[int, str], Engine] = {}


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # let SQLAlchemy's begin event issue BEGIN
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        # writers take the lock up front; read-only sessions never block (WAL)
        readonly = conn.get_execution_options().get("ichigo_readonly", False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


def get_engine(url: str) -> Engine:
    key = (os.getpid(), url)
    if key not in _engines:
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": 30})
            _sqlite_pragmas(engine)
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
        _engines[key] = engine
    return _engines[key]


@contextmanager
def session_scope(url: str, readonly: bool = False) -> Iterator[Session]:
    """A transaction: committed on success, rolled back on error. ``readonly`` sessions on
    SQLite begin a deferred transaction, so polling readers do not queue behind writers."""
    engine = get_engine(url)
    if readonly:
        engine = engine.execution_options(ichigo_readonly=True)
    factory = sessionmaker(engine, expire_on_commit=False)
    with factory() as session, session.begin():
        yield session
