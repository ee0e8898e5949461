"""The producer: path checks, job submission over HTTP, shards on the real Redis queue, job and
file views, cancellation, on SQLite and PostgreSQL (``test_producer_ops``: API key, health,
bounded memory; ``test_producer_cli``: the commands). The fixtures here serve all three.

Real services only: a SQLite file (or a fresh PostgreSQL database, dropped at the end)
migrated with ``upgrade``, and Redis db ``ICHIGO_TEST_REDIS_DB`` (13), the only one flushed.
What was enqueued is read back from kombu's Redis lists (``bulk``, ``bulk\x06\x16<priority>``).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import text

from ichigo_common.paths import PathRefused
from ichigo_common.settings import Settings
from ichigo_common.store.migrate import upgrade
from ichigo_common.store.repo import Store, TranscriptData
from ichigo_common.tasks import BULK_QUEUE, TRANSCRIBE_SHARD
from producer import jobstate
from producer.app import create_app
from producer.enqueue import JobSpec, expand_job, prepare_job, submit_job
from producer.expand import AUDIO_SUFFIXES, Sharder, check_glob, glob_root
from producer.queue import broker_priority, make_celery

from .queue_helpers import postgres_database

REPO = Path(__file__).resolve().parents[1]
REDIS_DB = int(os.environ.get("ICHIGO_TEST_REDIS_DB", "13"))
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
CLOSED_PORT_URL = f"redis://127.0.0.1:1/{REDIS_DB}"
LOCK_KEY, LOCK_TTL_S = "ichigo-test:owner", 3600
LOCK_TOKEN = f"test_producer:{os.getpid()}"


# -- services ---------------------------------------------------------------------------------


def flush(client) -> None:
    """Empty our Redis database (only it) and keep it marked as in use."""
    client.flushdb()
    client.set(LOCK_KEY, LOCK_TOKEN, ex=LOCK_TTL_S)


@pytest.fixture(scope="session", name="redis_client")
def redis_client_fixture():
    """Redis db ``REDIS_DB``, marked with the test suite's ``ichigo-test:owner`` key so that
    other test sessions picking a free database leave it alone (and we leave theirs)."""
    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis on 127.0.0.1:6379 ({exc})")
    if not client.set(LOCK_KEY, LOCK_TOKEN, nx=True, ex=LOCK_TTL_S):
        owner = client.get(LOCK_KEY) or b""
        if not owner.startswith(b"test_producer:"):  # our own stale mark is taken over
            pytest.skip(f"Redis db {REDIS_DB} is in use by {owner!r}: set ICHIGO_TEST_REDIS_DB")
    flush(client)
    yield client
    client.flushdb()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with postgres_database("ichigo_producer") as url:
        yield url


def _sqlite(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ichigo.db'}"
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return _sqlite(tmp_path)
    url = request.getfixturevalue("pg_url")
    with Store(url).session() as s:  # each test starts from empty tables
        s.execute(text("TRUNCATE job, file, transcript RESTART IDENTITY CASCADE"))
    return url


# -- the environment of one test ----------------------------------------------------------------


@dataclasses.dataclass
class Env:
    root: Path  # the allowed root
    outside: Path  # a sibling folder outside it
    settings: Settings
    store: Store
    redis: object

    def app(self, **overrides):
        settings = dataclasses.replace(self.settings, **overrides)
        return create_app(settings, self.store, make_celery(settings))

    def client(self, **overrides) -> TestClient:
        return TestClient(self.app(**overrides))

    def celery(self):
        return make_celery(self.settings)

    def messages(self, queue: str = BULK_QUEUE) -> list[dict]:
        """Every message waiting in the queue's Redis lists (all priorities), decoded."""
        out = []
        for key in sorted(self.redis.scan_iter(match=f"{queue}*")):
            if key != queue.encode() and not key.startswith(queue.encode() + b"\x06\x16"):
                continue
            for raw in self.redis.lrange(key, 0, -1):
                msg = json.loads(raw)
                args, kwargs, _embed = json.loads(base64.b64decode(msg["body"]))
                out.append({"key": key, "task": msg["headers"]["task"], "args": args,
                            "kwargs": kwargs, "content_type": msg["content-type"],
                            "priority": msg["properties"]["priority"]})
        return out

    def job_ids(self) -> list[str]:
        return [job.id for job in self.store.list_jobs(limit=10_000)]

    def file_ids(self, job_id: str) -> list[int]:
        return [f.id for f, _ in self.store.list_files(job_id, limit=1_000_000)]


