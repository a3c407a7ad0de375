"""Pad (opsets 13 to 25: modes constant, reflect, edge, wrap; ``pads`` and ``axes`` are shape
tensors known on the host, ``constant_value`` a one-element tensor read by the kernel) and
DepthToSpace / SpaceToDepth (a reshape, a transpose and a reshape: one strided copy).

Negative pads crop, and crop first: the input is sliced (a view), then the slice is padded, which is
what onnxruntime does (for reflect and wrap, padding before cropping would give other values). A
Pad that only crops is that view alone; one whose pads are all 0 is the input itself. Everything
else is one kernel over the output (codegen/templates/pad.py).

Where the modes disagree among runtimes: a reflect pad longer than the axis (onnxruntime refuses it)
repeats the reflection as numpy and the ONNX reference do; an axis cropped to nothing cannot be
padded by reflect, edge or wrap (a ShapeError), as in onnxruntime.
"""

from __future__ import annotations

import numpy as np

from rtxjit.codegen.templates.pad import MODES, render_pad
from rtxjit.codegen.view import View
from rtxjit.errors import ModelError, ShapeError, UnsupportedOpError
from rtxjit.ops.shape import norm_axis
from rtxjit.ir.registry import Kind, Rand, Sample, known, op
from rtxjit.ir.types import TensorType, dim_op

BLOCK = 1024  # output elements per program
WIDE_LIMIT = 2**31 - 1


# ---- Pad ---------------------------------------------------------------------------------------

def pad_widths(rank: int, pads, axes=None) -> list:
    """``[(begin, end)]`` per dim of a rank-``rank`` input, from ONNX's ``pads`` (all begins, then
    all ends, over ``axes`` or every dim)."""
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    if axes is None:
        axes = list(range(rank))
    else:
        axes = [norm_axis(int(a), rank, "Pad axis") for a in np.asarray(axes).reshape(-1)]
        if len(set(axes)) != len(axes):
            raise ShapeError(f"Pad axes {axes} name an axis twice")
    if len(pads) != 2 * len(axes):
        raise ShapeError(f"Pad has {len(pads)} pads for {len(axes)} axes; it needs two per axis")
    widths = [(0, 0)] * rank
    for i, a in enumerate(axes):
        widths[a] = (pads[i], pads[len(axes) + i])
    return widths


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UnsupportedOpError(f"Pad mode '{mode}' is not one of {MODES}")


def _cropped(length: int, begin: int, end: int) -> int:
    """Length of an axis after its negative pads."""
    return length - max(-begin, 0) - max(-end, 0)


def _check_dims(shape, widths, mode: str) -> None:
    for d, (n, (b, e)) in enumerate(zip(shape, widths)):
        if not isinstance(n, int):
            continue
        if n + b + e < 0:
            raise ShapeError(f"Pad pads ({b}, {e}) crop more than the {n} elements of axis {d}")
        if mode != "constant" and _cropped(n, b, e) <= 0 and (b > 0 or e > 0):
            raise ShapeError(f"Pad mode '{mode}' cannot pad axis {d}: no element is left of it after the "
                             f"negative pads ({b}, {e}) of its {n} elements")


@op("Pad", since=13, kind=Kind.MOVEMENT, host_inputs=(1, 3),
    samples=[Sample([Rand((2, 3, 4, 5)), np.array([0, 0, 1, 2, 0, 0, 3, 0], np.int64), Rand(())]),
             Sample([Rand((2, 5, 6, 3)), np.array([0, 0, 0, 0, 0, 2, 1, 0], np.int64)]),  # Swin: [B, H, W, C]
             Sample([Rand((2, 3, 4, 5)), np.array([0, 0, 2, 3, 0, 0, 3, 1], np.int64)], {"mode": "reflect"}),
             Sample([Rand((3, 4, 5)), np.array([0, 2, 5, 0, 3, 4], np.int64)], {"mode": "edge"}),
             Sample([Rand((3, 4, 5)), np.array([1, 6, 2, 2, 0, 9], np.int64)], {"mode": "wrap"}),
             # negative pads crop (before padding), with and without padding elsewhere
             Sample([Rand((4, 6)), np.array([-1, 2, 1, -3], np.int64), Rand(())]),
             Sample([Rand((4, 7)), np.array([0, -2, 0, 3], np.int64)], {"mode": "reflect"}),
             Sample([Rand((5, 6)), np.array([-2, 3, 1, -1], np.int64)], {"mode": "wrap"}),
             Sample([Rand((5, 6)), np.array([2, -1, -3, 2], np.int64)], {"mode": "edge"}),
             Sample([Rand((3, 5, 4)), np.array([-1, 0, 0, -2], np.int64), None, np.array([0, 2], np.int64)]),
             # reflect longer than the axis, and of a one-element axis (numpy's rule; onnxruntime refuses)
             Sample([Rand((2, 1, 3)), np.array([0, 2, 5, 0, 1, 4], np.int64)], {"mode": "reflect"}),
             # axes (opset 18): a subset, negative axes
             Sample([Rand((2, 3, 4, 5)), np.array([1, 2, 3, 0], np.int64), Rand(()), np.array([-1, 1], np.int64)]),
             Sample([Rand((2, 3, 4)), np.array([2, 1], np.int64), None, np.array([-2], np.int64)],
                    {"mode": "wrap"}),
             Sample([Rand((2, 6), "int64", -9, 9), np.array([1, 2, 0, 1], np.int64), np.array(7, np.int64)],
                    float_types=("fp32",)),
             Sample([Rand((3, 4), "bool"), np.array([1, 1, 2, 0], np.int64)], {"mode": "edge"},
                    float_types=("fp32",))])
