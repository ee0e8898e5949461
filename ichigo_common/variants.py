"""What a transcript was made with, as the one string the store dedupes on.

Two requests for the same content share a transcript only when they would decode alike: the
same model, and the same language and prompt overrides. The preset's own settings are the
plain model name (so existing rows and the watcher's catch-up keep matching); an override
adds a suffix, the prompt by digest (a prompt can be long and private)."""

from __future__ import annotations

import hashlib


def transcript_key(model: str, language: str | None = None, prompt: str | None = None,
                   int8: bool = False) -> str:
    """``int8``: the worker runs the opt-in int8 linear layers (ICHIGO_INT8_LINEAR), whose
    transcripts differ from the exact ones and must not be served for them."""
    parts = ["int8"] if int8 else []
    if language:
        parts.append(f"language={language.lower()}")
    if prompt:
        parts.append("prompt=" + hashlib.sha256(prompt.encode()).hexdigest()[:16])
    return model if not parts else f"{model}[{','.join(parts)}]"
