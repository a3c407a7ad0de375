"""QuantizeLinear and DequantizeLinear: ``y = saturate(rint(x / scale) + zero_point)`` and
``y = (x - zero_point) * scale``, lowered onto the pointwise template with the statements of
``codegen/templates/quant.py`` (every rounding spelled out, so the interpreter and every GPU agree
with onnxruntime bit for bit on integer outputs).

Versions (the registry resolves a node to the newest declaration not above its version):
- 13: per-tensor or per-axis; int8 / uint8; fp32 scale (QuantizeLinear also takes int32 x).
- 19: fp8 (e4m3fn, e5m2) quantized types and ``saturate``; fp16 / bf16 scales; DequantizeLinear's
  output takes the scale's type.
- 21: block-wise quantization (``block_size``: one scale per ``block_size`` elements along
  ``axis``, the last block possibly shorter), int16 / uint16 and int4 / uint4, QuantizeLinear's
  ``output_dtype``.
  Later versions (23: ``precision``, DequantizeLinear's ``output_dtype``; 24: float8e8m0 scales;
  25: int2 / uint2, which rtxjit has) run this declaration; their new attributes are refused by
  name, float8e8m0 and float4e2m1 by the importer (rtxjit has no such DType).

Granularity comes from the scale's shape: one element is per-tensor (as onnx's reference, whatever
its rank), rank 1 per-axis (one scale per index of ``axis``), the input's rank block-wise. The zero
point has the scale's shape. A scale is read as a broadcast view (per-tensor, per-axis) or, for
blocks, by viewing the input's axis as ``[blocks, block_size]`` (one launch over the whole
blocks, one over a shorter last block): no scale is ever copied.

Float8 zero points: onnx's reference and onnxruntime ignore them (DequantizeLinear's reference
requires zero); so does rtxjit, in both ops. Types rtxjit has no DType for (float4e2m1, the fnuz
fp8 types) are refused at import. int2 / uint2 are held as int4 is (one value per byte) and
quantize with their own saturation range.

int16 / uint16 run the int8 kernels' arithmetic with their own saturation range: the fp32
quotient holds every integer of 16 bits exactly, so ``rint`` and the clamp are exact, and so is
DequantizeLinear's ``x - zero_point`` in fp32.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from rtxjit.codegen.dtypes import TL
from rtxjit.codegen.templates.quant import (FP8_FORMATS, INT_RANGES, decode_fp8, divide, encode_fp8, quantize_int,
                                            quantize_int_expr)
from rtxjit.codegen.view import View
from rtxjit.errors import InternalError, ModelError, ShapeError, UnsupportedOpError
from rtxjit.ir.registry import Kind, Rand, Sample, op
from rtxjit.ir.types import DType, TensorType
from rtxjit.ops.shape import norm_axis

FLOATS = (DType.FP32, DType.FP16, DType.BF16)
FP8 = tuple(FP8_FORMATS)
INT8S = (DType.INT8, DType.UINT8)
INT16S = (DType.INT16, DType.UINT16)
INT4S = (DType.INT4, DType.UINT4, DType.INT2, DType.UINT2)  # sub-byte, held one value per byte
FP8_NUMPY = {DType.FP8E4M3: np.dtype(ml_dtypes.float8_e4m3fn), DType.FP8E5M2: np.dtype(ml_dtypes.float8_e5m2)}


# ---- shapes of scales and zero points ----------------------------------------------------------

def granularity(name: str, x: TensorType, scale: TensorType, axis: int, block_size: int) -> tuple:
    """``(kind, axis)``: "tensor", "axis" or "block", and the axis normalized (None per tensor)."""
    if _one(scale):
        return "tensor", None
    if not -x.rank <= axis < x.rank:
        raise ModelError(f"{name}: axis={axis} is out of range for an input of rank {x.rank}")
    axis = norm_axis(axis, x.rank, f"{name} axis")
    if block_size:
        if block_size < 0:
            raise ModelError(f"{name}: block_size={block_size} (a positive number is needed)")
        if scale.rank != x.rank:
            raise ShapeError(f"{name}: block-wise scale of shape {list(scale.shape)} for an input of shape "
                             f"{list(x.shape)} (the ranks must be equal)")
        for d, (xd, sd) in enumerate(zip(x.shape, scale.shape)):
            want = -(-xd // block_size) if d == axis and isinstance(xd, int) else xd
            if isinstance(want, int) and isinstance(sd, int) and sd != want:
                raise ShapeError(f"{name}: block-wise scale of shape {list(scale.shape)} for an input of shape "
                                 f"{list(x.shape)}, axis={axis}, block_size={block_size}: dim {d} must be {want}")
        return "block", axis
    if scale.rank != 1:
        raise ShapeError(f"{name}: scale of shape {list(scale.shape)}: one value, one per index of axis {axis} "
                         "(rank 1) or, with block_size, the input's rank is needed")
    c, sd = x.shape[axis], scale.shape[0]
    if isinstance(c, int) and isinstance(sd, int) and c != sd:
        raise ShapeError(f"{name}: per-axis scale of {sd} values for axis {axis} of size {c}")
    return "axis", axis


def _check_params(name: str, x: TensorType, scale: TensorType, zero: TensorType, axis: int, block_size: int,
                  scale_types: tuple) -> tuple:
    if scale.dtype not in scale_types:
        raise ModelError(f"{name}: scale of {scale.dtype.short} (expected one of {[d.short for d in scale_types]})")
    if zero is not None and zero.shape != scale.shape and not (_one(zero) and _one(scale)):
        raise ShapeError(f"{name}: zero point of shape {list(zero.shape)} for a scale of shape {list(scale.shape)} "
                         "(they must be equal)")
    return granularity(name, x, scale, axis, block_size)


def _one(t: TensorType) -> bool:
    """One element (a scalar, or any rank of ones): per-tensor, as onnx's reference reads it."""
    return t.rank == 0 or (t.static and int(np.prod(t.shape)) == 1)