def make_env(db_url: str, tmp_path: Path, redis_client) -> Env:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    settings = dataclasses.replace(
        Settings.from_env(), database_url=db_url, broker_url=REDIS_URL, result_backend=REDIS_URL,
        allowed_roots=(root.resolve(),), model="ichigo-asr-2501-en", shard_files=4,
        shard_bytes=1 << 30, api_key=None)
    return Env(root, outside, settings, Store(db_url), redis_client)


@pytest.fixture(name="broker")
def broker_fixture(redis_client):
    flush(redis_client)
    yield redis_client
    flush(redis_client)


@pytest.fixture(name="env")
def env_fixture(tmp_path, broker) -> Env:
    """SQLite store."""
    return make_env(_sqlite(tmp_path), tmp_path, broker)


@pytest.fixture
def env_db(db_url, tmp_path, broker) -> Env:
    """The same on SQLite and on PostgreSQL."""
    return make_env(db_url, tmp_path, broker)


def audio_files(folder: Path, n: int, suffix: str = ".wav", size: int = 16) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"clip{i:03d}{suffix}"
        path.write_bytes(b"\0" * size)
        paths.append(path)
    return paths


def assert_nothing_created(env: Env) -> None:
    assert env.job_ids() == []
    assert env.messages() == []


# -- pure parts -------------------------------------------------------------------------------


def test_sharder_cuts_by_files_and_bytes():
    s = Sharder(max_files=3, max_bytes=100)
    assert s.add([(1, 10), (2, 10), (3, 10), (4, 10)]) == [[1, 2, 3]]
    assert s.add([(5, 95)]) == [[4]]  # 10 + 95 > 100: the open shard goes first
    assert s.add([(6, 500)]) == [[5], [6]]  # too big: a shard of its own, at once
    assert s.add([(7, None)]) == []
    assert s.flush() == [7]
    assert s.flush() is None


def test_glob_root_and_refusals(tmp_path):
    roots = (tmp_path.resolve(),)
    assert glob_root("/data/a/*/b/*.wav") == "/data/a"
    assert glob_root("/data/**/x.wav") == "/data"
    assert check_glob(f"{tmp_path}/**/*.wav", roots)
    for bad in (f"{tmp_path}/../*.wav", f"{tmp_path}/*/../../etc/*",
                f"{tmp_path}/%2e%2e/*.wav", f"{tmp_path}/%252E%252E/x/*.wav",
                "~/*.wav", "*.wav", "/etc/*.conf"):
        with pytest.raises(PathRefused):
            check_glob(bad, roots)


def test_priority_is_inverted_for_redis():
    assert broker_priority(0) == 9 and broker_priority(9) == 0
    with pytest.raises(ValueError):
        broker_priority(10)


def test_audio_suffixes_match_the_pipeline():
    from ichigo_pipeline.audio import AUDIO_EXTENSIONS  # the tests may import torch

    assert AUDIO_SUFFIXES == AUDIO_EXTENSIONS


