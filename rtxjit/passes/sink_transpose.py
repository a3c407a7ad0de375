"""Move a Transpose below the pointwise op that reads it, so the chain on both sides of it fuses.

Rewrite:
    f(Transpose(u, perm), b)  =>  Transpose(f(u, Transpose(Reshape(b, full rank), inverse)), perm)

where ``u`` is made by a pointwise op or a product (MatMul, Gemm, Conv: what takes an epilogue),
the Transpose's only reader is ``f`` (a pointwise op, one output, not the Transpose's value twice
over other operands), and every other operand of ``f`` has static dims that broadcast to its
output. Repeated until no rewrite applies, a Transpose sinks down a pointwise chain to its end.

ConvNeXt's block ends ``Linear -> permute(0, 3, 1, 2) -> * layer_scale -> + residual``: the
Transpose split the Linear's bias add (its epilogue) from the scale and residual add (a kernel of
their own that read the Linear's output transposed). Sunk, fuse_pointwise joins bias, scale and
residual into one chain and fuse_epilogue puts it into the Linear's kernel; the Transpose after it
is a view. Runs before fuse_pointwise. The operands' Transposes and Reshapes are views too (of a
constant, or of a residual stream the planner keeps channels-last: plan/plan.py
``pointwise_output``).
"""

from __future__ import annotations

import numpy as np

from rtxjit.ir.graph import Graph, Node, Value
from rtxjit.ir.rewrite import FreshNames, is_graph_output, make_constant, make_node
from rtxjit.passes.base import PassResult
from rtxjit.passes.fuse_pointwise import fusable

ENABLED = True  # False: Transposes stay where the exporter put them (as before 2026-12-07), for an A/B
PRODUCTS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


def sink_transpose(graph: Graph) -> PassResult:
    if not ENABLED:
        return PassResult(graph, False)
    names = FreshNames(graph)
    made: set = set()  # the operands' inverse Transposes: never sunk (they would sink back up and forth)
    changed = False
    for _ in range(len(graph.nodes)):  # each rewrite moves one Transpose below one more node
        uses = graph.consumers()
        found = next(((t, r) for t in graph.nodes
                      if id(t) not in made and (r := _sinkable(graph, t, uses)) is not None), None)
        if found is None:
            break
        made.update(id(n) for n in _sink(graph, *found, names))
        changed = True
    return PassResult(graph, changed)


def _sinkable(graph: Graph, transpose: Node, uses: dict):
    """The pointwise reader of ``transpose`` that it can move below, or None."""
    if transpose.op != "Transpose" or is_graph_output(graph, transpose.outputs[0]):
        return None
    u = transpose.inputs[0]
    source = u.producer
    if source is None or not (fusable(source) or source.op in PRODUCTS) or not u.type.static:
        return None
    readers = {id(n): n for n, _ in uses.get(transpose.outputs[0].name, [])}
    if len(readers) != 1:
        return None
    reader = next(iter(readers.values()))
    if not fusable(reader) or reader.outputs[0] is None:
        return None
    out = reader.outputs[0].type
    if out.shape != transpose.outputs[0].type.shape or not out.static:
        return None  # f broadcasts the transposed value itself: it would not keep its layout
    for v in reader.inputs:
        if v is None or v is transpose.outputs[0] or not v.type.rank:
            continue
        if not v.type.static or v.type.rank > out.rank or not _broadcasts(v.type.shape, out.shape):
            return None
    return reader


def _broadcasts(shape: tuple, to: tuple) -> bool:
    return all(d == 1 or d == t for d, t in zip(reversed(shape), reversed(to)))


def _sink(graph: Graph, transpose: Node, reader: Node, names: FreshNames) -> list:
    """The rewrite; returns the operands' new inverse Transposes."""
    t_out = transpose.outputs[0]
    u = transpose.inputs[0]
    rank = u.type.rank
    perm = list(transpose.attrs.get("perm") or range(rank)[::-1])
    inverse = [perm.index(d) for d in range(rank)]
    at = graph.nodes.index(reader)
    new_inputs, views = [], []
    for v in reader.inputs:
        if v is t_out:
            new_inputs.append(u)
            continue
        if v is None or not v.type.rank:
            new_inputs.append(v)
            continue
        if v.type.rank < rank:
            full = make_constant(names, "sink_rank", np.array((1,) * (rank - v.type.rank) + v.type.shape, np.int64))
            grow = make_node(names, "Reshape", [v, full], base="sink_view")
            graph.nodes.insert(at, grow)
            at += 1
            v = grow.outputs[0]
        view = make_node(names, "Transpose", [v], {"perm": inverse}, base="sink_view")
        graph.nodes.insert(at, view)
        at += 1
        views.append(view)
        new_inputs.append(view.outputs[0])
    result = reader.outputs[0]
    inner = Value(names(reader.name + "_sunk"), result.type.with_shape(u.type.shape))
    reader.inputs, reader.outputs, inner.producer = new_inputs, [inner], reader
    moved = Node("Transpose", names(transpose.name + "_sunk"), [inner], [result], {"perm": perm}, transpose.version)
    result.producer = moved
    graph.nodes.insert(at + 1, moved)
    graph.nodes.remove(transpose)  # its only reader now reads u
    return views
