#!/usr/bin/env bash
# Sets up, then runs the built-in demo models and compares them with onnxruntime.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "demo: running ${PYTHON:-python3} -m rtxjit.cli demo $* (the built-in models against onnxruntime)"
exec "${PYTHON:-python3}" -m rtxjit.cli demo "$@"