def pad(data: TensorType, pads, constant_value=None, axes=None, *, mode: str = "constant") -> TensorType:
    _check_mode(mode)
    if constant_value is not None:
        if constant_value.dtype != data.dtype:
            raise ModelError(f"Pad constant_value is {constant_value.dtype.short}, data is {data.dtype.short}")
        if constant_value.static and int(np.prod(constant_value.shape)) > 1:
            raise ShapeError(f"Pad constant_value must hold one element, got shape {constant_value.shape}")
    if not known(pads) or (axes is not None and not known(axes)):
        return data.with_shape(tuple("?" for _ in data.shape))
    widths = pad_widths(data.rank, pads, axes)
    _check_dims(data.shape, widths, mode)
    return data.with_shape([d if b + e == 0 else dim_op(lambda n, p: n + p, "+", d, b + e)
                            for d, (b, e) in zip(data.shape, widths)])


@pad.reference
def _(data, pads, constant_value=None, axes=None, *, mode="constant"):
    widths = pad_widths(data.ndim, pads, axes)
    _check_dims(data.shape, widths, mode)
    crop = tuple(slice(max(-b, 0), n - max(-e, 0)) for n, (b, e) in zip(data.shape, widths))
    grow = [(max(b, 0), max(e, 0)) for b, e in widths]
    if mode != "constant":
        return np.pad(data[crop], grow, mode=mode)
    value = 0 if constant_value is None or constant_value.size == 0 else constant_value.reshape(-1)[0]
    return np.pad(data[crop], grow, mode="constant", constant_values=value)


