"""``rtxjit.QLinearMatMul``: a MatMul / Gemm between Q/DQ pairs as one quantized product, made by
rtxjit/quant/fuse.py (never found in a model).

    y = alpha * DequantizeLinear(a_q, a_scale, a_zero) @ DequantizeLinear(w_q, w_scale, w_zero) + bias
    out = QuantizeLinear(y, y_scale, y_zero, saturate)   (where the graph quantizes y; else out = y)

``a_q [..., M, K]`` is the quantized activation (int8 / uint8, or fp8), the rest are constants read
on the host at lowering: ``w_q [K, N]``, or ``[N, K]`` with ``w_nk=1`` (int8 / uint8, or fp8: the fp8
values or, as rtxjit/quant/fuse.py writes them, their uint8 bits, read as ``a_q``'s fp8 type; fuse.py
stores them ``[N, K]``: 8-bit tensor-core dots (Hopper's wgmma) read both operands K-major, and a
weight laid out so needs no transpose in shared memory), ``w_scale`` / ``w_zero`` one value
or one per column N, ``a_scale`` / ``a_zero`` / ``y_scale`` / ``y_zero`` one value each, ``bias``
``[N]`` (float). Float8 zero points are ignored, as in DequantizeLinear / QuantizeLinear.

Lowering (codegen/templates/quant_gemm.py ``render_qdot``): int8 operands multiply into an int32
accumulator (``w_q - w_zero`` made int8 here, the activation's zero point folded into a per-column
correction), fp8 operands into fp32, and the scales ``a_scale * w_scale[n] * alpha``, the bias and
the output's quantization run in the epilogue. The float64 reference is the unfused graph's meaning.
"""

from __future__ import annotations

import numpy as np

from rtxjit.codegen.templates.matmul import tile_configs, tile_count
from rtxjit.codegen.templates.quant_gemm import FP8, QuantConv, min_block_k, render_qdot
from rtxjit.codegen.view import View
from rtxjit.errors import ModelError, ShapeError, UnsupportedOpError
from rtxjit.ir.registry import Kind, Unknown, get_op, known, op
from rtxjit.ir.types import DType, TensorType
from rtxjit.ops.conv import channels_last_output, conv, conv_geometry, dense_weight, emit_conv
from rtxjit.ops.matmul import epilogue_args, take_epilogue
from rtxjit.ops.quant import FP8_NUMPY
from rtxjit.ir.symint import prod

INTS = (DType.INT8, DType.UINT8)
FP8_MIN_SM = 89


FROM_NUMPY_FP8 = {v: k for k, v in FP8_NUMPY.items()}  # ml_dtypes' fp8 types (DType.from_numpy lacks them)


def _dtype(x) -> DType:
    """The DType of a type or a host array (ml_dtypes fp8 included)."""
    if isinstance(x, TensorType):
        return x.dtype
    if isinstance(x, Unknown):
        return x.type.dtype
    dt = np.asarray(x).dtype
    return FROM_NUMPY_FP8.get(dt) or DType.from_numpy(dt)


def host_constants(ctx, args: list, first: int = 1) -> list:
    """``args`` (the node's inputs ``first, first + 1, ...``) with device views replaced by the
    graph constants they hold. A plain node gets its constants on the host (``host_inputs``); behind
    rtxjit.Epilogue (passes/fuse_epilogue.py; an op without host inputs) the same inputs arrive as
    device views, and the lowering reads them from the graph instead."""
    out = []
    for i, v in enumerate(args, start=first):
        if isinstance(v, View):
            const = ctx.node.inputs[i].const
            if const is None:
                raise UnsupportedOpError(f"{ctx.where}: input {i} ('{ctx.node.inputs[i].name}') must be a constant")
            v = const
        out.append(v)
    return out


def fp8_weight(w_q, a_dtype: DType):
    """``w_q`` as fp8 values where ``a_dtype`` is fp8 and ``w_q`` holds their uint8 bits."""
    w = np.asarray(w_q)
    if a_dtype in FP8 and w.dtype == np.uint8:
        return w.view(FP8_NUMPY[a_dtype])
    return w_q


