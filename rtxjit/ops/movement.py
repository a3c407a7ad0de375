"""Data movement: Transpose, Concat, Split, Slice, Expand (strided views + the copy kernel), Gather.

Gather and GatherElements mask an out-of-range index (never read outside the table): its output
elements are 0. (GatherND, ScatterND and ScatterElements are in ops/indexing.py.)"""

from __future__ import annotations

import numpy as np

from rtxjit.codegen.templates.gather import render_gather, render_gather_elements
from rtxjit.codegen.templates.pointwise import render_concat
from rtxjit.errors import ModelError, ShapeError
from rtxjit.ops.shape import norm_axis
from rtxjit.ir.registry import Kind, Rand, Sample, known, op
from rtxjit.ir.types import TensorType, broadcast_shapes, dim_op
from rtxjit.ir.symint import Sym, prod, whole


@op("Transpose", since=1, kind=Kind.MOVEMENT,
    samples=[Sample([Rand((2, 3, 4))]), Sample([Rand((2, 3, 4, 5))], {"perm": [0, 2, 3, 1]})])
def transpose(x: TensorType, *, perm=None) -> TensorType:
    perm = list(reversed(range(x.rank))) if perm is None else list(perm)
    if sorted(perm) != list(range(x.rank)):
        raise ShapeError(f"Transpose perm {perm} is not a permutation of {x.rank} axes")
    return x.with_shape([x.shape[p] for p in perm])


@transpose.reference
def _(x, *, perm=None):
    return np.transpose(x, perm)


@transpose.lower
def _(ctx, x, *, perm=None):
    perm = list(reversed(range(x.rank))) if perm is None else list(perm)
    ctx.alias(0, x.permute(perm))  # a strided view: readers address it directly, no copy


@op("Concat", since=4, kind=Kind.MOVEMENT,
    samples=[Sample([Rand((2, 3)), Rand((2, 5)), Rand((2, 1))], {"axis": 1}),
             Sample([Rand((1, 3, 2)), Rand((2, 3, 2))], {"axis": -3})])
def concat(*xs: TensorType, axis: int) -> TensorType:
    if not xs:
        raise ModelError("Concat needs at least one input")
    rank = xs[0].rank
    a = norm_axis(axis, rank)
    for x in xs:
        if x.rank != rank or x.dtype != xs[0].dtype:
            raise ShapeError(f"Concat inputs {[str(t) for t in xs]} differ in rank or dtype")
        for i in range(rank):
            if i != a and isinstance(x.shape[i], int) and isinstance(xs[0].shape[i], int) \
                    and x.shape[i] != xs[0].shape[i]:
                raise ShapeError(f"Concat inputs {[str(t) for t in xs]} differ outside axis {a}")
    total = xs[0].shape[a]
    for x in xs[1:]:
        total = dim_op(lambda p, q: p + q, "+", total, x.shape[a])
    return xs[0].with_shape(xs[0].shape[:a] + (total,) + xs[0].shape[a + 1:])


@concat.reference
def _(*xs, axis):
    return np.concatenate(xs, axis=axis)


CONCAT_MAX_INPUTS = 8  # one launch for up to this many non-empty inputs; more run one copy each


@concat.lower
def _(ctx, *xs, axis):
    out = ctx.outputs[0]
    a = norm_axis(axis, out.rank)
    parts, start = [], 0
    for x in xs:
        if x.shape[a]:
            parts.append((x, start))
        start += x.shape[a]
    if 2 <= len(parts) <= CONCAT_MAX_INPUTS and out.numel:
        _concat_launch(ctx, parts, out, a)
        return
    for x, begin in parts:
        ctx.copy(x, out.slice(a, begin, x.shape[a]))


