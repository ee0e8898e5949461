"""Splitting long audio exactly as upstream Ichigo does, keeping each chunk's offset.

Audio no longer than ``chunk_s`` is one chunk. Longer audio is cut near every ``chunk_s``
boundary at the quietest 100 ms window (RMS) found within +-``overlap_s`` of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SAMPLE_RATE = 16000
WINDOW = 1600  # 100 ms at 16 kHz


@dataclass(frozen=True)
class ChunkingParams:
    chunk_s: float = 20.0
    overlap_s: float = 1.0

    def as_dict(self) -> dict[str, float]:
        return {"chunk_s": self.chunk_s, "overlap_s": self.overlap_s, "window_s": 0.1}


@dataclass(frozen=True)
class Span:
    """A chunk of one file: samples [start, end) at 16 kHz."""

    start: int
    end: int

    @property
    def offset_s(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        return (self.end - self.start) / SAMPLE_RATE


def _quietest_window(magnitude: np.ndarray, start: int, end: int) -> int:
    """Start index of the 100 ms window with the lowest RMS in ``magnitude[start:end]``.

    Windows start every 100 ms and must end strictly before ``end - 100 ms`` (upstream's
    range), ties go to the earliest.
    """
    if start >= end:
        return start
    segment = magnitude[start:end]
    best_idx, best_energy = None, None
    for i in range(0, len(segment) - WINDOW, WINDOW):
        window = segment[i : i + WINDOW]
        energy = (window**2).mean() ** 0.5
        if best_energy is None or energy < best_energy:
            best_idx, best_energy = i + start, energy
    if best_idx is None:  # cannot happen for the regions split_spans asks about
        return start
    return best_idx


DEFAULT_CHUNKING = ChunkingParams()


def split_spans(wav: torch.Tensor, params: ChunkingParams = DEFAULT_CHUNKING) -> list[Span]:
    """Chunk boundaries of a 1-D 16 kHz waveform."""
    n = int(wav.shape[-1])
    chunk = int(params.chunk_s * SAMPLE_RATE)
    overlap = int(params.overlap_s * SAMPLE_RATE)
    if n <= chunk:
        return [Span(0, n)]
    magnitude = wav.detach().abs().reshape(-1).cpu().numpy().astype(np.float32, copy=False)
    spans = []
    i = 0
    while i < n:
        if i + chunk >= n:
            spans.append(Span(i, n))
            break
        split = _quietest_window(magnitude, i + chunk - overlap, min(i + chunk + overlap, n))
        spans.append(Span(i, split))
        i = split
    return spans
