"""Compute each distinct expression once.

Rewrites:
    y1 = op(x..){a}; y2 = op(x..){a} => y1 (readers of y2 read y1)   same op, inputs and attributes
    c1, c2 constants of one dtype, shape and bytes => c1

Attributes compare canonically (arrays by dtype, shape and bytes; lists and tuples alike). A node
whose outputs cannot all be replaced (two graph outputs) stays.
"""

from __future__ import annotations

import hashlib

import numpy as np

from rtxjit.ir.graph import Graph, Node
from rtxjit.ir.rewrite import is_graph_output, remove_nodes, replace_all_uses
from rtxjit.passes.base import PassResult


def eliminate_common_subexpressions(graph: Graph) -> PassResult:
    merged_consts = _merge_constants(graph)
    seen: dict = {}
    removed = []
    for node in graph.nodes:
        first = seen.setdefault(_node_key(node), node)
        if first is not node and _replace_outputs(graph, node, first):
            removed.append(node)
    remove_nodes(graph, removed)
    return PassResult(graph, merged_consts or bool(removed))


def _merge_constants(graph: Graph) -> bool:
    seen: dict = {}
    modified = False
    for c in graph.constants():
        if is_graph_output(graph, c):
            continue  # keeps its name
        first = seen.setdefault(_const_key(c.const), c)
        if first is not c and first.const.tobytes() == c.const.tobytes():
            modified = replace_all_uses(graph, c, first) or modified
    return modified


def _replace_outputs(graph: Graph, node: Node, first: Node) -> bool:
    """Readers of ``node``'s outputs read ``first``'s; whether all of them could be replaced."""
    done = [v is None or replace_all_uses(graph, v, w) for v, w in zip(node.outputs, first.outputs)]
    return all(done)


def _node_key(node: Node) -> tuple:
    inputs = tuple(None if v is None else id(v) for v in node.inputs)
    outputs = tuple(v is None for v in node.outputs)
    return node.op, node.version, inputs, outputs, canonical(node.attrs)


def _const_key(a: np.ndarray) -> tuple:
    return a.dtype.str, a.shape, hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def canonical(value):
    """A hashable form of an attribute value that is equal exactly when the values are."""
    if isinstance(value, dict):
        return tuple(sorted((k, canonical(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(canonical(v) for v in value)
    if isinstance(value, np.ndarray):
        return "ndarray", value.dtype.str, value.shape, value.tobytes()
    if isinstance(value, np.generic):
        return value.item()
    return value
