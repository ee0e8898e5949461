"""Shared fixtures for queue tests: a Redis database of one's own, SQLite and PostgreSQL
stores migrated to head, a tiny fast model, generated clips, and real ``ichigo worker``
subprocesses (started in their own process group, always killed).

Nothing is mocked: Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432 (user postgres,
trust auth). A test session takes a Redis database number nobody else holds (it sets
``LOCK_KEY`` there with NX, on an empty database) and flushes only that database.

Import the fixtures into a test module::

    from .queue_helpers import pg_url, redis_url, sqlite_url, queue_model  # noqa: F401
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from .conftest import REPO, english_ranks, speech_like, write_wav

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCK_KEY = "ichigo-test:owner"
LOCK_TTL_S = 6 * 3600


# -- waiting ---------------------------------------------------------------------------------


def wait_for(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    interval: float = 0.2,
    on_timeout: Callable[[], str] | None = None,
):
    """Poll ``predicate`` until it returns something truthy (returned), or fail after
    ``timeout`` seconds saying ``what`` was awaited (plus ``on_timeout()``, e.g. a log tail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = on_timeout() if on_timeout else ""
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{extra}")
        time.sleep(interval)


# -- Redis -----------------------------------------------------------------------------------


def _redis(db: int):
    import redis

    return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_timeout=10)


def claim_redis_db(token: str, candidates: Iterable[int] = range(15, 1, -1)) -> int:
    """A Redis database number that was empty and is now marked as ours (never the fixed one
    tests/test_producer.py uses, ``ICHIGO_TEST_REDIS_DB``, default 13)."""
    fixed = int(os.environ.get("ICHIGO_TEST_REDIS_DB", "13"))
    for db in candidates:
        if db == fixed:
            continue
        r = _redis(db)
        try:
            if r.set(LOCK_KEY, token, nx=True, ex=LOCK_TTL_S):
                if r.dbsize() == 1:
                    return db
                if r.get(LOCK_KEY) == token.encode():
                    r.delete(LOCK_KEY)
            elif _owner_is_dead(r.get(LOCK_KEY)):
                # a test session killed before its clean-up (SIGKILL, CI cancelled): its
                # database would stay locked for hours
                r.flushdb()
                if r.set(LOCK_KEY, token, nx=True, ex=LOCK_TTL_S):
                    return db
        finally:
            r.close()
    pytest.fail("no free Redis database on 127.0.0.1:6379 (all of 2..15 in use)")


def lock_token() -> str:
    """``host:pid-random``: the owner of a test database, checkable for liveness."""
    return f"{socket.gethostname()}:{os.getpid()}-{uuid.uuid4().hex}"


def _owner_is_dead(owner: bytes | None) -> bool:
    """True for a lock of a process of this host that no longer runs."""
    if not owner:
        return False
    host, _, rest = owner.decode(errors="replace").rpartition(":")
    pid = rest.split("-", 1)[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return not Path(f"/proc/{pid}").exists()


def flush_redis_db(db: int, token: str) -> None:
    """Empty our database (only it) and keep it marked as ours."""
    r = _redis(db)
    try:
        if r.get(LOCK_KEY) not in (None, token.encode()):
            pytest.fail(f"Redis database {db} was taken over by another session")
        r.flushdb()
        r.set(LOCK_KEY, token, ex=LOCK_TTL_S)
    finally:
        r.close()


@dataclass
class RedisDb:
    db: int
    token: str

    @property
    def url(self) -> str:
        return f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.db}"

    def client(self):
        return _redis(self.db)

    def flush(self) -> None:
        flush_redis_db(self.db, self.token)

    def queue_idle(self, queue: str) -> bool:
        """No message waiting in ``queue`` and none fetched but unacknowledged."""
        r = self.client()
        try:
            return r.llen(queue) == 0 and r.hlen("unacked") == 0
        finally:
            r.close()


@contextmanager
def own_redis_db() -> Iterator[RedisDb]:
    """A Redis database of our own for the duration; flushed (only it) afterwards."""
    try:
        _redis(0).ping()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"Redis on {REDIS_HOST}:{REDIS_PORT} is required for queue tests: {exc}")
    token = lock_token()
    db = claim_redis_db(token)
    try:
        yield RedisDb(db, token)
    finally:
        r = _redis(db)
        try:
            r.flushdb()
        finally:
            r.close()


@pytest.fixture(scope="session")
def redis_db() -> Iterator[RedisDb]:
    """The session's Redis database."""
    with own_redis_db() as db:
        yield db


@pytest.fixture
def other_redis_db() -> Iterator[RedisDb]:
    """Another Redis database, for workers that must not share a queue with the session's
    (a worker on another store would take their shards)."""
    with own_redis_db() as db:
        yield db


def celery_client(url: str):
    """A bare Celery client (knows no task): enqueue by name, read results."""
    from celery import Celery

    return Celery("ichigo-test-client", broker=url, backend=url, set_as_current=False)


# -- stores ----------------------------------------------------------------------------------


def sqlite_store_url(folder: Path) -> str:
    from ichigo_common.store.migrate import upgrade

    url = f"sqlite:///{folder / 'ichigo.db'}"
    upgrade(url)
    return url


