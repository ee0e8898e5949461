"""Tests for ichigo_pipeline.audio: real files written to tmp_path, no mocks."""

from __future__ import annotations

import csv
import logging
import math
import os
import pickle
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from ichigo_pipeline.audio import (
    AUDIO_EXTENSIONS,
    SAMPLE_RATE,
    AudioError,
    _frame_to_array,
    decode_audio,
    load_audio,
)

SPEECH_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "speech"
LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


def _signal(sr: int, seconds: float, channels: int = 1, amp: float = 0.5) -> np.ndarray:
    """float32 [C, T]; channel c is a sine at 440 * (c + 1) Hz, different per channel."""
    t = np.arange(int(round(sr * seconds))) / sr
    return np.stack([amp * np.sin(2 * np.pi * 440 * (c + 1) * t) for c in range(channels)]).astype(
        np.float32
    )


def _write_sf(path: Path, x: np.ndarray, sr: int, subtype: str) -> Path:
    sf.write(path, x.T, sr, subtype=subtype)
    return path


def _write_av(
    path: Path,
    x: np.ndarray,
    sr: int,
    codec: str,
    *,
    bit_rate: int | None = None,
    container_format: str | None = None,
    options: dict[str, str] | None = None,
) -> Path:
    """Encode float32 [C, T] with a PyAV encoder, feeding float or s16 frames."""
    channels = x.shape[0]
    layout = LAYOUTS[channels]
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=sr, layout=layout, options=options or {})
        if bit_rate:
            stream.bit_rate = bit_rate
        names = [f.name for f in stream.codec_context.codec.audio_formats]
        fmt = av.AudioFormat(next(n for n in ("fltp", "flt", "s16", "s16p") if n in names))
        stream.format = fmt.name
        stream.codec_context.open(strict=False)  # frame_size is only known once open
        frame_size = stream.codec_context.frame_size or 1024
        if fmt.packed.name == "s16":
            x = np.round(x * 32767).astype(np.int16)
        for start in range(0, x.shape[1], frame_size):
            chunk = x[:, start : start + frame_size]
            arr = chunk if fmt.is_planar else chunk.T.reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(arr), format=fmt.name, layout=layout
            )
            frame.rate, frame.pts = sr, start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def _sf_reference(path: Path) -> torch.Tensor:
    data, _ = sf.read(path, dtype="float32", always_2d=True)
    return torch.from_numpy(np.ascontiguousarray(data.T))


def _peak_hz(x: torch.Tensor, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x.numpy()))
    return float(np.fft.rfftfreq(x.shape[-1], 1 / sr)[spec.argmax()])


# --------------------------------------------------------------------------- lossless


@pytest.mark.parametrize(
    ("name", "subtype", "sr", "channels"),
    [
        ("s16_16k.wav", "PCM_16", 16000, 1),
        ("s16_22k.wav", "PCM_16", 22050, 1),
        ("f32.wav", "FLOAT", 16000, 2),
        ("f64.wav", "DOUBLE", 16000, 1),
        ("s24.wav", "PCM_24", 48000, 2),
        ("s32.wav", "PCM_32", 16000, 1),
        ("u8.wav", "PCM_U8", 8000, 1),
        ("s16.flac", "PCM_16", 16000, 1),
        ("s24_stereo_44k.flac", "PCM_24", 44100, 2),
    ],
)
def test_lossless_matches_soundfile_exactly(tmp_path, name, subtype, sr, channels):
    x = _signal(sr, 1.3, channels, amp=0.9)
    path = _write_sf(tmp_path / name, x, sr, subtype)
    wav, rate = decode_audio(path)
    assert rate == sr
    assert wav.dtype == torch.float32
    assert wav.shape == (channels, x.shape[1])
    assert torch.equal(wav, _sf_reference(path))


def test_pcm_s16_is_int_over_32768(tmp_path):
    ints = np.array([-32768, -1, 0, 1, 12345, 32767], dtype=np.int16)
    path = tmp_path / "ints.wav"
    sf.write(path, ints, 16000, subtype="PCM_16")
    wav, _ = decode_audio(path)
    assert torch.equal(wav[0], torch.from_numpy(ints.astype(np.float32) / 32768))


def test_flac_24bit_is_int_over_2_pow_23(tmp_path):
    ints = np.array([-(2**23), -1, 0, 1, 2**23 - 1, 4242], dtype=np.int32)
    path = tmp_path / "ints24.flac"
    sf.write(path, ints << 8, 44100, subtype="PCM_24")  # soundfile int32 is left-aligned
    wav, _ = decode_audio(path)
    assert torch.equal(wav[0], torch.from_numpy(ints.astype(np.float32) / 2**23))


