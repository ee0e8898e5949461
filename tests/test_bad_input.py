"""Bad input through the real service: one folder holding dozens of broken, odd and hostile
files next to good ones, submitted as one job and run by a real `ichigo worker` (real Redis,
real SQLite). Every bad file ends with a clear stored reason (or a correct result), the
worker stays up, and every good file finishes."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from ichigo_common.settings import Settings
from ichigo_common.store.migrate import upgrade
from ichigo_common.store.models import File, Transcript
from ichigo_common.store.repo import Store
from producer.enqueue import submit_job
from producer.queue import make_celery

from .conftest import speech_like, write_wav
from .queue_helpers import (  # noqa: F401 - redis_db, queue_model are fixtures
    WorkerProcess,
    queue_model,
    redis_db,
    running_workers,
    sqlite_store_url,
    wait_for,
    worker_env,
)

pytestmark = [pytest.mark.queue, pytest.mark.slow]

SR = 16000


def _pcm_wav(path: Path, data: np.ndarray, rate: int, channels: int = 1, width: int = 2) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data.tobytes())
    return path


def _float_wav(path: Path, samples: np.ndarray, rate: int = SR) -> Path:
    import soundfile as sf

    sf.write(str(path), samples.astype(np.float32), rate, subtype="FLOAT")
    return path


def _encoded(path: Path, fmt: str, source: Path) -> Path:
    import soundfile as sf

    data, rate = sf.read(str(source), dtype="float32")
    sf.write(str(path), data, rate, format=fmt)
    return path


def _speech(seconds: float, seed: int) -> np.ndarray:
    return speech_like(seconds, seed=seed)


def build_cases(folder: Path) -> tuple[dict[str, str], list[Path]]:
    """Writes the cases into ``folder``; returns ({name: expected outcome}, good files).

    Outcomes: ``"failed:<words in the reason>"``, ``"done"`` (a transcript, maybe empty) or
    ``"skipped"`` (expansion leaves it out: not audio or not a regular file)."""
    folder.mkdir()
    good = [write_wav(folder / f"good{i}.wav", _speech(1.5 + i * 0.3, seed=100 + i))
            for i in range(6)]
    ref = good[0]
    wav_bytes = ref.read_bytes()
    rng = np.random.default_rng(7)
    cases: dict[str, str] = {}

    def put(name: str, data: bytes, outcome: str) -> None:
        (folder / name).write_bytes(data)
        cases[name] = outcome

    put("zero.wav", b"", "failed:empty")
    put("zero.mp3", b"", "failed:empty")
    put("zero.flac", b"", "failed:empty")
    put("header-only.wav", wav_bytes[:44], "failed:")
    put("truncated-header.wav", wav_bytes[:20], "failed:")
    put("truncated-data.wav", wav_bytes[: len(wav_bytes) // 2], "done")
    for suffix in (".wav", ".mp3", ".flac", ".ogg", ".m4a", ".opus"):
        put(f"random{suffix}", rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes(),
            "failed:")
    put("text-as.wav", b"this is not audio\n" * 200, "failed:")
    put("riff-garbage.wav", b"RIFF\xff\xff\xff\xffWAVEfmt " + os.urandom(2000), "failed:")
    # a header that promises 4 GB of samples over a 10 kB file
    lie = bytearray(wav_bytes[:10_044])
    lie[40:44] = (0xFFFFFF00).to_bytes(4, "little")
    put("header-lies.wav", bytes(lie), "done")
    (folder / "dir.wav").mkdir()
    cases["dir.wav"] = "skipped"
    os.symlink(folder / "missing-target.wav", folder / "broken-link.wav")
    cases["broken-link.wav"] = "skipped"
    os.symlink(folder / "loop-b.wav", folder / "loop-a.wav")
    os.symlink(folder / "loop-a.wav", folder / "loop-b.wav")
    cases["loop-a.wav"] = cases["loop-b.wav"] = "failed:symlink loop"
    os.mkfifo(folder / "fifo.wav")
    cases["fifo.wav"] = "skipped"
    _pcm_wav(folder / "silence-1h.wav", np.zeros(3600 * 8000, np.int16), 8000)
    cases["silence-1h.wav"] = "done"
    write_wav(folder / "short-0.05s.wav", _speech(0.05, seed=3))
    cases["short-0.05s.wav"] = "done"
    _pcm_wav(folder / "zero-frames.wav", np.zeros(0, np.int16), SR)
    cases["zero-frames.wav"] = "failed:"
    _pcm_wav(folder / "rate-192k.wav",
             (np.repeat(_speech(1.0, seed=4), 12) * 20000).astype(np.int16), 192_000)
    cases["rate-192k.wav"] = "done"
    eight = np.repeat((_speech(1.0, seed=5) * 20000).astype(np.int16)[:, None], 8, axis=1)
    _pcm_wav(folder / "channels-8.wav", eight, SR, channels=8)
    cases["channels-8.wav"] = "done"
    square = np.sign(np.sin(np.arange(SR * 2) * 2 * math.pi * 220 / SR)) * 32767
    _pcm_wav(folder / "clipped.wav", square.astype(np.int16), SR)
    cases["clipped.wav"] = "done"
    _pcm_wav(folder / "u8.wav", (_speech(1.0, seed=6) * 100 + 128).astype(np.uint8), SR,
             width=1)
    cases["u8.wav"] = "done"
    nan = _speech(1.0, seed=8)
    nan[100:200] = np.nan
    _float_wav(folder / "nan-float.wav", nan)
    cases["nan-float.wav"] = "failed:NaN or infinite"
    inf = _speech(1.0, seed=9)
    inf[5] = np.inf
    _float_wav(folder / "inf-float.wav", inf)
    cases["inf-float.wav"] = "failed:NaN or infinite"
    with open(folder / "sparse-4g.wav", "wb") as fh:  # 4 GB, almost none of it on disk
        fh.truncate(4 * 1024**3)
    cases["sparse-4g.wav"] = "failed:"
    _encoded(folder / "flac-named.wav", "FLAC", good[1])  # right audio, wrong suffix
    cases["flac-named.wav"] = "done"
    for name in ("name with spaces.wav", "new\nline.wav", "tiếng việt.wav", "quote'\"$(x).wav"):
        shutil.copy(good[2], folder / name)
        cases[name] = "done"
    bad_name = os.fsencode(folder) + b"/latin1-\xe9t\xe9.wav"
    with open(bad_name, "wb") as fh:
        fh.write(good[3].read_bytes())
    cases["latin1-\\xe9t\\xe9.wav"] = "failed:not valid UTF-8"
    outside = folder.parent / "outside"
    outside.mkdir()
    shutil.copy(good[4], outside / "secret.wav")
    os.symlink(outside / "secret.wav", folder / "link-outside.wav")
    cases["link-outside.wav"] = "failed:outside the allowed roots"
    _encoded(folder / "vorbis.ogg", "OGG", good[4])
    cases["vorbis.ogg"] = "done"
    shutil.copy(good[4], folder / "no-permission.wav")
    os.chmod(folder / "no-permission.wav", 0)
    # root reads it anyway (CAP_DAC_OVERRIDE): then it is simply transcribed
    cases["no-permission.wav"] = "done" if os.geteuid() == 0 else "failed:Permission denied"
    shutil.copy(good[4], folder / ".hidden.wav")
    cases[".hidden.wav"] = "skipped"
    shutil.copy(good[5], folder / "deleted.wav")
    cases["deleted.wav"] = "failed:No such file"
    shutil.copy(good[5], folder / "became-fifo.wav")
    cases["became-fifo.wav"] = "failed:not a regular file"
    return cases, good


def test_a_folder_of_bad_input_fails_file_by_file(tmp_path, redis_db, queue_model):  # noqa: F811
    redis_db.flush()
    url = sqlite_store_url(tmp_path)
    upgrade(url)
    store = Store(url)
    folder = tmp_path / "bad"
    cases, good = build_cases(folder)
    settings = dataclasses.replace(
        Settings.from_env(), database_url=url, broker_url=redis_db.url,
        result_backend=redis_db.url, allowed_roots=(folder.resolve(),
                                                    queue_model.parent.resolve()),
        shard_files=8, api_key=None)
    job_id = submit_job(store, make_celery(settings), settings, paths=[str(folder)],
                        model=str(queue_model))
    (folder / "deleted.wav").unlink()  # gone between enqueue and processing
    (folder / "became-fifo.wav").unlink()  # replaced by a pipe nobody writes to
    os.mkfifo(folder / "became-fifo.wav")
    env = worker_env(redis_url=redis_db.url, database_url=url,
                     roots=[folder, queue_model.parent])
    worker = WorkerProcess("badinput", env, tmp_path / "worker.log")
    with running_workers(worker):
        wait_for(lambda: store.get_job(job_id).state == "done", 600, "the job to finish",
                 on_timeout=worker.tail)
        assert worker.alive()
    with store.session() as s:
        rows = s.execute(select(File.path, File.state, File.error, Transcript.text)
                         .outerjoin(Transcript, Transcript.id == File.transcript_id)
                         .where(File.job_id == job_id)).all()
    by_name = {Path(r.path).name: r for r in rows}
    wrong = []
    for name, expect in cases.items():
        row = by_name.get(name)
        got = "skipped" if row is None else row.state
        line = f"{name!r}: expected {expect}, got {got} ({row.error if row is not None else ''})"
        if expect == "skipped":
            ok = row is None
        elif expect == "done":
            ok = row is not None and row.state == "done" and row.text is not None
        else:
            words = expect.split(":", 1)[1]
            ok = row is not None and row.state == "failed" and bool(row.error) and (
                words in row.error)
        if not ok:
            wrong.append(line)
    assert not wrong, "\n".join(wrong)
    for path in good:
        assert by_name[path.name].state == "done"
        assert path.with_suffix(".txt").exists()
    assert len(cases) >= 40
    assert len(rows) == len([o for o in cases.values() if o != "skipped"]) + len(good)
    # nothing half-written remains beside the audio
    assert not [p for p in folder.iterdir() if p.name.startswith(".") and p.suffix == ".tmp"]
