"""Every ```python block of README.md runs as written (issue 20): each in a fresh Python process,
from a scratch folder that looks like the repository root after the README's set-up (the repository's
top-level entries linked in, and the ``rtxjit demo --save-onnx`` command the README gives run there),
on the CPU through Triton's interpreter. A block added to the README is picked up without a change
here; a block that needs a file must say how to make it (in the README, before it).

A block runs alone: it imports what it uses and defines what it reads (the README's readers copy
one block at a time)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TIMEOUT = 300  # seconds a block may take under the interpreter on a loaded 2-core machine

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


def _blocks(text: str, language: str) -> list:
    """``(heading, line, source)`` of every fenced block of ``language``, in order."""
    out, heading = [], "README"
    headings = [(m.start(), m.group(1).strip()) for m in re.finditer(r"^#+ (.+)$", text, re.M)]
    for m in _FENCE.finditer(text):
        if m.group(1) != language:
            continue
        heading = next((h for start, h in reversed(headings) if start < m.start()), "README")
        out.append((heading, text.count("\n", 0, m.start()) + 1, m.group(2)))
    return out


def _id(heading: str, line: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9]+', '-', heading).strip('-').lower()}-line{line}"


TEXT = README.read_text(encoding="utf-8")
PYTHON_BLOCKS = _blocks(TEXT, "python")


def _setup_commands() -> list:
    """The README's commands that make files for its examples: each ``rtxjit demo --save-onnx``
    line of its bash blocks (the installing commands have run already: this is the test suite)."""
    found = []
    for _, _, source in _blocks(TEXT, "bash"):
        for line in source.splitlines():
            command = line.split("#", 1)[0].strip()
            if command.startswith("rtxjit demo") and "--save-onnx" in command:
                found.append(shlex.split(command)[1:])
    return found


def _env() -> dict:
    env = dict(os.environ)
    env.update(RTXJIT_DEVICE="cpu", TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    # rtxjit from this checkout, as `pip install -e .` would give it, wherever the block runs
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch copy of the repository root: its top-level entries linked (blocks may read them),
    what blocks write lands here, and the README's set-up commands have run in it."""
    folder = tmp_path_factory.mktemp("readme")
    for entry in ROOT.iterdir():
        if entry.name not in (".git", "models") and not entry.name.startswith(".pytest"):
            (folder / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    commands = _setup_commands()
    assert commands, "README.md gives no 'rtxjit demo --save-onnx DIR' command for its examples' files"
    for args in commands:
        r = subprocess.run([sys.executable, "-m", "rtxjit", *args], cwd=folder, env=_env(), capture_output=True,
                           text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"rtxjit {shlex.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return folder


def test_the_readme_has_python_blocks():
    assert len(PYTHON_BLOCKS) >= 3, [h for h, _, _ in PYTHON_BLOCKS]


@pytest.mark.parametrize("heading,line,source", PYTHON_BLOCKS, ids=[_id(h, n) for h, n, _ in PYTHON_BLOCKS])
def test_python_block_runs_as_written(workdir, heading, line, source):
    script = workdir / f"readme_line{line}.py"
    script.write_text(source, encoding="utf-8")
    r = subprocess.run([sys.executable, script.name], cwd=workdir, env=_env(), capture_output=True, text=True,
                       timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, (f"README.md line {line} (section '{heading}') failed with status {r.returncode}:\n"
                               f"--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}")


def test_blocks_are_found_in_order_with_their_headings():
    text = "# A\n\n```python\nx = 1\n```\n\n## B\n\n```bash\nls\n```\n\n```python\ny = 2\n```\n"
    assert _blocks(text, "python") == [("A", 3, "x = 1\n"), ("B", 13, "y = 2\n")]
    assert _blocks(text, "bash") == [("B", 9, "ls\n")]
