"""'MatMul(Q, K^T) -> scale -> +mask -> Softmax -> MatMul(., V) => rtxjit.Attention'.

The pattern is found from its Softmax, walking back to the scores product and forward to the
product with V:

    MatMul(Q, KT) -> [Mul by a scalar c | Div by a scalar c] -> [Add mask] -> Softmax(axis=-1)
                  -> [Where(IsNaN(probs), 0, probs)] -> MatMul(probs, V)

with float-to-float ``Cast`` nodes allowed anywhere in the chain (transformers' eager attention
runs the softmax in fp32 for fp16 models: ``Cast -> Softmax -> Cast``); the fused kernel keeps
fp32 scores and statistics, and casts the probabilities to V's type, as that chain does. A scale
folded into Q (or into Q's weights) is just part of Q, and the op's scale is 1. The
``Where(IsNaN(p), 0, p)`` that torch's exporters put after the softmax of scaled_dot_product_attention
(a row with every key masked by ``-inf`` is NaN) becomes the op's ``nan_rows_zero``.

Transposes into Q, K^T and V, and out of the result, are absorbed into the op's perms (see
``rtxjit/ops/attention.py`` for the convention) when nothing else uses their results: the op
reads the pre-transpose tensors through strides and writes its output in the layout the consumer
wants. This covers the demo encoder (``Reshape -> Transpose(0,2,1,3)`` for Q and V,
``Transpose(0,2,3,1)`` for K^T, ``Transpose(0,2,1,3) -> Reshape`` after) and the torch export of
transformers' BertModel (K as ``Transpose(0,2,1,3)`` then ``Transpose(0,1,3,2)``): chains of
transposes compose.

Legality: every intermediate (scores, scaled and masked scores, probabilities, the product with V
before an absorbed transpose) must have exactly one consumer and be no graph output; otherwise
the pattern is left alone. The operands must be rank 4 ([B, H, S, D]) and of a float type the
kernel runs (fp32, fp16, bf16).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from rtxjit.errors import RtxjitError
from rtxjit.ir.graph import Graph, Node, Value
from rtxjit.ops.attention import KERNEL_TYPES
from rtxjit.ir.registry import get_op
from rtxjit.ir.rewrite import FreshNames, remove_nodes
from rtxjit.ir.types import broadcast_shapes
from rtxjit.passes.base import PassResult

OP = "rtxjit.Attention"
SWAP_LAST = (0, 1, 3, 2)


@dataclass
class _Match:
    """One attention subgraph: the nodes it replaces and the fused op's inputs and attributes."""

    nodes: list = field(default_factory=list)
    q: Optional[Value] = None
    k: Optional[Value] = None
    v: Optional[Value] = None
    mask: Optional[Value] = None
    scale: float = 1.0
    nan_rows_zero: bool = False
    kv_group: int = 1
    perms: dict = field(default_factory=dict)
    output: Optional[Value] = None


class _Uses:
    """Who consumes each value, and whether it is a graph output."""

    def __init__(self, graph: Graph):
        self.consumers = graph.consumers()
        self.graph_outputs = {v.name for v in graph.outputs}

    def only_user(self, value: Value) -> Optional[Node]:
        """The single node that reads ``value`` (once), or None if there are more, none, or it is
        a graph output: only then may a fused op make the value disappear."""
        uses = self.consumers.get(value.name, [])
        if value.name in self.graph_outputs or len(uses) != 1:
            return None
        return uses[0][0]

    def private(self, value: Value, reader: Node) -> bool:
        return self.only_user(value) is reader


def fuse_attention(graph: Graph) -> PassResult:
    """Replace each attention subgraph by one ``rtxjit.Attention`` node (in place)."""
    uses = _Uses(graph)
    matches, claimed = [], set()
    for node in graph.nodes:
        if node.op != "Softmax":
            continue
        m = _match(node, uses)
        if m is not None and not claimed.intersection(id(n) for n in m.nodes):
            claimed.update(id(n) for n in m.nodes)
            matches.append(m)
    names = FreshNames(graph)
    for m in matches:
        _rewrite(graph, m, names)
    return PassResult(graph, bool(matches))


# ---- matching ----------------------------------------------------------------------------------

