"""Side-by-side benchmark: this pipeline against every peer, same audio, same weights, one sitting.

    python bench/compare.py [--quick] [--sections upstream whisper queue]
                            [--models whisper-tiny.en whisper-base] [--queue-files 200]

Sections (each system in a subprocess of its own, one after the other, never two at once):

- ``upstream``: upstream ichigo 0.0.14's serial loop (oracle overlay) vs our pipeline at batch
  1/4/8/16/32, on a random tiny Ichigo model written in upstream's formats (no real Ichigo
  weights offline); tokens and text checked identical per file.
- ``whisper``: plain Whisper, real tiny.en / base weights (from CTranslate2 packages): ours vs
  faster-whisper (int8 and float32, sequential and BatchedInferencePipeline) vs openai-whisper
  vs the transformers ASR pipeline (batched); WER after Whisper's English normalizer.
- ``queue``: REST submit -> Redis -> worker -> store -> .txt vs in-process ``ichigo
  transcribe`` on N files (bench/queue_overhead.py; needs Redis on 127.0.0.1).

Corpus: the English clips of ../shared/speech plus one multi-minute file made by concatenating
them (chunking exercised); ``--quick``: 2 clips and a ~30 s concatenation, fewer systems.
Per system: audio seconds per wall second (model loaded and warmed up first), real-time factor,
peak RSS of its process tree (``os.wait4``), WER, and the ratio to the section's reference.
Writes bench/results/compare-<date>.md (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
SPEECH = REPO.parent / "shared" / "speech"
BATCH_SIZES = (1, 4, 8, 16, 32)


@dataclass(frozen=True)
class Item:
    path: str
    reference: str
    duration_s: float


@dataclass
class Row:
    section: str
    model: str
    system: str
    audio_s: float
    wall_s: float | None = None
    peak_mb: float | None = None
    wer: float | None = None
    note: str = ""
    wer_clips: float | None = None  # the clips alone
    wer_long: float | None = None  # the concatenation alone (chunking at work)
    hyps: dict = field(default_factory=dict, repr=False)
    ids: dict = field(default_factory=dict, repr=False)

    @property
    def speed(self) -> float | None:
        return self.audio_s / self.wall_s if self.wall_s else None


# --- corpus ---------------------------------------------------------------------------------


def english_clips(speech: Path) -> list[Item]:
    from wer import read_manifest

    return [
        Item(str(c.path), c.reference, c.duration_s)
        for c in read_manifest(speech / "manifest.tsv")
        if c.language == "en"
    ]


def concatenate(items: list[Item], out: Path) -> Item:
    """One 16-bit file of the items back to back; its reference is theirs joined."""
    import numpy as np
    import soundfile as sf

    from ichigo_pipeline.audio import load_audio

    wav = np.concatenate([load_audio(i.path).numpy() for i in items])
    sf.write(str(out), np.clip(wav, -1, 1 - 2**-15), 16000, subtype="PCM_16")
    return Item(str(out), " ".join(i.reference for i in items), len(wav) / 16000)


def build_corpus(speech: Path, quick: bool, folder: Path, n_clips: int = 0) -> list[Item]:
    """The clips (first ``n_clips`` if set) plus one file of all of them back to back; quick:
    2 clips plus a concatenation of 5 (about 30 s, two chunks)."""
    clips = english_clips(speech)
    if quick:
        return clips[:2] + [concatenate(clips[:5], folder / "long-quick.wav")]
    clips = clips[:n_clips] if n_clips else clips
    return clips + [concatenate(clips, folder / "long.wav")]


# --- running one system -----------------------------------------------------------------------


def run_child(cmd: list[str], env: dict | None = None, timeout: float = 3600) -> tuple[int, float]:
    """Run ``cmd`` to completion; (exit status, peak RSS in MB of it and its waited children)."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        log.seek(0)
        tail = log.read()[-3000:].decode(errors="replace")
        print(f"FAILED {' '.join(cmd[:3])}...:\n{tail}", file=sys.stderr)
    return proc.returncode, usage.ru_maxrss / 1024


