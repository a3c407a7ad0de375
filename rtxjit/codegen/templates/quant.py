"""Statements of the quantize / dequantize kernels (ops/quant.py), spliced into the pointwise
template as its ``prologue``: the arithmetic of ONNX's QuantizeLinear and DequantizeLinear on one
element, with every rounding spelled out in integer arithmetic, so the interpreter and every GPU
compute the same bits.

Why not the conversions Triton has: under the interpreter, fp32 -> float8e4nv is wrong (1.0625 gives
1.125, 500 gives 256, inf gives 256) and fp8 -> fp32 decodes NaN and inf as numbers (480, 65536); on
a GPU the hardware conversion (``cvt.rn.satfinite``) always saturates, while ONNX's ``saturate=0``
makes out-of-range values NaN (e4m3fn) or inf (e5m2). So fp8 values are encoded and decoded from
their bit fields: round to nearest even on the mantissa bits, subnormals by an integer shift with
the same rounding, then the special codes.

Integer targets: ``saturate(rint(x / scale) + zero_point)``: the division correctly rounded in fp32
(``div_rn``: the scale's precision, as onnxruntime divides), rounding half to even before the zero
point is added (adding first could round a value just above .5 onto the tie), NaN to the range's
low end (onnxruntime's and onnx's reference's result).

Names made here start with ``q_`` (the template's own are ``idx``, ``mask``, ``rem``, ``i<d>``,
``x<k>``, ``y``).
"""

from __future__ import annotations

from dataclasses import dataclass

from rtxjit.codegen.dtypes import TL
from rtxjit.ir.types import DType

INT_RANGES = {DType.INT16: (-32768, 32767), DType.UINT16: (0, 65535), DType.INT8: (-128, 127), DType.UINT8: (0, 255),
              DType.INT4: (-8, 7), DType.UINT4: (0, 15), DType.INT2: (-2, 1), DType.UINT2: (0, 3)}


@dataclass(frozen=True)
class Fp8Format:
    mant: int  # mantissa bits
    bias: int  # exponent bias
    max_code: int  # the largest finite value's code (sign bit clear)
    overflow_code: int  # what a value beyond it becomes without saturation: NaN (e4m3fn) or inf (e5m2)
    nan_code: int
    max_value: float

    @property
    def exp_mask(self) -> int:
        return (0x7F >> self.mant)


FP8_FORMATS = {
    DType.FP8E4M3: Fp8Format(mant=3, bias=7, max_code=0x7E, overflow_code=0x7F, nan_code=0x7F, max_value=448.0),
    DType.FP8E5M2: Fp8Format(mant=2, bias=15, max_code=0x7B, overflow_code=0x7C, nan_code=0x7F, max_value=57344.0),
}


def rint(v: str) -> str:
    """Round half to even (onnx's np.rint) of an fp32 expression ``v`` (a name: it is repeated):
    floor, then up past .5, and at exactly .5 up only from an odd floor; values at or above 2**23
    are whole already (and inf stays inf)."""
    f, d = f"tl.floor({v})", f"({v} - tl.floor({v}))"
    odd = f"({f} - 2.0 * tl.floor({f} * 0.5))"
    return f"tl.where(tl.abs({v}) >= 8388608.0, {v}, tl.where({d} > 0.5, {f} + 1.0, tl.where({d} < 0.5, {f}, {f} + {odd})))"


def divide(x: str, scale: str) -> str:
    """``x / scale`` correctly rounded in fp32 (both fp32 expressions)."""
    return f"tl.math.div_rn({x}, {scale})"


def quantize_int(v: str, zero: str, dtype: DType, out: str) -> list:
    """Statements: ``out`` = saturate(rint(v) + zero) in fp32 (whole numbers in ``dtype``'s range);
    ``v`` the fp32 quotient, ``zero`` an fp32 expression or None."""
    lo, hi = INT_RANGES[dtype]
    shifted = f"{out}_r + {zero}" if zero else f"{out}_r"
    return [f"{out}_r = {rint(v)}",
            f"{out} = tl.where({v} != {v}, {float(lo)}, tl.minimum(tl.maximum({shifted}, {float(lo)}), {float(hi)}))"]


