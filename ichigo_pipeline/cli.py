"""The ``ichigo`` command line (in-process transcription; torch loads only when needed)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time


def _transcribe(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .api import expand_inputs, get_model, run_files
    from .audio import probe_duration

    paths = expand_inputs(args.paths, recursive=args.recursive)
    if not paths:
        print("ichigo: no audio files found in the given paths", file=sys.stderr)
        return 2
    model = get_model(args.model, args.device)
    total_s = sum(probe_duration(p) or 0.0 for p in paths)
    bar = tqdm(
        total=round(total_s, 1),
        unit="audio s",
        file=sys.stderr,
        disable=args.quiet,
        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} audio s [{elapsed}<{remaining}]",
    )
    start = time.perf_counter()
    n_ok = n_failed = 0
    audio_s = 0.0
    on_batch = (lambda s: bar.update(round(s, 1))) if not args.quiet else None
    for result in run_files(
        paths,
        model,
        args.batch_size,
        write_txt=not args.no_txt,
        output_dir=args.output_dir,
        on_batch=on_batch,
    ):
        audio_s += result.duration_s
        if result.ok:
            n_ok += 1
        else:
            n_failed += 1
            tqdm.write(f"FAILED {result.path}: {result.error}", file=sys.stderr)
        if args.json:
            print(json.dumps(result.to_json(), ensure_ascii=False), flush=True)
        elif result.ok:
            print(f"{result.path}\t{result.text}", flush=True)
    bar.close()
    wall = time.perf_counter() - start
    print(
        f"files: {n_ok + n_failed} ({n_ok} ok, {n_failed} failed) | audio: {audio_s / 3600:.3f} h"
        f" | wall: {wall:.1f} s | throughput: {audio_s / wall if wall else 0:.1f} audio s/s",
        file=sys.stderr,
    )
    return 1 if n_failed and not n_ok else 0


def _models_list(args: argparse.Namespace) -> int:
    from .offline_models import preset_sources

    rows = preset_sources()
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    mark = {True: "yes", False: "no", None: "-"}
    for row in rows:
        print(
            f"{row['preset']:<24} {row['kind']:<8} ready: {mark[row['ready']]:<4}"
            f" whisper: {row['whisper']} | quantizer: {row['quantizer'] or '-'}"
        )
    return 0


def _models_import_ct2(args: argparse.Namespace) -> int:
    from .ct2_import import import_ct2

    dest = import_ct2(args.src, args.dest, part_dirs=tuple(args.parts_from), overwrite=args.force)
    print(dest)
    return 0


def _add_models_parser(sub) -> None:
    models = sub.add_parser("models", help="list presets' weights; import CTranslate2 models")
    msub = models.add_subparsers(dest="models_command", required=True)
    ls = msub.add_parser("list", help="presets, where their weights come from, if present")
    ls.add_argument("--json", action="store_true", help="one JSON object per preset")
    ls.set_defaults(func=_models_list)
    imp = msub.add_parser(
        "import-ct2", help="convert a CTranslate2 (faster-whisper) Whisper model for transformers"
    )
    imp.add_argument("src", help="folder with model.bin (or model.bin.part*), tokenizer.json")
    imp.add_argument("dest", help="new folder to write (a Hugging Face Whisper directory)")
    imp.add_argument(
        "--parts-from",
        action="append",
        default=[],
        metavar="DIR",
        help="another folder holding model.bin.part<N> files (repeatable)",
    )
    imp.add_argument("--force", action="store_true", help="replace DEST if it exists")
    imp.set_defaults(func=_models_import_ct2)


def register(sub) -> None:
    """Add ``transcribe`` and ``models`` to an ``ichigo`` subparsers object."""
    tr = sub.add_parser("transcribe", help="transcribe files or folders in this process")
    tr.add_argument("paths", nargs="+", help="audio files or folders")
    tr.add_argument("--model", "-m", default=None, help="preset name or upstream-style .yaml")
    from ichigo_common.settings import get_settings

    tr.add_argument(
        "--batch-size",
        "-b",
        type=int,
        default=get_settings().batch_size,
        help="chunks per padded batch (default: ICHIGO_BATCH_SIZE, else 16)",
    )
    tr.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    tr.add_argument("--json", action="store_true", help="one JSON object per file on stdout")
    tr.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    tr.add_argument("--output-dir", default=None, help="write .txt files here, not beside audio")
    tr.add_argument("--no-txt", action="store_true", help="do not write .txt files")
    tr.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    tr.set_defaults(func=_transcribe)
    _add_models_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    """The pipeline-only command line (``python -m ichigo_pipeline.cli``; no store)."""
    parser = argparse.ArgumentParser(
        prog="ichigo", description="Batch transcription with Ichigo-ASR"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse, configure logging, dispatch; user errors become one line on stderr, exit 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, PermissionError) as exc:
        print(f"ichigo: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser", "register", "run"]