def _match(softmax: Node, uses: _Uses) -> Optional[_Match]:
    x = softmax.inputs[0]
    if x.type.rank != 4 or softmax.attrs.get("axis", -1) not in (-1, 3):
        return None
    m = _Match(nodes=[softmax])
    pv = _forward_to_pv(softmax, uses, m)
    if pv is None or not _backward_to_qk(softmax, uses, m):
        return None
    m.v, m.perms["v_perm"] = _absorb_transposes(pv.inputs[1], pv, uses, m, casts=True)
    m.output, m.perms["out_perm"] = _absorb_output_transposes(pv, uses, m)
    _absorb_kv_repeat(m, uses)
    return m if _legal(m) else None


def _absorb_kv_repeat(m: _Match, uses: _Uses) -> None:
    """Grouped-query attention: K and V each repeated ``g`` times along the head axis, as
    transformers' ``repeat_kv`` exports it (``[B, Hkv, S, D] -> Unsqueeze(2) -> Expand to
    [B, Hkv, g, S, D] -> Reshape to [B, Hkv * g, S, D]``), become the op's ``kv_group`` and the op
    reads the unrepeated tensors. Both must repeat by the same ``g`` with private intermediates."""
    found = []
    for name, value in (("k_perm", m.k), ("v_perm", m.v)):
        if tuple(m.perms[name][:2]) != (0, 1):
            return
        reader = _reader_in(m, value)
        chain = _repeat_chain(value, reader, uses)
        if chain is None:
            return
        found.append(chain)
    (k, gk, k_nodes), (v, gv, v_nodes) = found
    if gk != gv:
        return
    m.k, m.v, m.kv_group = k, v, gk
    m.nodes.extend(k_nodes + v_nodes)


def _reader_in(m: _Match, value: Value) -> Optional[Node]:
    """The node of the match that reads ``value``."""
    return next((n for n in m.nodes if any(i is value for i in n.inputs)), None)


def _repeat_chain(value: Value, reader: Optional[Node], uses: _Uses) -> Optional[tuple]:
    """``(x, g, nodes)`` when ``value`` is ``x [B, Hkv, S, D]`` with each head repeated ``g`` times
    (see ``_absorb_kv_repeat``), else None. Shapes decide: Unsqueeze or Reshape may insert the axis."""
    nodes = []
    expected = ("Reshape", "Expand", ("Unsqueeze", "Reshape"))
    for ops in expected:
        node = value.producer
        if reader is None or node is None or node.op not in ((ops,) if isinstance(ops, str) else ops):
            return None
        if not uses.private(value, reader):
            return None
        nodes.append(node)
        reader, value = node, node.inputs[0]
    x = value
    (b, h, s, d) = nodes[0].outputs[0].type.shape
    expanded = nodes[1].outputs[0].type.shape
    unsqueezed = nodes[2].outputs[0].type.shape
    if x.type.rank != 4 or len(expanded) != 5 or len(unsqueezed) != 5:
        return None
    bx, hkv, sx, dx = x.type.shape
    g = expanded[2]
    if not (isinstance(g, int) and isinstance(h, int) and isinstance(hkv, int) and h == hkv * g and g > 1):
        return None
    if tuple(unsqueezed) != (bx, hkv, 1, sx, dx) or tuple(expanded) != (bx, hkv, g, sx, dx):
        return None
    if (b, s, d) != (bx, sx, dx):
        return None
    return x, g, nodes


def _forward_to_pv(softmax: Node, uses: _Uses, m: _Match) -> Optional[Node]:
    """The MatMul(probs, V) that consumes the softmax, through float Casts and one
    ``Where(IsNaN(p), 0, p)``."""
    value = softmax.outputs[0]
    while True:
        zeroed = None if m.nan_rows_zero else _nan_to_zero(value, uses)
        if zeroed is not None:
            m.nodes.extend(zeroed)
            m.nan_rows_zero = True
            value = zeroed[1].outputs[0]
            continue
        user = uses.only_user(value)
        if user is None:
            return None
        if user.op == "Cast" and _float_cast(user):
            m.nodes.append(user)
            value = user.outputs[0]
            continue
        if user.op == "MatMul" and user.inputs[0] is value and user.inputs[1] is not value:
            m.nodes.append(user)
            return user
        return None


