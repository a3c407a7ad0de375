"""Fuse the pointwise consumer of a MatMul, Gemm or Conv into the product's kernel.

Rewrites:
    f(MatMul(a, b), r)   => rtxjit.Epilogue(a, b, r){anchor: MatMul, program: [f]}
    P(Conv(x, w, b), s)  => rtxjit.Epilogue(x, w, b, s){anchor: Conv, program: P's}   (P: rtxjit.Pointwise)

Where the product's only reader is pointwise (a plain pointwise op, or a chain fused by
fuse_pointwise), the product is not a graph output, and the reader's output has the product's
shape (the epilogue runs once per output element of the product's tile). MatMul needs operands of
rank >= 2, Conv a 2-D (NCHW) input. Bias adds, residual adds and activations then cost no
kernel and no round trip through memory. The node produces the reader's output value.
"""

from __future__ import annotations

from rtxjit.codegen.compose import freeze
from rtxjit.ir.graph import Graph, Node
from rtxjit.ir.rewrite import FreshNames, is_graph_output, remove_nodes
from rtxjit.passes.base import PassResult
from rtxjit.passes.fuse_pointwise import fusable, program_of

ANCHORS = ("MatMul", "Gemm", "Conv")


def fuse_epilogue(graph: Graph) -> PassResult:
    uses = graph.consumers()
    names = FreshNames(graph)
    taken: set = set()  # readers already merged into a product (a residual Add of two convs)
    for anchor in list(graph.nodes):
        reader = _reader(graph, anchor, uses)
        if reader is not None and id(reader) not in taken:
            _fuse(graph, anchor, reader, names)
            taken.add(id(reader))
    return PassResult(graph, bool(taken))


def _anchor_ok(node: Node) -> bool:
    if node.op == "MatMul":
        return all(v.type.rank >= 2 for v in node.inputs)
    if node.op == "Conv":
        return node.inputs[0].type.rank == 4
    return node.op == "Gemm"


def _reader(graph: Graph, anchor: Node, uses: dict):
    if anchor.op not in ANCHORS or not _anchor_ok(anchor):
        return None
    product = anchor.outputs[0]
    readers = {id(n): n for n, _ in uses.get(product.name, [])}
    if is_graph_output(graph, product) or len(readers) != 1:
        return None
    reader = next(iter(readers.values()))
    if not (fusable(reader) or reader.op == "rtxjit.Pointwise"):
        return None
    return reader if reader.outputs[0].type == product.type else None  # same shape and dtype


def _program(reader: Node, product) -> tuple:
    """The reader's program over ``[product, extras...]`` and the extras."""
    extras = [product]
    if reader.op != "rtxjit.Pointwise":
        program = program_of([reader], extras)
        return program, extras[1:]
    extras += [v for v in reader.inputs if v is not product]
    index = {k: next(i for i, e in enumerate(extras) if e is v) for k, v in enumerate(reader.inputs)}
    steps = []
    for op, args, attrs in reader.attrs["program"]:
        steps.append((op, tuple(("in", index[a[1]]) if a[0] == "in" else a for a in args), attrs))
    return tuple(steps), extras[1:]


def _fuse(graph: Graph, anchor: Node, reader: Node, names: FreshNames) -> None:
    program, extras = _program(reader, anchor.outputs[0])
    attrs = {"anchor": anchor.op, "anchor_attrs": freeze(anchor.attrs), "n_anchor": len(anchor.inputs),
             "program": program}
    out = reader.outputs[0]
    node = Node("rtxjit.Epilogue", names(anchor.name + "_epilogue"), list(anchor.inputs) + extras, [out], attrs, 1)
    remove_nodes(graph, [anchor])
    graph.nodes[graph.nodes.index(reader)] = node
    out.producer = node
