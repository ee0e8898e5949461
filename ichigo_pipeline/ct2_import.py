"""Import a CTranslate2 Whisper model (faster-whisper's format) as a transformers directory.

A CTranslate2 Whisper directory holds ``model.bin`` (or ``model.bin.part1``, ``.part2``... to be
concatenated, possibly spread over several directories), ``config.json`` (generation settings)
and ``tokenizer.json`` (+ ``vocabulary.txt`` or ``vocabulary.json``, the model's exact
vocabulary). ``import_ct2`` writes a Hugging Face directory that ``whisper_weights`` and
transformers load: ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32),
``vocab.json``, ``merges.txt``, ``tokenizer.json`` (with the timestamp tokens the shipped file
lacks), ``tokenizer_config.json``, ``preprocessor_config.json`` and ``ct2_import.json``
(provenance). Float32, float16 and bfloat16 sources convert exactly; int8/int16-quantized
sources are refused (de-quantizing them is lossy).

``model.bin`` layout (little endian): uint32 binary version; from version 2 the spec name
(uint16 length counting a trailing NUL, then the bytes) and a uint32 spec revision; uint32
variable count; per variable its name, uint8 rank, uint32 dims[rank], uint8 dtype id and uint32
byte count (versions < 4: uint8 item size and uint32 item count), then the raw data; from
version 3 a uint32 alias count and (alias, target) name pairs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SUPPORTED_BINARY_VERSIONS = range(3, 7)
MAX_WHISPER_SPEC_REVISION = 3
N_TIMESTAMPS = 1501
MAX_NEW_TOKENS = 224  # openai-whisper's and CTranslate2's sample_len (n_text_ctx // 2)

# dtype id -> (name, numpy dtype of the stored items)
_DTYPES: dict[int, tuple[str, str]] = {
    0: ("float32", "<f4"),
    1: ("int8", "i1"),
    2: ("int16", "<i2"),
    3: ("int32", "<i4"),
    4: ("float16", "<f2"),
    5: ("bfloat16", "<u2"),
}
_ITEM_SIZE_DTYPES = {4: 0, 2: 2, 1: 1}  # binary versions < 4 stored only the item size
_FLOAT_DTYPES = {"float32", "float16", "bfloat16"}
_GELU = 3  # CTranslate2's activation enum: RELU 0, GELUTanh 1, SWISH 2, GELU 3, ...


class Ct2ImportError(ValueError):
    """The source is not a CTranslate2 Whisper model this importer can convert exactly."""


class QuantizedModelError(Ct2ImportError):
    """The source stores int8/int16-quantized weights."""


@dataclass(frozen=True)
class Ct2Variable:
    name: str
    shape: tuple[int, ...]
    dtype: str
    data: memoryview = field(repr=False)

    def array(self) -> np.ndarray:
        """The values as a numpy array (float types as float32, a copy)."""
        code = next(c for n, c in _DTYPES.values() if n == self.dtype)
        raw = np.frombuffer(self.data, dtype=code)
        if self.dtype == "bfloat16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        elif self.dtype in _FLOAT_DTYPES:
            raw = raw.astype(np.float32)
        else:
            raw = raw.copy()
        return raw.reshape(self.shape)

    def scalar(self) -> int | float:
        if self.shape not in ((), (1,)):
            raise Ct2ImportError(f"{self.name}: expected a scalar, got shape {self.shape}")
        return self.array().reshape(-1)[0].item()


@dataclass
class Ct2Model:
    binary_version: int
    spec: str
    revision: int
    variables: dict[str, Ct2Variable]
    aliases: dict[str, str]


class _Reader:
    def __init__(self, data: bytes):
        self.view = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.view):
            raise Ct2ImportError(
                f"model.bin is truncated: needs {n} bytes at offset {self.pos}, "
                f"has {len(self.view) - self.pos} (missing part file?)"
            )
        chunk = self.view[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.uint("H")))
        if not raw.endswith(b"\0"):
            raise Ct2ImportError(f"malformed string at offset {self.pos}: no trailing NUL")
        return raw[:-1].decode("utf-8")


def parse_model_bin(data: bytes) -> Ct2Model:
    """Parse a whole ``model.bin`` (already concatenated); every byte must be consumed."""
    reader = _Reader(data)
    version = reader.uint("I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise Ct2ImportError(
            f"unsupported CTranslate2 binary version {version} (supported: "
            f"{SUPPORTED_BINARY_VERSIONS.start}-{SUPPORTED_BINARY_VERSIONS.stop - 1})"
        )
    spec = reader.string()
    revision = reader.uint("I")
    variables: dict[str, Ct2Variable] = {}
    for _ in range(reader.uint("I")):
        name = reader.string()
        rank = reader.uint("B")
        shape = tuple(reader.uint("I") for _ in range(rank))
        if version >= 4:
            type_id = reader.uint("B")
            n_bytes = reader.uint("I")
        else:
            item_size = reader.uint("B")
            if item_size not in _ITEM_SIZE_DTYPES:
                raise Ct2ImportError(f"{name}: unknown item size {item_size}")
            type_id = _ITEM_SIZE_DTYPES[item_size]
            n_bytes = reader.uint("I") * item_size
        if type_id not in _DTYPES:
            raise Ct2ImportError(f"{name}: unsupported dtype id {type_id}")
        dtype, code = _DTYPES[type_id]
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(code).itemsize
        if n_bytes != expected:
            raise Ct2ImportError(f"{name}: {n_bytes} bytes for shape {shape} of {dtype}")
        if name in variables:
            raise Ct2ImportError(f"variable {name} appears twice")
        variables[name] = Ct2Variable(name, shape, dtype, reader.take(n_bytes))
    aliases: dict[str, str] = {}
    for _ in range(reader.uint("I")):
        alias = reader.string()
        aliases[alias] = reader.string()
    if reader.pos != len(data):
        raise Ct2ImportError(
            f"model.bin has {len(data) - reader.pos} unexpected trailing bytes after the "
            f"aliases (offset {reader.pos} of {len(data)}): wrong or extra part files?"
        )
    return Ct2Model(version, spec, revision, variables, aliases)


# --- source files ----------------------------------------------------------------------


def model_bin_files(src_dir: Path, part_dirs: tuple[Path, ...] = ()) -> list[Path]:
    """``model.bin``, or its parts ``model.bin.part<N>`` (N = 1, 2, ...) from all directories."""
    src_dir = Path(src_dir)
    whole = src_dir / "model.bin"
    parts: dict[int, Path] = {}
    for folder in (src_dir, *map(Path, part_dirs)):
        for path in folder.glob("model.bin.part*"):
            match = re.fullmatch(r"model\.bin\.part(\d+)", path.name)
            if not match:
                continue
            index = int(match.group(1))
            if index in parts and parts[index].resolve() != path.resolve():
                raise Ct2ImportError(f"model.bin part {index} found twice: {parts[index]}, {path}")
            parts[index] = path
    if whole.exists():
        if parts:
            raise Ct2ImportError(f"{src_dir} has both model.bin and model.bin.part* files")
        return [whole]
    if not parts:
        raise Ct2ImportError(f"no model.bin (or model.bin.part*) in {src_dir}")
    first = min(parts)
    expected = list(range(first, first + len(parts)))
    if first not in (0, 1) or sorted(parts) != expected:
        raise Ct2ImportError(
            f"model.bin parts must be numbered consecutively from 1, found {sorted(parts)}"
            " (is a part package missing?)"
        )
    return [parts[i] for i in expected]


def read_ct2_model(src_dir: Path, part_dirs: tuple[Path, ...] = ()) -> tuple[Ct2Model, list[Path]]:
    files = model_bin_files(src_dir, part_dirs)
    data = b"".join(p.read_bytes() for p in files)
    return parse_model_bin(data), files


def read_vocabulary(src_dir: Path) -> list[str] | None:
    """The model's vocabulary (one token per id) from ``vocabulary.txt``/``.json``, if shipped."""
    txt, js = Path(src_dir) / "vocabulary.txt", Path(src_dir) / "vocabulary.json"
    if js.exists():
        return list(json.loads(js.read_text(encoding="utf-8")))
    if txt.exists():
        lines = txt.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return lines
    return None


