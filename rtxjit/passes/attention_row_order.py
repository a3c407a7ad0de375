"""Let a fused attention write its rows in the order its output projection's readers want.

torch's nn.MultiheadAttention with ``batch_first`` (torch TransformerEncoder layers, torchvision's
ViT), as the TorchScript exporter writes it, works sequence-first inside and transposes back after
the output projection:

    Attention(..., out_perm) [S, B, H, D] -> Reshape [S*B, H*D] -> Gemm / MatMul -> Reshape [S, B, N]
        -> Transpose(1, 0, 2) -> [B, S, N] -> (the residual Add)

The projection is row-wise (each output row reads one input row), so it commutes with any
reordering of the rows. Rewrite:

    Attention(..., out_perm with its first two entries swapped) [B, S, H, D] -> the same Reshape
        [S*B, H*D] -> the same product -> Reshape [B, S, N] (taken from the attention output's shape)

The Transpose goes; the residual Add reads a row-major value, and fuse_epilogue puts it into the
projection's kernel where shapes are static: one launch less per layer (a 2-layer torch encoder's
fp16 plan for an sm_90: 18 -> 16 launches; its fp8 Q/DQ model 20 -> 18). The attention kernel writes
any ``out_perm`` at the same cost. Conditions: every value of the chain has one reader (besides
Shape nodes, for the two whose shape stays) and is no graph output; the product is row-wise
(``_row_wise``: a 2-D B; a Gemm keeps A untransposed and its bias is one row; a quantized product's
activation scale and zero point are per tensor); N is static. Runs after fuse_attention, before
fuse_pointwise and fuse_epilogue.
"""

from __future__ import annotations

import numpy as np

from rtxjit.ir.graph import Graph, Node
from rtxjit.ir.rewrite import FreshNames, is_graph_output, make_constant, make_node, remove_nodes, replace_all_uses, \
    sort_topologically
from rtxjit.ir.types import TensorType
from rtxjit.passes.base import PassResult

ENABLED = True  # False: the exporter's Transpose stays (as before 2026-12-07), for an A/B


def attention_row_order(graph: Graph) -> PassResult:
    if not ENABLED:
        return PassResult(graph, False)
    names = FreshNames(graph)
    changed = False
    uses = graph.consumers()
    for node in list(graph.nodes):
        chain = _match(graph, node, uses)
        if chain is not None:
            _rewrite(graph, names, *chain)
            uses = graph.consumers()
            changed = True
    if changed:
        sort_topologically(graph)
    return PassResult(graph, changed)


def _only_reader(graph: Graph, value, uses: dict, op, shapes_too: bool = False):
    """The one node reading ``value`` (at input 0) if it is an ``op`` node and ``value`` is no
    graph output; else None. ``shapes_too``: Shape nodes may read it besides (a value whose shape
    the rewrite keeps: the exporter computes the next Reshape's target from it)."""
    if value is None or is_graph_output(graph, value):
        return None
    readers = [(n, i) for n, i in uses.get(value.name, []) if not (shapes_too and n.op == "Shape")]
    if len(readers) != 1 or readers[0][1] != 0 or readers[0][0].op not in op:
        return None
    return readers[0][0]


def _input(node: Node, i: int):
    return node.inputs[i] if len(node.inputs) > i else None


def _one_row(v) -> bool:
    """Whether ``v`` (a bias, an activation's scale) is absent or the same for every row."""
    return v is None or v.type.rank < 2 or v.type.shape[0] == 1


def _row_wise(product: Node) -> bool:
    """Whether each output row of ``product`` reads only the same row of its input 0 (with a 2-D B,
    and biases, activation scales and zero points the same for every row)."""
    if product.op == "rtxjit.QLinearMatMul":  # a_q, a_scale, a_zero, w_q, w_scale, w_zero, bias, ...
        scales = [_input(product, 1), _input(product, 2)]
        w, bias = _input(product, 3), _input(product, 6)
        per_tensor = all(v is None or (v.const is not None and np.size(v.const) == 1) for v in scales)
        return per_tensor and w is not None and w.type.rank == 2 and _one_row(bias)
    w = _input(product, 1)
    if w is None or w.type.rank != 2:
        return False
    return product.op == "MatMul" or (not product.attrs.get("transA", 0) and _one_row(_input(product, 2)))


def _match(graph: Graph, att: Node, uses: dict):
    if att.op != "rtxjit.Attention" or len(att.outputs) != 1 or len(att.attrs.get("out_perm", ())) != 4:
        return None
    out = att.outputs[0]
    if out is None or out.type.rank != 4:
        return None
    rows = _only_reader(graph, out, uses, ("Reshape",))
    target = rows.inputs[1] if rows is not None else None
    if rows is None or rows.outputs[0].type.rank != 2 or (target.const is not None and not np.all(target.const)):
        return None  # a 0 in a constant target copies an input dim, which the rewrite moves
    product = _only_reader(graph, rows.outputs[0], uses, ("Gemm", "MatMul", "rtxjit.QLinearMatMul"), True)
    if product is None or not _row_wise(product) or not isinstance(product.outputs[0].type.shape[-1], int):
        return None
    back = _only_reader(graph, product.outputs[0], uses, ("Reshape",), True)
    if back is None or back.outputs[0].type.rank != 3:
        return None
    swap = _only_reader(graph, back.outputs[0], uses, ("Transpose",))
    if swap is None or tuple(swap.attrs.get("perm", ())) != (1, 0, 2) or is_graph_output(graph, swap.outputs[0]):
        return None
    return att, product, back, swap


def _rewrite(graph: Graph, names: FreshNames, att: Node, product: Node, back: Node, swap: Node) -> None:
    p = tuple(att.attrs["out_perm"])
    att.attrs["out_perm"] = (p[1], p[0], p[2], p[3])
    out = att.outputs[0]
    s = out.type.shape
    out.type = TensorType(out.type.dtype, (s[1], s[0], s[2], s[3]))
    # the rows' Reshape keeps its target: [S*B or -1, H*D] holds for [B, S, H, D] too (a computed
    # target is a product of dims; one that is 0 would copy a dim: an empty input errs, never
    # reads wrong). [B, S, N] after the product: the attention output's first two dims, then N
    shape = make_node(names, "Shape", [out], base="attention_rows_dims")
    lead = make_node(names, "Slice", [shape.outputs[0], make_constant(names, "zero", np.array([0], np.int64)),
                                      make_constant(names, "two", np.array([2], np.int64))], base="attention_rows_dims")
    n = product.outputs[0].type.shape[-1]
    target = make_node(names, "Concat", [lead.outputs[0], make_constant(names, "n", np.array([n], np.int64))],
                       {"axis": 0}, base="attention_rows_dims")
    back.inputs[1] = target.outputs[0]
    back.outputs[0].type = swap.outputs[0].type
    graph.nodes.extend([shape, lead, target])
    replace_all_uses(graph, swap.outputs[0], back.outputs[0])
    remove_nodes(graph, [swap])
