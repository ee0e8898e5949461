"""Run upstream ichigo==0.0.14 as a test oracle and write what it computed as JSON.

Run with the overlay made by setup_oracle.sh first on the path, never inside the test process:

    PYTHONPATH=$(bash tests/oracle/setup_oracle.sh $PY | tail -1) $PY tests/oracle/run_upstream.py \
        --config CONFIG.yaml --quantizer QUANT.pth --whisper WHISPER.pt --out OUT.json AUDIO...

For every AUDIO file it calls upstream's own ``IchigoASR.transcribe(path, output_path=None)``.
The upstream objects' methods are wrapped (not reimplemented) to record, per chunk of the main
loop, the chunk length in samples, the sound-token ids, the de-quantized embeddings (saved as
.npy files in ``<OUT stem>_dequant/`` next to OUT.json) and the chunk text. ``get_stoks(path)``
is recorded separately as ``stoks_first_30s``. Everything runs on CPU, offline.

Upstream facts relied on: ``IchigoASR.__init__`` fetches the quantizer through
``ichigo.asr.transcriber.hf_hub_download``; audio is read with ``torchaudio.load`` (which needs
torchcodec on torchaudio >= 2.9, so it is replaced by a soundfile reader giving the same values).
Env: ORACLE_THREADS=N sets torch.set_num_threads(N).
"""

import argparse
import json
import os
import sys
import tempfile
import traceback
import types
import warnings
from importlib import metadata
from pathlib import Path


