"""Queue path (REST submit -> Redis -> `ichigo worker` -> store -> .txt) vs in-process
`ichigo transcribe`, same corpus, same model, one sitting.

Both sides run with a warm model: the worker gets a one-file warm-up job first, the in-process
side is timed from its own summary line (which excludes start-up). Needs Redis on 127.0.0.1.

    python bench/queue_overhead.py [--files 30] [--model whisper-tiny.en] [--redis-db 12]
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
    rows = [line.split("\t") for line in (speech / "manifest.tsv").read_text().splitlines()[1:]]
    clips = [speech / r[0] for r in rows if r[3] == "en"]
    out = []
    for i in range(n):
        src = clips[i % len(clips)]
        dst = folder / f"{i:04d}_{src.name}"  # repeated clips: both sides run with --force
        shutil.copy(src, dst)
        out.append(dst)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=30)  # the 30 distinct English clips
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

    # in-process (its own SQLite store), --force so no dedupe between the identical copies
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
            wait_for(lambda: api.get(f"/v1/jobs/{job}").json()["state"] == "done", 3600,
                     "job", on_timeout=worker.tail)
            return time.perf_counter() - start

        run_job([str(tmp / "warm")])
        queue_wall = run_job([str(tmp / "corpus")], output_dir=str(tmp / "queue-out"))

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
        f"{inproc_wall / queue_wall:.2f}x |\n"
    )
    print(text)
    if args.json:  # bench/compare.py reads this and writes its own table
        args.json.write_text(json.dumps({"files": len(files), "audio_s": audio_s,
                                         "inproc_wall_s": inproc_wall, "queue_wall_s": queue_wall}))
        return
    out = REPO / "bench" / "results" / f"queue-overhead-{dt.date.today()}.md"
    out.write_text(text)


if __name__ == "__main__":
    main()
