"""Fold a per-channel scale of a 1x1 conv's input into the conv: squeeze-and-excitation.

    Conv(Mul(x, s), w, b)  =>  rtxjit.ScaledConv(x, s, w, b)
        where the Conv is 1x1 (stride 1, no padding, dilation 1, one group), ``s`` is
        ``[N or 1, C, 1, ...]`` (``x`` ``[N, C, ...]`` with more than one pixel, either operand
        order), and the Mul's only reader is that Conv.

EfficientNet's and MobileNetV3's blocks scale their expanded feature map by the SE branch's
sigmoid, then project it with a 1x1 conv: unfused, the scaled map (the block's largest tensor) is
written once and read once more. rtxjit.ScaledConv (ops/conv.py) reads ``x`` and the scale inside
the product's K loop instead. Runs before fuse_pointwise (which would fold the Mul into a pointwise
kernel) and fuse_epilogue (which fuses the projection's bias / residual after the new node).
"""

from __future__ import annotations

from rtxjit.ir.graph import Graph, Node
from rtxjit.ir.rewrite import FreshNames, is_graph_output, remove_nodes
from rtxjit.passes.base import PassResult

ENABLED = True  # False: the Mul stays a pointwise kernel (as before 2026-12-07), for a GPU A/B


def fuse_channel_scale(graph: Graph) -> PassResult:
    if not ENABLED:
        return PassResult(graph, False)
    uses = graph.consumers()
    names = FreshNames(graph)
    removed = []
    for i, conv in enumerate(graph.nodes):
        found = _scaled_input(graph, conv, uses)
        if found is None:
            continue
        mul, x, s = found
        node = Node("rtxjit.ScaledConv", names(conv.name + "_scaled"), [x, s] + list(conv.inputs[1:]),
                    list(conv.outputs), {}, 1)
        for v in node.outputs:
            v.producer = node
        graph.nodes[i] = node
        removed.append(mul)
    remove_nodes(graph, removed)
    return PassResult(graph, bool(removed))


def _scaled_input(graph: Graph, conv: Node, uses: dict):
    """``(mul, x, s)``: the Mul feeding ``conv`` (a 1x1 one-group conv) that scales its input
    ``x`` per channel by ``s``, or None."""
    if conv.op != "Conv" or not _pointwise_1x1(conv):
        return None
    mul = conv.inputs[0].producer
    if mul is None or mul.op != "Mul" or is_graph_output(graph, mul.outputs[0]):
        return None
    operands = _split_operands(mul)
    if len({id(n) for n, _ in uses.get(mul.outputs[0].name, [])}) != 1 or operands is None:
        return None
    return (mul, *operands)


def _pointwise_1x1(conv: Node) -> bool:
    x, w = conv.inputs[0].type, conv.inputs[1].type
    if x.rank < 3 or w.rank != x.rank or not all(d == 1 for d in w.shape[2:]):
        return False
    a = conv.attrs
    spatial = x.rank - 2
    return (a.get("group", 1) == 1 and a.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
            and list(a.get("strides") or [1] * spatial) == [1] * spatial
            and list(a.get("dilations") or [1] * spatial) == [1] * spatial
            and not any(a.get("pads") or []))


def _split_operands(mul: Node):
    """``(x, s)``: the full-size operand and the per-channel scale ``[N or 1, C, 1, ...]``, or None."""
    a, b = mul.inputs
    out = mul.outputs[0].type
    for x, s in ((a, b), (b, a)):
        if x.type.shape != out.shape or s.type.dtype is not x.type.dtype or s.type.rank != out.rank:
            continue
        if all(d == 1 for d in out.shape[2:]):  # nothing broadcast (the SE branch's own SiLU x * sigmoid(x))
            continue
        if s.type.shape[1] == out.shape[1] and s.type.shape[0] in (1, out.shape[0]) \
                and all(d == 1 for d in s.type.shape[2:]):
            return x, s
    return None
