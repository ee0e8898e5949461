"""Whisper's tokenizer, built on tiktoken so that prompts encode exactly as upstream does.

The byte-pair ranks come either from a ``*.tiktoken`` file (openai-whisper's format) or from a
Hugging Face ``vocab.json`` / ``tokenizer.json`` (GPT-2 byte-level strings, converted back to
bytes). Special tokens follow Whisper's layout: end-of-text, start-of-transcript, one token per
language, task tokens, then 1,501 timestamp tokens.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import tiktoken

LANGUAGES: tuple[str, ...] = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no "
    "th ur hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw "
    "gl mr pa si km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl "
    "mg as tt haw ln ha ba jw su yue"
).split()

_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
N_TIMESTAMPS = 1501


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def ranks_from_tiktoken_file(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def ranks_from_hf_vocab(vocab: dict[str, int]) -> dict[bytes, int]:
    """Byte-level BPE ranks from a Hugging Face vocabulary (special tokens dropped)."""
    decoder = {ch: b for b, ch in _bytes_to_unicode().items()}
    ranks = {}
    for token, idx in vocab.items():
        if token.startswith("<|") and token.endswith("|>"):
            continue
        ranks[bytes(decoder[ch] for ch in token)] = idx
    ordered = sorted(ranks.values())
    if ordered != list(range(len(ordered))):
        raise ValueError("vocabulary ids are not contiguous from 0: not a Whisper vocabulary")
    return ranks


def ranks_from_hf_dir(directory: Path) -> dict[bytes, int]:
    directory = Path(directory)
    vocab_json = directory / "vocab.json"
    if vocab_json.exists():
        return ranks_from_hf_vocab(json.loads(vocab_json.read_text()))
    tok_json = directory / "tokenizer.json"
    if tok_json.exists():
        return ranks_from_hf_vocab(json.loads(tok_json.read_text())["model"]["vocab"])
    raise FileNotFoundError(f"no vocab.json or tokenizer.json in {directory}")


@dataclass(frozen=True)
class WhisperTokenizer:
    """Token ids and text for one Whisper vocabulary."""

    ranks: dict[bytes, int] = field(repr=False)
    num_languages: int
    multilingual: bool

    @cached_property
    def encoding(self) -> tiktoken.Encoding:
        n_vocab = len(self.ranks)
        specials = [
            "<|endoftext|>",
            "<|startoftranscript|>",
            *[f"<|{lang}|>" for lang in LANGUAGES[: self.num_languages]],
            "<|translate|>",
            "<|transcribe|>",
            "<|startoflm|>",
            "<|startofprev|>",
            "<|nospeech|>",
            "<|notimestamps|>",
            *[f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS)],
        ]
        special_tokens = {tok: n_vocab + i for i, tok in enumerate(specials)}
        return tiktoken.Encoding(
            name=f"whisper-{n_vocab}",
            explicit_n_vocab=n_vocab + len(specials),
            pat_str=_PAT,
            mergeable_ranks=self.ranks,
            special_tokens=special_tokens,
        )

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    def special(self, text: str) -> int:
        return self.encoding.encode_single_token(text)

    @cached_property
    def eot(self) -> int:
        return self.special("<|endoftext|>")

    @cached_property
    def sot(self) -> int:
        return self.special("<|startoftranscript|>")

    @cached_property
    def sot_prev(self) -> int:
        return self.special("<|startofprev|>")

    @cached_property
    def sot_lm(self) -> int:
        return self.special("<|startoflm|>")

    @cached_property
    def transcribe(self) -> int:
        return self.special("<|transcribe|>")

    @cached_property
    def translate(self) -> int:
        return self.special("<|translate|>")

    @cached_property
    def no_speech(self) -> int:
        return self.special("<|nospeech|>")

    @cached_property
    def no_timestamps(self) -> int:
        return self.special("<|notimestamps|>")

    @cached_property
    def timestamp_begin(self) -> int:
        return self.special("<|0.00|>")

    @cached_property
    def language_tokens(self) -> dict[str, int]:
        return {lang: self.special(f"<|{lang}|>") for lang in LANGUAGES[: self.num_languages]}

    def sot_sequence(self, language: str | None, task: str = "transcribe") -> list[int]:
        """The start sequence: ``sot`` alone for English-only models, else sot, language, task.

        ``language=None`` on a multilingual model puts English in the language slot; the
        decoder overwrites it per item after language detection.
        """
        if not self.multilingual:
            return [self.sot]
        lang = (language or "en").lower()
        if lang not in self.language_tokens:
            raise ValueError(f"unsupported language {language!r} for this model")
        task_token = self.transcribe if task == "transcribe" else self.translate
        return [self.sot, self.language_tokens[lang], task_token]

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` with timestamp tokens removed (as Whisper's ``decode``)."""
        return self.encoding.decode([t for t in ids if t < self.timestamp_begin])

    @cached_property
    def non_speech_tokens(self) -> tuple[int, ...]:
        """Tokens for speaker tags and annotations that Whisper suppresses with ``"-1"``."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        miscellaneous = set("♩♪♫♬♭♮♯")
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + sorted(miscellaneous):
            for tokens in (self.encode(symbol), self.encode(" " + symbol)):
                if len(tokens) == 1 or symbol in miscellaneous:
                    result.add(tokens[0])
        return tuple(sorted(result))


def tokenizer_for_vocab(ranks: dict[bytes, int], n_vocab: int) -> WhisperTokenizer:
    """Pick multilingual flag and language count so that the vocabulary size is ``n_vocab``."""
    n_specials = n_vocab - len(ranks)
    num_languages = n_specials - 8 - N_TIMESTAMPS
    if not 0 < num_languages <= len(LANGUAGES):
        raise ValueError(
            f"vocabulary of {len(ranks)} BPE tokens cannot make a Whisper vocab of {n_vocab}"
        )
    multilingual = n_vocab >= 51865
    return WhisperTokenizer(ranks=ranks, num_languages=num_languages, multilingual=multilingual)
