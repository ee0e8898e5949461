"""Security: checkpoints are loaded as weights only (a malicious pickle runs nothing), and the
REST API fuzzed against its own OpenAPI schema (schemathesis) never answers 500, with a real
worker, Redis and SQLite store behind it.

Elsewhere: path traversal in every form (tests/test_producer.py, 403 and nothing stored), a
pickled message refused by the worker (tests/test_worker.py), the API key on every endpoint
(tests/test_producer_ops.py; compared with hmac.compare_digest)."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import uuid
from pathlib import Path

import pytest

from .conftest import english_ranks
from .queue_helpers import (  # noqa: F401 - fixtures
    WorkerProcess,
    own_redis_db,
    queue_model,
    running_workers,
    sqlite_store_url,
    worker_env,
)


class _Payload:
    """Unpickling this runs ``os.system`` (the classic malicious-checkpoint trick)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _poison(path: Path, marker: Path) -> None:
    """Overwrite a checkpoint with a torch-loadable file whose pickle runs a command."""
    import torch

    torch.save({"state_dict": _Payload(marker)}, path, pickle_protocol=2)
    assert path.stat().st_size > 0


@pytest.mark.parametrize("which", ["quantizer.pth", "whisper.pt"])
def test_a_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path, which):
    import yaml

    from ichigo_pipeline.model import IchigoModel, ModelSpec
    from ichigo_pipeline.testing import TinyDims, build_tiny_ichigo

    config = build_tiny_ichigo(tmp_path / "model", english_ranks(), TinyDims(n_vocab=51864))
    if which == "whisper.pt":  # load the openai-format .pt instead of the HF folder
        cfg = yaml.safe_load(config.read_text())
        cfg["whisper_name"] = "whisper.pt"
        config.write_text(yaml.safe_dump(cfg))
        shutil.rmtree(tmp_path / "model" / "whisper-hf")
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    _poison(tmp_path / "model" / which, marker)
    with pytest.raises((pickle.UnpicklingError, ValueError), match="Weights only load failed"):
        IchigoModel(ModelSpec.resolve(str(config)), device="cpu")
    assert not marker.exists()


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory, queue_model):  # noqa: F811 - the fixture
    from ichigo_common.settings import Settings
    from ichigo_common.store.migrate import upgrade
    from ichigo_common.store.repo import Store
    from producer.app import create_app
    from producer.queue import make_celery

    from .queue_helpers import make_clips

    root = tmp_path_factory.mktemp("fuzz")
    make_clips(root / "audio", 3, seed=11)
    url = sqlite_store_url(root)
    upgrade(url)
    with own_redis_db() as redis:
        env = worker_env(redis_url=redis.url, database_url=url, roots=[root, queue_model.parent],
                         ICHIGO_UPLOAD_DIR=str(root / "uploads"), ICHIGO_MODEL=str(queue_model))
        settings = dataclasses.replace(
            Settings.from_env(), database_url=url, broker_url=redis.url,
            result_backend=redis.url, allowed_roots=(root.resolve(),), model=str(queue_model),
            upload_dir=(root / "uploads").resolve(), api_key=None, request_timeout=60.0,
            max_upload_bytes=2 * 1024 * 1024)
        worker = WorkerProcess("fuzz", env, root / "worker.log", queues="interactive,bulk")
        with running_workers(worker):
            yield create_app(settings, Store(url), make_celery(settings))


@pytest.mark.queue
@pytest.mark.slow
def test_fuzzed_requests_never_get_a_server_error(fuzz_app):
    """Every operation of the OpenAPI schema, 30 generated requests each (derandomized:
    the same cases every run), answered without a 5xx other than the documented 503/504."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    seen: dict[str, dict[int, int]] = {}

    def fuzz(operation) -> None:
        label = f"{operation.method.upper()} {operation.path}"

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            response = case.call()
            codes = seen.setdefault(label, {})
            codes[response.status_code] = codes.get(response.status_code, 0) + 1
            if response.status_code in (503, 504):
                return  # documented: no broker / no answer in time, never a crash
            case.validate_response(response, checks=[not_a_server_error])

        run()

    for operation in operations:
        fuzz(operation)
    print("status codes per operation:", seen)
    assert all(code < 500 or code in (503, 504) for codes in seen.values() for code in codes)
