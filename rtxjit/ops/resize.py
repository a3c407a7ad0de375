"""Resize (opsets 13 to 19): nearest, linear and cubic interpolation over any subset of axes of an
N-D tensor (codegen/templates/resize.py).

The output shape depends on the ``scales`` or ``sizes`` input, so both (and ``roi``) are host
inputs: constants, or shape tensors evaluated on the host (rtxjit/ir/host.py), as Reshape's target
is. Everything that follows from them is computed once, at lowering: the output size of each axis,
its scale, and the four constants of its coordinate transformation ``x = (o * mul + add) / div +
off`` (``coord_params``); a kernel then only maps output indices to taps.

Where the spec and onnxruntime differ, rtxjit does as onnxruntime and ONNX's shape inference do:
an output size from ``scales`` is ``floor(float32(in) * scale)`` (in float32: scale 0.7 of 10
gives 7, not the 6 of the exact product), and roi does not enter it (the spec's formula
multiplies by ``roi_end - roi_start``; onnxruntime and onnx's reference ignore it).
pytorch_half_pixel maps a length-1 output to 0, as the spec and onnxruntime say (onnx's
reference uses -0.5; linear and nearest give the same value either way).

Linear and cubic of an integer tensor round the weighted sum half to even and saturate, as onnx's
reference casts (onnxruntime truncates toward zero: its results are up to 1 lower). Nearest moves
values without arithmetic, so any type works; tf_crop_and_resize's fill value is saturated into
an integer type (onnxruntime wraps it).

Antialiasing (opset 18) follows onnx's reference: when a linear or cubic axis is downscaled, its
filter is stretched by ``1 / scale`` (more taps, a count known at lowering) and its weights are
normalized. Upsample (opsets 7 to 9) is not registered: the importer's opset floor (13) is above
the last opset that has it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rtxjit.codegen.templates.resize import INT_RANGE, TAPS, acc_dtype, render_resize
from rtxjit.errors import ModelError, UnsupportedOpError
from rtxjit.ops.shape import norm_axis
from rtxjit.ir.registry import Kind, Rand, Sample, known, op
from rtxjit.ir.types import DType, TensorType

MODES = ("nearest", "linear", "cubic")
TRANSFORMS = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
              "tf_crop_and_resize")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
POLICIES = ("stretch", "not_larger", "not_smaller")
MAX_TAPS = 64  # taps per output element of one kernel (cubic over 3 axes); more axes take more launches
BLOCK = 256
WIDE_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class AxisMap:
    """One resized axis: sizes, the scale of its coordinate transformation, its roi."""

    axis: int
    isize: int
    osize: int
    scale: float
    roi: tuple = (0.0, 1.0)


def _given(v):
    """A host input as a flat array, or None where it is omitted or empty (opset 13's way of
    leaving out ``scales`` when ``sizes`` is given)."""
    if v is None:
        return None
    a = np.asarray(v).reshape(-1)
    return a if a.size else None


def _axes(axes, rank: int) -> list:
    if axes is None:
        return list(range(rank))
    out = [norm_axis(int(a), rank, "Resize axis") for a in axes]
    if len(set(out)) != len(out):
        raise ModelError(f"Resize axes {list(axes)} repeat an axis")
    return out


def _check_attrs(mode: str, coordinate_transformation_mode: str, nearest_mode: str, policy: str) -> None:
    for name, value, allowed in (("mode", mode, MODES),
                                 ("coordinate_transformation_mode", coordinate_transformation_mode, TRANSFORMS),
                                 ("nearest_mode", nearest_mode, NEAREST_MODES),
                                 ("keep_aspect_ratio_policy", policy, POLICIES)):
        if value not in allowed:
            raise UnsupportedOpError(f"Resize {name} '{value}' is not one of {', '.join(allowed)}")


def resize_geometry(shape, roi, scales, sizes, axes, policy: str, transform: str) -> tuple:
    """``(output shape, [AxisMap])`` over the concrete input ``shape``; the maps list only the axes
    whose coordinates are not the identity."""
    rank = len(shape)
    axes = _axes(axes, rank)
    scales, sizes, roi = _given(scales), _given(sizes), _given(roi)
    if (scales is None) == (sizes is None):
        raise ModelError("Resize needs exactly one of 'scales' and 'sizes' (a non-empty tensor)")
    given = scales if scales is not None else sizes
    if len(given) != len(axes):
        raise ModelError(f"Resize {'scales' if scales is not None else 'sizes'} has {len(given)} values "
                         f"for {len(axes)} axes")
    if transform == "tf_crop_and_resize":
        if roi is None:
            raise ModelError("Resize tf_crop_and_resize needs the 'roi' input")
        if len(roi) != 2 * len(axes):
            raise ModelError(f"Resize roi has {len(roi)} values; {2 * len(axes)} are needed (starts, ends)")
        rois = [(float(roi[i]), float(roi[i + len(axes)])) for i in range(len(axes))]
    else:
        rois = [(0.0, 1.0)] * len(axes)
    ins = [int(shape[a]) for a in axes]
    if scales is not None:
        scale = [np.float32(s) for s in scales]
        if any(not s > 0 for s in scale):
            raise ModelError(f"Resize scales {scales.tolist()} must be positive")
        out = [int(math.floor(np.float32(n) * s)) for n, s in zip(ins, scale)]
    else:
        if np.any(sizes < 0):
            raise ModelError(f"Resize sizes {sizes.tolist()} must not be negative")
        if policy == "stretch":
            out = [int(s) for s in sizes]
            scale = [s / n if n else 1.0 for s, n in zip(out, ins)]
        else:
            ratios = [int(s) / n for s, n in zip(sizes, ins) if n]
            common = (min if policy == "not_larger" else max)(ratios) if ratios else 1.0
            out = [int(common * n + 0.5) for n in ins]
            scale = [common] * len(ins)
    out_shape = list(shape)
    maps = []
    for a, n, o, s, r in zip(axes, ins, out, scale, rois):
        if n == 0 and o > 0:
            raise ModelError(f"Resize cannot resize axis {a} of length 0 to {o}")
        out_shape[a] = o
        if not (o == n and float(s) == 1.0 and r == (0.0, 1.0)):
            maps.append(AxisMap(a, n, o, float(s), r))
    return tuple(out_shape), maps


def coord_params(m: AxisMap, transform: str) -> tuple:
    """``(mul, add, div, off)``: the source coordinate of output index ``o`` along ``m`` is
    ``(o * mul + add) / div + off`` (the formulas of onnxruntime, in the order it computes them)."""
    n, o, s = m.isize, m.osize, m.scale
    if transform == "half_pixel" or (transform == "pytorch_half_pixel" and o > 1):
        return 1.0, 0.5, s, -0.5
    if transform == "pytorch_half_pixel":
        return 0.0, 0.0, 1.0, 0.0
    if transform == "half_pixel_symmetric":
        adjustment = o / (s * n)
        return 1.0, 0.5, s, n / 2 * (1 - adjustment) - 0.5
    if transform == "align_corners":
        return (0.0, 0.0, 1.0, 0.0) if o == 1 else (float(n - 1), 0.0, float(o - 1), 0.0)
    if transform == "asymmetric":
        return 1.0, 0.0, s, 0.0
    start, end = m.roi  # tf_crop_and_resize
    if o == 1:
        return 0.0, 0.0, 1.0, 0.5 * (start + end) * (n - 1)
    return (end - start) * (n - 1), 0.0, float(o - 1), start * (n - 1)


def _filter(mode: str, m: AxisMap, antialias: int) -> tuple:
    """``(taps, start, fs)`` of a linear or cubic axis: ``taps`` input elements from ``i + start``,
    weighed at distance ``|start + k - r| * fs`` (the filter stretched by ``1 / fs``)."""
    taps, start = TAPS[mode]
    if not antialias or m.scale >= 1.0:
        return taps, start, 1.0
    support = 1.0 if mode == "linear" else 2.0
    start = int(math.floor(-support / m.scale)) + 1
    return 2 - 2 * start, start, float(m.scale)


# ---- numpy reference ---------------------------------------------------------------------------

def _cubic(d: np.ndarray, a: float) -> np.ndarray:
    return np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                    np.where(d < 2, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a, 0.0))


def _resize_axis(x: np.ndarray, m: AxisMap, attrs: dict) -> np.ndarray:
    """``x`` resized along one axis (float64), as the spec's formulas say."""
    mode, transform = attrs["mode"], attrs["coordinate_transformation_mode"]
    mul, add, div, off = coord_params(m, transform)
    src = (np.arange(m.osize, dtype=np.float64) * mul + add) / div + off
    if mode == "nearest":
        rounding = {"round_prefer_floor": lambda v: np.ceil(v - 0.5), "round_prefer_ceil": lambda v: np.floor(v + 0.5),
                    "floor": np.floor, "ceil": np.ceil}[attrs["nearest_mode"]]
        y = np.take(x, np.clip(rounding(src), 0, m.isize - 1).astype(np.int64), axis=m.axis)
    else:
        taps, start, fs = _filter(mode, m, attrs["antialias"])
        base = np.ceil(src) - 1
        pos = start + np.arange(taps)
        dist = np.abs(pos[None, :] - (src - base)[:, None]) * fs
        weights = np.maximum(1 - dist, 0) if mode == "linear" else _cubic(dist, attrs["cubic_coeff_a"])
        idx = base.astype(np.int64)[:, None] + pos[None, :]
        if attrs["exclude_outside"]:
            weights = np.where((idx >= 0) & (idx < m.isize), weights, 0.0)
        if attrs["exclude_outside"] or attrs["antialias"]:
            total = weights.sum(axis=1, keepdims=True)
            weights = np.where(total == 0, 0.0, weights / np.where(total == 0, 1.0, total))
        taken = np.take(x, np.clip(idx, 0, m.isize - 1), axis=m.axis)  # the axis becomes (osize, taps)
        y = (taken * weights.reshape(_along(m.axis, x.ndim, weights.shape))).sum(axis=m.axis + 1)
    if transform == "tf_crop_and_resize":
        outside = ((src < 0) | (src > m.isize - 1)).reshape(_along(m.axis, x.ndim, (m.osize,)))
        fill = _cast_back(np.array(attrs["extrapolation_value"]), y.dtype)
        y = np.where(outside, fill, y)
    return y


