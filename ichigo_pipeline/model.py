"""Model specifications (presets and upstream YAML files) and the loaded model.

A specification is upstream's config schema: ``model_hub`` + ``model_name`` name the quantizer
checkpoint (``model_name`` may be a local path), ``whisper_name`` the Whisper weights,
``quantizer`` its architecture, ``r2t.decoding_options`` the decoding options. A spec without
``quantizer`` is a plain Whisper model.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml

from .decoding import BatchDecoder, Decoded, DecodingOptions
from .errors import ModelConfigError, ModelNotFoundError
from .features import log_mel_batch
from .preset_files import preset_names, preset_text
from .quantizer import IchigoQuantizer, QuantizerConfig, load_quantizer
from .whisper_weights import WhisperBundle, load_whisper

log = logging.getLogger(__name__)

DEFAULT_PRESET = "ichigo-asr-2501-en"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    whisper_name: str
    decoding: DecodingOptions
    quantizer: QuantizerConfig | None = None
    model_hub: str | None = None
    model_name: str | None = None
    base_dir: Path | None = None  # folder of the YAML file, for relative paths
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_ichigo(self) -> bool:
        return self.quantizer is not None

    @classmethod
    def from_dict(cls, name: str, cfg: dict[str, Any], base_dir: Path | None = None) -> ModelSpec:
        if "whisper_name" not in cfg:
            raise ModelConfigError(f"model config {name} has no whisper_name")
        decoding = DecodingOptions.from_upstream((cfg.get("r2t") or {}).get("decoding_options"))
        quantizer = None
        if cfg.get("quantizer"):
            quantizer = QuantizerConfig.from_upstream(cfg["quantizer"])
            if not cfg.get("model_name"):
                raise ModelConfigError(f"model config {name} has a quantizer but no model_name")
        return cls(
            name=name,
            whisper_name=str(cfg["whisper_name"]),
            decoding=decoding,
            quantizer=quantizer,
            model_hub=cfg.get("model_hub"),
            model_name=cfg.get("model_name"),
            base_dir=base_dir,
            raw=cfg,
        )

    @classmethod
    def resolve(cls, model: str | ModelSpec | None) -> ModelSpec:
        """A preset name or a path to a YAML file in upstream's schema."""
        if isinstance(model, ModelSpec):
            return model
        model = model or os.environ.get("ICHIGO_MODEL") or DEFAULT_PRESET
        if model.endswith((".yaml", ".yml")):
            path = Path(model).expanduser()
            if not path.exists():
                raise ModelNotFoundError(f"model config not found: {path}")
            cfg = yaml.safe_load(path.read_text())
            return cls.from_dict(str(path), cfg, base_dir=path.resolve().parent)
        if model not in preset_names():
            raise ModelConfigError(
                f"unknown model {model!r}: use a preset ({', '.join(preset_names())}) "
                "or a path to a .yaml config"
            )
        return cls.from_dict(model, yaml.safe_load(preset_text(model)))

    def quantizer_path(self) -> Path:
        """Local path of the quantizer checkpoint (through the hub cache if not local)."""
        assert self.model_name
        local = Path(self.model_name).expanduser()
        if not local.is_absolute() and self.base_dir is not None:
            local = self.base_dir / local
        if local.exists():
            return local
        if not self.model_hub:
            raise ModelNotFoundError(f"quantizer checkpoint not found: {local}")
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(repo_id=self.model_hub, filename=self.model_name))
        except Exception as exc:
            raise ModelNotFoundError(
                f"quantizer checkpoint {self.model_hub}:{self.model_name} is not in the Hugging "
                f"Face cache and could not be downloaded ({exc.__class__.__name__}). Put the file "
                "at a local path and give that path as model_name."
            ) from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ModelConfigError(f"unknown dtype {name!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def default_dtypes(spec: ModelSpec, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(encoder, decoder) dtypes that reproduce what upstream computes.

    Upstream Ichigo runs the encoder and quantizer in float32 and decodes in float16 (the
    openai-whisper DecodingOptions default), on CPU too. openai-whisper's own transcribe uses
    float16 on GPU and float32 on CPU for both.
    """
    if spec.is_ichigo:
        return torch.float32, torch.float16
    half = device.type == "cuda"
    return (torch.float16, torch.float16) if half else (torch.float32, torch.float32)


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantize_linear_int8(model: IchigoModel) -> bool:
    """Int8 dynamic quantization (weights int8 per channel, activations quantized per batch)
    of the Whisper encoder's and decoder's float32 linear layers, on CPU only.

    Opt-in only: it trades exactness for speed (1.3-1.5x on the project's 2-core benchmark;
    WER moved by +0.2 points on tiny.en but +2 on whisper-base, see bench/NOTES.md). Sound
    tokens no longer match upstream's, and activation scales are computed per batch, so a
    transcript can depend on which chunks share its batch. Parts not in float32 (an
    upstream-exact float16 decoder) are left alone. Returns whether anything was quantized.
    """
    if model.device.type != "cpu":
        log.warning("ICHIGO_INT8_LINEAR ignored: int8 dynamic quantization is CPU only")
        return False
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    parts = [
        (part, dtype)
        for part, dtype in (
            (model.whisper.model.encoder, model.encoder_dtype),
            (model.whisper.model.decoder, model.decoder_dtype),
        )
        if dtype == torch.float32
    ]
    for part, _ in parts:
        quantize_dynamic(part, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
    return bool(parts)


class IchigoModel:
    """Whisper encoder -> (quantizer -> de-quantizer) -> Whisper decoder, for padded batches."""

    def __init__(
        self,
        spec: ModelSpec,
        device: str | None = None,
        encoder_dtype: str | torch.dtype | None = None,
        decoder_dtype: str | torch.dtype | None = None,
        int8_linear: bool | None = None,
    ):
        """``int8_linear`` (default: env ICHIGO_INT8_LINEAR=1): opt-in int8 dynamic
        quantization of the float32 linear layers on CPU (see ``quantize_linear_int8``)."""
        self.spec = spec
        self.device = pick_device(device)
        enc_default, dec_default = default_dtypes(spec, self.device)
        env_dec = os.environ.get("ICHIGO_DECODER_DTYPE") or None
        self.encoder_dtype = parse_dtype(encoder_dtype) or enc_default
        self.decoder_dtype = parse_dtype(decoder_dtype) or parse_dtype(env_dec) or dec_default
        bundle: WhisperBundle = load_whisper(spec.whisper_name, spec.base_dir)
        self.whisper = bundle.model.to(self.device)
        self.whisper.model.encoder.to(self.encoder_dtype)
        self.tokenizer = bundle.tokenizer
        self.whisper_source = bundle.source
        self.quantizer: IchigoQuantizer | None = None
        self.quantizer_source: str | None = None
        if spec.quantizer is not None:
            width = self.whisper.config.d_model
            if spec.quantizer.width != width:
                raise ModelConfigError(
                    f"quantizer width {spec.quantizer.width} does not match the Whisper "
                    f"model width {width} ({spec.whisper_name})"
                )
            qpath = spec.quantizer_path()
            self.quantizer = load_quantizer(str(qpath), spec.quantizer).to(self.device)
            self.quantizer_source = str(qpath)
        self.decoder = BatchDecoder(self.whisper, self.tokenizer, spec.decoding, self.decoder_dtype)
        if int8_linear is None:
            int8_linear = os.environ.get("ICHIGO_INT8_LINEAR", "") in ("1", "true", "yes")
        self.int8_linear = int8_linear and quantize_linear_int8(self)
        self.n_mels = self.whisper.config.num_mel_bins
        # Upstream Ichigo pads the log-mel with -1.5; plain Whisper pads it with zeros.
        self.mel_pad_value = -1.5 if spec.is_ichigo else 0.0

    @cached_property
    def provenance(self) -> dict[str, Any]:
        """What produced a result: preset, weight sources and their hashes."""
        info: dict[str, Any] = {"preset": self.spec.name, "whisper": self.whisper_source,
                                "encoder_dtype": str(self.encoder_dtype).removeprefix("torch."),
                                "decoder_dtype": str(self.decoder_dtype).removeprefix("torch."),
                                "int8_linear": bool(self.int8_linear)}
        if self.quantizer_source:
            info["quantizer"] = self.quantizer_source
            info["quantizer_sha256"] = _sha256(Path(self.quantizer_source))
        src = Path(self.whisper_source)
        if src.is_file():
            info["whisper_sha256"] = _sha256(src)
        return info

    def features(self, chunks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return log_mel_batch(chunks, self.n_mels, self.mel_pad_value, self.device)

    @torch.inference_mode()
    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """Encoder output [B, 1500, width] of log-mel [B, n_mels, 3000]."""
        out = self.whisper.model.encoder(mel.to(self.device, self.encoder_dtype))
        return out.last_hidden_state

    def sound_tokens(self, embs: torch.Tensor, n_frames: torch.Tensor) -> list[torch.Tensor]:
        if self.quantizer is None:
            raise ModelConfigError(f"{self.spec.name} is a plain Whisper model: no sound tokens")
        return [t.cpu() for t in self.quantizer.quantize(embs.float(), n_frames)]

    def dequantize(self, stoks: list[torch.Tensor]) -> torch.Tensor:
        if self.quantizer is None:
            raise ModelConfigError(f"{self.spec.name} is a plain Whisper model: no sound tokens")
        for seq in stoks:
            if seq.numel() and (
                int(seq.min()) < 0 or int(seq.max()) >= self.quantizer.config.codebook_size
            ):
                raise ValueError(
                    f"sound token id out of range 0..{self.quantizer.config.codebook_size - 1}"
                )
        return self.quantizer.dequantize(stoks)

    def decode(
        self, audio_features: torch.Tensor, language: str | None = None, prompt: str | None = None
    ) -> list[Decoded]:
        """Text of a batch; ``language`` / ``prompt`` override the preset's for this call."""
        return self.decoder_for(language, prompt).decode(audio_features)

    def decoder_for(self, language: str | None = None, prompt: str | None = None):
        """The preset's decoder, or one sharing its weights with ``language`` and/or
        ``prompt`` replaced (ValueError for a language the model does not know)."""
        changes = {k: v for k, v in (("language", language), ("prompt", prompt)) if v is not None}
        return self.decoder.with_options(**changes)
