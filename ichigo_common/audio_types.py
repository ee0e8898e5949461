"""Which file suffixes count as audio: one definition for the pipeline (what it decodes) and
the producer (what a folder, a glob or a watched folder contributes).

It lives here, not in ``ichigo_pipeline.audio``, because that module imports torch and the
producer (API, watcher) must run without it."""

from __future__ import annotations

#: Lowercase file suffixes accepted as audio input. Every one of them is demuxed and decoded
#: by the PyAV build we ship (see tests/test_audio.py).
AUDIO_EXTENSIONS: frozenset[str] = frozenset(
    {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".webm", ".mka", ".wma"}
)