def _along(axis: int, rank: int, shape: tuple) -> tuple:
    """``shape`` placed at ``axis`` of a rank-``rank`` array, broadcasting over the other dims."""
    return (1,) * axis + tuple(shape) + (1,) * (rank - axis - 1)


def _cast_back(y: np.ndarray, dtype) -> np.ndarray:
    """The float64 result in the input's type: integers rounded half to even and saturated."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.round(y), info.min, info.max).astype(dtype)
    if dtype == np.bool_:
        return y != 0
    return y.astype(dtype)


# ---- the op ------------------------------------------------------------------------------------

_SCALES_2X = np.array([1, 1, 2, 2], np.float32)


@op("Resize", since=13, kind=Kind.MOVEMENT, host_inputs=(1, 2, 3),
    samples=[
        # the TorchScript exporter's nearest 2x upsampling (UNet decoders)
        Sample([Rand((2, 3, 4, 5)), None, _SCALES_2X], {"mode": "nearest", "nearest_mode": "floor",
                                                        "coordinate_transformation_mode": "asymmetric"},
               float_types=("fp32",)),
        Sample([Rand((1, 2, 4, 5)), None, None, np.array([1, 2, 7, 9], np.int64)], {"mode": "linear"}),
        Sample([Rand((1, 2, 6, 5)), None, None, np.array([1, 2, 4, 3], np.int64)],
               {"mode": "linear", "coordinate_transformation_mode": "align_corners"}),
        Sample([Rand((1, 2, 5, 4)), None, np.array([1, 1, 0.6, 1.7], np.float32)], {"mode": "cubic"},
               float_types=("fp32",)),
        Sample([Rand((2, 5, 4)), None, None, np.array([7, 3], np.int64)],
               {"mode": "cubic", "cubic_coeff_a": -0.5, "exclude_outside": 1, "axes": [1, -1]}),
        Sample([Rand((1, 2, 3, 4, 5)), None, None, np.array([5, 6, 3], np.int64)],
               {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel", "axes": [2, 3, 4]}),
        Sample([Rand((1, 2, 6, 7)), None, np.array([0.5, 0.6], np.float32)],
               {"mode": "nearest", "nearest_mode": "round_prefer_ceil", "axes": [2, 3]}, float_types=("fp32",)),
        Sample([Rand((1, 1, 5, 6)), np.array([0.2, -0.3, 0.9, 1.2], np.float32), None, np.array([4, 5], np.int64)],
               {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize", "axes": [2, 3],
                "extrapolation_value": 1.5}, float_types=("fp32",)),
        Sample([Rand((1, 2, 3, 4)), None, None, np.array([7, 7], np.int64)],
               {"mode": "nearest", "keep_aspect_ratio_policy": "not_smaller", "axes": [2, 3]}),  # onnxruntime 1.32
        # ignores the policy with negative axes (the output keeps the input's shape)
        Sample([Rand((1, 2, 5, 4)), None, np.array([1, 1, 1.7, 2.6], np.float32)],
               {"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"}, float_types=("fp32",)),
        Sample([Rand((2, 3, 4), "uint8", 0, 255), None, None, np.array([2, 5, 7], np.int64)],
               {"mode": "nearest", "coordinate_transformation_mode": "align_corners",
                "nearest_mode": "round_prefer_floor"}, float_types=("fp32",)),
        Sample([Rand((1, 2, 9, 8)), None, None, np.array([4, 3], np.int64)],
               {"mode": "linear", "antialias": 1, "axes": [2, 3]}),
        Sample([Rand((2, 3, 4, 3)), None, None, np.array([3, 4, 3, 5], np.int64)],
               {"mode": "cubic", "coordinate_transformation_mode": "asymmetric"}),  # 4 cubic axes: two launches
        Sample([Rand((1, 3, 4), "bool"), np.array([-0.2, 0.1, 1.1, 0.9], np.float32), None, np.array([5, 3], np.int64)],
               {"mode": "nearest", "coordinate_transformation_mode": "tf_crop_and_resize", "axes": [1, 2],
                "extrapolation_value": 1.0}, float_types=("fp32",)),
    ])
def resize(x: TensorType, roi=None, scales=None, sizes=None, *, antialias: int = 0, axes=None,
           coordinate_transformation_mode: str = "half_pixel", cubic_coeff_a: float = -0.75,
           exclude_outside: int = 0, extrapolation_value: float = 0.0, keep_aspect_ratio_policy: str = "stretch",
           mode: str = "nearest", nearest_mode: str = "round_prefer_floor") -> TensorType:
    _check_attrs(mode, coordinate_transformation_mode, nearest_mode, keep_aspect_ratio_policy)
    if mode != "nearest" and not (x.dtype.is_float or x.dtype in INT_RANGE):
        raise ModelError(f"Resize {mode} of {x.dtype.short}")
    if all(v is None or known(v) for v in (roi, scales, sizes)) and x.static:
        shape, _ = resize_geometry(x.shape, roi, scales, sizes, axes, keep_aspect_ratio_policy,
                                   coordinate_transformation_mode)
        return x.with_shape(shape)
    return x.with_shape(_partial_shape(x, scales, sizes, axes, keep_aspect_ratio_policy))


def _partial_shape(x: TensorType, scales, sizes, axes, policy: str) -> tuple:
    """The output shape where the input's shape or a host input is not known yet: the dims that
    are known anyway (axes not resized, scale 1, sizes with the stretch policy), else '?'."""
    resized = _axes(axes, x.rank)
    dims = list(x.shape)
    scales = _given(scales) if scales is None or known(scales) else scales
    sizes = _given(sizes) if sizes is None or known(sizes) else sizes
    for i, a in enumerate(resized):
        if scales is not None and known(scales) and i < len(scales) and float(scales[i]) == 1.0:
            continue
        if sizes is not None and known(sizes) and policy == "stretch" and i < len(sizes):
            dims[a] = int(sizes[i])
            continue
        dims[a] = "?"
    return tuple(dims)


@resize.reference
def _(x, roi=None, scales=None, sizes=None, *, antialias=0, axes=None, coordinate_transformation_mode="half_pixel",
      cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0, keep_aspect_ratio_policy="stretch",
      mode="nearest", nearest_mode="round_prefer_floor"):
    attrs = dict(antialias=antialias, coordinate_transformation_mode=coordinate_transformation_mode,
                 cubic_coeff_a=cubic_coeff_a, exclude_outside=exclude_outside,
                 extrapolation_value=extrapolation_value, mode=mode, nearest_mode=nearest_mode)
    _, maps = resize_geometry(x.shape, roi, scales, sizes, axes, keep_aspect_ratio_policy,
                              coordinate_transformation_mode)
    y = x if mode == "nearest" else x.astype(np.float64)  # nearest moves values: no arithmetic
    for m in maps:
        y = _resize_axis(y, m, attrs)
    return _cast_back(y, x.dtype)


@resize.lower
def _(ctx, x, roi=None, scales=None, sizes=None, *, antialias=0, axes=None,
      coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0,
      keep_aspect_ratio_policy="stretch", mode="nearest", nearest_mode="round_prefer_floor"):
    transform = coordinate_transformation_mode
    out = ctx.outputs[0]
    _, maps = resize_geometry(x.shape, roi, scales, sizes, axes, keep_aspect_ratio_policy, transform)
    if not maps:  # every axis keeps its size and its coordinates
        ctx.alias(0, x)
        return
    soft = antialias and mode != "nearest" and any(m.scale < 1.0 for m in maps)
    groups = _launch_groups(maps, 1 if mode == "nearest" else TAPS[mode][0], soft)
    src = x
    for g, group in enumerate(groups):
        last = g == len(groups) - 1
        shape = list(src.shape)
        for m in group:
            shape[m.axis] = m.osize
        dst = out if last else ctx.temp(acc_dtype(x.dtype) if mode != "nearest" else x.dtype, shape)
        _launch(ctx, src, dst, group, mode, transform, nearest_mode, cubic_coeff_a, exclude_outside,
                extrapolation_value, antialias if soft else 0)
        src = dst


def _launch_groups(maps: list, taps: int, soft: bool) -> list:
    """The axes of each launch, in order: as many as keep ``taps ** axes`` within MAX_TAPS (the
    kernel unrolls its taps; antialiasing loops over them at run time, so one launch does all)."""
    if soft or taps == 1:
        return [maps]
    per = max(1, int(math.log(MAX_TAPS, taps) + 1e-9))
    return [maps[i:i + per] for i in range(0, len(maps), per)]


def _launch(ctx, x, y, group: list, mode: str, transform: str, nearest_mode: str, a: float, exclude_outside: int,
            ext: float, antialias: int) -> None:
    """One kernel: ``y`` (contiguous) is ``x`` (any strides) resized along the axes of ``group``."""
    by_axis = {m.axis: m for m in group}
    # dims in order: merge runs of pass-through dims the input walks contiguously; drop size-1 ones
    dims = []  # (kind, osize, istride, AxisMap | None)
    for d in range(x.rank):
        m = by_axis.get(d)
        if m is not None:
            dims.append(("r", m.osize, x.strides[d], m))
        elif x.shape[d] != 1:
            if dims and dims[-1][0] == "p" and dims[-1][2] == x.strides[d] * x.shape[d]:
                dims[-1] = ("p", dims[-1][1] * x.shape[d], x.strides[d], None)
            else:
                dims.append(("p", x.shape[d], x.strides[d], None))
    kinds = "".join(k for k, _, _, _ in dims)
    extrapolate = transform == "tf_crop_and_resize"
    n = y.numel
    src = render_resize(mode, kinds, x.dtype, y.dtype, nearest_mode, bool(exclude_outside), bool(antialias),
                        extrapolate, wide=n > WIDE_LIMIT or ctx.needs_wide(x, y))
    args = [ctx.ptr(x), x.offset, ctx.ptr(y), y.offset, n]
    for kind, osize, stride, m in dims:
        args.append(osize)
        if kind == "p":
            args.append(stride)
            continue
        args += [m.isize, stride, *(float(v) for v in coord_params(m, transform))]
        if antialias:
            taps, start, fs = _filter(mode, m, antialias)
            args += [taps, start, fs]
    if mode == "cubic":
        args.append(float(a))
    if extrapolate:
        args.append(_extrapolation(ext, x.dtype))
    ctx.launch(src, (-(-n // BLOCK),), args, BLOCK=BLOCK)


def _extrapolation(value: float, dtype: DType) -> float:
    """tf_crop_and_resize's fill value as the kernel stores it: rounded and saturated for an
    integer type (as the reference's cast), 0 or 1 for bool."""
    if dtype is DType.BOOL:
        return float(value != 0)
    if dtype in INT_RANGE:
        lo, hi = INT_RANGE[dtype]
        return float(min(max(np.round(value), lo), hi))
    return float(value)
