"""Writing results next to the audio: sibling ``<stem>.txt`` files, written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def sibling_txt(audio_path: str | Path, output_dir: str | Path | None = None) -> Path:
    audio_path = Path(audio_path)
    folder = Path(output_dir) if output_dir else audio_path.parent
    return folder / (audio_path.stem + ".txt")


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a hidden temp file in the same folder and a rename,
    so a reader never sees a partial file and a crash never leaves one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
