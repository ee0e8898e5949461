"""Upstream ichigo 0.0.14's own loop, timed: run inside the oracle overlay by bench/compare.py.

    PYTHONPATH=<overlay> python bench/upstream_timed.py JOB.json OUT.json

JOB: ``{"config", "threads", "items": [{"path"}]}`` (quantizer.pth and whisper.pt beside the
config, as ``ichigo_pipeline.testing.build_tiny_ichigo`` writes them). The model loads, one file
warms up (not timed), then ``IchigoASR.transcribe(path)`` runs on every file, one after the
other, exactly as upstream does (its serial chunk loop, its get_stoks metadata call included).
tests/oracle/run_upstream.py's Recorder collects the sound-token ids of every chunk, so the
comparison can check identical tokens as well as identical text.
"""

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "oracle"))

import run_upstream as oracle  # noqa: E402 - the path above makes it importable


def load(config: Path, threads: int):
    """IchigoASR with the local weights let through, as the oracle runner does."""
    import tempfile

    oracle._prepare_env()
    import ichigo.asr.transcriber as transcriber
    import torch

    transcriber.hf_hub_download = lambda *a, **k: str(config.parent / "quantizer.pth")
    transcriber.torchaudio.load = oracle._load_audio
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        whisper = config.parent / "whisper.pt"
        return transcriber.IchigoASR(config=oracle._local_config(config, whisper, tmp))


def transcribe(asr, recorder, path: str) -> tuple[str, list[int]]:
    recorder.chunks = []
    try:
        text, _ = asr.transcribe(path, output_path=None)
        ids = [i for chunk in recorder.chunks for i in chunk["ids"]]
    finally:
        recorder.chunks = None
    return text, ids


def main() -> int:
    import torch

    job = json.loads(Path(sys.argv[1]).read_text())
    paths = [item["path"] for item in job["items"]]
    start = time.perf_counter()
    asr = load(Path(job["config"]), int(job["threads"]))
    recorder = oracle.Recorder(asr)
    hyps, ids = {}, {}
    with torch.no_grad():
        transcribe(asr, recorder, paths[0])  # warm-up
        timed = time.perf_counter()
        for path in paths:
            hyps[path], ids[path] = transcribe(asr, recorder, path)
        wall = time.perf_counter() - timed
    out = {"hyps": hyps, "ids": ids, "wall_s": wall, "total_s": time.perf_counter() - start}
    Path(sys.argv[2]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
