"""One ASR system on one corpus, in a process of its own (started by bench/compare.py).

    python bench/systems.py JOB.json OUT.json

JOB: ``{"system", "model", "threads", "items": [{"path", ...}], "options": {...}}``. Every
system loads its model, warms up on the first item (not timed), then transcribes all items
once; OUT gets ``{"hyps": {path: text}, "ids": {path: [...]}, "wall_s", "load_s"}``. Peers get
waveforms decoded before the clock starts; ours decodes its files inside the timed run (its
decoding threads are part of the pipeline), which counts against ours.

Systems:
- ``ours``: ichigo_pipeline.BatchPipeline (options: batch_size; env ICHIGO_INT8_LINEAR);
- ``faster-whisper``: WhisperModel.transcribe one file at a time, or with ``batched``
  BatchedInferencePipeline (its default Silero VAD chunking); options compute_type, batch_size;
- ``openai-whisper``: whisper.transcribe one file at a time, float32, on the same weights;
- ``transformers``: pipeline("automatic-speech-recognition", batch_size=N, chunk_length_s=30).

All decode greedily (beam 1, temperature 0, no fallback, no previous-text conditioning) with the
preset's language (tiny.en: English; base: detected).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def _waveforms(paths: list[str]) -> dict:
    from ichigo_pipeline.audio import load_audio

    return {p: load_audio(p).numpy() for p in paths}


def _spec(model: str):
    from ichigo_pipeline.model import ModelSpec

    return ModelSpec.resolve(model)


def run_ours(model: str, paths: list[str], options: dict) -> dict:
    """Our pipeline; with an Ichigo model the sound-token ids per file come back too."""
    from ichigo_pipeline.model import IchigoModel
    from ichigo_pipeline.pipeline import BatchPipeline

    loaded = IchigoModel(_spec(model), device="cpu")
    pipeline = BatchPipeline(loaded, batch_size=int(options.get("batch_size", 16)))
    list(pipeline.run(paths[:1]))  # warm-up
    start = time.perf_counter()
    results = list(pipeline.run(paths))
    wall = time.perf_counter() - start
    hyps = {r.path: r.text if r.ok else "" for r in results}
    ids = {r.path: r.ids for r in results} if loaded.quantizer is not None else {}
    return {"hyps": hyps, "ids": ids, "wall_s": wall}


def _fw_model(model: str, compute_type: str, threads: int):
    import tempfile

    from faster_whisper import WhisperModel
    from wer import _ct2_dir

    folder = _ct2_dir(_spec(model).whisper_name, Path(tempfile.mkdtemp(prefix="fw-")))
    return WhisperModel(str(folder), device="cpu", compute_type=compute_type, cpu_threads=threads)


def run_faster_whisper(model: str, paths: list[str], options: dict, threads: int) -> dict:
    from faster_whisper import BatchedInferencePipeline

    fw = _fw_model(model, options.get("compute_type", "int8"), threads)
    language = _spec(model).decoding.language
    batched = options.get("batched", False)
    engine = BatchedInferencePipeline(fw) if batched else fw
    kwargs = {"beam_size": 1, "temperature": 0.0, "language": language}
    if batched:
        kwargs["batch_size"] = int(options.get("batch_size", 16))
    else:
        kwargs.update(condition_on_previous_text=False, vad_filter=False)
    audio = _waveforms(paths)

    def one(path: str) -> str:
        segments, _ = engine.transcribe(audio[path], **kwargs)
        return " ".join(s.text.strip() for s in segments).strip()

    one(paths[0])
    start = time.perf_counter()
    hyps = {p: one(p) for p in paths}
    return {"hyps": hyps, "wall_s": time.perf_counter() - start}


def run_openai_whisper(model: str, paths: list[str]) -> dict:
    import whisper
    from wer import openai_whisper_model

    ow = openai_whisper_model(model)
    language = _spec(model).decoding.language
    audio = _waveforms(paths)

    def one(path: str) -> str:
        out = whisper.transcribe(
            ow,
            audio[path],
            language=language,
            temperature=0.0,
            beam_size=None,
            best_of=None,
            condition_on_previous_text=False,
            fp16=False,
            verbose=None,
        )
        return out["text"].strip()

    one(paths[0])
    start = time.perf_counter()
    hyps = {p: one(p) for p in paths}
    return {"hyps": hyps, "wall_s": time.perf_counter() - start}


def run_transformers(model: str, paths: list[str], options: dict) -> dict:
    import torch
    from transformers import pipeline

    from ichigo_pipeline.offline_models import offline_whisper

    spec = _spec(model)
    folder = offline_whisper(spec.whisper_name)
    batch = int(options.get("batch_size", 16))
    asr = pipeline(
        "automatic-speech-recognition",
        model=str(folder),
        device="cpu",
        dtype=torch.float32,
        chunk_length_s=30,
        batch_size=batch,
    )
    gen = {"max_new_tokens": 224, "num_beams": 1, "do_sample": False}
    if spec.decoding.language and not spec.whisper_name.endswith(".en"):
        gen["language"] = spec.decoding.language  # English-only models refuse a language
    audio = _waveforms(paths)

    def inputs(some: list[str]) -> list[dict]:  # fresh dicts: the pipeline pops "raw"
        return [{"raw": audio[p], "sampling_rate": 16000} for p in some]

    asr(inputs(paths[:1]), generate_kwargs=gen)
    start = time.perf_counter()
    outs = asr(inputs(paths), generate_kwargs=gen, batch_size=batch)
    wall = time.perf_counter() - start
    return {
        "hyps": {p: o["text"].strip() for p, o in zip(paths, outs, strict=True)},
        "wall_s": wall,
    }


def run(job: dict) -> dict:
    import torch

    threads = int(job.get("threads", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    paths = [item["path"] for item in job["items"]]
    system, model, options = job["system"], job["model"], job.get("options", {})
    started = time.perf_counter()
    if system == "ours":
        out = run_ours(model, paths, options)
    elif system == "faster-whisper":
        out = run_faster_whisper(model, paths, options, threads)
    elif system == "openai-whisper":
        out = run_openai_whisper(model, paths)
    elif system == "transformers":
        out = run_transformers(model, paths, options)
    else:
        raise ValueError(f"unknown system {system!r}")
    out["total_s"] = time.perf_counter() - started
    return out


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    job = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(run(job)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
