"""Precision legality: a precision that the target SM cannot run is an error, never a silent change.

    bf16 needs sm_80 (Ampere) or newer; fp8 (e4m3, e5m2) needs sm_89 (Ada) or newer.

FP4 needs sm_100 (Blackwell); the IR has no FP4 dtype yet, so add it to ``MIN_SM`` with the dtype.
Every value that a node reads or produces counts. The error names the node, its op, the dtype, the
value and the SM, as a build error would in TensorRT.
"""

from __future__ import annotations

from rtxjit.errors import UnsupportedOpError
from rtxjit.ir.graph import Graph
from rtxjit.ir.types import DType

MIN_SM = {DType.BF16: 80, DType.FP8E4M3: 89, DType.FP8E5M2: 89}


def check_precision(graph: Graph, sm: int) -> None:
    """Raise UnsupportedOpError at the first node that reads or produces a dtype ``sm`` cannot run."""
    for node in graph.nodes:
        for role, values in (("input", node.inputs), ("output", node.outputs)):
            for v in values:
                if v is None or MIN_SM.get(v.type.dtype, 0) <= sm:
                    continue
                dtype = v.type.dtype.short
                raise UnsupportedOpError(
                    f"node '{node.name}' ({node.op}): {role} '{v.name}' is {dtype}, which needs "
                    f"sm_{MIN_SM[v.type.dtype]} or newer; the target is sm_{sm}")
