#!/usr/bin/env bash
# Build (once) the overlay directory that makes upstream ichigo==0.0.14 importable as a test
# oracle next to the main venv, without touching that venv.
#
#   usage: bash tests/oracle/setup_oracle.sh PYTHON      (PYTHON = the main venv's python)
#   then:  PYTHONPATH=<printed dir> PYTHON tests/oracle/run_upstream.py ...
#
# The overlay is a plain `pip install --target` directory installed with --no-deps. torch and
# torchaudio are deliberately NOT in it: they come from the main venv. Packages in the overlay
# shadow the main venv's ones when it is first on PYTHONPATH (notably vector_quantize_pytorch
# 1.6.22, which upstream pins, over the project's 1.3x). Everything else upstream needs at import
# is installed only if the main venv lacks it or has a version that does not fit.
#
# Idempotent: a marker file in the overlay makes re-runs instant. The last line of stdout is the
# overlay path; all pip chatter goes to stderr.
set -euo pipefail

PY="${1:?usage: setup_oracle.sh PYTHON}"
CACHE="${ICHIGO_CACHE:-$HOME/.cache/ichigo-batch}"
DIR="$CACHE/oracle-v1"
MARKER="$DIR/.oracle-v1-ok"

# Always installed: upstream itself and the exact versions it was written against.
PINNED=(
  "ichigo==0.0.14"
  "vector_quantize_pytorch==1.6.22"
  "openai-whisper==20250625"
)
# Import-time needs of the above; each is installed only if the main venv does not satisfy it.
# (numba accepts numpy <2.6; a numpy is only added to the overlay if the main one falls outside.)
# huggingface_hub is not listed: run_upstream.py stubs it when absent (it never downloads).
CONDITIONAL=(
  "numba==0.68.1"
  "llvmlite==0.50.0"
  "numpy>=1.22,<2.6"
  "more-itertools"
  "tiktoken"
  "regex"
  "tqdm"
  "einops>=0.6.1"
  "pyyaml"
  "soundfile"
  "cffi"
  "pycparser"
)

mkdir -p "$CACHE"
# Serialise concurrent callers (e.g. parallel test sessions) on one lock file.
exec 9>"$CACHE/oracle-v1.lock"
flock 9

if [[ -f "$MARKER" ]]; then
  echo "$DIR"
  exit 0
fi

# Ask the main interpreter which conditional requirements it does not already satisfy.
# (-P: keep the current directory off sys.path; env -u: judge the main venv alone.)
MISSING=$(env -u PYTHONPATH "$PY" -P - "${CONDITIONAL[@]}" <<'EOF'
import sys
from importlib import metadata
try:
    from packaging.requirements import Requirement
except ImportError:  # fall back on pip's vendored copy
    from pip._vendor.packaging.requirements import Requirement

for spec in sys.argv[1:]:
    req = Requirement(spec)
    try:
        have = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        have = None
    if have is None or not req.specifier.contains(have, prereleases=True):
        print(spec)
EOF
)

# Build into a temporary directory and move it into place only when the import check passes,
# so an interrupted run never leaves a half-built overlay behind.
TMP="$DIR.tmp.$$"
rm -rf "$TMP" "$DIR"
trap 'rm -rf "$TMP"' EXIT
start=$(date +%s)
# shellcheck disable=SC2086  # $MISSING is a newline-separated list of requirement strings
"$PY" -m pip install --no-deps --no-compile --disable-pip-version-check --target "$TMP" \
  "${PINNED[@]}" $MISSING >&2

# Upstream must import, and vector_quantize_pytorch must resolve to the overlay's copy.
PYTHONPATH="$TMP" HF_HUB_OFFLINE=1 "$PY" -P - "$TMP" <<'EOF' >&2
import sys
from importlib import metadata
from pathlib import Path

import ichigo.asr.transcriber  # noqa: F401  (pulls in torch, torchaudio, whisper, vq)
import vector_quantize_pytorch
import whisper  # noqa: F401

overlay = Path(sys.argv[1]).resolve()
assert Path(vector_quantize_pytorch.__file__).resolve().is_relative_to(overlay), \
    vector_quantize_pytorch.__file__
assert metadata.version("vector_quantize_pytorch") == "1.6.22"
print("oracle overlay OK:", vector_quantize_pytorch.__file__)
EOF

mv "$TMP" "$DIR"
trap - EXIT
echo "built in $(( $(date +%s) - start ))s, $(du -sh "$DIR" | cut -f1)" >&2
date -u +%FT%TZ > "$MARKER"
echo "$DIR"
