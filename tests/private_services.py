"""Redis and PostgreSQL servers of a test's own, to kill and restart at will.

The shared servers on 127.0.0.1:6379 and :5432 serve other test sessions at the same time:
they must never be stopped. Fault tests start private ones on free ports instead:

    with private_redis() as redis:          # redis.url, redis.kill(), redis.start(), ...
        ...
    with private_postgres() as pg:          # pg.url (a fresh database), pg.stop(), pg.start()
        ...

Both are always stopped on exit. PostgreSQL's cluster is made once per test session
(``initdb`` takes seconds) and reused by every ``private_postgres()``, each of which gets a
fresh database in it. As root, PostgreSQL runs as the ``postgres`` user (it refuses root).
The tests skip only when the server binaries are absent.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.05)


# -- Redis ---------------------------------------------------------------------------------


@dataclass
class PrivateRedis:
    """``redis-server`` on ``port``; ``persistent`` turns on the append-only file (fsync on
    every write, so a SIGKILL loses nothing), else nothing survives a restart."""

    port: int
    folder: Path
    persistent: bool = False
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis(host=HOST, port=self.port, socket_timeout=5, socket_connect_timeout=2)

    def _ping(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            log = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"redis-server on port {self.port} exited:\n{log}")
        try:
            with self.client() as r:
                return bool(r.ping())
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def start(self) -> PrivateRedis:
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else [
            "--appendonly", "no"]
        cmd = ["redis-server", "--port", str(self.port), "--bind", HOST, "--save", "",
               *aof, "--dir", str(self.folder), "--daemonize", "no",
               "--logfile", str(self.folder / "redis.log")]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        _wait_until(self._ping, START_TIMEOUT_S, f"private Redis on port {self.port}")
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save; clients see their connections reset."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> float:
        """Kill, stay down ``down_s`` seconds, start on the same port; returns seconds down."""
        self.kill()
        t0 = time.monotonic()
        time.sleep(down_s)
        self.start()
        return time.monotonic() - t0


@contextmanager
def private_redis(persistent: bool = False) -> Iterator[PrivateRedis]:
    """A private Redis on a free port, stopped (and its folder removed) on exit."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: cannot run a private Redis")
    folder = Path(tempfile.mkdtemp(prefix="ichigo-redis-"))
    server = PrivateRedis(free_port(), folder, persistent)
    try:
        server.start()
        yield server
    finally:
        server.kill()
        shutil.rmtree(folder, ignore_errors=True)


# -- PostgreSQL ----------------------------------------------------------------------------


def _pg_bin() -> Path | None:
    """The newest installed server's bin folder (Debian layout), or the one on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the postgres user then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@dataclass
class _Cluster:
    bin: Path
    data: Path
    log: Path


_cluster: _Cluster | None = None


def _remove_cluster(cluster: _Cluster) -> None:
    subprocess.run(_as_postgres([str(cluster.bin / "pg_ctl"), "-D", str(cluster.data), "-m",
                                 "immediate", "stop"]), capture_output=True, check=False)
    shutil.rmtree(cluster.data.parent, ignore_errors=True)


def _session_cluster() -> _Cluster:
    """``initdb`` once per test session; the folder is removed when the session ends."""
    global _cluster
    if _cluster is not None and _cluster.data.exists():
        return _cluster
    pg_bin = _pg_bin()
    if pg_bin is None or not (pg_bin / "initdb").exists():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    base = Path(tempfile.mkdtemp(prefix="ichigo-pg-"))  # /tmp/...: postgres can reach it
    base.chmod(0o755)
    data = base / "data"
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    done = subprocess.run(
        _as_postgres([str(pg_bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                      "--no-sync", "-E", "UTF8"]),
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"initdb failed:\n{done.stdout}\n{done.stderr}")
    _cluster = _Cluster(pg_bin, data, base / "postgres.log")
    atexit.register(_remove_cluster, _cluster)
    return _cluster


@dataclass
class PrivatePostgres:
    """The session's cluster, served on ``port`` while the context lasts."""

    cluster: _Cluster
    port: int
    database: str = "postgres"

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@{HOST}:{self.port}/{database}"

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    @property
    def admin_url(self) -> str:
        return self.url_for("postgres")

    def _pg_ctl(self, *args: str) -> None:
        cmd = [str(self.cluster.bin / "pg_ctl"), "-D", str(self.cluster.data), *args]
        done = subprocess.run(_as_postgres(cmd), capture_output=True, text=True, check=False,
                              timeout=120)
        if done.returncode != 0:
            tail = self.cluster.log.read_text(errors="replace")[-2000:] if (
                self.cluster.log.exists()) else ""
            raise RuntimeError(f"pg_ctl {' '.join(args)} failed: {done.stderr}\n{tail}")

    def start(self) -> PrivatePostgres:
        # fsync off: a test cluster, and a restart after -m immediate replays the WAL anyway
        options = (f"-p {self.port} -k {self.cluster.data} -c listen_addresses={HOST} "
                   "-c fsync=off -c max_connections=100")
        self._pg_ctl("-o", options, "-l", str(self.cluster.log), "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """``mode``: smart, fast (rolls back and disconnects clients) or immediate (a crash:
        no checkpoint, recovery at the next start)."""
        self._pg_ctl("-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.cluster.data / "postmaster.pid").exists()

    def restart(self, down_s: float = 0.0, mode: str = "immediate") -> float:
        """Stop (``mode``), stay down ``down_s`` seconds, start; returns seconds down."""
        self.stop(mode)
        t0 = time.monotonic()
        time.sleep(down_s)
        self.start()
        return time.monotonic() - t0

    def create_database(self) -> str:
        import psycopg

        name = f"ichigo_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """The session's private cluster on a free port, with a fresh database (``.url``);
    stopped on exit (the cluster's files are kept for the next one)."""
    server = PrivatePostgres(_session_cluster(), free_port())
    server.start()
    try:
        server.database = server.create_database()
        yield server
    finally:
        from ichigo_common.store.db import get_engine

        for url in (server.url, server.admin_url):
            get_engine(url).dispose()
        if server.running():
            try:
                server.stop("immediate")
            except RuntimeError:
                pass