def _nan_to_zero(value: Value, uses: _Uses) -> Optional[tuple]:
    """``(IsNaN, Where)`` when ``value`` is read only by ``IsNaN(value)`` and by
    ``Where(that, 0, value)`` (and the IsNaN's result only by that Where), else None."""
    readers = uses.consumers.get(value.name, [])
    if value.name in uses.graph_outputs or len(readers) != 2:
        return None
    by_op = {node.op: node for node, _ in readers}
    isnan, where = by_op.get("IsNaN"), by_op.get("Where")
    if isnan is None or where is None or uses.only_user(isnan.outputs[0]) is not where:
        return None
    cond, zero, kept = where.inputs
    if cond is not isnan.outputs[0] or kept is not value or not zero.is_const or zero.const.size != 1:
        return None
    if float(np.asarray(zero.const, np.float64).reshape(())) != 0.0 or where.outputs[0].type != value.type:
        return None
    return isnan, where


def _backward_to_qk(softmax: Node, uses: _Uses, m: _Match) -> bool:
    """Walk from the softmax input back to MatMul(Q, K^T), taking at most one mask Add and then
    (further back) at most one scalar scale, and float Casts anywhere. Fills q, k, mask, scale."""
    value, reader = softmax.inputs[0], softmax
    seen_scale = False
    while True:
        node = value.producer
        if node is None or not uses.private(value, reader):
            return False
        if node.op == "Cast" and _float_cast(node):
            step = node.inputs[0]
        elif node.op == "Add" and m.mask is None and not seen_scale:
            step = _split_mask(node, m)
        elif node.op in ("Mul", "Div") and not seen_scale:
            step = _split_scale(node, m)
            seen_scale = step is not None
        elif node.op == "MatMul":
            m.nodes.append(node)
            return _take_qk(node, uses, m)
        else:
            return False
        if step is None:
            return False
        m.nodes.append(node)
        value, reader = step, node


def _float_cast(node: Node) -> bool:
    return node.inputs[0].type.dtype.is_float and node.outputs[0].type.dtype.is_float


def _split_mask(add: Node, m: _Match) -> Optional[Value]:
    """The scores side of ``Add(scores, mask)`` (either order); sets ``m.mask``. The mask must
    broadcast to the scores without growing them."""
    out = add.outputs[0].type.shape
    for i in sorted((0, 1), key=lambda i: not _chain_link(add.inputs[i])):
        scores, mask = add.inputs[i], add.inputs[1 - i]
        if scores.producer is None or scores.type.shape != out or mask.type.rank > 4:
            continue
        if _broadcasts_to(mask.type.shape, out) and mask.type.dtype.is_float:
            m.mask = mask
            return scores
    return None


def _chain_link(value: Value) -> bool:
    """Whether ``value`` may be the scores: produced by an op of the chain below an Add."""
    return value.producer is not None and value.producer.op in ("MatMul", "Mul", "Div", "Cast")


def _split_scale(node: Node, m: _Match) -> Optional[Value]:
    """The scores side of ``Mul(scores, c)``, ``Mul(c, scores)`` or ``Div(scores, c)`` for a
    scalar constant ``c``; sets ``m.scale``."""
    sides = (0, 1) if node.op == "Mul" else (0,)
    for i in sides:
        scores, c = node.inputs[i], node.inputs[1 - i]
        if not c.is_const or c.const.size != 1 or scores.type.shape != node.outputs[0].type.shape:
            continue
        value = float(np.asarray(c.const, dtype=np.float64).reshape(()))
        if node.op == "Div" and value == 0.0:
            return None
        m.scale = value if node.op == "Mul" else 1.0 / value
        return scores
    return None


def _take_qk(qk: Node, uses: _Uses, m: _Match) -> bool:
    """Q and K from MatMul(Q, K^T): K's perm is K^T's with the last two axes swapped back."""
    q, kt = qk.inputs
    if q is kt or q.type.rank != 4 or kt.type.rank != 4:
        return False
    m.q, m.perms["q_perm"] = _absorb_transposes(q, qk, uses, m, scales=True)
    m.k, kt_perm = _absorb_transposes(kt, qk, uses, m, scales=True)
    m.perms["k_perm"] = tuple(kt_perm[i] for i in SWAP_LAST)
    return True


# ---- transposes --------------------------------------------------------------------------------

def _perm_of(node: Node) -> tuple:
    perm = node.attrs.get("perm")
    rank = node.inputs[0].type.rank
    return tuple(reversed(range(rank))) if perm is None else tuple(int(p) for p in perm)


