"""Fuse group normalizations, as both torch exporters emit ``nn.GroupNorm``, and the pointwise chain
that reads them (SiLU in diffusers' ResNet blocks) into one ``rtxjit.GroupNorm`` node: a statistics
pass and one normalizing pass that also applies the affine and the activation before its store.

Rewrites (x ``[N, C, ...]`` with C known; s, b, gamma, beta constants; G = num_groups):

    Reshape(x, [N, G, -1]) -> InstanceNormalization(s[G], b[G]){eps} -> Reshape(to [N, C, ...])
        [-> Mul(gamma)] [-> Add(beta)]          (gamma, beta per channel: [C, 1, 1], [1, C, 1, 1], scalar)
        => rtxjit.GroupNorm(x seen as [N, C, ...], scale[C], bias[C]){num_groups: G, epsilon: eps}
           scale[c] = s[g(c)] * gamma[c], bias[c] = b[g(c)] * gamma[c] + beta[c]  (in float64, rounded once)
    rtxjit.GroupNorm, GroupNormalization-21 or InstanceNormalization, then a chain P of pointwise ops
        => rtxjit.GroupNorm(x, scale, bias, constants of P){program: P}

The TorchScript exporter (opset 17) reshapes back through ``Shape(x)``, which the importer folds
where x's shape is static; the dynamo exporter (onnxscript, opset 18+) emits the same chain with a
constant target shape (checked with torch 2.13: neither emits GroupNormalization). SiLU arrives as
``Mul(y, Sigmoid(y))`` from both. x's shape before the first Reshape may differ from the one restored
after it where it has the same N and C (diffusers' attention blocks group-normalize a ``[N, C, H*W]``
view of a ``[N, C, H, W]`` tensor, and simplify_shapes merges the two Reshapes): the fused node then
reads x through a Reshape to the restored shape (a view).

The chain: the nodes after the norm, in graph order, that read its value or each other, each with
an ``expr`` hook (rtxjit/passes/fuse_pointwise.py's ``fusable``), its other inputs constants (so no
cycle can form) and x's shape as its output shape; it ends at the last point where exactly one of
its values is read outside it (or is a graph output), and stops at the first reader that cannot
join. GroupNormalization joins only where its stash_type is x's compute type (fp32 statistics for
fp16/fp32 data), what rtxjit.GroupNorm computes in.

Legality: every replaced intermediate is read inside the pattern only and is no graph output; the
fused node produces the last replaced node's output ``Value`` and must infer its type. The first
Reshape (and a ``Shape(x)``) are left to dead-code elimination.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from rtxjit.codegen.dtypes import compute_type
from rtxjit.errors import RtxjitError
from rtxjit.ir.graph import Graph, Node, Value
from rtxjit.ops.norm import STASH_TYPES
from rtxjit.ir.registry import get_op
from rtxjit.ir.rewrite import FreshNames, infer_args, is_graph_output, make_constant, make_node, remove_nodes
from rtxjit.ir.types import DType, TensorType
from rtxjit.passes.base import PassResult
from rtxjit.passes.fuse_pointwise import fusable, program_of

OP = "rtxjit.GroupNorm"
MAX_CHAIN = 16  # pointwise ops fused after a norm


@dataclass
class _Match:
    """A group norm: the nodes it replaces (result last), x, its per-channel scale and bias (numpy
    arrays, made constants at rewrite time, or the node's own input Values) and attributes."""

    nodes: list
    x: Value
    scale: object
    bias: object
    groups: int
    epsilon: float
    chain: list = field(default_factory=list)  # the pointwise nodes fused after it
    view: Optional[tuple] = None  # the shape x is seen in (through a Reshape), where not its own

    @property
    def x_type(self) -> TensorType:
        return self.x.type if self.view is None else self.x.type.with_shape(self.view)

    @property
    def norm_output(self) -> Value:
        return self.nodes[-1].outputs[0]

    @property
    def output(self) -> Value:
        return (self.chain or self.nodes)[-1].outputs[0]


def fuse_group_norm(graph: Graph) -> PassResult:
    """Replace each exported group norm (and each norm node followed by a pointwise chain) by one
    rtxjit.GroupNorm (in place)."""
    uses = graph.consumers()
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    matches = []
    for node in graph.nodes:
        m = _match(graph, node, uses)
        if m is None:
            continue
        m.chain = _chain(graph, m, uses, position[id(m.nodes[-1])])
        if (m.chain or len(m.nodes) > 1) and _private(graph, m, uses) and _infers_output(m):
            matches.append(m)
    names = FreshNames(graph)
    for m in matches:
        _rewrite(graph, m, names)
    return PassResult(graph, bool(matches))


# ---- the norm ----------------------------------------------------------------------------------

def _match(graph: Graph, node: Node, uses: dict) -> Optional[_Match]:
    if node.op == "InstanceNormalization":
        m = _match_exported(graph, node, uses)
        if m is not None:
            return m
    x = node.inputs[0] if node.inputs else None
    if x is None or x.type.dtype not in (DType.FP32, DType.FP16, DType.BF16, DType.FP64) or x.type.rank < 2:
        return None
    c = x.type.shape[1]
    if node.op == "InstanceNormalization" and isinstance(c, int):
        return _Match([node], x, node.inputs[1], node.inputs[2], c, node.attrs["epsilon"])
    if node.op == "GroupNormalization" and get_op(node.op, version=node.version).since < 21:
        return None  # version 18: scale and bias per group, not the per-channel ones of rtxjit.GroupNorm
    if node.op in ("GroupNormalization", OP) and not node.attrs.get("program"):
        stash = STASH_TYPES.get(node.attrs.get("stash_type", 1))
        if stash is compute_type(x.type.dtype):
            return _Match([node], x, node.inputs[1], node.inputs[2], node.attrs["num_groups"], node.attrs["epsilon"])
    return None


def _match_exported(graph: Graph, inorm: Node, uses: dict) -> Optional[_Match]:
    """Reshape(x, [N, G, -1]) -> InstanceNormalization -> Reshape(x's shape) [-> Mul] [-> Add]."""
    grouped = inorm.inputs[0]
    into = _made_by(grouped, "Reshape")
    if into is None or grouped.type.rank != 3:
        return None
    x = into.inputs[0]
    n_g = grouped.type.shape[:2]
    if x.type.rank < 2 or not isinstance(x.type.shape[1], int) or not isinstance(n_g[1], int):
        return None
    c, groups = x.type.shape[1], n_g[1]
    if c % groups or not (n_g[0] == x.type.shape[0] or _copies_batch(into)):
        return None
    s, b = (_const(v) for v in inorm.inputs[1:3])
    if s is None or b is None or s.size != groups or b.size != groups:
        return None
    back = _only_reader(graph, inorm.outputs[0], uses)
    shape = _restored(back, x) if back is not None and back.op == "Reshape" else None
    if shape is None:
        return None
    m = _Match([inorm, back], x, None, None, groups, inorm.attrs["epsilon"],
               view=None if shape == x.type.shape else shape)
    scale = np.repeat(s.reshape(-1).astype(np.float64), c // groups)
    bias = np.repeat(b.reshape(-1).astype(np.float64), c // groups)
    value = back.outputs[0]
    for op in ("Mul", "Add"):
        reader = _only_reader(graph, value, uses)
        if reader is None or reader.op != op:
            continue
        other = reader.inputs[1] if reader.inputs[0] is value else reader.inputs[0]
        per_channel = _per_channel(other, m.x_type)
        if per_channel is None or reader.outputs[0].type != m.x_type:
            break
        if op == "Mul":
            scale, bias = scale * per_channel, bias * per_channel
        else:
            bias = bias + per_channel
        m.nodes.append(reader)
        value = reader.outputs[0]
    m.scale, m.bias = scale, bias
    return m


def _copies_batch(reshape: Node) -> bool:
    """Whether the Reshape's target is a constant whose dim 0 is 0 (copy x's batch size)."""
    target = _const(reshape.inputs[1])
    return target is not None and target.size == 3 and int(target.reshape(-1)[0]) == 0 \
        and not reshape.attrs.get("allowzero", 0)


def _restored(reshape: Node, x: Value) -> Optional[tuple]:
    """The ``[N, C, ...]`` shape the Reshape gives, where N and C are x's: its static output shape,
    or x's own where its target is Shape(x); else None."""
    out = reshape.outputs[0].type.shape
    if len(out) >= 2 and out[:2] == x.type.shape[:2] and all(isinstance(d, int) for d in out):
        return out
    shape = _made_by(reshape.inputs[1], "Shape")
    if shape is not None and shape.inputs[0] is x and shape.attrs.get("start", 0) == 0 \
            and shape.attrs.get("end") is None:
        return x.type.shape
    return None


def _per_channel(value: Value, x: TensorType) -> Optional[np.ndarray]:
    """A constant of x's type that broadcasts along x's channel dim only, as a float64 ``[C]``."""
    a = _const(value)
    if a is None or value.type.dtype is not x.dtype or a.ndim > x.rank:
        return None
    shape = (1,) * (x.rank - a.ndim) + a.shape
    c = x.shape[1]
    if shape[0] != 1 or shape[1] not in (1, c) or any(d != 1 for d in shape[2:]):
        return None
    return np.broadcast_to(a.astype(np.float64).reshape(-1), (c,)).copy()


# ---- the pointwise chain after it --------------------------------------------------------------

def _chain(graph: Graph, m: _Match, uses: dict, start: int) -> list:
    """The longest pointwise chain after the norm with one value leaving it (see the docstring)."""
    value = m.norm_output
    if is_graph_output(graph, value):
        return []
    shape = value.type.shape
    produced = {id(value)}
    open_readers = {id(value): _reader_count(graph, value, uses)}
    members, best = [], []
    for node in graph.nodes[start + 1:]:
        if sum(open_readers.values()) == 0 or len(members) >= MAX_CHAIN:
            break
        if not any(v is not None and id(v) in produced for v in node.inputs):
            continue
        if not _joins(node, produced, shape):
            break
        members.append(node)
        for v in {id(v): v for v in node.inputs if v is not None and id(v) in produced}.values():
            open_readers[id(v)] -= 1
        out = node.outputs[0]
        produced.add(id(out))
        open_readers[id(out)] = _reader_count(graph, out, uses)
        still_open = [k for k, count in open_readers.items() if count > 0]
        if still_open == [id(out)]:
            best = list(members)
    return best


def _reader_count(graph: Graph, value: Value, uses: dict) -> int:
    """Distinct reading nodes, plus one for a graph output."""
    return len({id(n) for n, _ in uses.get(value.name, [])}) + int(is_graph_output(graph, value))


def _joins(node: Node, produced: set, shape: tuple) -> bool:
    if not fusable(node) or node.outputs[0].type.shape != shape:
        return False
    return all(v is None or id(v) in produced or v.is_const for v in node.inputs)


# ---- small helpers -----------------------------------------------------------------------------

def _made_by(value: Optional[Value], op: str) -> Optional[Node]:
    node = None if value is None else value.producer
    return node if node is not None and node.op == op else None


def _const(value: Optional[Value]) -> Optional[np.ndarray]:
    return None if value is None or not value.is_const else np.asarray(value.const)


def _only_reader(graph: Graph, value: Value, uses: dict) -> Optional[Node]:
    readers = {id(n): n for n, _ in uses.get(value.name, [])}
    if is_graph_output(graph, value) or len(readers) != 1:
        return None
    return next(iter(readers.values()))


def _numpy_type(dtype: DType) -> np.dtype:
    """The numpy type a constant of ``dtype`` is held in (bf16 as float32)."""
    return np.dtype(np.float32) if dtype is DType.BF16 else dtype.to_numpy()


# ---- legality and rewriting --------------------------------------------------------------------

def _inputs(m: _Match, names: Optional[FreshNames]) -> tuple:
    """``(inputs, attrs)`` of the fused node; constants get fresh names, and a view of x its
    Reshape node (without ``names``, for the type check: placeholders)."""
    base = m.nodes[-1].name
    if m.view is None:
        x = m.x
    elif names is None:
        x = Value("x", m.x_type)
    else:
        target = make_constant(names, f"{base}_gn_shape", np.array(m.view, np.int64))
        x = make_node(names, "Reshape", [m.x, target], base=f"{base}_gn_view").outputs[0]
    params = []
    for what, p in (("scale", m.scale), ("bias", m.bias)):
        if isinstance(p, Value):
            params.append(p)
            continue
        data = np.ascontiguousarray(p.astype(_numpy_type(m.x.type.dtype)))
        params.append(Value(names(f"{base}_gn_{what}") if names else what, TensorType(m.x.type.dtype, data.shape), data))
    external = [m.norm_output]
    program = program_of(m.chain, external) if m.chain else ()
    attrs = {"num_groups": m.groups, "epsilon": m.epsilon, "program": program}
    return [x, *params, *external[1:]], attrs


def _private(graph: Graph, m: _Match, uses: dict) -> bool:
    inside = {id(n) for n in m.nodes + m.chain}
    for node in (m.nodes + m.chain)[:-1]:
        v = node.outputs[0]
        if is_graph_output(graph, v) or any(id(r) not in inside for r, _ in uses.get(v.name, [])):
            return False
    return True


def _infers_output(m: _Match) -> bool:
    opdef = get_op(OP)
    inputs, attrs = _inputs(m, None)
    try:
        types = opdef.infer(infer_args(opdef, inputs), opdef.bind_attrs(attrs, OP), 1)
    except (RtxjitError, ValueError):
        return False
    return types[0] == m.output.type


def _rewrite(graph: Graph, m: _Match, names: FreshNames) -> None:
    """The fused node takes the place of the last replaced node and produces its output."""
    last, output = (m.nodes + m.chain)[-1], m.output
    inputs, attrs = _inputs(m, names)
    fused = Node(OP, names(f"{last.name}/groupnorm"), inputs, [output], get_op(OP).bind_attrs(attrs, OP), 1)
    if inputs[0] is not m.x:
        graph.nodes.insert(graph.nodes.index(last), inputs[0].producer)
    graph.nodes.insert(graph.nodes.index(last), fused)
    remove_nodes(graph, m.nodes + m.chain)
    output.producer = fused
