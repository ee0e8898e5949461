"""In-process `ichigo transcribe` records into the same store as the queue (SQLite default)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sqlalchemy import func, select

from ichigo_common.store.models import File, Job, Transcript
from ichigo_common.store.repo import Store

from .conftest import speech_like, write_wav


def _run(args, env):
    proc = subprocess.run(
        [sys.executable, "-m", "ichigo_common.cli", "transcribe", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr


def test_transcribe_records_jobs_and_dedupes(tiny_en_yaml, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_wav(corpus / "a.wav", speech_like(2.0, seed=1))
    write_wav(corpus / "b.wav", speech_like(3.0, seed=2))
    write_wav(corpus / "a_copy.wav", speech_like(2.0, seed=1))  # same content as a.wav
    (corpus / "broken.wav").write_bytes(b"RIFF....WAVE")
    env = dict(os.environ, ICHIGO_DATA_DIR=str(tmp_path / "data"), HF_HUB_OFFLINE="1")
    env.pop("ICHIGO_DATABASE_URL", None)
    args = [str(corpus), "--model", str(tiny_en_yaml), "--json", "-q"]

    first, stderr = _run(args, env)
    by_name = {os.path.basename(r["path"]): r for r in first}
    assert set(by_name) == {"a.wav", "b.wav", "a_copy.wav", "broken.wav"}
    assert by_name["broken.wav"]["error"] and not (corpus / "broken.txt").exists()
    assert by_name["a.wav"]["text"] == by_name["a_copy.wav"]["text"]
    assert (corpus / "a.txt").read_text().strip() == by_name["a.wav"]["text"]
    assert "1 failed" in stderr

    second, stderr = _run(args, env)
    assert all(r["reused"] for r in second if r["error"] is None)
    assert "3 already transcribed" in stderr

    store = Store(f"sqlite:///{tmp_path / 'data' / 'ichigo.db'}")
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 2
        # a.wav and a_copy.wav share content: one transcript serves both, in both jobs
        assert s.scalar(select(func.count()).select_from(Transcript)) == 2
        failed = s.scalars(select(File).where(File.state == "failed")).all()
        assert len(failed) == 2 and all("could not decode" in f.error for f in failed)
        assert {j.state for j in s.scalars(select(Job))} == {"done"}

    forced, _ = _run([*args, "--force"], env)
    forced = {os.path.basename(r["path"]): r for r in forced}
    assert not forced["a.wav"]["reused"] and not forced["b.wav"]["reused"]
    assert forced["a_copy.wav"]["text"] == forced["a.wav"]["text"]
