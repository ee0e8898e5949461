"""Cross-file batching: chunks from many files run together through every stage.

Files are decoded in background threads (the model never waits for I/O), split into chunks,
pooled, and the pool is sorted by length so each padded batch holds chunks of similar length.
Results are put back together per file from each chunk's metadata alone. A file that cannot
be decoded, or whose chunk makes the model fail, fails alone; the others go on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .audio import SAMPLE_RATE, load_audio
from .chunking import DEFAULT_CHUNKING, ChunkingParams, Span, split_spans
from .model import IchigoModel
from .sound_tokens import format_chunks

log = logging.getLogger(__name__)

# plain Whisper: a chunk whose decoding stopped after a complete segment at least this long
# before the chunk's end is decoded again from there (see BatchPipeline._run_batch)
RESUME_MIN_S = 1.0
RESUME_MIN_PROGRESS_S = 0.5


@dataclass(frozen=True)
class ChunkResult:
    offset_s: float
    duration_s: float
    ids: tuple[int, ...]
    text: str
    language: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "offset_s": round(self.offset_s, 4),
            "duration_s": round(self.duration_s, 4),
            "ids": list(self.ids),
            "text": self.text,
            "language": self.language,
        }


@dataclass(frozen=True)
class FileResult:
    path: str
    text: str
    chunks: tuple[ChunkResult, ...]
    duration_s: float
    processing_s: float
    has_tokens: bool = True
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tokens(self) -> str | None:
        """The sound-token string, one segment per chunk (None for plain Whisper models)."""
        if not self.has_tokens or not self.ok:
            return None
        return format_chunks([c.ids for c in self.chunks])

    @property
    def ids(self) -> list[int]:
        return [i for c in self.chunks for i in c.ids]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "text": self.text if self.ok else None,
            "tokens": self.tokens,
            "chunks": [c.to_json() for c in self.chunks],
            "duration_s": round(self.duration_s, 4),
            "processing_s": round(self.processing_s, 4),
            "error": self.error,
        }


_END = object()  # the end of a path source


class _Feed:
    """Paths read ahead of the model, their audio decoding in background threads."""

    def __init__(self, paths: Iterator, io: ThreadPoolExecutor, target: int):
        self.paths, self.io, self.target = paths, io, target
        self.ahead: deque[tuple[str, Future]] = deque()
        self.ended = False

    def refill(self) -> None:
        while not self.ended and len(self.ahead) < self.target:
            nxt = next(self.paths, _END)
            if nxt is _END:
                self.ended = True
            elif nxt is None:  # nothing yet: asked again after the next batch
                return
            else:
                self.ahead.append((str(nxt), self.io.submit(load_audio, nxt)))


@dataclass
class _FileState:
    path: str
    spans: list[Span]
    duration_s: float
    started: float
    results: dict[int, ChunkResult] = field(default_factory=dict)
    compute_s: float = 0.0
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.error is not None or len(self.results) == len(self.spans)


@dataclass
class _Chunk:
    state: _FileState
    index: int
    wav: torch.Tensor
    resumed: bool = False  # the rest of a chunk decoded again (its audio already counted)

    @property
    def n_samples(self) -> int:
        return int(self.wav.shape[-1])


def _describe(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    return text if len(text) < 500 else text[:497] + "..."


class BatchPipeline:
    """Runs files through an IchigoModel in padded cross-file batches."""

    def __init__(
        self,
        model: IchigoModel,
        batch_size: int = 8,
        chunking: ChunkingParams = DEFAULT_CHUNKING,
        decode_text: bool = True,
        io_threads: int = 2,
        pool_batches: int = 4,
        language: str | None = None,
        prompt: str | None = None,
    ):
        """``language`` / ``prompt`` replace the preset's (None keeps it); an unknown
        language raises ValueError here, before any file is read."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.model = model
        self.decoder = model.decoder_for(language, prompt) if decode_text else None
        self.batch_size = batch_size
        self.chunking = chunking
        self.decode_text = decode_text
        self.io_threads = io_threads
        self.pool_target = batch_size * pool_batches

    # -- the model stages on one batch --------------------------------------------------

    def _infer(
        self, chunks: list[_Chunk]
    ) -> list[tuple[tuple[int, ...], str, str | None, list[int]]]:
        model = self.model
        mel, n_frames = model.features([c.wav for c in chunks])
        embs = model.encode(mel)
        ids: list[tuple[int, ...]] = [()] * len(chunks)
        feats = embs
        if model.quantizer is not None:
            stoks = model.sound_tokens(embs, n_frames)
            ids = [tuple(s.tolist()) for s in stoks]
            if self.decode_text:
                feats = model.dequantize(stoks)
        if not self.decode_text:
            return [(i, "", None, []) for i in ids]
        decoded = self.decoder.decode(feats)
        return [(i, d.text, d.language, d.tokens) for i, d in zip(ids, decoded, strict=True)]

    def _resume_at(self, tokens: list[int], duration_s: float) -> float | None:
        """Plain Whisper only (Ichigo's text stays upstream's): where to decode a chunk again
        when its decoding stopped after a complete segment well before the chunk's end, as
        openai-whisper's transcribe seeks to the last timestamp. Without it a 20 s chunk
        loses the words after the model's last segment (measured: 17 of 338 words of a
        192 s recording)."""
        if self.decoder is None or self.model.quantizer is not None:
            return None
        end = self.decoder.ended_segment_at(tokens)
        if end is None or end < RESUME_MIN_PROGRESS_S or duration_s - end < RESUME_MIN_S:
            return None
        return end

    def _run_batch(self, chunks: list[_Chunk]) -> list[_Chunk]:
        """Run a batch; on failure halve it until the failing chunk is alone, then fail its file.

        Returns the chunks to run next: the rest of chunks whose decoding stopped early
        (``_resume_at``), each a new chunk of its file."""
        start = time.perf_counter()
        try:
            outputs = self._infer(chunks)
        except Exception as exc:  # noqa: BLE001 - any model failure is isolated below
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            if len(chunks) == 1:
                chunk = chunks[0]
                log.warning("chunk %d of %s failed: %s", chunk.index, chunk.state.path, exc)
                chunk.state.error = f"model failed on chunk {chunk.index}: {_describe(exc)}"
                return []
            half = len(chunks) // 2
            log.info("batch of %d failed (%s); retrying in halves", len(chunks), exc)
            return self._run_batch(chunks[:half]) + self._run_batch(chunks[half:])
        elapsed = time.perf_counter() - start
        total = sum(c.n_samples for c in chunks) or 1
        more: list[_Chunk] = []
        for chunk, (ids, text, lang, tokens) in zip(chunks, outputs, strict=True):
            state = chunk.state
            span = state.spans[chunk.index]
            duration_s = span.duration_s
            resume = self._resume_at(tokens, duration_s)
            if resume is not None:
                cut = round(resume * SAMPLE_RATE)
                state.spans.append(Span(span.start + cut, span.end))
                more.append(_Chunk(state, len(state.spans) - 1, chunk.wav[cut:], resumed=True))
                duration_s = cut / SAMPLE_RATE
            state.results[chunk.index] = ChunkResult(span.offset_s, duration_s, ids, text, lang)
            state.compute_s += elapsed * chunk.n_samples / total
        return more

    # -- files in, results out ------------------------------------------------------------

    def _finish(self, state: _FileState) -> FileResult:
        has_tokens = self.model.quantizer is not None
        if state.error is not None:
            return FileResult(
                state.path,
                "",
                (),
                state.duration_s,
                time.perf_counter() - state.started,
                has_tokens,
                state.error,
            )
        chunks = tuple(sorted(state.results.values(), key=lambda c: c.offset_s))
        text = " ".join(c.text.strip() for c in chunks if c.text.strip())
        return FileResult(
            state.path, text, chunks, state.duration_s, state.compute_s, has_tokens, None
        )

    def _start_file(self, path: str, future: Future, pool: list[_Chunk]) -> _FileState | None:
        started = time.perf_counter()
        try:
            wav = future.result()
        except Exception as exc:  # noqa: BLE001 - decoding errors fail this file only
            return _FileState(path, [], 0.0, started, error=_describe(exc))
        spans = split_spans(wav, self.chunking)
        state = _FileState(path, spans, wav.shape[-1] / SAMPLE_RATE, started)
        pool.extend(_Chunk(state, i, wav[s.start : s.end]) for i, s in enumerate(spans))
        return state

    def run(
        self, paths: Iterable[str | Path | None], on_batch: Callable[[float], None] | None = None
    ) -> Iterator[FileResult]:
        """Transcribe files, yielding each result as soon as all its chunks are done.

        ``paths`` is read lazily, as room frees up. A None in it means "nothing more yet":
        the pipeline asks again after its next batch (a source that hands out work only as
        it is needed, e.g. claims in a store); it is allowed only while files are in flight.
        ``on_batch`` receives the audio seconds each batch completed (for progress bars).
        """
        pool: list[_Chunk] = []
        open_files: list[_FileState] = []
        with ThreadPoolExecutor(self.io_threads, thread_name_prefix="ichigo-decode") as io:
            feed = _Feed(iter(paths), io, self.pool_target)
            feed.refill()
            while feed.ahead or pool or not feed.ended:
                if not (feed.ahead or pool):  # the files still open have nothing left to run
                    feed.refill()
                    if not (feed.ahead or feed.ended):
                        raise RuntimeError("the path source said 'nothing yet' with no file "
                                           "in flight")
                while feed.ahead and len(pool) < self.pool_target:
                    path, future = feed.ahead.popleft()
                    state = self._start_file(path, future, pool)
                    if state is not None:
                        open_files.append(state)
                    feed.refill()
                if pool:
                    pool.sort(key=lambda c: c.n_samples, reverse=True)
                    batch, pool[:] = pool[: self.batch_size], pool[self.batch_size :]
                    pool.extend(self._run_batch(batch))
                    if on_batch:
                        on_batch(sum(c.n_samples for c in batch if not c.resumed) / SAMPLE_RATE)
                    failed = {id(c.state) for c in batch if c.state.error}
                    if failed:
                        pool[:] = [c for c in pool if id(c.state) not in failed]
                still_open = []
                for state in open_files:
                    if state.complete:
                        yield self._finish(state)
                    else:
                        still_open.append(state)
                open_files = still_open
                feed.refill()
