"""What a submission may read, and the audio files it names: validation first, then lazy
expansion.

Validation (``check_inputs``, ``check_path``, ``check_glob``) runs before anything is stored:
every path, glob root, output folder and model file must lie under the allowed roots after
resolving symlinks, percent-decoding and ``~`` included. Expansion (``iter_found``) is a chain
of generators over ``os.scandir`` / ``glob.iglob``: it never lists a whole tree, and it
re-checks every file it yields. ``Sharder`` groups committed file ids into units of work.
Nothing here touches the store or the broker.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

from ichigo_common.audio_types import AUDIO_EXTENSIONS
from ichigo_common.paths import PathRefused, check_allowed

log = logging.getLogger(__name__)

#: Lowercase suffixes of the audio files a folder or glob contributes (explicitly named files
#: are taken whatever their suffix): the pipeline's own set, from its torch-free home.
AUDIO_SUFFIXES: frozenset[str] = AUDIO_EXTENSIONS

_MAGIC = re.compile(r"[*?[]")


@dataclass(frozen=True)
class Inputs:
    """A checked submission: resolved files and folders, validated glob patterns."""

    files: tuple[Path, ...] = ()
    dirs: tuple[Path, ...] = ()
    globs: tuple[str, ...] = ()
    recursive: bool = False

    @property
    def may_overlap(self) -> bool:
        """True when two inputs could name the same file (then expansion de-duplicates)."""
        return bool(self.globs) or len(self.files) + len(self.dirs) > 1


@dataclass(frozen=True)
class Found:
    """One expanded file: its path and size, or why it cannot be queued (``error``)."""

    path: str
    size: int | None
    error: str | None = None


# -- validation ---------------------------------------------------------------------------


def _decodings(text: str) -> list[str]:
    """``text`` and its successive percent-decodings (``%2e%2e`` -> ``..``), until stable."""
    forms = [text]
    for _ in range(4):
        decoded = unquote(forms[-1])
        if decoded == forms[-1]:
            break
        forms.append(decoded)
    return forms


def _require_absolute(text: str, original: str) -> None:
    if not os.path.isabs(text):
        raise PathRefused(f"{original}: not an absolute path (paths are read on the server; "
                          "'~' and relative paths are not expanded)")


def check_path(text: str, roots: tuple[Path, ...]) -> Path:
    """The resolved path if ``text`` (and every percent-decoding of it) lies under ``roots``."""
    _require_absolute(text, text)
    resolved = check_allowed(text, roots)
    for form in _decodings(text)[1:]:  # a layer that percent-decodes must not escape either
        _require_absolute(form, text)
        check_allowed(form, roots)
    return resolved


def glob_root(pattern: str) -> str:
    """The leading part of ``pattern`` without wildcards: the folder the glob starts from."""
    fixed: list[str] = []
    for part in PurePosixPath(pattern).parts:
        if _MAGIC.search(part):
            break
        fixed.append(part)
    return str(PurePosixPath(*fixed)) if fixed else "/"


def check_glob(pattern: str, roots: tuple[Path, ...]) -> str:
    """``pattern`` if it is absolute, has no ``..`` component (literal or percent-encoded:
    a wildcard before it could climb out of any root) and starts under ``roots``."""
    for form in _decodings(pattern):
        _require_absolute(form, pattern)
        if ".." in PurePosixPath(form).parts:
            raise PathRefused(f"{pattern}: '..' is not allowed in a glob")
        check_allowed(glob_root(form), roots)
    return pattern


def check_inputs(paths: Iterable[str], globs: Iterable[str], recursive: bool,
                 roots: tuple[Path, ...]) -> Inputs:
    """Check every input against ``roots`` before anything is created.

    Raises PathRefused (outside the roots, relative, traversal), FileNotFoundError (a path
    under the roots that does not exist) or ValueError (neither file nor folder, no input).
    """
    files: dict[Path, None] = {}
    dirs: dict[Path, None] = {}
    for text in paths:
        resolved = check_path(text, roots)
        try:
            mode = resolved.stat().st_mode
        except FileNotFoundError:
            raise FileNotFoundError(f"{text}: no such file or directory") from None
        if stat.S_ISDIR(mode):
            dirs[resolved] = None
        elif stat.S_ISREG(mode):
            files[resolved] = None
        else:
            raise ValueError(f"{text}: neither a regular file nor a folder")
    patterns = tuple(dict.fromkeys(check_glob(g, roots) for g in globs))
    if not (files or dirs or patterns):
        raise ValueError("nothing to transcribe: give at least one path or glob")
    return Inputs(tuple(files), tuple(dirs), patterns, recursive)


# -- expansion ------------------------------------------------------------------------------


def is_audio(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in AUDIO_SUFFIXES


def _linked_file(path: str, roots: tuple[Path, ...]) -> Found | None:
    """A symlink (or a path through one): queued under its own name if its target is an
    allowed regular file, reported as refused if the target lies outside the roots."""
    try:
        target = check_allowed(path, roots)
    except PathRefused as exc:
        return Found(path, None, f"refused: {exc}")
    try:
        st = target.stat()
    except OSError:
        return None  # dangling link
    return Found(path, st.st_size) if stat.S_ISREG(st.st_mode) else None


def walk(folder: Path, recursive: bool, roots: tuple[Path, ...]) -> Iterator[Found]:
    """Audio files of ``folder`` (resolved, allowed), depth first, one open ``scandir`` per
    level: memory grows with the depth of the tree, never with its size.

    Symlinked folders are not entered (no loops, no escapes). The walk only enters real
    folders from a resolved start, so a plain entry's path is already its resolved path and
    inside the root; symlinked files are resolved and checked one by one.
    """
    stack = [os.scandir(folder)]
    try:
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop().close()
                continue
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        stack.append(os.scandir(entry.path))
                elif is_audio(entry.name):
                    if entry.is_symlink():
                        found = _linked_file(entry.path, roots)
                        if found is not None:
                            yield found
                    elif entry.is_file(follow_symlinks=False):
                        yield Found(entry.path, entry.stat(follow_symlinks=False).st_size)
            except OSError as exc:  # an unreadable sub-folder, a file removed meanwhile
                yield Found(entry.path, None, f"unreadable: {exc.strerror or exc}")
    finally:
        for it in stack:
            it.close()


def glob_files(pattern: str, roots: tuple[Path, ...]) -> Iterator[Found]:
    """Audio files matching ``pattern`` (``**`` spans folders); each match is resolved and
    re-checked, since a wildcard may pass through a symlinked folder."""
    for match in glob.iglob(pattern, recursive=True):
        if not is_audio(os.path.basename(match)):
            continue
        found = _linked_file(os.path.normpath(match), roots)
        if found is not None:
            yield found


def iter_found(inputs: Inputs, roots: tuple[Path, ...]) -> Iterator[Found]:
    """Every file the inputs name, lazily; de-duplicated when inputs may overlap."""
    found = storable(_iter_all(inputs, roots))
    return unique(found) if inputs.may_overlap else found


def storable(found: Iterable[Found]) -> Iterator[Found]:
    """A path the store cannot hold (a name in a legacy encoding, not UTF-8) becomes a
    failed file under a readable form of its name, instead of failing the whole job."""
    for item in found:
        try:
            item.path.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(item.path).decode("utf-8", "backslashreplace")
            yield Found(shown, item.size, "file name is not valid UTF-8; rename it to "
                                          "transcribe it")
            continue
        yield item


def _iter_all(inputs: Inputs, roots: tuple[Path, ...]) -> Iterator[Found]:
    for path in inputs.files:
        try:
            found = Found(str(path), path.stat().st_size)
        except OSError as exc:  # removed since it was checked
            found = Found(str(path), None, f"unreadable: {exc.strerror or exc}")
        yield found
    for folder in inputs.dirs:
        yield from walk(folder, inputs.recursive, roots)
    for pattern in inputs.globs:
        yield from glob_files(pattern, roots)


def unique(found: Iterable[Found]) -> Iterator[Found]:
    """Drop repeated paths, remembering 64-bit hashes only (~70 bytes a file, not the paths).

    Only used when inputs may overlap; a single folder walk never repeats a path."""
    seen: set[int] = set()
    for item in found:
        key = hash(item.path)
        if key not in seen:
            seen.add(key)
            yield item


# -- units of work ----------------------------------------------------------------------


class Sharder:
    """Groups ``(file_id, size)`` pairs into shards of at most ``max_files`` files and
    ``max_bytes`` bytes (a file larger than ``max_bytes`` is a shard of its own). A shard is
    handed out as soon as it is full, so units go out while later files are still found."""

    def __init__(self, max_files: int, max_bytes: int):
        if max_files < 1 or max_bytes < 1:
            raise ValueError("shard limits must be positive")
        self.max_files, self.max_bytes = max_files, max_bytes
        self._ids: list[int] = []
        self._bytes = 0

    def add(self, pairs: Iterable[tuple[int, int | None]]) -> list[list[int]]:
        full: list[list[int]] = []
        for file_id, size in pairs:
            size = size or 0
            if self._ids and self._bytes + size > self.max_bytes:
                full.append(self._take())
            self._ids.append(file_id)
            self._bytes += size
            if len(self._ids) >= self.max_files or self._bytes >= self.max_bytes:
                full.append(self._take())
        return full

    def flush(self) -> list[int] | None:
        return self._take() if self._ids else None

    def _take(self) -> list[int]:
        ids, self._ids, self._bytes = self._ids, [], 0
        return ids
