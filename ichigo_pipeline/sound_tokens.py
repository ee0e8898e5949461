"""Sound-token strings: ``<|sound_start|><|sound_0042|>...<|sound_end|>``, one segment per chunk.

A file of several chunks is the concatenation of its chunks' segments, so the chunking
survives a round trip through text (upstream's string is the one-chunk case).

No torch import: the producer checks token strings with this module before it queues them.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

START, END = "<|sound_start|>", "<|sound_end|>"
_TOKEN = re.compile(r"<\|sound_(\d{4})\|>")
_SEGMENT = re.compile(r"<\|sound_start\|>(.*?)<\|sound_end\|>", re.S)
MAX_CHUNK_TOKENS = 750  # one 30 s encoder window


class TokenStringError(ValueError):
    """A malformed sound-token string; the message says where."""


@dataclass(frozen=True)
class TokenChunk:
    ids: tuple[int, ...]
    offset_s: float = 0.0
    duration_s: float | None = None


def format_segment(ids: Sequence[int]) -> str:
    return START + "".join(f"<|sound_{int(i):04d}|>" for i in ids) + END


def format_chunks(chunks: Sequence[Sequence[int]]) -> str:
    return "".join(format_segment(c) for c in chunks)


def parse_token_string(text: str) -> list[list[int]]:
    """Chunks of ids in a token string; raises TokenStringError naming the first problem."""
    text = text.strip()
    if not text:
        raise TokenStringError("empty token string")
    chunks: list[list[int]] = []
    pos = 0
    for match in _SEGMENT.finditer(text):
        if text[pos : match.start()].strip():
            raise TokenStringError(
                f"unexpected text {text[pos : match.start()][:40]!r} at character {pos}"
            )
        body = match.group(1)
        ids, inner = [], 0
        for tok in _TOKEN.finditer(body):
            if tok.start() != inner:
                bad = body[inner : tok.start()][:40]
                raise TokenStringError(
                    f"segment {len(chunks) + 1}: {bad!r} is not a <|sound_NNNN|> token"
                )
            ids.append(int(tok.group(1)))
            inner = tok.end()
        if inner != len(body):
            raise TokenStringError(
                f"segment {len(chunks) + 1}: {body[inner:][:40]!r} is not a <|sound_NNNN|> token"
            )
        chunks.append(ids)
        pos = match.end()
    if text[pos:].strip() or not chunks:
        raise TokenStringError(
            f"expected {START}...{END} segments, found {text[pos:][:40]!r} at character {pos}"
        )
    return chunks


def split_long(ids: Sequence[int], size: int = MAX_CHUNK_TOKENS) -> list[list[int]]:
    """A flat id sequence longer than one window, cut into windows of ``size``."""
    ids = list(ids)
    return [ids[i : i + size] for i in range(0, len(ids), size)] or [[]]


def as_chunks(stoks) -> list[list[int]]:
    """Accept what upstream's ``decode_stoks`` accepts and more.

    A token string (one or more segments), a 1-D or ``[1, n]`` tensor / list of ints (one
    sequence, cut into 750-token windows if longer), a list of per-chunk sequences, or
    objects carrying ``.ids`` per chunk (TokenChunk).
    """
    if isinstance(stoks, str):
        return [c for seg in parse_token_string(stoks) for c in split_long(seg)]
    torch = sys.modules.get("torch")  # a tensor can only exist once torch is imported
    is_tensor = (lambda x: isinstance(x, torch.Tensor)) if torch else (lambda x: False)
    if is_tensor(stoks):
        if stoks.dim() == 2 and stoks.shape[0] == 1:
            stoks = stoks[0]
        if stoks.dim() == 1:
            return split_long(stoks.tolist())
        return [row.tolist() for row in stoks]
    items = list(stoks)
    if all(isinstance(x, int) for x in items):
        return split_long(items)
    chunks = []
    for item in items:
        ids = item.ids if isinstance(item, TokenChunk) else item
        ids = ids.tolist() if is_tensor(ids) else list(ids)
        chunks.extend(split_long(ids))
    return chunks
