"""Smoke test of the side-by-side benchmark harness (bench/compare.py): it runs, each system in
its own process, and writes the table with the expected rows. Speeds are never asserted (the
machine is shared); the real comparison is `python bench/compare.py`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.realspeech]


def test_quick_run_writes_the_table(tmp_path, speech_dir):
    pytest.importorskip("faster_whisper")
    out = tmp_path / "compare.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "compare.py"),
            "--quick",
            "--sections",
            "whisper",
            "--models",
            "whisper-tiny.en",
            "--systems",
            "ichigo-batch",
            "faster-whisper int8,",
            "--speech",
            str(speech_dir),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert (
        "| model | system | wall s | audio s / s | RTF | vs reference | peak RSS MB | WER % |"
        in text
    )
    rows = [line for line in text.splitlines() if line.startswith("| whisper-tiny.en |")]
    assert [r.split(" | ")[1] for r in rows] == [
        "ichigo-batch, batch 32",
        "faster-whisper int8, batched 16",
    ]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3]) > 0 and float(cells[6]) > 0  # a speed and a peak RSS were measured
        assert 0 <= float(cells[7]) < 50  # a WER, and a sane one on two clean clips
    assert "commit" in text and "machine:" in text
