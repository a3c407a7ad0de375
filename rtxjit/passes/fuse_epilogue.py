"""Fuse the pointwise consumer of a MatMul, Gemm or Conv into the product's kernel.

Rewrites:
    f(MatMul(a, b), r)   => rtxjit.Epilogue(a, b, r){anchor: MatMul, program: [f]}
    P(Conv(x, w, b), s)  => rtxjit.Epilogue(x, w, b, s){anchor: Conv, program: P's}   (P: rtxjit.Pointwise)

(likewise for ConvTranspose and rtxjit.UpsampleConv, see passes/fuse_upsample_conv.py, and the
quantized products of rtxjit/quant/: com.microsoft.MatMulNBits, and rtxjit.QLinearMatMul where it
produces a float (not a requantized) output)

Where the product's only reader is pointwise (a plain pointwise op, or a chain fused by
fuse_pointwise), the product is not a graph output, and the reader's output has the product's
shape (the epilogue runs once per output element of the product's tile). MatMul needs operands of
rank >= 2; the convolutions an input over 1, 2 or 3 spatial dims (their template's three forms).
Bias adds, residual adds and activations then cost no kernel and no round trip through memory:
in a diffusion UNet's ResNet block that is conv1's timestep-embedding add (a computed ``[N, C, 1,
1]`` tensor, read through broadcast strides) and conv2's residual add and division by
``output_scale_factor`` (one rtxjit.Pointwise made by fuse_pointwise). The node produces the
reader's output value.
"""

from __future__ import annotations

import numpy as np

from rtxjit.codegen.compose import freeze
from rtxjit.ir.graph import Graph, Node, Value
from rtxjit.ir.rewrite import FreshNames, is_graph_output, make_constant, make_node, remove_nodes
from rtxjit.passes.base import PassResult
from rtxjit.passes.fuse_pointwise import fusable, program_of

ANCHORS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "rtxjit.UpsampleConv", "com.microsoft.MatMulNBits",
           "rtxjit.RowGatherMatMul",
           "rtxjit.QLinearMatMul", "rtxjit.ScaledConv", "rtxjit.NormMatMul")
CONVS = ("Conv", "ConvTranspose", "rtxjit.UpsampleConv", "rtxjit.ScaledConv")
VIEWS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


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
    if node.op in CONVS:
        return node.inputs[0].type.rank in (3, 4, 5)
    if node.op == "rtxjit.QLinearMatMul":  # a float output; int weights (fp8 ones as bits: quant/fuse.py)
        out, w = node.outputs[0].type.dtype, node.inputs[3].type.dtype
        return out.is_float and out.itemsize > 1 and w.is_int
    return node.op in ("Gemm", "com.microsoft.MatMulNBits", "rtxjit.NormMatMul", "rtxjit.RowGatherMatMul")


def _only_reader(graph: Graph, value, uses: dict):
    readers = {id(n): n for n, _ in uses.get(value.name, [])}
    if is_graph_output(graph, value) or len(readers) != 1:
        return None
    return next(iter(readers.values()))


def _reader(graph: Graph, anchor: Node, uses: dict):
    """The pointwise node to fuse after ``anchor``, reading the product directly or through a
    chain of reshaping views (a Gemm on ``[B*S, E]`` whose residual add is on ``[B, S, E]``)."""
    if anchor.op not in ANCHORS or not _anchor_ok(anchor):
        return None
    product = anchor.outputs[0]
    value, reader = product, _only_reader(graph, product, uses)
    while reader is not None and reader.op in VIEWS and product.type.static:
        value, reader = reader.outputs[0], _only_reader(graph, reader.outputs[0], uses)
    if reader is None or not (fusable(reader) or reader.op == "rtxjit.Pointwise"):
        return None
    out = reader.outputs[0].type
    if out.dtype is not product.type.dtype or out.shape != value.type.shape:
        return None
    if value is not product and any(v is not value and v is not None and v.type.rank and v.type.shape != out.shape
                                    for v in reader.inputs):
        return None  # through views, other inputs must be full-size (reshaped along) or scalars
    return reader


def _into_product_shape(graph: Graph, anchor: Node, reader: Node, names: FreshNames) -> None:
    """Where views stand between the product and ``reader``, make ``reader`` work in the product's
    shape: it reads the product itself, its other inputs through Reshapes to that shape, and a
    Reshape after it restores its output's shape (all views: no kernel, no copy)."""
    product = anchor.outputs[0]
    view_out = next(v for v in reader.inputs if v is not product and _from_views(v, product))
    target = make_constant(names, "epilogue_shape", np.array(product.type.shape, np.int64))
    back = make_constant(names, "epilogue_back", np.array(reader.outputs[0].type.shape, np.int64))
    new_inputs = []
    for v in reader.inputs:
        if v is view_out:
            new_inputs.append(product)
        elif v is not None and v.type.rank:
            view = make_node(names, "Reshape", [v, target], base="epilogue_view")
            graph.nodes.insert(graph.nodes.index(reader), view)
            new_inputs.append(view.outputs[0])
        else:
            new_inputs.append(v)
    chain, v = [], view_out
    while v is not product:  # the views between product and reader: only the reader read them
        chain.append(v.producer)
        v = v.producer.inputs[0]
    remove_nodes(graph, chain)
    result = reader.outputs[0]
    inner = Value(names("epilogue_out"), result.type.with_shape(product.type.shape))
    reader.inputs, reader.outputs, inner.producer = new_inputs, [inner], reader
    restore = Node("Reshape", names("epilogue_restore"), [inner, back], [result], {"allowzero": 0}, 14)
    result.producer = restore
    graph.nodes.insert(graph.nodes.index(reader) + 1, restore)


def _from_views(value, product) -> bool:
    while value is not None and value is not product:
        node = value.producer
        if node is None or node.op not in VIEWS:
            return False
        value = node.inputs[0]
    return value is product


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
    if anchor.outputs[0] not in reader.inputs:
        _into_product_shape(graph, anchor, reader, names)
    program, extras = _program(reader, anchor.outputs[0])
    attrs = {"anchor": anchor.op, "anchor_attrs": freeze(anchor.attrs), "n_anchor": len(anchor.inputs),
             "program": program}
    out = reader.outputs[0]
    node = Node("rtxjit.Epilogue", names(anchor.name + "_epilogue"), list(anchor.inputs) + extras, [out], attrs, 1)
    remove_nodes(graph, [anchor])
    graph.nodes[graph.nodes.index(reader)] = node
    out.producer = node
