"""Fuse decomposed normalizations, as exporters emit them, into one row-reduction node.

Rewrites (``mean``: ReduceMean with keepdims=1 over the trailing axes ``a..`` of x, the axes an
attribute (opset < 18) or a constant input; ``sq(d)``: Pow(d, 2) or Mul(d, d); ``rstd(v)``:
``/ Sqrt(Add(v, eps))`` as Div, or ``* Reciprocal(Sqrt(Add(v, eps)))`` (also ``Div(1, Sqrt(..))``)
as Mul; eps a scalar constant):

    d = Sub(x, mean(x));  d rstd(mean(sq(d)))  [Mul gamma] [Add beta]
        => LayerNormalization(x, gamma or ones, [beta]){axis: a, epsilon: eps}
    x rstd(mean(sq(x)))  [Mul gamma]
        => rtxjit.RMSNorm(x, [gamma]){axis: a, epsilon: eps}
    e = Exp(Sub(x, ReduceMax(x, axis)) or x);  Div(e, ReduceSum(e, axis))     (keepdims=1)
        => Softmax(x){axis}

gamma and beta must be constants of x's type that broadcast over the normalized dims only; they
become constants of exactly the normalized shape. The fused node keeps the statistics in fp32
inside the kernel and writes x's type, as the replaced chain does.

Legality: every intermediate is read only by nodes of the pattern and is no graph output; the
fused node produces the last replaced node's output ``Value`` (so its name is kept) and must infer
that value's type. Anything else is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from rtxjit.errors import RtxjitError
from rtxjit.ir.graph import Graph, Node, Value
from rtxjit.ops.reduce import reduced_axes
from rtxjit.ir.registry import get_op
from rtxjit.ir.rewrite import FreshNames, is_graph_output, remove_nodes
from rtxjit.ir.types import DType, TensorType
from rtxjit.passes.base import PassResult

FLOAT_TYPES = (DType.FP32, DType.FP16, DType.BF16, DType.FP64)


@dataclass
class _Match:
    """One pattern: the nodes it replaces (the one producing the result last), the fused op, its
    inputs (constants as numpy arrays, made Values at rewrite time) and attributes."""

    op: str
    nodes: list
    x: Value
    attrs: dict
    params: list = field(default_factory=list)  # [(name, array or None)] after x

    @property
    def output(self) -> Value:
        return self.nodes[-1].outputs[0]


def fuse_normalization(graph: Graph) -> PassResult:
    """Replace each decomposed LayerNorm, RMSNorm and Softmax by one node (in place)."""
    uses = graph.consumers()
    matches = [m for m in (_match(graph, node, uses) for node in graph.nodes) if m is not None]
    names, replaced = FreshNames(graph), set()
    for m in matches:
        if replaced.isdisjoint(id(n) for n in m.nodes):  # a guard: patterns are disjoint by construction
            replaced.update(id(n) for n in m.nodes)
            _rewrite(graph, m, names)
    return PassResult(graph, bool(matches))


def _match(graph: Graph, node: Node, uses: dict) -> Optional[_Match]:
    if node.op not in ("Div", "Mul") or node.outputs[0].type.dtype not in FLOAT_TYPES:
        return None
    m = _match_softmax(node) if node.op == "Div" else None
    if m is None:
        m = _match_norm(graph, node, uses)
    if m is None or not _private(graph, m, uses) or not _infers_output(m):
        return None
    return m


# ---- small matchers ----------------------------------------------------------------------------

def _made_by(value: Optional[Value], *ops: str) -> Optional[Node]:
    """The producer of ``value`` where it is one of ``ops``."""
    node = None if value is None else value.producer
    return node if node is not None and node.op in ops else None


def _scalar(value: Optional[Value]) -> Optional[float]:
    if value is None or not value.is_const or value.const.size != 1:
        return None
    return float(np.asarray(value.const, dtype=np.float64).reshape(()))


def _reduced(node: Node) -> Optional[list]:
    """The sorted axes a Reduce node with keepdims=1 reduces (from its attribute or constant
    input), or None."""
    axes_in = node.inputs[1] if len(node.inputs) > 1 else None
    if not node.attrs.get("keepdims", 1) or (axes_in is not None and not axes_in.is_const):
        return None
    axes = reduced_axes(node.inputs[0].type.rank, None if axes_in is None else axes_in.const,
                        node.attrs.get("axes"), node.attrs.get("noop_with_empty_axes", 0))
    return axes or None


def _trailing_from(node: Node) -> Optional[int]:
    """The first axis, where the Reduce node ``node`` reduces the trailing axes ``a..rank-1``."""
    axes = _reduced(node)
    if axes is None or axes != list(range(axes[0], node.inputs[0].type.rank)):
        return None
    return axes[0]


def _square_of(value: Value) -> Optional[tuple]:
    """``(d, node)`` where ``value`` is Pow(d, 2) or Mul(d, d)."""
    node = _made_by(value, "Pow", "Mul")
    if node is None:
        return None
    if node.op == "Pow" and _scalar(node.inputs[1]) == 2.0:
        return node.inputs[0], node
    if node.op == "Mul" and node.inputs[0] is node.inputs[1]:
        return node.inputs[0], node
    return None


def _reciprocal_sqrt(value: Value) -> Optional[tuple]:
    """``(sqrt node, nodes)`` where ``value`` is Reciprocal(Sqrt(.)) or Div(1, Sqrt(.))."""
    node = _made_by(value, "Reciprocal", "Div")
    if node is None or (node.op == "Div" and _scalar(node.inputs[0]) != 1.0):
        return None
    sqrt = _made_by(node.inputs[-1], "Sqrt")
    return None if sqrt is None else (sqrt, [node])


def _divided_by_std(node: Node) -> Optional[tuple]:
    """``(d, sqrt node, nodes)`` where ``node`` is Div(d, Sqrt(.)) or Mul(d, Reciprocal(Sqrt(.)))
    in either order."""
    if node.op == "Div":
        sqrt = _made_by(node.inputs[1], "Sqrt")
        return None if sqrt is None else (node.inputs[0], sqrt, [node])
    for d, r in (node.inputs, reversed(node.inputs)):
        found = _reciprocal_sqrt(r)
        if found is not None:
            return d, found[0], [node] + found[1]
    return None


def _stats(sqrt: Node) -> Optional[tuple]:
    """``(eps, ReduceMean node, Add node)`` where ``sqrt`` is Sqrt(Add(ReduceMean(.), eps)), the
    Add in either order."""
    add = _made_by(sqrt.inputs[0], "Add")
    if add is None:
        return None
    for v, e in (add.inputs, reversed(add.inputs)):
        mean = _made_by(v, "ReduceMean")
        if mean is not None and _scalar(e) is not None:
            return _scalar(e), mean, add
    return None


# ---- LayerNorm and RMSNorm ---------------------------------------------------------------------

def _match_norm(graph: Graph, node: Node, uses: dict) -> Optional[_Match]:
    found = _divided_by_std(node)
    if found is None:
        return None
    d, sqrt, tail = found
    stats = _stats(sqrt)
    if stats is None:
        return None
    eps, var, add = stats
    square = _square_of(var.inputs[0])
    axis = _trailing_from(var)
    if square is None or square[0] is not d or axis is None:
        return None
    nodes = [square[1], var, add, sqrt] + tail[::-1]
    sub = _made_by(d, "Sub")
    mean = _made_by(sub.inputs[1], "ReduceMean") if sub is not None else None
    centered = mean is not None and mean.inputs[0] is sub.inputs[0] and _trailing_from(mean) == axis
    x = sub.inputs[0] if centered else d
    if centered:
        nodes = [mean, sub] + nodes
    norm_shape = x.type.shape[axis:]
    more, scale, bias = _affine(graph, nodes[-1], uses, x, norm_shape, with_bias=centered)
    attrs = {"axis": axis, "epsilon": eps}
    if not centered:
        return _Match("rtxjit.RMSNorm", nodes + more, x, attrs, [("rms_scale", scale)] if scale is not None else [])
    if scale is None:
        if not all(isinstance(n, int) for n in norm_shape):
            return None
        scale = np.ones(norm_shape, _numpy_type(x.type.dtype))
    params = [("ln_scale", scale)] + ([("ln_bias", bias)] if bias is not None else [])
    return _Match("LayerNormalization", nodes + more, x, attrs, params)


def _affine(graph: Graph, last: Node, uses: dict, x: Value, norm_shape: tuple, with_bias: bool) -> tuple:
    """``(nodes, gamma, beta)``: an optional Mul by a constant gamma, then (``with_bias``) an
    optional Add of a constant beta, each the only reader of the value before it; gamma and beta
    as arrays of the normalized shape (None where absent or where the constant does not fit)."""
    nodes, arrays, value = [], {}, last.outputs[0]
    for op in ("Mul", "Add") if with_bias else ("Mul",):
        reader = _only_reader(graph, value, uses)
        if reader is None or reader.op != op:
            continue
        other = reader.inputs[1] if reader.inputs[0] is value else reader.inputs[0]
        array = _over_normalized_dims(other, x.type, norm_shape) if other.is_const else None
        if array is not None:
            arrays[op] = array
            nodes.append(reader)
            value = reader.outputs[0]
    return nodes, arrays.get("Mul"), arrays.get("Add")


def _over_normalized_dims(c: Value, x: TensorType, norm_shape: tuple) -> Optional[np.ndarray]:
    """``c``'s data broadcast to ``norm_shape``, where ``c`` has x's type and broadcasts over the
    normalized dims only (its other dims are 1); else None."""
    if c.type.dtype is not x.dtype or c.const.ndim > x.rank or not all(isinstance(n, int) for n in norm_shape):
        return None
    lead = max(c.const.ndim - len(norm_shape), 0)
    if any(n != 1 for n in c.const.shape[:lead]):
        return None
    try:
        return np.broadcast_to(c.const.reshape(c.const.shape[lead:]), norm_shape).copy()
    except ValueError:
        return None


def _numpy_type(dtype: DType) -> np.dtype:
    """The numpy type a constant of ``dtype`` is held in (bf16 as float32)."""
    return np.dtype(np.float32) if dtype is DType.BF16 else dtype.to_numpy()


# ---- Softmax -----------------------------------------------------------------------------------

def _match_softmax(div: Node) -> Optional[_Match]:
    e, total = div.inputs
    exp, reduce_sum = _made_by(e, "Exp"), _made_by(total, "ReduceSum")
    if exp is None or reduce_sum is None or reduce_sum.inputs[0] is not e:
        return None
    axes = _reduced(reduce_sum)
    if axes is None or len(axes) != 1:
        return None
    nodes, x = [exp, reduce_sum, div], exp.inputs[0]
    sub = _made_by(x, "Sub")
    peak = _made_by(sub.inputs[1], "ReduceMax") if sub is not None else None
    if peak is not None and peak.inputs[0] is sub.inputs[0] and _reduced(peak) == axes:
        nodes, x = [peak, sub] + nodes, sub.inputs[0]
    return _Match("Softmax", nodes, x, {"axis": axes[0]})


# ---- legality and rewriting --------------------------------------------------------------------

def _only_reader(graph: Graph, value: Value, uses: dict) -> Optional[Node]:
    readers = uses.get(value.name, [])
    if is_graph_output(graph, value) or len(readers) != 1:
        return None
    return readers[0][0]


def _private(graph: Graph, m: _Match, uses: dict) -> bool:
    """Every value the pattern computes, but its result, is read inside it only and is no graph
    output."""
    inside = {id(n) for n in m.nodes}
    for node in m.nodes[:-1]:
        for v in node.outputs:
            if v is None:
                continue
            if is_graph_output(graph, v) or any(id(r) not in inside for r, _ in uses.get(v.name, [])):
                return False
    return True


def _param_types(m: _Match) -> list:
    return [TensorType(m.x.type.dtype, a.shape) for _, a in m.params]


def _infers_output(m: _Match) -> bool:
    opdef = get_op(m.op)
    try:
        types = opdef.infer([m.x.type] + _param_types(m), opdef.bind_attrs(dict(m.attrs), m.op), 1)
    except (RtxjitError, ValueError):
        return False
    return types[0] == m.output.type


def _rewrite(graph: Graph, m: _Match, names: FreshNames) -> None:
    """The fused node takes the place of the last replaced node and produces its output."""
    opdef = get_op(m.op)
    last, output = m.nodes[-1], m.output
    params = [Value(names(f"{last.name}_{base}"), t, np.ascontiguousarray(a))
              for (base, a), t in zip(m.params, _param_types(m))]
    fused = Node(m.op, names(f"{last.name}/{m.op.split('.')[-1].lower()}"), [m.x] + params, [output],
                 opdef.bind_attrs(dict(m.attrs), m.op), opdef.since)
    graph.nodes.insert(graph.nodes.index(last), fused)
    remove_nodes(graph, m.nodes)
    output.producer = fused