def int8_weight(w_q: np.ndarray, w_zero) -> np.ndarray:
    """``w_q - w_zero`` as int8 (columns broadcast), or None where a value leaves int8's range."""
    w = np.asarray(w_q).astype(np.int32)
    if w_zero is not None:
        zero = np.asarray(w_zero).astype(np.int32).reshape(-1)
        w = w - (zero[None, :] if zero.size > 1 else zero[0])
    if w.min(initial=0) < -128 or w.max(initial=0) > 127:
        return None
    return w.astype(np.int8)


@op("rtxjit.QLinearMatMul", since=1, kind=Kind.MATMUL, host_inputs=(1, 2, 3, 4, 5, 6, 7, 8))
def qlinear_matmul(a_q: TensorType, a_scale, a_zero, w_q, w_scale, w_zero=None, bias=None, y_scale=None,
                   y_zero=None, *, alpha: float = 1.0, saturate: int = 1, w_nk: int = 0, out_dtype: int = 0,
                   quantize_a: int = 0, a_saturate: int = 1) -> TensorType:
    if quantize_a:
        if not a_q.dtype.is_float or DType.from_onnx(quantize_a) not in FP8 + INTS:
            raise ModelError(f"rtxjit.QLinearMatMul: quantize_a={quantize_a} takes a float activation to fp8, "
                             f"int8 or uint8, got {a_q.dtype.short}")
    elif a_q.dtype not in INTS + FP8:
        raise ModelError(f"rtxjit.QLinearMatMul: a quantized activation of {a_q.dtype.short}")
    k, n = _shape(w_q)[::-1] if w_nk else _shape(w_q)
    shape = a_q.shape[:-1] + (n,)
    if y_scale is None:
        return TensorType(_float_out(a_scale, out_dtype), shape)
    out = DType.UINT8 if y_zero is None else _dtype(y_zero)
    return TensorType(out, shape)


def _float_out(a_scale, out_dtype: int) -> DType:
    """The float output's type: ``out_dtype`` (an ONNX type code, set by convert_precision so an
    fp16 model's product writes fp16) or, 0, the activation scale's (DequantizeLinear's rule)."""
    return DType.from_onnx(out_dtype) if out_dtype else _dtype(a_scale)


@qlinear_matmul.reference
def _(a_q, a_scale, a_zero, w_q, w_scale, w_zero=None, bias=None, y_scale=None, y_zero=None, *, alpha=1.0,
      saturate=1, w_nk=0, out_dtype=0, quantize_a=0, a_saturate=1):
    dq = get_op("DequantizeLinear")
    if quantize_a:  # the activation's QuantizeLinear, taken into the product
        attrs = {"axis": 1, "saturate": a_saturate, "block_size": 0, "output_dtype": quantize_a}
        zero = a_zero if DType.from_onnx(quantize_a) in INTS else None
        a_q = get_op("QuantizeLinear").run_reference([a_q, a_scale, zero], attrs, 1)[0]
    w_q = fp8_weight(w_q, _dtype(a_q))
    w_q = np.asarray(w_q).T if w_nk else w_q
    a = np.asarray(dq.run_reference([a_q, a_scale, a_zero], {"axis": 1, "block_size": 0}, 1)[0], np.float64)
    w = np.asarray(dq.run_reference([w_q, w_scale, w_zero], {"axis": 1, "block_size": 0}, 1)[0], np.float64)
    y = alpha * (a @ w)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    if y_scale is None:
        out = _float_out(a_scale, out_dtype)
        return y.astype(np.float32 if out is DType.BF16 else out.to_numpy())  # bf16 held as float32 values
    y = y.astype(np.asarray(a_scale).dtype)
    attrs = {"axis": 1, "saturate": saturate, "block_size": 0, "output_dtype": 0}
    if y_zero is not None and _dtype(y_zero) in FP8:  # the fp8 zero point is ignored: its type alone counts
        attrs["output_dtype"], y_zero = _dtype(y_zero).onnx_code, None
    return get_op("QuantizeLinear").run_reference([y, y_scale, y_zero], attrs, 1)[0]