# --- the mapping -----------------------------------------------------------------------


def _check_scalars(model: Ct2Model) -> dict[str, int]:
    """Assert the architecture scalars the mapping relies on; returns the head counts."""
    v = model.variables

    def scalar(name: str, default: int | None = None) -> int:
        if name not in v:
            if default is None:
                raise Ct2ImportError(f"model.bin lacks the scalar {name}")
            return default
        return int(v[name].scalar())

    expected = {
        "decoder/activation": (_GELU, None),
        "decoder/pre_norm": (1, 1),
        "decoder/alibi": (0, 0),
        "decoder/scale_embeddings": (0, None),
        "decoder/start_from_zero_embedding": (0, 0),
        "encoder/activation": (_GELU, _GELU),
        "encoder/pre_norm": (1, 1),
    }
    for name, (want, default) in expected.items():
        got = scalar(name, default)
        if got != want:
            raise Ct2ImportError(f"{name} is {got}, Whisper needs {want}: cannot convert")
    heads = {"encoder": scalar("encoder/num_heads"), "decoder": scalar("decoder/num_heads")}
    for side, n in heads.items():
        if n <= 0:
            raise Ct2ImportError(f"{side}/num_heads is {n}")
    return heads


# CTranslate2 per-layer module -> transformers module (plain 1:1 linears and norms)
_LAYER_MAP = {
    "self_attention/layer_norm": "self_attn_layer_norm",
    "self_attention/linear_1": "self_attn.out_proj",
    "attention/layer_norm": "encoder_attn_layer_norm",
    "attention/linear_0": "encoder_attn.q_proj",
    "attention/linear_2": "encoder_attn.out_proj",
    "ffn/layer_norm": "final_layer_norm",
    "ffn/linear_0": "fc1",
    "ffn/linear_1": "fc2",
}
# fused CTranslate2 projections -> the transformers projections they stack
_FUSED = {
    "self_attention/linear_0": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention/linear_1": ("encoder_attn.k_proj", "encoder_attn.v_proj"),
}
_TOP_MAP = {
    "encoder/conv1/weight": "model.encoder.conv1.weight",
    "encoder/conv1/bias": "model.encoder.conv1.bias",
    "encoder/conv2/weight": "model.encoder.conv2.weight",
    "encoder/conv2/bias": "model.encoder.conv2.bias",
    "encoder/position_encodings/encodings": "model.encoder.embed_positions.weight",
    "encoder/layer_norm/gamma": "model.encoder.layer_norm.weight",
    "encoder/layer_norm/beta": "model.encoder.layer_norm.bias",
    "decoder/embeddings/weight": "model.decoder.embed_tokens.weight",
    "decoder/position_encodings/encodings": "model.decoder.embed_positions.weight",
    "decoder/layer_norm/gamma": "model.decoder.layer_norm.weight",
    "decoder/layer_norm/beta": "model.decoder.layer_norm.bias",
}
# Scalars checked by _check_scalars, used only by CTranslate2's own alignment code, or
# meaningless without ALiBi (newer converters write the last two).
_KNOWN_SCALARS = {
    "decoder/activation",
    "decoder/pre_norm",
    "decoder/alibi",
    "decoder/scale_embeddings",
    "decoder/start_from_zero_embedding",
    "decoder/num_heads",
    "decoder/alignment_heads",
    "decoder/alignment_layer",
    "encoder/activation",
    "encoder/pre_norm",
    "encoder/num_heads",
    "decoder/scale_alibi",
    "decoder/alibi_use_positive_positions",
}
_LEAF = {"gamma": "weight", "beta": "bias", "weight": "weight", "bias": "bias"}
_LAYER_RE = re.compile(r"(encoder|decoder)/layer_(\d+)/(.+)/(gamma|beta|weight|bias)")