FRAME_FORMATS = {
    "u8": (np.uint8, lambda a: (a.astype(np.float32) - 128) / 128),
    "s16": (np.int16, lambda a: a.astype(np.float32) / 2**15),
    "s32": (np.int32, lambda a: a.astype(np.float32) / 2**31),
    "flt": (np.float32, lambda a: a),
    "dbl": (np.float64, lambda a: a.astype(np.float32)),
}


@pytest.mark.parametrize("planar", [False, True], ids=["packed", "planar"])
@pytest.mark.parametrize("base", sorted(FRAME_FORMATS))
def test_frame_conversion_every_sample_format(base, planar):
    dtype, expect = FRAME_FORMATS[base]
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, size=(2, 37), endpoint=True, dtype=dtype)
    else:
        data = rng.uniform(-1, 1, size=(2, 37)).astype(dtype)
    fmt = base + "p" if planar else base
    arr = data if planar else data.T.reshape(1, -1)  # packed = interleaved L R L R ...
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(arr), format=fmt, layout="stereo")
    out = _frame_to_array(frame)
    assert out.dtype == np.float32 and out.shape == (2, 37)
    np.testing.assert_array_equal(out, expect(data))


# --------------------------------------------------------------------------- lossy / containers

# (file name, codec, sample rate, channels, extra kwargs for _write_av)
CODEC_CASES = [
    ("tone.mp3", "libmp3lame", 44100, 2, {}),
    # FFmpeg's native vorbis encoder (no libvorbis here) is experimental and stereo-only,
    # and its channel coupling smears the second channel: content is checked on channel 0.
    ("tone.ogg", "vorbis", 44100, 2, {"options": {"strict": "experimental"}}),
    ("tone.opus", "libopus", 48000, 1, {}),
    ("tone.m4a", "aac", 44100, 2, {}),
    ("tone.aac", "aac", 44100, 1, {"container_format": "adts"}),
    ("tone.webm", "libopus", 48000, 2, {}),
    ("tone.mka", "flac", 44100, 2, {}),
    ("tone.wma", "wmav2", 44100, 1, {"bit_rate": 128000}),
]


def test_every_accepted_extension_is_exercised():
    assert {Path(c[0]).suffix for c in CODEC_CASES} | {".wav", ".flac"} == AUDIO_EXTENSIONS


@pytest.mark.parametrize(
    ("name", "codec", "sr", "channels", "kw"), CODEC_CASES, ids=[c[0] for c in CODEC_CASES]
)
def test_codec_roundtrip_duration_and_content(tmp_path, name, codec, sr, channels, kw):
    seconds = 1.5
    x = _signal(sr, seconds, channels)
    path = _write_av(tmp_path / name, x, sr, codec, **kw)
    wav, rate = decode_audio(path)
    assert rate == sr
    assert wav.shape[0] == channels
    # encoder priming / final-frame padding: allow up to ~2 codec frames
    assert abs(wav.shape[1] / rate - seconds) < 0.05, wav.shape
    for c in range(1 if codec == "vorbis" else channels):
        assert abs(_peak_hz(wav[c], rate) - 440 * (c + 1)) < 5
    mono = load_audio(path)
    assert mono.ndim == 1 and mono.dtype == torch.float32
    assert abs(mono.shape[0] / SAMPLE_RATE - seconds) < 0.05


# --------------------------------------------------------------------------- load_audio


def test_stereo_to_mono_is_channel_mean(tmp_path):
    x = _signal(16000, 1.0, 2)
    path = _write_sf(tmp_path / "st.wav", x, 16000, "FLOAT")
    mono = load_audio(path)
    ref = _sf_reference(path)
    assert torch.equal(mono, ref.mean(0))
    assert torch.allclose(mono, (ref[0] + ref[1]) / 2, atol=1e-7)


@pytest.mark.parametrize(("sr", "channels"), [(48000, 6), (8000, 1), (22050, 2), (44100, 1)])
def test_load_audio_resamples_to_16k_mono(tmp_path, sr, channels):
    x = _signal(sr, 2.0, channels, amp=0.3)
    path = _write_sf(tmp_path / f"in_{sr}_{channels}.wav", x, sr, "PCM_16")
    mono = load_audio(path)
    assert mono.ndim == 1 and mono.dtype == torch.float32
    assert mono.shape[0] == math.ceil(x.shape[1] * SAMPLE_RATE / sr)
    expected = torchaudio.functional.resample(_sf_reference(path).mean(0), sr, SAMPLE_RATE)
    assert torch.equal(mono, expected)


