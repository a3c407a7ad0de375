"""Absorb a nearest integer-factor upsampling into the convolution that reads it.

Rewrites:
    Conv(Resize(x){mode: nearest, factors f}, w, b) => rtxjit.UpsampleConv(x, w, b){upsample: f, Conv's attrs}

A diffusion UNet's Upsample2D (and a VAE decoder's) is ``F.interpolate(x, scale_factor=2.0,
mode="nearest")`` then a 3x3 Conv; both torch exporters write the interpolation as Resize(x, _,
scales=[1, 1, 2, 2]){nearest, asymmetric, floor}. Unfused, the Resize writes a tensor 4 times x's
size and the Conv reads it back; fused, the conv template gathers from x itself (upsampled pixel
``ih`` is pixel ``ih // f`` of x, ops/conv.py), so the upsampled tensor never exists.

Legal where the Resize's output is read by that one Conv only (as its input, not a graph output),
x's spatial dims and the Resize's roi / scales / sizes are known (a symbolic batch is fine where
the Resize is given by scales), only spatial axes are resized, each by
an integer factor ``f`` (output size ``f`` times the input's), and the Resize's own coordinate
mapping — its transformation mode and nearest rounding — sends every output pixel ``o`` to input
pixel ``o // f``. That is checked by running the Resize's float64 reference on the indices of each
axis, so every (coordinate_transformation_mode, nearest_mode) pair for which it holds qualifies
(asymmetric + floor, half_pixel + round_prefer_*, ...), and any other is left as it is.
"""

from __future__ import annotations

import numpy as np

from rtxjit.ir.graph import Graph, Node
from rtxjit.ops.resize import resize_geometry
from rtxjit.ir.registry import get_op
from rtxjit.ir.rewrite import FreshNames, is_graph_output, remove_nodes
from rtxjit.passes.base import PassResult

MAX_FACTOR = 16  # larger factors are not a UNet's; the gather's integer division is checked up to here


def fuse_upsample_conv(graph: Graph) -> PassResult:
    uses = graph.consumers()
    names = FreshNames(graph)
    fused = 0
    for resize in list(graph.nodes):
        conv = _conv_reader(graph, resize, uses)
        if conv is None:
            continue
        factors = _factors(resize)
        node = None if factors is None else _fused_node(resize, conv, factors, names)
        if node is None:
            continue
        _fuse(graph, resize, conv, node)
        fused += 1
    return PassResult(graph, fused > 0)


def _conv_reader(graph: Graph, resize: Node, uses: dict):
    """The Conv that alone reads ``resize``'s output, as its input ``x``."""
    if resize.op != "Resize" or resize.attrs.get("mode", "nearest") != "nearest":
        return None
    out = resize.outputs[0]
    readers = uses.get(out.name, [])
    if is_graph_output(graph, out) or len(readers) != 1:
        return None
    conv, index = readers[0]
    spatial = resize.inputs[0].type.shape[2:]
    if conv.op != "Conv" or index != 0 or out.type.rank not in (3, 4, 5):
        return None
    if not all(isinstance(d, int) for d in spatial):
        return None
    return conv


def _factors(resize: Node):
    """The integer factor of each spatial axis, or None where the Resize is not a nearest
    integer-factor upsampling whose every output pixel ``o`` reads input pixel ``o // f``."""
    attrs = resize.attrs
    transform = attrs.get("coordinate_transformation_mode", "half_pixel")
    if transform == "tf_crop_and_resize":  # roi-dependent, extrapolates outside it
        return None
    x = resize.inputs[0]
    hosts = (list(resize.inputs) + [None, None, None])[1:4]  # roi, scales, sizes
    if any(v is not None and v.const is None for v in hosts):
        return None  # computed at run time: the factors are not known here
    roi, scales, sizes = (None if v is None else v.const for v in hosts)
    shape = x.type.shape
    if not x.type.static:  # a symbolic batch or channel count: by scales, those axes must keep scale 1
        if scales is None or np.asarray(scales).size == 0:
            return None
        shape = tuple(d if isinstance(d, int) else 1 for d in shape)  # a resized one yields a map: refused below
    _, maps = resize_geometry(shape, roi, scales, sizes, attrs.get("axes"),
                              attrs.get("keep_aspect_ratio_policy", "stretch"), transform)
    factors = [1] * (x.type.rank - 2)
    for m in maps:
        f = m.osize // m.isize if m.isize else 0
        if m.axis < 2 or not 1 <= f <= MAX_FACTOR or m.osize != f * m.isize or m.scale != float(f):
            return None
        if not _maps_to_floor(m.isize, m.osize, f, transform, attrs.get("nearest_mode", "round_prefer_floor")):
            return None
        factors[m.axis - 2] = f
    return tuple(factors) if any(f > 1 for f in factors) else None


def _maps_to_floor(isize: int, osize: int, f: int, transform: str, nearest_mode: str) -> bool:
    """Whether Resize (nearest, ``transform``, ``nearest_mode``) of a length-``isize`` axis to
    ``osize`` reads input ``o // f`` at output ``o``: its reference run on the indices."""
    index = np.arange(isize, dtype=np.float64)
    attrs = {"mode": "nearest", "coordinate_transformation_mode": transform, "nearest_mode": nearest_mode}
    (got,) = get_op("Resize").run_reference([index, None, None, np.array([osize], np.int64)], attrs, 1)
    return bool(np.array_equal(got, np.arange(osize) // f))


def _fused_node(resize: Node, conv: Node, factors: tuple, names: FreshNames):
    """The rtxjit.UpsampleConv node, or None where its inferred type is not the Conv's output type
    (the graph's types stay as they were: with a symbolic batch, Resize infers its spatial dims as
    unknown, and the Conv's output type with them)."""
    attrs = dict(conv.attrs, upsample=factors)
    inputs = [resize.inputs[0]] + list(conv.inputs[1:])
    inferred = get_op("rtxjit.UpsampleConv").infer([v.type if v is not None else None for v in inputs], attrs, 1)
    if inferred[0] != conv.outputs[0].type:
        return None
    return Node("rtxjit.UpsampleConv", names(conv.name + "_upsampled"), inputs, list(conv.outputs), attrs, 1)


def _fuse(graph: Graph, resize: Node, conv: Node, node: Node) -> None:
    graph.nodes[graph.nodes.index(conv)] = node
    for v in node.outputs:
        v.producer = node
    remove_nodes(graph, [resize])
