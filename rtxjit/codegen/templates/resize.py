"""Resize (ONNX Resize: nearest, linear, cubic): one program computes ``BLOCK`` output elements.

The dims are of two kinds, a string ``kinds`` with one letter per dim (the lowering merges runs of
pass-through dims first):

- ``p`` (pass-through): the output index is the input index (``ist{d}`` its input stride);
- ``r`` (resized): the source coordinate is ``x = (o * mul + add) / div + off`` in fp32, the
  affine form every ONNX coordinate_transformation_mode takes once its constants are known
  (ops/resize.py computes them per axis at lowering). The division is correctly rounded
  (``div_rn``), so a coordinate that lands on a tie of ``nearest`` rounds as onnxruntime's does.

Nearest reads one element (rounded as ``nearest_mode`` says, clamped into the input) and stores it
in its own type: no arithmetic on the values. Linear and cubic read ``taps`` elements per resized
axis around ``x`` (``i = ceil(x) - 1``, ``r = x - i`` in (0, 1], taps ``i + start + k``, clamped
into the input: onnx's edge padding) and sum them weighted by the product of the per-axis
weights ``kernel(|start + k - r| * fs)`` (a triangle, or Keys' cubic with ``a``), in fp32 (fp64
for fp64 and 32/64-bit integers). Where ``exclude_outside`` zeroes the weights of taps outside
the input, or antialiasing stretches the filter (``fs = scale < 1``, a tap count and start
per axis given at run time), the sum is divided by the sum of the weights (0 where that is 0, as
onnx's reference). tf_crop_and_resize writes ``ext`` where any resized axis's ``x`` is outside
``[0, isize - 1]``.
"""

from __future__ import annotations

from rtxjit.codegen.dtypes import TL
from rtxjit.codegen.source import KernelSource, render
from rtxjit.errors import InternalError
from rtxjit.ir.types import DType

NEAREST_ROUNDING = {
    "round_prefer_floor": "tl.ceil({x} - 0.5)",
    "round_prefer_ceil": "tl.floor({x} + 0.5)",
    "floor": "tl.floor({x})",
    "ceil": "tl.ceil({x})",
}
TAPS = {"linear": (2, 0), "cubic": (4, -1)}  # (taps, start) per axis without antialiasing
INT_RANGE = {DType.INT8: (-128, 127), DType.UINT8: (0, 255), DType.INT16: (-2**15, 2**15 - 1),
             DType.UINT16: (0, 2**16 - 1), DType.INT32: (-2**31, 2**31 - 1), DType.INT64: (-2**63, 2**63 - 1),
             DType.UINT32: (0, 2**32 - 1), DType.UINT64: (0, 2**64 - 1)}


def acc_dtype(dtype: DType) -> DType:
    """The type the weighted sum runs in."""
    if dtype in (DType.FP64, DType.INT32, DType.INT64):
        return DType.FP64
    return DType.FP32


def _params(kinds: str, mode: str, antialias: bool, extrapolate: bool) -> list:
    p = ["x_ptr", "x_off", "y_ptr", "y_off", "n"]
    for d, k in enumerate(kinds):
        p.append(f"osize{d}")
        if k == "p":
            p.append(f"ist{d}")
        else:
            p += [f"isize{d}", f"ist{d}", f"mul{d}", f"add{d}", f"div{d}", f"off{d}"]
            if antialias:
                p += [f"nt{d}", f"start{d}", f"fs{d}"]
    if mode == "cubic":
        p.append("a")
    if extrapolate:
        p.append("ext")
    return p + ["BLOCK: tl.constexpr"]


def _kernel(mode: str, d: str) -> str:
    """The filter's weight at distance ``d`` (>= 0)."""
    if mode == "linear":
        return f"tl.maximum(1.0 - {d}, 0.0)"
    return (f"tl.where({d} <= 1.0, ((a + 2.0) * {d} - (a + 3.0)) * {d} * {d} + 1.0, "
            f"tl.where({d} < 2.0, ((a * {d} - 5.0 * a) * {d} + 8.0 * a) * {d} - 4.0 * a, 0.0))")


def _round_half_even(v: str) -> list:
    return [f"    f = tl.floor({v})",
            f"    fr = {v} - f",
            "    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0",
            f"    {v} = tl.where((fr > 0.5) | ((fr == 0.5) & odd), f + 1.0, f)"]


