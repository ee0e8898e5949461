"""The SQL store on SQLite and on the real PostgreSQL: migrations, leases, idempotent results."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from ichigo_common.store.migrate import is_at_head, upgrade
from ichigo_common.store.models import File, Transcript, utcnow
from ichigo_common.store.repo import Store, TranscriptData

from .queue_helpers import postgres_database


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
        upgrade(url)
        yield Store(url)
        return
    with postgres_database("ichigo_store") as url:
        yield Store(url)


def _data(text="hello", digest="ab" * 32) -> TranscriptData:
    return TranscriptData(
        model="m",
        content_hash=digest,
        text=text,
        tokens=None,
        chunks=[],
        duration_s=1.5,
        processing_s=0.1,
        provenance={"preset": "m"},
    )


def _job_with_files(store: Store, n: int) -> tuple[str, list[int]]:
    job = store.create_job(source="api", model="m")
    ids = [
        fid
        for batch in store.add_files(job, ({"path": f"/a/{i}.wav"} for i in range(n)), batch=7)
        for fid, _ in batch
    ]
    return job, ids


def test_migrated_to_head(store):
    assert is_at_head(store.url)


def test_claims_are_exclusive_under_concurrency(store):
    job, ids = _job_with_files(store, 60)
    got: dict[str, list[int]] = {}

    def worker(name):
        claimed, _ = store.claim(ids, name, 300, 3)
        got[name] = [c.id for c in claimed]

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [i for v in got.values() for i in v]
    assert sorted(everything) == sorted(ids), "every file claimed exactly once"
    # a live lease is respected; an expired one is taken over, counting the attempt
    assert store.claim(ids[:5], "late", 300, 3)[0] == []
    with store.session() as s:
        s.execute(
            update(File)
            .where(File.id.in_(ids[:5]))
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    retaken, _ = store.claim(ids[:5], "late", 300, 3)
    assert [c.attempts for c in retaken] == [2] * 5


def test_poison_file_fails_after_max_attempts(store):
    _, ids = _job_with_files(store, 1)
    for _ in range(3):
        claimed, exhausted = store.claim(ids, "w", 300, 3)
        assert claimed and not exhausted
        with store.session() as s:  # the worker died: its lease runs out
            s.execute(update(File).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    claimed, exhausted = store.claim(ids, "w", 300, 3)
    assert not claimed and [e.id for e in exhausted] == ids
    with store.session() as s:
        f = s.get(File, ids[0])
        assert f.state == "failed" and "gave up after 3 attempts" in f.error


def test_results_are_idempotent_and_dedupe_finds_them(store):
    job, ids = _job_with_files(store, 2)
    store.claim(ids, "w", 300, 3)
    t1 = store.record_result(ids[0], _data())
    t2 = store.record_result(ids[0], _data(text="second copy"))  # a redelivered unit
    assert t1 == t2
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Transcript)) == 1
        assert s.get(Transcript, t1).text == "hello"
    found = store.find_transcript("ab" * 32, "m")
    assert found is not None and found.id == t1
    assert store.find_transcript("ab" * 32, "other-model") is None
    store.record_reuse(ids[1], found)
    counts = store.job_counts(job)
    assert counts["files"] == {"done": 2} and counts["audio_s_done"] == pytest.approx(3.0)
    assert store.finish_job_if_complete(job) is True
    assert store.finish_job_if_complete(job) is False  # only once


def test_cancel_and_callback_once(store):
    job = store.create_job(source="api", model="m", callback_url="http://127.0.0.1:9/cb")
    ids = [
        fid for b in store.add_files(job, ({"path": f"/x/{i}"} for i in range(5))) for fid, _ in b
    ]
    store.claim(ids[:2], "w", 300, 3)
    assert store.cancel_job(job) == 3
    assert store.job_counts(job)["files"] == {"running": 2, "cancelled": 3}
    assert store.get_job(job).state == "cancelled"
    assert store.take_callback(job) == "http://127.0.0.1:9/cb"
    assert store.take_callback(job) is None


def test_sqlite_is_safe_under_several_processes(tmp_path):
    """Four processes claiming and writing at once on one SQLite file: no 'database is locked',
    every file done exactly once."""
    url = f"sqlite:///{tmp_path / 'multi.db'}"
    upgrade(url)
    store = Store(url)
    job, ids = _job_with_files(store, 80)
    script = (
        "import sys\n"
        "from ichigo_common.store.repo import Store, TranscriptData\n"
        "s = Store(sys.argv[1]); ids = [int(x) for x in sys.argv[2].split(',')]\n"
        "for i in range(0, len(ids), 5):\n"
        "    claimed, _ = s.claim(ids[i:i+5], sys.argv[3], 300, 3)\n"
        "    for c in claimed:\n"
        "        data = TranscriptData('m', f'{c.id:064d}', 't', None, [], 1.0, 0.1, {})\n"
        "        s.record_result(c.id, data)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, url, ",".join(map(str, ids)), f"p{i}"],
            env=dict(os.environ),
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Transcript)) == 80
        assert s.scalar(select(func.count(func.distinct(Transcript.file_id)))) == 80
    assert store.job_counts(job)["files"] == {"done": 80}
