"""Uploads to the interactive endpoints: saved into the upload folder the workers share,
bounded in size, and probed with PyAV before anything is queued, so a file no worker could
read is refused at once with the reason (no torch here: PyAV alone)."""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import BinaryIO

import av

COPY_BLOCK = 1 << 20
#: room for the multipart framing and form fields around an upload
FORM_OVERHEAD = 1 << 20
#: an upload left behind by a request that timed out (its job went on) is removed this late
STALE_UPLOAD_S = 24 * 3600
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class UploadTooLarge(ValueError):
    """More bytes than ICHIGO_MAX_UPLOAD_BYTES (HTTP 413)."""


class UnsupportedMedia(ValueError):
    """Not audio: no audio stream, or a container nobody can open (HTTP 415)."""


class UndecodableAudio(ValueError):
    """An audio container whose audio cannot be decoded (HTTP 400)."""


def safe_name(filename: str | None) -> str:
    """A file name that cannot leave its folder or surprise a shell; keeps the suffix, which
    the pipeline and the outputs use."""
    name = Path((filename or "").replace("\\", "/")).name
    stem, suffix = Path(name).stem, Path(name).suffix.lower()
    stem = _UNSAFE.sub("_", stem).strip("._")[:100] or "upload"
    suffix = suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ".bin"
    return stem + suffix


def save_upload(source: BinaryIO, filename: str | None, upload_dir: Path, limit: int) -> Path:
    """Copy an upload into a fresh folder of its own under ``upload_dir``; removes what it
    wrote and raises UploadTooLarge past ``limit`` bytes."""
    folder = upload_dir / uuid.uuid4().hex
    folder.mkdir(parents=True, mode=0o750)
    target = folder / safe_name(filename)
    written = 0
    try:
        with open(target, "wb") as out:
            while block := source.read(COPY_BLOCK):
                written += len(block)
                if written > limit:
                    raise UploadTooLarge(f"upload larger than {limit} bytes")
                out.write(block)
    except BaseException:
        discard(target)
        raise
    return target


def prune_stale(upload_dir: Path, max_age_s: float = STALE_UPLOAD_S) -> int:
    """Remove upload folders older than ``max_age_s`` (those of requests that answered 504
    and left their job running); returns how many. Cheap: one listing of the folder."""
    cutoff = time.time() - max_age_s
    removed = 0
    try:
        entries = list(os.scandir(upload_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
        except OSError:
            continue
    return removed


def discard(path: Path) -> None:
    """Remove an upload and its folder (with the .txt a worker wrote beside it)."""
    shutil.rmtree(path.parent, ignore_errors=True)


def probe_audio(path: Path) -> float:
    """Seconds of audio in ``path`` (0 when the container does not say), after decoding its
    first frames; raises UnsupportedMedia or UndecodableAudio with the reason."""
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as exc:
        raise UnsupportedMedia(f"not an audio file that can be opened: {exc}") from exc
    with container:
        if not container.streams.audio:
            raise UnsupportedMedia("no audio stream in the upload")
        stream = container.streams.audio[0]
        try:
            frames = 0
            for frame in container.decode(stream):
                frames += frame.samples
                if frames >= 16000:
                    break
        except (av.error.FFmpegError, ValueError) as exc:
            raise UndecodableAudio(f"the audio cannot be decoded: {exc}") from exc
        if frames == 0:
            raise UndecodableAudio("the upload holds no audio samples")
        if container.duration:
            return container.duration / av.time_base
        if stream.duration and stream.time_base:
            return float(stream.duration * stream.time_base)
        return 0.0


class BodyLimit:
    """ASGI middleware: a request that announces a body larger than ``limit`` bytes is
    answered 413 at once, before any of it is read (the multipart parser would otherwise
    spool it all to disk first). Bodies without a length are checked while saved."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.limit:
                body = f'{{"detail": "request body larger than {self.limit} bytes"}}'.encode()
                await send({"type": "http.response.start", "status": 413,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