def quantize_int_expr(v: str, zero: str, dtype: DType) -> str:
    """``quantize_int`` as one expression (``v`` repeated; Triton's compiler shares the repeats),
    for the QuantizeLinear ``expr`` hook that fuses it into neighbouring pointwise kernels."""
    lo, hi = INT_RANGES[dtype]
    shifted = f"{rint(v)} + {zero}" if zero else rint(v)
    return f"tl.where({v} != {v}, {float(lo)}, tl.minimum(tl.maximum({shifted}, {float(lo)}), {float(hi)}))"


def encode_fp8(v: str, dtype: DType, saturate: bool, out: str) -> list:
    """Statements: ``out`` = the fp32 value ``v`` as fp8 ``dtype`` (an fp8-typed value), rounded to
    nearest even; beyond the largest finite value: that value where ``saturate`` (inf too), else
    the format's overflow code (NaN for e4m3fn, inf for e5m2); NaN stays NaN."""
    f = FP8_FORMATS[dtype]
    shift = 23 - f.mant
    lines = []
    if saturate:
        lines.append(f"{out}_v = tl.minimum(tl.maximum({v}, {-f.max_value}, propagate_nan=tl.PropagateNan.ALL), "
                     f"{f.max_value}, propagate_nan=tl.PropagateNan.ALL)")
        v = f"{out}_v"
    min_normal_bits = (128 - f.bias) << 23
    lines += [
        f"{out}_b = {v}.to(tl.int32, bitcast=True)",
        f"{out}_s = ({out}_b >> 24) & 0x80",
        f"{out}_a = {out}_b & 0x7FFFFFFF",
        # normal: drop the low mantissa bits rounding to nearest even, rebias the exponent
        f"{out}_n = (({out}_a + {(1 << (shift - 1)) - 1} + (({out}_a >> {shift}) & 1)) >> {shift}) "
        f"- {(127 - f.bias) << f.mant}",
        # subnormal: the mantissa with its implicit bit, shifted to units of the smallest subnormal
        f"{out}_sh = tl.minimum(tl.maximum({151 - f.bias - f.mant} - ({out}_a >> 23), 1), 31)",
        f"{out}_m = ({out}_a & 0x7FFFFF) | 0x800000",
        f"{out}_q = {out}_m >> {out}_sh",
        f"{out}_rm = {out}_m - ({out}_q << {out}_sh)",
        f"{out}_h = 1 << ({out}_sh - 1)",
        f"{out}_q = {out}_q + (({out}_rm > {out}_h) | (({out}_rm == {out}_h) & (({out}_q & 1) == 1))).to(tl.int32)",
        f"{out}_c = tl.where({out}_a > 0x7F800000, {f.nan_code}, tl.where({out}_a < {min_normal_bits}, {out}_q, "
        f"tl.where({out}_n > {f.max_code}, {f.max_code if saturate else f.overflow_code}, {out}_n)))",
        f"{out} = ({out}_c | {out}_s).to(tl.uint8).to({TL[dtype]}, bitcast=True)",
    ]
    return lines


def decode_fp8(x: str, dtype: DType, out: str) -> list:
    """Statements: ``out`` = the fp32 value of ``x``, an fp8 ``dtype`` value (or its uint8 bits)."""
    f = FP8_FORMATS[dtype]
    sub = 2.0 ** (1 - f.bias - f.mant)
    if dtype is DType.FP8E4M3:  # no inf; S.1111.111 is NaN
        special = f"tl.where(({out}_u & 0x7F) == 0x7F, float('nan'), {out}_g)"
    else:  # exponent all ones: inf (mantissa 0) or NaN
        special = (f"tl.where({out}_e == {f.exp_mask}, tl.where({out}_t == 0, float('inf'), float('nan')), "
                   f"{out}_g)")
    return [
        f"{out}_u = {x}.to(tl.uint8, bitcast=True).to(tl.int32)",
        f"{out}_e = ({out}_u >> {f.mant}) & {f.exp_mask}",
        f"{out}_t = {out}_u & {(1 << f.mant) - 1}",
        f"{out}_g = tl.where({out}_e == 0, {out}_t.to(tl.float32) * {sub}, "
        f"((({out}_e + {127 - f.bias}) << 23) | ({out}_t << {23 - f.mant})).to(tl.float32, bitcast=True))",
        f"{out}_g = {special}",
        f"{out} = tl.where(({out}_u & 0x80) != 0, -{out}_g, {out}_g)",
    ]
