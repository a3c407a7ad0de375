"""Indexing: GatherND, ScatterND, ScatterElements (codegen/templates/indexing.py), and Trilu and Tile
(a pointwise mask and a broadcast copy).

Indices: a negative index counts from the end; one still out of range after that is masked by the
kernels, never followed: GatherND gives 0 for it, the scatters skip that update (the output keeps
the data there). The references do the same, so host evaluation agrees with the kernels.

How the scatters stay deterministic with duplicate indices is explained in the template's header:
ScatterND "none" lets the last tuple win through an integer atomic claim; its integer add/max/min
use atomics (exact in any order); other reductions walk the tuples in order; ScatterElements runs one
program per output row that walks the row's updates in order.
"""

from __future__ import annotations

import math

import numpy as np

from rtxjit.codegen.templates.indexing import (REDUCTIONS, render_gather_nd, render_scatter_elements,
                                               render_scatter_nd, render_scatter_nd_claim)
from rtxjit.codegen.view import View, collapse, contiguous_strides
from rtxjit.errors import ModelError, ShapeError, UnsupportedOpError
from rtxjit.ops.shape import norm_axis
from rtxjit.ir.registry import Kind, Rand, Sample, known, op
from rtxjit.ir.types import DType, TensorType, dim_op

BLOCK = 1024  # elements (or rows, or slice elements) per program
WIDE_LIMIT = 2**31 - 1
INDEX_TYPES = ("int64", "int32")


def _check_index_dtype(op_name: str, indices: TensorType) -> None:
    if indices.dtype.short not in INDEX_TYPES:
        raise ModelError(f"{op_name} indices must be int32 or int64, got {indices.dtype.short}")


def _known_eq(a, b) -> bool:
    """False only where two dims are both known and differ."""
    return not (isinstance(a, int) and isinstance(b, int) and a != b)


def _tuple_len(op_name: str, indices: TensorType, most: int) -> int:
    if indices.rank < 1:
        raise ShapeError(f"{op_name} indices must have rank >= 1, got {indices}")
    m = indices.shape[-1]
    if not isinstance(m, int):
        raise ShapeError(f"{op_name}: the last dim of the indices ({m}) must be known: it sets the output rank")
    if not 1 <= m <= most:
        raise ShapeError(f"{op_name}: index tuples of length {m}; the data allows 1 to {most}")
    return m


def _wrap(idx: np.ndarray, dims) -> tuple:
    """Indices wrapped as ONNX says, and whether each tuple (last axis) is in range."""
    dims = np.asarray(dims, np.int64)
    idx = np.asarray(idx).astype(np.int64)
    idx = np.where(idx < 0, idx + dims, idx)
    return idx, np.all((idx >= 0) & (idx < dims), axis=-1)


def _wide(ctx, n: int, *views: View) -> bool:
    return n > WIDE_LIMIT or ctx.needs_wide(*views)


def _pow2_block(n: int, cap: int = BLOCK) -> int:
    b = 16
    while b < n and b < cap:
        b *= 2
    return b


# ---- GatherND ----------------------------------------------------------------------------------

@op("GatherND", since=12, kind=Kind.MOVEMENT,
    samples=[Sample([Rand((2, 3, 4)), np.array([[0, 1], [1, -1], [1, 2]], np.int64)]),
             Sample([Rand((2, 3, 4)), np.array([[[1], [0], [2], [-1], [1]], [[2], [2], [0], [1], [0]]], np.int32)],
                    {"batch_dims": 1}),
             Sample([Rand((3, 4)), np.array([[-1, -4], [2, 3], [0, 0]], np.int64)]),
             # the attention-mask pattern of torch's dynamo exporter: data [B, S], indices [B, S, S, 2]
             Sample([Rand((2, 9)), np.stack(np.broadcast_arrays(np.arange(2)[:, None, None], np.arange(9)[None, None, :],
                                                                np.zeros((1, 9, 1), np.int64))[:2], axis=-1)]),
             Sample([Rand((2, 3, 2, 5)), np.array([[[[1, 0]], [[0, 1]], [[-1, -2]]], [[[2, 1]], [[1, 1]], [[0, 0]]]],
                                                  np.int64)], {"batch_dims": 1}),
             Sample([Rand((3, 4), "int64", -50, 50), np.array([[2], [0]], np.int64)], float_types=("fp32",))])
