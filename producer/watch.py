"""Watched folders: ``ichigo watch DIR...`` turns audio arriving in folders into jobs.

A file is enqueued once, and only when it is completely written:

- on Linux (inotify) a *close after write* event makes it a candidate at once; a file moved
  or renamed into the folder counts as written;
- every candidate must then keep the same size and mtime for ``settle`` seconds (copies over
  network mounts where no close event arrives, and ``--polling`` mode where only periodic
  scans exist); a file written to with no close event yet (its writer still holds it open)
  must stay unchanged for ``stall`` seconds instead, so a slow writer is not cut short;
- the service's own outputs (``.txt``, hidden temp files) and non-audio files are ignored
  (the same suffix rule as folder submissions, ``producer.expand.is_audio``, on the one
  suffix set ``ichigo_common.audio_types.AUDIO_EXTENSIONS``), as is anything under a
  hidden sub-folder (a folder walk does not enter those either);
- what was submitted is remembered by (path, mtime, size): the same file is not submitted
  again unless its content changes.

Ready files are grouped: a burst becomes one job once no new file has been ready for
``group`` seconds (or 500 files are waiting, or the oldest has waited ``max_wait``), so
workers get full shards. Each group goes through ``submit_job`` (source ``watch``), so it
appears under ``/v1/jobs`` and ``ichigo jobs`` like any other job.

At start (and when a folder that disappeared comes back) the folder is scanned: audio
without a transcript is enqueued; audio whose sibling ``.txt`` exists and whose content the
store already transcribed with the same model is not. A broker that is down keeps the group
waiting (retried with backoff); an unreadable file or a vanished folder is logged, never
fatal (an unreadable file is still submitted, so the worker records it as failed with its
reason, visible in the job). SIGTERM / SIGINT: submit what is ready, then stop.

``FolderWatcher`` (with ``Readiness`` and ``Grouper``) is the logic and knows nothing of
watchdog: tests drive it with paths and clock values. ``WatchService`` is the plumbing.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from ichigo_common.hashing import content_hash
from ichigo_common.paths import PathRefused
from ichigo_common.settings import Settings, get_settings
from ichigo_common.store.repo import Store
from ichigo_common.variants import transcript_key

from .expand import check_inputs, check_path, is_audio, walk
from .queue import BrokerUnavailable

log = logging.getLogger("ichigo.watch")

MAX_GROUP = 500
TICK_S = 0.2
FOLDER_CHECK_S = 1.0  # how often vanished (or replaced) folders are looked for


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    stable_since: float


@dataclass(frozen=True)
class WatchOptions:
    folders: tuple[Path, ...]
    recursive: bool = False
    model: str | None = None
    language: str | None = None
    settle: float = 2.0  # seconds a file must keep its size and mtime
    stall: float = 30.0  # the same, while its writer still holds it open
    group: float = 1.0  # seconds without a new ready file before a group is submitted
    max_wait: float = 10.0  # longest a ready file waits for its group
    polling: bool = False
    poll_interval: float = 1.0


def _signature(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of a regular file, else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not os.path.isfile(path):
        return None
    return st.st_size, st.st_mtime_ns


class Readiness:
    """Files seen but not yet known to be complete; ``ready()`` returns those whose size
    and mtime have not moved for ``settle`` seconds, or for ``stall`` seconds while a writer
    still holds them open (written to, no close-after-write event yet)."""

    def __init__(self, settle: float, stall: float):
        self.settle, self.stall = settle, stall
        self.pending: dict[str, _Candidate] = {}
        self.writing: set[str] = set()

    def seen(self, path: str, now: float, event: str | None = None) -> None:
        if event == "modified":
            self.writing.add(path)
        elif event in ("closed", "moved"):
            self.writing.discard(path)
        sig = _signature(path)
        if sig is None:
            self.pending.pop(path, None)
            self.writing.discard(path)
            return
        old = self.pending.get(path)
        if old is None or (old.size, old.mtime_ns) != sig:
            self.pending[path] = _Candidate(sig[0], sig[1], now)

    def ready(self, now: float) -> list[tuple[str, int, int]]:
        out = []
        for path, cand in list(self.pending.items()):
            wait = self.stall if path in self.writing else self.settle
            if now - cand.stable_since < wait:
                continue
            sig = _signature(path)
            if sig is None:  # gone, or no longer a regular file
                del self.pending[path]
            elif sig != (cand.size, cand.mtime_ns):  # still being written
                self.pending[path] = _Candidate(sig[0], sig[1], now)
            else:
                del self.pending[path]
                self.writing.discard(path)
                out.append((path, cand.size, cand.mtime_ns))
        return out


class Grouper:
    """Ready files waiting to be submitted together."""

    def __init__(self, group: float, max_wait: float, limit: int = MAX_GROUP):
        self.group, self.max_wait, self.limit = group, max_wait, limit
        self.items: dict[str, tuple[int, int]] = {}
        self.first = self.last = 0.0

    def add(self, path: str, size: int, mtime_ns: int, now: float) -> None:
        if not self.items:
            self.first = now
        self.items[path] = (size, mtime_ns)
        self.last = now

    def due(self, now: float) -> bool:
        return bool(self.items) and (len(self.items) >= self.limit
                                     or now - self.last >= self.group
                                     or now - self.first >= self.max_wait)

    def take(self) -> dict[str, tuple[int, int]]:
        items = dict(list(self.items.items())[: self.limit])
        for path in items:
            del self.items[path]
        if self.items:
            self.first = self.last
        return items


class FolderWatcher:
    """The watcher's logic, independent of watchdog: feed it paths (``notify``), call
    ``tick`` regularly; it calls ``submit(paths, name) -> job_id`` for each group."""

    def __init__(self, options: WatchOptions, settings: Settings, store: Store,
                 submit: Callable[[list[str], str], str]):
        self.options, self.settings, self.store, self.submit = options, settings, store, submit
        self.readiness = Readiness(options.settle, max(options.settle, options.stall))
        self.grouper = Grouper(options.group, options.max_wait)
        self.submitted: dict[str, tuple[int, int]] = {}
        self.model = options.model or settings.model
        self.retry_at = 0.0
        self.failures = 0
        self.jobs: list[str] = []

    # -- input ---------------------------------------------------------------------------

    def notify(self, path: str, now: float | None = None, event: str | None = None) -> None:
        """A file may have been created, written (``modified``), closed or moved in."""
        if not is_audio(os.path.basename(path)) or self.folder_of(path) is None:
            return
        self.readiness.seen(path, time.monotonic() if now is None else now, event)

    def folder_of(self, path: str) -> Path | None:
        """The watched folder ``path`` belongs to, or None: outside every folder, deeper than
        a non-recursive watch reaches, or under a hidden sub-folder (which a folder walk
        skips too, so events and catch-up agree)."""
        parent = Path(path).parent
        for folder in self.options.folders:
            if parent == folder:
                return folder
            if self.options.recursive and parent.is_relative_to(folder):
                if not any(p.startswith(".") for p in parent.relative_to(folder).parts):
                    return folder
        return None

    def scan(self, folder: Path) -> int:
        """Catch up with a folder: its audio not yet transcribed becomes candidates."""
        found = 0
        try:
            for item in walk(folder, self.options.recursive, self.settings.allowed_roots):
                if item.error is not None:
                    log.warning("skipped %s: %s", item.path, item.error)
                elif not self._known(item.path) and not self._already_done(item.path):
                    self.notify(item.path)
                    found += 1
        except OSError as exc:
            log.warning("cannot scan %s: %s", folder, exc.strerror or exc)
        return found

    def _known(self, path: str) -> bool:
        """Submitted by this process already with its current size and mtime (a folder
        that comes back is scanned again; what was queued from it needs no hashing)."""
        sig = _signature(path)
        return sig is not None and self.submitted.get(path) == sig

    def _already_done(self, path: str) -> bool:
        """Sibling .txt present and this content transcribed with this model already.

        Any doubt (unreadable file, store unreachable) means "not done": the file is
        queued and the worker either reuses the stored transcript or records the error."""
        if not Path(path).with_suffix(".txt").exists():
            return False
        try:
            digest, _ = content_hash(Path(path))
        except OSError as exc:
            log.warning("cannot read %s: %s", path, exc.strerror or exc)
            return False
        try:
            key = transcript_key(self.model, self.options.language, None)
            return self.store.find_transcript(digest, key) is not None
        except Exception as exc:  # noqa: BLE001 - store down: queue it, the worker dedupes
            log.warning("cannot look up %s in the store: %s", path, exc)
            return False

    # -- output --------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> str | None:
        """Move settled files to the group, submit the group when due; returns a job id."""
        now = time.monotonic() if now is None else now
        added = 0
        for path, size, mtime_ns in self.readiness.ready(now):
            if self.submitted.get(path) == (size, mtime_ns):
                continue  # same content as submitted already
            self.grouper.add(path, size, mtime_ns, now)
            added += 1
        if added:
            log.info("ready: %d more, %d waiting for the burst to end", added,
                     len(self.grouper.items))
        if not self.grouper.due(now) or now < self.retry_at:
            return None
        return self.flush(now)

    def flush(self, now: float | None = None) -> str | None:
        now = time.monotonic() if now is None else now
        items = self.grouper.take()
        paths = self._submittable(items)
        if not paths:
            return None
        try:
            job_id = self.submit(paths, self.job_name(paths))
        except (BrokerUnavailable, ConnectionError) as exc:
            self._retry_later(items, now, f"broker unavailable: {exc}")
            return None
        except Exception as exc:  # noqa: BLE001 - the store is down, ...: keep the files
            self._retry_later(items, now, str(exc))
            return None
        self.failures = 0
        for path in paths:
            self.submitted[path] = items[path]
        self.jobs.append(job_id)
        log.info("job %s: %d files", job_id, len(paths))
        return job_id

    def _submittable(self, items: dict[str, tuple[int, int]]) -> list[str]:
        paths = []
        for path in items:
            try:  # the checks submit_job makes, one file at a time: one bad file alone
                check_inputs([path], (), False, self.settings.allowed_roots)  # is left out
            except (PathRefused, OSError, ValueError) as exc:
                log.warning("skipped %s: %s", path, exc)
                continue
            if _signature(path) is None:
                log.info("skipped %s: gone before it was submitted", path)
                continue
            if not os.access(path, os.R_OK):  # workers may run as another user: still queued
                log.warning("%s is not readable by the watcher; queued anyway, the worker "
                            "records it as failed if it cannot read it either", path)
            paths.append(path)
        return paths

    def job_name(self, paths: list[str]) -> str:
        """``watch <folder>``: the watched folder(s) the group came from."""
        folders = dict.fromkeys(str(self.folder_of(p) or Path(p).parent) for p in paths)
        return ("watch " + ", ".join(folders))[:200]

    def _retry_later(self, items, now: float, reason: str) -> None:
        self.failures += 1
        delay = min(60.0, 2.0 ** min(self.failures, 6))
        self.retry_at = now + delay
        for path, (size, mtime_ns) in items.items():
            self.grouper.add(path, size, mtime_ns, now)
        log.warning("%d files not submitted (%s); retrying in %.0f s", len(items), reason, delay)


# -- watchdog plumbing ---------------------------------------------------------------------


class _Events:
    """watchdog handler: file paths into a queue for the main loop (watchdog's thread never
    touches the store or the broker)."""

    def __init__(self, sink: queue.Queue):
        self.sink = sink

    def dispatch(self, event) -> None:
        kind = event.event_type
        if kind in ("created", "modified", "closed"):
            self.sink.put((event.src_path, event.is_directory, kind))
        elif kind == "moved":
            self.sink.put((event.dest_path, event.is_directory, kind))
        elif kind == "deleted" and event.is_directory:
            self.sink.put((event.src_path, True, kind))


def _identity(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder, None when it is not one (gone, or replaced by a file)."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _observing(observer) -> bool:
    """The observer and its emitter threads run. An inotify emitter stops for good when its
    folder is deleted, even if a new folder (possibly on the same inode) takes its place."""
    if observer is None or not observer.is_alive():
        return False
    emitters = getattr(observer, "emitters", None)
    return emitters is None or (bool(emitters) and all(e.is_alive() for e in emitters))


class WatchService:
    """Observers per folder, re-created when a folder disappears and comes back (or is
    replaced by a new folder between two checks: an inotify watch follows the old inode)."""

    def __init__(self, watcher: FolderWatcher, options: WatchOptions):
        self.watcher, self.options = watcher, options
        self.events: queue.Queue = queue.Queue()
        self.observers: dict[Path, object] = {}
        self.identity: dict[Path, tuple[int, int]] = {}
        self.absent: set[Path] = set()
        self.stopping = threading.Event()

    def _observe(self, folder: Path) -> None:
        if self.options.polling:
            from watchdog.observers.polling import PollingObserver

            observer = PollingObserver(timeout=self.options.poll_interval)
        else:
            from watchdog.observers import Observer

            observer = Observer()
        observer.schedule(_Events(self.events), str(folder), recursive=self.options.recursive)
        observer.start()
        self.observers[folder] = observer
        found = self.watcher.scan(folder)
        log.info("watching %s (%s); %d files to catch up", folder,
                 "polling" if self.options.polling else "events", found)

    def _drop(self, folder: Path, why: str) -> None:
        observer = self.observers.pop(folder, None)
        self.identity.pop(folder, None)
        if observer is not None:
            try:
                observer.stop()
                observer.join(timeout=5)
            except Exception:  # noqa: BLE001 - a dead emitter may fail to stop cleanly
                pass
            log.warning("folder %s %s", folder, why)

    def check_folders(self) -> None:
        """Start an observer for every folder present and not (or no longer) observed;
        stop those whose folder is gone. Called about once a second, so a vanished folder
        is polled for and picked up again, with a catch-up scan, when it comes back."""
        for folder in self.options.folders:
            ident = _identity(folder)
            observer = self.observers.get(folder)
            if ident is None:
                if observer is not None:
                    self._drop(folder, "disappeared; waiting for it to come back")
                elif folder not in self.absent:
                    log.warning("folder %s does not exist; waiting for it", folder)
                self.absent.add(folder)
                continue
            self.absent.discard(folder)
            if _observing(observer) and self.identity.get(folder) == ident:
                continue
            if observer is not None:
                self._drop(folder, "was replaced or its observer stopped; watching it again")
            try:
                self._observe(folder)
                self.identity[folder] = ident
            except OSError as exc:  # e.g. the inotify watch limit
                log.warning("cannot watch %s: %s", folder, exc)

    def drain(self) -> None:
        while True:
            try:
                path, is_dir, kind = self.events.get_nowait()
            except queue.Empty:
                return
            if is_dir:
                if os.path.isdir(path) and self.options.recursive:
                    self.watcher.scan(Path(path))  # a folder moved in brings its files
            else:
                # polling observers report every change as "modified" and have no close
                # events: there the size check alone decides
                self.watcher.notify(path, event=None if self.options.polling else kind)

    def _step(self, check: bool) -> None:
        """One turn of the loop. An unexpected error is logged and the loop goes on: one
        bad file or a store hiccup must not stop the watching of every folder."""
        try:
            if check:
                self.check_folders()
            self.drain()
            self.watcher.tick()
        except Exception:  # noqa: BLE001
            log.exception("watcher step failed; going on")

    def run(self) -> None:
        last_check = -1.0
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                check = last_check < 0 or now - last_check >= FOLDER_CHECK_S
                if check:
                    last_check = now
                self._step(check)
                self.stopping.wait(TICK_S)
            log.info("stopping: submitting what is ready")
            self._step(False)
            self.watcher.flush()  # what is ready goes out before we stop
            left = len(self.watcher.grouper.items) + len(self.watcher.readiness.pending)
            if left:
                log.warning("%d files not submitted; the catch-up at the next start finds "
                            "them", left)
        finally:
            for folder in list(self.observers):
                self.observers.pop(folder).stop()


# -- the command ---------------------------------------------------------------------------


def _folders(texts: Iterable[str], settings: Settings) -> tuple[Path, ...]:
    """The resolved folders, each under the allowed roots (workers refuse anything else, so
    watching it would only queue failures). One that does not exist yet is waited for."""
    folders = []
    for text in texts:
        path = check_path(os.path.abspath(os.path.expanduser(text)), settings.allowed_roots)
        if path.exists() and not path.is_dir():
            raise ValueError(f"{text}: not a folder")
        folders.append(path)
    return tuple(dict.fromkeys(folders))


def _checked_model(options: WatchOptions, settings: Settings) -> str:
    """The model as jobs store it (a .yaml path resolved), so the catch-up looks transcripts
    up under the same key. Raises at start for a model or language every submission would
    be refused for, instead of retrying each group forever."""
    from .enqueue import JobSpec, _check_options

    model, _ = _check_options(JobSpec(model=options.model, language=options.language,
                                      source="watch"), settings)
    return model


def _options(args: argparse.Namespace, settings: Settings) -> WatchOptions:
    from .cli import _model_arg

    options = WatchOptions(_folders(args.folders, settings), args.recursive,
                           _model_arg(args.model), args.language, args.settle, args.stall,
                           args.group, max(args.group, args.max_wait), args.polling)
    return replace(options, model=_checked_model(options, settings))


def run_watch(args: argparse.Namespace) -> int:
    from ichigo_common.store.migrate import ensure_schema

    from .enqueue import submit_job
    from .queue import make_celery

    settings = get_settings()
    try:
        options = _options(args, settings)
    except PathRefused as exc:
        print(f"ichigo: {exc} (ICHIGO_ALLOWED_ROOTS: workers only read under these)",
              file=sys.stderr)
        return 2
    except ValueError as exc:  # not a folder, or an InvalidSubmission (model, language)
        print(f"ichigo: {exc}", file=sys.stderr)
        return 2
    try:
        ensure_schema(settings.database_url)
    except Exception as exc:  # noqa: BLE001
        print(f"ichigo: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    store, celery = Store(settings.database_url), make_celery(settings)

    def submit(paths: list[str], name: str) -> str:
        return submit_job(store, celery, settings, paths=paths, model=options.model,
                          language=options.language, source="watch", name=name)

    service = WatchService(FolderWatcher(options, settings, store, submit), options)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.stopping.set())
    service.run()
    return 0


def register(sub) -> None:
    w = sub.add_parser("watch", help="enqueue audio as it arrives in folders")
    w.add_argument("folders", nargs="+", metavar="DIR", help="folders to watch")
    w.add_argument("-r", "--recursive", action="store_true", help="watch sub-folders too")
    w.add_argument("-m", "--model", default=None, help="preset name or .yaml (default: settings)")
    w.add_argument("--language", default=None, help="language code passed to the workers")
    w.add_argument("--polling", action="store_true",
                   help="scan periodically instead of kernel events (network mounts)")
    w.add_argument("--settle", type=float, default=2.0,
                   help="seconds a file must stay unchanged before it is enqueued")
    w.add_argument("--stall", type=float, default=30.0,
                   help="seconds unchanged before a file still open for writing is taken")
    w.add_argument("--group", type=float, default=1.0,
                   help="seconds without a new file before a burst is submitted as one job")
    w.add_argument("--max-wait", type=float, default=10.0,
                   help="longest a ready file waits for the rest of its burst")
    w.set_defaults(func=run_watch)