@pad.lower
def _(ctx, data, pads, constant_value=None, axes=None, *, mode="constant"):
    widths = pad_widths(data.rank, pads, axes)
    view = data
    for d, (n, (b, e)) in enumerate(zip(data.shape, widths)):
        if b < 0 or e < 0:
            view = view.slice(d, max(-b, 0), _cropped(n, b, e))
    grow = [(max(b, 0), max(e, 0)) for b, e in widths]
    if not any(b or e for b, e in grow):
        ctx.alias(0, view)  # only cropping (or nothing): a view of the input
        return
    out = ctx.outputs[0]
    shape, strides, grow = _merge_unpadded(view, grow)
    padded = tuple(bool(b or e) for b, e in grow)
    has_value = mode == "constant" and constant_value is not None and constant_value.numel > 0
    wide = out.numel > WIDE_LIMIT or ctx.needs_wide(out, view)
    src = render_pad(mode, data.dtype, padded, has_value, wide)
    args = [ctx.ptr(out), out.offset, ctx.ptr(view), view.offset]
    if has_value:
        args += [ctx.ptr(constant_value), constant_value.offset]
    args.append(out.numel)
    for n, st, (b, e), p in zip(shape, strides, grow, padded):
        args += [n + b + e, st]
        if p:
            args += _axis_args(mode, n, b)
    ctx.launch(src, (-(-out.numel // BLOCK),), args, BLOCK=BLOCK)


def _axis_args(mode: str, n: int, begin: int) -> list:
    """The template's per-dim constants of a padded dim of (cropped) length ``n`` (see its header)."""
    if mode in ("constant", "edge"):
        return [begin, n]
    period = n if mode == "wrap" else max(2 * (n - 1), 1)
    shift = -(-begin // period) * period  # a multiple of the period, >= begin: j + shift >= 0
    return [begin, n, shift] + ([period] if mode == "reflect" else [])


def _merge_unpadded(view: View, grow: list) -> tuple:
    """``(shape, strides, grow)`` with dims of size 1 that are not padded dropped, and neighbouring
    unpadded dims that the input walks contiguously merged: fewer divmods per element."""
    dims = [(n, st, g) for n, st, g in zip(view.shape, view.strides, grow) if n != 1 or g != (0, 0)]
    merged: list = []
    for n, st, g in dims:
        if merged and g == (0, 0) and merged[-1][2] == (0, 0) and merged[-1][1] == st * n:
            pn, _, _ = merged.pop()
            merged.append((pn * n, st, g))
        else:
            merged.append((n, st, g))
    if not merged:
        merged = [(1, 1, (0, 0))]
    return [m[0] for m in merged], [m[1] for m in merged], [m[2] for m in merged]


# ---- DepthToSpace / SpaceToDepth ----------------------------------------------------------------
# Both are numpy's reshape -> transpose -> reshape (the ONNX spec's own definition). The input,
# seen as the 6-D tensor, is permuted as a strided view and copied once into the output seen as the
# permuted 6-D shape: one pointwise copy kernel, no template of its own.

DEPTH_MODES = ("DCR", "CRD")


def _check_depth_input(name: str, x: TensorType, blocksize: int, mode: str) -> None:
    if x.rank != 4:
        raise ShapeError(f"{name} needs a 4-D [N, C, H, W] input, got {x}")
    if blocksize < 1:
        raise ShapeError(f"{name} blocksize {blocksize} must be >= 1")
    if mode not in DEPTH_MODES:
        raise UnsupportedOpError(f"{name} mode '{mode}' is not one of {DEPTH_MODES}")


def _d2s_layout(shape, blocksize: int, mode: str) -> tuple:
    """(6-D shape of the input, permutation) for DepthToSpace."""
    b, c, h, w = shape
    bs = blocksize
    if mode == "DCR":
        return (b, bs, bs, c // (bs * bs), h, w), (0, 3, 4, 1, 5, 2)
    return (b, c // (bs * bs), bs, bs, h, w), (0, 1, 4, 2, 5, 3)


def _s2d_layout(shape, blocksize: int, mode: str) -> tuple:
    """(6-D shape of the input, permutation) for SpaceToDepth."""
    b, c, h, w = shape
    bs = blocksize
    perm = (0, 3, 5, 1, 2, 4) if mode == "DCR" else (0, 1, 3, 5, 2, 4)
    return (b, c, h // bs, bs, w // bs, bs), perm


def _rearrange_ref(x, layout, out_shape):
    tmp, perm = layout
    return np.transpose(np.reshape(x, tmp), perm).reshape(out_shape)


def _rearrange(ctx, x: View, layout) -> None:
    tmp, perm = layout
    try:
        src = x.reshape(tmp)
    except ValueError:  # a strided input that no view splits: copy it dense first
        src = ctx.contiguous(x).reshape(tmp)
    src = src.permute(perm)
    ctx.copy(src, ctx.outputs[0].reshape(src.shape))


@op("DepthToSpace", since=13, kind=Kind.MOVEMENT,
    samples=[Sample([Rand((2, 8, 3, 2))], {"blocksize": 2}),
             Sample([Rand((1, 18, 2, 3))], {"blocksize": 3, "mode": "CRD"}),
             Sample([Rand((2, 12, 3, 2))], {"blocksize": 2, "mode": "DCR"})])
def depth_to_space(x: TensorType, *, blocksize: int, mode: str = "DCR") -> TensorType:
    _check_depth_input("DepthToSpace", x, blocksize, mode)
    b, c, h, w = x.shape
    bs = blocksize
    if isinstance(c, int) and c % (bs * bs):
        raise ShapeError(f"DepthToSpace: channels {c} are not a multiple of blocksize^2 = {bs * bs}")
    return x.with_shape((b, dim_op(lambda n, k: n // k, "//", c, bs * bs),
                         dim_op(lambda n, k: n * k, "*", h, bs), dim_op(lambda n, k: n * k, "*", w, bs)))


@depth_to_space.reference
def _(x, *, blocksize, mode="DCR"):
    b, c, h, w = x.shape
    bs = blocksize
    return _rearrange_ref(x, _d2s_layout(x.shape, bs, mode), (b, c // (bs * bs), h * bs, w * bs))


@depth_to_space.lower
def _(ctx, x, *, blocksize, mode="DCR"):
    _rearrange(ctx, x, _d2s_layout(x.shape, blocksize, mode))


@op("SpaceToDepth", since=13, kind=Kind.MOVEMENT,
    samples=[Sample([Rand((2, 3, 4, 6))], {"blocksize": 2}),
             Sample([Rand((1, 2, 6, 3))], {"blocksize": 3, "mode": "CRD"}, opset=28)])
def space_to_depth(x: TensorType, *, blocksize: int, mode: str = "DCR") -> TensorType:
    _check_depth_input("SpaceToDepth", x, blocksize, mode)
    b, c, h, w = x.shape
    bs = blocksize
    for name, n in (("height", h), ("width", w)):
        if isinstance(n, int) and n % bs:
            raise ShapeError(f"SpaceToDepth: {name} {n} is not a multiple of blocksize {bs}")
    return x.with_shape((b, dim_op(lambda n, k: n * k, "*", c, bs * bs),
                         dim_op(lambda n, k: n // k, "//", h, bs), dim_op(lambda n, k: n // k, "//", w, bs)))


@space_to_depth.reference
def _(x, *, blocksize, mode="DCR"):
    b, c, h, w = x.shape
    bs = blocksize
    return _rearrange_ref(x, _s2d_layout(x.shape, bs, mode), (b, c * bs * bs, h // bs, w // bs))


@space_to_depth.lower
def _(ctx, x, *, blocksize, mode="DCR"):
    _rearrange(ctx, x, _s2d_layout(x.shape, blocksize, mode))
