"""The content hash transcripts are deduplicated on, shared by the workers and the folder
watcher (which must not import the worker)."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path


def content_hash(path: Path) -> tuple[str, int]:
    """(sha256, size) of a regular file. Opened without blocking and checked first: a path
    replaced by a FIFO or a device after it was queued must fail, not hang the reader."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    with os.fdopen(fd, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size
