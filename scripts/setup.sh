#!/usr/bin/env bash
# Installs rtxjit and what it needs into the current Python. torch goes first, pinned, so that a
# machine without a GPU gets the CPU build (a plain `torch` requirement would pull a CUDA build);
# where a torch is already installed (a GPU machine) it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
"$PY" -m pip install -q --disable-pip-version-check -e ".[test]"