@qlinear_matmul.lower
def _(ctx, a_q, a_scale, a_zero, w_q, w_scale, w_zero=None, bias=None, y_scale=None, y_zero=None, *, alpha=1.0,
      saturate=1, w_nk=0, out_dtype=0, quantize_a=0, a_saturate=1):
    w_view = w_q if isinstance(w_q, View) else None  # the weight on the device already (behind rtxjit.Epilogue)
    a_scale, a_zero, w_q, w_scale, w_zero, bias, y_scale, y_zero = host_constants(
        ctx, [a_scale, a_zero, w_q, w_scale, w_zero, bias, y_scale, y_zero])
    for name, v in (("a_scale", a_scale), ("w_q", w_q), ("w_scale", w_scale)):
        if not known(v):
            raise UnsupportedOpError(f"{ctx.where}: {name} must be a constant")
    q_dtype = DType.from_onnx(quantize_a) if quantize_a else a_q.dtype  # the dot's activation type
    fp8 = q_dtype in FP8
    if fp8 and ctx.sm is not None and ctx.sm < FP8_MIN_SM:
        raise UnsupportedOpError(f"{ctx.where}: an fp8 x fp8 product needs sm_{FP8_MIN_SM} or newer; the target "
                                 f"is sm_{ctx.sm}")
    w_q = np.asarray(w_q).T if w_nk else w_q  # [K, N] for the host's sums; the device copy keeps the given layout
    k, n = np.shape(w_q)
    rows = prod(a_q.shape[:-1])
    out = ctx.outputs[0].reshape((rows, n))
    fused, extras = take_epilogue(ctx, out.dtype, (rows, n))
    if rows == 0:
        return
    a = ctx.contiguous(a_q).reshape((rows, k))
    w_dtype = q_dtype if fp8 else _dtype(w_q)
    if fp8:
        if not quantize_a:
            a = a.with_dtype(DType.UINT8)  # the bits: decoded or bitcast in the kernel
        w = np.asarray(w_q).view(np.uint8)
        corr = None
    else:
        w = int8_weight(w_q, w_zero)
        if w is None:
            raise UnsupportedOpError(f"{ctx.where}: the weight minus its zero point leaves int8's range")
        shift = 128 if q_dtype is DType.UINT8 else 0
        za = 0 if a_zero is None else int(np.asarray(a_zero).reshape(-1)[0])
        corr = (shift - za) * w.astype(np.int64).sum(axis=0)
        corr = corr.astype(np.int32) if corr.any() else None
    cs = (np.float32(np.asarray(a_scale, np.float32).reshape(-1)[0]) * np.asarray(w_scale, np.float32).reshape(-1)
          * np.float32(alpha))
    # behind rtxjit.Epilogue the weight is on the device already: used as is where it is what the
    # kernel reads (fuse.py writes it so: int8 less its zero point, fp8 bits)
    same = w_view is not None and w_view.contiguous and w_view.dtype in (DType.UINT8, DType.INT8) and (
        fp8 or (w.dtype == np.asarray(w_q).dtype and (w_zero is None or not np.any(w_zero))))
    w_dev = w_view.with_dtype(DType.UINT8 if fp8 else DType.INT8) if same else ctx.const(w.T if w_nk else w)
    views = [out, a, w_dev, ctx.const(np.broadcast_to(cs, (n,)).astype(np.float32))]
    if corr is not None:
        views.append(ctx.const(corr))
    if bias is not None:
        views.append(ctx.const(np.broadcast_to(np.asarray(bias, np.float32).reshape(-1), (n,)).copy())
                     .broadcast_to((rows, n)))
    src = render_qdot(q_dtype, w_dtype, out.dtype, corr is not None, bias is not None, ctx.interpret,
                      saturate=bool(saturate), wide=ctx.needs_wide(*views, *extras), fused=fused,
                      quantize_a=bool(a_saturate) if quantize_a else None)
    args = []
    for v in views:
        args += [ctx.ptr(v), v.offset]
    ys = 1.0 if y_scale is None else float(np.asarray(y_scale, np.float32).reshape(-1)[0])
    yz = 0.0 if y_zero is None or _dtype(y_zero) in FP8 else float(np.asarray(y_zero).astype(np.float64).reshape(-1)[0])
    b_sk, b_sn = (1, k) if w_nk else (n, 1)
    if quantize_a:  # the activation's QuantizeLinear parameters (its fp8 zero point is ignored)
        args += [_scalar(a_scale)] + ([] if fp8 else [_scalar(a_zero)])
    args += [ys, yz, rows, n, k, n, 1, k, 1, b_sk, b_sn]
    if bias is not None:
        args += list(views[-1].strides)
    args += epilogue_args(ctx, fused, extras, lambda e: e.strides)
    cfgs = tile_configs(rows, n, k, DType.FP16, ctx.interpret, sm=ctx.sm or 90, sm_count=ctx.sm_count)
    cfgs = [min_block_k(c, k, ctx.interpret) for c in cfgs]
    ctx.launch_tuned(src, [((tile_count(rows, n, c),), c) for c in cfgs], args, ctx.tune_key(src, rows, n, k))


