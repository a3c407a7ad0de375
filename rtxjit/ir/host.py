"""Which nodes are evaluated on the host (shape tensors, as in TensorRT) and how.

A node runs on the host when its op is a shape op (Shape, Size, Constant) or when all its inputs are
known on the host and its outputs are small integer or bool tensors: the arithmetic that computes
Reshape targets, Slice bounds and the like. Everything else is computed by generated kernels.
"""

from __future__ import annotations

import numpy as np

from rtxjit.ir.registry import Kind, OpDef
from rtxjit.ir.types import TensorType, is_static

HOST_NUMEL_LIMIT = 1024


def runs_on_host(opdef: OpDef, inputs_known: bool, out_types) -> bool:
    if opdef.kind is Kind.SHAPE:
        return True
    if not inputs_known or opdef.reference_fn is None:
        return False
    for t in out_types:
        if not is_static(t.shape) or t.dtype.is_float:
            return False
        n = 1
        for d in t.shape:
            n *= d
        if n > HOST_NUMEL_LIMIT:
            return False
    return True


def evaluate(opdef: OpDef, args: list, types: list, attrs: dict, out_types) -> list:
    """Run the op's numpy reference on host values. ``args`` holds arrays or None (omitted);
    a shape op's data inputs may be unknown: a zero-cost array of the right shape stands in."""
    values = []
    for a, t in zip(args, types):
        if a is None and t is not None:
            a = np.broadcast_to(np.zeros((), t.dtype.to_numpy()), t.shape)
        values.append(a)
    outs = opdef.run_reference(values, attrs, len(out_types))
    return [np.asarray(o).astype(t.dtype.to_numpy(), copy=False) for o, t in zip(outs, out_types)]


def const_type(value: np.ndarray) -> TensorType:
    from rtxjit.ir.types import DType

    return TensorType(DType.from_numpy(value.dtype), tuple(int(d) for d in value.shape))
