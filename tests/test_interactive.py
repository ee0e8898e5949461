"""The upstream server's endpoints on the queue, end to end: a real `ichigo api` (uvicorn) and a
real `ichigo worker` on a private Redis database, a SQLite store, a small random Ichigo model
with upstream's codebook size. The clients are the official `openai` SDK (every response
format) and the exact curl requests of the upstream README; the expected answers come from
the in-process pipeline on the same model and audio."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from .conftest import REPO, english_ranks, speech_like, write_wav
from .queue_helpers import (  # noqa: F401 - redis_db is a fixture
    WorkerProcess,
    redis_db,
    running_workers,
    sqlite_store_url,
    wait_for,
    worker_env,
)

pytestmark = [pytest.mark.queue, pytest.mark.slow]

#: the R2T request of upstream's README, byte for byte
UPSTREAM_R2T = (
    '{"tokens":"<|sound_start|><|sound_1012|><|sound_1508|><|sound_1508|><|sound_0636|>'
    "<|sound_1090|><|sound_0567|><|sound_0901|><|sound_0901|><|sound_1192|><|sound_1820|>"
    "<|sound_0547|><|sound_1999|><|sound_0157|><|sound_0157|><|sound_1454|><|sound_1223|>"
    "<|sound_1223|><|sound_1223|><|sound_1223|><|sound_1808|><|sound_1808|><|sound_1573|>"
    "<|sound_0065|><|sound_1508|><|sound_1508|><|sound_1268|><|sound_0568|><|sound_1745|>"
    "<|sound_1508|><|sound_0084|><|sound_1768|><|sound_0192|><|sound_1048|><|sound_0826|>"
    "<|sound_0192|><|sound_0517|><|sound_0192|><|sound_0826|><|sound_0971|><|sound_1845|>"
    "<|sound_1694|><|sound_1048|><|sound_0192|><|sound_1048|><|sound_1268|><|sound_end|>\"}"
)
MAX_UPLOAD = 3 * 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def codebook_model(tmp_path_factory) -> Path:
    """A small random Ichigo model with upstream 2501's codebook (2560 codes, mask 2048), so
    upstream's own example token string is in range; 24-token decodes."""
    from ichigo_pipeline.testing import TinyDims, build_tiny_ichigo

    dims = TinyDims(n_vocab=51864, n_audio_state=64, n_audio_head=1, n_audio_layer=1,
                    n_text_state=64, n_text_head=1, n_text_layer=1)
    return build_tiny_ichigo(tmp_path_factory.mktemp("codebook-model"), english_ranks(), dims,
                             vq_codes=2560, mask_code=2048,
                             decoding_options={"task": "transcribe", "language": "en",
                                               "sample_len": 24})


@dataclasses.dataclass
class Server:
    url: str
    root: Path
    store_url: str
    worker: WorkerProcess
    model: Path
    redis_url: str


