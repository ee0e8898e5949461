"""A transcript in the response formats of OpenAI's ``/v1/audio/transcriptions``.

Segments are the transcript's chunks (at most 30 s each, cut at quiet points), with their
offsets in the file; the text is the transcript's text, exactly as stored and written to the
sibling ``.txt``. Fields OpenAI fills from sampling statistics this pipeline does not compute
(avg_logprob, compression_ratio, no_speech_prob) are left out rather than invented.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
MEDIA_TYPES = {
    "json": "application/json",
    "verbose_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}


def segments(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chunks with text, as OpenAI-style segments (id, seek, start, end, text)."""
    out = []
    for chunk in chunks:
        text = (chunk.get("text") or "").strip()
        if not text:
            continue
        start = float(chunk.get("offset_s") or 0.0)
        end = start + float(chunk.get("duration_s") or 0.0)
        out.append({"id": len(out), "seek": round(start * 100), "start": round(start, 3),
                    "end": round(end, 3), "text": text, "temperature": 0.0})
    return out


def _clock(seconds: float, sep: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(segs: list[dict[str, Any]]) -> str:
    blocks = [f"{i}\n{_clock(s['start'], ',')} --> {_clock(s['end'], ',')}\n{s['text']}\n"
              for i, s in enumerate(segs, 1)]
    return "\n".join(blocks)


def to_vtt(segs: list[dict[str, Any]]) -> str:
    blocks = [f"{_clock(s['start'], '.')} --> {_clock(s['end'], '.')}\n{s['text']}\n"
              for s in segs]
    return "WEBVTT\n\n" + "\n".join(blocks)


def language_of(chunks: list[dict[str, Any]], default: str | None) -> str | None:
    """The language most chunks were decoded in (detected or set), else ``default``."""
    found = Counter(c["language"] for c in chunks if c.get("language"))
    return found.most_common(1)[0][0] if found else default


def render(fmt: str, text: str, chunks: list[dict[str, Any]], duration_s: float,
           language: str | None) -> tuple[Any, str]:
    """(body, media type): a dict for the JSON formats, a string for the others."""
    if fmt == "json":
        return {"text": text}, MEDIA_TYPES[fmt]
    if fmt == "text":
        return text + "\n", MEDIA_TYPES[fmt]
    segs = segments(chunks)
    if fmt == "srt":
        return to_srt(segs), MEDIA_TYPES[fmt]
    if fmt == "vtt":
        return to_vtt(segs), MEDIA_TYPES[fmt]
    if fmt == "verbose_json":
        return {"task": "transcribe", "language": language_of(chunks, language),
                "duration": round(duration_s, 3), "text": text,
                "segments": segs}, MEDIA_TYPES[fmt]
    raise ValueError(f"response_format must be one of {', '.join(FORMATS)}")
