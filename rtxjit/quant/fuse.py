"""Fold Q/DQ pairs into quantized products (issue 19). Runs before fold_constants, which would
otherwise fold each DequantizeLinear of a constant weight into an fp32 constant (correct, but 4x
or 8x the weight's bytes, and an fp32 product).

Rewrites:
    MatMul(a, DQ(w: int4/uint4 [K, N] const, block-wise along K | per column | per tensor))
    MatMul(a, DQ(w: int8/uint8 [K, N] const, block-wise along K))
        => com.microsoft.MatMulNBits(a, packed(w^T), scales^T, zero points^T)      (weight-only)
    MatMul|Gemm(DQ(a_q: int8/uint8), DQ(w: int8 const, per tensor | per column)) [-> Q(y)]
    MatMul|Gemm(DQ(a_q: fp8), DQ(w: fp8 const, per tensor | per column)) [-> Q(y)]
        => rtxjit.QLinearMatMul(a_q, ..., y_scale, y_zero)       (int8 / fp8 tensor-core dot)
    with a_q = Q(x: float) read by such products alone: QLinearMatMul(x, ..., quantize_a=a_q's type)
        (the product quantizes x as it loads it; the QuantizeLinear kernel and its 8-bit tensor go)

Weight-only: the weight is repacked here (numpy, once) into MatMulNBits' layout: transposed to
``[N, K]``, signed values offset by ``2 ** (bits - 1)`` (and their zero points with them, so
``q - zero`` is unchanged), K padded to whole blocks, two 4-bit values per byte. A per-column or
per-tensor scale becomes one block covering K (a power of two >= 16, as MatMulNBits requires). Block
sizes that are no power of two >= 16 stay as they are (fold_constants then folds them).

Quantized operands: the activation DQ's scale and zero point must be constants of one value, the
weight's per tensor or per output column (MatMul ``[K, N]`` axis 1, Gemm with ``transB`` axis 0),
stored ``[N, K]`` (``w_nk=1``: K-major, as 8-bit tensor-core dots read it) as the kernel reads it
(int8 less its zero point, or fp8 as its uint8 bits);
the Gemm's C (a constant, or a DQ of constants: evaluated here) becomes the bias, ``alpha`` a
factor of the scales, ``transA`` is not folded. Where the product's only reader is a
QuantizeLinear of constant per-tensor parameters, the quantization moves into the kernel and the
node produces the quantized value. int8: the weight less its zero point must fit int8 and K must
keep the int32 sum exact (K < 65536); fp8: both operands of one fp8 type (the legality check
refuses fp8 below sm_89, naming the node that makes the fp8 values).

Convolutions (what onnxruntime.quantization.quantize_static writes for a CNN):
    Conv(DQ(x_q: int8/uint8), DQ(w: int8 const, per tensor | per output channel), bias) [-> Relu]
        [-> Q [-> DQ -> [Add(., DQ(res_q))] [-> Relu] -> Q] (up to two such stages)]
        => rtxjit.QLinearConv (int8 implicit GEMM; conv template's ``quant`` option)
The bias is a constant or a DQ of an int32 constant (evaluated here); a Relu is taken only with the
QuantizeLinear after it; a stage's DQ must have its QuantizeLinear's parameters, its residual be a
DQ of the output's shape, its Q of the same type (a residual Add: 2-D and 3-D convs only). The conv's
K (channels per group x taps) must exceed 16: the int8 dot needs ``BLOCK_K >= 32`` on a GPU (a
3-channel 3x3 stem stays as it was: DQ folded into an fp32 weight). The new node takes the place of
the last node it replaces, since the residual may be computed after the Conv.
"""

from __future__ import annotations

import numpy as np

from rtxjit.ir.graph import Graph, Node, Value
from rtxjit.ir.registry import get_op
from rtxjit.ir.rewrite import FreshNames, is_graph_output, make_constant, remove_nodes
from rtxjit.ir.types import DType
from rtxjit.passes.base import PassResult
from rtxjit.quant.qlinear import INTS, MAX_STAGES, int8_weight

FP8 = (DType.FP8E4M3, DType.FP8E5M2)
NIBBLES = (DType.INT4, DType.UINT4)
MAX_K_INT8 = 65536  # K * 128 * 255 stays below 2**31 (the int32 accumulator plus the zero-point correction)
MIN_K_CONV = 16  # an int8 conv's dot needs BLOCK_K >= 32 on a GPU: its K (channels per tap) must pass 16


