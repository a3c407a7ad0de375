"""Convert an fp32 model to fp16 or bf16: the explicit precision option (``precision="fp16"``).

The IR is strongly typed: no other pass changes a value's precision; this one does, and only when
the user asks for it. After it, every fp32 value inside the graph is ``dtype``:

    fp32 input x           => x, then Cast(x, to=dtype) read by every node that read x
    fp32 output y = op(..) => y' = op(..) in dtype, then y = Cast(y', to=fp32)
    fp32 constant c        => c rounded to dtype (bf16: round to nearest even, held as float32
                              values, as the importer holds bf16 data); fp16 clamps finite values
                              to +-65504, so a -1e9 mask stays a large finite number
    Cast(x, to=fp32)       => Cast(x, to=dtype)
    rtxjit.QLinearMatMul   => out_dtype=dtype: its float output (no requantization) in dtype (its
                              scales are host inputs and stay fp32, which would keep it fp32)
    ConstantOfShape(value=fp32 v) => ConstantOfShape(value=fp16 v)      (fp16 only)
    op(..) still giving fp32 after re-inference (a bf16 ConstantOfShape, a Range of fp32 host
        scalars) => Cast(op(..), to=dtype)

Users keep feeding and getting fp32 (as TensorRT's strongly typed mode with explicit casts). The
output types of every node are re-inferred, in order, from the op's type inference. Integer, bool,
fp64 and already-fp16/bf16 values stay as they are; so do fp32 constants read only as host inputs
(shape tensors, Range bounds, a Dropout ratio): they are host data, not kernel data.

What stays fp32 is what the kernels already compute in fp32 for fp16/bf16 tensors: matmul and conv
accumulation, reductions, Softmax, LayerNormalization statistics and pointwise arithmetic all load
fp16/bf16, compute in fp32 and round once when storing. ``passes.optimize(precision=...)`` runs
this after canonicalization (so BatchNorm folds into Conv in fp32, then rounds once) and before
fusion (fused regions are built from the converted ops).
"""

from __future__ import annotations

from typing import Union

import numpy as np

from rtxjit.errors import RtxjitError
from rtxjit.ir.graph import Graph, Node, Value
from rtxjit.ir.registry import get_op
from rtxjit.ir.rewrite import FreshNames, infer_args, make_constant, make_node
from rtxjit.ir.types import DType
from rtxjit.passes.base import PassResult

TARGETS = {"fp16": DType.FP16, "float16": DType.FP16, "bf16": DType.BF16, "bfloat16": DType.BF16}
FP16_MAX = float(np.finfo(np.float16).max)


def precision_dtype(precision: Union[str, DType]) -> DType:
    """The DType that a ``precision`` option names: "fp16" or "bf16" (or that DType)."""
    if isinstance(precision, DType) and precision in (DType.FP16, DType.BF16):
        return precision
    if isinstance(precision, str) and precision.strip().lower() in TARGETS:
        return TARGETS[precision.strip().lower()]
    raise RtxjitError(f"precision {precision!r} is not supported: use 'fp16' or 'bf16' (or None to keep "
                      "the model's types)")


def convert_precision(graph: Graph, dtype: Union[str, DType]) -> PassResult:
    """Every fp32 value inside ``graph`` becomes ``dtype`` (fp16 or bf16); inputs and outputs keep fp32."""
    dtype = precision_dtype(dtype)
    names = FreshNames(graph)
    boundary: set = set()  # ids of the Cast nodes that keep the graph's inputs and outputs fp32
    nodes = _cast_inputs(graph, dtype, names, boundary) + _split_outputs(graph, names, boundary)  # in order
    constants: dict = {}  # id of an fp32 constant -> its converted copy
    modified = bool(boundary)
    for node in nodes:
        if id(node) in boundary:
            continue
        modified |= _convert_constants(node, dtype, names, constants)
        modified |= _convert_attrs(node, dtype)
    out = []
    for node in nodes:
        out.append(node)
        out.extend(_reinfer(node, dtype, names, boundary))
    modified |= len(out) > len(nodes)
    graph.nodes = out
    return PassResult(graph, modified)


def _cast_inputs(graph: Graph, dtype: DType, names: FreshNames, boundary: set) -> list:
    """A Cast to ``dtype`` after each fp32 graph input that a node reads; those nodes read the Cast.
    Returns the Casts (they go first)."""
    casts = []
    for x in graph.inputs:
        if x.type.dtype is not DType.FP32 or not any(v is x for n in graph.nodes for v in n.inputs):
            continue
        cast = make_node(names, "Cast", [x], {"to": dtype.onnx_code}, base=f"{x.name}_{dtype.short}")
        for node in graph.nodes:
            node.inputs = [cast.outputs[0] if v is x else v for v in node.inputs]
        boundary.add(id(cast))
        casts.append(cast)
    return casts


