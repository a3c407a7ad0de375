#!/usr/bin/env bash
# Installs rtxjit and what it needs into the current Python. torch goes first, pinned, so that a
# machine without a GPU gets the CPU build (a plain `torch` requirement would pull a CUDA build);
# where a torch is already installed (a GPU machine) it is kept. Each step is announced before pip
# runs quietly (a fresh machine takes about 70 s), and the versions installed are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "setup: $*"; }
PIP=("$PY" -m pip install -q --disable-pip-version-check)

say "into $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
if ! "$PY" -c "import torch" 2>/dev/null; then
    say "installing torch==2.13.0 (the CPU build where there is no GPU) ..."
    start=$SECONDS
    "${PIP[@]}" "torch==2.13.0"
    say "torch installed in $((SECONDS - start)) s"
else
    say "keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
fi
say "installing rtxjit (editable: pip install -e \".[test]\") with its dependencies and test extras ..."
start=$SECONDS
"${PIP[@]}" -e ".[test]"
say "rtxjit installed in $((SECONDS - start)) s; versions:"
"$PY" - <<'EOF'
import re
from importlib import metadata

# rtxjit's requirements and its test extras (other extras are not installed here), as pip resolved them
wanted = [r for r in metadata.requires("rtxjit") or [] if "extra ==" not in r or re.search(r"extra == .test.", r)]
names = ["rtxjit"] + [re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] for r in wanted]
for name in dict.fromkeys(names):
    try:
        print(f"setup:   {name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"setup:   {name} not installed")
EOF