def gather_nd(data: TensorType, indices: TensorType, *, batch_dims: int = 0) -> TensorType:
    _check_index_dtype("GatherND", indices)
    b = batch_dims
    if not 0 <= b < min(data.rank, indices.rank):
        raise ShapeError(f"GatherND batch_dims {b} must be below the ranks of data {data} and indices {indices}")
    m = _tuple_len("GatherND", indices, data.rank - b)
    for d in range(b):
        if not _known_eq(data.shape[d], indices.shape[d]):
            raise ShapeError(f"GatherND batch dim {d}: data {data} and indices {indices} differ")
    return data.with_shape(indices.shape[:-1] + data.shape[b + m:])


@gather_nd.reference
def _(data, indices, *, batch_dims=0):
    b, m = batch_dims, indices.shape[-1]
    nb = math.prod(data.shape[:b])
    sliced = data.shape[b + m:]
    flat = data.reshape((nb,) + data.shape[b:])
    idx, ok = _wrap(indices.reshape(nb, -1, m) if indices.size else indices.reshape(nb, 0, m), data.shape[b:b + m])
    out = np.zeros(idx.shape[:2] + sliced, data.dtype)
    for i in range(nb):
        for t in np.nonzero(ok[i])[0]:
            out[i, t] = flat[i][tuple(idx[i, t])]
    return out.reshape(indices.shape[:-1] + sliced)