def fuse_quantized(graph: Graph) -> PassResult:
    names = FreshNames(graph)
    changed = False
    for node in list(graph.nodes):
        if node.op == "MatMul" and _weight_only(graph, node, names):
            changed = True
        elif node.op in ("MatMul", "Gemm") and _quantized_operands(graph, node, names):
            changed = True
        elif node.op == "Conv" and _quantized_conv(graph, node, names):
            changed = True
    if changed:
        _drop_dead_dequantizes(graph)
    return PassResult(graph, changed)


# ---- helpers ------------------------------------------------------------------------------------

def _dq(value):
    """``(node, x, scale, zero, axis, block_size)`` where ``value`` is a DequantizeLinear's output,
    else None. ``x`` is the quantized input Value; scale and zero are Values (zero may be None)."""
    node = value.producer if value is not None else None
    if node is None or node.op != "DequantizeLinear":
        return None
    x, scale = node.inputs[0], node.inputs[1]
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    return node, x, scale, zero, node.attrs.get("axis", 1), node.attrs.get("block_size", 0)


def _const(v) -> np.ndarray:
    return None if v is None else v.const


def _one(a: np.ndarray) -> bool:
    return a is not None and a.size == 1


def _replace(graph: Graph, old: Node, op: str, inputs: list, attrs: dict, names: FreshNames, version: int,
             outputs: list = None) -> Node:
    """A node of ``op`` in ``old``'s place, producing ``old``'s outputs (or ``outputs``)."""
    opdef = get_op(op)
    node = Node(op, names(old.name + "_quantized"), inputs, outputs or list(old.outputs),
                opdef.bind_attrs(attrs, op), version)
    for v in node.outputs:
        v.producer = node
    graph.nodes[graph.nodes.index(old)] = node
    return node


def _drop_dead_dequantizes(graph: Graph) -> None:
    """DequantizeLinear nodes nobody reads any more (the weights' ones), so fold_constants does not
    fold them into fp32 constants for nothing."""
    while True:
        uses = graph.consumers()
        dead = [n for n in graph.nodes if n.op in ("DequantizeLinear", "QuantizeLinear")
                and all(v is None or (not uses.get(v.name) and not is_graph_output(graph, v)) for v in n.outputs)]
        if not dead:
            return
        remove_nodes(graph, dead)


# ---- weight-only ----------------------------------------------------------------------------------

