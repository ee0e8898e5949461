"""Audio seconds per wall second: upstream ichigo 0.0.14's serial loop vs this pipeline at
several batch sizes, same weights, same audio, one sitting.

Weights: a small random Ichigo model in upstream's formats (no real Ichigo weights offline),
width 128 by default; ``--width 1024`` gives a medium-sized quantizer/encoder width.
Audio: real speech from ../shared/speech plus a ~2 minute concatenation (chunking exercised).
The random decoder runs to the 224-token limit on every chunk, the worst case for decoding.

    python bench/batch_sizes.py [--batch-sizes 1 4 8 16] [--files 12]

Prints a markdown table and writes it to bench/results/batch-sizes-<date>.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def corpus(speech: Path, n_files: int, out: Path) -> list[Path]:
    import numpy as np
    import soundfile as sf

    from ichigo_pipeline.audio import load_audio

    rows = [line.split("\t") for line in (speech / "manifest.tsv").read_text().splitlines()[1:]]
    files = [speech / r[0] for r in rows if r[3] == "en"][:n_files]
    wavs = [load_audio(f).numpy() for f in files]
    long = np.clip(np.concatenate(wavs), -1, 1 - 2**-15)
    sf.write(str(out / "long.wav"), long, 16000, subtype="PCM_16")
    return files + [out / "long.wav"]


def run_upstream(oracle: Path, config: Path, audio: list[Path], out: Path):
    from tests.oracle.client import run_oracle

    start = time.perf_counter()
    data = run_oracle(oracle, config, audio, out, threads=os.cpu_count() or 1, timeout=3600)
    return time.perf_counter() - start, data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--speech", type=Path, default=REPO.parent / "shared" / "speech")
    parser.add_argument("--skip-upstream", action="store_true")
    args = parser.parse_args()

    from ichigo_pipeline.audio import load_audio
    from ichigo_pipeline.model import IchigoModel, ModelSpec
    from ichigo_pipeline.pipeline import BatchPipeline
    from ichigo_pipeline.testing import build_tiny_ichigo
    from ichigo_pipeline.tokenizer import ranks_from_tiktoken_file
    from tests.oracle.client import setup_oracle

    oracle = setup_oracle()
    tmp = Path(tempfile.mkdtemp(prefix="ichigo-bench-"))
    ranks = ranks_from_tiktoken_file(oracle / "whisper/assets/multilingual.tiktoken")
    preset = ModelSpec.resolve("ichigo-asr-2501-en").raw["r2t"]["decoding_options"]
    config = build_tiny_ichigo(tmp / "model", ranks, decoding_options=preset)
    audio = corpus(args.speech, args.files, tmp)
    audio_s = sum(load_audio(p).shape[-1] for p in audio) / 16000

    rows = []
    upstream_rate = None
    upstream_texts = None
    if not args.skip_upstream:
        wall, data = run_upstream(oracle, config, audio, tmp / "oracle.json")
        upstream_rate = audio_s / wall
        upstream_texts = {f["path"]: f["text"] for f in data["files"]}
        rows.append(("upstream ichigo 0.0.14 (serial chunks)", wall, upstream_rate, "reference"))

    model = IchigoModel(ModelSpec.resolve(str(config)), device="cpu")
    for bs in args.batch_sizes:
        start = time.perf_counter()
        results = list(BatchPipeline(model, batch_size=bs).run(audio))
        wall = time.perf_counter() - start
        same = "n/a"
        if upstream_texts is not None:
            n_same = sum(r.text == upstream_texts[r.path] for r in results)
            same = f"{n_same}/{len(results)} files identical text"
        rows.append((f"ichigo-batch, batch {bs}", wall, audio_s / wall, same))

    from wer import machine_info

    info = machine_info()
    machine = ", ".join(f"{k} {v}" for k, v in info.items() if k in ("cpu", "cores", "torch"))
    head = (
        f"# Batch-size benchmark ({dt.date.today()})\n\n"
        f"Machine: {machine}  \nCommit: {info['commit']}  \n"
        f"Corpus: {len(audio)} files, {audio_s:.1f} s of real speech "
        f"(one ~{audio_s / 2:.0f} s concatenation).  \n"
        "Model: random tiny Ichigo (Whisper width 128, 2+2 layers, 2501-en prompt; "
        "decoder in float16 as upstream).\n\n"
    )
    table = ["| pipeline | wall s | audio s / s | vs upstream | parity |", "|---|---|---|---|---|"]
    for name, wall, rate, same in rows:
        ratio = f"{rate / upstream_rate:.2f}x" if upstream_rate else "n/a"
        table.append(f"| {name} | {wall:.1f} | {rate:.2f} | {ratio} | {same} |")
    text = head + "\n".join(table) + "\n"
    print(text)
    out = REPO / "bench" / "results" / f"batch-sizes-{dt.date.today()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
