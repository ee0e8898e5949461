# Sourced by the other scripts: make (once) and activate the project's cached virtualenv.
# The venv lives under a stable path so CI and later runs reuse it; it is refreshed when
# pyproject.toml changes or the checkout moves.
set -euo pipefail
ICHIGO_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export ICHIGO_CACHE="${ICHIGO_CACHE:-$HOME/.cache/ichigo-batch}"
VENV="${ICHIGO_VENV:-$ICHIGO_CACHE/venv}"
PYTHON_BIN="${ICHIGO_PYTHON:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3

if [ ! -x "$VENV/bin/python" ]; then
  echo "ichigo: creating virtualenv in $VENV" >&2
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON_BIN" -m venv "$VENV"
fi
stamp="$VENV/.ichigo-stamp"
want="$(sha256sum "$ICHIGO_REPO/pyproject.toml" | cut -c1-16) $ICHIGO_REPO"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "ichigo: installing dependencies into $VENV (first run downloads PyTorch)" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ICHIGO_REPO[pipeline,test,offline-models]" 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
  "$VENV/bin/python" -c "import ichigo_pipeline, torch, torchaudio, transformers" \
    || { echo "ichigo: install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
