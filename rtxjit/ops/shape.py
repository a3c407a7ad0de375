"""Shape ops: views (Reshape, Flatten, Squeeze, Unsqueeze, Identity, Dropout) and shape tensors
(Shape, Size, Constant, ConstantOfShape, Range)."""

from __future__ import annotations

import numpy as np

from rtxjit.codegen.dtypes import TL, compute_type
from rtxjit.errors import ModelError, ShapeError, UnsupportedOpError
from rtxjit.ir.registry import Kind, Rand, Sample, Unknown, known, op
from rtxjit.ir.types import DType, TensorType, dim_op, numel
from rtxjit.ir.symint import whole


def norm_axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < max(rank, 1):
        raise ShapeError(f"{what} {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def _alias(ctx, x, *rest, **attrs):
    """The output is a view of ``x``; a strided ``x`` that no view can reshape is copied."""
    shape = ctx.out_types[0].shape
    try:
        ctx.alias(0, x.reshape(shape))
    except ValueError:
        ctx.copy(x, ctx.outputs[0].reshape(x.shape))


MAX_RANK = 64  # a shape tensor longer than this cannot describe a tensor anything runs on


def _length(v) -> int:
    """Number of entries of a 1-D host input, known or not."""
    if known(v):
        return int(np.asarray(v).size)
    n = v.type.shape[0] if v.type.rank else 1
    if not isinstance(n, int):
        raise ShapeError("the length of a shape tensor must be known")
    if n > MAX_RANK:
        raise ShapeError(f"a shape tensor of {n} entries (rank {n}); rtxjit supports ranks up to {MAX_RANK}")
    return n


@op("Reshape", since=5, kind=Kind.ALIAS, host_inputs=(1,),
    samples=[Sample([Rand((2, 3, 4)), np.array([4, -1], np.int64)]),
             Sample([Rand((2, 3, 4)), np.array([0, 12], np.int64)])])
def reshape(x: TensorType, shape, *, allowzero: int = 0) -> TensorType:
    if not known(shape):
        return x.with_shape(tuple("?" for _ in range(_length(shape))))
    out = []
    for i, d in enumerate(np.asarray(shape).reshape(-1).tolist()):
        if d == 0 and not allowzero:
            if i >= x.rank:
                raise ShapeError(f"Reshape target {list(shape)}: 0 at dim {i} copies a dim the input lacks")
            out.append(x.shape[i])
        else:
            out.append(whole(d))
    if out.count(-1) > 1:
        raise ShapeError(f"Reshape target {list(shape)} has more than one -1")
    if -1 in out:
        rest = numel(tuple(d for d in out if d != -1))
        total = numel(x.shape)
        if isinstance(rest, int) and isinstance(total, int):
            if rest == 0 or total % rest:
                raise ShapeError(f"cannot reshape {x.shape} to {list(shape)}")
            out[out.index(-1)] = total // rest
        else:
            out[out.index(-1)] = dim_op(lambda a, b: a // b, "//", total, rest)
    elif x.static and all(isinstance(d, int) for d in out) and numel(tuple(out)) != numel(x.shape):
        raise ShapeError(f"cannot reshape {x.shape} ({numel(x.shape)} elements) to {out}")
    return x.with_shape(out)


@reshape.reference
def _(x, shape, *, allowzero=0):
    shape = [x.shape[i] if d == 0 and not allowzero else d for i, d in enumerate(np.asarray(shape).tolist())]
    return np.reshape(x, shape)


reshape.lower(_alias)


@op("Flatten", since=1, kind=Kind.ALIAS, samples=[Sample([Rand((2, 3, 4))]), Sample([Rand((2, 3, 4))], {"axis": 0}),
                                                  Sample([Rand((2, 3, 4))], {"axis": -1})])
def flatten(x: TensorType, *, axis: int = 1) -> TensorType:
    if not -x.rank <= axis <= x.rank:
        raise ShapeError(f"Flatten axis {axis} is out of range for rank {x.rank}")
    axis = axis + x.rank if axis < 0 else axis
    return x.with_shape((numel(x.shape[:axis]), numel(x.shape[axis:])))


@flatten.reference
def _(x, *, axis=1):
    axis = axis % (x.ndim + 1) if axis < 0 else axis
    return np.reshape(x, (int(np.prod(x.shape[:axis])), -1))


flatten.lower(_alias)


@op("Squeeze", since=13, kind=Kind.ALIAS, host_inputs=(1,),
    samples=[Sample([Rand((1, 3, 1, 4)), np.array([0, 2], np.int64)]), Sample([Rand((1, 3, 1))])])
def squeeze(x: TensorType, axes=None) -> TensorType:
    if axes is not None and not known(axes):  # a graph input: known once the run binds it
        return x.with_shape(tuple("?" for _ in range(x.rank - _length(axes))))
    if axes is None:
        if not x.static:
            raise ShapeError(f"Squeeze without axes needs a static shape, got {x.shape}")
        return x.with_shape([d for d in x.shape if d != 1])
    ax = {norm_axis(int(a), x.rank) for a in np.asarray(axes).reshape(-1)}
    for a in ax:
        if isinstance(x.shape[a], int) and x.shape[a] != 1:
            raise ShapeError(f"Squeeze axis {a} has size {x.shape[a]}, not 1")
    return x.with_shape([d for i, d in enumerate(x.shape) if i not in ax])


@squeeze.reference
def _(x, axes=None):
    return np.squeeze(x, axis=None if axes is None else tuple(int(a) for a in np.asarray(axes).reshape(-1)))


squeeze.lower(_alias)


@op("Unsqueeze", since=13, kind=Kind.ALIAS, host_inputs=(1,),
    samples=[Sample([Rand((3, 4)), np.array([0, 3], np.int64)]), Sample([Rand((3,)), np.array([-1], np.int64)])])
def unsqueeze(x: TensorType, axes) -> TensorType:
    if not known(axes):
        return x.with_shape(tuple("?" for _ in range(x.rank + _length(axes))))
    rank = x.rank + axes.size
    ax = sorted(norm_axis(int(a), rank) for a in np.asarray(axes).reshape(-1))
    if len(set(ax)) != len(ax):
        raise ShapeError(f"Unsqueeze axes {list(axes)} repeat")
    dims = list(x.shape)
    for a in ax:
        dims.insert(a, 1)
    return x.with_shape(dims)


@unsqueeze.reference
def _(x, axes):
    return np.expand_dims(x, tuple(int(a) for a in np.asarray(axes).reshape(-1)))


unsqueeze.lower(_alias)


@op("Identity", since=1, kind=Kind.ALIAS, samples=[Sample([Rand((2, 3))])])
def identity(x: TensorType) -> TensorType:
    return x


identity.reference(lambda x: x)
identity.lower(_alias)


@op("Dropout", since=12, kind=Kind.ALIAS, host_inputs=(1, 2), samples=[Sample([Rand((2, 3))])])
def dropout(x: TensorType, ratio=None, training_mode=None, *, seed: int = 0, _outputs: int = 1):
    if training_mode is not None and (not known(training_mode) or bool(np.asarray(training_mode))):
        raise UnsupportedOpError("Dropout with training_mode=True is not supported (inference only)")
    return (x, x.with_dtype(DType.BOOL))[:_outputs]


@dropout.reference
def _(x, ratio=None, training_mode=None, *, seed=0, _outputs=1):
    return (x, np.ones(x.shape, bool))[:_outputs]


@dropout.lower
def _(ctx, x, ratio=None, training_mode=None, *, seed=0):
    ctx.alias(0, x)
    if len(ctx.outputs) > 1 and ctx.outputs[1] is not None:
        ctx.pointwise("tl.zeros([BLOCK], tl.int32) + 1", [], ctx.outputs[1])


@op("Shape", since=1, kind=Kind.SHAPE, samples=[Sample([Rand((2, 3, 4))]), Sample([Rand((2, 3, 4))], {"start": 1})])
def shape_(x: TensorType, *, start: int = 0, end: int = None) -> TensorType:
    n = len(range(*slice(start, end).indices(x.rank)))
    return TensorType(DType.INT64, (n,))


@shape_.reference
def _(x, *, start=0, end=None):
    return np.array(x.shape[start:end], np.int64)


@op("Size", since=1, kind=Kind.SHAPE, samples=[Sample([Rand((2, 3, 4))])])
def size(x: TensorType) -> TensorType:
    return TensorType(DType.INT64, ())


size.reference(lambda x: np.array(np.asarray(x).size, np.int64))

_CONSTANT_ATTRS = ("value", "value_float", "value_floats", "value_int", "value_ints")


@op("Constant", since=1, kind=Kind.SHAPE)
def constant(*, value=None, value_float=None, value_floats=None, value_int=None, value_ints=None,
             value_string=None, value_strings=None, sparse_value=None) -> TensorType:
    v = _constant_value(value, value_float, value_floats, value_int, value_ints, value_string, value_strings,
                        sparse_value)
    return TensorType(DType.from_numpy(v.dtype), tuple(v.shape))


def _constant_value(value, value_float, value_floats, value_int, value_ints, value_string, value_strings,
                    sparse_value) -> np.ndarray:
    if value_string is not None or value_strings is not None or sparse_value is not None:
        raise UnsupportedOpError("Constant with a string or sparse value is not supported")
    given = [v for v in (value, value_float, value_floats, value_int, value_ints) if v is not None]
    if len(given) != 1:
        raise ModelError(f"Constant needs exactly one of {', '.join(_CONSTANT_ATTRS)}")
    if value is not None:
        return np.asarray(value)
    if value_float is not None:
        return np.array(value_float, np.float32)
    if value_floats is not None:
        return np.array(value_floats, np.float32)
    if value_int is not None:
        return np.array(value_int, np.int64)
    return np.array(value_ints, np.int64)


constant.reference(lambda **attrs: _constant_value(**attrs))


@op("ConstantOfShape", since=9, kind=Kind.POINTWISE, host_inputs=(0,),
    samples=[Sample([np.array([2, 3], np.int64)], {"value": np.array([1.5], np.float32)}, float_types=("-",)),
             Sample([np.array([4], np.int64)], {"value": np.array([7], np.int32)}, float_types=("-",))])
def constant_of_shape(shape, *, value=None) -> TensorType:
    dtype = DType.FP32 if value is None else DType.from_numpy(np.asarray(value).dtype)
    if not known(shape):
        return TensorType(dtype, tuple("?" for _ in range(_length(shape))))
    return TensorType(dtype, tuple(whole(d) for d in np.asarray(shape).reshape(-1).tolist()))


@constant_of_shape.reference
def _(shape, *, value=None):
    v = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    return np.full(tuple(int(d) for d in shape), v[0], v.dtype)


def scalar_view(ctx, value):
    """A one-element device constant, broadcastable to any shape. Values travel in a buffer, not
    as scalar kernel arguments, because those are fp32 or int: an fp64 0.1 would lose digits."""
    return ctx.const(np.asarray(value).reshape(1)).reshape(())


@constant_of_shape.lower
def _(ctx, shape, *, value=None):
    v = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)[:1]
    ctx.pointwise("x0", [scalar_view(ctx, v)], ctx.outputs[0])


@op("Range", since=11, kind=Kind.POINTWISE, host_inputs=(0, 1, 2),
    samples=[Sample([np.float32(1.0), np.float32(3000.5), np.float32(0.5)], float_types=("-",)),
             Sample([np.int64(10), np.int64(-2), np.int64(-3)], float_types=("-",))])
def range_(start, limit, delta) -> TensorType:
    dtype = (start.type if isinstance(start, Unknown) else TensorType(DType.from_numpy(start.dtype), ())).dtype
    if not (known(start) and known(limit) and known(delta)):
        return TensorType(dtype, ("?",))
    first, last, step = start.item(), limit.item(), delta.item()
    if all(isinstance(v, int) for v in (first, last, step)):  # integers (a dim's expression kept): ceil exactly
        return TensorType(dtype, (max(-((first - last) // step), 0),))
    n = max(int(np.ceil((last - first) / step)), 0)
    return TensorType(dtype, (n,))


@range_.reference
def _(start, limit, delta):
    return np.arange(start.item(), limit.item(), delta.item()).astype(np.asarray(start).dtype)


@range_.lower
def _(ctx, start, limit, delta):
    out = ctx.outputs[0]
    idx = f"idx.to({TL[compute_type(out.dtype)]})"
    ctx.pointwise(f"x0 + {idx} * x1", [scalar_view(ctx, start), scalar_view(ctx, delta)], out)
