"""Evaluate nodes whose inputs are all constants, at build time, with the op's numpy reference.

Rewrites:
    op(c1, c2, ...) => c   for every op with a reference, every input constant (or omitted)

The reference runs in float64 on float inputs and its result is cast to the node's output dtype,
so an fp16 node folds to the correctly rounded fp16 value. Not folded: outputs with more than
``numel_limit`` elements, dtypes without a numpy form (bf16, fp8), and views (``Kind.ALIAS``) of a
constant of more than ``SHARED_VIEW_LIMIT`` elements that something else reads too (the view costs
nothing; a folded copy would double a weight). A small one folds: what it feeds may then fold too
(Swin's shifted-window mask, built from a reshaped constant, and its sum with the position bias
ran as two kernels in every shifted block).
Folding keeps the output ``Value``s (and so their names): they become the constants.
"""

from __future__ import annotations

import numpy as np

from rtxjit.ir.graph import Graph, Node
from rtxjit.ir.registry import Kind, get_op
from rtxjit.ir.rewrite import remove_nodes, use_count
from rtxjit.ir.types import numel
from rtxjit.passes.base import PassResult

NUMEL_LIMIT = 1 << 24
SHARED_VIEW_LIMIT = 1 << 16


def fold_constants(graph: Graph, numel_limit: int = NUMEL_LIMIT) -> PassResult:
    uses = graph.consumers()
    folded = [node for node in graph.nodes if _foldable(graph, node, uses, numel_limit) and _fold(node)]
    remove_nodes(graph, folded)
    return PassResult(graph, bool(folded))


def _foldable(graph: Graph, node: Node, uses: dict, numel_limit: int) -> bool:
    opdef = get_op(node.op, f"node '{node.name}'", node.version)
    if opdef.reference_fn is None or not all(v is None or v.is_const for v in node.inputs):
        return False
    if not all(v is None or _has_numpy_dtype(v) for v in node.outputs + node.inputs):
        return False
    for v in node.outputs:
        if v is not None and not (v.type.static and numel(v.type.shape) <= numel_limit):
            return False
    if opdef.kind is Kind.ALIAS:
        data = [v for i, v in enumerate(node.inputs) if v is not None and i not in opdef.host_inputs]
        return all(use_count(graph, v, uses) == 1 or numel(v.type.shape) <= SHARED_VIEW_LIMIT for v in data)
    return True


def _fold(node: Node) -> bool:
    """Turn the node's outputs into constants; always True (for use in a filter)."""
    opdef = get_op(node.op, version=node.version)
    args = [None if v is None else _wide(v.const) for v in node.inputs]
    results = opdef.run_reference(args, node.attrs, len(node.outputs))
    for v, r in zip(node.outputs, results):
        if v is not None:
            # np.array, not np.ascontiguousarray: that one turns a 0-d result into shape (1,)
            v.const = np.array(r, dtype=v.type.dtype.to_numpy(), order="C").reshape(v.type.shape)
    return True


def _has_numpy_dtype(v) -> bool:
    try:
        v.type.dtype.to_numpy()
    except TypeError:
        return False
    return True


def _wide(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64) if a.dtype.kind == "f" else a
