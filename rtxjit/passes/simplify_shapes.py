"""Remove views and conversions that change nothing, and merge chains of them.

Rewrites:
    Identity(x) => x
    Dropout(x) (inference, mask unused) => x
    Cast(x, to=dtype of x) => x;  CastLike(x, y) where x and y have one dtype => x
    Reshape|Flatten|Squeeze|Unsqueeze(x) whose output has x's static shape => x
    Transpose(x, perm=identity) => x
    Concat|Sum|Max|Min(x) with one input => x
        (the TorchScript exporter concatenates GPT-2's K and V with an absent past as a one-input
        Concat: left in, it is a copy that keeps attention fusion from reading the projection)
    Reshape(Reshape|Flatten|Squeeze|Unsqueeze(x), s) => Reshape(x, s)
        (s without 0 "copy this dim" entries, or with them resolved from a static output shape)
    Transpose(Transpose(x, p), q) => Transpose(x, [p[i] for i in q])
    Reshape(Transpose(Reshape(x [A, B, *r] -> [A*B, *r]), [0, *p]) -> [A, B, *]) => Transpose(x, [0, 1, *(p + 1)])
        (torch's dynamo exporter transposes K of [B, H, S, D] as [B*H, S, D]: a 4-D transpose, which
        attention fusion absorbs, instead of a copy for the merge)
    Reshape(Transpose(Reshape(x [S, B, E] -> [S, B*H, D]), [1, 0, 2]) -> [B, H, S, D])
        => Transpose(Reshape(x, [S, B, H, D]), [1, 2, 0, 3])   (nn.MultiheadAttention's heads, static shapes)
"""

from __future__ import annotations

import numpy as np

from rtxjit.ir.graph import Graph, Node, Value
from rtxjit.ir.rewrite import (FreshNames, infers_same, is_graph_output, make_constant, remove_nodes,
                               replace_all_uses)
from rtxjit.ir.types import TensorType
from rtxjit.passes.base import PassResult

VIEWS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
VARIADIC = ("Concat", "Sum", "Max", "Min")  # one input: its output is that input


def simplify_shapes(graph: Graph) -> PassResult:
    names = FreshNames(graph)
    removed, modified, inserts = [], False, []
    for i, node in enumerate(graph.nodes):
        while _merge_chain(node, names):  # Transpose(Transpose(..)) chains of any length
            modified = True
        if _transpose_is_reshape(node):
            graph.nodes[i] = node = _as_reshape(node, names)
            modified = True
        merged = _transpose_of_merged_batch(node, names) or _heads_of_merged_batch(node, names)
        if merged is not None:  # the bypassed Transpose and Reshape are left to dead-code elimination
            split, graph.nodes[i] = merged
            node = graph.nodes[i]
            if split is not None:
                inserts.append((i, split))
            modified = True
        if _is_no_op(graph, node) and replace_all_uses(graph, node.outputs[0], node.inputs[0]):
            removed.append(node)
    for i, split in reversed(inserts):
        graph.nodes.insert(i, split)
    remove_nodes(graph, removed)
    return PassResult(graph, modified or bool(removed))


def _transpose_is_reshape(node: Node) -> bool:
    """A Transpose that moves only dims of size 1 keeps the element order: it is a Reshape (which
    later passes see through, e.g. epilogue fusion across ``[S, 1, E] -> [1, S, E]``)."""
    if node.op != "Transpose" or not node.inputs[0].type.static:
        return False
    shape, perm = node.inputs[0].type.shape, _perm(node)
    moved = [p for p in perm if shape[p] != 1]
    return moved == sorted(moved) and perm != list(range(len(shape)))


def _transpose_of_merged_batch(node: Node, names: FreshNames):
    """``(split, transpose)`` for ``Reshape(Transpose(Reshape(x, [N, *r]), [0, *p]), [A, B, *])``
    (see the module's docstring): ``Transpose(split, [0, 1, *(p + 1)])`` producing the node's output,
    where ``split`` is ``Reshape(x, [A, B, *r])``, or None when ``x`` is ``[A, B, *r]`` already
    (a ``[B, Hkv, g, S, D]`` x, grouped-query attention's repeated K, needs the split). None where
    the chain is not that; the inner nodes are left for dead-code elimination."""
    if node.op != "Reshape":
        return None
    t = node.inputs[0].producer
    if t is None or t.op != "Transpose":
        return None
    perm = _perm(t)
    r = t.inputs[0].producer
    if perm[0] != 0 or r is None or r.op not in VIEWS:
        return None
    x, merged, out = r.inputs[0], r.outputs[0].type.shape, node.outputs[0].type.shape
    k = len(merged) - 1
    if len(out) != k + 2 or tuple(out[2:]) != tuple(t.outputs[0].type.shape[1:]):
        return None
    if x.type.rank <= k or tuple(x.type.shape[x.type.rank - k:]) != tuple(merged[1:]):
        return None
    lead, a_b = x.type.shape[:x.type.rank - k], tuple(out[:2])
    split = None
    if tuple(lead) != a_b:
        static = all(isinstance(d, int) for d in tuple(lead) + a_b)
        if not static or int(np.prod(lead)) != a_b[0] * a_b[1]:
            return None
        shape = make_constant(names, f"{node.name}_split_shape", np.array(a_b + tuple(merged[1:]), np.int64))
        value = Value(names(f"{node.name}_split"), TensorType(x.type.dtype, a_b + tuple(merged[1:])))
        split = Node("Reshape", names(f"{node.name}_split_node"), [x, shape], [value], {"allowzero": 0}, 14)
        value.producer = split
        x = value
    new = Node("Transpose", node.name, [x], [node.outputs[0]], {"perm": [0, 1] + [p + 1 for p in perm[1:]]}, 13)
    node.outputs[0].producer = new
    return split, new


