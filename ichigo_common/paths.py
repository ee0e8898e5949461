"""Which paths may be read: only those under the allowed roots, after resolving symlinks."""

from __future__ import annotations

from pathlib import Path


class PathRefused(PermissionError):
    """A path outside the allowed roots (or malformed); the message says which and why."""


def check_allowed(path: str | Path, roots: tuple[Path, ...]) -> Path:
    """The resolved path if it lies under one of ``roots``; raises PathRefused otherwise.

    Symlinks are resolved first, so a link inside a root pointing outside is refused. An empty
    ``roots`` refuses everything.
    """
    text = str(path)
    if "\x00" in text:
        raise PathRefused("path contains a NUL byte")
    if not roots:
        raise PathRefused("no allowed roots configured (set ICHIGO_ALLOWED_ROOTS)")
    try:
        resolved = Path(text).expanduser().resolve(strict=False)
    except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError before 3.13)
        raise PathRefused(f"{text}: cannot be resolved (symlink loop?): {exc}") from None
    for root in roots:
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    raise PathRefused(f"{text}: outside the allowed roots")