def _scale_shape(x_shape: tuple, kind: str, axis) -> tuple:
    """The shape a per-tensor / per-axis parameter is seen as, to broadcast against ``x``."""
    if kind == "tensor":
        return ()
    shape = [1] * len(x_shape)
    shape[axis] = x_shape[axis]
    return tuple(shape)


def _reference_param(p: np.ndarray, x_shape: tuple, kind: str, axis, block_size: int) -> np.ndarray:
    if kind == "tensor":
        return p.reshape(())
    if kind == "axis":
        return p.reshape(_scale_shape(x_shape, kind, axis))
    return np.repeat(p, block_size, axis=axis).take(range(x_shape[axis]), axis=axis)


def _pieces(x: View, out: View, params: list, kind: str, axis, block_size: int) -> list:
    """``[(x view, out view, [parameter views])]``: launches that together cover ``x``, each with
    its parameters as views that broadcast against it."""
    if kind != "block":
        shape = _scale_shape(x.shape, kind, axis)
        return [(x, out, [p.reshape(shape) for p in params])]
    length = x.shape[axis]
    blocks = length // block_size
    full = blocks * block_size
    pieces = []

    def split(v: View, n: int, b: int) -> View:
        shape = list(v.shape)
        shape[axis:axis + 1] = [n, b]
        return v.reshape(shape)

    if full:
        pieces.append((split(x.slice(axis, 0, full), blocks, block_size),
                       split(out.slice(axis, 0, full), blocks, block_size),
                       [split(p.slice(axis, 0, blocks), blocks, 1) for p in params]))
    if length > full:  # the shorter last block
        pieces.append((x.slice(axis, full, length - full), out.slice(axis, full, length - full),
                       [p.slice(axis, blocks, 1) for p in params]))
    return pieces


def _launch(ctx, x: View, params: list, kind: str, axis, block_size: int, prologue: list, expr: str) -> None:
    out = ctx.outputs[0]
    if out.numel == 0:
        return
    for xv, ov, pvs in _pieces(x, out, params, kind, axis, block_size):
        ctx.pointwise(expr, [xv, *pvs], ov, prologue=tuple(prologue))


# ---- the pointwise form (fused with neighbouring pointwise ops) --------------------------------

NARROW = (DType.FP16, DType.BF16)


