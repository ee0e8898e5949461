"""Work left by a worker whose main process died: its shard's message is gone for hours
(Redis gives an unacked message back only after the visibility timeout), its files stay
leased. The sweeper in every worker's main process re-sends them. Real Redis, real SQLite,
real `ichigo worker` processes killed with SIGKILL."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import signal
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from ichigo_common.settings import Settings
from ichigo_common.store.migrate import upgrade
from ichigo_common.store.models import File, Job, Transcript, utcnow
from ichigo_common.store.repo import Store
from ichigo_common.tasks import INTERACTIVE_QUEUE, TRANSCRIBE_SHARD, shard_payload
from worker.sweeper import STALL_SWEEPS, sweep

from .queue_helpers import (  # noqa: F401 - redis_db, queue_model are fixtures
    WorkerProcess,
    celery_client,
    create_job,
    enqueue_shards,
    make_clips,
    queue_model,
    redis_db,
    running_workers,
    sqlite_store_url,
    wait_for,
    worker_env,
)

pytestmark = [pytest.mark.queue]


def _queued_shards(redis_db) -> list[list[int]]:  # noqa: F811 - the fixture's value
    """file_ids of every shard message waiting in the bulk queue (all priority lists)."""
    r = redis_db.client()
    found = []
    for key in r.keys("bulk*"):
        for raw in r.lrange(key, 0, -1):
            msg = json.loads(raw)
            body = msg["body"]
            if msg["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            _args, kwargs, _embed = json.loads(body)
            found.append(kwargs["file_ids"])
    return found


def test_sweep_resends_expired_leases_once_and_closes_finished_jobs(
        tmp_path, redis_db, queue_model):  # noqa: F811 - fixtures
    redis_db.flush()
    url = sqlite_store_url(tmp_path)
    upgrade(url)
    store = Store(url)
    settings = dataclasses.replace(Settings.from_env(), database_url=url,
                                   broker_url=redis_db.url, shard_files=3)
    job_id, ids = create_job(store, queue_model, [tmp_path / f"f{i}.wav" for i in range(7)])
    # a dead worker holds 5 files with leases that have ended, a live one holds 2
    dead, _ = store.claim(ids[:5], "dead@host:1:t", lease_seconds=-1, max_attempts=3)
    live, _ = store.claim(ids[5:], "live@host:2:t", lease_seconds=300, max_attempts=3)
    assert len(dead) == 5 and len(live) == 2
    client = celery_client(redis_db.url)

    report = sweep(store, client, settings)
    assert (report.files, report.shards) == (5, 2)
    assert sorted(sum(_queued_shards(redis_db), [])) == ids[:5]
    with store.session() as s:
        states = dict(s.execute(select(File.id, File.state).where(File.job_id == job_id)).all())
        attempts = dict(s.execute(select(File.id, File.attempts)).all())
    assert [states[i] for i in ids] == ["queued"] * 5 + ["running"] * 2
    assert all(attempts[i] == 1 for i in ids)  # attempts are kept: poison files still end
    # a second pass (or another worker's sweeper) finds nothing more to send
    assert sweep(store, client, settings).files == 0
    assert len(_queued_shards(redis_db)) == 2

    # a job whose files all ended, left "running" by a worker that died before closing it
    job2, ids2 = create_job(store, queue_model, [tmp_path / "g.wav"])
    store.claim(ids2, "gone@host:3:t", lease_seconds=300, max_attempts=3)
    store.record_failure(ids2[0], "some reason")
    assert store.get_job(job2).state == "running"
    assert sweep(store, client, settings).jobs_closed == 1
    assert store.get_job(job2).state == "done"
    redis_db.flush()


@pytest.mark.slow
def test_job_completes_after_the_worker_main_process_is_killed(
        tmp_path, redis_db, queue_model):  # noqa: F811 - fixtures
    """A 300-file job, SIGKILL three times in the middle of batches: the pool child alone
    once (Celery re-queues its shard), then twice the whole worker, main process and pool at
    once (its shard's message is gone for hours: the sweeper re-sends the files). A fresh
    worker finishes the job; each file has one transcript row and one complete .txt."""
    redis_db.flush()
    url = sqlite_store_url(tmp_path)
    upgrade(url)
    store = Store(url)
    corpus = tmp_path / "corpus"
    clips = make_clips(corpus, 300, seed=5, min_s=1.0, max_s=3.0)
    env = worker_env(redis_url=redis_db.url, database_url=url, roots=[tmp_path, queue_model.parent],
                     ICHIGO_LEASE_SECONDS="3", ICHIGO_SWEEP_SECONDS="1")
    job_id, ids = create_job(store, queue_model, clips)
    enqueue_shards(celery_client(redis_db.url), job_id, ids, shard=25)

    def done_count() -> int:
        with store.session() as s:
            return s.scalar(select(func.count()).select_from(File)
                            .where(File.job_id == job_id, File.state == "done"))

    kills = []
    for round_, target in enumerate(("pool child", "whole worker", "whole worker")):
        victim = WorkerProcess(f"victim{round_}", env, tmp_path / f"victim{round_}.log")
        victim.start()
        victim.wait_ready()
        before = done_count()
        wait_for(lambda b=before: done_count() >= b + 5, 120, "some files to finish",
                 interval=0.05, on_timeout=victim.tail)
        if target == "pool child":
            for child in victim.pool_children():
                os.kill(child, signal.SIGKILL)
            after_child = done_count()
            wait_for(lambda b=after_child: done_count() >= b + 5, 120,
                     "work to go on after the child died", on_timeout=victim.tail)
        os.killpg(victim.proc.pid, signal.SIGKILL)  # main process and pool child at once
        victim.proc.wait(10)
        kills.append((target, done_count()))
    assert done_count() < len(ids), kills  # the kills left work behind
    rescuer = WorkerProcess("rescuer", env, tmp_path / "rescuer.log")
    with running_workers(rescuer):
        wait_for(lambda: store.get_job(job_id).state == "done", 300,
                 "the job to finish after the kills", on_timeout=rescuer.tail)
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*.log"))
    assert "left by dead workers re-sent" in logs
    with store.session() as s:
        per_file = dict(s.execute(select(Transcript.file_id, func.count())
                                  .group_by(Transcript.file_id)).all())
        texts = dict(s.execute(select(File.path, Transcript.text)
                               .join(Transcript, Transcript.file_id == File.id)).all())
        states = s.execute(select(File.state, func.count()).where(File.job_id == job_id)
                           .group_by(File.state)).all()
    assert dict(states) == {"done": len(ids)}, (kills, dict(states))
    assert sorted(per_file) == sorted(ids) and set(per_file.values()) == {1}  # no duplicates
    for clip in clips:  # complete: exactly the stored text, written atomically
        assert clip.with_suffix(".txt").read_text() == texts[str(clip)] + "\n"
    assert not [p for p in corpus.iterdir() if p.name.startswith(".")]  # no temp files left
    print(f"\nkills (what, files done at the kill): {kills}; 300 files, 0 lost, 0 duplicated")
    redis_db.flush()


def _age(store: Store, job_id: str, seconds: float) -> None:
    """Make the job and everything that happened in it ``seconds`` older (in Python: SQLite
    has no date arithmetic on these columns)."""
    shift = timedelta(seconds=seconds)

    def older(row, *names):
        return {n: getattr(row, n) - shift for n in names if getattr(row, n) is not None}

    with store.session() as s:
        job = s.get(Job, job_id)
        for name, value in older(job, "created_at", "started_at").items():
            setattr(job, name, value)
        for f in s.scalars(select(File).where(File.job_id == job_id)):
            for name, value in older(f, "started_at", "finished_at").items():
                setattr(f, name, value)


def test_sweep_resends_queued_files_whose_messages_the_broker_lost(
        tmp_path, redis_db, queue_model):  # noqa: F811 - fixtures
    """A Redis restarted without persistence forgets every waiting shard: with empty queues,
    the queued files of a job idle for STALL_SWEEPS sweep intervals are sent again, once."""
    redis_db.flush()
    url = sqlite_store_url(tmp_path)
    store = Store(url)
    settings = dataclasses.replace(Settings.from_env(), database_url=url,
                                   broker_url=redis_db.url, shard_files=3, sweep_seconds=10)
    client = celery_client(redis_db.url)
    idle = STALL_SWEEPS * settings.sweep_seconds
    job_id, ids = create_job(store, queue_model, [tmp_path / f"f{i}.wav" for i in range(8)])
    store.claim(ids[:1], "w@host:1:t", lease_seconds=300, max_attempts=3)
    store.record_failure(ids[0], "done with, long ago")
    _age(store, job_id, idle + 5)
    # left alone: a job still expanding (its producer sends its shards), a job just created
    expanding, _ = create_job(store, queue_model, [tmp_path / "e.wav"], state="expanding")
    _age(store, expanding, idle + 5)
    create_job(store, queue_model, [tmp_path / "n.wav"])

    report = sweep(store, client, settings)
    assert (report.orphans, report.orphan_shards, report.files) == (7, 3, 0)
    assert sorted(sum(_queued_shards(redis_db), [])) == ids[1:]
    # the shards wait in the queue now: no pass sends them again
    assert sweep(store, client, settings).orphans == 0
    # lost once more (another restart): sent once more
    redis_db.flush()
    assert sweep(store, client, settings).orphans == 7
    redis_db.flush()

    # a job with something going on is not idle: a file finished just now...
    with store.session() as s:
        s.execute(update(File).where(File.id == ids[0]).values(finished_at=utcnow()))
    assert sweep(store, client, settings).orphans == 0
    _age(store, job_id, idle + 5)
    # ... or a file leased by a live worker (it may hold the job's next shard already)
    store.claim(ids[1:2], "w@host:2:t", lease_seconds=300, max_attempts=3)
    _age(store, job_id, idle + 5)
    assert sweep(store, client, settings).orphans == 0
    store.release(ids[1:2], "w@host:2:t")
    # any message waiting in any queue: the workers have not caught up, nothing is lost yet
    client.send_task(TRANSCRIBE_SHARD, kwargs=shard_payload(job_id, ids[1:2]),
                     queue=INTERACTIVE_QUEUE)
    assert sweep(store, client, settings).orphans == 0
    redis_db.flush()
    assert sweep(store, client, settings).orphans == 7
    redis_db.flush()


def test_files_re_sent_for_a_dead_worker_are_not_sent_twice_in_one_pass(
        tmp_path, redis_db, queue_model):  # noqa: F811 - fixtures
    """An idle worker takes a re-sent shard at once, before it claims the files: the empty
    queue must not make the same pass send them again as lost."""
    redis_db.flush()
    url = sqlite_store_url(tmp_path)
    store = Store(url)
    settings = dataclasses.replace(Settings.from_env(), database_url=url,
                                   broker_url=redis_db.url, shard_files=3, sweep_seconds=10)
    job_id, ids = create_job(store, queue_model, [tmp_path / f"f{i}.wav" for i in range(2)])
    store.claim(ids, "dead@host:1:t", lease_seconds=-1, max_attempts=3)
    _age(store, job_id, 3600)

    class Vanishing(type(celery_client(redis_db.url))):
        """A client whose messages a worker takes at once: the queues look empty."""

        def send_task(self, *args, **kwargs):
            sent.append(kwargs["kwargs"]["file_ids"])

    sent: list = []
    client = Vanishing("vanishing", broker=redis_db.url, set_as_current=False)
    report = sweep(store, client, settings)
    assert (report.files, report.orphans) == (2, 0) and sent == [ids]
    redis_db.flush()
