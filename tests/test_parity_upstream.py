"""Parity with upstream ichigo==0.0.14 as the oracle (run in its own overlay environment).

One small Whisper (random weights) is written both as a Hugging Face directory (what this
pipeline loads) and as an openai-whisper .pt (what upstream loads), with one random quantizer in
upstream's checkpoint format. Upstream's own per-chunk loop and this batched pipeline run on the
same real speech (several lengths, > 20 s included): every chunk's boundaries and sound-token ids
must be identical, the de-quantized embeddings equal to float precision, and the texts identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ichigo_pipeline.model import IchigoModel, ModelSpec
from ichigo_pipeline.pipeline import BatchPipeline
from ichigo_pipeline.tokenizer import ranks_from_tiktoken_file

from .conftest import read_manifest
from .oracle.client import run_oracle, setup_oracle

pytestmark = [pytest.mark.oracle, pytest.mark.slow]


@pytest.fixture(scope="module")
def oracle_dir() -> Path:
    return setup_oracle()


@pytest.fixture(scope="module")
def parity_audio(tmp_path_factory, speech_dir) -> list[Path]:
    """Real speech: two short clips as they are, a 22.05 kHz clip, the 44.1 kHz stereo JFK clip,
    and 16-bit concatenations of ~30 s and ~55 s (two and three chunks)."""
    import soundfile as sf

    from ichigo_pipeline.audio import load_audio

    folder = tmp_path_factory.mktemp("parity-audio")
    rows = [r for r in read_manifest(speech_dir) if r["language"] == "en"]
    pick = lambda prefix: [speech_dir / r["file"] for r in rows if r["file"].startswith(prefix)]  # noqa: E731
    paths = pick("en_ls")[:2] + pick("en_lj")[:1] + pick("en_jfk")[:1]
    clips = [load_audio(p).numpy() for p in pick("en_ls") + pick("en_lv")]
    for name, seconds in (("cat30.wav", 30), ("cat55.wav", 55)):
        data, total = [], 0.0
        for clip in clips:
            data.append(clip)
            total += len(clip) / 16000
            if total >= seconds:
                break
        pcm = np.clip(np.concatenate(data), -1, 1 - 2**-15)
        sf.write(str(folder / name), pcm, 16000, subtype="PCM_16")
        paths.append(folder / name)
    return paths


def _tiny_model(folder: Path, oracle_dir: Path, options: dict) -> Path:
    from ichigo_pipeline.testing import build_tiny_ichigo

    ranks = ranks_from_tiktoken_file(oracle_dir / "whisper/assets/multilingual.tiktoken")
    return build_tiny_ichigo(folder, ranks, decoding_options=options)


def _run_oracle(oracle_dir: Path, config: Path, audio: list[Path], out: Path) -> dict:
    data = run_oracle(oracle_dir, config, audio, out)
    assert data["quantizer_load"] == {"missing": [], "unexpected": []}, data["quantizer_load"]
    assert data["versions"]["vector_quantize_pytorch"] == "1.6.22"
    return data


def _upstream_preset_options(name: str) -> dict:
    return ModelSpec.resolve(name).raw["r2t"]["decoding_options"]


@pytest.mark.parametrize("preset", ["ichigo-asr-2501-en", "ichigo-asr-2501-en-vi"])
def test_tokens_and_text_match_upstream(preset, oracle_dir, parity_audio, tmp_path):
    """2501-en (language + prompt) and 2501-en-vi (language detection + prompt)."""
    config = _tiny_model(tmp_path / "model", oracle_dir, _upstream_preset_options(preset))
    oracle = _run_oracle(oracle_dir, config, parity_audio, tmp_path / "oracle.json")
    model = IchigoModel(ModelSpec.resolve(str(config)), device="cpu")
    ours = {r.path: r for r in BatchPipeline(model, batch_size=8).run(parity_audio)}

    n_chunks = n_long = 0
    for expected in oracle["files"]:
        assert "error" not in expected, expected.get("error")
        got = ours[expected["path"]]
        assert got.ok, got.error
        assert len(got.chunks) == len(expected["chunks"]), expected["path"]
        n_long += len(got.chunks) > 1
        for mine, theirs in zip(got.chunks, expected["chunks"], strict=True):
            n_chunks += 1
            assert round(mine.duration_s * 16000) == theirs["n_samples"]
            assert list(mine.ids) == theirs["ids"], f"{expected['path']} @ {mine.offset_s}s"
            upstream_embs = torch.from_numpy(np.load(theirs["dequant_path"]))
            our_embs = model.dequantize([torch.tensor(mine.ids)])
            diff = (our_embs - upstream_embs).abs().max().item()
            assert diff < 1e-4, f"de-quantized embeddings differ by {diff}"
            assert mine.text == theirs["text"], f"{expected['path']} @ {mine.offset_s}s"
        assert got.text == expected["text"]
    assert n_long >= 2 and n_chunks >= 9


def test_upstream_checkpoint_format_loads_whatever_vq_release(oracle_dir, tmp_path):
    """The upstream-format checkpoint maps onto the current vector-quantize-pytorch layout."""
    config = _tiny_model(tmp_path / "model", oracle_dir, {"task": "transcribe", "language": "en"})
    state = torch.load(config.parent / "quantizer.pth", weights_only=True)["state_dict"]
    assert "model.rq.layers.0.project_in.weight" in state  # 1.6.x naming
    model = IchigoModel(ModelSpec.resolve(str(config)), device="cpu")
    assert torch.equal(
        model.quantizer.rq.project_in.weight, state["model.rq.layers.0.project_in.weight"]
    )
    yaml.safe_load(config.read_text())