# ---- rtxjit.QLinearConv ---------------------------------------------------------------------------

CONV_HOST = (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15)  # all but the activations x_q and res_q
STAGES = ("relu", "add", "add_relu")  # what one stage after the conv's QuantizeLinear does (DQ -> . -> Q)
MAX_STAGES = 2


def _shape(v) -> tuple:
    """The shape of a type (behind rtxjit.Epilogue the constants come as types), an Unknown or an array."""
    if isinstance(v, TensorType):
        return v.shape
    return v.type.shape if isinstance(v, Unknown) else np.shape(v)


def _scalar(v, default: float = 0.0) -> float:
    return default if v is None else float(np.asarray(v).astype(np.float64).reshape(-1)[0])


@op("rtxjit.QLinearConv", since=1, kind=Kind.CONV, host_inputs=CONV_HOST)
def qlinear_conv(x_q: TensorType, w_q, bias=None, x_scale=None, x_zero=None, w_scale=None, w_zero=None, y_scale=None,
                 y_zero=None, res_q: TensorType = None, res_scale=None, res_zero=None, s1_scale=None, s1_zero=None,
                 s2_scale=None, s2_zero=None, *, auto_pad: str = "NOTSET", dilations=None, group: int = 1,
                 kernel_shape=None, pads=None, strides=None, relu: int = 0, stages: tuple = ()) -> TensorType:
    """``Conv(DQ(x_q), DQ(w_q, axis 0), bias) [-> Relu] [-> Q(y_scale, y_zero)]`` and then up to two
    ``stages``, each ``DQ -> [Add(., DQ(res_q))] [-> Relu] -> Q(s{k}_scale, s{k}_zero)`` ("relu",
    "add", "add_relu"; one "add" at most), made by rtxjit/quant/fuse.py; Conv's attributes."""
    if x_q.dtype not in INTS or _dtype(w_q) not in INTS:
        raise ModelError(f"rtxjit.QLinearConv: int8 / uint8 operands are needed, got {x_q.dtype.short} and "
                         f"{_dtype(w_q).short}")
    stages = tuple(stages)
    if (len(stages) > MAX_STAGES or any(st not in STAGES for st in stages) or (stages and y_scale is None)
            or sum(st.startswith("add") for st in stages) != (res_q is not None)):
        raise ModelError(f"rtxjit.QLinearConv: stages {list(stages)} (up to {MAX_STAGES} of {list(STAGES)}, after the "
                         "conv's quantization; one add with a residual)")
    float_type = _dtype(x_scale)
    shape = conv.infer_fn(TensorType(float_type, x_q.shape), TensorType(float_type, _shape(w_q)), None,
                          auto_pad=auto_pad, dilations=dilations, group=group, kernel_shape=kernel_shape, pads=pads,
                          strides=strides).shape
    if res_q is not None and res_q.shape != shape:
        raise ShapeError(f"rtxjit.QLinearConv: a residual of {res_q} for an output of shape {list(shape)}")
    if y_scale is None:
        return TensorType(float_type, shape)
    zero = (y_zero, s1_zero, s2_zero)[len(stages)]
    return TensorType(DType.UINT8 if zero is None else _dtype(zero), shape)


