"""``rtxjit ops``: the table of supported ops, read from the op registry; ``docs/ops.md`` is its
``--markdown`` output.

The table says, per op (domain and name): the ONNX versions it has declarations for (a node runs
the newest declaration not above its version, ``rtxjit.ir.registry.get_op``), the dtypes its test
samples run (the data inputs' dtypes across ``tests/test_ops.py``'s cases: what is checked against
onnxruntime, not a guess from the ONNX schema), the kernel kind it lowers onto and notes (host
inputs, fusability, the first line of the declaration's docstring).

The output is deterministic (sorted by domain, name and version; no dates, paths or versions of
the installed packages), because ``tests/test_ops_doc.py`` compares docs/ops.md with it byte for
byte. The markdown lists rtxjit's own ops only (``registry.all_op_versions``); the plain table also
the ops that ``rtxjit.register_op`` added in this process (``registry.custom_ops``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REGENERATE = "python -m rtxjit ops --markdown --output docs/ops.md"

DEFAULT_DOMAIN = "ai.onnx"
# dtypes in this order, then any other alphabetically: the common float types first
_DTYPE_ORDER = ("fp32", "fp16", "bf16", "fp64", "fp8e4m3", "fp8e5m2", "int64", "int32", "int16", "int8",
                "uint16", "uint8", "bool")
_FLOAT_TYPES = ("fp32", "fp16", "bf16", "fp64")

_KIND_NOTES = {
    "alias": "a view of its input: no kernel",
    "shape": "computed on the host",
    "custom": "a user's op (rtxjit.register_op), run by its own Triton kernel",
}


def _domain_and_name(opdef) -> tuple:
    """``(domain, op_type)``: a declaration's own ``domain`` where the registry gives one, else the
    prefix of a dotted name (``rtxjit.Attention`` -> ``rtxjit``), else the default ONNX domain."""
    domain = getattr(opdef, "domain", None)
    name = opdef.name
    if domain:
        prefix = f"{domain}."
        return domain, name[len(prefix):] if name.startswith(prefix) else name
    head, dot, tail = name.rpartition(".")
    return (head, tail) if dot else (DEFAULT_DOMAIN, name)


def _dtype_name(dtype) -> str:
    from rtxjit.ir.types import DType

    try:
        return DType.from_numpy(dtype).short
    except KeyError:
        return np.dtype(dtype).name


def _sample_dtypes(opdef) -> set:
    """The dtypes of the data inputs (not host inputs) over every sample and float type it is run
    in, as tests/oprunner.make_inputs makes them."""
    from rtxjit.ir.registry import Rand

    found = set()
    for sample in opdef.samples:
        for ft in sample.float_types:
            float_type = ft if ft in _FLOAT_TYPES else "fp32"
            for i, spec in enumerate(sample.inputs):
                if spec is None or i in opdef.host_inputs:
                    continue
                if isinstance(spec, Rand):
                    found.add(spec.dtype or float_type)
                else:
                    a = np.asarray(spec)
                    found.add(float_type if a.dtype.kind == "f" else _dtype_name(a.dtype))
    return found


def _sorted_dtypes(dtypes) -> list:
    known = [d for d in _DTYPE_ORDER if d in dtypes]
    return known + sorted(d for d in dtypes if d not in _DTYPE_ORDER)


def _first_sentence(doc) -> str:
    text = " ".join((doc or "").split())
    end = text.find(". ")
    text = text if end < 0 else text[:end + 1]
    return text.replace("|", "\\|")


def _notes(opdef, domain: str) -> list:
    notes = []
    if domain == "rtxjit":
        notes.append("rtxjit's own fused op, made by graph passes (tested with its pass)")
    kind = opdef.kind.value
    if kind in _KIND_NOTES:
        notes.append(_KIND_NOTES[kind])
    if getattr(opdef, "expr_fn", None) is not None:
        notes.append("fusable into pointwise chains and epilogues")
    if opdef.host_inputs:
        where = ", ".join(str(i) for i in opdef.host_inputs)
        notes.append(f"input{'s' if len(opdef.host_inputs) > 1 else ''} {where} read on the host")
    extra = getattr(opdef, "notes", None)
    if isinstance(extra, str) and extra.strip():
        notes.append(_first_sentence(extra))
    doc = _first_sentence(opdef.infer_fn.__doc__)
    if doc:
        notes.append(doc)
    return notes


def op_table(custom: bool = False) -> list:
    """One row per op (all its versions together), sorted by domain (the default ONNX domain
    first) and name: dicts with domain, op, versions, dtypes, kind and notes. rtxjit's own ops, and
    with ``custom`` the ops registered in this process by ``rtxjit.register_op`` too."""
    from rtxjit.ir.registry import all_op_versions, custom_ops

    groups: dict = {}
    for d in all_op_versions() + (custom_ops() if custom else []):
        groups.setdefault(_domain_and_name(d), []).append(d)
    rows = []
    for (domain, name), decls in groups.items():
        decls = sorted(decls, key=lambda d: d.since)
        dtypes = set().union(*(_sample_dtypes(d) for d in decls))
        per = [(d, _notes(d, domain)) for d in decls]
        notes = [n for n in per[0][1] if all(n in ns for _, ns in per)]  # true of every version
        notes += [f"version {d.since}: {n}" for d, ns in per for n in ns if n not in notes]
        kinds = list(dict.fromkeys(d.kind.value for d in decls))
        rows.append({"domain": domain, "op": name, "versions": [d.since for d in decls],
                     "dtypes": _sorted_dtypes(dtypes), "kind": ", ".join(kinds), "notes": notes})
    rows.sort(key=lambda r: (r["domain"] != DEFAULT_DOMAIN, r["domain"], r["op"]))
    return rows


def _versions(versions: list) -> str:
    """``[18, 21]`` -> ``"18-20, 21+"``: the ONNX versions each declaration serves."""
    spans = [str(v) if nxt == v + 1 else f"{v}-{nxt - 1}" for v, nxt in zip(versions, versions[1:])]
    return ", ".join(spans + [f"{versions[-1]}+"])


def ops_markdown() -> str:
    rows = op_table()
    domains = sorted({r["domain"] for r in rows}, key=lambda d: (d != DEFAULT_DOMAIN, d))
    lines = [
        "# Supported ops",
        "",
        f"<!-- Generated from the op registry by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "Generated from rtxjit's op registry (`rtxjit/ops/`), run from the repository root:",
        "",
        "```bash",
        REGENERATE,
        "```",
        "",
        "`tests/test_ops_doc.py` fails when this file is stale. `rtxjit ops` prints the same table for the ops",
        "registered in your process.",
        "",
        "- **domain**: `ai.onnx` is ONNX's default domain (`\"\"` in a model's nodes).",
        "- **versions**: the ONNX op versions each declaration serves (`13+`: version 13 and every newer one;",
        "  `18-20, 21+`: one declaration for 18 to 20, another from 21). A node older than every declaration",
        "  is expanded into its ONNX function body where the schema has one, else refused.",
        "- **dtypes**: the dtypes of the data inputs that the op's test samples run (each sample is checked",
        "  against onnxruntime or the float64 numpy reference in `tests/test_ops.py`). bf16 and fp8 run on",
        "  GPUs that support them (`precision=` converts a model) and are not tested on the CPU.",
        "- **kernel**: the kernel kind the op lowers onto (`rtxjit/codegen/templates/`).",
        "",
        "An op missing here whose ONNX schema has a function body (RotaryEmbedding, Mish, opset-23 Attention,",
        "...) runs as that body, and so do a model's local functions (`rtxjit/onnx/functions.py`).",
        "",
        f"{len(rows)} ops in {len(domains)} domain{'s' if len(domains) != 1 else ''}: "
        + ", ".join(f"{d} ({sum(r['domain'] == d for r in rows)})" for d in domains) + ".",
    ]
    for domain in domains:
        lines += ["", f"## {domain}", "", "| op | versions | dtypes | kernel | notes |", "|---|---|---|---|---|"]
        for r in rows:
            if r["domain"] == domain:
                lines.append(f"| {r['op']} | {_versions(r['versions'])} | {', '.join(r['dtypes']) or '-'} | "
                             f"{r['kind']} | {'; '.join(r['notes'])} |")
    return "\n".join(lines) + "\n"


def _plain_table(rows: list) -> str:
    head = ("domain", "op", "versions", "dtypes", "kernel")
    cells = [[r["domain"], r["op"], _versions(r["versions"]), ", ".join(r["dtypes"]) or "-", r["kind"]]
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(out) + "\n"


def cmd_ops(args) -> int:
    text = ops_markdown() if args.markdown else _plain_table(op_table(custom=True))
    if args.output:
        path = Path(args.output)
        path.write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {path}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
