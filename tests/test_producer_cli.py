"""``ichigo submit | jobs | api`` through the real ``ichigo`` entry point: in-process on the
store and broker from ``ICHIGO_*`` settings, and over HTTP to a live uvicorn server."""

from __future__ import annotations

import dataclasses
import math
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from ichigo_common.cli import main
from ichigo_common.settings import get_settings
from ichigo_common.store.repo import Store
from producer.app import create_app
from producer.queue import make_celery
from tests.test_producer import (  # noqa: F401 - *_fixture: fixtures
    REDIS_URL,
    Env,
    _finish,
    audio_files,
    broker_fixture,
    env_fixture,
    redis_client_fixture,
)

API_KEY = "cli-test-key-0123456789"


@pytest.fixture
def cli_env(env: Env, monkeypatch) -> Iterator[Env]:
    """``env``'s store, broker and root as the command line's ``ICHIGO_*`` settings."""
    for name, value in {"ICHIGO_DATABASE_URL": env.settings.database_url,
                        "ICHIGO_BROKER_URL": REDIS_URL, "ICHIGO_RESULT_BACKEND": REDIS_URL,
                        "ICHIGO_ALLOWED_ROOTS": str(env.root), "ICHIGO_SHARD_FILES": "4"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ICHIGO_API_URL", raising=False)
    monkeypatch.delenv("ICHIGO_API_KEY", raising=False)
    get_settings.cache_clear()
    yield env
    get_settings.cache_clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_api(cli_env: Env) -> Iterator[str]:
    """A real uvicorn server for ``cli_env`` (API key required) in a thread."""
    settings = dataclasses.replace(cli_env.settings, api_key=API_KEY)
    app = create_app(settings, cli_env.store, make_celery(settings))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _emulate_worker(store: Store, stop: threading.Event) -> None:
    """What workers write, through the real store: claim queued files, record a transcript,
    close the job when nothing is open."""
    while not stop.is_set():
        for job in store.list_jobs():
            queued = [f.id for f, _ in store.list_files(job.id, state="queued")]
            if queued:
                claimed, _ = store.claim(queued, "emulated-worker", 60, 3)
                for claim in claimed:
                    _finish(store, claim.id, f"text {claim.id}", 2.0)
                store.finish_job_if_complete(job.id)
        stop.wait(0.05)


@pytest.mark.queue
def test_submit_in_process_then_follow_with_jobs(cli_env, capsys, monkeypatch):
    audio_files(cli_env.root / "talks", 5)
    monkeypatch.chdir(cli_env.root)
    assert main(["submit", "talks", "--language", "en", "--name", "cli job"]) == 0  # relative
    out = capsys.readouterr()
    job_id = out.out.strip()
    assert f"job {job_id}: 5 files so far, queued" in out.err
    job = cli_env.store.get_job(job_id)
    assert job.source == "cli" and job.options["language"] == "en" and job.name == "cli job"
    messages = cli_env.messages()
    assert len(messages) == math.ceil(5 / 4)
    assert sorted(f for m in messages for f in m["kwargs"]["file_ids"]) == cli_env.file_ids(job_id)

    assert main(["jobs"]) == 0
    table = capsys.readouterr().out
    assert job_id in table and "queued" in table and "0/5" in table and "cli job" in table
    assert main(["jobs", job_id]) == 0
    detail = capsys.readouterr().out
    assert "queued 5" in detail and "state    queued" in detail
    assert main(["jobs", job_id, "--files", "queued"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5
    assert main(["jobs", job_id, "--cancel"]) == 0
    out = capsys.readouterr()
    assert "cancelled 5 files" in out.err and "state    cancelled" in out.out
    assert main(["jobs", "0" * 32]) == 2
    assert "no job" in capsys.readouterr().err


@pytest.mark.queue
def test_submit_in_process_refuses_outside_paths(cli_env, capsys):
    (cli_env.outside / "a.wav").write_bytes(b"x")
    assert main(["submit", str(cli_env.outside / "a.wav")]) == 2
    assert "outside the allowed roots" in capsys.readouterr().err
    assert main(["submit", "--glob", f"{cli_env.root}/%2e%2e/outside/*.wav"]) == 2
    assert main(["submit"]) == 2
    assert cli_env.job_ids() == [] and cli_env.messages() == []


@pytest.mark.queue
def test_submit_over_the_api_and_wait(cli_env, live_api, capsys, monkeypatch):
    audio_files(cli_env.root / "w", 5)
    monkeypatch.setenv("ICHIGO_API_URL", live_api)
    monkeypatch.setenv("ICHIGO_API_KEY", API_KEY)
    get_settings.cache_clear()
    stop = threading.Event()
    worker = threading.Thread(target=_emulate_worker, args=(cli_env.store, stop), daemon=True)
    worker.start()
    try:
        code = main(["submit", str(cli_env.root / "w"), "--wait", "--poll", "0.1", "--force"])
    finally:
        stop.set()
        worker.join(timeout=10)
    out = capsys.readouterr()
    assert code == 0, out.err
    job_id = out.out.strip()
    assert f"job {job_id}: done | files: 5 (5 done, 0 failed, 0 cancelled)" in out.err
    job = cli_env.store.get_job(job_id)
    assert job.source == "api" and job.options["force"] is True and job.state == "done"

    assert main(["jobs", job_id]) == 0
    assert "done 5" in capsys.readouterr().out
    assert main(["jobs", job_id, "--files", "done", "--json"]) == 0
    assert '"text": "text ' in capsys.readouterr().out


@pytest.mark.queue
def test_api_errors_become_exit_statuses(cli_env, live_api, capsys, monkeypatch):
    audio_files(cli_env.root / "e", 1)
    monkeypatch.setenv("ICHIGO_API_KEY", "x" * len(API_KEY))
    get_settings.cache_clear()
    assert main(["submit", str(cli_env.root / "e"), "--api", live_api]) == 2
    assert "401" in capsys.readouterr().err
    monkeypatch.setenv("ICHIGO_API_KEY", API_KEY)
    get_settings.cache_clear()
    assert main(["submit", str(cli_env.outside), "--api", live_api]) == 2
    assert "403: " in capsys.readouterr().err
    assert main(["jobs", "--api", "http://127.0.0.1:1"]) == 1
    assert "cannot reach the API" in capsys.readouterr().err
    assert cli_env.job_ids() == []


def test_api_command_refuses_a_database_not_at_head(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ICHIGO_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    get_settings.cache_clear()
    try:
        assert main(["api", "--port", str(_free_port())]) == 2
    finally:
        get_settings.cache_clear()
    assert "ichigo db upgrade" in capsys.readouterr().err