def test_producer_never_imports_torch_pipeline_or_worker():
    """The API image has no torch: the producer may use only the pipeline's torch-free
    helpers (preset names, token strings), never torch, numpy-heavy code or the worker."""
    allowed = ("ichigo_pipeline", "ichigo_pipeline.preset_files", "ichigo_pipeline.sound_tokens")
    code = ("import sys, producer.app, producer.cli, producer.client, producer.enqueue, "
            "producer.routes.interactive, producer.watch, producer.monitor; "
            f"allowed = {allowed!r}; "
            "bad = [m for m in sys.modules if m in ('torch', 'transformers', 'worker') "
            "or m.startswith(('torch.', 'worker.')) "
            "or (m.startswith('ichigo_pipeline') and m not in allowed)]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# -- refused and bad submissions -----------------------------------------------------------


def _refused_cases() -> dict[str, Callable[[Path, Path], dict]]:
    return {
        "dotdot": lambda r, o: {"paths": [f"{r}/../outside/a.wav"]},
        "dotdot-folder": lambda r, o: {"paths": [f"{r}/sub/../../outside"]},
        "absolute-outside": lambda r, o: {"paths": [str(o / "a.wav")]},
        "symlink-file-out": lambda r, o: {"paths": [str(r / "link-out.wav")]},
        "symlink-dir-out": lambda r, o: {"paths": [str(r / "linkdir")], "recursive": True},
        "through-symlink-dir": lambda r, o: {"paths": [str(r / "linkdir" / "a.wav")]},
        "tilde": lambda r, o: {"paths": ["~/a.wav"]},
        "tilde-alone": lambda r, o: {"paths": ["~"]},
        "relative": lambda r, o: {"paths": ["root/ok.wav"]},
        "encoded-path": lambda r, o: {"paths": [f"{r}/%2e%2e/outside/a.wav"]},
        "encoded-glob": lambda r, o: {"globs": [f"{r}/%2e%2e/outside/*.wav"]},
        "encoded-glob-upper": lambda r, o: {"globs": [f"{r}/%2E%2E%2Foutside/*.wav"]},
        "double-encoded-glob": lambda r, o: {"globs": [f"{r}/%252e%252e/outside/*.wav"]},
        "glob-dotdot-after-wildcard": lambda r, o: {"globs": [f"{r}/*/../../outside/*.wav"]},
        "glob-outside": lambda r, o: {"globs": [f"{o}/*.wav"]},
        "glob-through-symlink": lambda r, o: {"globs": [f"{r}/linkdir/*.wav"]},
        "one-bad-among-good": lambda r, o: {"paths": [str(r / "ok.wav"), str(o / "a.wav")]},
        "nul-byte": lambda r, o: {"paths": [f"{r}/ok\x00.wav"]},
        "output-dir-outside": lambda r, o: {"paths": [str(r / "ok.wav")], "output_dir": str(o)},
        "model-yaml-outside": lambda r, o: {"paths": [str(r / "ok.wav")],
                                            "model": str(o / "m.yaml")},
    }


@pytest.mark.queue
@pytest.mark.parametrize("case", list(_refused_cases()))
def test_refused_paths_are_403_and_nothing_is_created(env, case):
    (env.outside / "a.wav").write_bytes(b"x")
    (env.outside / "m.yaml").write_text("model_name: x\n")
    (env.root / "ok.wav").write_bytes(b"x")
    (env.root / "link-out.wav").symlink_to(env.outside / "a.wav")
    (env.root / "linkdir").symlink_to(env.outside, target_is_directory=True)
    body = _refused_cases()[case](env.root, env.outside)
    with env.client() as client:
        response = client.post("/v1/jobs", json=body)
    assert response.status_code == 403, response.text
    assert response.json()["detail"]
    assert_nothing_created(env)


@pytest.mark.queue
@pytest.mark.parametrize("body", [
    {},
    {"paths": []},
    {"paths": "ROOT/ok.wav"},
    {"paths": ["ROOT/ok.wav"], "priority": 10},
    {"paths": ["ROOT/ok.wav"], "priority": -1},
    {"paths": ["ROOT/ok.wav"], "unknown": 1},
    {"paths": ["ROOT/ok.wav"], "callback_url": "ftp://example.com/x"},
    {"paths": ["ROOT/ok.wav"], "language": "english!"},
    {"paths": ["ROOT/ok.wav"], "model": "weird model name"},
    {"paths": ["ROOT/ok.wav"], "model": "org/not-a-preset"},
    {"paths": ["ROOT/missing.wav"]},
    {"paths": ["ROOT/ok.wav"], "name": "n" * 201},
], ids=lambda b: ",".join(f"{k}" for k in b) or "empty")
def test_bad_input_is_422_and_nothing_is_created(env, body):
    (env.root / "ok.wav").write_bytes(b"x")
    body = json.loads(json.dumps(body).replace("ROOT", str(env.root)))
    with env.client() as client:
        response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert_nothing_created(env)


@pytest.mark.queue
def test_submit_job_refuses_before_storing(env):
    (env.outside / "a.wav").write_bytes(b"x")
    audio_files(env.root / "good", 3)
    with pytest.raises(PathRefused):
        submit_job(env.store, env.celery(), env.settings, source="cli",
                   paths=[str(env.root / "good"), str(env.outside / "a.wav")])
    assert_nothing_created(env)


# -- submitting and following -----------------------------------------------------------------


@pytest.mark.queue
def test_submit_folder_queues_every_file_once_in_shards(env_db):
    env = env_db
    folder = env.root / "talks"
    audio_files(folder, 10)
    (folder / "notes.txt").write_text("not audio")
    (folder / ".hidden.wav").write_bytes(b"x")
    audio_files(folder / "sub", 2)  # not recursive: left out
    with env.client() as client:
        response = client.post("/v1/jobs", json={"paths": [str(folder)], "language": "en",
                                                 "force": True, "name": "talks"})
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        assert response.headers["location"] == f"/v1/jobs/{job_id}"
        job = client.get(f"/v1/jobs/{job_id}").json()

    messages = env.messages()
    assert len(messages) == math.ceil(10 / env.settings.shard_files) == 3
    for msg in messages:
        assert msg["task"] == TRANSCRIBE_SHARD
        assert msg["content_type"] == "application/json"
        assert msg["args"] == [] and set(msg["kwargs"]) == {"job_id", "file_ids"}
        assert msg["kwargs"]["job_id"] == job_id
        assert len(msg["kwargs"]["file_ids"]) <= env.settings.shard_files
    sent = Counter(fid for msg in messages for fid in msg["kwargs"]["file_ids"])
    assert set(sent.values()) == {1}
    assert sorted(sent) == sorted(env.file_ids(job_id))
    stored = {f.path for f, _ in env.store.list_files(job_id)}
    assert stored == {str(p) for p in folder.glob("clip*.wav")}

    assert job["state"] == "queued" and job["total"] == 10
    assert job["files"]["queued"] == 10 and job["bytes"]["queued"] == 160
    assert job["options"]["force"] is True and job["options"]["language"] == "en"
    assert job["name"] == "talks" and job["source"] == "api"
    assert job["eta_s"] is None and job["throughput"] is None


@pytest.mark.queue
def test_priority_goes_to_the_redis_priority_list(env):
    audio_files(env.root / "a", 2)
    with env.client() as client:
        for priority in (9, 0):
            assert client.post("/v1/jobs", json={"paths": [str(env.root / "a")],
                                                 "priority": priority}).status_code == 202
    keys = {msg["key"]: msg["priority"] for msg in env.messages()}
    assert keys == {b"bulk": 0, b"bulk\x06\x169": 9}  # served first: "bulk"


@pytest.mark.queue
def test_shards_respect_the_byte_budget(env):
    folder = env.root / "mixed"
    folder.mkdir()
    for i, size in enumerate([600, 600, 300, 2000, 10, 90]):
        (folder / f"f{i}.flac").write_bytes(b"\0" * size)
    with env.client(shard_files=10, shard_bytes=1000) as client:
        assert client.post("/v1/jobs", json={"paths": [str(folder)]}).status_code == 202
    sizes = {f.id: f.size for f, _ in env.store.list_files(env.job_ids()[0])}
    shards = [msg["kwargs"]["file_ids"] for msg in env.messages()]
    assert sorted(fid for shard in shards for fid in shard) == sorted(sizes)
    for shard in shards:
        assert len(shard) == 1 or sum(sizes[f] for f in shard) <= 1000


@pytest.mark.queue
def test_recursion_globs_and_overlapping_inputs(env):
    a = env.root / "a"
    for rel in ("x.wav", "b/y.flac", "b/c/z.MP3", "b/skip.txt"):
        (a / rel).parent.mkdir(parents=True, exist_ok=True)
        (a / rel).write_bytes(b"x")

    def submitted(body: dict) -> set[str]:
        with env.client() as client:
            response = client.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        return {f.path for f, _ in env.store.list_files(response.json()["job_id"])}

    assert submitted({"paths": [str(a)]}) == {f"{a}/x.wav"}
    everything = {f"{a}/x.wav", f"{a}/b/y.flac", f"{a}/b/c/z.MP3"}
    assert submitted({"paths": [str(a)], "recursive": True}) == everything
    assert submitted({"globs": [f"{env.root}/**/*.flac"]}) == {f"{a}/b/y.flac"}
    overlapping = {"paths": [str(a), str(a / "x.wav"), str(a)], "recursive": True,
                   "globs": [f"{a}/**/*.wav", f"{a}/**/**/*"]}
    assert submitted(overlapping) == everything


@pytest.mark.queue
def test_symlinks_met_while_expanding(env):
    d = env.root / "d"
    audio_files(d, 1)
    (env.root / "other").mkdir()
    (env.root / "other" / "t.wav").write_bytes(b"inside")
    (env.outside / "a.wav").write_bytes(b"outside")
    (d / "link-in.wav").symlink_to(env.root / "other" / "t.wav")
    (d / "link-out.wav").symlink_to(env.outside / "a.wav")
    (d / "linkdir").symlink_to(env.outside, target_is_directory=True)  # never entered
    with env.client() as client:
        job_id = client.post("/v1/jobs", json={"paths": [str(d)], "recursive": True}).json()[
            "job_id"]
        failed = client.get(f"/v1/jobs/{job_id}/files", params={"state": "failed"}).json()
        job = client.get(f"/v1/jobs/{job_id}").json()
    rows = {f.path: f.state for f, _ in env.store.list_files(job_id)}
    assert rows == {f"{d}/clip000.wav": "queued", f"{d}/link-in.wav": "queued",
                    f"{d}/link-out.wav": "failed"}
    [bad] = failed["files"]
    assert bad["error"].startswith("refused:") and "outside the allowed roots" in bad["error"]
    queued = {fid for msg in env.messages() for fid in msg["kwargs"]["file_ids"]}
    assert queued == {f.id for f, _ in env.store.list_files(job_id, state="queued")}
    assert job["files"]["queued"] == 2 and job["files"]["failed"] == 1


def _finish(store: Store, file_id: int, text: str, seconds: float) -> None:
    """Write what a worker writes for a transcribed file (real store operations)."""
    store.record_result(file_id, TranscriptData(
        model="ichigo-asr-2501-en", content_hash=uuid.uuid4().hex, text=text,
        tokens="<|sound_start|><|sound_0001|><|sound_end|>", chunks=[], duration_s=seconds,
        processing_s=0.1, provenance={}))


@pytest.mark.queue
def test_job_progress_and_file_pages(env_db):
    env = env_db
    audio_files(env.root / "p", 7)
    with env.client() as client:
        job_id = client.post("/v1/jobs", json={"paths": [str(env.root / "p")]}).json()["job_id"]
        ids = env.file_ids(job_id)
        pages = [client.get(f"/v1/jobs/{job_id}/files", params={"limit": 3, "offset": off})
                 .json() for off in (0, 3, 6)]
        assert [len(p["files"]) for p in pages] == [3, 3, 1]
        assert [f["file_id"] for p in pages for f in p["files"]] == ids
        assert [p["next_offset"] for p in pages] == [3, 6, None]

        claimed, _ = env.store.claim(ids[:2], "test-worker", 60, 3)
        assert len(claimed) == 2
        _finish(env.store, ids[0], "hello world", 12.5)
        env.store.record_failure(ids[1], "cannot decode: not audio")

        done = client.get(f"/v1/jobs/{job_id}/files", params={"state": "done"}).json()["files"]
        failed = client.get(f"/v1/jobs/{job_id}/files?state=failed").json()["files"]
        brief = client.get(f"/v1/jobs/{job_id}/files?state=done&tokens=false").json()["files"]
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert client.get(f"/v1/jobs/{job_id}/files?state=bogus").status_code == 422
        assert client.get(f"/v1/jobs/{job_id}/files?limit=0").status_code == 422
        assert client.get("/v1/jobs/nope/files").status_code == 404
        assert client.get("/v1/jobs/nope").status_code == 404

    assert [(f["file_id"], f["text"]) for f in done] == [(ids[0], "hello world")]
    assert done[0]["tokens"].startswith("<|sound_start|>") and done[0]["duration_s"] == 12.5
    assert brief[0]["text"] == "hello world" and "tokens" not in brief[0]
    assert [(f["file_id"], f["error"]) for f in failed] == [(ids[1], "cannot decode: not audio")]
    assert job["state"] == "running" and job["started_at"]
    assert job["files"] == {"pending": 0, "queued": 5, "running": 0, "done": 1, "failed": 1,
                            "cancelled": 0}
    assert job["audio_s_done"] == 12.5
    assert job["throughput"] > 0 and job["elapsed_s"] > 0
    assert job["eta_s"] == pytest.approx(job["elapsed_s"] * 5 / 2, rel=0.05)  # 16 B each


@pytest.mark.queue
def test_cancel_marks_queued_files_cancelled(env_db):
    env = env_db
    audio_files(env.root / "c", 6)
    with env.client() as client:
        job_id = client.post("/v1/jobs", json={"paths": [str(env.root / "c")]}).json()["job_id"]
        ids = env.file_ids(job_id)
        env.store.claim(ids[:1], "test-worker", 60, 3)  # one file already running
        first = client.delete(f"/v1/jobs/{job_id}")
        again = client.delete(f"/v1/jobs/{job_id}")
        cancelled = client.get(f"/v1/jobs/{job_id}/files?state=cancelled").json()["files"]
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert client.delete("/v1/jobs/0123456789abcdef0123456789abcdef").status_code == 404
    assert first.status_code == 200
    assert first.json() == {"job_id": job_id, "cancelled_files": 5, "state": "cancelled"}
    assert again.json()["cancelled_files"] == 0
    assert sorted(f["file_id"] for f in cancelled) == ids[1:]
    assert job["files"]["running"] == 1 and job["files"]["cancelled"] == 5
    assert job["finished_at"]


@pytest.mark.queue
def test_cancel_while_expanding_stops_the_expansion(env):
    audio_files(env.root / "big", 12)
    celery = env.celery()
    prepared = prepare_job(env.store, celery, env.settings,
                           JobSpec(paths=(str(env.root / "big"),), source="cli"))
    assert env.store.get_job(prepared.job_id).state == "expanding"
    assert jobstate.cancel(env.store, prepared.job_id) == 0
    report = expand_job(env.store, celery, env.settings, prepared, commit_every=5)
    assert report.state == "cancelled" and report.shards == 0
    assert env.messages() == []
    # the first committed batch is in, then the cancel is seen and its files swept
    assert env.store.job_counts(prepared.job_id)["files"] == {"cancelled": 5}


@pytest.mark.queue
def test_broker_lost_while_expanding_fails_the_job(env):
    audio_files(env.root / "lost", 6)
    prepared = prepare_job(env.store, env.celery(), env.settings,
                           JobSpec(paths=(str(env.root / "lost"),), source="cli"))
    gone = make_celery(dataclasses.replace(env.settings, broker_url=CLOSED_PORT_URL))
    with pytest.raises(Exception, match="(?i)connect"):
        expand_job(env.store, gone, env.settings, prepared)
    job = env.store.get_job(prepared.job_id)
    assert job.state == "failed" and job.error.startswith("expansion failed after 6 files")
    assert job.finished_at is not None
    assert env.store.job_counts(prepared.job_id)["files"] == {"cancelled": 6}


@pytest.mark.queue
def test_empty_match_finishes_the_job(env):
    with env.client() as client:
        job_id = client.post("/v1/jobs", json={"globs": [f"{env.root}/*.wav"]}).json()["job_id"]
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "done" and job["total"] == 0 and job["eta_s"] == 0.0


@pytest.mark.queue
def test_list_jobs_paginated(env):
    audio_files(env.root / "l", 2)
    with env.client() as client:
        made = [client.post("/v1/jobs", json={"paths": [str(env.root / "l")], "name": f"j{i}"})
                .json()["job_id"] for i in range(3)]
        first = client.get("/v1/jobs", params={"limit": 2}).json()
        rest = client.get("/v1/jobs", params={"limit": 2, "offset": 2, "counts": True}).json()
        assert client.get("/v1/jobs?limit=100000").status_code == 422
    assert len(first["jobs"]) == 2 and first["next_offset"] == 2
    assert len(rest["jobs"]) == 1 and rest["next_offset"] is None
    assert {j["job_id"] for j in first["jobs"] + rest["jobs"]} == set(made)
    assert rest["jobs"][0]["files"]["queued"] == 2 and "files" not in first["jobs"][0]
