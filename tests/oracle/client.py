"""Running the upstream oracle from tests and benchmarks (torch-free helpers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def setup_oracle(python: str = sys.executable) -> Path:
    """The overlay directory holding upstream ichigo 0.0.14 and its pinned dependencies."""
    proc = subprocess.run(["bash", str(HERE / "setup_oracle.sh"), python],
                          capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"oracle setup failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def run_oracle(oracle_dir: Path, config: Path, audio: list[Path], out: Path,
               threads: int = 2, timeout: float = 1500) -> dict:
    """Upstream's own loop on ``audio`` with the model of ``config`` (quantizer.pth and
    whisper.pt beside it, as ``ichigo_pipeline.testing`` writes them); the runner's JSON."""
    env = dict(os.environ, PYTHONPATH=str(oracle_dir), ORACLE_THREADS=str(threads))
    proc = subprocess.run(
        [sys.executable, str(HERE / "run_upstream.py"), "--config", str(config),
         "--quantizer", str(config.parent / "quantizer.pth"),
         "--whisper", str(config.parent / "whisper.pt"), "--out", str(out), *map(str, audio)],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"upstream oracle failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())
