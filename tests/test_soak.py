"""Soak: 5,000 short files through two real workers (real Redis, SQLite). The store ends with
exactly 5,000 transcripts, and each worker's pool process grows by less than 10% in resident
memory from the moment the 500th file is done to the last file."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from ichigo_common.store.migrate import upgrade
from ichigo_common.store.models import File, Transcript
from ichigo_common.store.repo import Store

from .queue_helpers import (  # noqa: F401 - fixtures
    WorkerProcess,
    celery_client,
    create_job,
    enqueue_shards,
    queue_model,
    redis_db,
    running_workers,
    sqlite_store_url,
    wait_for,
    worker_env,
)

pytestmark = [pytest.mark.queue, pytest.mark.slow, pytest.mark.soak]

FILES = int(os.environ.get("ICHIGO_SOAK_FILES", "5000"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def _distinct_clips(folder: Path, n: int) -> list[Path]:
    """``n`` short clips with distinct content (a short clip can fall in a pause of
    speech_like and be pure silence: the first samples carry the clip's number)."""
    import numpy as np

    from .conftest import speech_like, write_wav

    folder.mkdir()
    rng = np.random.default_rng(77)
    paths = []
    for i in range(n):
        data = speech_like(float(rng.uniform(0.3, 0.8)), seed=770_000 + i)
        data[:2] = [(i % 20_000 + 1) / 32768, (i // 20_000 + 1) / 32768]
        paths.append(write_wav(folder / f"soak{i:05d}.wav", data))
    return paths


def test_soak_thousands_of_files_two_workers(tmp_path, redis_db, queue_model):  # noqa: F811
    redis_db.flush()
    url = sqlite_store_url(tmp_path)
    upgrade(url)
    store = Store(url)
    started = time.perf_counter()
    clips = _distinct_clips(tmp_path / "corpus", FILES)
    made_s = time.perf_counter() - started
    env = worker_env(redis_url=redis_db.url, database_url=url,
                     roots=[tmp_path, queue_model.parent])
    job_id, ids = create_job(store, queue_model, clips)
    workers = [WorkerProcess(f"soak{i}", env, tmp_path / f"soak{i}.log") for i in range(2)]

    def done() -> int:
        with store.session(readonly=True) as s:
            return s.scalar(select(func.count()).select_from(File)
                            .where(File.job_id == job_id, File.state == "done"))

    with running_workers(*workers):
        run_start = time.perf_counter()
        enqueue_shards(celery_client(redis_db.url), job_id, ids, shard=32)
        wait_for(lambda: done() >= 500, 900, "500 files done", interval=0.5,
                 on_timeout=workers[0].tail)
        children = {w.name: w.pool_children() for w in workers}
        assert all(len(c) == 1 for c in children.values()), children
        at_500 = {name: _rss_kib(pids[0]) for name, pids in children.items()}
        wait_for(lambda: store.get_job(job_id).state == "done", 1800, "the soak job",
                 interval=1.0, on_timeout=workers[0].tail)
        run_s = time.perf_counter() - run_start
        # the same pool processes served the whole job (none replaced, none died)
        assert {w.name: w.pool_children() for w in workers} == children
        at_end = {name: _rss_kib(pids[0]) for name, pids in children.items()}
    with store.session() as s:
        transcripts = s.scalar(select(func.count()).select_from(Transcript))
        per_file = s.scalar(select(func.count(func.distinct(Transcript.file_id))))
        states = dict(s.execute(select(File.state, func.count()).group_by(File.state)).all())
    growth = {n: (at_end[n] - at_500[n]) / at_500[n] for n in at_500}
    print(f"\nsoak: {FILES} files ({made_s:.0f} s to write) in {run_s:.0f} s on 2 workers "
          f"({FILES / run_s:.1f} files/s); RSS at 500th file {at_500} KiB, at the end {at_end} "
          f"KiB, growth {({n: f'{g:+.1%}' for n, g in growth.items()})}")
    assert states == {"done": FILES}
    assert transcripts == per_file == FILES
    assert all(g < 0.10 for g in growth.values()), growth
    redis_db.flush()