def run_system(script: str, job: dict, scratch: Path, env: dict | None = None) -> dict:
    """``script`` (bench/systems.py or the upstream runner) on ``job``; its JSON plus peak_mb."""
    stamp = f"{len(list(scratch.glob('job-*.json'))):03d}"
    job_path, out_path = scratch / f"job-{stamp}.json", scratch / f"out-{stamp}.json"
    job_path.write_text(json.dumps(job))
    python = job.get("python", sys.executable)
    cmd = [python, str(REPO / "bench" / script), str(job_path), str(out_path)]
    code, peak = run_child(cmd, env)
    if code != 0 or not out_path.exists():
        return {"error": f"exit {code}", "peak_mb": peak}
    return {**json.loads(out_path.read_text()), "peak_mb": peak}


def measured(section: str, model: str, system: str, items: list[Item], out: dict) -> Row:
    row = Row(section, model, system, sum(i.duration_s for i in items), peak_mb=out["peak_mb"])
    if "error" in out:
        row.note = f"failed: {out['error']}"
        return row
    row.wall_s, row.hyps, row.ids = out["wall_s"], out["hyps"], out.get("ids") or {}
    row.wer = corpus_wer(items, row.hyps)
    row.wer_clips, row.wer_long = corpus_wer(items[:-1], row.hyps), corpus_wer(items[-1:], row.hyps)
    print(
        f"  {model} / {system}: {row.wall_s:.1f} s, {row.speed:.2f} audio s/s, "
        f"{row.peak_mb:.0f} MB, WER {fmt_pct(row.wer)}",
        file=sys.stderr,
        flush=True,
    )
    return row


def corpus_wer(items: list[Item], hyps: dict) -> float | None:
    from wer import wer

    from ichigo_pipeline.evaluation import english_normalizer

    norm = english_normalizer()
    refs = [norm(i.reference) for i in items if i.reference.strip()]
    outs = [norm(hyps.get(i.path, "")) for i in items if i.reference.strip()]
    return wer(refs, outs) if refs else None


def fmt_pct(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.2f}"


# --- sections ---------------------------------------------------------------------------------


def section_upstream(items: list[Item], scratch: Path, threads: int, sizes) -> list[Row]:
    """Upstream's serial loop vs ours at several batch sizes on a random tiny Ichigo."""
    from ichigo_pipeline.model import ModelSpec
    from ichigo_pipeline.testing import build_tiny_ichigo
    from ichigo_pipeline.tokenizer import ranks_from_tiktoken_file
    from tests.oracle.client import setup_oracle

    overlay = setup_oracle()
    ranks = ranks_from_tiktoken_file(overlay / "whisper/assets/multilingual.tiktoken")
    options = ModelSpec.resolve("ichigo-asr-2501-en").raw["r2t"]["decoding_options"]
    config = build_tiny_ichigo(scratch / "tiny-ichigo", ranks, decoding_options=options)
    jobs = [{"items": [i.__dict__ for i in items], "threads": threads}]
    env = dict(os.environ, PYTHONPATH=str(overlay), HF_HUB_OFFLINE="1")
    print("upstream ichigo 0.0.14 ...", file=sys.stderr, flush=True)
    up = measured(
        "upstream",
        "random tiny Ichigo",
        "upstream ichigo 0.0.14 (serial chunks)",
        items,
        run_system("upstream_timed.py", {**jobs[0], "config": str(config)}, scratch, env),
    )
    up.note = "reference"
    rows = [up]
    for bs in sizes:
        job = {**jobs[0], "system": "ours", "model": str(config), "options": {"batch_size": bs}}
        row = measured(
            "upstream",
            "random tiny Ichigo",
            f"ichigo-batch, batch {bs}",
            items,
            run_system("systems.py", job, scratch),
        )
        row.note = parity_note(up, row)
        rows.append(row)
    return rows


