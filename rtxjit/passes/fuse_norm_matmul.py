"""Fold a LayerNorm or RMSNorm over the last axis into the products that read it.

Rewrite (``s``, ``b``, ``w`` constants, folded here in float64):
    MatMul(LayerNormalization(x, s, b){axis: -1, epsilon: e}, w)
        => rtxjit.NormMatMul(x, s[:, None] * w, colsum(s[:, None] * w), b @ w){mode: "layernorm", epsilon: e}
    MatMul(rtxjit.RMSNorm(x, s){axis: -1, epsilon: e}, w)
        => rtxjit.NormMatMul(x, s[:, None] * w){mode: "rmsnorm", epsilon: e}
    Gemm(Reshape(LayerNormalization(x, s, b), shape), w, c){transB: t}
        => Add(rtxjit.NormMatMul(Reshape(x, shape), folded w (transposed if t), ...), c)

where every reader of the norm's output is a MatMul (or a Gemm without transA, alpha and beta 1)
reading it as its first operand with a ``[K, N]`` weight, directly or through one Reshape that keeps
the last axis, the output is not a graph output, the norm's statistics outputs (Mean,
InvStdDev) are unused, its scale and bias are ``[K]`` (or broadcast to it) and its statistics are
fp32 (``stash_type`` 1). A pre-norm transformer (GPT-2, ViT, CLIP, Whisper, LLaMA) normalizes the
residual stream only to project it (QKV, after merge_parallel_matmuls, and the MLP's first
layer): the norm's kernel and its output's round trip through memory go; each product's K loop
runs on the raw rows, summing them and their squares, and normalizes in its epilogue
(templates/matmul.py ``a_norm``: ``rstd * (x @ w - mean * colsum) + bias``). Post-norm
models (BERT) read the norm's output in the residual add too: nothing changes there. Runs after
merge_parallel_matmuls and before fuse_epilogue (a bias or activation joins the new product).
"""

from __future__ import annotations

import numpy as np

from rtxjit.ir.graph import Graph, Node
from rtxjit.ir.rewrite import FreshNames, is_graph_output, make_constant, make_node, remove_nodes
from rtxjit.passes.base import PassResult

# Off by default until measured: its first form (each A tile normalized inside the K loop, once per N
# tile) ran ViT-B/16 b1 in 0.976 ms on an H100 against 0.662 without it (2026-12-07); this form keeps the
# K loop a plain product (the statistics are row sums of the loaded tiles, applied in the epilogue),
# not yet timed on a GPU. True turns it on (tests; `.gpu/next*.sh` A/B)
ENABLED = False
MODES = {"LayerNormalization": "layernorm", "rtxjit.RMSNorm": "rmsnorm"}


def fuse_norm_matmul(graph: Graph) -> PassResult:
    if not ENABLED:
        return PassResult(graph, False)
    uses = graph.consumers()
    names = FreshNames(graph)
    removed = []
    for norm in list(graph.nodes):
        projections = _fusable(graph, norm, uses)
        if projections is None:
            continue
        x = norm.inputs[0]
        scale = norm.inputs[1] if len(norm.inputs) > 1 else None
        shift = norm.inputs[2] if len(norm.inputs) > 2 and norm.op == "LayerNormalization" else None
        attrs = {"mode": MODES[norm.op], "epsilon": float(norm.attrs.get("epsilon", 1e-5))}
        for view, product in projections:
            _rewrite(graph, names, x, scale, shift, attrs, view, product)
            removed += [view] if view is not None else []
        removed.append(norm)
    remove_nodes(graph, removed)
    return PassResult(graph, bool(removed))


def _rewrite(graph: Graph, names: FreshNames, x, scale, shift, attrs: dict, view, product: Node) -> None:
    """``product`` (reading the norm's output, through ``view`` if not None) becomes a NormMatMul of
    ``x`` (through the same Reshape) with the norm's scale folded into the weight, its shift into a
    bias and (layernorm) the folded weight's column sums, computed here in float64; a Gemm's C is
    added after (fuse_epilogue puts the Add into the product's kernel)."""
    at = graph.nodes.index(product)
    new = []
    if view is not None:
        reshape = make_node(names, "Reshape", [x, view.inputs[1]], dict(view.attrs), base="norm_view")
        new.append(reshape)
        x = reshape.outputs[0]
    w = np.asarray(product.inputs[1].const, np.float64)
    if product.op == "Gemm" and product.attrs.get("transB", 0):
        w = w.T
    k = w.shape[0]
    g = np.broadcast_to(np.asarray(scale.const, np.float64).reshape(-1), (k,)) if scale is not None else np.ones(k)
    folded = g[:, None] * w
    wtype = product.inputs[1].type.dtype
    inputs = [x, make_constant(names, product.name + "_norm_w", folded.astype(wtype.to_numpy()))]
    inputs.append(make_constant(names, product.name + "_norm_colsum", folded.sum(0).astype(np.float32))
                  if attrs["mode"] == "layernorm" else None)
    if shift is not None:
        b = np.broadcast_to(np.asarray(shift.const, np.float64).reshape(-1), (k,)) @ w
        inputs.append(make_constant(names, product.name + "_norm_bias", b.astype(wtype.to_numpy())))
    out = product.outputs[0]
    c = product.inputs[2] if product.op == "Gemm" and len(product.inputs) > 2 else None
    node = make_node(names, "rtxjit.NormMatMul", inputs, dict(attrs), base=product.name + "_norm")
    new.append(node)
    if c is None:
        node.outputs = [out]
        out.producer = node
    else:
        add = Node("Add", names(product.name + "_bias"), [node.outputs[0], c], [out], {}, 14)
        out.producer = add
        new.append(add)
    graph.nodes[at:at + 1] = new


def _fusable(graph: Graph, norm: Node, uses: dict):
    """``[(view or None, product)]``: the products that read ``norm``'s output, directly or through
    one Reshape that keeps the last axis (GPT-2's ``x.view(-1, nx)`` before its Gemm), if the
    rewrite applies to all of them; else None."""
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
    for p in norm.inputs[1:]:  # scale and shift are folded into the weights: constants over K
        if p is not None and (not p.is_const or p.type.rank > 1 or (p.type.rank and p.type.shape[0] not in (1, k))):
            return None
    readers = _readers(graph, out, uses)
    if not readers:
        return None
    projections = []
    for reader in readers:
        view = None
        if reader.op == "Reshape" and reader.inputs[0] is out:
            r_out = reader.outputs[0]
            nxt = _readers(graph, r_out, uses)
            if r_out.type.rank < 2 or r_out.type.shape[-1] != k or len(nxt) != 1:
                return None
            view, reader, out_v = reader, nxt[0], r_out
        else:
            out_v = out
        if not _product(reader, out_v, x.type.dtype):
            return None
        projections.append((view, reader))
    return projections


def _readers(graph: Graph, value, uses: dict) -> list:
    if is_graph_output(graph, value):
        return []
    return list({id(n): n for n, _ in uses.get(value.name, [])}.values())


def _product(node: Node, value, dtype) -> bool:
    """Whether ``node`` multiplies ``value`` (its first operand only) by a ``[K, N]`` weight: a MatMul,
    or a Gemm without transA and with alpha and beta 1."""
    if node.op not in ("MatMul", "Gemm") or node.inputs[0] is not value or any(v is value for v in node.inputs[1:]):
        return False
    w = node.inputs[1]
    if w.type.rank != 2 or w.type.dtype is not dtype or not w.is_const:
        return False
    if node.op == "Gemm":
        a = node.attrs
        return not a.get("transA", 0) and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0
    return True