def test_load_audio_other_target_rate(tmp_path):
    path = _write_sf(tmp_path / "a.wav", _signal(16000, 1.0), 16000, "PCM_16")
    assert load_audio(path, sample_rate=8000).shape == (8000,)


def test_load_audio_16k_mono_is_untouched(tmp_path):
    path = _write_sf(tmp_path / "a.wav", _signal(16000, 1.0), 16000, "PCM_16")
    assert torch.equal(load_audio(path), _sf_reference(path)[0])


# --------------------------------------------------------------------------- bad inputs


def _empty(p: Path) -> Path:
    p.write_bytes(b"")
    return p


def _truncated_header(p: Path) -> Path:
    full = _write_sf(p.with_name("full.wav"), _signal(16000, 0.5), 16000, "PCM_16")
    p.write_bytes(full.read_bytes()[:20])
    return p


def _random_bytes(p: Path) -> Path:
    p.write_bytes(np.random.default_rng(0).bytes(5000))
    return p


def _directory(p: Path) -> Path:
    p.mkdir()
    return p


def _nan_float(p: Path) -> Path:
    sf.write(p, np.array([0.1, np.nan, 0.2], np.float32), 16000, subtype="FLOAT")
    return p


def _inf_float(p: Path) -> Path:
    sf.write(p, np.array([0.1, np.inf, 0.2], np.float32), 16000, subtype="FLOAT")
    return p


def _zero_frames(p: Path) -> Path:
    sf.write(p, np.zeros(0, np.float32), 16000, subtype="PCM_16")
    return p


def _video_only(p: Path) -> Path:
    with av.open(str(p), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return p


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("empty.wav", _empty, "empty file (0 bytes)"),
        ("trunc.wav", _truncated_header, "could not decode"),
        ("random.wav", _random_bytes, "could not decode"),
        ("x.wav", _directory, "not a file"),
        ("missing.wav", lambda p: p, "file not found"),
        ("nan.wav", _nan_float, "NaN or infinite"),
        ("inf.wav", _inf_float, "NaN or infinite"),
        ("zero.wav", _zero_frames, "no audio samples"),
        ("video.mkv", _video_only, "no audio stream"),
    ],
)
@pytest.mark.parametrize("func", [decode_audio, load_audio], ids=["decode", "load"])
def test_bad_inputs_raise_audio_error(tmp_path, name, make, reason, func):
    path = make(tmp_path / name)
    with pytest.raises(AudioError) as info:
        func(path)
    assert reason in info.value.reason
    assert info.value.path == str(path)
    assert str(info.value) == f"{path}: {info.value.reason}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unreadable_file(tmp_path):
    path = _write_sf(tmp_path / "locked.wav", _signal(16000, 0.2), 16000, "PCM_16")
    path.chmod(0)
    with pytest.raises(AudioError, match="permission denied"):
        decode_audio(path)


def test_truncated_stream_keeps_decoded_prefix(tmp_path, caplog):
    full = _write_sf(tmp_path / "full.flac", _signal(16000, 3.0), 16000, "PCM_16")
    data = full.read_bytes()
    cut = tmp_path / "cut.flac"
    cut.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="ichigo_pipeline.audio"):
        wav, rate = decode_audio(cut)
    assert 0 < wav.shape[1] < 3 * rate
    # what was kept is exactly the start of the real signal
    assert torch.equal(wav, _sf_reference(full)[:, : wav.shape[1]])
    assert any("stopped early" in r.getMessage() for r in caplog.records)


def test_audio_error_pickles():
    err = pickle.loads(pickle.dumps(AudioError("no audio stream", "/a/b.wav")))
    assert (err.reason, err.path, str(err)) == (
        "no audio stream",
        "/a/b.wav",
        "/a/b.wav: no audio stream",
    )
    assert str(AudioError("no audio samples")) == "no audio samples"


# --------------------------------------------------------------------------- real speech


def _manifest_rows() -> list:
    manifest = SPEECH_DIR / "manifest.tsv"
    if not manifest.is_file():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{manifest} not present"))]
    with manifest.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [pytest.param(r, id=r["file"]) for r in rows]


@pytest.mark.realspeech
@pytest.mark.parametrize("row", _manifest_rows())
def test_real_speech_durations(row):
    path = SPEECH_DIR / row["file"]
    wav, rate = decode_audio(path)
    assert rate == int(row["sample_rate"])
    assert abs(wav.shape[1] / rate - float(row["duration_s"])) < 0.05
    if path.suffix in (".wav", ".flac"):
        assert torch.equal(wav, _sf_reference(path))
    mono = load_audio(path)
    assert abs(mono.shape[0] / SAMPLE_RATE - float(row["duration_s"])) < 0.05