def _split_fused(name: str, leaf: str, array: np.ndarray, targets: tuple[str, ...], prefix: str):
    """Rows of a fused projection -> one array per target; the key projection has no bias."""
    pieces = np.split(array, len(targets), axis=0)
    for target, piece in zip(targets, pieces, strict=True):
        if leaf == "bias" and target.endswith("k_proj"):
            if np.any(piece != 0):
                # A constant key bias shifts every score of a query equally: softmax drops it.
                log.warning("%s: non-zero key bias dropped (it cancels in softmax)", name)
            continue
        yield f"{prefix}.{target}.{leaf}", piece


def _map_layer_variable(name: str, array: np.ndarray) -> list[tuple[str, np.ndarray]] | None:
    match = _LAYER_RE.fullmatch(name)
    if not match:
        return None
    side, layer, module, leaf = match.groups()
    if (leaf in ("gamma", "beta")) != module.endswith("layer_norm"):
        return None  # norms hold gamma/beta, linears weight/bias
    prefix = f"model.{side}.layers.{layer}"
    if module.startswith("attention/") and side != "decoder":
        return None
    if module in _FUSED:
        if module == "attention/linear_1" and side != "decoder":
            return None
        return list(_split_fused(name, leaf, array, _FUSED[module], prefix))
    if module in _LAYER_MAP:
        return [(f"{prefix}.{_LAYER_MAP[module]}.{_LEAF[leaf]}", array)]
    return None