def _prepare_env():
    """Offline, CPU only. Must run before torch / huggingface_hub are imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # upstream picks cuda whenever it is available
    warnings.filterwarnings("ignore", category=FutureWarning)  # vq 1.6.22's torch.cuda.amp use
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:  # upstream only imports hf_hub_download, which is replaced below anyway
        stub = types.ModuleType("huggingface_hub")
        stub.hf_hub_download = None
        sys.modules["huggingface_hub"] = stub


def _load_audio(path):
    """Stand-in for torchaudio.load: float32 tensor [channels, samples] and the sample rate."""
    import soundfile as sf
    import torch

    data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # [samples, channels]
    return torch.from_numpy(data.T.copy()), sr


def _local_config(config, whisper_path, tmpdir):
    """Copy of the upstream-schema yaml with whisper_name pointing at the local checkpoint."""
    import yaml

    cfg = yaml.safe_load(Path(config).read_text())
    if whisper_path:
        cfg["whisper_name"] = str(Path(whisper_path).resolve())
    out = Path(tmpdir) / "config.yaml"  # upstream wants the .yaml suffix
    out.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return str(out)


class Recorder:
    """Wraps methods of one IchigoASR instance and collects per-chunk results.

    Upstream's chunk loop is s2r(chunk) -> quantizer(embs, n_frames) -> r2t(embeds); the
    quantizer's forward calls self.quantize and self.dequantize, so wrapping those instance
    attributes sees every chunk. get_stoks (also called by transcribe for its metadata) is
    wrapped to switch recording off while it runs.
    """

    def __init__(self, asr):
        self.chunks = None  # list while a transcribe call is being recorded
        self.paused = False
        self._wrap(asr.s2r, "forward", self._on_s2r)
        self._wrap(asr.quantizer, "quantize", self._on_quantize)
        self._wrap(asr.quantizer, "dequantize", self._on_dequantize)
        self._wrap(asr.r2t, "forward", self._on_r2t)
        original_get_stoks = asr.get_stoks

        def get_stoks(*args, **kwargs):
            self.paused = True
            try:
                return original_get_stoks(*args, **kwargs)
            finally:
                self.paused = False

        asr.get_stoks = get_stoks

    def _wrap(self, obj, name, hook):
        original = getattr(obj, name)

        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            if self.chunks is not None and not self.paused:
                hook(args, result)
            return result

        # An instance attribute shadows the class method; nn.Module.__call__ finds it too.
        object.__setattr__(obj, name, wrapper)

    def _on_s2r(self, args, result):
        wav = args[0]  # [1, samples] at 16 kHz
        _, n_frames = result
        self.chunks.append({"n_samples": int(wav.shape[-1]), "n_frames": int(n_frames)})

    def _on_quantize(self, args, stoks):
        self.chunks[-1]["ids"] = stoks.squeeze(0).tolist()

    def _on_dequantize(self, args, embeds):
        self.chunks[-1]["dequant"] = embeds.detach().cpu().float().numpy()

    def _on_r2t(self, args, result):
        self.chunks[-1]["text"] = result[0].text.strip()


def _run_file(asr, recorder, path, dequant_dir, file_index):
    import numpy as np

    recorder.chunks = []
    try:
        text, meta = asr.transcribe(path, output_path=None)
        chunks = recorder.chunks
    finally:
        recorder.chunks = None
    for j, chunk in enumerate(chunks):
        npy = dequant_dir / f"{file_index}_{j}.npy"
        np.save(npy, chunk.pop("dequant"))
        chunk["dequant_path"] = str(npy.resolve())
    stoks = asr.get_stoks(path)  # [1, n] for mono input; squeezed to a flat list
    return {
        "path": str(path),
        "text": text,
        "chunks": chunks,
        "stoks_first_30s": stoks.squeeze(0).tolist(),
        "audio_length": float(meta["audio_length"]),
    }


def _check_quantizer_load(asr, path):
    """Upstream loads the quantizer with strict=False, so a checkpoint whose keys do not fit
    silently leaves random weights. Report which keys did not line up (same key mapping as
    upstream: drop "model.")."""
    import torch

    ckpt = {k.replace("model.", ""): v for k, v in torch.load(path)["state_dict"].items()}
    model = asr.quantizer.state_dict()
    report = {
        "missing": sorted(set(model) - set(ckpt)),
        "unexpected": sorted(set(ckpt) - set(model)),
    }
    if report["missing"]:
        print(f"WARNING: quantizer keys not in checkpoint: {report['missing']}", file=sys.stderr)
    return report


def _versions():
    import vector_quantize_pytorch

    names = "ichigo vector_quantize_pytorch openai-whisper torch torchaudio numpy numba soundfile"
    versions = {}
    for name in names.split():
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["vector_quantize_pytorch_file"] = vector_quantize_pytorch.__file__
    versions["python"] = sys.version.split()[0]
    return versions


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="yaml in upstream's schema")
    parser.add_argument("--quantizer", required=True, help="quantizer checkpoint (.pth)")
    parser.add_argument("--whisper", help="openai-whisper .pt; overrides whisper_name")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("audio", nargs="+")
    args = parser.parse_args(argv)

    _prepare_env()
    import ichigo.asr.transcriber as transcriber
    import torch

    # Let the local files through the two upstream calls that cannot work here.
    quantizer_path = str(Path(args.quantizer).resolve())
    transcriber.hf_hub_download = lambda *a, **k: quantizer_path
    transcriber.torchaudio.load = _load_audio

    torch.manual_seed(0)
    if os.environ.get("ORACLE_THREADS"):
        torch.set_num_threads(int(os.environ["ORACLE_THREADS"]))

    out = Path(args.out)
    dequant_dir = out.parent / f"{out.stem}_dequant"
    dequant_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmpdir:
        asr = transcriber.IchigoASR(config=_local_config(args.config, args.whisper, tmpdir))
    recorder = Recorder(asr)
    load_report = _check_quantizer_load(asr, quantizer_path)

    files = []
    for i, path in enumerate(args.audio):
        try:
            with torch.no_grad():
                files.append(_run_file(asr, recorder, path, dequant_dir, i))
        except Exception as exc:  # one bad file must not stop the others
            traceback.print_exc()
            files.append({"path": str(path), "error": f"{type(exc).__name__}: {exc}"})

    report = {"files": files, "versions": _versions(), "quantizer_load": load_report}
    out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
