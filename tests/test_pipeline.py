"""The batched pipeline on a tiny random model: batching invariance, chunking, outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ichigo_pipeline import api
from ichigo_pipeline.chunking import ChunkingParams, split_spans
from ichigo_pipeline.features import log_mel_batch, mel_filterbank
from ichigo_pipeline.pipeline import BatchPipeline

from .conftest import speech_like, write_wav


def _run(model, paths, batch_size):
    results = {r.path: r for r in BatchPipeline(model, batch_size=batch_size).run(paths)}
    return [results[str(p)] for p in paths]


def test_batched_equals_unbatched(tiny_en_model, mixed_audio):
    """Same audio in batches of 1, 3 and 8 (mixed lengths): identical ids and text per chunk."""
    reference = _run(tiny_en_model, mixed_audio, 1)
    assert any(len(r.chunks) > 1 for r in reference), "corpus must include multi-chunk files"
    for batch_size in (3, 8):
        for ref, got in zip(reference, _run(tiny_en_model, mixed_audio, batch_size), strict=True):
            assert got.ok and ref.ok
            assert [c.ids for c in got.chunks] == [c.ids for c in ref.chunks], got.path
            assert [c.text for c in got.chunks] == [c.text for c in ref.chunks], got.path
            assert got.text == ref.text


def test_features_match_per_item_reference():
    """Batched log-mel equals openai-whisper's recipe computed item by item."""
    rng = np.random.default_rng(1)
    chunks = [
        torch.from_numpy(rng.standard_normal(n).astype(np.float32)) * s
        for n, s in ((16000, 0.1), (48000 + 77, 0.5), (3200, 1.0))
    ]
    mel, n_frames = log_mel_batch(chunks, 80)
    filters = torch.from_numpy(mel_filterbank(80))
    for i, wav in enumerate(chunks):
        stft = torch.stft(wav, 400, 160, window=torch.hann_window(400), return_complex=True)
        spec = filters @ (stft[..., :-1].abs() ** 2)
        log_spec = torch.clamp(spec, min=1e-10).log10()
        log_spec = (torch.maximum(log_spec, log_spec.max() - 8.0) + 4.0) / 4.0
        n = log_spec.shape[-1]
        assert n_frames[i] == n == wav.shape[-1] // 160
        torch.testing.assert_close(mel[i, :, :n], log_spec, rtol=0, atol=1e-5)
        assert torch.all(mel[i, :, n:] == -1.5)


def test_mel_filterbank_is_slaney():
    fb = mel_filterbank(80)
    assert fb.shape == (80, 201) and fb.dtype == np.float32
    # every filter is a triangle with unit area under slaney normalisation (in Hz * weight)
    assert (fb >= 0).all() and (fb.max(axis=1) > 0).all()
    assert mel_filterbank(128).shape == (128, 201)


def test_chunking_cuts_at_quietest_window():
    sr = 16000
    wav = torch.full((50 * sr,), 0.5)
    quiet = int(19.5 * sr)  # a silent 100 ms window inside the +-1 s search region
    wav[quiet : quiet + 1600] = 0.0
    spans = split_spans(wav, ChunkingParams())
    assert spans[0].start == 0 and spans[0].end == quiet
    assert spans[1].start == quiet
    assert spans[-1].end == wav.shape[0]
    assert all(a.end == b.start for a, b in zip(spans, spans[1:], strict=False))
    assert split_spans(torch.zeros(20 * sr)) == [split_spans(torch.zeros(20 * sr))[0]]


def test_file_results_carry_offsets_tokens_and_roundtrip(tiny_en_model, mixed_audio, tiny_en_yaml):
    long_file = mixed_audio[-1]
    text, meta = api.transcribe(long_file, model=str(tiny_en_yaml), write_txt=False)
    chunks = meta["chunks"]
    assert len(chunks) >= 2
    assert chunks[0]["offset_s"] == 0.0
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b["offset_s"] == pytest.approx(a["offset_s"] + a["duration_s"], abs=1e-3)
    assert meta["tokens"].count("<|sound_start|>") == len(chunks)
    # 25 tokens per second of audio, whole file covered (not only the first 30 s)
    n_ids = sum(len(c["ids"]) for c in chunks)
    assert n_ids == pytest.approx(meta["audio_length"] * 25, abs=2 * len(chunks))
    stoks = api.get_stoks(long_file, model=str(tiny_en_yaml))
    assert [list(c.ids) for c in stoks] == [c["ids"] for c in chunks]
    assert [c.offset_s for c in stoks] == pytest.approx([c["offset_s"] for c in chunks])
    # decode_stoks accepts the token string, the chunk list, and gives the same text
    assert api.decode_stoks(meta["tokens"], model=str(tiny_en_yaml)) == text
    assert api.decode_stoks(stoks, model=str(tiny_en_yaml)) == text


