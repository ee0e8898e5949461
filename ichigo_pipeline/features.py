"""Log-mel features for padded batches of chunks, each item normalised on its own.

Per item this reproduces openai-whisper's ``log_mel_spectrogram`` on the *unpadded* chunk
(Hann window, n_fft 400, hop 160, centred STFT with reflect padding, last frame dropped,
power spectrum, Slaney mel filterbank, log10 of max(x, 1e-10), floor at max - 8,
(x + 4) / 4), then pads the mel on the right with a constant up to 3000 frames.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_FRAMES = 3000  # 30 s of frames: the Whisper encoder's fixed input length
N_SAMPLES = N_FRAMES * HOP_LENGTH


def _hz_to_mel(freqs: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f_sp = 200.0 / 3
    mels = freqs / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    above = freqs >= min_log_hz
    mels[above] = min_log_mel + np.log(freqs[above] / min_log_hz) / logstep
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    freqs = f_sp * mels
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    above = mels >= min_log_mel
    freqs[above] = min_log_hz * np.exp(logstep * (mels[above] - min_log_mel))
    return freqs


@lru_cache(maxsize=4)
def mel_filterbank(n_mels: int) -> np.ndarray:
    """Slaney-normalised triangular filters [n_mels, n_fft // 2 + 1], float64 cast to float32."""
    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    mel_edges = np.linspace(
        _hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([SAMPLE_RATE / 2]))[0], n_mels + 2
    )
    hz_edges = _mel_to_hz(mel_edges)
    fdiff = np.diff(hz_edges)
    ramps = hz_edges[:, None] - fft_freqs[None, :]
    weights = np.zeros((n_mels, len(fft_freqs)))
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (hz_edges[2 : n_mels + 2] - hz_edges[:n_mels]))[:, None]
    return weights.astype(np.float32)


def n_frames_of(n_samples: int) -> int:
    """Mel frames of an unpadded chunk (centred STFT gives 1 + n // hop; the last is dropped)."""
    return min(n_samples // HOP_LENGTH, N_FRAMES)


def log_mel_batch(
    chunks: list[torch.Tensor],
    n_mels: int,
    pad_value: float = -1.5,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of many chunks at once.

    Args:
        chunks: 1-D float32 waveforms at 16 kHz, any lengths (longer than 30 s is truncated).
        n_mels: 80 or 128.
        pad_value: constant written to frames past each chunk's end (upstream Ichigo: -1.5).

    Returns:
        mel [B, n_mels, 3000] and n_frames [B] (frames that belong to each chunk's audio).
    """
    device = torch.device(device)
    half = N_FFT // 2
    padded = []
    for wav in chunks:
        wav = wav.to(device=device, dtype=torch.float32)
        # Reflect padding needs more than n_fft // 2 samples; tiny chunks fall back to zeros.
        mode = "reflect" if wav.shape[-1] > half else "constant"
        padded.append(F.pad(wav[None, None], (half, half), mode=mode)[0, 0])
    lengths = [p.shape[-1] for p in padded]
    batch = torch.zeros(len(padded), max(lengths), device=device)
    for i, p in enumerate(padded):
        batch[i, : p.shape[-1]] = p
    window = torch.hann_window(N_FFT, device=device)
    stft = torch.stft(batch, N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
    magnitudes = stft.abs() ** 2  # [B, 201, frames]
    filters = torch.from_numpy(mel_filterbank(n_mels)).to(device)
    mel = filters @ magnitudes
    log_spec = torch.clamp(mel, min=1e-10).log10()

    n_frames = torch.tensor([n_frames_of(c.shape[-1]) for c in chunks], device=device)
    frame_idx = torch.arange(log_spec.shape[-1], device=device)
    valid = frame_idx[None, :] < n_frames[:, None]  # [B, frames]
    masked = log_spec.masked_fill(~valid[:, None, :], float("-inf"))
    item_max = masked.amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, item_max - 8.0)
    log_spec = (log_spec + 4.0) / 4.0
    log_spec = log_spec.masked_fill(~valid[:, None, :], pad_value)

    out = torch.full((len(chunks), n_mels, N_FRAMES), pad_value, device=device)
    width = min(N_FRAMES, log_spec.shape[-1])
    out[:, :, :width] = log_spec[:, :, :width]
    return out, n_frames
