"""Small random models in the exact upstream file formats, for tests and benchmarks.

``build_tiny_ichigo`` writes, from one set of random weights:
- a Hugging Face Whisper directory (``config.json``, ``model.safetensors``, ``vocab.json``),
- the same weights as an openai-whisper ``.pt`` checkpoint (what upstream loads),
- a quantizer checkpoint in upstream's format (torch file, ``state_dict`` with a ``model.``
  prefix and vector-quantize-pytorch 1.6.x key names),
- an upstream-schema YAML config pointing at them.
No real Ichigo weights exist offline; these load through the same code path users use.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from transformers import WhisperForConditionalGeneration

from .quantizer import IchigoQuantizer, QuantizerConfig
from .tokenizer import _bytes_to_unicode
from .whisper_weights import config_from_dims, openai_key_to_hf


@dataclass(frozen=True)
class TinyDims:
    n_mels: int = 80
    n_audio_ctx: int = 1500
    n_audio_state: int = 128
    n_audio_head: int = 2
    n_audio_layer: int = 2
    n_vocab: int = 51865
    n_text_ctx: int = 448
    n_text_state: int = 128
    n_text_head: int = 2
    n_text_layer: int = 2


def write_hf_vocab(ranks: dict[bytes, int], folder: Path) -> None:
    """``vocab.json`` (GPT-2 byte-level strings) for BPE ``ranks``."""
    b2u = _bytes_to_unicode()
    vocab = {"".join(b2u[b] for b in token): idx for token, idx in ranks.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))


def write_tiktoken(ranks: dict[bytes, int], path: Path) -> None:
    import base64

    lines = [
        f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda x: x[1])
    ]
    path.write_text("\n".join(lines) + "\n")


def random_whisper(dims: TinyDims, seed: int) -> WhisperForConditionalGeneration:
    """A Whisper whose greedy text depends on the audio (not one token repeated).

    Small token/position embeddings and a strong cross-attention make the decoder follow the
    audio features, so texts differ from clip to clip and a text comparison can fail.
    """
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config_from_dims(asdict(dims)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.fill_(1.0)
            elif "embed" in name:
                p.normal_(0.0, 0.05)
            elif p.dim() >= 2:
                gain = 3.0 if "encoder_attn" in name else 1.0
                p.normal_(0.0, gain / math.sqrt(p[0].numel()))
            else:
                p.normal_(0.0, 0.02)
    model.tie_weights()
    return model.eval()


def openai_state_dict(model: WhisperForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The same weights under openai-whisper's names (inverse of the loader's mapping)."""
    hf = model.state_dict()
    out = {}
    for side, layers in (
        ("encoder", model.config.encoder_layers),
        ("decoder", model.config.decoder_layers),
    ):
        names = [
            "attn.query",
            "attn.key",
            "attn.value",
            "attn.out",
            "attn_ln",
            "mlp.0",
            "mlp.2",
            "mlp_ln",
        ]
        if side == "decoder":
            names += [
                "cross_attn.query",
                "cross_attn.key",
                "cross_attn.value",
                "cross_attn.out",
                "cross_attn_ln",
            ]
        for i in range(layers):
            for n in names:
                for leaf in ("weight", "bias"):
                    key = f"{side}.blocks.{i}.{n}.{leaf}"
                    target = openai_key_to_hf(key)
                    if target in hf:
                        out[key] = hf[target].clone()
    for key in (
        "encoder.conv1.weight",
        "encoder.conv1.bias",
        "encoder.conv2.weight",
        "encoder.conv2.bias",
        "encoder.positional_embedding",
        "encoder.ln_post.weight",
        "encoder.ln_post.bias",
        "decoder.positional_embedding",
        "decoder.token_embedding.weight",
        "decoder.ln.weight",
        "decoder.ln.bias",
    ):
        out[key] = hf[openai_key_to_hf(key)].clone()
    return out


def upstream_quantizer_state(model: IchigoQuantizer) -> dict[str, torch.Tensor]:
    """State dict in upstream's layout (vector-quantize-pytorch 1.6.x names, ``model.`` prefix)."""
    out = {}
    for key, value in model.state_dict().items():
        key = key.replace("rq.project_in.", "rq.layers.0.project_in.")
        key = key.replace("rq.project_out.", "rq.layers.0.project_out.")
        if key.endswith("_codebook.initted"):
            value = value.reshape(1)
        out["model." + key] = value.clone()
    for i, block in enumerate(model._out_blocks):
        out[f"model._out_blocks.{i}.attn.rotary.inv_freq"] = block.attn.inv_freq.clone()
    return out


def build_tiny_ichigo(
    folder: Path,
    ranks: dict[bytes, int],
    dims: TinyDims = TinyDims(),
    vq_codes: int = 96,
    mask_code: int = 64,
    decoding_options: dict | None = None,
    seed: int = 0,
) -> Path:
    """Write a complete tiny Ichigo model into ``folder``; returns the YAML config path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = random_whisper(dims, seed)
    hf_dir = folder / "whisper-hf"
    model.save_pretrained(hf_dir)
    write_hf_vocab(ranks, hf_dir)
    torch.save(
        {"dims": asdict(dims), "model_state_dict": openai_state_dict(model)}, folder / "whisper.pt"
    )
    vocab_name = "multilingual.tiktoken" if dims.n_vocab >= 51865 else "gpt2.tiktoken"
    write_tiktoken(ranks, folder / vocab_name)

    head_width = 64
    qcfg = QuantizerConfig(
        n_head=dims.n_audio_state // head_width,
        head_width=head_width,
        vq_codes=vq_codes,
        mask_code=mask_code,
    )
    torch.manual_seed(seed + 1)
    quantizer = IchigoQuantizer(qcfg)
    with torch.no_grad():
        quantizer.positional_embedding.weight.normal_(0.0, 1.0)
    torch.save({"state_dict": upstream_quantizer_state(quantizer)}, folder / "quantizer.pth")

    config = {
        "model_hub": "local/tiny",
        "model_name": "quantizer.pth",
        "whisper_name": "whisper-hf",
        "s2r": None,
        "quantizer": {
            "n_head": qcfg.n_head,
            "head_width": head_width,
            "ffn_mult": 4,
            "depth": 1,
            "q_depth": 1,
            "downsample": 2,
            "vq_codes": vq_codes,
            "mask_code": mask_code,
            "num_quantizers": 1,
            "codebook_dim": 64,
            "codebook_decay": 0.99,
            "commitment_weight": 1.0,
            "threshold_ema_dead_code": 0,
            "query_mult": 2,
            "use_cosine_sim": True,
            "no_quantize": False,
            "rope": True,
            "mask_embs": True,
            "downsample_conv": False,
            "downsample_mean": True,
        },
        "r2t": {"decoding_options": decoding_options or {"task": "transcribe", "language": "en"}},
    }
    path = folder / "tiny-ichigo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
