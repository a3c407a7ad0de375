"""Fold inference BatchNormalization into the Conv that feeds it.

Rewrites:
    BatchNormalization(Conv(x, w, b), scale, beta, mean, var) => Conv(x, w', b')
        f  = scale / sqrt(var + epsilon)          (per output channel)
        w' = w * f,  b' = (b - mean) * f + beta   (b = 0 where the Conv has no bias)

Only where the Conv's output is read by the BatchNormalization alone (and is not a graph output),
and the weights and statistics are constants. The new weights are computed in float64 and cast to
the weight's dtype; they are new constants (the old ones may be shared). A BatchNormalization
after anything else stays.
"""

from __future__ import annotations

import numpy as np

from rtxjit.ir.graph import Graph, Node
from rtxjit.ir.host import const_type
from rtxjit.ir.rewrite import FreshNames, make_constant, remove_nodes, replace_all_uses, use_count
from rtxjit.passes.base import PassResult


def fold_batchnorm(graph: Graph) -> PassResult:
    names, uses = FreshNames(graph), graph.consumers()
    folded = []
    for bn in graph.nodes:
        conv = _conv_feeding(graph, bn, uses)
        if conv is not None and _fold(graph, conv, bn, names):
            folded.append(bn)
            # the folded BatchNormalization's readers now read the Conv: count uses again, or a
            # second BatchNormalization of that output would be folded into the same Conv
            uses = graph.consumers()
    remove_nodes(graph, folded)
    return PassResult(graph, bool(folded))


def _conv_feeding(graph: Graph, bn: Node, uses: dict):
    """The Conv that only this BatchNormalization reads, where both have constant parameters."""
    if bn.op != "BatchNormalization" or bn.attrs.get("training_mode"):
        return None
    conv = bn.inputs[0].producer
    if conv is None or conv.op != "Conv" or use_count(graph, conv.outputs[0], uses) != 1:
        return None
    params = conv.inputs[1:] + bn.inputs[1:]
    if not all(v is None or v.is_const for v in params):
        return None
    w = conv.inputs[1]
    if w.const.dtype.kind != "f" or const_type(w.const).dtype is not w.type.dtype:  # bf16 is held as fp32
        return None
    return conv


def _fold(graph: Graph, conv: Node, bn: Node, names: FreshNames) -> bool:
    w = conv.inputs[1].const
    scale, beta, mean, var = (v.const.astype(np.float64).reshape(-1) for v in bn.inputs[1:5])
    if not scale.shape == beta.shape == mean.shape == var.shape == (w.shape[0],):
        return False
    factor = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    b = conv.inputs[2].const.astype(np.float64) if len(conv.inputs) > 2 and conv.inputs[2] is not None else 0.0
    new_w = w.astype(np.float64) * factor.reshape((-1,) + (1,) * (w.ndim - 1))
    new_b = (b - mean) * factor + beta
    if not replace_all_uses(graph, bn.outputs[0], conv.outputs[0]):
        return False
    conv.inputs = [conv.inputs[0], make_constant(names, f"{conv.name}_w_bn", new_w.astype(w.dtype)),
                   make_constant(names, f"{conv.name}_b_bn", new_b.astype(w.dtype))]
    return True