@gather_nd.lower
def _(ctx, data, indices, *, batch_dims=0):
    out = ctx.outputs[0]
    b, m = batch_dims, indices.shape[-1]
    tail = data.shape[b + m:]
    lead = indices.rank - 1
    # each output dim: (index stride, data stride); batch dims advance both, index dims only the
    # index, the data's slice dims only the data. Strided (an Expand-ed index: stride 0) is fine.
    idx_st = list(indices.strides[:-1]) + [0] * len(tail)
    data_st = [data.strides[d] if d < b else 0 for d in range(lead)] + list(data.strides[b + m:])
    shape, (out_st, idx_st, data_st) = collapse(out.shape, out.strides, idx_st, data_st)
    n = out.numel
    src = render_gather_nd(data.dtype, indices.dtype, len(shape), m, wide=_wide(ctx, n, data, indices))
    args = [ctx.ptr(out), out.offset, ctx.ptr(data), data.offset, ctx.ptr(indices), indices.offset, n,
            *shape, *idx_st, *data_st, indices.strides[-1], *data.shape[b:b + m], *data.strides[b:b + m]]
    ctx.launch(src, (-(-n // BLOCK),), args, BLOCK=BLOCK)


# ---- ScatterND ---------------------------------------------------------------------------------

def _reduction(op_name: str, reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise UnsupportedOpError(f"{op_name} reduction '{reduction}' is not one of {', '.join(REDUCTIONS)}")
    return reduction


def _combine_np(reduction: str, cur, upd):
    if reduction == "none":
        return upd
    if cur.dtype == np.bool_:
        return (cur | upd) if reduction in ("add", "max") else (cur & upd)
    return {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}[reduction](cur, upd)


_DUP = np.array([[0, 1], [2, 3], [0, 1], [1, 0], [0, 1]], np.int64)


@op("ScatterND", since=11, kind=Kind.MOVEMENT,
    samples=[Sample([Rand((4, 5, 6)), np.array([[1], [-1]], np.int64), Rand((2, 5, 6))]),
             Sample([Rand((3, 4, 2)), _DUP, Rand((5, 2))], {"reduction": "add"}),
             Sample([Rand((3, 4, 2)), _DUP, Rand((5, 2))], {"reduction": "mul"}),
             Sample([Rand((3, 4, 2)), _DUP, Rand((5, 2))], {"reduction": "max"}),
             Sample([Rand((3, 4, 2)), _DUP[:, :1].astype(np.int32), Rand((5, 4, 2))], {"reduction": "min"}),
             Sample([Rand((3, 4)), np.array([[0, 0], [2, -1], [1, 2]], np.int64), Rand((3,))]),
             Sample([Rand((5, 4), "int64", -9, 9), np.array([[1], [1], [-1]], np.int64), Rand((3, 4), "int64", -9, 9)],
                    {"reduction": "add"}, float_types=("fp32",)),
             Sample([Rand((5, 4), "int32", -9, 9), np.array([[1, 2], [1, 2], [4, 0]], np.int64),
                     Rand((3,), "int32", -9, 9)], {"reduction": "max"}, float_types=("fp32",))])
def scatter_nd(data: TensorType, indices: TensorType, updates: TensorType, *, reduction: str = "none") -> TensorType:
    _reduction("ScatterND", reduction)
    _check_index_dtype("ScatterND", indices)
    m = _tuple_len("ScatterND", indices, data.rank)
    want = indices.shape[:-1] + data.shape[m:]
    if updates.rank != len(want) or not all(_known_eq(a, b) for a, b in zip(updates.shape, want)):
        raise ShapeError(f"ScatterND updates {updates} must have shape [{','.join(map(str, want))}]")
    if updates.dtype != data.dtype:
        raise ModelError(f"ScatterND updates ({updates.dtype.short}) and data ({data.dtype.short}) differ in dtype")
    return data


@scatter_nd.reference
def _(data, indices, updates, *, reduction="none"):
    m = indices.shape[-1]
    out = data.copy()
    idx, ok = _wrap(indices.reshape(-1, m), data.shape[:m])
    upd = updates.reshape((idx.shape[0],) + data.shape[m:])
    for t in np.nonzero(ok)[0]:  # in order: the last of duplicate tuples wins, reductions apply in turn
        key = tuple(idx[t])
        out[key] = _combine_np(reduction, out[key], upd[t])
    return out


@scatter_nd.lower
def _(ctx, data, indices, updates, *, reduction="none"):
    out = ctx.outputs[0]  # a fresh contiguous buffer, offset 0
    ctx.copy(data, out)
    m = indices.shape[-1]
    n_tuples = math.prod(indices.shape[:-1])
    slice_len = math.prod(data.shape[m:])
    if n_tuples == 0 or slice_len == 0:
        return
    indices, updates = ctx.contiguous(indices), ctx.contiguous(updates)
    dims = list(data.shape[:m])
    dst = list(contiguous_strides(dims))  # a slot's place, in slices
    wide = _wide(ctx, n_tuples * slice_len, out, indices, updates)
    tuple_args = [*dims, *dst]
    dtype = data.dtype
    if reduction == "none" and n_tuples > 1:
        owner_dtype = DType.INT32 if n_tuples <= WIDE_LIMIT else DType.INT64
        owner = ctx.temp(owner_dtype, dims)
        ctx.pointwise("idx * 0 - 1", [], owner)
        claim = render_scatter_nd_claim(indices.dtype, owner_dtype, m, wide=wide)
        claim_args = [ctx.ptr(owner), owner.offset, ctx.ptr(indices), indices.offset, n_tuples, *tuple_args]
        ctx.launch(claim, (-(-n_tuples // BLOCK),), claim_args, BLOCK=BLOCK)
        src = render_scatter_nd(dtype, indices.dtype, m, "claimed", reduction, owner_dtype, wide=wide)
        args = [ctx.ptr(out), out.offset, ctx.ptr(updates), updates.offset, ctx.ptr(indices), indices.offset,
                ctx.ptr(owner), owner.offset, n_tuples, slice_len, *tuple_args]
        n = n_tuples * slice_len
        ctx.launch(src, (-(-n // BLOCK),), args, BLOCK=BLOCK)
        return
    args = [ctx.ptr(out), out.offset, ctx.ptr(updates), updates.offset, ctx.ptr(indices), indices.offset,
            n_tuples, slice_len, *tuple_args]
    if reduction in ("add", "max", "min") and dtype in (DType.INT32, DType.INT64):
        src = render_scatter_nd(dtype, indices.dtype, m, "atomic", reduction, wide=wide)
        n = n_tuples * slice_len
        ctx.launch(src, (-(-n // BLOCK),), args, BLOCK=BLOCK)
        return
    # float add/mul (rounding depends on the order), integer mul, narrow types, or a single tuple:
    # one program per block of slice elements walks the tuples in order
    src = render_scatter_nd(dtype, indices.dtype, m, "sequential", reduction, wide=wide)
    block = _pow2_block(slice_len)
    ctx.launch(src, (-(-slice_len // block),), args, generic=((-(-slice_len // BLOCK),), {"BLOCK": BLOCK}),
               BLOCK=block)


# ---- ScatterElements ---------------------------------------------------------------------------

@op("ScatterElements", since=11, kind=Kind.MOVEMENT,
    samples=[Sample([Rand((3, 3)), np.array([[1, 0, 2], [0, 2, 1]], np.int64), Rand((2, 3))]),
             Sample([Rand((2, 5)), np.array([[1, 3, -1], [0, 4, 2]], np.int32), Rand((2, 3))], {"axis": 1}),
             Sample([Rand((2, 5)), np.array([[1, 1, -4, 3]], np.int64), Rand((1, 4))], {"axis": 1, "reduction": "add"}),
             Sample([Rand((3, 4, 2)), np.array([[[0, 1]], [[3, 3]], [[1, 0]]], np.int64), Rand((3, 1, 2))],
                    {"axis": 1, "reduction": "mul"}),
             Sample([Rand((4, 3)), np.array([[1, 2, 0], [1, 2, 0], [-1, 0, 0]], np.int64), Rand((3, 3))],
                    {"axis": 0, "reduction": "max"}),
             Sample([Rand((4, 3)), np.array([[1, 2, 0], [1, 2, 0], [-1, 0, 0]], np.int64), Rand((3, 3))],
                    {"axis": -2, "reduction": "min"}),
             Sample([Rand((6,), "int64", -9, 9), np.array([5, 0, 5, 2], np.int64), Rand((4,), "int64", -9, 9)],
                    {"reduction": "add"}, float_types=("fp32",))])
def scatter_elements(data: TensorType, indices: TensorType, updates: TensorType, *, axis: int = 0,
                     reduction: str = "none") -> TensorType:
    _reduction("ScatterElements", reduction)
    _check_index_dtype("ScatterElements", indices)
    norm_axis(axis, data.rank)
    if indices.rank != data.rank or updates.rank != data.rank:
        raise ShapeError(f"ScatterElements data {data}, indices {indices} and updates {updates} differ in rank")
    if not all(_known_eq(a, b) for a, b in zip(indices.shape, updates.shape)):
        raise ShapeError(f"ScatterElements indices {indices} and updates {updates} differ in shape")
    if updates.dtype != data.dtype:
        raise ModelError(f"ScatterElements updates ({updates.dtype.short}) and data ({data.dtype.short}) "
                         "differ in dtype")
    return data


@scatter_elements.reference
def _(data, indices, updates, *, axis=0, reduction="none"):
    a = norm_axis(axis, data.ndim)
    out = data.copy()
    idx, ok = _wrap(indices[..., None], [data.shape[a]])
    for pos in zip(*np.nonzero(ok)):  # C order: a row's updates in axis order, as the kernel applies them
        key = pos[:a] + (idx[pos][0],) + pos[a + 1:]
        out[key] = _combine_np(reduction, out[key], updates[pos])
    return out


@scatter_elements.lower
def _(ctx, data, indices, updates, *, axis=0, reduction="none"):
    out = ctx.outputs[0]
    ctx.copy(data, out)
    a = norm_axis(axis, data.rank)
    if indices.numel == 0:
        return
    rows = [d for d in range(data.rank) if d != a]
    shape, strides = collapse([indices.shape[d] for d in rows], *[[v.strides[d] for d in rows]
                                                                  for v in (indices, updates, out)])
    n_rows = math.prod(indices.shape[d] for d in rows)
    src = render_scatter_elements(data.dtype, indices.dtype, len(shape), reduction,
                                  wide=_wide(ctx, indices.numel, out, indices, updates))
    args = [ctx.ptr(out), out.offset, ctx.ptr(indices), indices.offset, ctx.ptr(updates), updates.offset,
            n_rows, indices.shape[a], data.shape[a], *shape]
    for st in strides:
        args += list(st)
    args += [indices.strides[a], updates.strides[a], out.strides[a]]
    block = _pow2_block(n_rows)
    ctx.launch(src, (-(-n_rows // block),), args, generic=((-(-n_rows // BLOCK),), {"BLOCK": BLOCK}), BLOCK=block)


# ---- Trilu -------------------------------------------------------------------------------------

@op("Trilu", since=14, kind=Kind.POINTWISE, host_inputs=(1,),
    samples=[Sample([Rand((4, 5))]),
             Sample([Rand((2, 3, 5, 4)), np.array(1, np.int64)], {"upper": 0}),
             Sample([Rand((3, 6)), np.array(-2, np.int64)]),
             Sample([Rand((5, 3)), np.array(7, np.int64)], {"upper": 0}),
             Sample([Rand((2, 4, 4), "int64", -9, 9), np.array(-1, np.int64)], float_types=("fp32",))])
def trilu(x: TensorType, k=None, *, upper: int = 1) -> TensorType:
    if x.rank < 2:
        raise ShapeError(f"Trilu needs rank >= 2, got {x}")
    if k is not None and known(k) and np.asarray(k).size != 1:
        raise ShapeError(f"Trilu k must be a scalar, got shape {np.asarray(k).shape}")
    return x


@trilu.reference
def _(x, k=None, *, upper=1):
    k = 0 if k is None else int(np.asarray(k).reshape(-1)[0])
    return np.triu(x, k) if upper else np.tril(x, k)


@trilu.lower
def _(ctx, x, k=None, *, upper=1):
    out = ctx.outputs[0]  # contiguous: its flat index gives the row and the column
    rows, cols = x.shape[-2:]
    k = 0 if k is None else int(np.asarray(k).reshape(-1)[0])
    k = max(min(k, cols), -rows)  # beyond these every element is kept or dropped alike; keeps k an int32
    keep = ">=" if upper else "<="
    ctx.pointwise(f"tl.where((idx % s0) - ((idx // s0) % s1) {keep} s2, x0, 0)", [x], out, (cols, rows, k))


# ---- OneHot ------------------------------------------------------------------------------------

def _depth(depth) -> int:
    d = np.asarray(depth).reshape(-1)
    if d.size != 1 or not np.isfinite(d[0]) or int(d[0]) < 1:
        raise ShapeError(f"OneHot depth must be one positive number, got {np.asarray(depth).tolist()}")
    return int(d[0])


@op("OneHot", since=11, kind=Kind.MOVEMENT, host_inputs=(1,),
    samples=[Sample([np.array([[1, 9], [2, 4]], np.int64), np.array(10, np.int64), Rand((2,))]),
             Sample([np.array([0, -7, -8, 3, 12], np.int64), np.array([10], np.float32), Rand((2,))], {"axis": 0}),
             Sample([np.array([[1.2, 0.9], [2.0, 4.7]], np.float32), np.array(5, np.int32), Rand((2,))],
                    {"axis": 1})])
def one_hot(indices: TensorType, depth, values: TensorType, *, axis: int = -1) -> TensorType:
    a = norm_axis(axis, indices.rank + 1)
    if values.rank != 1 or (isinstance(values.shape[0], int) and values.shape[0] != 2):
        raise ShapeError(f"OneHot values must be [off_value, on_value], got {values}")
    d = _depth(depth) if known(depth) else "?"
    return TensorType(values.dtype, indices.shape[:a] + (d,) + indices.shape[a:])


@one_hot.reference
def _(indices, depth, values, *, axis=-1):
    d = _depth(depth)
    a = norm_axis(axis, indices.ndim + 1)
    idx = np.asarray(indices).astype(np.int64)
    idx = np.where(idx < 0, idx + d, idx)  # in [-depth, depth); anything else hits no position
    idx = np.expand_dims(idx, a)
    positions = np.arange(d).reshape([-1 if i == a else 1 for i in range(idx.ndim)])
    return np.where(positions == idx, values[1], values[0]).astype(values.dtype)


@one_hot.lower
def _(ctx, indices, depth, values, *, axis=-1):
    d = _depth(depth)
    out = ctx.outputs[0]  # contiguous: its flat index gives the position along the axis
    a = norm_axis(axis, indices.rank + 1)
    seen = ctx.contiguous(indices).reshape(indices.shape[:a] + (1,) + indices.shape[a:]).broadcast_to(out.shape)
    off = View(values.buf, values.dtype, (), (), values.offset)
    on = View(values.buf, values.dtype, (), (), values.offset + values.strides[0])
    inner = math.prod(out.shape[a + 1:])
    ctx.pointwise("tl.where(((idx // s0) % s1) == tl.where(x0.to(tl.int64) < 0, x0.to(tl.int64) + s1, "
                  "x0.to(tl.int64)), x2, x1)", [seen, off, on], out, (inner, d))


# ---- Tile --------------------------------------------------------------------------------------

def _repeats(x_rank: int, repeats) -> list:
    reps = [int(r) for r in np.asarray(repeats).reshape(-1)]
    if len(reps) != x_rank:
        raise ShapeError(f"Tile repeats {reps} must have one entry per input dim ({x_rank})")
    if any(r < 0 for r in reps):
        raise ShapeError(f"Tile repeats {reps} must not be negative")
    return reps


@op("Tile", since=6, kind=Kind.MOVEMENT, host_inputs=(1,),
    samples=[Sample([Rand((2, 3)), np.array([2, 1], np.int64)]),
             Sample([Rand((2, 1, 3)), np.array([1, 3, 2], np.int64)]),
             Sample([Rand((4,), "int32", -9, 9), np.array([3], np.int64)], float_types=("fp32",))])
def tile(x: TensorType, repeats) -> TensorType:
    if not known(repeats):
        return x.with_shape(tuple("?" for _ in x.shape))
    reps = _repeats(x.rank, repeats)
    return x.with_shape([dim_op(lambda d, r=r: d * r, f"*{r}", d) for d, r in zip(x.shape, reps)])


@tile.reference
def _(x, repeats):
    return np.tile(x, _repeats(x.ndim, repeats))


@tile.lower
def _(ctx, x, repeats):
    reps = _repeats(x.rank, repeats)
    # out seen as [r0, d0, r1, d1, ...]; x broadcast along each r (stride 0): one strided copy
    shape = [s for r, d in zip(reps, x.shape) for s in (r, d)]
    strides = [s for st in x.strides for s in (0, st)]
    src = View(x.buf, x.dtype, tuple(shape), tuple(strides), x.offset)
    ctx.copy(src, ctx.outputs[0].reshape(shape))