def _absorb_transposes(value: Value, reader: Node, uses: _Uses, m: _Match, scales: bool = False,
                       casts: bool = False) -> tuple:
    """``(stored, perm)`` with ``value == transpose(stored, perm)``: walks back through
    Transposes that only ``reader`` (or the next node in the chain) uses, composing perms. With
    ``scales`` (Q and K), a private Mul or Div by a scalar constant on the way is absorbed into the
    op's scale too: torch's export of scaled_dot_product_attention scales Q and K by sqrt(scale).
    With ``casts`` (V), a float Cast is absorbed too: the TorchScript export of an fp16 model's
    attention upcasts V and computes the product with V (and what follows) in fp32; the op then
    reads V in its stored type and writes the fp32 result (``out_dtype``)."""
    perm = (0, 1, 2, 3)
    while value.producer is not None and uses.private(value, reader):
        t = value.producer
        if t.op == "Transpose" or (casts and t.op == "Cast" and _float_cast(t)):
            inner = _perm_of(t) if t.op == "Transpose" else (0, 1, 2, 3)
            perm = tuple(inner[i] for i in perm)  # transpose(transpose(x, inner), perm)
            m.nodes.append(t)
            value, reader = t.inputs[0], t
            continue
        saved = m.scale
        scaled = _split_scale(t, m) if scales and t.op in ("Mul", "Div") else None
        if scaled is None:
            m.scale = saved
            break
        m.scale *= saved
        m.nodes.append(t)
        value, reader = scaled, t
    return value, perm


def _absorb_output_transposes(pv: Node, uses: _Uses, m: _Match) -> tuple:
    """``(output, out_perm)``: the last value of a chain of private Transposes after the product
    with V, and the composed perm from the logical [B, H, Sq, Dv] result to it."""
    value, perm = pv.outputs[0], (0, 1, 2, 3)
    while True:
        user = uses.only_user(value)
        if user is None or user.op != "Transpose":
            return value, perm
        outer = _perm_of(user)
        perm = tuple(perm[i] for i in outer)  # transpose(transpose(o, perm), outer)
        m.nodes.append(user)
        value = user.outputs[0]


def _broadcasts_to(shape, target) -> bool:
    try:
        return broadcast_shapes(shape, target) == tuple(target)
    except ValueError:
        return False


# ---- legality and rewriting --------------------------------------------------------------------

def _legal(m: _Match) -> bool:
    """The operands fit the kernel, and the fused op's inferred type is the replaced output's."""
    if m.q.type.dtype not in KERNEL_TYPES or m.output.type.dtype not in KERNEL_TYPES:
        return False
    if any(x.type.rank != 4 for x in (m.q, m.k, m.v)):
        return False
    try:
        (t,) = get_op(OP).infer(_inputs(m), _attrs(m), 1)
    except (RtxjitError, ValueError):
        return False
    return t == m.output.type


def _inputs(m: _Match) -> list:
    return [m.q.type, m.k.type, m.v.type, None if m.mask is None else m.mask.type]


def _attrs(m: _Match) -> dict:
    attrs = {"scale": m.scale, **{k: tuple(v) for k, v in sorted(m.perms.items())}}
    if m.output is not None and m.output.type.dtype is not m.q.type.dtype:
        attrs["out_dtype"] = m.output.type.dtype.onnx_code
    if m.nan_rows_zero:
        attrs["nan_rows_zero"] = 1
    if m.kv_group > 1:
        attrs["kv_group"] = m.kv_group
    return attrs


def _rewrite(graph: Graph, m: _Match, names: FreshNames) -> None:
    """Put the fused node where the last replaced node was (every input of the fused node is
    defined before it, the output's readers come after it) and drop the replaced nodes. The output
    keeps its ``Value``, so a graph output keeps its name."""
    replaced = {id(n) for n in m.nodes}
    last = max(i for i, n in enumerate(graph.nodes) if id(n) in replaced)
    softmax = next(n for n in m.nodes if n.op == "Softmax")
    inputs = [m.q, m.k, m.v] + ([m.mask] if m.mask is not None else [])
    fused = Node(OP, names(f"{softmax.name}/attention"), inputs, [m.output], _attrs(m), version=1)
    graph.nodes.insert(last + 1, fused)
    remove_nodes(graph, m.nodes)
    m.output.producer = fused
