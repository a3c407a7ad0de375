"""Graph passes and the pipeline that runs them after import.

The pipeline is one flat list of named steps that reads top to bottom. A new pass is one module in
this package (a function ``Graph -> PassResult``, see ``base.py``) and one line here; the graph
editing helpers it needs are in ``rtxjit.ir.rewrite``.
"""

from __future__ import annotations

from typing import Optional

from rtxjit.errors import UsageError
from rtxjit.ir.graph import Graph
from rtxjit.ir.rewrite import copy_graph
from rtxjit.passes.attention_row_order import attention_row_order
from rtxjit.passes.base import Pass, PassError, PassManager, PassResult, PassTiming, conditions  # noqa: F401
from rtxjit.passes.convert_precision import convert_precision, precision_dtype
from rtxjit.passes.eliminate_common_subexpressions import eliminate_common_subexpressions
from rtxjit.passes.eliminate_dead_code import eliminate_dead_code
from rtxjit.passes.fold_batchnorm import fold_batchnorm
from rtxjit.passes.fold_constants import fold_constants
from rtxjit.passes.fuse_attention import fuse_attention
from rtxjit.passes.fuse_channel_scale import fuse_channel_scale
from rtxjit.passes.fuse_epilogue import fuse_epilogue
from rtxjit.passes.fuse_group_norm import fuse_group_norm
from rtxjit.passes.fuse_norm_matmul import fuse_norm_matmul
from rtxjit.passes.fuse_normalization import fuse_normalization
from rtxjit.passes.fuse_pointwise import fuse_pointwise
from rtxjit.passes.fuse_upsample_conv import fuse_upsample_conv
from rtxjit.passes.merge_parallel_matmuls import merge_parallel_matmuls
from rtxjit.passes.simplify_shapes import simplify_shapes
from rtxjit.passes.fuse_row_gather import absorb_row_gather, fuse_row_gather
from rtxjit.passes.sink_transpose import sink_transpose
from rtxjit.quant.fuse import fuse_quantized

PIPELINE = [
    # canonicalize: drop no-op views and casts, evaluate what is constant
    ("simplify_shapes", simplify_shapes),
    # Q/DQ pairs into quantized products while the weights' DequantizeLinear nodes still stand
    # (fold_constants would make them fp32 constants)
    ("fuse_quantized", fuse_quantized),
    ("fold_constants", fold_constants),
    ("fold_batchnorm", fold_batchnorm),
    ("fuse_normalization", fuse_normalization),
    ("fuse_group_norm", fuse_group_norm),
    # what the rewrites above bypassed goes now: fusion's single-reader checks must see live readers
    # only (simplify_shapes' merged-batch rewrite leaves the repeated K's old Reshape reading it)
    ("eliminate_dead_code", eliminate_dead_code),
    # data movement that reorders whole rows (Swin's roll + window partition) as one Gather
    ("fuse_row_gather", fuse_row_gather),
    # fuse: one product for parallel projections; attention while its scale, mask Add and Casts
    # are still plain nodes; then chains of pointwise ops
    ("merge_parallel_matmuls", merge_parallel_matmuls),
    ("fuse_attention", fuse_attention),
    # the attention writes its rows in the order the projection's readers want (no Transpose after it)
    ("attention_row_order", attention_row_order),
    ("absorb_row_gather", absorb_row_gather),
    ("fuse_norm_matmul", fuse_norm_matmul),
    ("fuse_upsample_conv", fuse_upsample_conv),
    ("fuse_channel_scale", fuse_channel_scale),
    ("sink_transpose", sink_transpose),
    ("fuse_pointwise", fuse_pointwise),
    ("fuse_epilogue", fuse_epilogue),
    # clean up
    ("eliminate_common_subexpressions", eliminate_common_subexpressions),
    ("eliminate_dead_code", eliminate_dead_code),
]


def optimize(graph: Graph, verify: bool = False, dump: Optional[str] = None, steps: Optional[list] = None,
             precision: Optional[str] = None, skip=()) -> tuple:
    """``(optimized graph, [PassTiming])``: the pipeline run on a copy (``graph`` is left as it is).
    ``verify`` runs the IR verifier after every pass; ``dump`` is a directory or "-" (stderr).
    ``precision`` ("fp16" or "bf16") adds ``convert_precision`` after canonicalization (after
    "fold_batchnorm", so BatchNorm folds in fp32; first where the steps have none), before fusion.
    ``skip``: names of pipeline steps left out (RTXJIT_SKIP_PASSES, for an A/B of a pass)."""
    steps = list(PIPELINE if steps is None else steps)
    unknown = set(skip) - {name for name, _ in PIPELINE}
    if unknown:
        raise UsageError(f"RTXJIT_SKIP_PASSES: no pass named {', '.join(sorted(unknown))}; the pipeline's "
                         f"passes are {', '.join(name for name, _ in PIPELINE)}")
    steps = [(name, fn) for name, fn in steps if name not in skip]
    if precision is not None:
        dtype = precision_dtype(precision)
        at = next((i + 1 for i, (name, _) in enumerate(steps) if name == "fold_batchnorm"), 0)
        steps.insert(at, (f"convert_precision_{dtype.short}", lambda g: convert_precision(g, dtype)))
    manager = PassManager(steps, verify=verify, dump=dump)
    result = manager(copy_graph(graph))
    return result.graph, manager.timings
