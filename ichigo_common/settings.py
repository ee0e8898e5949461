"""One settings object per process, read from ``ICHIGO_*`` environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path


def _data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(os.environ.get("ICHIGO_DATA_DIR") or Path(base) / "ichigo-batch")


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw not in (None, "") else default


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw not in (None, "") else default


def _roots(raw: str | None) -> tuple[Path, ...]:
    if not raw:
        return ()
    return tuple(Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip())


@dataclass(frozen=True)
class Settings:
    database_url: str
    broker_url: str
    result_backend: str
    allowed_roots: tuple[Path, ...]
    model: str
    batch_size: int
    max_attempts: int
    lease_seconds: float
    visibility_timeout: float
    task_time_limit: float
    shard_files: int
    shard_bytes: int
    upload_dir: Path = field(default_factory=lambda: _data_dir() / "uploads")
    max_upload_bytes: int = 1024 * 1024 * 1024
    request_timeout: float = 600.0
    sweep_seconds: float = 60.0
    shard_extend_seconds: float = 60.0
    flower_basic_auth: str | None = field(repr=False, default=None)
    api_key: str | None = field(repr=False, default=None)

    @property
    def readable_roots(self) -> tuple[Path, ...]:
        """Where workers may read audio: the allowed roots and the upload folder."""
        return (*self.allowed_roots, self.upload_dir)

    @classmethod
    def from_env(cls) -> Settings:
        data = _data_dir()
        visibility = _float("ICHIGO_VISIBILITY_TIMEOUT", 6 * 3600)
        return cls(
            database_url=os.environ.get("ICHIGO_DATABASE_URL") or f"sqlite:///{data / 'ichigo.db'}",
            broker_url=os.environ.get("ICHIGO_BROKER_URL") or "redis://127.0.0.1:6379/0",
            result_backend=os.environ.get("ICHIGO_RESULT_BACKEND") or "redis://127.0.0.1:6379/1",
            allowed_roots=_roots(os.environ.get("ICHIGO_ALLOWED_ROOTS")),
            model=os.environ.get("ICHIGO_MODEL") or "ichigo-asr-2501-en",
            batch_size=_int("ICHIGO_BATCH_SIZE", 16),
            max_attempts=_int("ICHIGO_MAX_ATTEMPTS", 3),
            lease_seconds=_float("ICHIGO_LEASE_SECONDS", 300),
            visibility_timeout=visibility,
            # a unit of work must end well before the broker re-delivers it
            task_time_limit=_float("ICHIGO_TASK_TIME_LIMIT", visibility * 0.75),
            shard_files=_int("ICHIGO_SHARD_FILES", 32),
            shard_bytes=_int("ICHIGO_SHARD_BYTES", 256 * 1024 * 1024),
            # a worker running out of its shard's files takes more of the same job's for
            # this long (0: never), so its batches stay full across shards
            shard_extend_seconds=_float("ICHIGO_SHARD_EXTEND_SECONDS", 60.0),
            # uploads to the interactive endpoints: a folder the API and every worker share
            upload_dir=Path(os.environ.get("ICHIGO_UPLOAD_DIR") or data / "uploads")
            .expanduser()
            .resolve(),
            max_upload_bytes=_int("ICHIGO_MAX_UPLOAD_BYTES", 1024 * 1024 * 1024),
            # how long an interactive request waits for its answer before a 504
            request_timeout=_float("ICHIGO_REQUEST_TIMEOUT", 600.0),
            # how often each worker looks for files a dead worker left leased (0: never)
            sweep_seconds=_float("ICHIGO_SWEEP_SECONDS", 60.0),
            # "user:password[,user2:password2]" for `ichigo flower`
            flower_basic_auth=os.environ.get("ICHIGO_FLOWER_BASIC_AUTH") or None,
            api_key=os.environ.get("ICHIGO_API_KEY") or None,
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings.from_env()
