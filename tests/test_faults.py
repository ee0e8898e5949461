"""Faults of the services around the workers, with real processes: Redis killed and restarted
mid-job (with and without persistence), PostgreSQL restarted mid-job, a worker stopped with
SIGTERM mid-shard. Each runs against private servers (``tests/private_services.py``): the
shared ones serve other sessions and are never touched.

The promise checked every time: the job completes, each file has exactly one transcript row
and one complete ``.txt``, no temp file is left, and the worker process survives the outage.
Each test prints one ``FIGURES {...}`` line (files, kills/restarts, seconds down, duplicates,
lost, wall time) for docs/RELIABILITY.md; run with ``-s`` to see them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from ichigo_common.store.models import File, Transcript
from ichigo_common.store.repo import Store

from . import queue_helpers
from .conftest import REPO
from .private_services import free_port, private_postgres, private_redis
from .queue_helpers import (
    WorkerProcess,
    celery_client,
    create_job,
    enqueue_shards,
    make_clips,
    running_workers,
    sqlite_store_url,
    wait_for,
    worker_env,
)

queue_model = queue_helpers.queue_model  # the fixture

JOB_TIMEOUT_S = 150
#: an API request while Redis is down must be answered (503) within this
API_ANSWER_S = 8.0
DOWN_S = 3.0


# -- what every test checks and reports ------------------------------------------------------


@dataclass
class Audit:
    files: int
    done: int
    lost: int  # files not done
    duplicates: int  # transcript rows beyond one per file
    redone: int  # files claimed more than once (work done twice, or given back)
    txt_missing: int
    temp_files: int
    states: dict = field(default_factory=dict)


def audit(store: Store, job_id: str, paths: list[Path]) -> Audit:
    with store.session() as s:
        rows = s.execute(
            select(File.id, File.state, File.attempts, func.count(Transcript.id))
            .outerjoin(Transcript, Transcript.file_id == File.id)
            .where(File.job_id == job_id)
            .group_by(File.id, File.state, File.attempts)
        ).all()
    states: dict[str, int] = {}
    for _, state, _, _ in rows:
        states[state] = states.get(state, 0) + 1
    folders = {p.parent for p in paths}
    return Audit(
        files=len(rows),
        done=states.get("done", 0),
        lost=len(paths) - states.get("done", 0),
        duplicates=sum(max(0, n - 1) for *_, n in rows),
        redone=sum(1 for _, _, attempts, _ in rows if attempts > 1),
        txt_missing=sum(
            1
            for p in paths
            if not p.with_suffix(".txt").exists()
            or not p.with_suffix(".txt").read_text().endswith("\n")
        ),
        temp_files=sum(1 for d in folders for p in d.iterdir() if p.name.startswith(".")),
        states=states,
    )


def assert_each_file_once(store: Store, job_id: str, paths: list[Path]) -> Audit:
    a = audit(store, job_id, paths)
    assert store.get_job(job_id).state == "done", a
    assert a.files == len(paths) and a.states == {"done": len(paths)}, a
    assert a.duplicates == 0 and a.lost == 0, a
    assert a.txt_missing == 0 and a.temp_files == 0, a
    with store.session() as s:
        rows = s.execute(
            select(File.id, Transcript.file_id)
            .join(Transcript, Transcript.id == File.transcript_id)
            .where(File.job_id == job_id)
        ).all()
    assert len(rows) == len(paths) and all(f == t for f, t in rows)
    return a


def report(record_property, name: str, **figures) -> None:
    """One line a human (or docs/RELIABILITY.md) can collect, also in the junit XML."""
    line = json.dumps({"test": name, **figures}, sort_keys=False)
    print(f"\nFIGURES {line}")
    record_property("figures", line)


def done_count(store: Store, job_id: str) -> int:
    return store.job_counts(job_id)["files"].get("done", 0)


def taken_count(store: Store, job_id: str) -> int:
    """Files of the job a worker has claimed (running) or finished."""
    files = store.job_counts(job_id)["files"]
    return files.get("running", 0) + files.get("done", 0)


def wait_job(store: Store, job_id: str, *workers: WorkerProcess, timeout=JOB_TIMEOUT_S) -> None:
    def finished():
        for w in workers:
            if not w.alive():
                pytest.fail(f"worker {w.name} died\n{w.tail()}")
        job = store.get_job(job_id)
        return job is not None and job.state in ("done", "cancelled", "failed")

    wait_for(
        finished,
        timeout,
        f"job {job_id} to finish",
        on_timeout=lambda: "\n".join(w.tail(80) for w in workers)
        + f"\ncounts: {store.job_counts(job_id)}",
    )


# -- the REST API as a process ---------------------------------------------------------------


@dataclass
class ApiProcess:
    """``ichigo api`` on a free port, in its own process group."""

    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ichigo_common.cli", "api", "--port", str(self.port)],
                env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )

        def up():
            if self.proc.poll() is not None:
                pytest.fail(f"ichigo api exited:\n{self.tail()}")
            try:
                return httpx.get(f"{self.url}/healthz?workers=false", timeout=2)
            except httpx.HTTPError:
                return None

        wait_for(up, 60, "ichigo api to answer", on_timeout=self.tail)
        return self

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def timed(self, method: str, path: str, **kw) -> tuple[httpx.Response | None, float]:
        """(response or None on a client-side timeout, seconds taken); never waits > 20 s."""
        t0 = time.monotonic()
        try:
            resp = httpx.request(method, f"{self.url}{path}", timeout=20, **kw)
        except httpx.TimeoutException:
            resp = None
        return resp, time.monotonic() - t0

    def submit(self, folder: Path, model: Path) -> httpx.Response:
        resp, _ = self.timed("POST", "/v1/jobs", json={"paths": [str(folder)],
                                                       "model": str(model)})
        return resp


# -- 1. Redis restarted during a job ---------------------------------------------------------


def _redis_env(redis_url: str, store_url: str, roots: list[Path], **extra: str):
    env = worker_env(redis_url=redis_url, database_url=store_url, roots=roots,
                     ICHIGO_LEASE_SECONDS="10", ICHIGO_SWEEP_SECONDS="1",
                     ICHIGO_SHARD_FILES="8", **extra)
    env.pop("ICHIGO_API_KEY", None)
    return env


def _healthy_with(api: ApiProcess, worker: str) -> httpx.Response | None:
    resp, _ = api.timed("GET", "/healthz")
    if resp is not None and resp.status_code == 200 and worker in resp.json()["workers"]["names"]:
        return resp
    return None


@pytest.mark.queue
@pytest.mark.slow
def test_redis_killed_without_persistence_mid_job(tmp_path, queue_model, record_property):
    """SIGKILL Redis (no persistence: every queued shard is lost) mid-job, restart it 3 s
    later on the same port. The API answers 503 at once while it is down; the worker (same
    process) and the API reconnect by themselves; the job completes, each file once."""
    started = time.monotonic()
    root = tmp_path / "audio"
    clips = make_clips(root / "a", 80, seed=21, min_s=0.5, max_s=2.0)
    store_url = sqlite_store_url(tmp_path)
    store = Store(store_url)
    with private_redis() as redis:
        # shards do not take on the job's other files here: the lost shards must come back
        # through the sweeper (a running shard takes on more only for a while, and only
        # while Redis answers; test_worker covers that)
        env = _redis_env(redis.url, store_url, [root, queue_model.parent],
                         ICHIGO_SHARD_EXTEND_SECONDS="0")
        worker = WorkerProcess("redisfault", env, tmp_path / "worker.log")
        api = ApiProcess(env, tmp_path / "api.log")
        with running_workers(worker):
            pid = worker.proc.pid
            api.start()
            try:
                resp = api.submit(root / "a", queue_model)
                assert resp is not None and resp.status_code == 202, resp and resp.text
                job_id = resp.json()["job_id"]
                wait_for(lambda: done_count(store, job_id) >= 8, 120, "a shard to finish",
                         interval=0.05, on_timeout=worker.tail)
                redis.kill()
                killed = time.monotonic()
                done_at_kill = done_count(store, job_id)
                post, post_s = api.timed("POST", "/v1/jobs", json={
                    "paths": [str(root / "a")], "model": str(queue_model)})
                health, health_s = api.timed("GET", "/healthz")
                time.sleep(max(0.0, DOWN_S - (time.monotonic() - killed)))
                redis.start()
                down_s = time.monotonic() - killed
                wait_job(store, job_id, worker)
                job_wall = time.monotonic() - killed
                # after the restart: the same worker and the same API serve a new job
                fresh = make_clips(root / "b", 6, seed=22)
                after, after_s = api.timed("POST", "/v1/jobs", json={
                    "paths": [str(root / "b")], "model": str(queue_model)})
                assert after is not None and after.status_code == 202, after and after.text
                job2 = after.json()["job_id"]
                wait_job(store, job2, worker, timeout=90)
                # healthy again, the worker answering pings (a loaded host may miss one)
                health_after = wait_for(lambda: _healthy_with(api, worker.nodename), 30,
                                        "/healthz to list the worker again")
            finally:
                api.stop()
            assert worker.alive() and worker.proc.pid == pid
    assert done_at_kill < len(clips), "the job ended before Redis was killed"
    assert post is not None and post.status_code == 503, (post, post and post.text)
    assert post_s < API_ANSWER_S, post_s
    assert health is not None and health.status_code == 503, health
    assert health_s < API_ANSWER_S, health_s
    assert health_after.json()["status"] == "ok"
    assert len(store.list_jobs()) == 2  # the refused submission stored nothing
    resent = _resent_files(worker.log())
    assert resent > 0, "the lost shards were not re-sent by the sweeper"
    a = assert_each_file_once(store, job_id, clips)
    assert_each_file_once(store, job2, fresh)
    report(record_property, "redis_killed_no_persistence", files=len(clips), kills=1,
           restarts=1, down_s=round(down_s, 1), done_at_kill=done_at_kill,
           api_503_s=round(post_s, 2), healthz_503_s=round(health_s, 2),
           files_resent=resent, job_done_after_kill_s=round(job_wall, 1),
           after_restart_post_s=round(after_s, 2),
           duplicates=a.duplicates, lost=a.lost, redone=a.redone, worker_same_pid=True,
           wall_s=round(time.monotonic() - started, 1))


def _resent_files(log: str) -> int:
    """Queued files the sweeper re-sent because the broker had lost their messages."""
    return sum(int(m) for m in re.findall(r"sweeper: (\d+) queued files of", log))


@pytest.mark.queue
@pytest.mark.slow
def test_redis_killed_with_persistence_mid_job(tmp_path, queue_model, record_property):
    """The same kill with an append-only file (fsync always): the waiting shards survive the
    restart and run from the queue. Only the shard in flight between Redis and the worker at
    the kill can be lost (kombu pops a message, then records it as unacknowledged in a second
    round trip): the sweeper re-sends at most that one."""
    started = time.monotonic()
    root = tmp_path / "audio"
    clips = make_clips(root / "a", 80, seed=23, min_s=1.0, max_s=3.0)
    store_url = sqlite_store_url(tmp_path)
    store = Store(store_url)
    shard = 16
    with private_redis(persistent=True) as redis:
        env = _redis_env(redis.url, store_url, [root, queue_model.parent])
        worker = WorkerProcess("redisaof", env, tmp_path / "worker.log")
        job_id, ids = create_job(store, queue_model, clips)

        def waiting() -> int:
            with redis.client() as r:
                return sum(r.llen(k) for k in r.keys("bulk*"))

        with running_workers(worker):
            pid = worker.proc.pid
            enqueue_shards(celery_client(redis.url), job_id, ids, shard=shard)
            # mid-way through the second shard: the worker is computing, not fetching
            wait_for(lambda: done_count(store, job_id) >= shard + 4, 120,
                     "the second shard to be under way", interval=0.05, on_timeout=worker.tail)
            before = waiting()
            down_s = redis.restart(DOWN_S)
            survived = waiting()
            wait_job(store, job_id, worker)
            assert worker.alive() and worker.proc.pid == pid
    resent = _resent_files(worker.log())
    a = assert_each_file_once(store, job_id, clips)
    report(record_property, "redis_killed_aof", files=len(clips), kills=1, restarts=1,
           down_s=round(down_s, 1), messages_before_kill=before, messages_survived=survived,
           files_resent=resent, duplicates=a.duplicates, lost=a.lost, redone=a.redone,
           worker_same_pid=True, wall_s=round(time.monotonic() - started, 1))
    assert before > 0 and survived >= before - 1, (before, survived)
    assert resent <= shard, resent


# -- 2. PostgreSQL restarted during a job ----------------------------------------------------


def _or_none(fn):
    """``fn()``, or None while the database is restarting."""
    try:
        return fn()
    except Exception:  # noqa: BLE001 - OperationalError while it is down
        return None


@pytest.mark.queue
@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_restarted_twice_mid_job(tmp_path, queue_model, record_property):
    """PostgreSQL stopped mid-job twice, 3 s down each time: first ``-m immediate`` (a
    crash: connections cut, recovery at start), then ``-m fast`` (clients told to go). The
    running shard's writes wait for the database and go on: no file failed, lost or
    transcribed twice, and the worker process survives."""
    from ichigo_common.store.migrate import upgrade

    started = time.monotonic()
    root = tmp_path / "audio"
    clips = make_clips(root / "a", 60, seed=24, min_s=0.5, max_s=2.0)
    with private_redis() as redis, private_postgres() as pg:
        upgrade(pg.url)
        store = Store(pg.url)
        env = worker_env(redis_url=redis.url, database_url=pg.url,
                         roots=[root, queue_model.parent], ICHIGO_LEASE_SECONDS="20",
                         ICHIGO_SWEEP_SECONDS="1")
        worker = WorkerProcess("pgfault", env, tmp_path / "worker.log")
        job_id, ids = create_job(store, queue_model, clips)
        downs, done_at_stop = [], []
        with running_workers(worker):
            pid = worker.proc.pid
            enqueue_shards(celery_client(redis.url), job_id, ids, shard=10)
            for mode, at in (("immediate", 3), ("fast", 33)):
                wait_for(lambda at=at: (_or_none(lambda: done_count(store, job_id)) or 0) >= at,
                         120, f"{at} files done", interval=0.05, on_timeout=worker.tail)
                done_at_stop.append(done_count(store, job_id))
                downs.append(pg.restart(DOWN_S, mode=mode))

            def finished():
                if not worker.alive():
                    pytest.fail(f"worker died\n{worker.tail()}")
                job = _or_none(lambda: store.get_job(job_id))
                return job is not None and job.state == "done"

            wait_for(finished, JOB_TIMEOUT_S, "the job to finish after the restarts",
                     on_timeout=lambda: worker.tail(80) + f"\n{store.job_counts(job_id)}")
            assert worker.alive() and worker.proc.pid == pid
        a = assert_each_file_once(store, job_id, clips)
    log = worker.log()
    report(record_property, "postgres_restarts", files=len(clips), restarts=2,
           modes="immediate,fast", down_s=[round(d, 1) for d in downs],
           done_at_stop=done_at_stop, writes_waited=log.count("store unavailable during"),
           duplicates=a.duplicates, lost=a.lost, redone=a.redone,
           failed=a.states.get("failed", 0), worker_same_pid=True,
           wall_s=round(time.monotonic() - started, 1))
    assert all(n < len(clips) for n in done_at_stop), done_at_stop
    assert a.redone == 0, a  # nothing given back and transcribed again


@pytest.mark.postgres
def test_patient_store_waits_for_a_restarting_database(tmp_path):
    """The unit: a result write issued while PostgreSQL is down returns once it is back
    (one row); errors that are not about reaching the database are raised at once."""
    import threading

    from sqlalchemy.exc import IntegrityError

    from ichigo_common.store.migrate import upgrade
    from ichigo_common.store.repo import PatientStore, TranscriptData, is_transient

    with private_postgres() as pg:
        upgrade(pg.url)
        store = PatientStore(pg.url, patience_s=60)
        job_id, (fid,) = create_job(store, "m", [tmp_path / "x.wav"])
        store.claim([fid], "w:1:t", lease_seconds=60, max_attempts=3)
        data = TranscriptData(model="m", content_hash="h" * 64, text="hi", tokens=None,
                              chunks=[], duration_s=1.0, processing_s=0.1, provenance={})
        pg.stop("immediate")
        outcome: dict = {}

        def write():
            t0 = time.monotonic()
            outcome["tid"] = store.record_result(fid, data, 10)
            outcome["s"] = time.monotonic() - t0

        thread = threading.Thread(target=write)
        thread.start()
        time.sleep(DOWN_S)
        assert thread.is_alive(), "the write did not wait for the database"
        pg.start()
        thread.join(30)
        assert outcome.get("tid") is not None and outcome["s"] >= DOWN_S - 0.5, outcome
        assert store.record_result(fid, data, 10) == outcome["tid"]  # idempotent
        assert store.job_counts(job_id)["files"] == {"done": 1}
        with pytest.raises(IntegrityError) as info:  # not transient: no waiting
            store.record_result(10**9, data, 10)
        assert not is_transient(info.value)


@pytest.mark.postgres
def test_db_upgrade_on_a_private_postgres():
    """``ichigo db upgrade`` against the private server's ``postgres`` database (the URL form
    the fault tests use), twice: the second run finds the schema at head."""
    from ichigo_common.store.migrate import ensure_schema

    with private_postgres() as pg:
        env = dict(os.environ, ICHIGO_DATABASE_URL=pg.admin_url)
        for _ in range(2):
            done = subprocess.run([sys.executable, "-m", "ichigo_common.cli", "db", "upgrade"],
                                  env=env, cwd=REPO, capture_output=True, text=True,
                                  timeout=120, check=False)
            assert done.returncode == 0, done.stderr
        assert "at head" in done.stdout + done.stderr
        ensure_schema(pg.admin_url)


def test_transient_errors_are_told_apart_on_sqlite(tmp_path):
    import sqlite3

    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from ichigo_common.store.repo import is_transient

    store = Store(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(OperationalError) as info, store.session() as s:
        s.execute(text("SELECT * FROM no_such_table"))
    assert not is_transient(info.value)  # a broken schema is not waited for
    locked = OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))
    assert is_transient(locked)


def test_a_database_outage_fails_no_file_even_on_its_last_attempt(tmp_path):
    """When an outage outlasts the store's patience the shard gives its files back: a file on
    its last attempt is failed for a real worker error, never for the database's."""
    from worker.tasks import _give_back

    store = Store(sqlite_store_url(tmp_path))
    _, ids = create_job(store, "m", [tmp_path / "a.wav", tmp_path / "b.wav"])
    owner = "w@host:1:t"
    claims, _ = store.claim(ids, owner, lease_seconds=60, max_attempts=3)
    last = [dataclasses.replace(c, attempts=3) for c in claims]  # as if tried twice before
    assert _give_back(store, last, owner, "worker error: database gone", None) == 2
    assert store.job_counts(claims[0].job_id)["files"] == {"queued": 2}
    claims, _ = store.claim(ids, owner, lease_seconds=60, max_attempts=3)
    last = [dataclasses.replace(c, attempts=3) for c in claims]
    assert _give_back(store, last, owner, "worker error: model broken", 3) == 0
    assert store.job_counts(claims[0].job_id)["files"] == {"failed": 2}