def _concat_launch(ctx, parts: list, out, axis: int) -> None:
    """All ``parts`` ((view, start along ``axis``)) in one ``render_concat`` launch."""
    n = out.numel
    wide = n > 2**31 - 1 or ctx.needs_wide(out, *(x for x, _ in parts))
    src = render_concat(len(parts), out.dtype, out.rank, axis, wide=wide)
    args = [ctx.ptr(out), out.offset]
    for x, _ in parts:
        args += [ctx.ptr(x), x.offset]
    args += [n, *out.shape, *out.strides]
    for x, begin in parts:
        args += [begin, x.shape[axis], *x.strides]
    block = ctx.pointwise_block(n)
    ctx.launch(src, (-(-n // block),), args, generic=ctx.generic_block(n), BLOCK=block)


def _split_sizes(length, split, num_outputs, n_out: int) -> list:
    if split is not None:
        sizes = [int(s) for s in np.asarray(split).reshape(-1)]
        if isinstance(length, int) and sum(sizes) != length:
            raise ShapeError(f"Split sizes {sizes} do not add up to the axis length {length}")
        return sizes
    n = num_outputs or n_out
    if not isinstance(length, int):
        return [dim_op(lambda p: -(-p // n), f"//{n}", length)] * n
    chunk = -(-length // n)
    return [min(chunk, max(length - chunk * i, 0)) for i in range(n)]


@op("Split", since=13, kind=Kind.MOVEMENT, host_inputs=(1,),
    samples=[Sample([Rand((2, 6)), np.array([2, 4], np.int64)], {"axis": 1}, outputs=2),
             Sample([Rand((6, 3))], outputs=3), Sample([Rand((5, 3))], {"num_outputs": 2}, outputs=2)])
def split(x: TensorType, split=None, *, axis: int = 0, num_outputs: int = None, _outputs: int = 1):
    a = norm_axis(axis, x.rank)
    if split is not None and not known(split):  # a graph input: known once the run binds it
        return tuple(x.with_shape(x.shape[:a] + ("?",) + x.shape[a + 1:]) for _ in range(_outputs))
    sizes = _split_sizes(x.shape[a], split, num_outputs, _outputs)
    if len(sizes) != _outputs:
        raise ShapeError(f"Split gives {len(sizes)} parts but the node has {_outputs} outputs")
    return tuple(x.with_shape(x.shape[:a] + (s,) + x.shape[a + 1:]) for s in sizes)


@split.reference
def _(x, split=None, *, axis=0, num_outputs=None, _outputs=1):
    sizes = _split_sizes(x.shape[axis], split, num_outputs, _outputs)
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


@split.lower
def _(ctx, x, split=None, *, axis=0, num_outputs=None):
    a = norm_axis(axis, x.rank)
    start = 0
    for i, (out, t) in enumerate(zip(ctx.outputs, ctx.out_types)):
        length = t.shape[a]
        if out is not None:
            ctx.alias(i, x.slice(a, start, length))
        start += length


def _unit_slice(s, e, d) -> tuple:
    """``(start, length, 1)`` of ``[s:e]`` over a dim of ``d`` (Python's clamping, step 1)."""
    if s < 0:
        s = s + d
    if e < 0:
        e = e + d
    s = min(max(s, 0), d)
    e = min(max(e, 0), d)
    return s, max(e - s, 0), 1


def slice_params(shape, starts, ends, axes, steps) -> list:
    """(axis, start, length, step) per sliced axis, clamped as ONNX's Slice says."""
    rank = len(shape)
    starts = np.asarray(starts).reshape(-1).tolist()
    ends = np.asarray(ends).reshape(-1).tolist()
    axes = list(range(len(starts))) if axes is None else np.asarray(axes).reshape(-1).tolist()
    steps = [1] * len(starts) if steps is None else np.asarray(steps).reshape(-1).tolist()
    out = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = norm_axis(int(a), rank)
        if st == 0:
            raise ShapeError("Slice step 0")
        d = shape[a]
        if not isinstance(d, int):
            out.append((a, None, None, st))
            continue
        if st == 1 and any(isinstance(v, Sym) for v in (s, e, d)):
            out.append((a, *_unit_slice(s, e, d)))  # the same, keeping the dims' expressions
            continue
        rng = range(*slice(int(max(min(s, 2**62), -2**62)), int(max(min(e, 2**62), -2**62)), int(st)).indices(d))
        out.append((a, rng.start, len(rng), int(st)))
    return out


@op("Slice", since=10, kind=Kind.MOVEMENT, host_inputs=(1, 2, 3, 4),
    samples=[Sample([Rand((4, 6)), np.array([1, 0]), np.array([3, 5]), np.array([0, 1]), np.array([1, 2])]),
             Sample([Rand((5, 4)), np.array([-1]), np.array([-10**18]), np.array([0]), np.array([-2])]),
             Sample([Rand((3, 4, 5)), np.array([1]), np.array([1000]), None, None])])
def slice_(x: TensorType, starts, ends, axes=None, steps=None) -> TensorType:
    if not all(known(v) for v in (starts, ends) if v is not None) or not all(
            v is None or known(v) for v in (axes, steps)):
        return x.with_shape(tuple("?" for _ in x.shape))
    dims = list(x.shape)
    for a, _, length, _ in slice_params(x.shape, starts, ends, axes, steps):
        dims[a] = "?" if length is None else length
    return x.with_shape(dims)


@slice_.reference
def _(x, starts, ends, axes=None, steps=None):
    idx = [slice(None)] * x.ndim
    for a, start, length, step in slice_params(x.shape, starts, ends, axes, steps):
        idx[a] = slice(start, start + step * length if start + step * length >= 0 else None, step)
    return x[tuple(idx)]


@slice_.lower
def _(ctx, x, starts, ends, axes=None, steps=None):
    view = x
    for a, start, length, step in slice_params(x.shape, starts, ends, axes, steps):
        view = view.slice(a, start, length, step)
    ctx.alias(0, view)


@op("Expand", since=8, kind=Kind.MOVEMENT, host_inputs=(1,),
    samples=[Sample([Rand((3, 1)), np.array([2, 3, 4])]), Sample([Rand((2, 3)), np.array([1, 1])])])
def expand(x: TensorType, shape) -> TensorType:
    if not known(shape):
        return x.with_shape(tuple("?" for _ in range(max(x.rank, int(shape.type.shape[0])))))
    return x.with_shape(broadcast_shapes(x.shape, tuple(whole(d) for d in np.asarray(shape).reshape(-1).tolist())))


@expand.reference
def _(x, shape):
    return x * np.ones(tuple(int(d) for d in shape), dtype=x.dtype)


@expand.lower
def _(ctx, x, shape):
    ctx.alias(0, x.broadcast_to(ctx.outputs[0].shape))  # stride 0 where broadcast


@op("Gather", since=1, kind=Kind.MOVEMENT,
    samples=[Sample([Rand((5, 4)), np.array([[0, 4], [-1, 2]], np.int64)]),
             Sample([Rand((2, 5, 3)), np.array([1, 0, 4], np.int32)], {"axis": 1}),
             Sample([Rand((4, 3)), np.array(2, np.int64)], {"axis": 0})])
def gather(data: TensorType, indices: TensorType, *, axis: int = 0) -> TensorType:
    a = norm_axis(axis, data.rank)
    if indices.dtype.short not in ("int64", "int32"):
        raise ModelError(f"Gather indices must be int32 or int64, got {indices.dtype.short}")
    return data.with_shape(data.shape[:a] + indices.shape + data.shape[a + 1:])


def take_masked(data: np.ndarray, indices: np.ndarray, axis: int, along: bool = False) -> np.ndarray:
    """``np.take`` (or ``np.take_along_axis``) with ONNX's negative indices, where an index outside
    ``[-n, n)`` gives 0 as the kernels do (they mask the read; onnxruntime rejects such an index)."""
    n = data.shape[axis]
    idx = np.asarray(indices).astype(np.int64)
    idx = np.where(idx < 0, idx + n, idx)
    ok = (idx >= 0) & (idx < n)
    safe = np.where(ok, idx, 0)
    if n == 0:
        shape = idx.shape if along else data.shape[:axis] + idx.shape + data.shape[axis + 1:]
        return np.zeros(shape, data.dtype)
    if along:
        return np.where(ok, np.take_along_axis(data, safe, axis=axis), np.zeros((), data.dtype))
    out = np.take(data, safe, axis=axis)
    keep = ok.reshape((1,) * axis + ok.shape + (1,) * (data.ndim - axis - 1))
    return np.where(keep, out, np.zeros((), data.dtype))


@gather.reference
def _(data, indices, *, axis=0):
    return take_masked(data, indices, norm_axis(axis, data.ndim))


@gather.lower
def _(ctx, data, indices, *, axis=0):
    if _gather_as_view(ctx, data, axis):
        return
    emit_gather(ctx, data, indices, norm_axis(axis, data.rank), ctx.outputs[0])


def emit_gather(ctx, data, indices, a: int, out) -> None:
    """The gather kernel: ``out`` = ``data`` taken at ``indices`` along axis ``a`` (Gather, Compress)."""
    data, indices = ctx.contiguous(data), ctx.contiguous(indices)
    inner = prod(data.shape[a + 1:])
    n = out.numel
    block = 1024
    src = render_gather(data.dtype, indices.dtype, wide=max(n, data.numel) > 2**31 - 1)
    args = [ctx.ptr(out), out.offset, ctx.ptr(data), data.offset, ctx.ptr(indices), indices.offset,
            n, max(indices.numel, 1), max(inner, 1), data.shape[a]]
    ctx.launch(src, (-(-n // block),), args, BLOCK=block)


# ---- Compress ----------------------------------------------------------------------------------

def _kept(condition, n: int) -> np.ndarray:
    """The positions along the axis that ``condition`` keeps (a shorter condition keeps none after it)."""
    c = np.asarray(condition).reshape(-1).astype(bool)
    return np.nonzero(c[:n])[0].astype(np.int64)


@op("Compress", since=11, kind=Kind.MOVEMENT, host_inputs=(1,),
    samples=[Sample([Rand((3, 2)), np.array([0, 1, 1], bool)], {"axis": 0}),
             Sample([Rand((3, 2)), np.array([0, 1], bool)], {"axis": 1}),
             Sample([Rand((3, 2)), np.array([0, 1, 0, 0, 1], bool)]),
             Sample([Rand((2, 4, 3)), np.array([1, 0, 1], bool)], {"axis": -1})])
def compress(data: TensorType, condition, *, axis: int = None):
    """The condition is read on the host (its values give the output's length): a new condition
    is a new binding, as a new shape is."""
    if axis is None:
        static = all(isinstance(d, int) for d in data.shape)
        return data.with_shape((len(_kept(condition, int(np.prod(data.shape)))),) if known(condition) and static
                               else ("?",))
    a = norm_axis(axis, data.rank)
    count = len(_kept(condition, data.shape[a])) if known(condition) and isinstance(data.shape[a], int) else "?"
    return data.with_shape(data.shape[:a] + (count,) + data.shape[a + 1:])


@compress.reference
def _(data, condition, *, axis=None):
    if axis is None:
        return data.reshape(-1)[_kept(condition, data.size)]
    a = norm_axis(axis, data.ndim)
    return np.take(data, _kept(condition, data.shape[a]), axis=a)


@compress.lower
def _(ctx, data, condition, *, axis=None):
    if axis is None:
        data, a = ctx.contiguous(data).reshape((data.numel,)), 0
    else:
        a = norm_axis(axis, data.rank)
    kept = _kept(condition, data.shape[a])
    if ctx.outputs[0].numel == 0:
        return
    emit_gather(ctx, data, ctx.const(kept), a, ctx.outputs[0])


def _gather_as_view(ctx, data, axis: int) -> bool:
    """A Gather of one constant index (ViT's q/k/v picks, class-token reads) is a view: a slice of
    length 1 along the axis, reshaped to the output. Returns whether it was done that way."""
    index = ctx.node.inputs[1]
    if not index.is_const or index.const.size != 1:
        return False
    a = norm_axis(axis, data.rank)
    i = int(index.const.reshape(-1)[0])
    i = i + data.shape[a] if i < 0 else i
    if not 0 <= i < data.shape[a]:
        return False  # out of range: the kernel masks the read (a view would address outside the table)
    try:
        ctx.alias(0, data.slice(a, i, 1).reshape(ctx.out_types[0].shape))
    except ValueError:
        return False
    return True


@op("GatherElements", since=11, kind=Kind.MOVEMENT,
    samples=[Sample([Rand((3, 4)), np.array([[0, 2, 1, 0], [-1, 0, 2, 2]], np.int64)]),
             Sample([Rand((2, 3, 4)), np.array([[[3, 0], [1, -4], [2, 2]]], np.int32)], {"axis": 2})])
def gather_elements(data: TensorType, indices: TensorType, *, axis: int = 0) -> TensorType:
    norm_axis(axis, data.rank)
    if indices.rank != data.rank:
        raise ShapeError(f"GatherElements index rank {indices.rank} != data rank {data.rank}")
    return data.with_shape(indices.shape)


@gather_elements.reference
def _(data, indices, *, axis=0):
    return take_masked(data, indices, norm_axis(axis, data.ndim), along=True)


@gather_elements.lower
def _(ctx, data, indices, *, axis=0):
    out = ctx.outputs[0]
    a = norm_axis(axis, data.rank)
    src = render_gather_elements(data.dtype, data.rank, a)
    block = 1024
    args = [ctx.ptr(out), out.offset, ctx.ptr(data), data.offset, ctx.ptr(indices), indices.offset, out.numel,
            *out.shape, *indices.strides, *data.strides, data.shape[a]]
    ctx.launch(src, (-(-out.numel // block),), args, BLOCK=block)
