"""``process_claims`` as one stream: files claimed while a unit runs (``more_claims``) join
the same pipeline run, and dedupe by content still holds across them. Real SQLite store,
real files, the tiny random model."""

from __future__ import annotations

import itertools
from pathlib import Path

from sqlalchemy import func, select

from ichigo_common.store.models import File, Transcript
from ichigo_common.store.repo import Store
from worker.runner import process_claims

from .conftest import speech_like, write_wav
from .queue_helpers import sqlite_store_url

OWNER = "test@host:1:stream"


def _store(tmp_path: Path) -> Store:
    return Store(sqlite_store_url(tmp_path))


def test_claims_taken_mid_run_join_the_stream_and_share_transcripts(tiny_en_model, tmp_path):
    store = _store(tmp_path)
    audio = tmp_path / "audio"
    audio.mkdir()
    paths = [write_wav(audio / f"f{i}.wav", speech_like(1.0 + 0.1 * i, seed=i)) for i in range(6)]
    # the same content as f0 (arrives in the first extension, while f0 may still run) and
    # as f1 (arrives in the last one); an unreadable file in the middle
    paths.append(write_wav(audio / "copy_of_f0.wav", speech_like(1.0, seed=0)))
    paths.append(write_wav(audio / "copy_of_f1.wav", speech_like(1.1, seed=1)))
    (audio / "broken.wav").write_bytes(b"RIFF....WAVE")
    paths.append(audio / "broken.wav")

    job_id = store.create_job(source="cli", model="tiny")
    ids = [fid for batch in store.add_files(job_id, ({"path": str(p)} for p in paths))
           for fid, _ in batch]
    first, _ = store.claim(ids[:3], OWNER, 300, 3)
    units = [[ids[3], ids[6]], [ids[4], ids[8]], [ids[5], ids[7]]]
    finished: list[str] = []
    handed = [3]
    asked: list[tuple[int, int]] = []  # (files handed in, files finished) at each call

    def more():
        asked.append((handed[0], len(finished)))
        if not units:
            return []
        claimed, _ = store.claim(units.pop(0), OWNER, 300, 3)
        handed[0] += len(claimed)
        return claimed

    report = process_claims(
        store, tiny_en_model, "tiny", first, roots=None, batch_size=2,
        on_result=lambda path, outcome: finished.append(path), more_claims=more,
    )

    assert (report.done, report.reused, report.failed) == (6, 2, 1)
    assert len(finished) == 9
    # more work was asked for while files were still in flight each time (one stream: the
    # pipeline never ran dry between units), and lazily: only once fewer than two batches
    # (4 files) were in flight, so some had finished before the later units came in
    assert len(asked) == 4, asked
    assert all(done < handed_in for handed_in, done in asked[:3]), asked
    assert asked[0] == (3, 0) and asked[-1][1] > 0, asked
    counts = store.job_counts(job_id)["files"]
    assert counts == {"done": 8, "failed": 1}, counts
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Transcript)) == 6
        rows = dict(s.execute(select(File.path, File.transcript_id)).all())
        error = s.scalar(select(File.error).where(File.path == str(audio / "broken.wav")))
    assert rows[str(paths[6])] == rows[str(paths[0])]
    assert rows[str(paths[7])] == rows[str(paths[1])]
    assert "could not decode" in error
    assert all(p.with_suffix(".txt").is_file() for p in paths[:8])
    assert not (audio / "broken.txt").exists()
    assert paths[6].with_suffix(".txt").read_text() == paths[0].with_suffix(".txt").read_text()


def test_without_more_claims_only_the_given_files_run(tiny_en_model, tmp_path):
    store = _store(tmp_path)
    audio = tmp_path / "audio"
    audio.mkdir()
    paths = [write_wav(audio / f"g{i}.wav", speech_like(1.0, seed=10 + i)) for i in range(4)]
    job_id = store.create_job(source="cli", model="tiny")
    ids = [fid for batch in store.add_files(job_id, ({"path": str(p)} for p in paths))
           for fid, _ in batch]
    claims, _ = store.claim(ids[:2], OWNER, 300, 3)
    report = process_claims(store, tiny_en_model, "tiny", claims, roots=None, batch_size=4)
    assert report.done == 2
    assert store.job_counts(job_id)["files"] == {"done": 2, "queued": 2}


def test_a_source_saying_nothing_yet_with_nothing_in_flight_is_an_error(tiny_en_model):
    from ichigo_pipeline.pipeline import BatchPipeline

    pipeline = BatchPipeline(tiny_en_model, batch_size=2)
    try:
        list(pipeline.run(itertools.repeat(None)))
    except RuntimeError as exc:
        assert "nothing yet" in str(exc)
    else:
        raise AssertionError("a None with no file in flight must not spin or end silently")