def _heads_of_merged_batch(node: Node, names: FreshNames):
    """``(split, transpose)`` for ``Reshape(Transpose(Reshape(x [S, B, E], [S, B*H, D]), [1, 0, 2]),
    [B, H, S, D])`` (static shapes, ``E = H * D``): ``Transpose(Reshape(x, [S, B, H, D]), [1, 2, 0, 3])``,
    views both, producing the node's output. torch's nn.MultiheadAttention (torch.onnx's TorchScript
    exporter: torch TransformerEncoder, torchvision's ViT) splits its heads so; merging B with H
    copied q, k and v in every layer (the middle Reshape reads a strided slice of the packed
    projection), where attention reads the 4-D view as it is. None where the chain is not that."""
    if node.op != "Reshape":
        return None
    t = node.inputs[0].producer
    if t is None or t.op != "Transpose" or _perm(t) != [1, 0, 2]:
        return None
    r = t.inputs[0].producer
    if r is None or r.op != "Reshape":
        return None
    x = r.inputs[0]
    shapes = (x.type.shape, r.outputs[0].type.shape, node.outputs[0].type.shape)
    if not all(isinstance(d, int) for shape in shapes for d in shape) or [len(sh) for sh in shapes] != [3, 3, 4]:
        return None
    (s, b, e), (s1, bh, d), (b2, h, s2, d2) = shapes
    if not (s1 == s2 == s and b2 == b and d2 == d and h * d == e and b * h == bh):
        return None
    split_shape = make_constant(names, f"{node.name}_heads_shape", np.array([s, b, h, d], np.int64))
    value = Value(names(f"{node.name}_heads"), TensorType(x.type.dtype, (s, b, h, d)))
    split = Node("Reshape", names(f"{node.name}_heads_node"), [x, split_shape], [value], {"allowzero": 0}, 14)
    value.producer = split
    new = Node("Transpose", node.name, [value], [node.outputs[0]], {"perm": [1, 2, 0, 3]}, 13)
    node.outputs[0].producer = new
    return split, new


def _as_reshape(node: Node, names: FreshNames) -> Node:
    out = node.outputs[0]
    target = make_constant(names, "transpose_shape", np.array(out.type.shape, np.int64))
    reshape = Node("Reshape", node.name, [node.inputs[0], target], [out], {"allowzero": 0}, 14)
    out.producer = reshape
    return reshape


def _is_no_op(graph: Graph, node: Node) -> bool:
    """Whether the node's first output equals its first input."""
    x, y = node.inputs[0] if node.inputs else None, node.outputs[0]
    if x is None or y is None:
        return False
    if node.op == "Identity":
        return True
    if node.op == "Dropout":
        return all(m is None or not _used(graph, m) for m in node.outputs[1:])
    if node.op in ("Cast", "CastLike"):
        return x.type.dtype is y.type.dtype
    if node.op in VIEWS:
        return x.type.static and x.type == y.type
    if node.op == "Transpose":
        return _perm(node) == list(range(x.type.rank))
    if node.op in VARIADIC:
        return len(node.inputs) == 1 and x.type == y.type
    return False


def _used(graph: Graph, value) -> bool:
    return is_graph_output(graph, value) or any(value in n.inputs for n in graph.nodes)


def _merge_chain(node: Node, names: FreshNames) -> bool:
    """Make ``node`` read past a view of the same family that feeds it, where its output type
    stays the same (symbolic dims included); whether it did."""
    inner = node.inputs[0].producer if node.inputs and node.inputs[0] is not None else None
    if inner is None:
        return False
    inputs, attrs = [inner.inputs[0]] + node.inputs[1:], dict(node.attrs)
    if node.op == "Transpose" and inner.op == "Transpose":
        inner_perm = _perm(inner)
        attrs["perm"] = [inner_perm[i] for i in _perm(node)]
    elif node.op == "Reshape" and inner.op in VIEWS:
        target = _reshape_target(node)
        if target is None:
            return False
        inputs[1] = target if target is node.inputs[1] else make_constant(names, f"{node.name}_shape", target)
    else:
        return False
    if not infers_same(node, inputs, attrs):
        return False
    node.inputs, node.attrs = inputs, attrs
    return True


def _reshape_target(node: Node):
    """The Reshape's target shape as a constant that does not depend on its input's shape: the
    shape input itself, or the static output shape; None where there is neither."""
    shape = node.inputs[1]
    if shape.is_const and (node.attrs.get("allowzero") or not (np.asarray(shape.const) == 0).any()):
        return shape
    out = node.outputs[0].type
    return np.array(out.shape, np.int64) if out.static and 0 not in out.shape else None


def _perm(node: Node) -> list:
    perm = node.attrs.get("perm")
    rank = node.inputs[0].type.rank
    return list(reversed(range(rank))) if perm is None else list(perm)

