"""Ichigo's sound-token quantizer and de-quantizer, batched.

Quantize: mean-pool pairs of Whisper encoder frames (1500 -> 750), ``x + mlp(ln(x))``, then a
one-level ResidualVQ (cosine similarity, 64-d codebook) from the current
vector-quantize-pytorch release. De-quantize: pad ids to 750 with the mask code, codebook
vectors, repeat each twice, project back to the model width, add a learned positional
embedding, one residual self-attention block with RoPE, final layer norm.

Every method takes a padded batch; nothing here depends on the other items of the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import ResidualVQ

N_POSITIONS = 1500


@dataclass(frozen=True)
class QuantizerConfig:
    """The ``quantizer:`` section of an upstream config."""

    n_head: int = 16
    head_width: int = 64
    ffn_mult: int = 4
    depth: int = 1
    downsample: int = 2
    vq_codes: int = 512
    mask_code: int = 512
    codebook_dim: int = 64
    query_mult: float = 2
    rope: bool = True
    mask_embs: bool = True
    downsample_mean: bool = True
    use_cosine_sim: bool = True
    num_quantizers: int = 1

    @property
    def width(self) -> int:
        return self.n_head * self.head_width

    @property
    def stoks_len(self) -> int:
        return N_POSITIONS // self.downsample

    @property
    def codebook_size(self) -> int:
        return self.vq_codes + 1 if self.mask_embs else self.vq_codes

    @classmethod
    def from_upstream(cls, section: dict[str, Any]) -> QuantizerConfig:
        if section.get("q_depth", 1) != 1 or section.get("num_quantizers", 1) != 1:
            raise ValueError("only q_depth 1 and num_quantizers 1 are supported (as upstream)")
        if section.get("downsample_conv"):
            raise ValueError("downsample_conv quantizers are not supported (no upstream preset)")
        if not section.get("use_cosine_sim", True):
            raise ValueError("only cosine-similarity codebooks are supported (as upstream)")
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: section[k] for k in names if k in section})


class FP32LayerNorm(nn.LayerNorm):
    """Layer norm computed in float32 whatever the input dtype (as upstream)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryAttention(nn.Module):
    """Self-attention with RoPE on queries and keys; q and k each scaled by sqrt(qk_scale)."""

    def __init__(self, width: int, n_head: int, qk_scale: float, rope: bool):
        super().__init__()
        self.n_head = n_head
        self.sqrt_qk_scale = math.sqrt(qk_scale)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.rope = rope
        head_dim = width // n_head
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _heads(self, x: torch.Tensor, rope: bool) -> torch.Tensor:
        x = x.view(*x.shape[:2], self.n_head, -1)  # [B, T, H, D]
        if rope:
            t = torch.arange(x.shape[1], device=x.device).type_as(self.inv_freq)
            freqs = torch.outer(t, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]
            x = x * cos + _rotate_half(x) * sin
        return x.permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.query(x) * self.sqrt_qk_scale, self.rope)
        k = self._heads(self.key(x) * self.sqrt_qk_scale, self.rope)
        v = self._heads(self.value(x), False)
        wv = F.scaled_dot_product_attention(q, k, v)
        return self.out(wv.permute(0, 2, 1, 3).flatten(start_dim=2))