def _check_quantization(model: Ct2Model) -> None:
    quantized = sorted(
        name
        for name, var in model.variables.items()
        if var.dtype in ("int8", "int16") and name.endswith("weight")
    )
    scales = sorted(name for name in model.variables if name.endswith("_scale"))
    if quantized or scales:
        example = (quantized or scales)[0]
        dtype = model.variables[example].dtype if quantized else "int8"
        raise QuantizedModelError(
            f"this CTranslate2 model stores {dtype}-quantized weights (e.g. {example}, "
            f"{len(quantized)} in all): de-quantizing them would not give the original Whisper "
            "weights. Use a float32/float16 CTranslate2 export (converter option "
            "--quantization float16), or the original Whisper weights."
        )


def _check_projection(model: Ct2Model, name: str, array: np.ndarray) -> None:
    """An explicit output projection must equal the embeddings (Whisper ties them)."""
    if name == "decoder/projection/weight":
        embeddings = model.variables.get("decoder/embeddings/weight")
        if embeddings is None or not np.array_equal(array, embeddings.array()):
            raise Ct2ImportError(
                "decoder/projection/weight differs from the token embeddings: this "
                "importer only handles Whisper's tied output projection"
            )
    elif name == "decoder/projection/bias":
        if np.any(array != 0):
            raise Ct2ImportError("decoder/projection/bias is not zero: not a Whisper model")
    else:
        raise Ct2ImportError(f"unexpected variable {name}")


def map_variables(model: Ct2Model) -> dict[str, np.ndarray]:
    """transformers state dict (``model.`` names, float32) of a CTranslate2 Whisper model."""
    state: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    for name, var in model.variables.items():
        if var.shape == ():
            if name not in _KNOWN_SCALARS:
                unknown.append(name)
            continue
        if var.dtype not in _FLOAT_DTYPES:
            unknown.append(f"{name} ({var.dtype})")
            continue
        array = var.array()
        if name in _TOP_MAP:
            state[_TOP_MAP[name]] = array
            continue
        if name.startswith("decoder/projection/"):
            _check_projection(model, name, array)
            continue
        mapped = _map_layer_variable(name, array)
        if mapped is None:
            unknown.append(name)
            continue
        for target, piece in mapped:
            state[target] = np.ascontiguousarray(piece)
    if unknown:
        raise Ct2ImportError(
            f"model.bin has {len(unknown)} variables this importer does not know, e.g. "
            f"{unknown[:5]}: not a standard Whisper model"
        )
    _check_aliases(model)
    return state


