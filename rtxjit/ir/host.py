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
            a = np.broadcast_to(np.zeros((), _stand_in_dtype(t)), t.shape)
        values.append(a)
    outs = opdef.run_reference(values, attrs, len(out_types))
    return [np.asarray(o).astype(t.dtype.to_numpy(), copy=False) for o, t in zip(outs, out_types)]


def _stand_in_dtype(t: TensorType):
    """The numpy dtype of a stand-in for data a shape op does not read: the value's own, or, for
    a type numpy lacks (bf16), any (Shape and Size read only the shape)."""
    try:
        return t.dtype.to_numpy()
    except TypeError:
        return np.uint8


def const_type(value: np.ndarray) -> TensorType:
    from rtxjit.ir.types import DType

    return TensorType(DType.from_numpy(value.dtype), tuple(int(d) for d in value.shape))


def host_read_values(graph) -> set:
    """Names of the values that a plan may need on the host: every host input of a node, and,
    through the nodes that produce them with integer or bool outputs (the arithmetic that computes
    shapes: Max, Sub, Div, Concat, Cast ...), the inputs of those nodes in turn. A graph input in this
    set is read on the host as well as uploaded (CenterCropPad computes Pad's pads from its ``shape``
    input). Shape and Size read only their input's type, so the walk stops there."""
    from rtxjit.ir.registry import get_op

    producer = {v.name: node for node in graph.nodes for v in node.outputs if v is not None}
    needed, todo = set(), []
    for node in graph.nodes:
        opdef = get_op(node.op, f"node '{node.name}'", node.version)
        todo += [v for i, v in enumerate(node.inputs) if v is not None and i in opdef.host_inputs]
    while todo:
        v = todo.pop()
        if v.name in needed:
            continue
        needed.add(v.name)
        node = producer.get(v.name)
        if node is None or get_op(node.op, version=node.version).kind is Kind.SHAPE:
            continue
        if all(o is None or not o.type.dtype.is_float for o in node.outputs):
            todo += [i for i in node.inputs if i is not None]
    return needed