def _weight_only(graph: Graph, node: Node, names: FreshNames) -> bool:
    a, w = node.inputs
    dq = _dq(w)
    if dq is None or a.type.rank < 2 or w.type.rank != 2 or _dq(a) is not None:
        return False
    _, wq, scale, zero, axis, block = dq
    q, s, z = _const(wq), _const(scale), _const(zero)
    if q is None or s is None or (zero is not None and z is None) or s.dtype != a.type.dtype.to_numpy():
        return False
    dtype = wq.type.dtype
    k, n = q.shape
    if dtype in NIBBLES:
        bits = 4
    elif dtype in INTS and block:
        bits = 8
    else:
        return False
    axis = axis % 2
    if block and s.ndim == 2 and axis == 0:
        scales, zeros = s.T, None if z is None else z.T  # [N, k_blocks]
    elif not block and (_one(s) or (s.ndim == 1 and axis == 1)):
        block = max(16, 1 << (k - 1).bit_length())  # one block covering K
        scales = np.broadcast_to(s.reshape(-1), (n,)).reshape(n, 1)
        zeros = None if z is None else np.broadcast_to(z.reshape(-1), (n,)).reshape(n, 1)
    else:
        return False
    if block < 16 or block & (block - 1):
        return False
    offset = 1 << (bits - 1) if dtype in (DType.INT4, DType.INT8) else 0
    qu = q.astype(np.int32).T + offset  # [N, K], unsigned
    zu = np.full(scales.shape, offset, np.int32) if zeros is None else zeros.astype(np.int32) + offset
    k_blocks = -(-k // block)
    packed = _pack(np.pad(qu, ((0, 0), (0, k_blocks * block - k))), bits).reshape(n, k_blocks, block * bits // 8)
    inputs = [a, make_constant(names, wq.name + "_packed", packed),
              make_constant(names, scale.name + "_nbits", np.ascontiguousarray(scales))]
    if not (zu == 1 << (bits - 1)).all():  # else MatMulNBits' default zero point
        inputs.append(make_constant(names, wq.name + "_zero_packed", _pack(zu, bits)))
    _replace(graph, node, "com.microsoft.MatMulNBits", inputs,
             {"K": k, "N": n, "bits": bits, "block_size": block}, names, 1)
    return True


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """``[rows, cols]`` unsigned values as bytes, two 4-bit values per byte (low nibble first)."""
    values = values.astype(np.uint8)
    if bits == 8:
        return values
    if values.shape[1] % 2:
        values = np.pad(values, ((0, 0), (0, 1)))
    return (values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8)


# ---- quantized operands ---------------------------------------------------------------------------

def _quantized_operands(graph: Graph, node: Node, names: FreshNames) -> bool:
    a, w = node.inputs[0], node.inputs[1]
    attrs = node.attrs
    if node.op == "Gemm" and attrs.get("transA", 0):
        return False
    if a.type.rank < 2 or w.type.rank != 2:
        return False
    da, dw = _dq(a), _dq(w)
    if da is None or dw is None or da[5] or dw[5]:
        return False
    _, aq, sa, za = da[:4]
    _, wq, sw, zw, w_axis, _ = dw
    sa_, za_, q, sw_, zw_ = _const(sa), _const(za), _const(wq), _const(sw), _const(zw)
    if (not _one(sa_) or (za is not None and not _one(za_)) or q is None or sw_ is None
            or (zw is not None and zw_ is None)):
        return False
    trans_b = node.op == "Gemm" and attrs.get("transB", 0)
    n_axis = 0 if trans_b else 1
    if not _one(sw_) and not (sw_.ndim == 1 and w_axis % 2 == n_axis):
        return False
    q = q.T if trans_b else q
    a_dtype, w_dtype = aq.type.dtype, wq.type.dtype
    if a_dtype in FP8:
        if w_dtype is not a_dtype:
            return False
    elif a_dtype in INTS:
        if w_dtype not in INTS or q.shape[0] >= MAX_K_INT8 or int8_weight(q, zw_) is None:
            return False
    else:
        return False
    bias = None
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        c = _evaluate(node.inputs[2])
        if c is None or c.size not in (1, q.shape[1]) or (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2:
            return False
        bias = np.broadcast_to(c.reshape(-1) * attrs.get("beta", 1.0), (q.shape[1],)).astype(np.float32)
    # the weight as the kernel reads it, so the node's constant is also its device copy (behind
    # rtxjit.Epilogue every input is uploaded): fp8 as its bits, int8 less its zero point
    if a_dtype in FP8:
        wq = make_constant(names, wq.name + "_bits", np.ascontiguousarray(q.T).view(np.uint8))
    else:
        wq, zw = make_constant(names, wq.name + "_int8", np.ascontiguousarray(int8_weight(q, zw_).T)), None
    on_load = _quantized_on_load(graph, aq, da[0])
    inputs = [aq if on_load is None else on_load.inputs[0], sa, za, wq, sw, zw,
              None if bias is None else make_constant(names, node.name + "_bias", bias)]
    outputs, q_node = None, _only_quantize_reader(graph, node.outputs[0])
    if q_node is not None:
        inputs += [q_node.inputs[1], q_node.inputs[2] if len(q_node.inputs) > 2 else None]
        outputs = list(q_node.outputs)
    qattrs = {"alpha": float(attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0,
              "saturate": int(q_node.attrs.get("saturate", 1)) if q_node is not None else 1, "w_nk": 1}
    if on_load is not None:  # the activation's QuantizeLinear runs as the product loads it
        qattrs.update(quantize_a=a_dtype.onnx_code, a_saturate=int(on_load.attrs.get("saturate", 1)))
    _replace(graph, node, "rtxjit.QLinearMatMul", inputs, qattrs, names, 1, outputs)
    if q_node is not None:
        remove_nodes(graph, [q_node])
    return True


def _quantized_on_load(graph: Graph, aq: Value, dq: Node):
    """The QuantizeLinear making the 8-bit activation ``aq`` of a product (read through ``dq``), where
    the product may quantize the float activation as it loads it instead: a per-tensor constant
    scale equal to ``dq``'s (the Q/DQ pair: int8 zero points too, fp8 ones are ignored), a float
    input, and ``aq`` read by DequantizeLinear nodes alone, each read by MatMul / Gemm nodes alone
    (then the QuantizeLinear dies once they are all quantized products, one kernel and an 8-bit
    round trip fewer each: 48 of the fp8 bert-base encoder's 182 launches). None otherwise."""
    q = aq.producer
    if q is None or q.op != "QuantizeLinear" or is_graph_output(graph, aq) or not q.inputs[0].type.dtype.is_float:
        return None
    qs, ds = _const(q.inputs[1]), _const(dq.inputs[1])  # fp8 zero points are ignored: the scales alone pair
    if (not _one(qs) or ds is None or qs.dtype != ds.dtype or not np.array_equal(qs, ds)
            or q.attrs.get("block_size", 0) or q.attrs.get("output_dtype", 0)):
        return None
    if aq.type.dtype in INTS and not _same_params(q, dq):  # int8: the zero points pair too
        return None
    uses = graph.consumers()
    for reader, _ in uses.get(aq.name, []):
        if reader.op != "DequantizeLinear" or is_graph_output(graph, reader.outputs[0]):
            return None
        if any(r.op not in ("MatMul", "Gemm") for r, _ in uses.get(reader.outputs[0].name, [])):
            return None
    return q


def _evaluate(value):
    """A constant, or the value of a DequantizeLinear of constants (a Gemm's quantized bias)."""
    if value.is_const:
        return value.const.astype(np.float64)
    d = _dq(value)
    if d is None or any(v is not None and not v.is_const for v in d[0].inputs):
        return None
    opdef = get_op("DequantizeLinear", f"node {d[0].name!r}", d[0].version)
    arrays = [None if v is None else v.const for v in d[0].inputs]
    return np.asarray(opdef.run_reference(arrays, dict(d[0].attrs), 1)[0], np.float64)


def _only_quantize_reader(graph: Graph, value: Value):
    """The QuantizeLinear that alone reads ``value``, with constant per-tensor parameters and no
    ``output_dtype`` to carry, or None."""
    if is_graph_output(graph, value):
        return None
    readers = graph.consumers().get(value.name, [])
    if len(readers) != 1 or readers[0][0].op != "QuantizeLinear" or readers[0][1] != 0:
        return None
    q = readers[0][0]
    scale = q.inputs[1]
    zero = q.inputs[2] if len(q.inputs) > 2 else None
    if not _one(_const(scale)) or (zero is not None and not _one(_const(zero))) or q.attrs.get("output_dtype", 0):
        return None
    if q.outputs[0].type.dtype not in INTS + FP8:
        return None
    return q


# ---- quantized convolutions -----------------------------------------------------------------------

def _quantized_conv(graph: Graph, node: Node, names: FreshNames) -> bool:
    """Conv(DQ(x_q), DQ(w_q), bias) [-> Relu] [-> Q] [-> DQ -> Add(., DQ(res_q)) [-> Relu] -> Q]
    => rtxjit.QLinearConv (rtxjit/quant/qlinear.py), placed where the last node it replaces was (the
    residual may be computed after the Conv)."""
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    dx, dw = _dq(x), _dq(w)
    if x.type.rank not in (3, 4, 5) or dx is None or dw is None or dx[5] or dw[5]:
        return False
    _, xq, sx, zx = dx[:4]
    _, wq, sw, zw, w_axis, _ = dw
    q, sw_, zw_ = _const(wq), _const(sw), _const(zw)
    if (xq.type.dtype not in INTS or wq.type.dtype not in INTS or not _one(_const(sx))
            or (zx is not None and not _one(_const(zx))) or q is None or sw_ is None or (zw is not None and zw_ is None)):
        return False
    c_out, k = q.shape[0], q[0].size  # K of the implicit GEMM: input channels per group x taps
    if not _one(sw_) and not (sw_.ndim == 1 and sw_.size == c_out and w_axis % q.ndim == 0):
        return False
    if zw_ is not None and zw_.size not in (1, c_out):
        return False
    if not MIN_K_CONV < k < MAX_K_INT8 or int8_weight(q.reshape(c_out, -1).T, zw_) is None:
        return False
    bias = None
    if b is not None:
        c = _evaluate(b)
        if c is None or c.size != c_out:
            return False
        bias = make_constant(names, node.name + "_bias", c.reshape(-1).astype(np.float32))
    chain, relu, q_node = _conv_output(graph, node.outputs[0])
    inputs = [xq, wq, bias, sx, zx, sw, zw]
    attrs = dict(node.attrs, relu=relu)
    if q_node is not None:
        inputs += [q_node.inputs[1], q_node.inputs[2] if len(q_node.inputs) > 2 else None]
        stages, params, res_dq = [], [], None
        while len(stages) < MAX_STAGES:
            stage = _stage(graph, chain[-1], res_dq is None and x.type.rank > 3)
            if stage is None:
                break
            nodes, kind, res, next_q = stage
            chain += nodes
            stages.append(kind)
            res_dq = res or res_dq
            params += [next_q.inputs[1], next_q.inputs[2] if len(next_q.inputs) > 2 else None]
        res = [None] * 3 if res_dq is None else [res_dq.inputs[0], res_dq.inputs[1],
                                                   res_dq.inputs[2] if len(res_dq.inputs) > 2 else None]
        inputs += res + params
        attrs["stages"] = tuple(stages)
    last = chain[-1] if chain else node
    opdef = get_op("rtxjit.QLinearConv")
    new = Node("rtxjit.QLinearConv", names(node.name + "_quantized"), inputs, list(last.outputs),
               opdef.bind_attrs(attrs, "rtxjit.QLinearConv"), 1)
    for v in new.outputs:
        v.producer = new
    graph.nodes[graph.nodes.index(last)] = new
    remove_nodes(graph, [node] + chain[:-1])
    return True


def _single_reader(graph: Graph, value: Value, op: str):
    """The one node of type ``op`` that alone reads ``value`` (not a graph output), or None."""
    if value is None or is_graph_output(graph, value):
        return None
    readers = graph.consumers().get(value.name, [])
    return readers[0][0] if len(readers) == 1 and readers[0][0].op == op else None


def _conv_output(graph: Graph, y: Value) -> tuple:
    """``(nodes after the Conv that the quantized conv takes over, relu, the QuantizeLinear or
    None)``: a Relu is taken only with the int8 / uint8 QuantizeLinear after it."""
    relu_node = _single_reader(graph, y, "Relu")
    if relu_node is not None:
        q_node = _only_quantize_reader(graph, relu_node.outputs[0])
        if q_node is not None and q_node.outputs[0].type.dtype in INTS:
            return [relu_node, q_node], 1, q_node
    q_node = _only_quantize_reader(graph, y)
    if q_node is not None and q_node.outputs[0].type.dtype in INTS:
        return [q_node], 0, q_node
    return [], 0, None


def _same_params(a: Node, b: Node) -> bool:
    """Two Q / DQ nodes with equal constant scale and zero point (the pair around a tensor)."""
    pa = [_const(v) for v in a.inputs[1:3]] + [None] * (3 - len(a.inputs))
    pb = [_const(v) for v in b.inputs[1:3]] + [None] * (3 - len(b.inputs))
    return all((u is None and v is None) or (u is not None and v is not None and u.dtype == v.dtype
                                             and np.array_equal(u, v)) for u, v in zip(pa, pb))


def _stage(graph: Graph, q_node: Node, residual: bool):
    """After a QuantizeLinear: DQ (its parameters) -> [Add(., DQ(res_q)) (``residual`` allowed)]
    [-> Relu] -> Q of the same type, each read only by the next, the residual of the output's shape
    with constant per-tensor parameters: ``(nodes, "relu" | "add" | "add_relu", the residual's DQ or
    None, the last Q)``, or None."""
    dq = _single_reader(graph, q_node.outputs[0], "DequantizeLinear")
    if dq is None or not _same_params(q_node, dq) or dq.attrs.get("block_size", 0):
        return None
    nodes, res, value = [dq], None, dq.outputs[0]
    add = _single_reader(graph, value, "Add") if residual else None
    if add is not None and add.inputs[0] is not add.inputs[1]:
        other = add.inputs[1] if add.inputs[0] is value else add.inputs[0]
        d = _dq(other)
        if (d is not None and not d[5] and d[1].type.dtype in INTS and d[1].type.static
                and d[1].type.shape == add.outputs[0].type.shape == value.type.shape
                and _one(_const(d[2])) and (d[3] is None or _one(_const(d[3])))):
            nodes, res, value = nodes + [add], d[0], add.outputs[0]
    more, relu, next_q = _conv_output(graph, value)
    if next_q is None or next_q.outputs[0].type.dtype is not q_node.outputs[0].type.dtype or (res is None and not relu):
        return None
    return nodes + more, ("add" if res is not None else "") + ("_relu" if res is not None and relu else "") + (
        "relu" if res is None else ""), res, next_q