def _check_aliases(model: Ct2Model) -> None:
    """The only alias Whisper has: the output projection, tied to the token embeddings."""
    projection = model.aliases.get("decoder/projection/weight")
    if projection is None and "decoder/projection/weight" not in model.variables:
        raise Ct2ImportError("model.bin has no decoder/projection/weight (variable or alias)")
    if projection is not None and projection != "decoder/embeddings/weight":
        raise Ct2ImportError(f"decoder/projection/weight is an alias of {projection!r}")
    extra_aliases = set(model.aliases) - {"decoder/projection/weight"}
    if extra_aliases:
        raise Ct2ImportError(f"unexpected aliases in model.bin: {sorted(extra_aliases)}")


def _count_layers(state: dict[str, np.ndarray], side: str) -> int:
    layers = {int(k.split(".")[3]) for k in state if k.startswith(f"model.{side}.layers.")}
    if layers != set(range(len(layers))) or not layers:
        raise Ct2ImportError(f"{side} layers are not numbered 0..n-1: {sorted(layers)}")
    return len(layers)


def whisper_dims(state: dict[str, np.ndarray], heads: dict[str, int]) -> dict[str, int]:
    """openai-whisper's ``dims`` of the mapped weights."""
    for key in _TOP_MAP.values():
        if key not in state:
            raise Ct2ImportError(f"model.bin lacks the variable for {key}")
    conv1 = state["model.encoder.conv1.weight"]
    embed = state["model.decoder.embed_tokens.weight"]
    return {
        "n_mels": conv1.shape[1],
        "n_audio_ctx": state["model.encoder.embed_positions.weight"].shape[0],
        "n_audio_state": conv1.shape[0],
        "n_audio_head": heads["encoder"],
        "n_audio_layer": _count_layers(state, "encoder"),
        "n_vocab": embed.shape[0],
        "n_text_ctx": state["model.decoder.embed_positions.weight"].shape[0],
        "n_text_state": embed.shape[1],
        "n_text_head": heads["decoder"],
        "n_text_layer": _count_layers(state, "decoder"),
    }


# --- tokenizer ---------------------------------------------------------------------------


def _timestamp_tokens() -> list[str]:
    return [f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS)]


def complete_tokenizer_json(tok: dict, vocab_size: int, vocabulary: list[str] | None) -> dict:
    """``tokenizer.json`` with the timestamp tokens appended if missing; checked against the
    model's vocabulary (every id 0..vocab_size-1 must be covered exactly once)."""
    tok = json.loads(json.dumps(tok))  # deep copy
    id_to_token: dict[int, str] = {}
    for token, idx in tok["model"]["vocab"].items():
        id_to_token[idx] = token
    for added in tok.get("added_tokens", []):
        if id_to_token.get(added["id"], added["content"]) != added["content"]:
            raise Ct2ImportError(f"tokenizer.json: id {added['id']} has two tokens")
        id_to_token[added["id"]] = added["content"]
    first_ts = vocab_size - N_TIMESTAMPS
    if first_ts not in id_to_token:
        if max(id_to_token) != first_ts - 1:
            raise Ct2ImportError(
                f"tokenizer.json covers ids up to {max(id_to_token)}; the model's vocabulary "
                f"has {vocab_size} entries ({N_TIMESTAMPS} timestamps): cannot line them up"
            )
        for i, content in enumerate(_timestamp_tokens()):
            tok["added_tokens"].append(
                {
                    "id": first_ts + i,
                    "content": content,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": False,
                }
            )
            id_to_token[first_ts + i] = content
    if sorted(id_to_token) != list(range(vocab_size)):
        raise Ct2ImportError(
            f"tokenizer.json ids do not cover 0..{vocab_size - 1} exactly "
            f"({len(id_to_token)} ids, max {max(id_to_token)})"
        )
    if vocabulary is not None:
        if len(vocabulary) != vocab_size:
            raise Ct2ImportError(f"vocabulary has {len(vocabulary)} tokens, the model {vocab_size}")
        bad = [i for i in range(vocab_size) if id_to_token[i] != vocabulary[i]]
        if bad:
            raise Ct2ImportError(
                f"tokenizer.json disagrees with the model vocabulary at {len(bad)} ids, e.g. "
                f"{bad[0]}: {id_to_token[bad[0]]!r} != {vocabulary[bad[0]]!r}"
            )
    return tok


def _merges_lines(merges: list) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


