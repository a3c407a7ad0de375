"""Ops along one axis that are neither a reduction to one value nor elementwise: CumSum (a scan,
``codegen/templates/scan.py``) and TopK (a per-row selection, ``codegen/templates/topk.py``).
Both take a host input (CumSum's axis, TopK's K), as TensorRT takes shape tensors."""

from __future__ import annotations

import math

import numpy as np

from rtxjit.codegen.templates.scan import render_cumsum
from rtxjit.codegen.templates.topk import render_topk
from rtxjit.codegen.view import collapse
from rtxjit.errors import ModelError, ShapeError
from rtxjit.ops.shape import norm_axis
from rtxjit.ir.registry import Kind, Rand, Sample, known, op
from rtxjit.ir.types import DType, TensorType
from rtxjit.ir.symint import pow2


def _scalar(value, what: str) -> int:
    a = np.asarray(value)
    if a.size != 1 or a.dtype.kind not in "iu":
        raise ModelError(f"{what} must be one integer, got {a.dtype} of shape {list(a.shape)}")
    return int(a.reshape(-1)[0])




def _blocks(n_rows: int, n_cols: int, interpret: bool, cap_c: int) -> tuple:
    """``(BLOCK_R, BLOCK_C)``: a row up to ``cap_c`` in one block, short rows packed into tiles of
    about 4096 elements (32768 on the interpreter, whose cost is per program)."""
    tile = 32768 if interpret else 4096
    block_c = min(pow2(max(n_cols, 1)), cap_c)
    block_r = min(max(tile // block_c, 1), pow2(max(n_rows, 1)))
    return block_r, block_c


def _rows_view(axis: int, *views):
    """Each view's kept dims collapsed (one stride set per view) and its stride along ``axis``."""
    rank = views[0].rank
    kept = [d for d in range(rank) if d != axis]
    kshape, kstrides = collapse([views[0].shape[d] for d in kept], *[[v.strides[d] for d in kept] for v in views])
    return list(kshape), [list(s) for s in kstrides], [v.strides[axis] for v in views]


# ---- CumSum ------------------------------------------------------------------------------------

SCAN_CAP = 1024  # columns per block; longer rows loop with a carry

_CUMSUM_SAMPLES = [
    Sample([Rand((2, 3, 5)), np.array(1, np.int64)]),
    Sample([Rand((2, 3, 5)), np.array(0, np.int32)], {"exclusive": 1}),
    Sample([Rand((2, 3, 5)), np.array(-1, np.int64)], {"reverse": 1}),
    Sample([Rand((4, 7)), np.array([1], np.int64)], {"exclusive": 1, "reverse": 1}),
    Sample([Rand((9,)), np.array(0, np.int64)]),
    # rows longer than a block, not a power of two: block-by-block with a carry (positive values:
    # partial sums near zero would compare float rounding, not the scan)
    Sample([Rand((3, 2500), None, 0, 1), np.array(1, np.int64)], float_types=("fp32",)),
    Sample([Rand((2500, 3), None, 0, 1), np.array(0, np.int64)], {"exclusive": 1, "reverse": 1},
           float_types=("fp32",)),
    Sample([np.array([[np.inf, 1, 2, -1]], np.float32), np.array(1, np.int64)], {"exclusive": 1}),
    Sample([Rand((3, 2100), "int32", -9, 9), np.array(1, np.int64)], {"reverse": 1}, float_types=("-",)),
    Sample([Rand((2, 3, 5), "int64", -9, 9), np.array(1, np.int64)], {"exclusive": 1}, float_types=("-",)),
]


def _scan_infer(name: str):
    def infer(x: TensorType, axis, *, exclusive: int = 0, reverse: int = 0) -> TensorType:
        if x.dtype is DType.BOOL or x.dtype in (DType.INT8, DType.UINT8):
            raise ModelError(f"{name} of {x.dtype.short} (float, int32 or int64 is needed)")
        if known(axis):
            norm_axis(_scalar(axis, f"{name} axis"), x.rank)
        return x

    return infer


def _scan_reference(name: str, prod: bool = False):
    """numpy's cumsum / cumprod with ONNX's exclusive (the identity first) and reverse."""
    def reference(x, axis, *, exclusive=0, reverse=0):
        a = norm_axis(_scalar(axis, f"{name} axis"), x.ndim)
        y = np.flip(x, a) if reverse else x
        out = (np.cumprod if prod else np.cumsum)(y, axis=a, dtype=x.dtype)
        if exclusive and out.shape[a]:
            first = (np.ones_like if prod else np.zeros_like)(np.take(out, [0], axis=a))
            out = np.concatenate([first, np.take(out, range(out.shape[a] - 1), axis=a)], axis=a)
        return np.flip(out, a) if reverse else out

    return reference


cumsum = op("CumSum", since=11, kind=Kind.ROW, host_inputs=(1,), samples=_CUMSUM_SAMPLES)(_scan_infer("CumSum"))
cumsum.reference(_scan_reference("CumSum"))


@cumsum.lower
def _(ctx, x, axis, *, exclusive=0, reverse=0):
    _lower_scan(ctx, x, axis, exclusive, reverse)


def _lower_scan(ctx, x, axis, exclusive: int, reverse: int, prod: bool = False) -> None:
    """CumSum's or (``prod``) CumProd's kernel: rows of the kept dims, the scanned axis as columns."""
    out = ctx.outputs[0]
    if x.rank == 0:
        ctx.copy(x, out)  # a scalar's scan is itself
        return
    a = norm_axis(_scalar(axis, "CumProd axis" if prod else "CumSum axis"), x.rank)
    kshape, (kst, okst), (cst, ocst) = _rows_view(a, x, out)
    n_cols = x.shape[a]
    n_rows = math.prod(x.shape) // max(n_cols, 1) if n_cols else 0
    src = render_cumsum(x.dtype, out.dtype, len(kshape), exclusive=bool(exclusive), reverse=bool(reverse),
                        wide=ctx.needs_wide(x, out), prod=prod)
    block_r, block_c = _blocks(n_rows, n_cols, ctx.interpret, SCAN_CAP)
    args = [ctx.ptr(x), x.offset, ctx.ptr(out), out.offset, n_rows, n_cols, *kshape, *kst, *okst, cst, ocst]
    generic = (-(-n_rows // 4),), {"BLOCK_R": 4, "BLOCK_C": SCAN_CAP}
    ctx.launch(src, (-(-n_rows // block_r),), args, generic=generic, BLOCK_R=block_r, BLOCK_C=block_c)


# ---- CumProd -----------------------------------------------------------------------------------

_CUMPROD_SAMPLES = [
    Sample([Rand((2, 3, 5), None, 0.5, 1.5), np.array(1, np.int64)]),
    Sample([Rand((2, 3, 5), None, -1.5, 1.5), np.array(0, np.int32)], {"exclusive": 1}),
    Sample([Rand((4, 7), None, 0.5, 1.5), np.array([-1], np.int64)], {"exclusive": 1, "reverse": 1}),
    # rows longer than a block: the carry is the block's last running product
    Sample([Rand((3, 2100), None, 0.999, 1.001), np.array(1, np.int64)], {"reverse": 1}, float_types=("fp32",)),
    Sample([np.array([[np.inf, 0, 2, -1], [np.nan, 1, 2, 3]], np.float32), np.array(1, np.int64)]),
    Sample([Rand((2, 3, 5), "int64", -3, 3), np.array(2, np.int64)], float_types=("-",)),
]


cumprod = op("CumProd", since=26, kind=Kind.ROW, host_inputs=(1,), samples=_CUMPROD_SAMPLES)(_scan_infer("CumProd"))
cumprod.reference(_scan_reference("CumProd", prod=True))


@cumprod.lower
def _(ctx, x, axis, *, exclusive=0, reverse=0):
    _lower_scan(ctx, x, axis, exclusive, reverse, prod=True)


# ---- TopK --------------------------------------------------------------------------------------

TOPK_CAP = 1024  # columns held in registers; longer rows are walked block by block per selection


def _ties_rows() -> np.ndarray:
    rng = np.random.default_rng(11)
    x = rng.integers(-3, 4, size=(3, 1500)).astype(np.float32)  # many ties, across blocks
    x[rng.random(x.shape) < 0.1] = np.nan
    return x


_TOPK_SAMPLES = [
    Sample([Rand((3, 7)), np.array([3], np.int64)], outputs=2),
    Sample([Rand((2, 6, 3)), np.array([2], np.int64)], {"axis": 1, "largest": 0}, outputs=2),
    Sample([Rand((5, 4)), np.array([5], np.int64)], {"axis": 0}, outputs=2),
    Sample([Rand((4, 9)), np.array([1], np.int64)], {"sorted": 0}, outputs=2),
    Sample([np.array([[1, np.nan, 3, np.nan, 3, 0], [-0.0, 0.0, np.inf, -np.inf, 2, 2]], np.float32),
            np.array([4], np.int64)], outputs=2),
    Sample([np.array([[1, np.nan, 3, np.nan, 3, 0], [-0.0, 0.0, np.inf, -np.inf, 2, 2]], np.float32),
            np.array([4], np.int64)], {"largest": 0}, outputs=2),
    # rows longer than a block (1024), not a power of two, with ties and NaN across blocks
    Sample([_ties_rows(), np.array([6], np.int64)], outputs=2),
    Sample([_ties_rows(), np.array([6], np.int64)], {"largest": 0}, outputs=2),
    Sample([Rand((2, 3, 5), "int32", -3, 3), np.array([4], np.int64)], {"axis": 2}, outputs=2, float_types=("-",)),
    Sample([Rand((3, 4), "int64", -3, 3), np.array([2], np.int64)], {"axis": 0, "largest": 0}, outputs=2,
           float_types=("-",)),
]


@op("TopK", since=11, kind=Kind.ROW, host_inputs=(1,), samples=_TOPK_SAMPLES)
def topk(x: TensorType, k, *, axis: int = -1, largest: int = 1, sorted: int = 1) -> tuple:
    a = norm_axis(axis, x.rank)
    if x.rank == 0:
        raise ShapeError("TopK of a scalar (rank 0)")
    if x.dtype is DType.BOOL:
        raise ModelError("TopK of bool")
    if known(k):
        kv = _scalar(k, "TopK K")
        n = x.shape[a]
        if kv < 0 or (isinstance(n, int) and kv > n):
            raise ShapeError(f"TopK K={kv} is outside [0, {n}] (the size of axis {axis})")
        dim = kv
    else:
        dim = "?"
    shape = x.shape[:a] + (dim,) + x.shape[a + 1:]
    return TensorType(x.dtype, shape), TensorType(DType.INT64, shape)


@topk.reference
def _(x, k, *, axis=-1, largest=1, sorted=1):
    a = norm_axis(axis, x.ndim)
    kv = _scalar(k, "TopK K")
    moved = np.moveaxis(x, a, -1)
    if x.dtype.kind == "f":
        nan = np.isnan(moved)
        # lexsort: last key first; NaN ranks above every number (onnxruntime), ties by index
        key = np.where(nan, 0, -moved if largest else moved)
        rank_nan = ~nan if largest else nan
        order = np.lexsort((np.broadcast_to(np.arange(moved.shape[-1]), moved.shape), key, rank_nan), axis=-1)
    else:
        key = -moved.astype(np.float64) if largest else moved.astype(np.float64)
        order = np.argsort(key, axis=-1, kind="stable")
    idx = order[..., :kv]
    vals = np.take_along_axis(moved, idx, -1)
    return np.moveaxis(vals, -1, a), np.moveaxis(idx.astype(np.int64), -1, a)


@topk.lower
def _(ctx, x, k, *, axis=-1, largest=1, sorted=1):
    # sorted=0 leaves the order to the implementation: the sorted order is one of them
    a = norm_axis(axis, x.rank)
    kv = _scalar(k, "TopK K")
    vals, idx = [o if o is not None else ctx.temp(t.dtype, t.shape) for o, t in zip(ctx.outputs, ctx.out_types)]
    n_cols = x.shape[a]
    n_rows = math.prod(x.shape) // n_cols if n_cols else 0
    if kv == 0 or n_rows == 0:
        return
    kshape, (kst, vkst, ikst), (cst, vcst, icst) = _rows_view(a, x, vals, idx)
    src = render_topk(x.dtype, len(kshape), largest=bool(largest), wide=ctx.needs_wide(x, vals, idx))
    block_r, block_c = _blocks(n_rows, n_cols, ctx.interpret, TOPK_CAP)
    args = [ctx.ptr(x), x.offset, ctx.ptr(vals), vals.offset, ctx.ptr(idx), idx.offset, n_rows, n_cols, kv,
            *kshape, *kst, *vkst, *ikst, cst, vcst, icst]
    generic = (-(-n_rows // 4),), {"BLOCK_R": 4, "BLOCK_C": TOPK_CAP, "ONE_BLOCK": False}
    ctx.launch(src, (-(-n_rows // block_r),), args, generic=generic, BLOCK_R=block_r, BLOCK_C=block_c,
               ONE_BLOCK=n_cols <= block_c)
