"""Precision legality: a precision that the target SM cannot run is an error, never a silent change.

    bf16 needs sm_80 (Ampere) or newer; fp8 (e4m3, e5m2) needs sm_89 (Ada) or newer.

FP4 needs sm_100 (Blackwell); the IR has no FP4 dtype yet, so add it to ``MIN_SM`` with the dtype.
Every value that a node reads or produces counts, and so does every step of a fused program
(``rtxjit.Pointwise``, ``rtxjit.Epilogue``): a Cast to fp8 and back fused into one fp32 -> fp32
kernel still computes fp8. The error names the node, its op, the dtype, the value (or the fused
step) and the SM, as a build error would in TensorRT. This is the one check: sessions, engine builds
(every target) and engine loads (the device's SM) all run it (``rtxjit/frontdoor.py``).
"""

from __future__ import annotations

from rtxjit.errors import RtxjitError, UnsupportedOpError
from rtxjit.ir.graph import Graph, Node
from rtxjit.ops.fused import run_program
from rtxjit.ir.registry import get_op
from rtxjit.ir.types import DType

MIN_SM = {DType.BF16: 80, DType.FP8E4M3: 89, DType.FP8E5M2: 89}
FUSED = ("rtxjit.Pointwise", "rtxjit.Epilogue")


def check_precision(graph: Graph, sm: int) -> None:
    """Raise UnsupportedOpError at the first node that reads or produces a dtype ``sm`` cannot run,
    or whose fused program computes one."""
    for node in graph.nodes:
        for role, values in (("input", node.inputs), ("output", node.outputs)):
            for v in values:
                if v is None or MIN_SM.get(v.type.dtype, 0) <= sm:
                    continue
                dtype = v.type.dtype.short
                raise UnsupportedOpError(
                    f"node '{node.name}' ({node.op}): {role} '{v.name}' is {dtype}, which needs "
                    f"sm_{MIN_SM[v.type.dtype]} or newer; the target is sm_{sm}")
    for node in graph.nodes:
        for i, (op, dtype) in enumerate(program_dtypes(node)):
            need = MIN_SM.get(dtype, 0)
            if need > sm:
                raise UnsupportedOpError(f"node '{node.name}' ({node.op}): fused step {i} ({op}) computes "
                                         f"{dtype.short}, which needs sm_{need} or newer; the target is sm_{sm}")


def program_dtypes(node: Node) -> list:
    """``(op, dtype)`` of each step of a fused node's program, by the ops' type inference; [] for
    other nodes (or where inference is not possible from types alone)."""
    program = node.attrs.get("program")
    if node.op not in FUSED or not isinstance(program, tuple):
        return []
    types = [None if v is None else v.type for v in node.inputs]
    out: list = []

    def step(opdef, args, attrs):
        t = opdef.infer(args, attrs, 1)[0]
        out.append((opdef.name, t.dtype))
        return t

    try:
        if node.op == "rtxjit.Epilogue":
            n = node.attrs["n_anchor"]
            product = get_op(node.attrs["anchor"]).infer(types[:n], dict(node.attrs["anchor_attrs"]), 1)[0]
            types = [product] + types[n:]
        run_program(program, types, step)
    except (RtxjitError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        pass
    return out