# Older vocabularies name a few special tokens differently (same ids, same meaning).
_SPECIAL_ALIASES = {"<|iw|>": "<|he|>", "<|nocaptions|>": "<|nospeech|>"}


def _check_our_tokenizer(folder: Path, vocab_size: int, vocabulary: list[str] | None):
    """Our loader reads the written files, and agrees with the model vocabulary on every id."""
    from .tokenizer import _bytes_to_unicode, ranks_from_hf_dir, tokenizer_for_vocab

    tokenizer = tokenizer_for_vocab(ranks_from_hf_dir(folder), vocab_size)
    if tokenizer.n_vocab != vocab_size:
        raise Ct2ImportError(f"our tokenizer has {tokenizer.n_vocab} ids, the model {vocab_size}")
    if vocabulary is not None:
        b2u = _bytes_to_unicode()
        for idx in range(vocab_size):
            raw = tokenizer.encoding.decode_single_token_bytes(idx)
            text = (
                "".join(b2u[b] for b in raw) if idx < len(tokenizer.ranks) else raw.decode("utf-8")
            )
            if text != vocabulary[idx] and _SPECIAL_ALIASES.get(vocabulary[idx]) != text:
                raise Ct2ImportError(
                    f"token {idx}: our tokenizer gives {text!r}, the model {vocabulary[idx]!r}"
                )
    return tokenizer


# --- writing -----------------------------------------------------------------------------


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _build_config(dims: dict[str, int], state: dict[str, np.ndarray], ct2_config: dict):
    from .whisper_weights import config_from_dims

    config = config_from_dims(dims)
    config.encoder_ffn_dim = state["model.encoder.layers.0.fc1.weight"].shape[0]
    config.decoder_ffn_dim = state["model.decoder.layers.0.fc1.weight"].shape[0]
    config.suppress_tokens = list(ct2_config.get("suppress_ids") or [])
    config.begin_suppress_tokens = list(ct2_config.get("suppress_ids_begin") or [])
    return config


def _generation_config(config, tokenizer, ct2_config: dict):
    from transformers import GenerationConfig

    eot = tokenizer.eot
    gen = GenerationConfig(
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=tokenizer.sot,
        max_new_tokens=MAX_NEW_TOKENS,
        suppress_tokens=list(config.suppress_tokens),
        begin_suppress_tokens=list(config.begin_suppress_tokens),
        alignment_heads=[list(pair) for pair in ct2_config.get("alignment_heads") or []],
        no_timestamps_token_id=tokenizer.no_timestamps,
        prev_sot_token_id=tokenizer.sot_prev,
        max_initial_timestamp_index=50,
        is_multilingual=tokenizer.multilingual,
        return_timestamps=False,
    )
    if tokenizer.multilingual:
        gen.lang_to_id = {f"<|{lang}|>": idx for lang, idx in tokenizer.language_tokens.items()}
        gen.task_to_id = {"translate": tokenizer.translate, "transcribe": tokenizer.transcribe}
        gen.task = "transcribe"
    return gen


def _write_tokenizer_files(folder: Path, tok_json: dict, n_mels: int) -> None:
    vocab = tok_json["model"]["vocab"]
    (folder / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False), "utf-8")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    merges = _merges_lines(tok_json["model"].get("merges", []))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    eot = "<|endoftext|>"
    specials = [t["content"] for t in tok_json["added_tokens"] if t.get("special")]
    tokenizer_config = {
        "tokenizer_class": "WhisperTokenizer",
        "model_max_length": 1024,
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "pad_token": eot,
        "add_prefix_space": False,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": [t for t in specials if t != eot],
        "processor_class": "WhisperProcessor",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), "utf-8")
    special_map = {
        k: tokenizer_config[k]
        for k in ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), "utf-8")
    preprocessor = {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": n_mels,
        "sampling_rate": 16000,
        "hop_length": 160,
        "n_fft": 400,
        "chunk_length": 30,
        "n_samples": 480000,
        "nb_max_frames": 3000,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
        "processor_class": "WhisperProcessor",
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2), "utf-8")


