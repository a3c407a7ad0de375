"""``rtxjit.QLinearMatMul``: a MatMul / Gemm between Q/DQ pairs as one quantized product, made by
rtxjit/quant/fuse.py (never found in a model).

    y = alpha * DequantizeLinear(a_q, a_scale, a_zero) @ DequantizeLinear(w_q, w_scale, w_zero) + bias
    out = QuantizeLinear(y, y_scale, y_zero, saturate)   (where the graph quantizes y; else out = y)

``a_q [..., M, K]`` is the quantized activation (int8 / uint8, or fp8), the rest are constants read
on the host at lowering: ``w_q [K, N]`` (int8 / uint8, or fp8), ``w_scale`` / ``w_zero`` one value
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
from rtxjit.codegen.templates.quant_gemm import FP8, min_block_k, render_qdot
from rtxjit.errors import ModelError, UnsupportedOpError
from rtxjit.ir.registry import Kind, Unknown, get_op, known, op
from rtxjit.ir.types import DType, TensorType
from rtxjit.ops.quant import FP8_NUMPY

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
                   y_zero=None, *, alpha: float = 1.0, saturate: int = 1) -> TensorType:
    if a_q.dtype not in INTS + FP8:
        raise ModelError(f"rtxjit.QLinearMatMul: a quantized activation of {a_q.dtype.short}")
    k, n = w_q.type.shape if isinstance(w_q, Unknown) else np.shape(w_q)
    shape = a_q.shape[:-1] + (n,)
    if y_scale is None:
        return TensorType(_dtype(a_scale), shape)
    out = DType.UINT8 if y_zero is None else _dtype(y_zero)
    return TensorType(out, shape)


@qlinear_matmul.reference
def _(a_q, a_scale, a_zero, w_q, w_scale, w_zero=None, bias=None, y_scale=None, y_zero=None, *, alpha=1.0,
      saturate=1):
    dq = get_op("DequantizeLinear")
    a = np.asarray(dq.run_reference([a_q, a_scale, a_zero], {"axis": 1, "block_size": 0}, 1)[0], np.float64)
    w = np.asarray(dq.run_reference([w_q, w_scale, w_zero], {"axis": 1, "block_size": 0}, 1)[0], np.float64)
    y = alpha * (a @ w)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    y = y.astype(np.asarray(a_scale).dtype)
    if y_scale is None:
        return y
    attrs = {"axis": 1, "saturate": saturate, "block_size": 0, "output_dtype": 0}
    if y_zero is not None and _dtype(y_zero) in FP8:  # the fp8 zero point is ignored: its type alone counts
        attrs["output_dtype"], y_zero = _dtype(y_zero).onnx_code, None
    return get_op("QuantizeLinear").run_reference([y, y_scale, y_zero], attrs, 1)[0]


@qlinear_matmul.lower
def _(ctx, a_q, a_scale, a_zero, w_q, w_scale, w_zero=None, bias=None, y_scale=None, y_zero=None, *, alpha=1.0,
      saturate=1):
    for name, v in (("a_scale", a_scale), ("w_q", w_q), ("w_scale", w_scale)):
        if not known(v):
            raise UnsupportedOpError(f"{ctx.where}: {name} must be a constant")
    fp8 = a_q.dtype in FP8
    if fp8 and ctx.sm is not None and ctx.sm < FP8_MIN_SM:
        raise UnsupportedOpError(f"{ctx.where}: an fp8 x fp8 product needs sm_{FP8_MIN_SM} or newer; the target "
                                 f"is sm_{ctx.sm}")
    k, n = np.shape(w_q)
    rows = int(np.prod(a_q.shape[:-1], dtype=np.int64))
    out = ctx.outputs[0].reshape((rows, n))
    if rows == 0:
        return
    a = ctx.contiguous(a_q).reshape((rows, k))
    w_dtype = _dtype(w_q)
    if fp8:
        a = a.with_dtype(DType.UINT8)  # the bits: decoded or bitcast in the kernel
        w = np.ascontiguousarray(np.asarray(w_q)).view(np.uint8)
        corr = None
    else:
        w = int8_weight(w_q, w_zero)
        if w is None:
            raise UnsupportedOpError(f"{ctx.where}: the weight minus its zero point leaves int8's range")
        shift = 128 if a_q.dtype is DType.UINT8 else 0
        za = 0 if a_zero is None else int(np.asarray(a_zero).reshape(-1)[0])
        corr = (shift - za) * w.astype(np.int64).sum(axis=0)
        corr = corr.astype(np.int32) if corr.any() else None
    cs = (np.float32(np.asarray(a_scale, np.float32).reshape(-1)[0]) * np.asarray(w_scale, np.float32).reshape(-1)
          * np.float32(alpha))
    views = [out, a, ctx.const(w), ctx.const(np.broadcast_to(cs, (n,)).astype(np.float32))]
    if corr is not None:
        views.append(ctx.const(corr))
    if bias is not None:
        views.append(ctx.const(np.broadcast_to(np.asarray(bias, np.float32).reshape(-1), (n,)).copy())
                     .broadcast_to((rows, n)))
    src = render_qdot(a_q.dtype, w_dtype, out.dtype, corr is not None, bias is not None, ctx.interpret,
                      saturate=bool(saturate), wide=ctx.needs_wide(*views))
    args = []
    for v in views:
        args += [ctx.ptr(v), v.offset]
    ys = 1.0 if y_scale is None else float(np.asarray(y_scale, np.float32).reshape(-1)[0])
    yz = 0.0 if y_zero is None or _dtype(y_zero) in FP8 else float(np.asarray(y_zero).astype(np.float64).reshape(-1)[0])
    args += [ys, yz, rows, n, k, n, 1, k, 1, n, 1]
    if bias is not None:
        args += list(views[-1].strides)
    cfgs = tile_configs(rows, n, k, DType.FP16, ctx.interpret, sm=ctx.sm or 90, sm_count=ctx.sm_count)
    cfgs = [min_block_k(c, k, ctx.interpret) for c in cfgs]
    ctx.launch_tuned(src, [((tile_count(rows, n, c),), c) for c in cfgs], args, ctx.tune_key(src, rows, n, k))
