"""Merge MatMuls that read the same input with constant weights into one wider MatMul.

Rewrites (the Q, K and V projections of attention are the case that matters):
    Add(MatMul(x, W1), b1), Add(MatMul(x, W2), b2), ...
        => y = Add(MatMul(x, [W1 W2 ...]), [b1 b2 ...]);  Slice(y, last axis) for each branch

The Slices are views (no copy): their readers — Reshape, then attention reading through strides —
take them as they are. One launch replaces several, and the wider product uses the GPU better.
Only branches whose weight is a 2-D constant with the same K and dtype, whose product has no other
reader, and (if present) whose bias Add adds a constant [N] vector are merged.
"""

from __future__ import annotations

import numpy as np

from rtxjit.ir.graph import Graph, Node
from rtxjit.ir.rewrite import FreshNames, is_graph_output, make_constant, make_node, remove_nodes, \
    replace_all_uses, sort_topologically
from rtxjit.passes.base import PassResult


def merge_parallel_matmuls(graph: Graph) -> PassResult:
    uses = graph.consumers()
    names = FreshNames(graph)
    merged = 0
    for value_name, readers in list(uses.items()):
        branches = [b for b in (_branch(graph, n, uses) for n, i in readers if i == 0) if b is not None]
        groups: dict = {}
        for b in branches:
            w = b[0].inputs[1]
            groups.setdefault((w.type.shape[0], w.type.dtype), []).append(b)
        for group in groups.values():
            if len(group) > 1:
                _merge(graph, group, names)
                merged += 1
    if merged:
        sort_topologically(graph)
    return PassResult(graph, merged > 0)


def _branch(graph: Graph, matmul: Node, uses: dict):
    """(MatMul, bias Add or None, bias array or None) if ``matmul`` can join a merge."""
    if matmul.op != "MatMul" or matmul.inputs[0].is_const:
        return None
    w = matmul.inputs[1]
    out = matmul.outputs[0]
    if not w.is_const or w.type.rank != 2 or is_graph_output(graph, out):
        return None
    readers = uses.get(out.name, [])
    if len(readers) != 1:
        return None
    add, _ = readers[0]
    if add.op != "Add":
        return matmul, None, None
    bias = next((v for v in add.inputs if v is not out), None)
    if bias is None or not bias.is_const or bias.type.shape != (w.type.shape[1],) or is_graph_output(graph, out):
        return matmul, None, None
    return matmul, add, bias.const


def _merge(graph: Graph, group: list, names: FreshNames) -> None:
    x = group[0][0].inputs[0]
    weights = [m.inputs[1].const for m, _, _ in group]
    dtype = weights[0].dtype
    biases = [b if b is not None else np.zeros(w.shape[1], dtype) for (_, _, b), w in zip(group, weights)]
    wtype = group[0][0].inputs[1].type.dtype  # bf16 data is held as float32 arrays: keep the IR dtype
    w = make_constant(names, "merged_w", np.concatenate(weights, axis=1))
    w.type = w.type.with_dtype(wtype)
    matmul = make_node(names, "MatMul", [x, w], base="merged_matmul")
    new = [matmul]
    y = matmul.outputs[0]
    if any(add is not None for _, add, _ in group):
        bias = make_constant(names, "merged_b", np.concatenate(biases).astype(dtype))
        bias.type = bias.type.with_dtype(wtype)
        add = make_node(names, "Add", [y, bias], base="merged_add")
        new.append(add)
        y = add.outputs[0]
    axes = make_constant(names, "merged_axes", np.array([-1], np.int64))
    start = 0
    for (mm, add, _), wt in zip(group, weights):
        end = start + wt.shape[1]
        bounds = [make_constant(names, "merged_start", np.array([start], np.int64)),
                  make_constant(names, "merged_end", np.array([end], np.int64))]
        piece = make_node(names, "Slice", [y, *bounds, axes], base="merged_slice")
        new.append(piece)
        old = (add or mm).outputs[0]
        replace_all_uses(graph, old, piece.outputs[0])
        remove_nodes(graph, [n for n in (mm, add) if n is not None])
        start = end
    graph.nodes.extend(new)
