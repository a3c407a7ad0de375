"""Fold a LayerNorm or RMSNorm over the last axis into the products that read it.

Rewrite:
    MatMul(LayerNormalization(x, s, b){axis: -1, epsilon: e}, w)
        => rtxjit.NormMatMul(x, w, s, b){mode: "layernorm", epsilon: e}
    MatMul(rtxjit.RMSNorm(x, s){axis: -1, epsilon: e}, w)
        => rtxjit.NormMatMul(x, w, s){mode: "rmsnorm", epsilon: e}

where every reader of the norm's output is a MatMul reading it as its first operand with a
``[K, N]`` weight, the output is not a graph output, the norm's statistics outputs (Mean,
InvStdDev) are unused, its scale and bias are ``[K]`` (or broadcast to it) and its statistics are
fp32 (``stash_type`` 1). A pre-norm transformer (GPT-2, ViT, CLIP, Whisper, LLaMA) normalizes the
residual stream only to project it (QKV, after merge_parallel_matmuls, and the MLP's first
layer): the norm's kernel and its output's round trip through memory go; each product's tile
computes its rows' statistics in a first loop over K (templates/matmul.py ``a_norm``). Post-norm
models (BERT) read the norm's output in the residual add too: nothing changes there. Runs after
merge_parallel_matmuls and before fuse_epilogue (a bias or activation joins the new product).
"""

from __future__ import annotations

from rtxjit.ir.graph import Graph, Node
from rtxjit.ir.rewrite import FreshNames, is_graph_output, remove_nodes
from rtxjit.passes.base import PassResult

ENABLED = True  # False: norms keep their own kernel (as before 2026-12-07), for a GPU A/B
MODES = {"LayerNormalization": "layernorm", "rtxjit.RMSNorm": "rmsnorm"}


def fuse_norm_matmul(graph: Graph) -> PassResult:
    if not ENABLED:
        return PassResult(graph, False)
    uses = graph.consumers()
    names = FreshNames(graph)
    removed = []
    for norm in list(graph.nodes):
        readers = _fusable(graph, norm, uses)
        if readers is None:
            continue
        x = norm.inputs[0]
        scale = norm.inputs[1] if len(norm.inputs) > 1 else None
        shift = norm.inputs[2] if len(norm.inputs) > 2 and norm.op == "LayerNormalization" else None
        attrs = {"mode": MODES[norm.op], "epsilon": float(norm.attrs.get("epsilon", 1e-5))}
        for mm in readers:
            node = Node("rtxjit.NormMatMul", names(mm.name + "_norm"), [x, mm.inputs[1], scale, shift],
                        list(mm.outputs), dict(attrs), 1)
            for v in node.outputs:
                v.producer = node
            graph.nodes[graph.nodes.index(mm)] = node
        removed.append(norm)
    remove_nodes(graph, removed)
    return PassResult(graph, bool(removed))


def _fusable(graph: Graph, norm: Node, uses: dict):
    """The MatMuls that read ``norm``'s output, if the rewrite applies to all of them; else None."""
    if norm.op not in MODES:
        return None
    x, out = norm.inputs[0], norm.outputs[0]
    rank = x.type.rank
    axis = norm.attrs.get("axis", -1)
    if rank < 2 or axis not in (-1, rank - 1) or out is None or is_graph_output(graph, out):
        return None
    if norm.op == "LayerNormalization" and norm.attrs.get("stash_type", 1) != 1:
        return None
    if any(v is not None and (uses.get(v.name) or is_graph_output(graph, v)) for v in norm.outputs[1:]):
        return None  # its Mean / InvStdDev are read
    k = x.type.shape[-1]
    if not isinstance(k, int):
        return None
    for p in norm.inputs[1:]:
        if p is not None and (p.type.rank > 1 or (p.type.rank and p.type.shape[0] not in (1, k))):
            return None
    readers = {id(n): n for n, _ in uses.get(out.name, [])}
    if not readers:
        return None
    for mm in readers.values():
        if mm.op != "MatMul" or mm.inputs[0] is not out or mm.inputs[1] is out or mm.inputs[1].type.rank != 2 \
                or mm.inputs[1].type.dtype is not x.type.dtype:
            return None
    return list(readers.values())