def pointwise_form(node) -> bool:
    """Whether a QuantizeLinear / DequantizeLinear graph node may run as its ``expr`` hook, inside
    a fused pointwise kernel (passes/fuse_pointwise.py asks): a constant per-tensor scale (and zero
    point) that broadcasts against the input, and an int8 / uint8 / int16 / uint16 side (int32 too
    for DequantizeLinear). fp8 and int4 keep their own kernels: their encodings take statements, and a
    per-axis or block-wise parameter does not broadcast numpy-style."""
    x = node.inputs[0]
    params = [v for v in node.inputs[1:3] if v is not None]
    if any(p.const is None or p.const.size != 1 or p.type.rank > min(1, x.type.rank) for p in params):
        return False
    if node.op == "QuantizeLinear":
        return node.outputs[0].type.dtype in INT8S + INT16S
    return x.type.dtype in INT8S + INT16S + (DType.INT32,)


def _quantize_expr(in_dtypes, out_dtype, attrs):
    """The kernel's arithmetic as one expression. Its input is first rounded to its own type
    (fp16 / bf16): in a fused chain it arrives in fp32, and the integers must be those of the
    unfused graph, which quantizes the stored value."""
    if out_dtype not in INT8S + INT16S:
        raise InternalError(f"QuantizeLinear to {out_dtype.short} has no pointwise form (see pointwise_form)")
    x = f"x0.to({TL[in_dtypes[0]]})" if in_dtypes[0] in NARROW else "x0"
    v = divide(f"{x}.to(tl.float32)", "x1.to(tl.float32)")
    zero = "x2.to(tl.float32)" if len(in_dtypes) > 2 and in_dtypes[2] is not None else None
    return quantize_int_expr(v, zero, out_dtype), ()


def _dequantize_expr(in_dtypes, out_dtype, attrs):
    """The kernel's arithmetic as one expression, rounded to the output type (fp16 / bf16) as the
    unfused kernel's store rounds it, so a QuantizeLinear later in the chain sees the same value."""
    if in_dtypes[0] not in INT8S + INT16S + (DType.INT32,):
        raise InternalError(f"DequantizeLinear of {in_dtypes[0].short} has no pointwise form (see pointwise_form)")
    zero = len(in_dtypes) > 2 and in_dtypes[2] is not None
    expr = "(x0.to(tl.float32) - x2.to(tl.float32)) * x1" if zero else "x0.to(tl.float32) * x1"
    return (f"({expr}).to({TL[out_dtype]})" if out_dtype in NARROW else expr), ()


# ---- QuantizeLinear ----------------------------------------------------------------------------

def _quantize_type(name: str, allowed: tuple, x: TensorType, scale: TensorType, zero: TensorType, axis: int,
                   block_size: int = 0, output_dtype: int = 0) -> TensorType:
    if x.dtype not in FLOATS + (DType.INT32,):
        raise ModelError(f"{name}: input of {x.dtype.short} (a float type or int32 is needed)")
    _check_params(name, x, scale, zero, axis, block_size, FLOATS)
    out = DType.UINT8
    if output_dtype:
        try:
            out = DType.from_onnx(output_dtype)
        except KeyError:
            raise UnsupportedOpError(f"{name}: output_dtype={output_dtype} is not a type rtxjit has") from None
    if zero is not None:
        if output_dtype and zero.dtype is not out:
            raise ModelError(f"{name}: output_dtype={output_dtype} ({out.short}) differs from the zero point's "
                             f"type {zero.dtype.short}")
        out = zero.dtype
    if out not in allowed:
        raise UnsupportedOpError(f"{name}: quantizing to {out.short} is not supported here (this version "
                                 f"quantizes to {[d.short for d in allowed]})")
    return x.with_dtype(out)


def _quantize_reference(x, scale, zero=None, *, axis=1, saturate=1, block_size=0, output_dtype=0):
    """In fp32 as the kernel and onnxruntime: x / scale correctly rounded in fp32, then rint."""
    kind, ax = granularity("QuantizeLinear", TensorType(DType.FP32, x.shape), TensorType(DType.FP32, scale.shape),
                           axis, block_size)
    out = DType.from_onnx(output_dtype) if output_dtype else DType.UINT8
    if zero is not None:
        out = DType.from_numpy(zero.dtype)
    v = np.asarray(x, np.float32) / _reference_param(np.asarray(scale, np.float32), x.shape, kind, ax, block_size)
    if out in FP8:
        f = FP8_FORMATS[out]
        if saturate:
            v = np.clip(v, -f.max_value, f.max_value)  # NaN stays NaN
        return v.astype(FP8_NUMPY[out])
    lo, hi = INT_RANGES[out]
    q = np.rint(v)
    if zero is not None:
        q = q + _reference_param(zero.astype(np.float32), x.shape, kind, ax, block_size)
    q = np.where(np.isnan(q), lo, np.clip(q, lo, hi))
    return q.astype(out.to_numpy())


