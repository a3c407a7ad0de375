"""Row reductions: ReduceSum/Mean/Max/Min, ReduceProd/L1/L2/LogSum/LogSumExp/SumSquare, ArgMax/ArgMin,
Softmax, LogSoftmax, LayerNormalization and the internal ``rtxjit.RMSNorm`` (made by
``passes/fuse_normalization.py``), all lowered onto the row-reduction template
(``codegen/templates/reduce.py``) through ``row_reduce``."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from rtxjit.codegen.templates.reduce import EPS_MODES, render_reduce
from rtxjit.codegen.view import View, collapse
from rtxjit.errors import ModelError, ShapeError, UnsupportedOpError
from rtxjit.ops.shape import norm_axis
from rtxjit.ir.registry import Kind, Rand, Sample, known, op
from rtxjit.ir.types import DType, TensorType

WIDE_LIMIT = 2**31 - 1


# ---- the shared lowering -----------------------------------------------------------------------

def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


GENERIC_ROW_BLOCKS = (4, 1024)  # (BLOCK_R, BLOCK_C) of the shape-generic fallback on the GPU (rows loop)


def row_blocks(n_rows: int, n_cols: int, interpret: bool) -> tuple:
    """``(BLOCK_R, BLOCK_C, ONE_BLOCK)`` for rows of ``n_cols``: a row fits one block up to a cap
    (longer rows loop), and short rows pack into tiles of about ``tile`` elements. The interpreter
    pays per program, not per element, so it gets bigger tiles."""
    cap_c, tile = (4096, 32768) if interpret else (2048, 4096)
    block_c = min(_pow2(max(n_cols, 1)), cap_c)
    block_r = min(max(tile // block_c, 1), _pow2(max(n_rows, 1)))
    return block_r, block_c, n_cols <= block_c


def row_reduce(ctx, x: View, axes: list, mode: str, out: View, *, scale: Optional[View] = None,
               bias: Optional[View] = None, eps: float = 0.0, stats: tuple = ()) -> None:
    """Launch the row-reduction kernel of ``mode`` over the sorted ``axes`` of ``x``.

    Row modes write one value per kept index to the contiguous ``out``; softmax, logsoftmax,
    layernorm and rmsnorm write ``out``, contiguous and of x's shape, at x's offsets (x is made contiguous). ``scale``/``bias`` broadcast to the reduced dims;
    ``stats`` are layernorm's (Mean, InvStdDev) views, one value per row each.
    """
    x = ctx.contiguous(x)
    kept = [d for d in range(x.rank) if d not in axes]
    v = x.permute(kept + list(axes))
    k = len(kept)
    red_shape = v.shape[k:]
    affine = [p.broadcast_to(red_shape).strides for p in (scale, bias) if p is not None]
    col_strides = [v.strides[k:]] + affine
    kshape, (kst,) = collapse(v.shape[:k], v.strides[:k])
    cshape, cstrides = collapse(red_shape, *col_strides)
    n_rows, n_cols = math.prod(v.shape[:k]), math.prod(red_shape)
    stats_dtype = stats[0].dtype if stats else None
    src = render_reduce(mode, x.dtype, out.dtype, len(kshape), len(cshape), scale=scale is not None,
                        bias=bias is not None, stats_dtype=stats_dtype, wide=x.numel > WIDE_LIMIT)
    args = [ctx.ptr(x), x.offset, ctx.ptr(out), out.offset]
    for p in (scale, bias, *stats):
        if p is not None:
            args += [ctx.ptr(p), p.offset]
    args += [n_rows, n_cols] + ([float(eps)] if mode in EPS_MODES else [])
    args += [*kshape, *kst, *cshape]
    for st in cstrides:
        args += list(st)
    block_r, block_c, one = row_blocks(n_rows, n_cols, ctx.interpret)
    gen_r, gen_c = GENERIC_ROW_BLOCKS
    generic = (-(-n_rows // gen_r),), {"BLOCK_R": gen_r, "BLOCK_C": gen_c, "ONE_BLOCK": False}
    ctx.launch(src, (-(-n_rows // block_r),), args, generic=generic, BLOCK_R=block_r, BLOCK_C=block_c, ONE_BLOCK=one)


# ---- ReduceSum / ReduceMean / ReduceMax / ReduceMin --------------------------------------------

def _axes_list(axes_in, axes_attr) -> Optional[list]:
    """The axes from the input (newer opsets) or the attribute (older ones); None if neither."""
    axes = axes_in if axes_in is not None else axes_attr
    return None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]


def reduced_axes(rank: int, axes_in, axes_attr, noop_with_empty_axes: int) -> Optional[list]:
    """Sorted axes to reduce, or None where the op is the identity (empty axes with noop set)."""
    axes = _axes_list(axes_in, axes_attr)
    if not axes:
        return None if noop_with_empty_axes else list(range(rank))
    return sorted({norm_axis(a, rank, "axes") for a in axes})


def _reduce_infer(x: TensorType, axes_in=None, *, axes=None, keepdims: int = 1,
                  noop_with_empty_axes: int = 0) -> TensorType:
    if axes_in is not None and not known(axes_in):
        return x.with_shape(("?",) * _reduced_rank(x.rank, axes_in, keepdims, noop_with_empty_axes))
    red = reduced_axes(x.rank, axes_in, axes, noop_with_empty_axes)
    if red is None:
        return x
    if keepdims:
        return x.with_shape(tuple(1 if i in red else d for i, d in enumerate(x.shape)))
    return x.with_shape(tuple(d for i, d in enumerate(x.shape) if i not in red))


def _reduced_rank(rank: int, axes_in, keepdims: int, noop_with_empty_axes: int) -> int:
    """The output rank where the axes input is not known yet (only its length is)."""
    n = axes_in.type.shape[0] if axes_in.type.rank else 1
    if not isinstance(n, int):
        raise ShapeError("the length of a Reduce node's axes input must be known")
    if keepdims or (n == 0 and noop_with_empty_axes):
        return rank
    return 0 if n == 0 else rank - n


REDUCTIONS = {
    # name: (template mode, numpy ufunc or function, identity of an empty reduction)
    "ReduceSum": ("sum", np.sum, None),
    "ReduceMean": ("mean", np.mean, None),
    "ReduceMax": ("max", np.max, -np.inf),
    "ReduceMin": ("min", np.min, np.inf),
}

_REDUCE_SAMPLES = [
    Sample([Rand((2, 3, 5))]),
    Sample([Rand((2, 3, 5)), np.array([1], np.int64)]),
    Sample([Rand((2, 3, 4, 5)), np.array([0, -1], np.int64)], {"keepdims": 0}),
    Sample([Rand((2, 3, 7, 7)), np.array([2, 3], np.int64)]),
    Sample([Rand((3, 4)), np.array([], np.int64)], {"noop_with_empty_axes": 1}),
    Sample([Rand((3, 6000), None, 0.5, 1.0), np.array([1], np.int64)], {"keepdims": 0}),
    Sample([Rand((2, 3, 4), "int32", -9, 9), np.array([1], np.int64)], float_types=("-",)),
    # long enough for the two-stage path: whole tensor, and 2 rows of 3 * 2**15
    Sample([Rand((4, 8, 2048), None, 0.5, 1.0)], {"keepdims": 0}),
    Sample([Rand((2, 3, 32768), None, 0.5, 1.0), np.array([1, 2], np.int64)]),
    Sample([Rand((4, 8, 2048), "int64", -1000, 1000)], {"keepdims": 0}, float_types=("-",)),
]


def _reduce_reference(fn, identity):
    def reference(x, axes_in=None, *, axes=None, keepdims=1, noop_with_empty_axes=0):
        red = reduced_axes(x.ndim, axes_in, axes, noop_with_empty_axes)
        if red is None:
            return x
        if identity is not None and x.size == 0:
            init = bool(identity > 0) if x.dtype == bool else identity
            return fn(x, axis=tuple(red), keepdims=bool(keepdims), initial=init)
        return fn(x, axis=tuple(red), keepdims=bool(keepdims))

    return reference


def _reduce_lower(mode: str):
    def lower(ctx, x, axes_in=None, *, axes=None, keepdims=1, noop_with_empty_axes=0):
        red = reduced_axes(x.rank, axes_in, axes, noop_with_empty_axes)
        if red is None:
            ctx.copy(x, ctx.outputs[0])
            return
        if mode in ("sum", "mean") and x.dtype is DType.BOOL:
            raise UnsupportedOpError(f"{ctx.where}: {mode} of bool is not supported")
        if not _two_stage(ctx, x, red, mode, ctx.outputs[0]):
            row_reduce(ctx, x, red, mode, ctx.outputs[0])

    return lower


SPLIT_COLS = 1 << 16  # a reduction at least this long over few rows runs in two stages
SPLIT_ROWS = 64
SPLIT_PARTS = 256


def _two_stage(ctx, x: View, red: list, mode: str, out: View) -> bool:
    """A long reduction over few rows (T5's ``isinf(h).any()`` over a whole [B, S, E] hidden
    state: one row of 393k elements, ~0.3 ms in one program on an H100) in two launches: each row
    split into up to 256 equal parts reduced side by side, then the parts. Max, min and sum of parts
    are those of the whole; the mean of equal parts' means is the mean, for floats: an integer mean
    truncates each part's mean (-0.99 came out -1, -2 came out -1), so it stays one stage. fp16/bf16
    partial sums are kept in fp32. Returns whether it did (the reduced axes must be x's trailing ones)."""
    if mode not in ("max", "min", "sum", "mean") or (mode == "mean" and not x.dtype.is_float):
        return False
    k = x.rank - len(red)
    if list(red) != list(range(k, x.rank)):
        return False
    n_rows, n_cols = math.prod(x.shape[:k]), math.prod(x.shape[k:])
    if n_rows > SPLIT_ROWS or n_cols < SPLIT_COLS:
        return False
    parts = SPLIT_PARTS
    while parts > 1 and n_cols % parts:
        parts //= 2
    if parts < 8:
        return False
    flat = ctx.contiguous(x).reshape((n_rows * parts, n_cols // parts))
    widen = mode in ("sum", "mean") and x.dtype in (DType.FP16, DType.BF16)
    partial = ctx.temp(DType.FP32 if widen else x.dtype, (n_rows, parts))
    row_reduce(ctx, flat, [1], mode, partial.reshape((n_rows * parts,)))
    row_reduce(ctx, partial, [1], mode, out)
    return True


def _declare_reduction(name: str, mode: str, fn, identity) -> None:
    d = op(name, since=11, kind=Kind.ROW, host_inputs=(1,), samples=_REDUCE_SAMPLES)(_reduce_infer)
    d.reference(_reduce_reference(fn, identity))
    d.lower(_reduce_lower(mode))


for _name, (_mode, _fn, _identity) in REDUCTIONS.items():
    _declare_reduction(_name, _mode, _fn, _identity)


# ---- ReduceProd / L1 / L2 / LogSum / LogSumExp / SumSquare ------------------------------------
# Opset 13 gives the axes as an attribute, opset 18 as an input (with noop_with_empty_axes): the
# shared inference above takes both. With empty axes and noop_with_empty_axes=1 the reduction is the
# identity but the composite's elementwise step still runs (opset 18's wording; onnxruntime does so):
# ReduceLogSum gives log(x), ReduceSumSquare x*x, ReduceL1 and ReduceL2 |x|.

def _logsumexp_ref(x, axis, keepdims):
    m = np.max(x, axis=axis, keepdims=True, initial=-np.inf)
    m = np.where(np.isinf(m), 0, m)  # as onnxruntime: an infinite max shifts by 0
    with np.errstate(divide="ignore"):
        r = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return r if keepdims else np.squeeze(r, axis)


COMPOSITES = {
    # name: (template mode, numpy reduction (x, axis, keepdims), elementwise step of the noop form:
    #        numpy, Triton over x0)
    "ReduceProd": ("prod", lambda x, a, k: np.prod(x, axis=a, keepdims=k), (lambda x: x, "x0")),
    "ReduceL1": ("l1", lambda x, a, k: np.sum(np.abs(x), axis=a, keepdims=k), (np.abs, "tl.abs(x0)")),
    "ReduceL2": ("l2", lambda x, a, k: np.sqrt(np.sum(x * x, axis=a, keepdims=k)), (np.abs, "tl.abs(x0)")),
    "ReduceSumSquare": ("sumsquare", lambda x, a, k: np.sum(x * x, axis=a, keepdims=k), (lambda x: x * x, "x0 * x0")),
    "ReduceLogSum": ("logsum", lambda x, a, k: np.log(np.sum(x, axis=a, keepdims=k)), (np.log, "tl.log({x})")),
    "ReduceLogSumExp": ("logsumexp", _logsumexp_ref, (lambda x: x, "x0")),
}

_COMPOSITE_SAMPLES = [
    Sample([Rand((2, 3, 5), None, 0.2, 2.0)]),
    Sample([Rand((2, 3, 5), None, 0.2, 2.0), np.array([1], np.int64)]),
    Sample([Rand((2, 3, 4, 5), None, 0.2, 2.0), np.array([0, -1], np.int64)], {"keepdims": 0}),
    Sample([Rand((3, 4), None, 0.2, 2.0), np.array([], np.int64)], {"noop_with_empty_axes": 1}),
    Sample([Rand((2, 3, 5), None, 0.2, 2.0)], {"axes": [1]}, opset=13),
    Sample([Rand((2, 3, 5), None, 0.2, 2.0)], {"axes": [0, -1], "keepdims": 0}, opset=13),
    # a row longer than the interpreter's block (4096), not a power of two: the kernel loops
    Sample([Rand((3, 5000), None, 0.95, 1.05), np.array([1], np.int64)], {"keepdims": 0}, float_types=("fp32",)),
]
_COMPOSITE_INT_SAMPLE = Sample([Rand((2, 3, 4), "int32", -4, 4), np.array([1], np.int64)], float_types=("-",))
_LOGSUMEXP_SAMPLES = [
    Sample([Rand((4, 37), None, 200, 1000), np.array([1], np.int64)]),  # exp overflows unshifted
    Sample([Rand((4, 37), None, -1000, -200), np.array([1], np.int64)]),  # exp underflows unshifted
    Sample([np.array([[np.inf, 1, 2], [-np.inf, -np.inf, -np.inf], [3, -np.inf, 1]], np.float32),
            np.array([1], np.int64)]),
    Sample([Rand((3, 5000), None, -50, 300), np.array([1], np.int64)], {"keepdims": 0}),
]


def _composite_samples(mode: str) -> list:
    if mode == "logsumexp":
        return _COMPOSITE_SAMPLES + _LOGSUMEXP_SAMPLES
    if mode in ("prod", "l1", "l2", "sumsquare"):
        return _COMPOSITE_SAMPLES + [_COMPOSITE_INT_SAMPLE]
    return list(_COMPOSITE_SAMPLES)


def _composite_infer(x: TensorType, axes_in=None, *, axes=None, keepdims: int = 1,
                     noop_with_empty_axes: int = 0) -> TensorType:
    if x.dtype is DType.BOOL:
        raise ModelError("a composite reduction (ReduceProd, ReduceL1, ...) of bool")
    return _reduce_infer(x, axes_in, axes=axes, keepdims=keepdims, noop_with_empty_axes=noop_with_empty_axes)


def _composite_reference(fn, noop):
    def reference(x, axes_in=None, *, axes=None, keepdims=1, noop_with_empty_axes=0):
        red = reduced_axes(x.ndim, axes_in, axes, noop_with_empty_axes)
        with np.errstate(divide="ignore", invalid="ignore"):
            return noop(x) if red is None else fn(x, tuple(red), bool(keepdims))

    return reference


def _composite_lower(mode: str, noop_expr: str):
    def lower(ctx, x, axes_in=None, *, axes=None, keepdims=1, noop_with_empty_axes=0):
        red = reduced_axes(x.rank, axes_in, axes, noop_with_empty_axes)
        if red is None:
            arg = "x0" if x.dtype.is_float else "x0.to(tl.float64)"  # log of an integer
            ctx.pointwise(noop_expr.format(x=arg), [x], ctx.outputs[0])
            return
        row_reduce(ctx, x, red, mode, ctx.outputs[0])

    return lower


def _declare_composite(name: str, mode: str, fn, noop) -> None:
    d = op(name, since=13, kind=Kind.ROW, host_inputs=(1,), samples=_composite_samples(mode))(_composite_infer)
    d.reference(_composite_reference(fn, noop[0]))
    d.lower(_composite_lower(mode, noop[1]))


for _name, (_mode, _fn, _noop) in COMPOSITES.items():
    _declare_composite(_name, _mode, _fn, _noop)


# ---- ArgMax / ArgMin ---------------------------------------------------------------------------
# onnxruntime scans each row in order, replacing the running best only by a strictly greater
# (select_last_index: greater or equal) value: NaN after the first element never wins, and a row
# that starts with NaN gives 0. The kernel and the reference do the same.

def _nan_rows() -> np.ndarray:
    rng = np.random.default_rng(14)
    x = rng.integers(-3, 4, size=(4, 4500)).astype(np.float32)  # many ties, across blocks
    x[rng.random(x.shape) < 0.2] = np.nan
    x[0, 0] = x[2, 0] = np.nan
    return x


_ARG_SAMPLES = [
    Sample([Rand((2, 3, 5))]),
    Sample([Rand((2, 3, 5))], {"axis": -1, "keepdims": 0}),
    Sample([Rand((4, 3, 5))], {"axis": 1, "select_last_index": 1}),
    Sample([np.array([[1, np.nan, 3, np.nan, 3], [np.nan, 1, 2, 5, 5], [2, 2, 2, 2, 2], [np.nan] * 5], np.float32)],
           {"axis": 1}),
    Sample([np.array([[1, np.nan, 3, np.nan, 3], [np.nan, 1, 2, 5, 5], [2, 2, 2, 2, 2], [np.nan] * 5], np.float32)],
           {"axis": 1, "select_last_index": 1}),
    Sample([Rand((3, 5000))], {"axis": 1}),
    Sample([_nan_rows()], {"axis": 1, "keepdims": 0}),
    Sample([_nan_rows()], {"axis": 1, "keepdims": 0, "select_last_index": 1}),
    Sample([Rand((3, 4100), "int32", -3, 3)], {"axis": 1, "select_last_index": 1}, float_types=("-",)),
    Sample([Rand((5, 4), "int64", -3, 3)], {"axis": 0}, float_types=("-",)),
]


def _arg_infer(x: TensorType, *, axis: int = 0, keepdims: int = 1, select_last_index: int = 0) -> TensorType:
    a = norm_axis(axis, x.rank)
    if x.dtype is DType.BOOL:
        raise ModelError("ArgMax/ArgMin of bool")
    if isinstance(x.shape[a], int) and x.shape[a] == 0:
        raise ShapeError(f"ArgMax/ArgMin over axis {axis} of size 0")
    shape = tuple(1 if i == a else d for i, d in enumerate(x.shape)) if keepdims else x.shape[:a] + x.shape[a + 1:]
    return TensorType(DType.INT64, shape)


def _arg_reference(is_max: bool):
    def reference(x, *, axis=0, keepdims=1, select_last_index=0):
        a = norm_axis(axis, x.ndim)
        find = np.argmax if is_max else np.argmin
        xs = np.where(np.isnan(x), -np.inf if is_max else np.inf, x) if x.dtype.kind == "f" else x
        if select_last_index:
            idx = x.shape[a] - 1 - find(np.flip(xs, a), axis=a)
        else:
            idx = find(xs, axis=a)
        if x.dtype.kind == "f":
            idx = np.where(np.isnan(np.take(x, 0, axis=a)), 0, idx)
        idx = idx.astype(np.int64)
        return np.expand_dims(idx, a) if keepdims else idx

    return reference


def _arg_lower(mode: str):
    def lower(ctx, x, *, axis=0, keepdims=1, select_last_index=0):
        suffix = "_last" if select_last_index else ""
        row_reduce(ctx, x, [norm_axis(axis, x.rank)], mode + suffix, ctx.outputs[0])

    return lower


for _name, _mode in (("ArgMax", "argmax"), ("ArgMin", "argmin")):
    _d = op(_name, since=13, kind=Kind.ROW, samples=_ARG_SAMPLES)(_arg_infer)
    _d.reference(_arg_reference(_mode == "argmax"))
    _d.lower(_arg_lower(_mode))


# ---- Hardmax -----------------------------------------------------------------------------------

@op("Hardmax", since=13, kind=Kind.ROW,
    samples=[Sample([Rand((3, 4, 5))]), Sample([Rand((3, 4, 5))], {"axis": 0}),
             Sample([np.array([[1, 3, 3, 2], [0, -1, -1, 0]], np.float32)], {"axis": 1}),
             Sample([Rand((2, 3000))], float_types=("fp32",))])
def hardmax(x: TensorType, *, axis: int = -1) -> TensorType:
    a = norm_axis(axis, x.rank)
    if not x.dtype.is_float:
        raise ModelError(f"Hardmax of {x.dtype.short} (a float type is needed)")
    if isinstance(x.shape[a], int) and x.shape[a] == 0:
        raise ShapeError(f"Hardmax over axis {axis} of size 0")
    return x


@hardmax.reference
def _(x, *, axis=-1):
    a = norm_axis(axis, x.ndim)
    first = _arg_reference(True)(x, axis=a, keepdims=1)  # the first maximum (NaN as ArgMax takes it)
    return (np.arange(x.shape[a]).reshape([-1 if i == a else 1 for i in range(x.ndim)]) == first).astype(x.dtype)


@hardmax.lower
def _(ctx, x, *, axis=-1):
    """ArgMax's kernel into a temporary, then 1 where an element's index along the axis is it."""
    a = norm_axis(axis, x.rank)
    out = ctx.outputs[0]  # contiguous: its flat index gives the position along the axis
    first = ctx.temp(DType.INT64, tuple(1 if i == a else d for i, d in enumerate(x.shape)))
    row_reduce(ctx, x, [a], "argmax", first)
    inner = math.prod(x.shape[a + 1:])
    ctx.pointwise("tl.where(((idx // s0) % s1) == x0, 1.0, 0.0)", [first], out, (inner, x.shape[a]))


# ---- LpNormalization ---------------------------------------------------------------------------

@op("LpNormalization", since=1, kind=Kind.ROW,
    samples=[Sample([Rand((3, 4, 5))]), Sample([Rand((3, 4, 5))], {"axis": 0, "p": 1}),
             Sample([np.array([[0, 0], [3, -4]], np.float32)], {"axis": 1, "p": 2}),
             Sample([Rand((2, 3000))], {"p": 1}, float_types=("fp32",))])
def lp_normalization(x: TensorType, *, axis: int = -1, p: int = 2) -> TensorType:
    norm_axis(axis, x.rank)
    if p not in (1, 2):
        raise ModelError(f"LpNormalization p={p} (1 or 2 is needed)")
    if not x.dtype.is_float:
        raise ModelError(f"LpNormalization of {x.dtype.short} (a float type is needed)")
    return x


@lp_normalization.reference
def _(x, *, axis=-1, p=2):
    a = norm_axis(axis, x.ndim)
    norm = np.sum(np.abs(x), axis=a, keepdims=True) if p == 1 else np.sqrt(np.sum(x * x, axis=a, keepdims=True))
    with np.errstate(all="ignore"):
        return np.where(norm == 0, 0, x / norm).astype(x.dtype)  # a zero row stays zero (0 / 0 = 0)


@lp_normalization.lower
def _(ctx, x, *, axis=-1, p=2):
    """ReduceL1's / ReduceL2's kernel into a temporary (fp32), then x / norm (0 where the norm is 0)."""
    a = norm_axis(axis, x.rank)
    norm = ctx.temp(DType.FP32 if x.dtype is not DType.FP64 else x.dtype,
                    tuple(1 if i == a else d for i, d in enumerate(x.shape)))
    row_reduce(ctx, x, [a], "l1" if p == 1 else "l2", norm)
    ctx.pointwise("tl.where(x1 == 0, 0.0, x0 / x1)", [x, norm], ctx.outputs[0])


# ---- Softmax / LogSoftmax ----------------------------------------------------------------------

_SOFTMAX_SAMPLES = [
    Sample([Rand((2, 3, 5))]),
    Sample([Rand((2, 3, 5), None, -20, 20)], {"axis": 1}),
    Sample([Rand((4, 7))], {"axis": 0}),
    Sample([Rand((2, 6000), None, -8, 8)]),
]


def _softmax_infer(x: TensorType, *, axis: int = -1) -> TensorType:
    norm_axis(axis, x.rank)
    if not x.dtype.is_float:
        raise ModelError(f"softmax of {x.dtype.short} (a float type is needed)")
    return x


def _log_softmax_ref(x, *, axis=-1):
    shifted = x - x.max(axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis, keepdims=True))


def _softmax_ref(x, *, axis=-1):
    return np.exp(_log_softmax_ref(x, axis=axis))


def _declare_softmax(name: str, mode: str, ref) -> None:
    def lower(ctx, x, *, axis=-1):
        row_reduce(ctx, x, [norm_axis(axis, x.rank)], mode, ctx.outputs[0])

    d = op(name, since=13, kind=Kind.ROW, samples=_SOFTMAX_SAMPLES)(_softmax_infer)
    d.reference(ref)
    d.lower(lower)


_declare_softmax("Softmax", "softmax", _softmax_ref)
_declare_softmax("LogSoftmax", "logsoftmax", _log_softmax_ref)


# ---- LayerNormalization ------------------------------------------------------------------------

@op("LayerNormalization", since=17, kind=Kind.ROW,
    samples=[Sample([Rand((2, 3, 5)), Rand((5,)), Rand((5,))]),
             Sample([Rand((2, 3, 4)), Rand((3, 4))], {"axis": 1, "epsilon": 1e-3}, outputs=3),
             Sample([Rand((3, 4, 2)), Rand((4, 2)), Rand((4, 2))], {"axis": -2}, outputs=2),
             Sample([Rand((2, 5000)), Rand((5000,)), Rand((5000,))], outputs=3)])
def layer_norm(x: TensorType, scale: TensorType, bias: TensorType = None, *, axis: int = -1,
               epsilon: float = 1e-5, stash_type: int = 1, _outputs: int = 1):
    a = norm_axis(axis, x.rank)
    if not x.dtype.is_float:
        raise ModelError(f"LayerNormalization of {x.dtype.short} (a float type is needed)")
    try:
        stash = DType.from_onnx(stash_type)
    except KeyError:
        raise UnsupportedOpError(f"LayerNormalization stash_type {stash_type} is not supported") from None
    normalized = x.shape[a:]
    for name, t in (("scale", scale), ("bias", bias)):
        if t is not None and not _broadcasts_to(t.shape, normalized):
            raise ShapeError(f"LayerNormalization {name} of shape {list(t.shape)} does not broadcast to the "
                             f"normalized shape {list(normalized)} (axis {axis} of {list(x.shape)})")
    stats = TensorType(stash, x.shape[:a] + (1,) * (x.rank - a))
    return (x, stats, stats)[:_outputs]


def _broadcasts_to(shape: tuple, target: tuple) -> bool:
    """ONNX's unidirectional broadcast: ``shape`` right-aligned onto ``target``, each dim equal or 1
    (symbols compare by name; a symbol against anything else is left to run time)."""
    if len(shape) > len(target):
        return False
    for d, t in zip(reversed(shape), reversed(target)):
        if isinstance(d, int) and isinstance(t, int) and d not in (1, t):
            return False
    return True


@layer_norm.reference
def _(x, scale, bias=None, *, axis=-1, epsilon=1e-5, stash_type=1, _outputs=1):
    axes = tuple(range(norm_axis(axis, x.ndim), x.ndim))
    mean = x.mean(axes, keepdims=True)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(axes, keepdims=True) + epsilon)
    y = (x - mean) * rstd * scale + (0 if bias is None else bias)
    return (y, mean, rstd)[:_outputs]


@layer_norm.lower
def _(ctx, x, scale, bias=None, *, axis=-1, epsilon=1e-5, stash_type=1):
    a = norm_axis(axis, x.rank)
    row_reduce(ctx, x, list(range(a, x.rank)), "layernorm", ctx.outputs[0], scale=scale, bias=bias,
               eps=epsilon, stats=_stats_views(ctx))


def _stats_views(ctx) -> tuple:
    """(Mean, InvStdDev) views for the kernel: the node's outputs, temporaries for omitted ones;
    empty where the node wants neither (the kernel then stores no statistics)."""
    wanted = (ctx.outputs[1:] + [None, None])[:2]
    if all(o is None for o in wanted):
        return ()
    t = ctx.out_types[1]
    return tuple(o if o is not None else ctx.temp(t.dtype, t.shape) for o in wanted)


# ---- rtxjit.RMSNorm ----------------------------------------------------------------------------

@op("rtxjit.RMSNorm", since=1, kind=Kind.ROW)
def rms_norm(x: TensorType, scale: TensorType = None, *, axis: int = -1, epsilon: float = 1e-5) -> TensorType:
    """``x * rsqrt(mean(x^2 over axes axis..) + epsilon) * scale``; ``scale`` broadcasts to the
    normalized dims (ONNX's RMSNormalization with stash_type 1: statistics in fp32)."""
    norm_axis(axis, x.rank)
    if not x.dtype.is_float:
        raise ModelError(f"rtxjit.RMSNorm of {x.dtype.short} (a float type is needed)")
    if scale is not None and scale.dtype is not x.dtype:
        raise ModelError(f"rtxjit.RMSNorm: scale of {scale.dtype.short} for x of {x.dtype.short}")
    return x


@rms_norm.reference
def _(x, scale=None, *, axis=-1, epsilon=1e-5):
    axes = tuple(range(norm_axis(axis, x.ndim), x.ndim))
    y = x / np.sqrt((x * x).mean(axes, keepdims=True) + epsilon)
    return y if scale is None else y * scale


@rms_norm.lower
def _(ctx, x, scale=None, *, axis=-1, epsilon=1e-5):
    a = norm_axis(axis, x.rank)
    row_reduce(ctx, x, list(range(a, x.rank)), "rmsnorm", ctx.outputs[0], scale=scale, eps=epsilon)


@op("RMSNormalization", since=23, kind=Kind.ROW,
    samples=[Sample([Rand((2, 3, 16)), Rand((16,))], opset=23),
             Sample([Rand((2, 4, 5)), Rand((4, 5))], {"axis": 1, "epsilon": 1e-3}, opset=23)])
def rms_normalization(x: TensorType, scale: TensorType, *, axis: int = -1, epsilon: float = 1e-5,
                      stash_type: int = 1) -> TensorType:
    """ONNX's own RMSNormalization (opset 23): the same kernel as the fused rtxjit.RMSNorm."""
    if stash_type != 1:
        raise UnsupportedOpError(f"RMSNormalization stash_type={stash_type}: statistics run in fp32 only")
    return rms_norm.infer_fn(x, scale, axis=axis, epsilon=epsilon)


@rms_normalization.reference
def _(x, scale, *, axis=-1, epsilon=1e-5, stash_type=1):
    return rms_norm.reference_fn(x, scale, axis=axis, epsilon=epsilon)


@rms_normalization.lower
def _(ctx, x, scale, *, axis=-1, epsilon=1e-5, stash_type=1):
    rms_norm.lower_fn(ctx, x, scale, axis=axis, epsilon=epsilon)
