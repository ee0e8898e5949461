"""The queue worker end to end: real Redis, real ``ichigo worker`` subprocesses (Celery prefork),
real SQLite and PostgreSQL stores, a tiny random model. Shards are enqueued by task name with a
bare Celery client, after the job and its files were put in the store (the producer's part)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from ichigo_common.store.models import File, Transcript, utcnow
from ichigo_common.store.repo import Store
from ichigo_common.tasks import BULK_QUEUE, INTERACTIVE_QUEUE, TRANSCRIBE_SHARD, shard_payload

from . import queue_helpers
from .queue_helpers import (
    RedisDb,
    WorkerProcess,
    celery_client,
    create_job,
    enqueue_shards,
    job_state,
    make_clips,
    running_workers,
    sqlite_store_url,
    wait_for,
    worker_env,
)

# fixtures shared by the queue tests
redis_db = queue_helpers.redis_db
other_redis_db = queue_helpers.other_redis_db
pg_url = queue_helpers.pg_url
queue_model = queue_helpers.queue_model

pytestmark = pytest.mark.queue

JOB_TIMEOUT_S = 240


@dataclass
class QueueSetup:
    redis: RedisDb
    database_url: str
    root: Path  # ICHIGO_ALLOWED_ROOTS
    base: Path  # outside the root: logs, files that must be refused
    model: Path

    @property
    def store(self) -> Store:
        return Store(self.database_url)

    def env(self, **extra: str) -> dict[str, str]:
        return worker_env(
            redis_url=self.redis.url, database_url=self.database_url, roots=[self.root], **extra
        )

    def worker(
        self, name: str, queues: str = f"{INTERACTIVE_QUEUE},{BULK_QUEUE}", **extra: str
    ) -> WorkerProcess:
        return WorkerProcess(
            name, self.env(**extra), self.base / "logs" / f"{name}.log", queues=queues
        )


def _setup(base: Path, redis: RedisDb, database_url: str, model: Path) -> QueueSetup:
    root = base / "audio"
    root.mkdir(parents=True)
    redis.flush()
    return QueueSetup(redis, database_url, root, base, model)


def _wait_job(
    setup: QueueSetup, job_id: str, *workers: WorkerProcess, timeout: float = JOB_TIMEOUT_S
) -> None:
    def done():
        for w in workers:
            if not w.alive():
                pytest.fail(f"worker {w.name} died\n{w.tail()}")
        return job_state(setup.store, job_id) in ("done", "cancelled")

    wait_for(
        done,
        timeout,
        f"job {job_id} to finish",
        on_timeout=lambda: (
            "\n".join(w.tail() for w in workers) + f"\ncounts: {setup.store.job_counts(job_id)}"
        ),
    )


def _transcripts_per_file(store: Store, job_id: str) -> dict[int, int]:
    with store.session() as s:
        rows = s.execute(
            select(File.id, func.count(Transcript.id))
            .outerjoin(Transcript, Transcript.file_id == File.id)
            .where(File.job_id == job_id)
            .group_by(File.id)
        ).all()
    return {fid: n for fid, n in rows}


def _assert_each_file_once(
    setup: QueueSetup, job_id: str, paths: list[Path], max_attempts: int = 1
) -> None:
    """Job done, one transcript row per file, each file pointing at its own row, and exactly
    one ``.txt`` per audio file next to it, with no temp file left behind."""
    store = setup.store
    assert job_state(store, job_id) == "done"
    counts = store.job_counts(job_id)
    assert counts["files"] == {"done": len(paths)}, counts
    per_file = _transcripts_per_file(store, job_id)
    assert len(per_file) == len(paths)
    assert set(per_file.values()) == {1}, {k: v for k, v in per_file.items() if v != 1}
    with store.session() as s:
        rows = s.execute(
            select(File.id, File.transcript_id, Transcript.file_id, File.attempts)
            .join(Transcript, Transcript.id == File.transcript_id)
            .where(File.job_id == job_id)
        ).all()
    assert len(rows) == len(paths)
    assert all(fid == tfid for fid, _, tfid, _ in rows)
    # nobody claimed a file twice (unless a worker died holding it)
    assert max(a for *_, a in rows) <= max_attempts
    for folder in {p.parent for p in paths}:
        audio = sorted(p.stem for p in folder.glob("*.wav"))
        texts = sorted(p.stem for p in folder.glob("*.txt"))
        assert texts == audio
        leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".")]
        assert leftovers == []


def _workers_of(store: Store, job_id: str) -> dict[str, int]:
    with store.session() as s:
        provenance = s.scalars(
            select(Transcript.provenance)
            .join(File, File.id == Transcript.file_id)
            .where(File.job_id == job_id)
        ).all()
    out: dict[str, int] = {}
    for p in provenance:
        out[p["worker"]] = out.get(p["worker"], 0) + 1
    return out


# -- a shared worker on SQLite -----------------------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_setup(tmp_path_factory, redis_db, queue_model) -> QueueSetup:
    base = tmp_path_factory.mktemp("worker-sqlite")
    return _setup(base, redis_db, sqlite_store_url(base), queue_model)


@pytest.fixture(scope="module")
def worker1(sqlite_setup):
    """One worker for the SQLite tests, warmed up with a one-file job (the pool child's first
    shard imports torch and loads the model)."""
    setup = sqlite_setup
    w = setup.worker("w1")
    started = time.perf_counter()
    with running_workers(w):
        ready = time.perf_counter() - started
        paths = make_clips(setup.root / "warmup", 1, seed=999)
        job_id, ids = create_job(setup.store, setup.model, paths)
        enqueue_shards(celery_client(setup.redis.url), job_id, ids, shard=1)
        _wait_job(setup, job_id, w)
        print(
            f"\nworker w1: ready in {ready:.1f} s, first shard (torch import + model load) "
            f"done {time.perf_counter() - started:.1f} s after start"
        )
        yield w


def test_200_files_each_exactly_once(sqlite_setup, worker1):
    setup = sqlite_setup
    paths = make_clips(setup.root / "a", 200, seed=1)
    job_id, ids = create_job(setup.store, setup.model, paths)
    client = celery_client(setup.redis.url)
    started = time.perf_counter()
    results = enqueue_shards(client, job_id, ids, shard=20)
    progress, stop = {}, threading.Event()

    def watch():  # the PROGRESS states shards report in the result backend
        watcher = celery_client(setup.redis.url)
        while not stop.is_set():
            for r in results:
                meta = watcher.backend.get_task_meta(r.id)
                if meta["status"] == "PROGRESS":
                    progress[r.id] = meta["result"]
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        _wait_job(setup, job_id, worker1)
    finally:
        stop.set()
        thread.join(5)
    wall = time.perf_counter() - started
    audio_s = setup.store.job_counts(job_id)["audio_s_done"]
    print(f"\n200-file job: {wall:.1f} s wall for {audio_s:.0f} s of audio on one warm worker")
    summaries = [r.get(timeout=30) for r in results]
    assert sum(s["claimed"] for s in summaries) == 200
    assert sum(s["done"] for s in summaries) == 200
    _assert_each_file_once(setup, job_id, paths)
    assert progress, "no shard was ever seen in the PROGRESS state"
    # a shard's total is the files it claimed: its own, less those another shard took
    # first, plus those it took from later shards of the job (``_Extension``)
    assert all(m["job_id"] == job_id and m["finished"] <= m["total"] for m in progress.values())
    wait_for(lambda: setup.redis.queue_idle(BULK_QUEUE), 30, "the queue to drain")


def test_two_workers_share_a_job_sqlite(sqlite_setup, worker1):
    setup = sqlite_setup
    paths = make_clips(setup.root / "b", 60, seed=2)
    job_id, ids = create_job(setup.store, setup.model, paths)
    w2 = setup.worker("w2")
    with running_workers(w2):
        results = enqueue_shards(celery_client(setup.redis.url), job_id, ids, shard=3)
        _wait_job(setup, job_id, worker1, w2)
        summaries = [r.get(timeout=30) for r in results]
    _assert_each_file_once(setup, job_id, paths)
    by_worker = _workers_of(setup.store, job_id)
    assert set(by_worker) == {worker1.nodename, w2.nodename}, by_worker
    assert sum(by_worker.values()) == 60
    assert {s["worker"] for s in summaries} == {worker1.nodename, w2.nodename}


@pytest.mark.postgres
def test_two_workers_share_a_job_postgres(tmp_path, other_redis_db, pg_url, queue_model):
    # its own Redis database: the SQLite tests' worker must not take these shards
    setup = _setup(tmp_path, other_redis_db, pg_url, queue_model)
    paths = make_clips(setup.root / "c", 40, seed=3)
    job_id, ids = create_job(setup.store, setup.model, paths)
    p1, p2 = setup.worker("p1"), setup.worker("p2")
    with running_workers(p1, p2):
        enqueue_shards(celery_client(setup.redis.url), job_id, ids, shard=2)
        _wait_job(setup, job_id, p1, p2)
    _assert_each_file_once(setup, job_id, paths)
    by_worker = _workers_of(setup.store, job_id)
    assert set(by_worker) == {p1.nodename, p2.nodename}, by_worker
    assert sum(by_worker.values()) == 40


def test_paths_outside_the_allowed_roots_are_refused_unread(sqlite_setup, worker1):
    setup = sqlite_setup
    outside = setup.base / "outside"
    outside.mkdir()
    fifo = outside / "secret.wav"
    os.mkfifo(fifo)  # opening it to read would block: a worker that tried would hang here
    (real,) = make_clips(outside, 1, seed=40, prefix="real")
    inside = setup.root / "d"
    (ok,) = make_clips(inside, 1, seed=41)
    (inside / "link.wav").symlink_to(fifo)  # a link inside the root to a file outside it
    bad = [str(fifo), str(real), str(inside / "link.wav"), f"{inside}/../../outside/real0000.wav"]
    job_id, ids = create_job(setup.store, setup.model, [ok, *bad])
    enqueue_shards(celery_client(setup.redis.url), job_id, ids, shard=len(ids))
    _wait_job(setup, job_id, worker1, timeout=60)
    files = {f.path: f for f, _ in setup.store.list_files(job_id)}
    assert files[str(ok)].state == "done"
    for path in bad:
        f = files[path]
        assert f.state == "failed", (path, f.state, f.error)
        assert f.error.startswith("refused:") and "outside the allowed roots" in f.error, f.error
        assert f.content_hash is None  # never hashed, i.e. never read
    with pytest.raises(OSError) as info:  # nobody holds the FIFO open for reading
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert info.value.errno == errno.ENXIO
    assert not list(outside.glob("*.txt")) and not (inside / "link.txt").exists()


def test_a_redelivered_shard_writes_nothing_twice(sqlite_setup, worker1):
    setup = sqlite_setup
    paths = make_clips(setup.root / "e", 6, seed=5)
    job_id, ids = create_job(setup.store, setup.model, paths)
    client = celery_client(setup.redis.url)
    task_id = str(uuid.uuid4())
    first = client.send_task(
        TRANSCRIBE_SHARD, kwargs=shard_payload(job_id, ids), queue=BULK_QUEUE, task_id=task_id
    )
    assert first.get(timeout=JOB_TIMEOUT_S)["done"] == 6
    txts = sorted(p.with_suffix(".txt") for p in paths)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in txts}
    rows_before = _transcripts_per_file(setup.store, job_id)

    # the same message again (same task id, as Redis re-delivers it), then once more
    again = client.send_task(
        TRANSCRIBE_SHARD, kwargs=shard_payload(job_id, ids), queue=BULK_QUEUE, task_id=task_id
    )
    third = client.send_task(TRANSCRIBE_SHARD, kwargs=shard_payload(job_id, ids), queue=BULK_QUEUE)
    summary = third.get(timeout=60)
    assert summary["claimed"] == 0 and summary["done"] == 0
    wait_for(lambda: setup.redis.queue_idle(BULK_QUEUE), 30, "the queue to drain")
    assert again.state == "SUCCESS"
    assert _transcripts_per_file(setup.store, job_id) == rows_before
    assert set(rows_before.values()) == {1}
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in txts} == before
    _assert_each_file_once(setup, job_id, paths)


def _set_file(store: Store, file_id: int, **values) -> None:
    with store.session() as s:
        s.execute(update(File).where(File.id == file_id).values(**values))


def test_poison_file_is_failed_after_max_attempts(sqlite_setup, worker1):
    setup = sqlite_setup
    poison, fine = make_clips(setup.root / "f", 2, seed=6)
    job_id, (poison_id, fine_id) = create_job(setup.store, setup.model, [poison, fine])
    # a worker died on it max_attempts times (ICHIGO_MAX_ATTEMPTS defaults to 3); the last
    # one's lease has expired
    _set_file(
        setup.store,
        poison_id,
        state="running",
        attempts=3,
        lease_owner="gone:1:x",
        lease_expires_at=utcnow() - timedelta(minutes=1),
    )
    result = celery_client(setup.redis.url).send_task(
        TRANSCRIBE_SHARD, kwargs=shard_payload(job_id, [poison_id, fine_id]), queue=BULK_QUEUE
    )
    summary = result.get(timeout=60)
    assert summary["exhausted"] == 1 and summary["done"] == 1
    _wait_job(setup, job_id, worker1, timeout=30)
    files = {f.id: f for f, _ in setup.store.list_files(job_id)}
    assert files[poison_id].state == "failed"
    assert "gave up after 3 attempts" in files[poison_id].error
    assert files[poison_id].attempts == 3 and files[poison_id].lease_owner is None
    assert files[fine_id].state == "done"
    assert not poison.with_suffix(".txt").exists()


def test_files_leased_by_a_dead_worker_are_taken_over_when_the_lease_ends(sqlite_setup, worker1):
    """A killed pool child's shard is re-queued at once, while its lease still runs: the
    worker backs off and looks again when the lease has ended, then claims the file."""
    setup = sqlite_setup
    (path,) = make_clips(setup.root / "f2", 1, seed=7)
    job_id, (file_id,) = create_job(setup.store, setup.model, [path])
    stale = path.parent / f".{path.stem}.txt.k1ll3d.tmp"  # the dead writer's half-written txt
    stale.write_text("half")
    _set_file(
        setup.store,
        file_id,
        state="running",
        attempts=1,
        lease_owner="gone:2:y",
        lease_expires_at=utcnow() + timedelta(seconds=3),
    )
    celery_client(setup.redis.url).send_task(
        TRANSCRIBE_SHARD, kwargs=shard_payload(job_id, [file_id]), queue=BULK_QUEUE
    )
    _wait_job(setup, job_id, worker1, timeout=60)
    ((f, t),) = setup.store.list_files(job_id)
    assert f.state == "done" and f.attempts == 2 and t is not None
    assert t.provenance["worker"] == worker1.nodename
    assert not stale.exists() and path.with_suffix(".txt").exists()


def test_a_killed_pool_child_loses_nothing_and_duplicates_nothing(sqlite_setup):
    """SIGKILL the child mid-shard: Celery re-queues the message (reject on worker lost), the
    new child finds the files still leased by the dead one, looks again when the lease ends,
    then finishes them; each file once, those done before the kill not redone."""
    setup = sqlite_setup
    # its own queue: the shared worker must not take the shard
    w = setup.worker("crash", queues="crash-test", ICHIGO_LEASE_SECONDS="6")
    paths = make_clips(setup.root / "k", 80, seed=11)
    job_id, ids = create_job(setup.store, setup.model, paths)

    def some_done():
        return setup.store.job_counts(job_id)["files"].get("done", 0) > 0

    with running_workers(w):
        celery_client(setup.redis.url).send_task(
            TRANSCRIBE_SHARD, kwargs=shard_payload(job_id, ids), queue="crash-test"
        )
        wait_for(some_done, 120, "the shard to be under way", interval=0.1, on_timeout=w.tail)
        (child,) = w.pool_children()
        os.kill(child, signal.SIGKILL)
        done_before = setup.store.job_counts(job_id)["files"].get("done", 0)
        _wait_job(setup, job_id, w, timeout=JOB_TIMEOUT_S)
    assert done_before < 80, "the shard finished before the kill; make it longer"
    _assert_each_file_once(setup, job_id, paths, max_attempts=2)
    with setup.store.session() as s:
        attempts = s.execute(
            select(File.attempts, func.count()).where(File.job_id == job_id).group_by(File.attempts)
        ).all()
    assert dict(attempts).get(2, 0) >= 80 - done_before - 1, (attempts, done_before)
    log = w.log()
    assert "WorkerLostError" in log
    assert "files leased elsewhere; checking again" in log  # it waited for the dead lease


def _finished_at(store: Store, job_id: str) -> list:
    with store.session() as s:
        return sorted(s.scalars(select(File.finished_at).where(File.job_id == job_id)))


def _wait_under_way(setup: QueueSetup, job_id: str, what: str) -> None:
    """Until a file of the job is done (its shard runs)."""
    wait_for(
        lambda: setup.store.job_counts(job_id)["files"].get("done", 0) > 0,
        60,
        what,
        interval=0.1,
    )


def test_a_waiting_interactive_shard_goes_before_waiting_bulk_shards(sqlite_setup, worker1):
    setup = sqlite_setup
    client = celery_client(setup.redis.url)
    busy_job, busy_ids = create_job(
        setup.store, setup.model, make_clips(setup.root / "q-busy", 40, seed=12)
    )
    bulk_job, bulk_ids = create_job(
        setup.store, setup.model, make_clips(setup.root / "q-bulk", 6, seed=13)
    )
    inter_job, inter_ids = create_job(
        setup.store, setup.model, make_clips(setup.root / "q-inter", 6, seed=14)
    )
    enqueue_shards(client, busy_job, busy_ids, shard=40)
    _wait_under_way(setup, busy_job, "the worker to be busy")
    enqueue_shards(client, bulk_job, bulk_ids, shard=2, queue=BULK_QUEUE)
    # three interactive shards: round-robin polling would interleave them with bulk ones
    enqueue_shards(client, inter_job, inter_ids, shard=2, queue=INTERACTIVE_QUEUE)
    assert job_state(setup.store, busy_job) != "done", "the busy shard ended too soon"
    for job_id in (busy_job, bulk_job, inter_job):
        _wait_job(setup, job_id, worker1, timeout=120)
    assert _finished_at(setup.store, inter_job)[-1] < _finished_at(setup.store, bulk_job)[0]


class _Evil:
    """Unpickling this creates a directory: proof that a pickle was deserialized."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickled_message_is_refused_and_the_worker_goes_on(sqlite_setup, worker1):
    from kombu import Connection, Exchange, Producer, Queue

    setup = sqlite_setup
    paths = make_clips(setup.root / "g", 2, seed=8)
    job_id, ids = create_job(setup.store, setup.model, paths)
    marker = setup.base / "pickle-was-loaded"
    client = celery_client(setup.redis.url)
    msg = client.amqp.as_task_v2(
        str(uuid.uuid4()),
        TRANSCRIBE_SHARD,
        args=(),
        kwargs={**shard_payload(job_id, ids), "x": _Evil(str(marker))},
    )
    queue = Queue(BULK_QUEUE, Exchange(BULK_QUEUE, type="direct"), routing_key=BULK_QUEUE)
    with Connection(setup.redis.url) as conn:
        Producer(conn).publish(
            msg.body,
            exchange=queue.exchange,
            routing_key=BULK_QUEUE,
            serializer="pickle",
            headers=msg.headers,
            declare=[queue],
            **msg.properties,
        )
    wait_for(
        lambda: "Refusing to deserialize" in worker1.log(),
        60,
        "the worker to refuse the pickled message",
        on_timeout=worker1.tail,
    )
    wait_for(lambda: setup.redis.queue_idle(BULK_QUEUE), 30, "the message to be dropped")
    assert not marker.exists()
    assert worker1.alive()
    assert setup.store.job_counts(job_id)["files"] == {"queued": 2}  # nothing ran

    result = client.send_task(TRANSCRIBE_SHARD, kwargs=shard_payload(job_id, ids), queue=BULK_QUEUE)
    assert result.get(timeout=60)["done"] == 2
    _assert_each_file_once(setup, job_id, paths)
    assert not marker.exists()