def _start_api(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ichigo_common.cli", "api", "--port", str(port)],
        env=env, cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def up():
        if proc.poll() is not None:
            pytest.fail(f"ichigo api exited: {log.read_text()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz?workers=false", timeout=2)
        except httpx.HTTPError:
            return None

    wait_for(up, 60, "ichigo api to answer")
    return proc


@pytest.fixture(scope="module")
def server(tmp_path_factory, redis_db, codebook_model):  # noqa: F811 - the fixture
    root = tmp_path_factory.mktemp("interactive")
    (root / "uploads").mkdir()
    store_url = sqlite_store_url(root)
    env = worker_env(redis_url=redis_db.url, database_url=store_url,
                     roots=[root, codebook_model.parent],
                     ICHIGO_UPLOAD_DIR=str(root / "uploads"), ICHIGO_MODEL=str(codebook_model),
                     ICHIGO_MAX_UPLOAD_BYTES=str(MAX_UPLOAD), ICHIGO_SHARD_FILES="2")
    env.pop("ICHIGO_API_KEY", None)
    worker = WorkerProcess("interactive", env, root / "worker.log", queues="interactive,bulk")
    port = _free_port()
    with running_workers(worker):
        api = _start_api(env, port, root / "api.log")
        try:
            yield Server(f"http://127.0.0.1:{port}", root, store_url, worker, codebook_model,
                         redis_db.url)
        finally:
            api.terminate()
            api.wait(20)


@pytest.fixture(scope="module")
def clips(tmp_path_factory, speech_dir_or_none) -> dict[str, Path]:
    """A short and a long (3-chunk) clip: real speech when ../shared/speech is there."""
    folder = tmp_path_factory.mktemp("clips")
    if speech_dir_or_none is not None:
        import soundfile as sf

        from .conftest import read_manifest

        rows = [r for r in read_manifest(speech_dir_or_none) if r["language"] == "en"]
        short = folder / "sample.wav"
        data, rate = sf.read(speech_dir_or_none / rows[0]["file"], dtype="float32")
        sf.write(short, data, rate)
        parts = []
        for r in rows[:12]:
            d, sr = sf.read(speech_dir_or_none / r["file"], dtype="float32")
            if d.ndim > 1:
                d = d.mean(axis=1)
            if sr != 16000:
                idx = np.linspace(0, len(d) - 1, int(len(d) * 16000 / sr))
                d = np.interp(idx, np.arange(len(d)), d).astype(np.float32)
            parts.append(d)
            if sum(len(p) for p in parts) > 16000 * 50:
                break
        long = write_wav(folder / "long talk.wav", np.concatenate(parts))
    else:
        short = write_wav(folder / "sample.wav", speech_like(4.0, seed=3))
        long = write_wav(folder / "long talk.wav", speech_like(50.0, seed=4))
    return {"short": short, "long": long}


@pytest.fixture(scope="module")
def speech_dir_or_none() -> Path | None:
    folder = REPO.parent / "shared" / "speech"
    return folder if (folder / "manifest.csv").exists() else None


@pytest.fixture(scope="module")
def local_model(codebook_model):
    """The same model in this process, decoding in float32 as the workers do (worker_env);
    passed explicitly, never through the environment other tests share."""
    from ichigo_pipeline.model import IchigoModel, ModelSpec

    return IchigoModel(ModelSpec.resolve(str(codebook_model)), device="cpu",
                       decoder_dtype="float32")


@pytest.fixture(scope="module")
def expected(local_model, clips):
    """What the in-process pipeline gives on the same model and audio."""
    from ichigo_pipeline.pipeline import BatchPipeline

    model = local_model
    results = {r.path: r for r in BatchPipeline(model, batch_size=4).run(
        [str(p) for p in clips.values()])}
    return {name: results[str(p)] for name, p in clips.items()}


def _openai(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_openai_sdk_json_and_text(server, clips, expected):
    client = _openai(server)
    with open(clips["short"], "rb") as fh:
        out = client.audio.transcriptions.create(model="ichigo", file=fh)
    assert out.text == expected["short"].text and out.text
    with open(clips["short"], "rb") as fh:
        text = client.audio.transcriptions.create(model="ichigo", file=fh, response_format="text")
    assert text.strip() == expected["short"].text


def _srt_blocks(body: str) -> list[tuple[str, str]]:
    blocks = []
    for block in body.strip().split("\n\n"):
        lines = block.split("\n")
        blocks.append((lines[1], " ".join(lines[2:])))
    return blocks


def test_openai_sdk_subtitles_and_verbose_json(server, clips, expected):
    client = _openai(server)
    want = expected["long"]
    spoken = [c for c in want.chunks if c.text.strip()]
    assert len(want.chunks) >= 2
    with open(clips["long"], "rb") as fh:
        srt = client.audio.transcriptions.create(model="ichigo", file=fh, response_format="srt")
    blocks = _srt_blocks(srt)
    assert [t for _, t in blocks] == [c.text.strip() for c in spoken]
    first = spoken[0]
    start = f"00:00:{int(first.offset_s):02d},{round(first.offset_s % 1 * 1000):03d}"
    assert blocks[0][0].startswith(start + " --> ")
    with open(clips["long"], "rb") as fh:
        vtt = client.audio.transcriptions.create(model="ichigo", file=fh, response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n")
    assert vtt.count(" --> ") == len(spoken)
    assert "." in vtt.split(" --> ")[1][:12]
    with open(clips["long"], "rb") as fh:
        verbose = client.audio.transcriptions.create(model="ichigo", file=fh,
                                                     response_format="verbose_json")
    assert verbose.text == want.text
    assert abs(verbose.duration - want.duration_s) < 0.01
    assert verbose.language == "en"
    segs = verbose.segments
    assert [s.text for s in segs] == [c.text.strip() for c in spoken]
    assert segs[-1].end == pytest.approx(spoken[-1].offset_s + spoken[-1].duration_s, abs=1e-3)
    assert all(a.end <= b.start + 1e-3 for a, b in zip(segs, segs[1:], strict=False))


def test_transcription_is_a_job_deduplicated_and_cleaned_up(server, clips, expected):
    from sqlalchemy import select

    from ichigo_common.store.models import File
    from ichigo_common.store.repo import Store

    store = Store(server.store_url)
    seen = []
    for _ in range(2):
        resp = httpx.post(f"{server.url}/v1/audio/transcriptions", timeout=300,
                          files={"file": ("sample.wav", clips["short"].read_bytes())},
                          data={"model": "ichigo"})
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"text": expected["short"].text}
        job_id = resp.headers["x-ichigo-job"]
        job = httpx.get(f"{server.url}/v1/jobs/{job_id}").json()
        assert job["state"] == "done" and job["source"] == "api", job
        files = httpx.get(f"{server.url}/v1/jobs/{job_id}/files").json()["files"]
        assert [f["text"] for f in files] == [expected["short"].text]
        with store.session() as s:
            seen.append(s.execute(select(File.id, File.transcript_id)
                                  .where(File.job_id == job_id)).one())
        # the upload's folder (audio and .txt) is gone once answered
        assert list((server.root / "uploads").iterdir()) == []
    # the same content with the same model is served from the first transcript
    assert seen[0].transcript_id == seen[1].transcript_id
    assert seen[0].id != seen[1].id


def _curl(*args: str, cwd: Path) -> tuple[int, str]:
    out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", *args], capture_output=True,
                         text=True, timeout=300, check=True, cwd=cwd).stdout
    body, code = out.rsplit("\n", 1)
    return int(code), body


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_upstream_readme_curl_requests(server, clips, expected, local_model):
    """The three curl requests of upstream's README, with only host and file changed."""
    import torch

    from ichigo_pipeline.sound_tokens import as_chunks

    cwd = clips["short"].parent
    # the README's `-F "file=@sample.wav"` is relative: curl runs in the clip's folder
    code, body = _curl(f"{server.url}/v1/audio/transcriptions", "-H", "accept: application/json",
                       "-H", "Content-Type: multipart/form-data",
                       "-F", "file=@sample.wav", "-F", "model=ichigo", cwd=cwd)
    assert code == 200, body
    assert json.loads(body) == {"text": expected["short"].text}
    code, body = _curl(f"{server.url}/s2r", "-H", "accept: application/json",
                       "-H", "Content-Type: multipart/form-data", "-F", "file=@sample.wav",
                       cwd=cwd)
    assert code == 200, body
    reply = json.loads(body)
    assert set(reply) == {"model", "tokens"}
    assert reply["tokens"] == expected["short"].tokens
    assert reply["tokens"].startswith("<|sound_start|><|sound_")
    code, body = _curl(f"{server.url}/r2t", "-X", "POST", "-H", "accept: application/json",
                       "-H", "Content-Type: application/json", "--data", UPSTREAM_R2T, cwd=cwd)
    assert code == 200, body
    reply = json.loads(body)
    assert set(reply) == {"model", "text"}
    (ids,) = as_chunks(json.loads(UPSTREAM_R2T)["tokens"])
    (decoded,) = local_model.decode(local_model.dequantize([torch.tensor(ids)]))
    want = decoded.text.strip()
    assert reply["text"] == want


def test_long_audio_round_trip_through_s2r_and_r2t(server, clips, expected):
    """s2r of a 3-chunk file gives one segment per chunk; r2t of that string gives the file's
    transcript (the same ids decoded the same way)."""
    with open(clips["long"], "rb") as fh:
        resp = httpx.post(f"{server.url}/s2r", files={"file": ("long talk.wav", fh)},
                          timeout=300)
    assert resp.status_code == 200, resp.text
    tokens = resp.json()["tokens"]
    assert tokens == expected["long"].tokens
    assert tokens.count("<|sound_start|>") == len(expected["long"].chunks) >= 2
    resp = httpx.post(f"{server.url}/r2t", json={"tokens": tokens}, timeout=300)
    assert resp.status_code == 200, resp.text
    assert resp.json()["text"] == expected["long"].text


@pytest.mark.parametrize(
    ("tokens", "says"),
    [
        ("<|sound_start|><|sound_0001|>", "expected <|sound_start|>...<|sound_end|>"),
        ("<|sound_start|><|sound_01|><|sound_end|>", "is not a <|sound_NNNN|> token"),
        ("hello <|sound_start|><|sound_0001|><|sound_end|>", "unexpected text 'hello '"),
        ("<|sound_start|><|sound_end|>", "segment 1 holds no sound tokens"),
        ("<|sound_start|><|sound_0001|><|sound_9999|><|sound_end|>",
         "<|sound_9999|> is outside this model's codebook (ids 0..2560)"),
    ],
)
def test_r2t_refuses_bad_token_strings(server, tokens, says):
    resp = httpx.post(f"{server.url}/r2t", json={"tokens": tokens}, timeout=120)
    assert resp.status_code == 422, resp.text
    assert says in resp.json()["detail"]


def test_bad_uploads_are_refused_with_the_reason(server, tmp_path):
    url = f"{server.url}/v1/audio/transcriptions"
    cases = [
        (("big.wav", b"\0" * (MAX_UPLOAD + 1)), 413, "upload larger than"),
        (("huge.wav", b"\0" * (MAX_UPLOAD + 2 * 1024 * 1024)), 413, "request body larger"),
        (("noise.wav", os.urandom(40_000)), 415, "can be opened"),
        (("notes.txt", b"just some text\n" * 100), 415, ""),
        (("empty.mp3", b""), 415, ""),
    ]
    for (name, data), code, says in cases:
        resp = httpx.post(url, files={"file": (name, data)}, timeout=60)
        assert resp.status_code == code, (name, resp.status_code, resp.text)
        assert says in resp.json()["detail"]
    # a valid upload with bad options
    wav = write_wav(tmp_path / "ok.wav", speech_like(1.0, seed=9)).read_bytes()
    resp = httpx.post(url, files={"file": ("ok.wav", wav)}, data={"model": "gpt-9"}, timeout=60)
    assert resp.status_code == 400 and "unknown model 'gpt-9'" in resp.json()["detail"]
    resp = httpx.post(url, files={"file": ("ok.wav", wav)}, data={"language": "english!"},
                      timeout=60)
    assert resp.status_code == 422
    resp = httpx.post(url, files={"file": ("ok.wav", wav)},
                      data={"response_format": "docx"}, timeout=60)
    assert resp.status_code == 422
    # nothing of the refused uploads is left behind
    assert list((server.root / "uploads").iterdir()) == []


def test_interactive_requests_go_ahead_of_bulk_work(server, clips, expected):
    """A 120-file bulk job (60 shards) is queued first; a transcription sent right after is
    answered while most of the bulk job is still waiting. A running bulk shard stops taking
    on the job's other files once the interactive shard waits, so it holds at most its own
    2 files and two batches (2 x 16) more when it arrives."""
    from ichigo_common.store.repo import Store

    from .queue_helpers import make_clips

    corpus = server.root / "bulk"
    make_clips(corpus, 120, seed=21, min_s=1.0, max_s=2.0)
    resp = httpx.post(f"{server.url}/v1/jobs", json={"paths": [str(corpus)]}, timeout=60)
    assert resp.status_code == 202, resp.text
    bulk = resp.json()["job_id"]
    store = Store(server.store_url)
    wait_for(lambda: store.job_counts(bulk)["total"] == 120, 60, "the bulk job to be queued")
    with open(clips["long"], "rb") as fh:
        out = _openai(server).audio.transcriptions.create(model="ichigo", file=fh,
                                                          extra_body={"prompt": "Meeting."})
    counts = store.job_counts(bulk)["files"]
    assert out.text  # answered
    unfinished = sum(counts.get(k, 0) for k in ("pending", "queued", "running"))
    assert unfinished >= 60, counts
    wait_for(lambda: store.get_job(bulk).state == "done", 600, "the bulk job",
             on_timeout=server.worker.tail)


def test_no_worker_and_no_broker_answer_503_fast(tmp_path, codebook_model):
    from fastapi.testclient import TestClient

    from ichigo_common.settings import Settings
    from ichigo_common.store.migrate import upgrade
    from ichigo_common.store.repo import Store
    from producer.app import create_app
    from producer.queue import make_celery

    from .queue_helpers import own_redis_db

    url = sqlite_store_url(tmp_path)
    upgrade(url)
    wav = write_wav(tmp_path / "a.wav", speech_like(1.0, seed=2)).read_bytes()
    with own_redis_db() as empty:  # a broker nobody consumes from
        for broker in (empty.url, "redis://127.0.0.1:1/0"):
            settings = dataclasses.replace(
                Settings.from_env(), database_url=url, broker_url=broker, result_backend=broker,
                allowed_roots=(tmp_path.resolve(), codebook_model.parent.resolve()),
                upload_dir=(tmp_path / "up").resolve(),
                model=str(codebook_model), api_key=None)
            with TestClient(create_app(settings, Store(url), make_celery(settings))) as api:
                for path, kwargs in (
                    ("/v1/audio/transcriptions", {"files": {"file": ("a.wav", wav)}}),
                    ("/s2r", {"files": {"file": ("a.wav", wav)}}),
                    ("/r2t", {"json": {"tokens": "<|sound_start|><|sound_0001|><|sound_end|>"}}),
                ):
                    start = time.perf_counter()
                    resp = api.post(path, **kwargs)
                    took = time.perf_counter() - start
                    assert resp.status_code == 503, (broker, path, resp.text)
                    assert took < 8, (broker, path, took)
                    want = "no worker" if broker == empty.url else "broker unreachable"
                    assert want in resp.json()["detail"]
            assert not (tmp_path / "up").exists() or not list((tmp_path / "up").iterdir())


def test_prompt_and_language_reach_the_decoder(server, clips, local_model):
    """A request's prompt decodes exactly as the in-process pipeline with that prompt; a
    language the (English-only) model cannot take fails with the reason."""
    from ichigo_pipeline.pipeline import BatchPipeline

    prompt = "Minutes of the weekly meeting, with names."
    (want,) = BatchPipeline(local_model, prompt=prompt).run([str(clips["short"])])
    with open(clips["short"], "rb") as fh:
        out = _openai(server).audio.transcriptions.create(model="ichigo", file=fh, prompt=prompt)
    assert out.text == want.text
    resp = httpx.post(f"{server.url}/v1/audio/transcriptions", timeout=300,
                      files={"file": ("sample.wav", clips["short"].read_bytes())},
                      data={"language": "vi"})
    assert resp.status_code == 400, resp.text
    assert "English-only" in resp.json()["detail"]


def test_no_answer_in_time_is_a_504_and_the_job_goes_on(server, clips):
    """With a request timeout shorter than the work, the API answers 504 with the job id;
    the job still finishes, and its upload is kept for the worker meanwhile."""
    from fastapi.testclient import TestClient

    from ichigo_common.settings import Settings
    from ichigo_common.store.repo import Store
    from producer.app import create_app
    from producer.queue import make_celery

    uploads = server.root / "uploads-504"
    settings = dataclasses.replace(
        Settings.from_env(), database_url=server.store_url, broker_url=server.redis_url,
        result_backend=server.redis_url, allowed_roots=(server.root, server.model.parent),
        upload_dir=uploads, model=str(server.model), api_key=None, request_timeout=0.05)
    store = Store(server.store_url)
    with TestClient(create_app(settings, store, make_celery(settings))) as api:
        resp = api.post("/v1/audio/transcriptions", data={"prompt": "a fresh prompt, no reuse"},
                        files={"file": ("long.wav", clips["long"].read_bytes())})
    assert resp.status_code == 504, resp.text
    job_id = resp.json()["job_id"]
    assert f"/v1/jobs/{job_id}" in resp.json()["detail"]
    assert len(list(uploads.iterdir())) == 1  # kept: the worker has yet to read it
    wait_for(lambda: store.get_job(job_id).state == "done", 300, "the timed-out job",
             on_timeout=server.worker.tail)
    assert store.job_counts(job_id)["files"] == {"done": 1}
