"""The upstream server's endpoints, served by the queue: ``POST /v1/audio/transcriptions``
(OpenAI-compatible), ``POST /s2r`` (audio -> sound tokens), ``POST /r2t`` (sound tokens ->
text).

One user waits on each: the work goes to the interactive queue, which workers poll before
bulk, and the answer comes back when it is done. An upload is saved into the upload folder
the workers share, probed first (415/400 with the reason before anything is queued) and
removed once answered. A transcription is a one-file job in the store like any other
(visible under ``/v1/jobs``, deduplicated by content); ``/s2r`` and ``/r2t`` are
request/reply tasks. 503 when the broker or every worker is gone, 504 when no answer comes
within ``ICHIGO_REQUEST_TIMEOUT`` (the job id comes with it: the work may still finish).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, HTTPException, UploadFile, status
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from ichigo_common.tasks import R2T, S2R
from ichigo_pipeline.preset_files import preset_names
from ichigo_pipeline.sound_tokens import TokenStringError, parse_token_string

from ..deps import ServicesDep
from ..enqueue import LANGUAGE_PATTERN, InvalidSubmission, submit_job
from ..formats import FORMATS, render
from ..rpc import NoWorker, WorkerTimeout, call, require_worker, wait_for_file
from ..uploads import (
    UndecodableAudio,
    UnsupportedMedia,
    UploadTooLarge,
    discard,
    probe_audio,
    prune_stale,
    save_upload,
)

router = APIRouter(tags=["interactive"])

#: names that mean "the server's default model" (OpenAI clients send ``whisper-1``)
DEFAULT_ALIASES = ("ichigo", "whisper-1")
MAX_TOKEN_CHARS = 16 * 1024 * 1024


def resolve_model(name: str | None, default: str) -> str:
    """A preset name or a ``.yaml`` path (checked against the roots when queued); 400 for
    anything else, before an upload is kept or a worker asked."""
    if not name or name in DEFAULT_ALIASES:
        return default
    if name in preset_names() or name.endswith((".yaml", ".yml")) or name == default:
        return name
    raise HTTPException(status.HTTP_400_BAD_REQUEST,
                        f"unknown model {name!r}: use 'ichigo' (the default, {default}) or one "
                        f"of {', '.join(preset_names())}")


def _unavailable(exc: Exception) -> HTTPException:
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc))


def _saved(services, upload: UploadFile) -> Path:
    """The upload saved and probed; 413/415/400 (and nothing kept) when it cannot be used."""
    settings = services.settings
    prune_stale(settings.upload_dir)
    try:
        path = save_upload(upload.file, upload.filename, settings.upload_dir,
                           settings.max_upload_bytes)
    except UploadTooLarge as exc:
        raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, str(exc)) from exc
    try:
        probe_audio(path)
    except UnsupportedMedia as exc:
        discard(path)
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, str(exc)) from exc
    except UndecodableAudio as exc:
        discard(path)
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from exc
    return path


def _reply(value: dict[str, Any]) -> dict[str, Any]:
    """A worker's reply, or the HTTP error it reports (a request's own fault)."""
    if "error" in value:
        raise HTTPException(int(value.get("status", 400)), value["error"])
    return value


def _ask(services, task: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        require_worker(services.celery)
        return _reply(call(services.celery, task, kwargs, services.settings.request_timeout))
    except (NoWorker, ConnectionError) as exc:  # BrokerUnavailable is a ConnectionError
        raise _unavailable(exc) from exc
    except WorkerTimeout as exc:
        raise HTTPException(status.HTTP_504_GATEWAY_TIMEOUT, str(exc)) from exc
    except RuntimeError as exc:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, str(exc)) from exc


ResponseFormat = Literal[FORMATS]  # json, text, srt, vtt, verbose_json


@router.post("/v1/audio/transcriptions", summary="Transcribe one upload (OpenAI-compatible)",
             responses={200: {"content": {"application/json": {}, "text/plain": {},
                                          "text/vtt": {}, "application/x-subrip": {}}},
                        400: {}, 413: {}, 415: {}, 503: {}, 504: {}})
def create_transcription(
    services: ServicesDep,
    file: Annotated[UploadFile, File(description="the audio")],
    model: Annotated[str, Form(max_length=500)] = "ichigo",
    language: Annotated[str | None, Form(pattern=LANGUAGE_PATTERN)] = None,
    prompt: Annotated[str | None, Form(max_length=4000)] = None,
    response_format: Annotated[ResponseFormat, Form()] = "json",
    temperature: Annotated[float, Form(ge=0.0, le=1.0,
                                       description="accepted; decoding is greedy")] = 0.0,
) -> Response:
    """The upload becomes a one-file job on the interactive queue; the answer is its
    transcript in ``response_format`` (json, text, srt, vtt, verbose_json)."""
    settings = services.settings
    name = resolve_model(model, settings.model)
    try:
        require_worker(services.celery)
    except (NoWorker, ConnectionError) as exc:
        raise _unavailable(exc) from exc
    path = _saved(services, file)
    keep = False
    try:
        job_id = submit_job(services.store, services.celery, settings, paths=[str(path)],
                            model=name, language=language, prompt=prompt or None,
                            output_dir=None, priority=9, interactive=True,
                            name=f"upload {file.filename or path.name}"[:200], source="api")
        try:
            outcome = wait_for_file(services.store, job_id, settings.request_timeout)
        except WorkerTimeout as exc:
            keep = True  # still queued or running: the worker will read it
            return JSONResponse({"detail": f"{exc}; follow it at /v1/jobs/{job_id}",
                                 "job_id": job_id}, status.HTTP_504_GATEWAY_TIMEOUT)
    except ConnectionError as exc:
        raise _unavailable(exc) from exc
    except InvalidSubmission as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from exc
    finally:
        if not keep:
            discard(path)
    if outcome.state != "done" or outcome.text is None:
        raise HTTPException(status.HTTP_400_BAD_REQUEST,
                            f"transcription {outcome.state}: {outcome.error or 'no reason given'}")
    body, media = render(response_format, outcome.text, outcome.chunks or [],
                         outcome.duration_s, language)
    headers = {"X-Ichigo-Job": job_id}
    if isinstance(body, dict):
        return JSONResponse(body, headers=headers)
    return PlainTextResponse(body, media_type=media, headers=headers)


@router.post("/s2r", summary="Audio to sound tokens (upstream's s2r)")
def speech_to_representation(
    services: ServicesDep,
    file: Annotated[UploadFile, File(description="the audio, any length")],
    model: Annotated[str | None, Form(max_length=500)] = None,
) -> dict[str, Any]:
    """``{"model", "tokens"}``: one ``<|sound_start|>...<|sound_end|>`` segment per chunk
    of at most 30 s (one segment for a short clip, as upstream)."""
    name = resolve_model(model, services.settings.model)
    try:
        require_worker(services.celery)
    except (NoWorker, ConnectionError) as exc:
        raise _unavailable(exc) from exc
    path = _saved(services, file)
    try:
        reply = _ask(services, S2R, {"path": str(path), "model": name})
    finally:
        discard(path)
    return {"model": reply["model"], "tokens": reply["tokens"]}


class TokensRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: str = Field(min_length=1, max_length=MAX_TOKEN_CHARS,
                        description="<|sound_start|><|sound_NNNN|>...<|sound_end|>, one or "
                                    "more segments")
    model: str | None = Field(None, max_length=500)


@router.post("/r2t", summary="Sound tokens to text (upstream's r2t)")
def representation_to_text(body: TokensRequest, services: ServicesDep) -> dict[str, Any]:
    """``{"model", "text"}``. A malformed string, an empty segment or an id outside the
    model's codebook is a 422 naming the problem (upstream clips such ids silently)."""
    name = resolve_model(body.model, services.settings.model)
    try:
        parse_token_string(body.tokens)
    except TokenStringError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    reply = _ask(services, R2T, {"tokens": body.tokens, "model": name})
    return {"model": reply["model"], "text": reply["text"]}