def render_resize(mode: str, kinds: str, in_dtype: DType, out_dtype: DType, nearest_mode: str = "round_prefer_floor",
                  exclude_outside: bool = False, antialias: bool = False, extrapolate: bool = False,
                  wide: bool = False) -> KernelSource:
    """``mode`` nearest, linear or cubic over dims of ``kinds`` (see the module docstring).
    ``out_dtype`` differs from ``in_dtype`` only for an intermediate of a resize split over
    several launches (the accumulator type)."""
    if mode not in ("nearest", "linear", "cubic"):
        raise InternalError(f"unknown resize mode '{mode}'")
    if "r" not in kinds:
        raise InternalError("a resize kernel needs a resized dim")
    resized = [d for d, k in enumerate(kinds) if k == "r"]
    pid = "tl.program_id(0).to(tl.int64)" if wide else "tl.program_id(0)"
    lines = [f"def resize_{mode}({', '.join(_params(kinds, mode, antialias, extrapolate))}):",
             f"    idx = {pid} * BLOCK + tl.arange(0, BLOCK)",
             "    mask = idx < n",
             "    rem = idx"]
    for d in reversed(range(len(kinds))):
        if d == 0:
            lines.append("    o0 = rem")
        else:
            lines += [f"    o{d} = rem % osize{d}", f"    rem = rem // osize{d}"]
    passes = [f"o{d} * ist{d}" for d, k in enumerate(kinds) if k == "p"]
    lines.append(f"    base = x_off + {' + '.join(passes) if passes else '0'}")
    outside = []
    for d in resized:
        lines.append(f"    x{d} = tl.math.div_rn(o{d}.to(tl.float32) * mul{d} + add{d}, div{d}) + off{d}")
        if extrapolate:
            outside.append(f"(x{d} < 0.0) | (x{d} > isize{d} - 1.0)")
        if mode == "nearest":
            rounded = NEAREST_ROUNDING[nearest_mode].format(x=f"x{d}")
            lines.append(f"    q{d} = tl.minimum(tl.maximum({rounded}.to(tl.int32), 0), isize{d} - 1) * ist{d}")
        else:
            lines += [f"    i{d} = tl.ceil(x{d}).to(tl.int32) - 1",
                      f"    r{d} = x{d} - i{d}.to(tl.float32)"]
    if extrapolate:
        lines.append(f"    outside = {' | '.join(f'({o})' for o in outside)}")
    if mode == "nearest":
        offset = " + ".join(f"q{d}" for d in resized)
        lines.append(f"    v = tl.load(x_ptr + base + {offset}, mask=mask)")
        if extrapolate:
            lines.append(f"    v = tl.where(outside, (tl.zeros([BLOCK], tl.float32) + ext).to({TL[in_dtype]}), v)")
        lines.append(f"    tl.store(y_ptr + y_off + idx, v.to({TL[out_dtype]}), mask=mask)")
    else:
        lines += _weighted(mode, resized, in_dtype, out_dtype, exclude_outside, antialias, extrapolate)
    header = (f"resize mode={mode} kinds={kinds} in={in_dtype.short} out={out_dtype.short} "
              f"nearest_mode={nearest_mode if mode == 'nearest' else '-'} exclude_outside={int(exclude_outside)} "
              f"antialias={int(antialias)} extrapolate={int(extrapolate)} wide={wide}")
    return render(f"resize_{mode}", header, "\n".join(lines))


def _weighted(mode: str, resized: list, in_dtype: DType, out_dtype: DType, exclude_outside: bool,
              antialias: bool, extrapolate: bool) -> list:
    """Nested loops over the taps of each resized axis; the innermost reads one element."""
    acc = TL[acc_dtype(in_dtype)]
    normalize = exclude_outside or antialias
    lines = [f"    acc = tl.zeros([BLOCK], {acc})"]
    if normalize:
        lines.append(f"    wsum = tl.zeros([BLOCK], {acc})")
    taps, start = TAPS[mode]
    for level, d in enumerate(resized):
        pad = "    " * (level + 1)
        if antialias:
            lines.append(f"{pad}for k{d} in range(0, nt{d}):")
            lines.append(f"{pad}    j{d} = start{d} + k{d}")
            dist = f"tl.abs(j{d} - r{d}) * fs{d}"
        else:
            lines.append(f"{pad}for k{d} in tl.static_range({taps}):")
            lines.append(f"{pad}    j{d} = {start} + k{d}")
            dist = f"tl.abs(j{d} - r{d})"
        lines += [f"{pad}    p{d} = i{d} + j{d}",
                  f"{pad}    dd{d} = {dist}",
                  f"{pad}    w{d} = {_kernel(mode, f'dd{d}')}"]
        if exclude_outside:
            lines.append(f"{pad}    w{d} = tl.where((p{d} >= 0) & (p{d} < isize{d}), w{d}, 0.0)")
        prev = f"w{resized[level - 1]}c * " if level else ""
        lines += [f"{pad}    w{d}c = {prev}w{d}",
                  f"{pad}    q{d}c = {f'q{resized[level - 1]}c + ' if level else ''}"
                  f"tl.minimum(tl.maximum(p{d}, 0), isize{d} - 1) * ist{d}"]
    pad = "    " * (len(resized) + 1)
    last = resized[-1]
    lines += [f"{pad}v = tl.load(x_ptr + base + q{last}c, mask=mask, other=0).to({acc})",
              f"{pad}acc += w{last}c.to({acc}) * v"]
    if normalize:
        lines.append(f"{pad}wsum += w{last}c.to({acc})")
        lines.append("    acc = tl.where(wsum == 0.0, 0.0, acc / tl.where(wsum == 0.0, 1.0, wsum))")
    if extrapolate:
        lines.append(f"    acc = tl.where(outside, (tl.zeros([BLOCK], tl.float32) + ext).to({acc}), acc)")
    if out_dtype in INT_RANGE:
        lo, hi = INT_RANGE[out_dtype]
        lines += _round_half_even("acc")
        lines.append(f"    acc = tl.minimum(tl.maximum(acc, {float(lo)}), {float(hi)})")
    elif not out_dtype.is_float:
        raise InternalError(f"resize {mode} of {out_dtype.short}")
    lines.append(f"    tl.store(y_ptr + y_off + idx, acc.to({TL[out_dtype]}), mask=mask)")
    return lines