class _Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_progress_events_and_one_callback_when_the_job_is_done(sqlite_setup, worker1):
    setup = sqlite_setup
    hook = type("Hook", (_Hook,), {"received": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = celery_client(setup.redis.url)
    events: list[dict] = []
    heartbeats: list[dict] = []
    conn = client.connection_for_read()
    recv = client.events.Receiver(
        conn, handlers={"task-progress": events.append, "worker-heartbeat": heartbeats.append}
    )
    listener = threading.Thread(target=recv.capture, kwargs={"wakeup": False}, daemon=True)
    listener.start()
    try:
        # events go out on a fanout exchange: only receivers already bound get them
        wait_for(lambda: heartbeats, 30, "a worker heartbeat (the event receiver is bound)")
        paths = make_clips(setup.root / "h", 4, seed=9)
        job_id, ids = create_job(
            setup.store,
            setup.model,
            paths,
            callback_url=f"http://127.0.0.1:{server.server_port}/hook",
        )
        results = enqueue_shards(client, job_id, ids, shard=2)
        # a shard may take more of its job's files (``_Extension``): whoever ran them, each
        # shard that ran files reports them all, as its total, in its last progress event
        ran = {r.id: s["claimed"] for r in results if (s := r.get(timeout=60))["claimed"]}
        assert sum(ran.values()) == 4
        wait_for(lambda: hook.received, 30, "the job callback")
        again = client.send_task(
            TRANSCRIBE_SHARD, kwargs=shard_payload(job_id, ids), queue=BULK_QUEUE
        )
        assert again.get(timeout=60)["claimed"] == 0
        wait_for(
            lambda: all(
                any(e["uuid"] == tid and e.get("finished") == n == e["total"] for e in events)
                for tid, n in ran.items()
            ),
            15,
            "the last progress event of every shard that ran files",
        )
    finally:
        recv.should_stop = True
        server.shutdown()
        listener.join(5)
        conn.release()
    assert len(hook.received) == 1, hook.received
    (payload,) = hook.received
    assert payload["job_id"] == job_id and payload["state"] == "done"
    assert payload["files"] == {"done": 4} and payload["total"] == 4
    mine = [e for e in events if e.get("job_id") == job_id and e["uuid"] in ran]
    assert all(2 <= e["total"] <= 4 and e["finished"] <= e["total"] for e in mine)
    assert setup.store.job_counts(job_id)["files"] == {"done": 4}


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_torch_lives_in_the_pool_child_never_in_the_parent(sqlite_setup, worker1):
    """The parent forks the pool: it must never load torch (CUDA does not survive fork)."""
    children = worker1.pool_children()
    assert len(children) == 1  # --concurrency=1
    assert "libtorch" in _maps(children[0])  # the child has run shards
    assert "libtorch" not in _maps(worker1.proc.pid)


# -- the command line --------------------------------------------------------------------------


def _worker_cli(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ichigo_common.cli", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_worker_refuses_to_start_on_an_old_schema_or_without_roots(tmp_path, redis_db):
    env = worker_env(
        redis_url=redis_db.url, database_url=f"sqlite:///{tmp_path / 'new.db'}", roots=[tmp_path]
    )
    proc = _worker_cli(env)
    assert proc.returncode == 2
    assert "ichigo db upgrade" in proc.stderr
    env["ICHIGO_ALLOWED_ROOTS"] = ""
    proc = _worker_cli(env)
    assert proc.returncode == 2 and "ICHIGO_ALLOWED_ROOTS" in proc.stderr


def test_same_content_same_model_is_not_transcribed_again_unless_forced(sqlite_setup, worker1):
    setup = sqlite_setup
    client = celery_client(setup.redis.url)
    first = make_clips(setup.root / "dedupe1", 4, seed=31)
    job1, ids1 = create_job(setup.store, setup.model, first)
    enqueue_shards(client, job1, ids1, shard=4)
    _wait_job(setup, job1, worker1)
    # the same audio under other names, in a new job: reused, no new transcript rows
    again = setup.root / "dedupe2"
    again.mkdir()
    copies = []
    for p in first:
        target = again / f"copy_{p.name}"
        target.write_bytes(p.read_bytes())
        copies.append(target)
    job2, ids2 = create_job(setup.store, setup.model, copies)
    results = enqueue_shards(client, job2, ids2, shard=4)
    _wait_job(setup, job2, worker1)
    summary = results[0].get(timeout=30)
    assert summary["reused"] == 4 and summary["done"] == 0, summary
    with setup.store.session() as s:
        new_rows = s.scalar(
            select(func.count()).select_from(Transcript).where(Transcript.file_id.in_(ids2))
        )
        texts2 = dict(
            s.execute(select(File.path, File.transcript_id).where(File.id.in_(ids2))).all()
        )
        texts1 = set(s.scalars(select(File.transcript_id).where(File.id.in_(ids1))))
    assert new_rows == 0 and set(texts2.values()) == texts1
    assert all(p.with_suffix(".txt").exists() for p in copies)
    # forced: transcribed afresh
    job3, ids3 = create_job(setup.store, setup.model, copies[:2], options={"force": True})
    forced = enqueue_shards(client, job3, ids3, shard=2)
    _wait_job(setup, job3, worker1)
    assert forced[0].get(timeout=30)["done"] == 2


def test_a_shard_that_runs_out_of_files_takes_more_of_its_job(sqlite_setup, worker1):
    """One message for the first 4 of 40 files: the shard goes on with the job's other
    queued files (newest first) in the same stream, so the job ends with no other message."""
    setup = sqlite_setup
    paths = make_clips(setup.root / "extend", 40, seed=51)
    job_id, ids = create_job(setup.store, setup.model, paths)
    (result,) = enqueue_shards(celery_client(setup.redis.url), job_id, ids[:4], shard=4)
    summary = result.get(timeout=JOB_TIMEOUT_S)
    assert summary["claimed"] == 40 and summary["done"] == 40, summary
    _wait_job(setup, job_id, worker1)
    _assert_each_file_once(setup, job_id, paths)
    assert summary["job_done"] is True


def test_a_shard_stops_taking_more_while_an_interactive_shard_waits(sqlite_setup, worker1):
    setup = sqlite_setup
    client = celery_client(setup.redis.url)
    big, big_ids = create_job(
        setup.store, setup.model, make_clips(setup.root / "ext-big", 200, seed=52)
    )
    inter, inter_ids = create_job(
        setup.store, setup.model, make_clips(setup.root / "ext-inter", 2, seed=53)
    )
    (first,) = enqueue_shards(client, big, big_ids[:4], shard=4)
    _wait_under_way(setup, big, "the big job to be under way")
    enqueue_shards(client, inter, inter_ids, shard=2, queue=INTERACTIVE_QUEUE)
    _wait_job(setup, inter, worker1, timeout=120)
    summary = first.get(timeout=60)
    # it stopped claiming once the interactive shard waited: the rest of the big job is
    # still queued for its own shards
    counts = setup.store.job_counts(big)["files"]
    assert 4 <= summary["claimed"] < 200 and counts.get("queued", 0) == 200 - summary["claimed"]
    assert "running" not in counts, counts
    enqueue_shards(client, big, big_ids[4:], shard=50)
    _wait_job(setup, big, worker1)
    assert setup.store.job_counts(big)["files"] == {"done": 200}


def test_a_cancelled_job_runs_nothing_more(sqlite_setup, worker1):
    setup = sqlite_setup
    paths = make_clips(setup.root / "cancel", 6, seed=41)
    job_id, ids = create_job(setup.store, setup.model, paths)
    assert setup.store.cancel_job(job_id) == 6
    results = enqueue_shards(celery_client(setup.redis.url), job_id, ids, shard=3)
    summaries = [r.get(timeout=60) for r in results]
    assert sum(s["claimed"] for s in summaries) == 0
    assert setup.store.job_counts(job_id)["files"] == {"cancelled": 6}
    assert not any(p.with_suffix(".txt").exists() for p in paths)
