"""Fuse chains of pointwise ops into one kernel.

Rewrites:
    f(g(x, a), b) => rtxjit.Pointwise(x, a, b){program: [g, f]}   (and longer chains, trees)

A pointwise node (its op declares an ``expr`` hook) joins a group when every node that reads it is
in that one group and its value is not a graph output; the value must broadcast to the group's
output shape (each element is then recomputed where it is read, which is what the unfused
kernel's broadcast load did). Since nothing outside the group reads it, joining cannot create a
cycle. The group becomes one ``rtxjit.Pointwise`` node that produces the sink's
output value (its name is kept); intermediate values stay in registers, in their compute type.
"""

from __future__ import annotations

from rtxjit.codegen.compose import freeze
from rtxjit.ir.graph import Graph, Node
from rtxjit.ir.registry import get_op
from rtxjit.ir.rewrite import FreshNames, is_graph_output, remove_nodes
from rtxjit.ir.types import broadcast_shapes
from rtxjit.ops.elementwise import special_cast
from rtxjit.ops.quant import pointwise_form
from rtxjit.passes.base import PassResult

MAX_GROUP = 32  # ops per fused kernel: keeps the generated source and its argument list readable


def fusable(node: Node) -> bool:
    if node.op in ("QuantizeLinear", "DequantizeLinear") and not pointwise_form(node):
        return False  # per-axis / block-wise parameters, fp8, int4: their own kernels
    if node.op in ("Cast", "CastLike") and node.outputs and node.outputs[0] is not None \
            and special_cast(node.inputs[0].type.dtype, node.outputs[0].type.dtype):
        return False  # fp8 and 4- / 2-bit casts: statements of their own (ops/elementwise.py)
    return (get_op(node.op, version=node.version).expr_fn is not None and len(node.outputs) == 1
            and node.outputs[0] is not None)


def fuse_pointwise(graph: Graph) -> PassResult:
    groups = _groups(graph)
    names = FreshNames(graph)
    fused = 0
    for sink, members in groups.items():
        if len(members) > 1:
            _replace(graph, sink, members, names)
            fused += 1
    return PassResult(graph, fused > 0)


def _groups(graph: Graph) -> dict:
    """Sink node -> its members in topological order (every pointwise node is in one group)."""
    uses = graph.consumers()
    sink_of: dict = {}
    size: dict = {}
    for node in reversed(graph.nodes):
        if not fusable(node):
            continue
        sink = node
        candidate = _readers_group(graph, node, uses, sink_of)
        if candidate is not None and size[id(candidate)] < MAX_GROUP and _fits(node, candidate):
            sink = candidate
        sink_of[id(node)] = sink
        size[id(sink)] = size.get(id(sink), 0) + 1
    groups: dict = {}
    for node in graph.nodes:
        if id(node) in sink_of:
            groups.setdefault(sink_of[id(node)], []).append(node)
    return groups


def _readers_group(graph: Graph, node: Node, uses: dict, sink_of: dict):
    """The sink of the one group that holds every reader of ``node``'s value, if there is one.

    Readers are grouped before the node (reverse topological order). When all of them are in one
    group the node can join it: nothing outside the group reads the value, so no cycle can form,
    and the fused code computes it once and reuses it (gelu's x read twice, for example)."""
    out = node.outputs[0]
    readers = [n for n, _ in uses.get(out.name, [])]
    if is_graph_output(graph, out) or not readers or any(id(r) not in sink_of for r in readers):
        return None
    sinks = {id(sink_of[id(r)]) for r in readers}
    return sink_of[id(readers[0])] if len(sinks) == 1 else None


def _fits(node: Node, sink: Node) -> bool:
    """Whether ``node``'s value broadcasts to the sink's output shape."""
    shape = sink.outputs[0].type.shape
    try:
        return broadcast_shapes(node.outputs[0].type.shape, shape) == shape
    except ValueError:
        return False


def program_of(members: list, external: list) -> tuple:
    """The program computing ``members`` (topological order); ``external`` collects the values it
    reads from outside, in first-use order (values already in it keep their index)."""
    step_of: dict = {}
    steps = []
    for j, m in enumerate(members):
        args = []
        for v in m.inputs:
            if v is None:
                args.append(("none",))
            elif id(v) in step_of:
                args.append(("t", step_of[id(v)]))
            else:
                if not any(e is v for e in external):
                    external.append(v)
                args.append(("in", next(i for i, e in enumerate(external) if e is v)))
        steps.append((m.op, tuple(args), freeze(m.attrs)))
        step_of[id(m.outputs[0])] = j
    return tuple(steps)


def _replace(graph: Graph, sink: Node, members: list, names: FreshNames) -> None:
    external: list = []
    program = program_of(members, external)
    out = sink.outputs[0]
    node = Node("rtxjit.Pointwise", names(sink.name + "_fused"), external, [out], {"program": program}, 1)
    remove_nodes(graph, [m for m in members if m is not sink])
    graph.nodes[graph.nodes.index(sink)] = node
    out.producer = node
