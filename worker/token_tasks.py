"""The interactive sound-token tasks behind upstream's ``/s2r`` and ``/r2t``: request/reply
over the result backend, on the interactive queue.

Like a shard, a message carries no trust: the path is re-checked against the readable roots
(allowed roots and the upload folder), the token string is parsed and every id checked
against the model's codebook. A request's own fault comes back as ``{"error", "status"}``
(the API answers with that status); only a worker fault raises.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.exceptions import Reject

from ichigo_common.paths import PathRefused, check_allowed
from ichigo_common.settings import get_settings
from ichigo_common.tasks import R2T, S2R

from .celery_app import app
from .tasks import load_model

log = logging.getLogger(__name__)

MAX_TOKEN_CHARS = 16 * 1024 * 1024  # about 14 hours of audio as a token string


def _refusal(message: str, status: int) -> dict[str, Any]:
    return {"error": message, "status": status}


def _text_arg(value: Any, name: str, limit: int) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise Reject(f"{name} must be a non-empty string of at most {limit} characters",
                     requeue=False)
    return value


def _sound_model(name: str):
    """The loaded model, or a refusal when it has no quantizer (plain Whisper)."""
    model = load_model(name)
    if model.quantizer is None:
        return None, _refusal(f"{name} is a plain Whisper model: it has no sound tokens", 400)
    return model, None


@app.task(name=S2R, acks_late=True)
def speech_to_tokens(path: str, model: str) -> dict[str, Any]:
    """Sound tokens of one audio file (any length: one segment per chunk)."""
    from ichigo_pipeline.pipeline import BatchPipeline

    path, model = _text_arg(path, "path", 4096), _text_arg(model, "model", 500)
    settings = get_settings()
    try:
        checked = check_allowed(path, settings.readable_roots)
    except PathRefused as exc:
        return _refusal(f"refused: {exc}", 403)
    loaded, refusal = _sound_model(model)
    if refusal:
        return refusal
    started = time.perf_counter()
    pipeline = BatchPipeline(loaded, batch_size=settings.batch_size, decode_text=False)
    (result,) = list(pipeline.run([checked]))
    if not result.ok:
        return _refusal(result.error or "cannot read the audio", 400)
    return {
        "model": model,
        "tokens": result.tokens,
        "chunks": len(result.chunks),
        "duration_s": round(result.duration_s, 3),
        "processing_s": round(time.perf_counter() - started, 3),
    }


def _check_ids(chunks: list[list[int]], codebook: int) -> str | None:
    for n, ids in enumerate(chunks, 1):
        if not ids:
            return f"segment {n} holds no sound tokens"
        bad = next((i for i in ids if not 0 <= i < codebook), None)
        if bad is not None:
            return (f"segment {n}: <|sound_{bad:04d}|> is outside this model's codebook "
                    f"(ids 0..{codebook - 1})")
    return None


@app.task(name=R2T, acks_late=True)
def tokens_to_text(tokens: str, model: str) -> dict[str, Any]:
    """Text of a sound-token string (several segments, e.g. from a long file, are decoded
    as separate windows and their texts joined, as a transcript's chunks are)."""
    import torch

    from ichigo_pipeline.sound_tokens import TokenStringError, as_chunks

    tokens, model = _text_arg(tokens, "tokens", MAX_TOKEN_CHARS), _text_arg(model, "model", 500)
    try:
        chunks = as_chunks(tokens)
    except TokenStringError as exc:
        return _refusal(str(exc), 422)
    loaded, refusal = _sound_model(model)
    if refusal:
        return refusal
    problem = _check_ids(chunks, loaded.quantizer.config.codebook_size)
    if problem:
        return _refusal(problem, 422)
    started = time.perf_counter()
    size = get_settings().batch_size
    texts: list[str] = []
    for i in range(0, len(chunks), size):
        batch = [torch.tensor(c, dtype=torch.long) for c in chunks[i : i + size]]
        texts.extend(d.text for d in loaded.decode(loaded.dequantize(batch)))
    return {
        "model": model,
        "text": " ".join(t.strip() for t in texts if t.strip()),
        "chunks": len(chunks),
        "processing_s": round(time.perf_counter() - started, 3),
    }
