"""Audio decoding edge of the pipeline: file on disk -> float32 tensor.

Everything is decoded with PyAV (FFmpeg). Sample values are converted with
numpy per sample format, never through FFmpeg's resampler, so PCM inputs come
out bit-for-bit equal to what soundfile / torchaudio return as float32:

* ``u8``  -> (x - 128) / 128
* ``s16`` -> x / 2**15
* ``s32`` -> x / 2**31 (24-bit FLAC/WAV arrive left-aligned in s32, so this is x24 / 2**23)
* ``flt`` / ``dbl`` -> unchanged (``dbl`` is cast to float32)

Planar (``...p``) and packed (interleaved) layouts are both handled.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import av
import numpy as np
import torch
import torchaudio

from ichigo_common.audio_types import AUDIO_EXTENSIONS  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000

# packed sample-format name -> (offset, scale): value = (x - offset) * scale
_INT_FORMATS: dict[str, tuple[float, float]] = {
    "u8": (128.0, 1.0 / 128),
    "s16": (0.0, 1.0 / 2**15),
    "s32": (0.0, 1.0 / 2**31),
}
_FLOAT_FORMATS = frozenset({"flt", "dbl"})


class AudioError(Exception):
    """An input file could not be turned into audio.

    ``reason`` is a short human explanation; ``path`` (if known) names the file.
    ``str(err)`` is ``"<path>: <reason>"``. Args are kept as ``(reason, path)``
    so the exception pickles cleanly (e.g. across Celery workers).
    """

    def __init__(self, reason: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(reason, None if path is None else str(path))
        self.reason = reason
        self.path = None if path is None else str(path)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


def _frame_to_array(frame: av.AudioFrame) -> np.ndarray:
    """Convert one decoded frame to float32 of shape [channels, frame.samples]."""
    fmt = frame.format
    base = fmt.packed.name
    channels = frame.layout.nb_channels
    arr = frame.to_ndarray()  # planar: [C, n]; packed: [1, n * C] interleaved
    arr = arr.reshape(channels, -1) if fmt.is_planar else arr.reshape(-1, channels).T
    if base in _FLOAT_FORMATS:
        return arr.astype(np.float32, copy=False)
    if base in _INT_FORMATS:
        offset, scale = _INT_FORMATS[base]
        out = arr.astype(np.float32)
        if offset:
            out -= np.float32(offset)
        out *= np.float32(scale)  # power of two: exact
        return out
    raise ValueError(f"unsupported sample format {fmt.name!r}")


def _check_file(path: Path) -> None:
    """Raise AudioError for paths that cannot be a readable, non-empty file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise AudioError("file not found", path) from None
    except PermissionError:
        raise AudioError("permission denied", path) from None
    except OSError as exc:
        raise AudioError(f"cannot stat: {exc.strerror or exc}", path) from None
    if not stat.S_ISREG(st.st_mode):
        raise AudioError("not a file", path)
    if st.st_size == 0:
        raise AudioError("empty file (0 bytes)", path)


def _ffmpeg_reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), mode="r", metadata_errors="ignore")
    except PermissionError:
        raise AudioError("permission denied", path) from None
    except FileNotFoundError:
        raise AudioError("file not found", path) from None
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise AudioError(f"could not decode: {_ffmpeg_reason(exc)}", path) from None


def _decode_frames(
    container: av.container.InputContainer, path: Path
) -> tuple[list[np.ndarray], int]:
    """Decode the first audio stream to a list of float32 [C, n] chunks and the rate."""
    if not container.streams.audio:
        raise AudioError("no audio stream", path)
    chunks: list[np.ndarray] = []
    rate = channels = 0
    try:
        for frame in container.decode(container.streams.audio[0]):
            if frame.samples == 0:
                continue
            shape = (frame.sample_rate, frame.layout.nb_channels)
            if not chunks:
                rate, channels = shape
            elif shape != (rate, channels):
                raise AudioError(
                    f"stream changes format mid-way ({rate} Hz x{channels} -> "
                    f"{shape[0]} Hz x{shape[1]})",
                    path,
                )
            try:
                chunks.append(_frame_to_array(frame))
            except ValueError as exc:
                raise AudioError(str(exc), path) from None
    except (av.error.FFmpegError, EOFError) as exc:
        if not chunks:
            raise AudioError(f"could not decode: {_ffmpeg_reason(exc)}", path) from None
        kept = sum(c.shape[1] for c in chunks) / rate
        logger.warning(
            "%s: decoding stopped early (%s); keeping the %.3f s decoded before the error",
            path,
            _ffmpeg_reason(exc),
            kept,
        )
    return chunks, rate


def decode_audio(path: str | os.PathLike[str]) -> tuple[torch.Tensor, int]:
    """Decode every frame of the first audio stream of ``path``.

    Returns ``(wav, sample_rate)`` where ``wav`` is float32 of shape
    ``[channels, samples]`` at the file's original rate and channel count.

    If the stream becomes undecodable part-way (corrupt packet, truncated
    file), decoding stops there: with nothing decoded yet it raises
    AudioError("could not decode: ..."), otherwise the audio decoded so far is
    returned and a warning is logged. (Some demuxers, e.g. FLAC's, resync past
    corrupt bytes on their own, so the gap is then silently skipped.) Raises
    AudioError as well for missing, unreadable, empty or non-regular files,
    files without an audio stream, streams that change rate/channel count
    mid-way, zero decoded samples, and NaN/infinite sample values.
    """
    path = Path(path)
    _check_file(path)
    with _open(path) as container:
        chunks, rate = _decode_frames(container, path)
    if not chunks:
        raise AudioError("no audio samples", path)
    wav = torch.from_numpy(np.concatenate(chunks, axis=1))
    if not bool(torch.isfinite(wav).all()):
        raise AudioError("audio contains NaN or infinite samples", path)
    return wav, rate


def load_audio(path: str | os.PathLike[str], sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Decode ``path`` to 1-D float32 mono at ``sample_rate``; shape ``[samples]``.

    Channels are averaged first (``wav.mean(0)``), then the mono signal is
    resampled with ``torchaudio.functional.resample`` (default arguments) if
    the rate differs -- the same order as upstream Ichigo. Raises AudioError
    (see :func:`decode_audio`).
    """
    wav, orig_sr = decode_audio(path)
    mono = wav.mean(0)
    if orig_sr != sample_rate:
        mono = torchaudio.functional.resample(mono, orig_sr, sample_rate)
    if mono.numel() == 0:
        raise AudioError("no audio samples", path)
    return mono


def probe_duration(path: str | os.PathLike[str]) -> float | None:
    """Duration in seconds from the container header, without decoding; None if unknown."""
    try:
        with av.open(str(path), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            if container.duration is not None:
                return container.duration / 1_000_000
    except (av.error.FFmpegError, OSError, UnicodeDecodeError, ValueError):
        return None
    return None
