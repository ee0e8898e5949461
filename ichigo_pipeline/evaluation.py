"""Scoring transcripts: Whisper's English text normalizer and word error rate."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def english_normalizer():
    """Whisper's English normalizer (transformers' port), with openai-whisper's spelling map
    when that package is installed (read as a file: importing whisper pulls in numba)."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    mapping = {}
    spec = importlib.util.find_spec("whisper")
    if spec and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "normalizers" / "english.json"
        if path.exists():
            mapping = json.loads(path.read_text())
    return EnglishTextNormalizer(mapping)


def wer(refs: list[str], hyps: list[str], normalize=None) -> float:
    """Pooled word error rate in percent (jiwer), after ``normalize`` if given."""
    import jiwer

    if normalize is not None:
        refs, hyps = [normalize(r) for r in refs], [normalize(h) for h in hyps]
    return 100.0 * jiwer.wer(refs, hyps)