def test_openai_checkpoint_loads_same_weights(tiny_en_yaml, tiny_en_model, mixed_audio):
    """whisper_name pointing at the openai-whisper .pt gives the same results as the HF dir."""
    import yaml

    cfg = yaml.safe_load(tiny_en_yaml.read_text())
    cfg["whisper_name"] = "whisper.pt"
    pt_yaml = tiny_en_yaml.with_name("tiny-en-pt.yaml")
    pt_yaml.write_text(yaml.safe_dump(cfg))
    pt_model = api.get_model(str(pt_yaml), "cpu")
    assert pt_model.whisper_source.endswith("whisper.pt")
    a = _run(tiny_en_model, mixed_audio[:2], 4)
    b = _run(pt_model, mixed_audio[:2], 4)
    assert [r.ids for r in a] == [r.ids for r in b]
    assert [r.text for r in a] == [r.text for r in b]


def test_folder_transcribe_writes_txt_and_isolates_bad_files(tiny_en_yaml, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_wav(folder / "good.wav", speech_like(3.0))
    write_wav(folder / "short.wav", speech_like(0.1, seed=2))
    (folder / "empty.wav").write_bytes(b"")
    (folder / "noise.mp3").write_bytes(np.random.default_rng(0).bytes(4000))
    (folder / "notes.md").write_text("not audio")
    out = api.transcribe(folder, model=str(tiny_en_yaml))
    assert set(out) == {"good.wav", "short.wav", "empty.wav", "noise.mp3"}
    assert out["empty.wav"].startswith("ERROR: ") and "empty" in out["empty.wav"]
    assert out["noise.mp3"].startswith("ERROR: ")
    assert not out["good.wav"].startswith("ERROR")
    assert (folder / "good.txt").read_text().strip() == out["good.wav"]
    assert (folder / "short.txt").exists()
    assert not (folder / "empty.txt").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_bad_inputs_each_get_a_clear_result(tiny_en_model, tmp_path):
    sr = 16000
    cases = {
        "empty.wav": None,
        "truncated.wav": "trunc",
        "random.wav": "random",
        "tiny.wav": (speech_like(0.1), sr),
        "lowrate.wav": (speech_like(2.0, sample_rate=8000), 8000),
        "six_channels.wav": (np.stack([speech_like(2.0, seed=i) for i in range(6)], axis=1), sr),
        "silence.wav": (np.zeros(600 * sr, dtype=np.float32), sr),
    }
    paths = []
    for name, spec in cases.items():
        path = tmp_path / name
        if spec is None:
            path.write_bytes(b"")
        elif spec == "trunc":
            write_wav(tmp_path / "full.wav", speech_like(1.0))
            path.write_bytes((tmp_path / "full.wav").read_bytes()[:20])
        elif spec == "random":
            path.write_bytes(np.random.default_rng(3).bytes(10000))
        else:
            write_wav(path, *spec)
        paths.append(path)
    results = {Path(r.path).name: r for r in BatchPipeline(tiny_en_model, batch_size=8).run(paths)}
    assert set(results) == set(cases)
    for name in ("empty.wav", "truncated.wav", "random.wav"):
        assert not results[name].ok and results[name].error, name
    assert "empty" in results["empty.wav"].error
    for name in ("tiny.wav", "lowrate.wav", "six_channels.wav", "silence.wav"):
        assert results[name].ok, (name, results[name].error)
    assert results["lowrate.wav"].duration_s == pytest.approx(2.0, abs=0.01)
    assert results["silence.wav"].duration_s == pytest.approx(600.0, abs=0.01)
    # all windows tie in silence: upstream cuts at the first one, 1 s early -> 19 s chunks
    assert len(results["silence.wav"].chunks) == 32
    assert results["silence.wav"].chunks[0].duration_s == pytest.approx(19.0)
    assert len(results["tiny.wav"].ids) == 1600 // 160 // 4


def test_malicious_quantizer_pickle_is_refused(tmp_path, tiny_en_yaml):
    import pickle

    import yaml

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as fh:
        pickle.dump({"state_dict": Evil()}, fh)
    cfg = yaml.safe_load(tiny_en_yaml.read_text())
    cfg["model_name"] = str(bad)
    cfg["whisper_name"] = str(tiny_en_yaml.parent / "whisper-hf")
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="cannot load quantizer checkpoint"):
        api.get_model(str(path), "cpu")


