"""Queue path (REST submit -> Redis -> `ichigo worker` -> store -> .txt) vs in-process
`ichigo transcribe`, same corpus, same model, one sitting.

Both sides run with a warm model: the worker gets a one-file warm-up job first, the in-process
side is timed from its own summary line (which excludes start-up). Needs Redis on 127.0.0.1.

    python bench/queue_overhead.py [--files 200] [--model whisper-tiny.en] [--redis-db 12]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def corpus(speech: Path, n: int, folder: Path) -> list[Path]:
    """``n`` distinct files: ordered pairs of different English clips back to back (0.3 s of
    silence between), so no two files share content and neither side can serve one file from
    another's transcript. Lengths vary (about 4 to 30 s): some files are cut into chunks."""
    import itertools

    import numpy as np
    import soundfile as sf

    from ichigo_pipeline.audio import load_audio

    rows = [line.split("\t") for line in (speech / "manifest.tsv").read_text().splitlines()[1:]]
    clips = [speech / r[0] for r in rows if r[3] == "en"]
    pairs = list(itertools.permutations(range(len(clips)), 2))
    step = max(1, len(pairs) // n)  # spread over all clips, deterministic
    chosen = (pairs[::step] + [p for i, p in enumerate(pairs) if i % step])[:n]
    if len(chosen) < n:
        raise SystemExit(f"only {len(chosen)} distinct pairs of {len(clips)} clips")
    waves: dict[int, np.ndarray] = {}
    gap = np.zeros(4800, dtype=np.float32)
    out = []
    for i, (a, b) in enumerate(chosen):
        for k in (a, b):
            if k not in waves:
                waves[k] = load_audio(clips[k]).numpy()
        wav = np.concatenate([waves[a], gap, waves[b]])
        dst = folder / f"{i:04d}_{clips[a].stem}+{clips[b].stem}.flac"
        sf.write(str(dst), np.clip(wav, -1, 1 - 2**-15), 16000, subtype="PCM_16")
        out.append(dst)
    return out


def same_texts(a: Path, b: Path) -> tuple[int, int]:
    """(files whose .txt is the same on both sides, .txt files on side a)."""
    names = sorted(p.name for p in a.glob("*.txt"))
    same = sum((a / n).read_text() == (b / n).read_text() for n in names if (b / n).exists())
    return same, len(names)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--model", default="whisper-tiny.en")
    parser.add_argument("--redis-db", type=int, default=12)
    parser.add_argument("--speech", type=Path, default=REPO.parent / "shared" / "speech")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    from fastapi.testclient import TestClient
    from wer import machine_info

    from ichigo_common.settings import Settings
    from ichigo_common.store.migrate import upgrade
    from ichigo_common.store.repo import Store
    from producer.app import create_app
    from producer.queue import make_celery
    from tests.queue_helpers import WorkerProcess, running_workers, wait_for, worker_env

    tmp = Path(tempfile.mkdtemp(prefix="ichigo-qbench-"))
    (tmp / "corpus").mkdir()
    (tmp / "warm").mkdir()
    files = corpus(args.speech, args.files, tmp / "corpus")
    shutil.copy(files[0], tmp / "warm" / "warm.flac")
    audio_s = 0.0
    from ichigo_pipeline.audio import probe_duration

    audio_s = sum(probe_duration(f) or 0.0 for f in files)

    # in-process (its own SQLite store); --force: nothing served from an earlier transcript
    env = dict(os.environ, ICHIGO_DATA_DIR=str(tmp / "inproc-data"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "ichigo_common.cli", "transcribe", str(tmp / "corpus"),
         "--model", args.model, "--force", "-q", "--output-dir", str(tmp / "inproc-out")],
        capture_output=True, text=True, env=env, check=True, cwd=REPO,
    )
    inproc_wall = float(re.search(r"wall: ([\d.]+) s", proc.stderr).group(1))

    url = f"sqlite:///{tmp / 'queue.db'}"
    upgrade(url)
    redis_url = f"redis://127.0.0.1:6379/{args.redis_db}"
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    settings = dataclasses.replace(
        Settings.from_env(), database_url=url, broker_url=redis_url, result_backend=redis_url,
        allowed_roots=(tmp.resolve(),), api_key=None,
    )
    wenv = worker_env(redis_url=redis_url, database_url=url, roots=[tmp],
                      OMP_NUM_THREADS=str(os.cpu_count()), ICHIGO_DECODER_DTYPE="")
    worker = WorkerProcess("bench", wenv, tmp / "worker.log", queues="interactive,bulk")
    with running_workers(worker), TestClient(create_app(settings, Store(url),
                                                        make_celery(settings))) as api:
        def run_job(paths, **extra):
            start = time.perf_counter()
            job = api.post("/v1/jobs", json={"paths": paths, "model": args.model, "force": True,
                                             **extra}).json()["job_id"]
            # polled once a second, as a client would: the API runs in this process and
            # shares the 2 cores with the worker
            wait_for(lambda: api.get(f"/v1/jobs/{job}").json()["state"] == "done", 3600,
                     "job", interval=1.0, on_timeout=worker.tail)
            return time.perf_counter() - start

        run_job([str(tmp / "warm")])
        queue_wall = run_job([str(tmp / "corpus")], output_dir=str(tmp / "queue-out"))

    same, n_txt = same_texts(tmp / "queue-out", tmp / "inproc-out")
    info = machine_info()
    text = (
        f"# Queue path vs in-process ({dt.date.today()})\n\n"
        f"Machine: {info['cpu']}, {info['cores']} cores; commit {info['commit']}  \n"
        f"Corpus: {len(files)} files, {audio_s:.1f} s of real speech; model {args.model}; "
        "warm model on both sides; SQLite store; one worker (prefork, 1 child).\n\n"
        "| path | wall s | audio s / s | vs in-process |\n|---|---|---|---|\n"
        f"| in-process `ichigo transcribe` | {inproc_wall:.1f} | {audio_s / inproc_wall:.2f} "
        "| 1.00x |\n"
        f"| REST -> Redis -> worker -> store | {queue_wall:.1f} | {audio_s / queue_wall:.2f} | "
        f"{inproc_wall / queue_wall:.2f}x |\n\n"
        f"Transcripts: {n_txt} `.txt` from the queue, {same} identical to the in-process ones.\n"
    )
    print(text)
    if args.json:  # bench/compare.py reads this and writes its own table
        args.json.write_text(json.dumps({"files": len(files), "audio_s": audio_s,
                                         "inproc_wall_s": inproc_wall, "queue_wall_s": queue_wall,
                                         "queue_txt": n_txt, "same_txt": same}))
        return
    out = REPO / "bench" / "results" / f"queue-overhead-{dt.date.today()}.md"
    out.write_text(text)


if __name__ == "__main__":
    main()
