"""Remove the nodes whose outputs nothing reads.

Rewrites:
    y = op(...) where no node reads y and y is not a graph output => (removed)

Constants live only as node inputs and graph outputs, so a constant that only dead nodes read
goes with them. Graph outputs, and every node they depend on, stay.
"""

from __future__ import annotations

from rtxjit.ir.graph import Graph
from rtxjit.passes.base import PassError, PassResult, conditions


def _live_nodes(graph: Graph) -> list:
    """The nodes some graph output depends on, in graph order."""
    live = {v.name for v in graph.outputs}
    kept = []
    for node in reversed(graph.nodes):
        if any(v is not None and v.name in live for v in node.outputs):
            kept.append(node)
            live.update(v.name for v in node.inputs if v is not None)
    return kept[::-1]


def _no_dead_nodes(graph: Graph) -> None:
    if len(_live_nodes(graph)) != len(graph.nodes):
        raise PassError("dead nodes remain")


@conditions(ensures=_no_dead_nodes)
def eliminate_dead_code(graph: Graph) -> PassResult:
    kept = _live_nodes(graph)
    modified = len(kept) != len(graph.nodes)
    graph.nodes = kept
    return PassResult(graph, modified)
