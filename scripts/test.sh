#!/usr/bin/env bash
# Sets up, then runs the test suite (GPU tests are skipped where no GPU is present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "test: running ${PYTHON:-python3} -m pytest -q -p no:cacheprovider $* (GPU tests skip without a GPU)"
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider "$@"