def _quantize_lower(ctx, x, scale, zero=None, *, axis=1, saturate=1, block_size=0, output_dtype=0):
    out = ctx.outputs[0].dtype
    kind, ax = granularity(ctx.where, TensorType(x.dtype, x.shape), TensorType(scale.dtype, scale.shape), axis,
                           block_size)
    prologue = [f"q_v = {divide('x0.to(tl.float32)', 'x1.to(tl.float32)')}"]
    params = [scale]
    if out in FP8:
        prologue += encode_fp8("q_v", out, bool(saturate), "q_y")  # the fp8 zero point is ignored (see above)
    else:
        if zero is not None:
            params.append(zero)
        prologue += quantize_int("q_v", "x2.to(tl.float32)" if zero is not None else None, out, "q_y")
    _launch(ctx, x, params, kind, ax, block_size, prologue, "q_y")


def _q_samples(opset: int, float_types=("fp32", "fp16")) -> list:
    return [Sample([Rand((2, 3, 4)), np.float32(0.02), np.uint8(128)], opset=opset, float_types=float_types),
            Sample([Rand((2, 3, 4)), np.float32(0.01), np.int8(-3)], opset=opset, float_types=float_types),
            Sample([Rand((2, 3, 4)), np.array([0.01, 0.02, 0.05], np.float32), np.array([0, 4, -9], np.int8)],
                   {"axis": 1}, opset=opset, float_types=float_types),
            Sample([Rand((3, 5)), np.array([0.02, 0.05, 0.1], np.float32)], {"axis": 0}, opset=opset,
                   float_types=float_types)]


@op("QuantizeLinear", since=13, kind=Kind.POINTWISE, samples=_q_samples(13, ("fp32",)))
def quantize_linear_13(x: TensorType, scale: TensorType, zero: TensorType = None, *, axis: int = 1) -> TensorType:
    """Fuses only with a constant per-tensor scale and an int8 / uint8 / int16 / uint16 output (see
    pointwise_form)."""
    if scale.dtype is not DType.FP32 or x.dtype not in (DType.FP32, DType.INT32):
        raise ModelError(f"QuantizeLinear-13 takes fp32 or int32 x and an fp32 scale, got {x.dtype.short} and "
                         f"{scale.dtype.short}")
    return _quantize_type("QuantizeLinear-13", INT8S, x, scale, zero, axis)


quantize_linear_13.reference(_quantize_reference)
quantize_linear_13.expr(_quantize_expr)
quantize_linear_13.lower(_quantize_lower)  # after expr: the op's own kernels where the pointwise form does not fit


@op("QuantizeLinear", since=19, kind=Kind.POINTWISE, samples=_q_samples(19))
def quantize_linear_19(x: TensorType, scale: TensorType, zero: TensorType = None, *, axis: int = 1,
                       saturate: int = 1) -> TensorType:
    """Fuses only with a constant per-tensor scale and an int8 / uint8 / int16 / uint16 output (see
    pointwise_form)."""
    return _quantize_type("QuantizeLinear-19", INT8S + FP8, x, scale, zero, axis)


quantize_linear_19.reference(_quantize_reference)
quantize_linear_19.expr(_quantize_expr)
quantize_linear_19.lower(_quantize_lower)  # after expr: the op's own kernels where the pointwise form does not fit


