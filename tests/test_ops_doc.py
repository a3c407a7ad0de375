"""docs/ops.md is the op registry's table (``rtxjit ops --markdown``, rtxjit/cli/ops.py) and must
be current: whoever adds or changes an op regenerates it (the failure says how)."""

import difflib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import triton
import triton.language as tl

import rtxjit
from rtxjit.cli.ops import REGENERATE, _domain_and_name, _versions, op_table, ops_markdown

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ops.md"


def _fresh_markdown() -> str:
    """The table of a fresh process: only the built-in ops (a test of this process may have
    registered ops of its own)."""
    r = subprocess.run([sys.executable, "-m", "rtxjit", "ops", "--markdown"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_docs_ops_md_is_current():
    want = _fresh_markdown()
    have = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    if have != want:
        diff = difflib.unified_diff(have.splitlines(True), want.splitlines(True), "docs/ops.md (committed)",
                                    "docs/ops.md (from the registry)")
        diff = "".join(list(diff)[:60])
        raise AssertionError(f"docs/ops.md is stale: the op registry changed. Regenerate it from the repository root "
                             f"with\n\n    {REGENERATE}\n\nand commit it. Difference (first lines):\n{diff}")


def test_the_table_is_deterministic_and_covers_every_declaration():
    from rtxjit.ir.registry import all_op_versions

    assert ops_markdown() == ops_markdown()
    rows = op_table()
    listed = {(r["domain"], r["op"]) for r in rows}
    assert listed == {_domain_and_name(d) for d in all_op_versions()}
    gn = next(r for r in rows if r["op"] == "GroupNormalization")
    assert gn["domain"] == "ai.onnx" and gn["versions"] == [18, 21] and {"fp32", "fp16"} <= set(gn["dtypes"])
    gather = next(r for r in rows if r["op"] == "Gather")
    assert "int64" in gather["dtypes"]  # the indices
    attention = next(r for r in rows if r["domain"] == "rtxjit" and r["op"] == "Attention")
    assert attention["kind"] == "attention"


def test_versions_and_domains_are_spelled_as_the_doc_says():
    assert _versions([13]) == "13+"
    assert _versions([18, 21]) == "18-20, 21+"
    assert _versions([1, 2, 9]) == "1, 2-8, 9+"
    assert _domain_and_name(SimpleNamespace(name="Relu")) == ("ai.onnx", "Relu")
    assert _domain_and_name(SimpleNamespace(name="rtxjit.Attention")) == ("rtxjit", "Attention")
    assert _domain_and_name(SimpleNamespace(name="com.example.Swish")) == ("com.example", "Swish")
    # a declaration that carries its domain (custom ops) keeps its plain name
    assert _domain_and_name(SimpleNamespace(name="Swish", domain="com.example")) == ("com.example", "Swish")
    assert _domain_and_name(SimpleNamespace(name="com.example.Swish", domain="com.example")) == \
        ("com.example", "Swish")


@triton.jit
def _double(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)


def test_ops_a_user_registers_are_listed_but_never_documented():
    before = ops_markdown()
    rtxjit.register_op("doc.test", "Double", infer=lambda x: x, reference=lambda x: 2 * x, kernel=_double,
                       grid=lambda x, y: (triton.cdiv(x.numel, 64),), args=lambda x, y: (x.numel,),
                       meta={"BLOCK": 64})
    try:
        rows = [r for r in op_table(custom=True) if r["domain"] == "doc.test"]
        assert [(r["op"], r["versions"], r["kind"]) for r in rows] == [("Double", [1], "custom")]
        assert "rtxjit.register_op" in rows[0]["notes"][0]
        assert ops_markdown() == before and "doc.test" not in before
    finally:
        rtxjit.unregister_op("doc.test", "Double")