def parity_note(ref: Row, row: Row) -> str:
    if not ref.hyps or not row.hyps:
        return "n/a"
    same_text = sum(row.hyps.get(p) == t for p, t in ref.hyps.items())
    same_ids = sum(row.ids.get(p) == i for p, i in ref.ids.items())
    return f"text {same_text}/{len(ref.hyps)}, tokens {same_ids}/{len(ref.ids)} files identical"


def whisper_systems(quick: bool) -> list[tuple[str, str, dict, dict]]:
    """(label, system, options, extra env) for the plain-Whisper section."""
    ours = [("ichigo-batch, batch 32", "ours", {"batch_size": 32}, {})]
    ours.append(
        (
            "ichigo-batch, batch 32, int8 linear (opt-in)",
            "ours",
            {"batch_size": 32},
            {"ICHIGO_INT8_LINEAR": "1"},
        )
    )
    fw = [
        (
            f"faster-whisper {ct}{', batched 16' if b else ''}",
            "faster-whisper",
            {"compute_type": ct, "batched": b, "batch_size": 16},
            {},
        )
        for ct in ("int8", "float32")
        for b in (False, True)
    ]
    others = [
        ("openai-whisper transcribe (float32)", "openai-whisper", {}, {}),
        ("transformers ASR pipeline, batch 16", "transformers", {"batch_size": 16}, {}),
    ]
    if quick:
        return ours[:1] + fw[:2]
    return ours + fw + others


def section_whisper(items, scratch, threads, models, quick, only=None) -> list[Row]:
    """Every plain-Whisper system (those whose label contains one of ``only``, if given)."""
    rows = []
    systems = [s for s in whisper_systems(quick) if not only or any(o in s[0] for o in only)]
    for model in models:
        for label, system, options, extra in systems:
            print(f"{model} / {label} ...", file=sys.stderr, flush=True)
            job = {
                "system": system,
                "model": model,
                "options": options,
                "threads": threads,
                "items": [i.__dict__ for i in items],
            }
            env = dict(os.environ, HF_HUB_OFFLINE="1", **extra)
            rows.append(
                measured(
                    "whisper", model, label, items, run_system("systems.py", job, scratch, env)
                )
            )
    return rows


def section_queue(n_files: int, model: str, scratch: Path) -> list[Row]:
    """bench/queue_overhead.py in a child; its JSON gives both walls."""
    out = scratch / "queue.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "queue_overhead.py"),
        "--files",
        str(n_files),
        "--model",
        model,
        "--json",
        str(out),
    ]
    print(f"queue path, {n_files} files ...", file=sys.stderr, flush=True)
    code, peak = run_child(cmd, dict(os.environ, HF_HUB_OFFLINE="1"))
    if code != 0 or not out.exists():
        return [Row("queue", model, "queue path", 0.0, note=f"failed: exit {code}")]
    data = json.loads(out.read_text())
    note = f"{data['files']} files; peak RSS is the whole bench tree"
    return [
        Row(
            "queue",
            model,
            "in-process `ichigo transcribe`",
            data["audio_s"],
            data["inproc_wall_s"],
            peak,
            note="reference; " + note,
        ),
        Row(
            "queue",
            model,
            "REST -> Redis -> worker -> store -> .txt",
            data["audio_s"],
            data["queue_wall_s"],
            peak,
            note=note,
        ),
    ]


# --- report -----------------------------------------------------------------------------------