def _split_outputs(graph: Graph, names: FreshNames, boundary: set) -> list:
    """Each fp32 graph output computed by a node is computed into a new value, then Cast to fp32
    into the output's own ``Value`` (its name and type do not change). Returns the new node list."""
    after: dict = {}  # id of a node -> the Casts that follow it
    done: set = set()
    for y in graph.outputs:
        node = y.producer
        if y.type.dtype is not DType.FP32 or node is None or id(y) in done:
            continue
        done.add(id(y))
        inner = Value(names(f"{y.name}_inner"), y.type, producer=node)
        node.outputs = [inner if v is y else v for v in node.outputs]
        for reader in graph.nodes:
            reader.inputs = [inner if v is y else v for v in reader.inputs]
        cast = Node("Cast", names(f"{y.name}_fp32_node"), [inner], [y],
                    get_op("Cast").bind_attrs({"to": DType.FP32.onnx_code}, "new Cast node"), get_op("Cast").since)
        y.producer = cast
        boundary.add(id(cast))
        after.setdefault(id(node), []).append(cast)
    out = []
    for node in graph.nodes:
        out.append(node)
        out.extend(after.get(id(node), []))
    return out


def _convert_constants(node: Node, dtype: DType, names: FreshNames, constants: dict) -> bool:
    """The node's fp32 constant inputs (not host inputs) become ``dtype`` constants (one copy each)."""
    host = get_op(node.op, f"node '{node.name}'", node.version).host_inputs
    changed = False
    for i, v in enumerate(node.inputs):
        if v is None or not v.is_const or v.type.dtype is not DType.FP32 or i in host:
            continue
        if id(v) not in constants:
            c = make_constant(names, f"{v.name}_{dtype.short}", _round(v.const, dtype))
            c.type = c.type.with_dtype(dtype)  # bf16 is held as float32 values
            constants[id(v)] = c
        node.inputs[i] = constants[id(v)]
        changed = True
    return changed


def _convert_attrs(node: Node, dtype: DType) -> bool:
    """Attributes that name fp32: Cast's ``to``; ConstantOfShape's ``value`` (fp16: numpy has no bf16,
    so a bf16 ConstantOfShape stays fp32 and gets a Cast after it). Also Quantize/DequantizeLinear
    below version 19 become version 19, which takes fp16 / bf16 values and scales with the same
    meaning (version 13 takes fp32 alone: a QDQ model run with ``precision`` failed to load)."""
    if node.op in ("QuantizeLinear", "DequantizeLinear") and 13 <= node.version < 19:
        node.version = 19
        return True
    if node.op == "Cast" and node.attrs.get("to") == DType.FP32.onnx_code:
        node.attrs["to"] = dtype.onnx_code
        return True
    if node.op == "rtxjit.QLinearMatMul" and not node.attrs.get("out_dtype"):
        node.attrs["out_dtype"] = dtype.onnx_code
        return True
    if node.op == "ConstantOfShape" and dtype is DType.FP16:
        value = node.attrs.get("value")
        value = np.zeros(1, np.float32) if value is None else np.asarray(value)
        if value.dtype == np.float32:
            node.attrs["value"] = _round(value, dtype)
            return True
    return False


def _reinfer(node: Node, dtype: DType, names: FreshNames, boundary: set) -> list:
    """Set the node's output types from its op's inference. An output that was fp32 and still is
    (the op fixes fp32) is computed into a new value and Cast to ``dtype``; returns those Casts."""
    opdef = get_op(node.op, f"node '{node.name}'", node.version)
    types = opdef.infer(infer_args(opdef, node.inputs), node.attrs, len(node.outputs))
    casts = []
    for k, (v, t) in enumerate(zip(node.outputs, types)):
        if v is None:
            continue
        if v.type.dtype is DType.FP32 and t.dtype is DType.FP32 and id(node) not in boundary:
            inner = Value(names(f"{v.name}_fp32"), t, producer=node)
            node.outputs[k] = inner
            cast = make_node(names, "Cast", [inner], {"to": dtype.onnx_code}, base=f"{v.name}_{dtype.short}")
            cast.outputs[0], v.producer = v, cast
            t = t.with_dtype(dtype)
            casts.append(cast)
        v.type = t
    return casts


def _round(a: np.ndarray, dtype: DType) -> np.ndarray:
    """``a`` rounded to ``dtype``: an fp16 array, or bf16 values (round to nearest even) as float32."""
    a = np.asarray(a, np.float32)
    if dtype is DType.FP16:
        finite = np.isfinite(a)
        return np.where(finite, np.clip(a, -FP16_MAX, FP16_MAX), a).astype(np.float16)
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    rounded = np.where(np.isnan(a), (bits.astype(np.uint32) & 0x80000000) | 0x7FC00000, rounded)
    return np.ascontiguousarray(rounded.astype(np.uint32).view(np.float32))