class ResidualBlock(nn.Module):
    def __init__(self, width: int, n_head: int, qk_scale: float, ffn_mult: int, rope: bool):
        super().__init__()
        self.attn = RotaryAttention(width, n_head, qk_scale, rope)
        self.attn_ln = FP32LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, width * ffn_mult), nn.GELU(), nn.Linear(width * ffn_mult, width)
        )
        self.mlp_ln = FP32LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class IchigoQuantizer(nn.Module):
    def __init__(self, config: QuantizerConfig):
        super().__init__()
        self.config = config
        width = config.width
        self.mlp = nn.Sequential(
            nn.Linear(width, width * config.ffn_mult),
            nn.GELU(),
            nn.Linear(width * config.ffn_mult, width),
        )
        self.mlp_ln = FP32LayerNorm(width)
        self.rq = ResidualVQ(
            dim=width,
            codebook_size=config.codebook_size,
            codebook_dim=config.codebook_dim,
            num_quantizers=1,
            use_cosine_sim=config.use_cosine_sim,
            threshold_ema_dead_code=0,
            decay=0.99,
            commitment_weight=1.0,
        )
        qk_scale = config.query_mult * 8 / math.sqrt(config.head_width)
        self.positional_embedding = nn.Embedding(N_POSITIONS, width)
        self._out_blocks = nn.Sequential(
            *[
                ResidualBlock(width, config.n_head, qk_scale, config.ffn_mult, config.rope)
                for _ in range(config.depth)
            ]
        )
        self.ln_post = FP32LayerNorm(width)

    def _downsample(self, embs: torch.Tensor) -> torch.Tensor:
        b, t, d = embs.shape
        step = self.config.downsample
        if self.config.downsample_mean:
            return embs.reshape(b, t // step, step, d).mean(-2)
        return embs[:, ::step]

    @torch.inference_mode()
    def quantize(self, embs: torch.Tensor, n_frames: torch.Tensor) -> list[torch.Tensor]:
        """Sound-token ids of each item.

        Args:
            embs: encoder output [B, 1500, width].
            n_frames: mel frames of each item's own audio [B].

        Returns:
            B int64 tensors, item i of length ``n_frames[i] // 2 // downsample``.
        """
        x = self._downsample(embs.float())
        x = x + self.mlp(self.mlp_ln(x))
        _, ids, _ = self.rq(x, freeze_codebook=True)
        ids = ids.squeeze(-1)
        if not self.config.mask_embs:
            return list(ids)
        keep = (n_frames // 2 // self.config.downsample).tolist()
        return [ids[i, :k] for i, k in enumerate(keep)]

    @torch.inference_mode()
    def dequantize(self, stoks: list[torch.Tensor]) -> torch.Tensor:
        """Decoder input embeddings [B, 1500, width] for B token sequences of <= 750 ids."""
        cfg = self.config
        pad_id = cfg.mask_code if cfg.mask_embs else 0
        device = self.positional_embedding.weight.device
        ids = torch.full((len(stoks), cfg.stoks_len), pad_id, dtype=torch.long, device=device)
        for i, seq in enumerate(stoks):
            if seq.numel() > cfg.stoks_len:
                raise ValueError(f"{seq.numel()} sound tokens; one chunk holds {cfg.stoks_len}")
            ids[i, : seq.numel()] = seq.to(device)
        codebook = self.rq.layers[0]._codebook.embed[0]
        x = codebook[ids].repeat_interleave(cfg.downsample, -2)
        x = self.rq.project_out(x)
        x = x + self.positional_embedding.weight[: x.shape[-2]]
        return self.ln_post(self._out_blocks(x))


# --- loading upstream checkpoints -------------------------------------------------------

_CODEBOOK_BUFFERS = ("embed", "embed_avg", "cluster_size", "initted")


def _target_key(key: str) -> str | None:
    """Map an upstream (vector-quantize-pytorch 1.6.x era) key to this module's key."""
    if key.startswith("rq."):
        for proj in ("project_in", "project_out"):
            for prefix in (f"rq.layers.0.{proj}.", f"rq.{proj}."):
                if key.startswith(prefix):
                    return f"rq.{proj}." + key[len(prefix) :]
        for name in _CODEBOOK_BUFFERS:
            if key.endswith(f"_codebook.{name}"):
                return f"rq.layers.0._codebook.{name}"
        return None
    if key.endswith(".rotary.inv_freq"):
        return None  # recomputed; identical by construction
    return key


def load_quantizer_state(model: IchigoQuantizer, state_dict: dict[str, torch.Tensor]) -> None:
    """Load an upstream ``state_dict`` (``model.`` prefix allowed) whatever the VQ key layout."""
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("model.")
        target = _target_key(key)
        if target is None or target not in own:
            continue
        if own[target].shape != value.shape:
            if own[target].numel() != value.numel():
                raise ValueError(
                    f"checkpoint tensor {key} has shape {tuple(value.shape)}, the model "
                    f"expects {tuple(own[target].shape)}: wrong preset for this checkpoint?"
                )
            value = value.reshape(own[target].shape)
        mapped[target] = value.to(own[target].dtype)
    required = [k for k in own if not k.endswith(("embed_avg", "cluster_size", "initted"))]
    missing = [k for k in required if k not in mapped]
    if missing:
        raise ValueError(f"quantizer checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict(mapped, strict=False)


def load_quantizer(path: str, config: QuantizerConfig) -> IchigoQuantizer:
    """Build a quantizer and load an upstream checkpoint (``weights_only=True``)."""
    try:
        spec = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # pickle refused or corrupt file
        raise ValueError(f"cannot load quantizer checkpoint {path}: {exc}") from exc
    state = spec.get("state_dict", spec) if isinstance(spec, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a quantizer checkpoint (no state_dict)")
    model = IchigoQuantizer(config)
    load_quantizer_state(model, state)
    return model.eval()
