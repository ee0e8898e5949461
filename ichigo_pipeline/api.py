"""The Python API, shaped like upstream's: ``transcribe``, ``get_stoks``, ``decode_stoks``.

Models are loaded once per (model, device) and kept for later calls.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import torch

from .audio import AUDIO_EXTENSIONS
from .chunking import ChunkingParams
from .model import IchigoModel, ModelSpec
from .outputs import sibling_txt, write_atomic
from .pipeline import BatchPipeline, FileResult
from .sound_tokens import TokenChunk, as_chunks

_models: dict[tuple, IchigoModel] = {}
_lock = threading.Lock()


def get_model(model: str | ModelSpec | None = None, device: str | None = None) -> IchigoModel:
    """The loaded model for ``model`` (preset name or YAML path), loading it on first use."""
    spec = ModelSpec.resolve(model)
    key = (spec.name, device)
    with _lock:
        if key not in _models:
            _models[key] = IchigoModel(spec, device=device)
        return _models[key]


def audio_files(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Audio files of a folder (by suffix), sorted; hidden files are skipped."""
    folder = Path(folder)
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in found
        if p.suffix.lower() in AUDIO_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def expand_inputs(paths: list[str | Path], recursive: bool = False) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend(audio_files(p, recursive) if p.is_dir() else [p])
    return out


def run_files(
    paths: list[Path],
    model: IchigoModel,
    batch_size: int = 8,
    write_txt: bool = True,
    output_dir: str | Path | None = None,
    on_batch=None,
):
    """Transcribe files, writing each sibling ``.txt`` as its result arrives."""
    pipeline = BatchPipeline(model, batch_size=batch_size)
    for result in pipeline.run(paths, on_batch=on_batch):
        if write_txt and result.ok:
            write_atomic(sibling_txt(result.path, output_dir), result.text + "\n")
        yield result


def _metadata(result: FileResult, wall_s: float) -> dict[str, Any]:
    duration = result.duration_s
    return {
        "audio_length": duration,
        "process_time": wall_s,
        "rtf": wall_s / duration if duration > 0 else 0.0,
        "stok_rate": len(result.ids) / duration if duration > 0 else 0.0,
        "tokens": result.tokens,
        "chunks": [c.to_json() for c in result.chunks],
    }


def transcribe(
    path: str | Path,
    model: str | ModelSpec | None = None,
    batch_size: int = 8,
    device: str | None = None,
    write_txt: bool = True,
    output_dir: str | Path | None = None,
):
    """A file -> ``(text, metadata)``; a folder -> ``{filename: text}``.

    Sibling ``<stem>.txt`` files are written atomically unless ``write_txt=False``. In a
    folder a file that fails gets ``"ERROR: <reason>"`` as its value; the others go on.
    A single file that fails raises ``ValueError`` with the reason.
    """
    path = Path(path)
    loaded = get_model(model, device)
    if path.is_dir():
        results = run_files(audio_files(path), loaded, batch_size, write_txt, output_dir)
        return {Path(r.path).name: (r.text if r.ok else f"ERROR: {r.error}") for r in results}
    if not path.exists():
        raise FileNotFoundError(f"Input path does not exist: {path}")
    start = time.perf_counter()
    (result,) = list(run_files([path], loaded, batch_size, write_txt, output_dir))
    if not result.ok:
        raise ValueError(f"{path}: {result.error}")
    return result.text, _metadata(result, time.perf_counter() - start)


def get_stoks(
    path: str | Path, model: str | ModelSpec | None = None, device: str | None = None
) -> list[TokenChunk]:
    """Sound tokens of the whole file, chunk by chunk (each with its offset and duration)."""
    loaded = get_model(model, device)
    pipeline = BatchPipeline(loaded, batch_size=8, decode_text=False)
    (result,) = list(pipeline.run([path]))
    if not result.ok:
        raise ValueError(f"{path}: {result.error}")
    return [TokenChunk(c.ids, c.offset_s, c.duration_s) for c in result.chunks]


def decode_stoks(
    stoks, model: str | ModelSpec | None = None, device: str | None = None, batch_size: int = 8
) -> str:
    """Text of sound tokens: a token string, ids, a ``[1, n]`` tensor or ``get_stoks`` output."""
    loaded = get_model(model, device)
    chunks = as_chunks(stoks)
    texts: list[str] = []
    for i in range(0, len(chunks), batch_size):
        batch = [torch.tensor(c, dtype=torch.long) for c in chunks[i : i + batch_size]]
        texts.extend(d.text for d in loaded.decode(loaded.dequantize(batch)))
    return " ".join(t.strip() for t in texts if t.strip())


__all__ = ["transcribe", "get_stoks", "decode_stoks", "get_model", "ChunkingParams"]
