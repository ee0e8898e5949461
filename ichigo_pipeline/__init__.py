"""Faithful, batched Ichigo-ASR inference.

``transcribe``, ``get_stoks`` and ``decode_stoks`` mirror upstream Ichigo's API. Heavy modules
(torch, transformers) load on first use, so ``import ichigo_pipeline`` stays cheap.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "transcribe": "api",
    "get_stoks": "api",
    "decode_stoks": "api",
    "get_model": "api",
    "IchigoModel": "model",
    "ModelSpec": "model",
    "BatchPipeline": "pipeline",
    "FileResult": "pipeline",
    "AudioError": "audio",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