@op("QuantizeLinear", since=21, kind=Kind.POINTWISE,
    samples=_q_samples(21) + [
        # blocks of 2 along axis 1, and blocks of 2 over 5 (a last block of 1)
        Sample([Rand((2, 6)), np.array([[0.01, 0.02, 0.03], [0.04, 0.05, 0.06]], np.float32),
                np.array([[0, 1, 2], [3, 4, 5]], np.uint8)], {"axis": 1, "block_size": 2}),
        Sample([Rand((5, 3)), np.array([[0.01, 0.02, 0.03], [0.04, 0.05, 0.06], [0.02, 0.02, 0.02]], np.float32),
                np.array([[0, 1, -2], [3, -4, 5], [1, 1, 1]], np.int8)], {"axis": 0, "block_size": 2}),
        Sample([Rand((2, 3)), np.float32(0.05)], {"output_dtype": 3}),
        # int16 / uint16: saturation at both ends (|x| / scale up to 35000), negative zero points
        Sample([Rand((2, 3, 4), None, -700, 700), np.float32(0.02), np.int16(-1200)]),
        Sample([Rand((2, 3, 4), None, -30, 700), np.array([0.01, 0.02, 0.05], np.float32),
                np.array([0, 30000, 65000], np.uint16)], {"axis": 1}),
        Sample([Rand((5, 3), None, -700, 700), np.array([[0.01, 0.02, 0.03], [0.04, 0.05, 0.06], [0.02, 0.02, 0.02]],
                                                       np.float32),
                np.array([[0, 1, -2000], [3, -4, 5], [1, 1, 1]], np.int16)], {"axis": 0, "block_size": 2}),
        Sample([Rand((2, 3), None, -50, 3000), np.float32(0.05)], {"output_dtype": 4})])
def quantize_linear_21(x: TensorType, scale: TensorType, zero: TensorType = None, *, axis: int = 1,
                       saturate: int = 1, block_size: int = 0, output_dtype: int = 0) -> TensorType:
    """Fuses only with a constant per-tensor scale and an int8 / uint8 / int16 / uint16 output (see
    pointwise_form)."""
    return _quantize_type("QuantizeLinear", INT8S + INT16S + INT4S + FP8, x, scale, zero, axis, block_size,
                          output_dtype)


quantize_linear_21.reference(_quantize_reference)
quantize_linear_21.expr(_quantize_expr)
quantize_linear_21.lower(_quantize_lower)  # after expr: the op's own kernels where the pointwise form does not fit


# ---- DequantizeLinear --------------------------------------------------------------------------

def _dequantize_type(name: str, allowed: tuple, x: TensorType, scale: TensorType, zero: TensorType, axis: int,
                     block_size: int = 0, scale_types: tuple = FLOATS) -> TensorType:
    if x.dtype not in allowed:
        raise UnsupportedOpError(f"{name}: dequantizing {x.dtype.short} is not supported here (this version "
                                 f"dequantizes {[d.short for d in allowed]})")
    if zero is not None and zero.dtype is not x.dtype:
        raise ModelError(f"{name}: zero point of {zero.dtype.short} for an input of {x.dtype.short}")
    _check_params(name, x, scale, zero, axis, block_size, scale_types)
    return x.with_dtype(scale.dtype)


def _dequantize_reference(x, scale, zero=None, *, axis=1, block_size=0):
    kind, ax = granularity("DequantizeLinear", TensorType(DType.FP32, x.shape), TensorType(DType.FP32, scale.shape),
                           axis, block_size)
    dx = np.asarray(x).astype(np.float64)
    fp8 = np.asarray(x).dtype.kind == "V" and np.asarray(x).dtype.name.startswith("float8")
    if zero is not None and not fp8:
        dx = dx - _reference_param(np.asarray(zero).astype(np.float64), x.shape, kind, ax, block_size)
    y = dx * _reference_param(np.asarray(scale, np.float64), x.shape, kind, ax, block_size)
    return y.astype(np.asarray(scale).dtype)


def _dequantize_lower(ctx, x, scale, zero=None, *, axis=1, block_size=0):
    kind, ax = granularity(ctx.where, TensorType(x.dtype, x.shape), TensorType(scale.dtype, scale.shape), axis,
                           block_size)
    params = [scale]
    if x.dtype in FP8:
        # the bits are decoded (see codegen/templates/quant.py): loaded as they are, not converted
        prologue = decode_fp8("x0", x.dtype, "q_x")
        _launch(ctx, x.with_dtype(DType.UINT8), params, kind, ax, block_size, prologue, "q_x * x1")
        return
    expr = "x0.to(tl.float32) * x1"
    if zero is not None:
        params.append(zero)
        expr = "(x0.to(tl.float32) - x2.to(tl.float32)) * x1"
    _launch(ctx, x, params, kind, ax, block_size, [], expr)