@qlinear_conv.reference
def _(x_q, w_q, bias=None, x_scale=None, x_zero=None, w_scale=None, w_zero=None, y_scale=None, y_zero=None, res_q=None,
      res_scale=None, res_zero=None, s1_scale=None, s1_zero=None, s2_scale=None, s2_zero=None, *, relu=0, stages=(),
      **attrs):
    def dq(v, scale, zero, axis=1):
        return get_op("DequantizeLinear").run_reference([v, scale, zero], {"axis": axis, "block_size": 0}, 1)[0]

    def q(v, scale, zero):
        attrs_q = {"axis": 1, "saturate": 1, "block_size": 0, "output_dtype": 0}
        return get_op("QuantizeLinear").run_reference([v, scale, zero], attrs_q, 1)[0]

    x, w = dq(x_q, x_scale, x_zero), dq(w_q, w_scale, w_zero, axis=0)
    y = conv.reference_fn(np.asarray(x, np.float64), np.asarray(w, np.float64),
                          None if bias is None else np.asarray(bias, np.float64), **attrs)
    y = y.astype(np.asarray(x_scale).dtype)
    y = np.maximum(y, 0) if relu else y
    if y_scale is None:
        return y
    y = q(y, y_scale, y_zero)
    params = [(y_scale, y_zero), (s1_scale, s1_zero), (s2_scale, s2_zero)]
    for k, stage in enumerate(stages):
        v = dq(y, *params[k])
        v = v + dq(res_q, res_scale, res_zero) if stage.startswith("add") else v
        v = np.maximum(v, 0) if stage.endswith("relu") else v
        y = q(v, *params[k + 1])
    return y


@qlinear_conv.lower
def _(ctx, x_q, w_q, bias=None, x_scale=None, x_zero=None, w_scale=None, w_zero=None, y_scale=None, y_zero=None,
      res_q=None, res_scale=None, res_zero=None, s1_scale=None, s1_zero=None, s2_scale=None, s2_zero=None, *, group=1,
      relu=0, stages=(), **attrs):
    for name, v in (("w_q", w_q), ("x_scale", x_scale), ("w_scale", w_scale)):
        if not known(v):
            raise UnsupportedOpError(f"{ctx.where}: {name} must be a constant")
    geo = conv_geometry(x_q.shape[2:], np.shape(w_q)[2:], **attrs)
    c_out = np.shape(w_q)[0]
    w = int8_weight(np.asarray(w_q).reshape(c_out, -1).T, w_zero)
    if w is None:
        raise UnsupportedOpError(f"{ctx.where}: the weight minus its zero point leaves int8's range")
    w = np.ascontiguousarray(w.T).reshape(np.shape(w_q))
    za = int(_scalar(x_zero))
    cs = np.float32(_scalar(x_scale)) * np.broadcast_to(np.asarray(w_scale, np.float32).reshape(-1), (c_out,))
    corr = (128 * (x_q.dtype is DType.UINT8) - za) * w.reshape(c_out, -1).astype(np.int64).sum(axis=1)
    bias = None if bias is None else np.broadcast_to(np.asarray(bias, np.float32).reshape(-1), (c_out,))
    if bias is not None:  # a bias of whole multiples of cs (quantize_static's int32 bias) joins the integer sum
        steps = np.rint(bias.astype(np.float64) / cs)
        if np.abs(steps).max(initial=0) < 2 ** 24 and np.array_equal(steps.astype(np.float32) * cs, bias):
            corr, bias = corr + steps.astype(np.int64), None
    if np.abs(corr).max(initial=0) >= 2 ** 31:
        raise UnsupportedOpError(f"{ctx.where}: the zero-point correction leaves int32's range")
    stage_flags = tuple((st.startswith("add"), st.endswith("relu")) for st in stages)
    quant = QuantConv(x_q.dtype, ctx.outputs[0].dtype, bool(corr.any()), bool(relu), stage_flags,
                      None if res_q is None else res_q.dtype)
    args = []
    for v in [ctx.const(cs.astype(np.float32))] + ([ctx.const(corr.astype(np.int32))] if quant.has_corr else []):
        args += [ctx.ptr(v), v.offset]
    args += [za, _scalar(y_scale, 1.0), _scalar(y_zero)]
    if res_q is not None:
        args += [ctx.ptr(res_q), res_q.offset, *res_q.strides, _scalar(res_scale, 1.0), _scalar(res_zero)]
    for scale, zero in [(s1_scale, s1_zero), (s2_scale, s2_zero)][:len(stages)]:
        args += [_scalar(scale, 1.0), _scalar(zero)]
    out = channels_last_output(ctx)
    b = None if bias is None else ctx.const(np.ascontiguousarray(bias, np.float32))
    w_dense = dense_weight(ctx, w, k_major=True, sources=(w_q, w_zero))
    emit_conv(ctx, x_q, w_dense, b, out, geo, group, quant=quant, quant_args=tuple(args))
    if out is not ctx.outputs[0]:
        ctx.alias(0, out)