def table(rows: list[Row], with_wer: bool) -> list[str]:
    """Markdown rows; the first row of each model is the reference of the ratio column."""
    head = ["model", "system", "wall s", "audio s / s", "RTF", "vs reference", "peak RSS MB"]
    head += ["WER %", "WER clips", "WER long"] * with_wer + ["notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    refs: dict[str, Row] = {}
    for row in rows:
        ref = refs.setdefault(row.model, row)
        cells = [row.model, row.system] + [""] * (len(head) - 3) + [row.note]
        if row.wall_s:
            ratio = f"{row.speed / ref.speed:.2f}x" if ref.speed else "n/a"
            cells[2:7] = [
                f"{row.wall_s:.1f}",
                f"{row.speed:.2f}",
                f"{row.wall_s / row.audio_s:.3f}",
                ratio,
                f"{row.peak_mb:.0f}",
            ]
            if with_wer:
                cells[7:10] = [fmt_pct(row.wer), fmt_pct(row.wer_clips), fmt_pct(row.wer_long)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report(rows: list[Row], items: list[Item], args, started: datetime, load: str) -> str:
    from wer import machine_info

    info = machine_info()
    versions = ", ".join(
        f"{k} {info[k]}"
        for k in ("torch", "transformers", "ctranslate2", "faster-whisper", "openai-whisper")
    )
    audio_s = sum(i.duration_s for i in items)
    out = [
        f"# Side-by-side benchmark ({started:%Y-%m-%d}){' — quick' if args.quick else ''}",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; commit {info['commit']}",
        f"- machine: {info['cpu']}, {info['cores']} cores, CPU only; {args.threads} threads "
        f"per system; {load}",
        f"- versions: python {info['python']}, {versions}",
        f"- corpus: {len(items)} files, {audio_s:.1f} s of real English speech "
        f"({len(items) - 1} clips of ../shared/speech + one {items[-1].duration_s:.0f} s "
        "concatenation of them)",
        "- every system runs in its own process, one after the other; timing starts after "
        "model load and a one-file warm-up; peers get decoded waveforms, ours decodes files "
        "inside the timed run; RTF = wall / audio; peak RSS from os.wait4",
        "",
    ]
    for section, title, with_wer in (
        (
            "upstream",
            "Ichigo: upstream's serial loop vs this pipeline (random tiny Ichigo, "
            "fp16 decoding as upstream)",
            False,
        ),
        ("whisper", "Plain Whisper, real weights: this pipeline vs the peers", True),
        ("queue", "Queue path vs in-process", False),
    ):
        rows_here = [r for r in rows if r.section == section]
        if rows_here:
            out += [f"## {title}", "", *table(rows_here, with_wer), ""]
    return "\n".join(out)


def loadavg() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} (1 / 5 min)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 files, few systems")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["upstream", "whisper", "queue"],
        choices=["upstream", "whisper", "queue"],
    )
    parser.add_argument("--models", nargs="+", default=["whisper-tiny.en", "whisper-base"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--queue-files", type=int, default=200)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--speech", type=Path, default=SPEECH)
    parser.add_argument("--clips", type=int, default=0, help="use only the first N clips")
    parser.add_argument(
        "--systems",
        nargs="+",
        default=None,
        help="plain-Whisper systems whose label contains one of these words",
    )
    parser.add_argument(
        "--keep-scratch",
        action="store_true",
        help="keep the corpus, jobs and raw outputs (printed path)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    started = datetime.now(UTC)
    load_before = loadavg()
    scratch = Path(tempfile.mkdtemp(prefix="ichigo-compare-"))
    items = build_corpus(args.speech, args.quick, scratch, args.clips)
    rows: list[Row] = []
    if "upstream" in args.sections:
        sizes = args.batch_sizes[:2] if args.quick else args.batch_sizes
        rows += section_upstream(items, scratch, args.threads, sizes)
    if "whisper" in args.sections:
        rows += section_whisper(items, scratch, args.threads, args.models, args.quick, args.systems)
    if "queue" in args.sections:
        n = min(args.queue_files, 10) if args.quick else args.queue_files
        rows += section_queue(n, args.models[0], scratch)
    load = f"{load_before} at start, {loadavg()} at end"
    text = report(rows, items, args, started, load)
    out = args.out or REPO / "bench" / "results" / f"compare-{started:%Y-%m-%d}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"written to {out}", file=sys.stderr)
    if args.keep_scratch:
        print(f"corpus, jobs and raw outputs kept in {scratch}", file=sys.stderr)
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