def _dq_samples(opset: int, float_types=("fp32", "fp16")) -> list:
    return [Sample([Rand((2, 3, 4), "uint8", 0, 255), np.float32(0.02), np.uint8(128)], opset=opset,
                   float_types=float_types),
            Sample([Rand((2, 3, 4), "int8", -128, 127), np.array([0.01, 0.02, 0.05], np.float32),
                    np.array([0, 4, -9], np.int8)], {"axis": 1}, opset=opset, float_types=float_types),
            Sample([Rand((3, 5), "int8", -128, 127), np.array([0.02, 0.05, 0.1], np.float32)], {"axis": 0},
                   opset=opset, float_types=float_types),
            Sample([Rand((4, 3), "int32", -1000, 1000), np.float32(0.003)], opset=opset, float_types=float_types)]


@op("DequantizeLinear", since=13, kind=Kind.POINTWISE, samples=_dq_samples(13, ("fp32",)))
def dequantize_linear_13(x: TensorType, scale: TensorType, zero: TensorType = None, *, axis: int = 1) -> TensorType:
    """Fuses only with a constant per-tensor scale and an int8 / uint8 / int16 / uint16 / int32 input (see
    pointwise_form)."""
    return _dequantize_type("DequantizeLinear-13", INT8S + (DType.INT32,), x, scale, zero, axis,
                            scale_types=(DType.FP32,))


dequantize_linear_13.reference(_dequantize_reference)
dequantize_linear_13.expr(_dequantize_expr)
dequantize_linear_13.lower(_dequantize_lower)  # after expr (see QuantizeLinear)


@op("DequantizeLinear", since=19, kind=Kind.POINTWISE, samples=_dq_samples(19))
def dequantize_linear_19(x: TensorType, scale: TensorType, zero: TensorType = None, *, axis: int = 1) -> TensorType:
    """Fuses only with a constant per-tensor scale and an int8 / uint8 / int16 / uint16 / int32 input (see
    pointwise_form)."""
    return _dequantize_type("DequantizeLinear-19", INT8S + (DType.INT32,) + FP8, x, scale, zero, axis)


dequantize_linear_19.reference(_dequantize_reference)
dequantize_linear_19.expr(_dequantize_expr)
dequantize_linear_19.lower(_dequantize_lower)  # after expr (see QuantizeLinear)


@op("DequantizeLinear", since=21, kind=Kind.POINTWISE,
    samples=_dq_samples(21) + [
        Sample([Rand((2, 6), "uint8", 0, 255), np.array([[0.01, 0.02, 0.03], [0.04, 0.05, 0.06]], np.float32),
                np.array([[0, 1, 2], [3, 4, 5]], np.uint8)], {"axis": 1, "block_size": 2}),
        Sample([Rand((5, 3), "int8", -128, 127),
                np.array([[0.01, 0.02, 0.03], [0.04, 0.05, 0.06], [0.02, 0.02, 0.02]], np.float32)],
               {"axis": 0, "block_size": 2}),
        Sample([Rand((2, 3, 4), "int16", -32768, 32767), np.float32(0.001), np.int16(-5)]),
        Sample([Rand((2, 3, 4), "uint16", 0, 65535), np.array([0.001, 0.0005, 0.002], np.float32),
                np.array([0, 40000, 65535], np.uint16)], {"axis": 1}),
        Sample([Rand((2, 6), "int16", -32768, 32767), np.array([[0.01, 0.02, 0.03], [0.04, 0.05, 0.06]], np.float32),
                np.array([[0, -1, 2], [-300, 4, 5]], np.int16)], {"axis": 1, "block_size": 2})])
def dequantize_linear_21(x: TensorType, scale: TensorType, zero: TensorType = None, *, axis: int = 1,
                         block_size: int = 0) -> TensorType:
    """Fuses only with a constant per-tensor scale and an int8 / uint8 / int16 / uint16 / int32 input (see
    pointwise_form)."""
    return _dequantize_type("DequantizeLinear", INT8S + INT16S + INT4S + (DType.INT32,) + FP8, x, scale, zero,
                            axis, block_size)


dequantize_linear_21.reference(_dequantize_reference)
dequantize_linear_21.expr(_dequantize_expr)
dequantize_linear_21.lower(_dequantize_lower)  # after expr (see QuantizeLinear)