def test_missing_weights_offline_name_the_file(tmp_path, tiny_en_yaml):
    import yaml

    from ichigo_pipeline.errors import ModelNotFoundError

    cfg = yaml.safe_load(tiny_en_yaml.read_text())
    cfg["model_name"] = "no-such-quantizer.pth"
    cfg["whisper_name"] = str(tiny_en_yaml.parent / "whisper-hf")
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ModelNotFoundError, match="no-such-quantizer.pth"):
        api.get_model(str(path), "cpu")
    from ichigo_pipeline.whisper_weights import resolve_whisper

    with pytest.raises(ModelNotFoundError, match="someone/whisper-nonexistent"):
        resolve_whisper("someone/whisper-nonexistent")
    with pytest.raises(ModelNotFoundError, match="nothere.pt"):
        resolve_whisper(str(tmp_path / "nothere.pt"))


def test_cli_json_lines(tiny_en_yaml, tmp_path):
    write_wav(tmp_path / "a.wav", speech_like(4.0))
    write_wav(tmp_path / "b.wav", speech_like(25.0, seed=5))
    (tmp_path / "bad.wav").write_bytes(b"RIFF")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ichigo_pipeline.cli",
            "transcribe",
            str(tmp_path),
            "--model",
            str(tiny_en_yaml),
            "--json",
            "--batch-size",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {Path(r["path"]).name: r for r in map(json.loads, proc.stdout.splitlines())}
    assert set(rows) == {"a.wav", "b.wav", "bad.wav"}
    for name in ("a.wav", "b.wav"):
        row = rows[name]
        assert row["error"] is None and row["tokens"].startswith("<|sound_start|>")
        assert set(row) >= {"path", "text", "tokens", "chunks", "duration_s", "error"}
        assert all({"offset_s", "duration_s", "ids", "text"} <= set(c) for c in row["chunks"])
    assert len(rows["b.wav"]["chunks"]) == 2
    assert rows["bad.wav"]["error"] and rows["bad.wav"]["text"] is None
    assert "files: 3 (2 ok, 1 failed)" in proc.stderr
    assert (tmp_path / "a.txt").exists() and not (tmp_path / "bad.txt").exists()


def test_a_failing_batch_is_halved_until_the_bad_chunk_is_alone(tiny_en_model):
    """What CUDA out-of-memory (or any batch failure) triggers: the batch is split in halves
    and retried; only the file whose chunk fails on its own is failed."""
    from ichigo_pipeline.chunking import Span
    from ichigo_pipeline.pipeline import _Chunk, _FileState

    states, chunks = [], []
    for i in range(6):
        wav = torch.from_numpy(speech_like(1.0 + 0.1 * i, seed=i))
        state = _FileState(f"f{i}.wav", [Span(0, wav.shape[-1])], wav.shape[-1] / 16000, 0.0)
        states.append(state)
        chunks.append(_Chunk(state, 0, wav))
    # a 3-D "waveform" makes feature extraction raise for any batch that contains it
    chunks[4] = _Chunk(states[4], 0, torch.zeros(2, 2, 16000))
    pipeline = BatchPipeline(tiny_en_model, batch_size=6)
    pipeline._run_batch(chunks)
    assert states[4].error and "model failed on chunk 0" in states[4].error
    for i in (0, 1, 2, 3, 5):
        assert states[i].error is None and len(states[i].results) == 1, i


def test_int8_linear_mode_runs_and_is_kept_apart_in_the_store(tiny_en_yaml, tmp_path):
    """The opt-in int8 mode quantizes the float32 linear layers (the encoder of an Ichigo
    preset; its decoder stays upstream-exact float16), still transcribes, says so in its
    provenance, and its transcripts dedupe under their own key, never served for exact ones."""
    from ichigo_common.variants import transcript_key
    from ichigo_pipeline.model import IchigoModel, ModelSpec
    from ichigo_pipeline.pipeline import BatchPipeline

    from .conftest import speech_like, write_wav

    exact = IchigoModel(ModelSpec.resolve(str(tiny_en_yaml)), device="cpu", int8_linear=False)
    int8 = IchigoModel(ModelSpec.resolve(str(tiny_en_yaml)), device="cpu", int8_linear=True)
    assert int8.int8_linear and not exact.int8_linear
    assert int8.provenance["int8_linear"] is True and exact.provenance["int8_linear"] is False
    layer = int8.whisper.model.encoder.layers[0].fc1
    assert type(layer).__module__.startswith("torch.ao.nn.quantized")
    clip = write_wav(tmp_path / "a.wav", speech_like(3.0, seed=1))
    (result,) = BatchPipeline(int8).run([clip])
    assert result.ok and result.ids, result.error
    assert transcript_key("m", int8=True) != transcript_key("m")