def _save_model(folder: Path, config, generation_config, state: dict[str, np.ndarray]) -> None:
    import torch
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if k != "proj_out.weight"]
    if missing or unexpected:
        raise Ct2ImportError(
            f"mapped weights do not fit the Whisper architecture: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    model.tie_weights()
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        raise Ct2ImportError("output projection is not tied to the token embeddings")
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise Ct2ImportError(f"weights left uninitialised: {meta[:3]}")
    model.generation_config = generation_config
    model.eval()
    model.save_pretrained(str(folder))


def import_ct2(
    src_dir: str | Path,
    dest_dir: str | Path,
    part_dirs: tuple[str | Path, ...] = (),
    overwrite: bool = False,
    extra_info: dict | None = None,
) -> Path:
    """Convert the CTranslate2 Whisper model in ``src_dir`` into a transformers directory.

    ``part_dirs``: further directories holding ``model.bin.part<N>`` files (a model split over
    several packages). The result is written to a temporary sibling of ``dest_dir`` and renamed
    into place, so ``dest_dir`` is either absent or complete. Returns ``dest_dir``.
    """
    src_dir, dest_dir = Path(src_dir).expanduser(), Path(dest_dir).expanduser()
    if dest_dir.exists() and not overwrite:
        raise FileExistsError(f"{dest_dir} already exists (pass overwrite=True to replace it)")
    model, files = read_ct2_model(src_dir, tuple(Path(p) for p in part_dirs))
    if model.spec != "WhisperSpec":
        raise Ct2ImportError(f"{src_dir} holds a CTranslate2 {model.spec}, not a WhisperSpec")
    if model.revision > MAX_WHISPER_SPEC_REVISION:
        raise Ct2ImportError(
            f"WhisperSpec revision {model.revision} is newer than this importer knows "
            f"({MAX_WHISPER_SPEC_REVISION})"
        )
    _check_quantization(model)
    heads = _check_scalars(model)
    state = map_variables(model)
    dims = whisper_dims(state, heads)
    for side in ("audio", "text"):
        if dims[f"n_{side}_state"] % dims[f"n_{side}_head"]:
            raise Ct2ImportError(f"{side} width is not a multiple of its head count")

    ct2_config_path = src_dir / "config.json"
    ct2_config = json.loads(ct2_config_path.read_text()) if ct2_config_path.exists() else {}
    tok_path = src_dir / "tokenizer.json"
    if not tok_path.exists():
        raise Ct2ImportError(f"{src_dir} has no tokenizer.json")
    vocabulary = read_vocabulary(src_dir)
    tok_json = complete_tokenizer_json(
        json.loads(tok_path.read_text(encoding="utf-8")), dims["n_vocab"], vocabulary
    )

    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.tmp-", dir=dest_dir.parent))
    try:
        _write_tokenizer_files(tmp, tok_json, dims["n_mels"])
        tokenizer = _check_our_tokenizer(tmp, dims["n_vocab"], vocabulary)
        config = _build_config(dims, state, ct2_config)
        _save_model(tmp, config, _generation_config(config, tokenizer, ct2_config), state)
        dtypes = sorted({v.dtype for v in model.variables.values() if v.shape != ()})
        info = {
            "source": str(src_dir.resolve()),
            "model_bin": [str(p.resolve()) for p in files],
            "model_bin_sha256": _sha256(files),
            "binary_version": model.binary_version,
            "spec": model.spec,
            "spec_revision": model.revision,
            "source_dtypes": dtypes,
            "dims": {k: int(v) for k, v in dims.items()},
            **(extra_info or {}),
        }
        (tmp / "ct2_import.json").write_text(json.dumps(info, indent=2) + "\n", "utf-8")
        _move_into_place(tmp, dest_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("imported CTranslate2 Whisper %s -> %s", src_dir, dest_dir)
    return dest_dir


def _move_into_place(tmp: Path, dest: Path, overwrite: bool) -> None:
    os.chmod(tmp, 0o755)
    for path in tmp.iterdir():
        os.chmod(path, 0o644)
    if dest.exists():
        if not overwrite:
            raise FileExistsError(f"{dest} appeared while converting")
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