# -- 3. warm shutdown in the middle of a long shard ------------------------------------------


@pytest.mark.queue
@pytest.mark.slow
def test_sigterm_mid_shard_finishes_the_shard_then_another_worker_the_rest(
        tmp_path, queue_model, record_property):
    """SIGTERM to a worker's main process while its pool child runs a 30-file shard (a warm
    shutdown, what ``systemctl stop`` with ``KillMode=mixed`` does): the shard is finished,
    with the files it had taken on from the job before the SIGTERM and none after, the
    worker exits 0 well within the shard's soft time limit, the other shards wait in the
    queue, and a second worker completes them; each file once, no temp file left."""
    from worker.celery_app import soft_time_limit

    started = time.monotonic()
    root = tmp_path / "audio"
    clips = make_clips(root / "a", 90, seed=25, min_s=1.0, max_s=3.0)
    store_url = sqlite_store_url(tmp_path)
    store = Store(store_url)
    hard = 120.0
    with private_redis() as redis:
        env = _redis_env(redis.url, store_url, [root, queue_model.parent],
                         ICHIGO_TASK_TIME_LIMIT=str(hard))
        first = WorkerProcess("warm1", env, tmp_path / "warm1.log")
        job_id, ids = create_job(store, queue_model, clips)
        shards = [ids[i : i + 30] for i in range(0, len(ids), 30)]
        with running_workers(first):
            enqueue_shards(celery_client(redis.url), job_id, ids, shard=30)
            wait_for(lambda: done_count(store, job_id) >= 1, 120, "the first shard to start",
                     interval=0.02, on_timeout=first.tail)
            done_at_term = done_count(store, job_id)
            first.proc.send_signal(signal.SIGTERM)
            term = time.monotonic()
            time.sleep(0.5)  # the main process notes the shutdown for its pool child
            taken_at_term = taken_count(store, job_id)
            try:
                code = first.proc.wait(hard)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the worker did not stop within {hard:.0f} s\n{first.tail()}")
            shutdown_s = time.monotonic() - term
            done_at_exit = done_count(store, job_id)
            with redis.client() as r:
                waiting = sum(r.llen(k) for k in r.keys("bulk*"))
        second = WorkerProcess("warm2", env, tmp_path / "warm2.log")
        with running_workers(second):
            wait_job(store, job_id, second)
    a = assert_each_file_once(store, job_id, clips)
    by_worker = _workers_by_file(store, job_id)
    report(record_property, "sigterm_mid_shard", files=len(clips), shard_files=30,
           sigterms=1, done_at_sigterm=done_at_term, done_at_exit=done_at_exit,
           shutdown_s=round(shutdown_s, 1), exit_code=code, shards_left_waiting=waiting,
           duplicates=a.duplicates, lost=a.lost, redone=a.redone,
           temp_files=a.temp_files, wall_s=round(time.monotonic() - started, 1))
    assert done_at_term < 30, "the shard ended before the SIGTERM; make it longer"
    assert code == 0, first.tail()
    assert shutdown_s < soft_time_limit(hard), shutdown_s
    # its shard finished with what it had taken on (``_Extension``: the newest files, a
    # batch at a time), nothing taken after the SIGTERM; the other shards' messages wait
    assert done_at_exit == taken_at_term and 30 <= taken_at_term < 90, (done_at_exit,
                                                                         taken_at_term)
    assert waiting == 2
    assert {by_worker[i] for i in shards[0]} == {first.nodename}
    assert sum(by_worker[i] == first.nodename for i in ids) == done_at_exit
    assert {by_worker[i] for i in shards[1]} == {second.nodename}
    assert a.redone == 0


def _workers_by_file(store: Store, job_id: str) -> dict[int, str]:
    with store.session() as s:
        rows = s.execute(
            select(Transcript.file_id, Transcript.provenance)
            .join(File, File.id == Transcript.file_id)
            .where(File.job_id == job_id)
        ).all()
    return {fid: prov["worker"] for fid, prov in rows}