@contextmanager
def postgres_database(prefix: str = "ichigo_test") -> Iterator[str]:
    """A fresh PostgreSQL database migrated to head; dropped afterwards."""
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            pass
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is required for these tests: {exc}")
    from ichigo_common.store.db import get_engine
    from ichigo_common.store.migrate import upgrade

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        get_engine(url).dispose()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


# -- model and audio -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def queue_model(tmp_path_factory) -> Path:
    """A very small random Ichigo model (one layer, width 64) that decodes 4 tokens: fast
    enough for hundreds of files on a loaded CPU. Returns its YAML path."""
    from ichigo_pipeline.testing import TinyDims, build_tiny_ichigo

    dims = TinyDims(
        n_vocab=51864,
        n_audio_state=64,
        n_audio_head=1,
        n_audio_layer=1,
        n_text_state=64,
        n_text_head=1,
        n_text_layer=1,
    )
    return build_tiny_ichigo(
        tmp_path_factory.mktemp("queue-model"),
        english_ranks(),
        dims,
        decoding_options={"task": "transcribe", "language": "en", "sample_len": 4},
    )


def make_clips(
    folder: Path,
    n: int,
    seed: int = 0,
    min_s: float = 0.3,
    max_s: float = 2.0,
    prefix: str = "clip",
) -> list[Path]:
    """``n`` distinct speech-like WAV clips of random lengths in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        seconds = float(rng.uniform(min_s, max_s))
        paths.append(
            write_wav(
                folder / f"{prefix}{i:04d}.wav", speech_like(seconds, seed=seed * 100_003 + i)
            )
        )
    return paths


# -- workers ---------------------------------------------------------------------------------


def worker_env(
    *, redis_url: str, database_url: str, roots: Iterable[Path], **extra: str
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ICHIGO_BROKER_URL=redis_url,
        ICHIGO_RESULT_BACKEND=redis_url,
        ICHIGO_DATABASE_URL=database_url,
        ICHIGO_ALLOWED_ROOTS=os.pathsep.join(str(Path(r).resolve()) for r in roots),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        # a loaded 2-core host: one thread per worker, float32 decoding (fast on CPU)
        OMP_NUM_THREADS="1",
        ICHIGO_DECODER_DTYPE="float32",
        ICHIGO_DEVICE="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    env.update(extra)
    return env


@dataclass
class WorkerProcess:
    """``python -m ichigo_common.cli worker`` in its own process group, logging to a file."""

    name: str  # Celery node name prefix: <name>@<host>
    env: dict[str, str]
    log_path: Path
    queues: str = "bulk"
    args: tuple[str, ...] = ()
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def nodename(self) -> str:
        import socket

        return f"{self.name}@{socket.gethostname()}"

    def start(self) -> WorkerProcess:
        cmd = [
            sys.executable,
            "-m",
            "ichigo_common.cli",
            "worker",
            f"--hostname={self.name}@%h",
            f"--queues={self.queues}",
            "--concurrency=1",
            "--loglevel=info",
            *self.args,
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                cmd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=str(REPO),
            )
        finally:
            log.close()
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, n: int = 60) -> str:
        return f"--- {self.name} log ({self.log_path}) ---\n" + "\n".join(
            self.log().splitlines()[-n:]
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 120) -> None:
        def ready():
            if not self.alive():
                pytest.fail(f"worker {self.name} exited with {self.proc.returncode}\n{self.tail()}")
            return " ready." in self.log()

        wait_for(ready, timeout, f"worker {self.name} to be ready", on_timeout=self.tail)

    def stop(self, timeout: float = 20) -> None:
        """Warm shutdown (SIGTERM to the main process only, as systemd's ``KillMode=mixed``
        does: the pool child finishes its shard), then SIGKILL the whole process group."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def pool_children(self) -> list[int]:
        """Pids of the main process's children (the prefork pool), from /proc."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()]


@contextmanager
def running_workers(*workers: WorkerProcess, timeout: float = 120) -> Iterator[tuple]:
    """Start the workers (together), wait until all are ready; always stop them all."""
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready(timeout)
        yield workers
    finally:
        for w in workers:
            w.stop()


# -- jobs ------------------------------------------------------------------------------------


def create_job(
    store, model: Path | str, paths: Iterable[Path | str], **job_kw
) -> tuple[str, list[int]]:
    """A job and its files straight in the store (what the producer does before enqueueing)."""
    job_id = store.create_job(source="api", model=str(model), **job_kw)
    ids: list[int] = []
    for batch in store.add_files(job_id, ({"path": str(p)} for p in paths)):
        ids.extend(fid for fid, _ in batch)
    return job_id, ids


def enqueue_shards(
    client, job_id: str, file_ids: list[int], shard: int, queue: str = "bulk"
) -> list:
    from ichigo_common.tasks import TRANSCRIBE_SHARD, shard_payload

    return [
        client.send_task(
            TRANSCRIBE_SHARD, kwargs=shard_payload(job_id, file_ids[i : i + shard]), queue=queue
        )
        for i in range(0, len(file_ids), shard)
    ]


def job_state(store, job_id: str) -> str | None:
    job = store.get_job(job_id)
    return job.state if job else None
