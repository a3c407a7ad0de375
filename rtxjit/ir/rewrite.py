"""Graph-editing helpers that the passes share.

Every helper edits the graph in place. The contract they keep: ``graph.nodes`` stays in topological
order, every ``Value.producer`` names the node that lists the value among its outputs, and the names
of the graph's inputs and outputs never change (a rewrite that would replace a graph output instead
makes the surviving node produce that output's ``Value``). The readers of each value are
``graph.consumers()`` (value name -> [(node, input index)]).
"""

from __future__ import annotations

import itertools

import numpy as np

from rtxjit.errors import ModelError
from rtxjit.ir.graph import Graph, Node, Value
from rtxjit.ir.host import const_type
from rtxjit.ir.registry import Unknown, get_op


def copy_graph(graph: Graph) -> Graph:
    """A copy with new values and nodes; constants share their (read-only) arrays with the original."""
    values: dict = {}

    def new(v):
        if v is not None and id(v) not in values:
            values[id(v)] = Value(v.name, v.type, v.const)
        return None if v is None else values[id(v)]

    nodes = []
    for n in graph.nodes:
        node = Node(n.op, n.name, [new(v) for v in n.inputs], [new(v) for v in n.outputs], dict(n.attrs), n.version)
        for v in node.outputs:
            if v is not None:
                v.producer = node
        nodes.append(node)
    return Graph(graph.name, [new(v) for v in graph.inputs], [new(v) for v in graph.outputs], nodes, graph.opset)


def use_count(graph: Graph, value: Value, uses: dict = None) -> int:
    """How many node inputs read ``value``, plus one per place it holds among the graph outputs."""
    uses = graph.consumers() if uses is None else uses
    return len(uses.get(value.name, [])) + sum(1 for v in graph.outputs if v is value)


def is_graph_output(graph: Graph, value: Value) -> bool:
    return any(v is value for v in graph.outputs)


def replace_all_uses(graph: Graph, old: Value, new: Value) -> bool:
    """Make every reader of ``old`` read ``new``. Returns False, changing nothing, where that cannot
    be done without renaming a graph output.

    Where ``old`` is a graph output, the output keeps its ``Value``: a constant ``new`` makes ``old``
    a constant of the same data; a ``new`` computed by a node makes that node produce ``old`` (and
    every reader of ``new`` read ``old``). A ``new`` that is a graph input or output cannot stand in.
    """
    if old is new:
        return True
    if is_graph_output(graph, old):
        if new.is_const:
            _detach(old)
            old.const = new.const
        elif new.producer is not None and not is_graph_output(graph, new) and old.type == new.type:
            _rename_output(graph, new, old)
            return True
        else:
            return False
    _redirect(graph, old, new)
    return True


def _rename_output(graph: Graph, value: Value, keep: Value) -> None:
    """The producer of ``value`` produces ``keep`` instead; readers of ``value`` read ``keep``."""
    node = value.producer
    _detach(keep)
    node.outputs = [keep if v is value else v for v in node.outputs]
    keep.producer, value.producer = node, None
    _redirect(graph, value, keep)


def _detach(value: Value) -> None:
    """``value`` is no longer produced by its node (whose output slot becomes None, omitted)."""
    if value.producer is not None:
        value.producer.outputs = [None if v is value else v for v in value.producer.outputs]
        value.producer = None


def _redirect(graph: Graph, old: Value, new: Value) -> None:
    for node in graph.nodes:
        node.inputs = [new if v is old else v for v in node.inputs]


def remove_nodes(graph: Graph, nodes) -> None:
    """Drop ``nodes`` from the graph; their outputs lose their producer link."""
    gone = {id(n) for n in nodes}
    for node in nodes:
        for v in node.outputs:
            if v is not None and v.producer is node:
                v.producer = None
    graph.nodes = [n for n in graph.nodes if id(n) not in gone]


def sort_topologically(graph: Graph) -> None:
    """Reorder ``graph.nodes`` so that every node follows the producers of its inputs (stable:
    nodes already in order keep their order). A cycle is a ModelError."""
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    order, state = [], {}
    for start in graph.nodes:
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                state[id(node)] = "done"
                order.append(node)
                continue
            if state.get(id(node)):
                if state[id(node)] == "active":
                    raise ModelError(f"node '{node.name}' ({node.op}) is part of a cycle")
                continue
            state[id(node)] = "active"
            stack.append((node, True))
            for v in reversed(node.inputs):
                p = v.producer if v is not None else None
                if p is not None and id(p) in position and state.get(id(p)) != "done":
                    if state.get(id(p)) == "active":
                        raise ModelError(f"node '{node.name}' ({node.op}) is part of a cycle")
                    stack.append((p, False))
    graph.nodes = order


class FreshNames:
    """Value and node names not yet used in a graph: ``names = FreshNames(graph); names("w_bn")``."""

    def __init__(self, graph: Graph):
        self.used = set(graph.values()) | {n.name for n in graph.nodes}

    def __call__(self, base: str) -> str:
        name = base
        for i in itertools.count(1):
            if name not in self.used:
                break
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def make_constant(names: FreshNames, base: str, value: np.ndarray) -> Value:
    """A new constant holding ``value`` under a fresh name."""
    value = np.array(value, order="C")  # not np.ascontiguousarray, which makes a 0-d value 1-d
    return Value(names(base), const_type(value), value)


def infer_args(opdef, inputs: list) -> list:
    """What an op's inference takes for these input values: types, host values (or Unknown)."""
    out = []
    for i, v in enumerate(inputs):
        if v is None:
            out.append(None)
        elif i in opdef.host_inputs:
            out.append(v.const if v.is_const else Unknown(v.type))
        else:
            out.append(v.type)
    return out


def infers_same(node: Node, inputs: list, attrs: dict) -> bool:
    """Whether ``node`` with these inputs and attributes has the output types it has now."""
    opdef = get_op(node.op, f"node '{node.name}'", node.version)
    types = opdef.infer(infer_args(opdef, inputs), attrs, len(node.outputs))
    return all(v is None or v.type == t for v, t in zip(node.outputs, types))


def make_node(names: FreshNames, op: str, inputs: list, attrs: dict = None, n_outputs: int = 1,
              version: int = 0, base: str = None) -> Node:
    """A new node of ``op`` (attributes completed with defaults) whose outputs are fresh values of
    the inferred types. The caller inserts it into ``graph.nodes`` (then ``sort_topologically``)."""
    opdef = get_op(op, f"new {op} node")
    attrs = opdef.bind_attrs(dict(attrs or {}), f"new {op} node")
    types = opdef.infer(infer_args(opdef, inputs), attrs, n_outputs)
    base = base or op.lower()
    outputs = [Value(names(base), t) for t in types[:n_outputs]]
    node = Node(op, names(base + "_node"), list(inputs), outputs, attrs, version or opdef.since)
    for v in outputs:
        v.producer = node
    return node
